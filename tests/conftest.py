"""Shared fixtures: tiny synthetic IDX datasets and helpers to run the CLI for real."""

import gzip
import hashlib
import os
import subprocess
import sys
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
