"""The daily loop, for real, on real MNIST with the small-data profile: dvc repro, param changes,
a queued experiment sweep, metrics/plots diff, and a DVC remote round trip."""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SHARED
from test_pipeline import copy_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent"),
]
BIN = Path(sys.executable).parent
# The README's small-data profile: the whole pipeline in well under a minute of compute.
SMALL = {
    "preprocess": {"train_limit": 2000},
    "train": {"epochs": 1, "lr_warmup_steps": 0},
    "evaluate": {"iwae_samples": 20, "iwae_images": 200},
}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def env() -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "VAEOPS_DATA_MIRROR": str(SHARED / "mnist")}
    for key in ("MLFLOW_TRACKING_URI", "VAEOPS_PROJECT_ROOT"):
        e.pop(key, None)
    return e


def sh(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def commit(proj: Path, msg: str) -> None:
    sh(*GIT, "add", "-A", cwd=proj)
    sh(*GIT, "commit", "-qm", msg, cwd=proj)


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    proj = copy_project(tmp_path_factory.mktemp("e2e"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(proj, "small-data profile")
    res = sh("dvc", "repro", cwd=proj)
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in res.stdout
    commit(proj, "baseline")
    return proj


def runs(proj: Path) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")
    exp = client.get_experiment_by_name("vaeops")
    return [r.to_dictionary() for r in client.search_runs([exp.experiment_id])]


def test_all_five_stages_produce_their_outputs(proj):
    import numpy as np
    import onnxruntime as ort

    metrics = json.loads((proj / "reports/metrics.json").read_text())
    test = metrics["test"]
    assert test["elbo"] < 0 and 0 <= test["active_units"] <= 20
    assert test["log_px_iwae"] >= test["elbo_iwae_images"]
    assert (proj / "reports/figures/samples.png").stat().st_size > 1000
    session = ort.InferenceSession(str(proj / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((3, 20), dtype=np.float32)
    (images,) = session.run(None, {session.get_inputs()[0].name: z})
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    (run,) = runs(proj)
    keys = run["data"]["metrics"]
    assert {"train/elbo", "val/elbo", "test/elbo", "test/log_px_iwae"} <= set(keys)
    assert any(k.startswith("onnx/") for k in keys)


def test_second_repro_does_nothing_in_seconds(proj):
    start = time.monotonic()
    res = sh("dvc", "repro", cwd=proj)
    assert "Running stage" not in res.stdout and "up to date" in res.stdout
    assert time.monotonic() - start < 60


def test_evaluate_param_reruns_only_evaluate(proj):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["traversal_dims"] = 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = sh("dvc", "repro", cwd=proj)
    assert "Running stage 'evaluate'" in res.stdout
    for stage in ("download", "preprocess", "train", "export"):
        assert f"Running stage '{stage}'" not in res.stdout
    commit(proj, "3 traversal rows")


def test_dvc_remote_push_then_pull_in_a_fresh_clone(proj, tmp_path):
    sh("dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=proj)
    commit(proj, "local remote")
    sh("dvc", "push", cwd=proj)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(proj), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    for out in (
        "models/vae.pt",
        "models/decoder.onnx",
        "data/processed/train.npz",
        "reports/figures/samples.png",
    ):
        assert (clone / out).read_bytes() == (proj / out).read_bytes(), out
    res = sh("dvc", "repro", cwd=clone)
    assert "Running stage" not in res.stdout


def test_queued_sweep_lands_every_run_in_the_project_store(proj, tmp_path):
    sh("dvc", "exp", "run", "--queue", "-S", "train.latent_dim=2,32", cwd=proj)
    sh("dvc", "queue", "start", "-j", "2", cwd=proj)
    deadline = time.monotonic() + 1200
    while True:
        status = sh("dvc", "queue", "status", cwd=proj).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=proj).stdout)
    exps = {
        e["name"]: e["revs"][0]["data"]
        for baseline in shown
        for e in (baseline.get("experiments") or [])
        if e.get("name")
    }
    assert len(exps) == 2
    for data in exps.values():
        assert data["metrics"]["reports/metrics.json"]["data"]["test"]["elbo"] < 0

    # Train, evaluate and export all reran for each train.* change, into the real project's store.
    by_exp = {r["data"]["tags"].get("dvc_experiment"): r for r in runs(proj)}
    for name in exps:
        run = by_exp[name]
        assert run["info"]["status"] == "FINISHED"
        assert run["data"]["params"]["train.latent_dim"] in ("2", "32")
        assert "test/elbo" in run["data"]["metrics"] and any(
            k.startswith("onnx/") for k in run["data"]["metrics"]
        )
    with sqlite3.connect(proj / "mlruns.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    wide = next(n for n, r in by_exp.items() if n in exps and r["data"]["params"]["train.latent_dim"] == "32")
    diff = sh("dvc", "metrics", "diff", "HEAD", wide, cwd=proj).stdout
    assert "test.elbo" in diff
    sh("dvc", "plots", "diff", "HEAD", wide, "-o", str(tmp_path / "plots"), cwd=proj)
    assert (tmp_path / "plots/index.html").exists()

    import onnxruntime as ort

    sh("dvc", "exp", "apply", wide, cwd=proj)
    session = ort.InferenceSession(str(proj / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 32
