"""Shared fixtures: tiny synthetic IDX datasets and helpers to run the CLI for real."""

import gzip
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX payload (the format MNIST ships in)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_idx_set(n_train: int = 60, n_test: int = 20, size: int = 28, seed: int = 0) -> dict[str, bytes]:
    """MNIST-named IDX payloads with random digits-like images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)),
        "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n_train, dtype=np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n_test, dtype=np.uint8)),
    }


def write_set(folder: Path, files: dict[str, bytes], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def tiny_idx() -> dict[str, bytes]:
    return make_idx_set()


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch, tiny_idx: dict[str, bytes]) -> dict[str, bytes]:
    """Point the mnist registry entry at the tiny set's digests (and no public mirrors)."""
    from vaeops import datasets

    spec = datasets.DATASETS["mnist"]
    fake = datasets.DatasetSpec(
        name="mnist",
        files=spec.files,
        sha256={k: hashlib.sha256(v).hexdigest() for k, v in tiny_idx.items()},
        image_shape=spec.image_shape,
        classes=spec.classes,
        mirrors=(),
    )
    monkeypatch.setitem(datasets.DATASETS, "mnist", fake)
    return tiny_idx


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run the real `vaeops` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).with_name("vaeops")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes): to show that a failure left nothing behind."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_config(arch: str, image_shape: tuple[int, int, int], latent_dim: int, **parts) -> dict:
    """A model config as train writes it, small: hidden_dim 32, channels [4, 8]; `parts` override
    any train param (likelihood="logistic", prior="vamp", prior_components=3, ...)."""
    from vaeops.config import TrainParams
    from vaeops.model.vae import model_config

    params = TrainParams(arch=arch, latent_dim=latent_dim, hidden_dim=32, channels=[4, 8], **parts)
    return model_config(params, image_shape, "mnist")


def tiny_vae(arch: str, image_shape: tuple[int, int, int], latent_dim: int, seed: int = 0, **parts):
    """A small eval-mode VAE whose BatchNorm layers hold non-trivial affine params and running stats."""
    import torch

    from vaeops.model.vae import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config(arch, image_shape, latent_dim, **parts))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # training-mode passes move the BatchNorm running mean/var off 0/1
            model(torch.rand(16, *image_shape), torch.randn(1, 16, latent_dim))
    return model.eval()


def tiny_checkpoint(
    folder: Path, arch: str, image_shape: tuple[int, int, int], latent_dim: int, **parts
) -> str:
    """models/vae.pt + models/run.json under folder, as train writes them, in the MLflow store that
    tracking.setup() picks for the current environment; returns the run id."""
    import mlflow

    from vaeops import tracking
    from vaeops.model.checkpoint import checkpoint, save_checkpoint

    model = tiny_vae(arch, image_shape, latent_dim, **parts)
    experiment_id = tracking.setup("vaeops")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        run_id = run.info.run_id
    tracking.write_run_file(folder / "models/run.json", run_id, experiment_id)
    save_checkpoint(folder / "models/vae.pt", checkpoint(model, model.config, run_id=run_id, epoch=1))
    return run_id


def isolate_mlflow(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Run in `folder` with MLflow's embedded store there.

    mlflow.set_tracking_uri() (called by tracking.setup) exports MLFLOW_TRACKING_URI into os.environ;
    setting it through `mp` first makes `mp` remove it again on undo, so no test inherits this store.
    """
    mp.chdir(folder)
    mp.delenv("VAEOPS_PROJECT_ROOT", raising=False)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mp.setenv(var, "unset")
        mp.delenv(var)


def write_processed(folder: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """What preprocess writes (split .npz + meta.json), from random 28×28 images, for stage tests."""
    import json

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=np.arange(n) % 10)
    meta = {"dataset": "mnist", "image_shape": [1, 28, 28], "classes": [str(i) for i in range(10)]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(cmd: list, port: int, cwd: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """Run a server in a session of its own until /health answers; stop it by its process id after.

    Its own session, so killing the group also stops the server's worker processes.
    """
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, f"{cmd[0]} did not answer /health in 180 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into os.environ; undo that after each test,
    so no later test (or the dvc/vaeops subprocesses it starts) talks to an earlier test's store."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.setenv(var, "unset")
            monkeypatch.delenv(var)
