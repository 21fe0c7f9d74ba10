"""train, evaluate and export logging to a real `mlflow server` on loopback (SQLite + artifact folder)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, http_server, write_processed

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def tiny_project(folder: Path) -> Path:
    write_processed(folder / "data/processed", {"train": 256, "val": 64, "test": 64})
    (folder / "params.yaml").write_text(
        "train:\n  epochs: 1\n  batch_size: 64\n"
        "evaluate:\n  iwae_samples: 4\n  iwae_images: 16\n"
        "export:\n  registered_model_name: vaeops-decoder-srv\n"
    )
    return folder


@pytest.fixture
def server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination", str(store / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with http_server(cmd, port, store, env, tmp_path / "server.log") as url:
        yield url, store


def vaeops(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("VAEOPS_PROJECT_ROOT", None)
    return subprocess.run([str(BIN / "vaeops"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_stages_log_through_the_server(tmp_path, server):
    import mlflow
    from mlflow import MlflowClient

    url, store = server
    proj = tiny_project(tmp_path / "proj")
    for stage in ("train", "evaluate", "export"):
        res = vaeops(stage, cwd=proj, uri=url)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    assert not (proj / "mlruns.db").exists() and not (proj / "mlartifacts").exists()

    run_id = json.loads((proj / "models/run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(url)
    client = MlflowClient(url)
    run = client.get_run(run_id)
    for key in ("train/elbo", "val/elbo", "train/kl", "test.elbo", "test.log_px_iwae"):
        assert key in run.data.metrics, key
    assert "onnx.parity_max_abs_diff" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples", "reconstructions"} <= top
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert "samples/epoch_001.png" in samples
    # The bytes went through the server into its artifact folder, not into the project.
    assert list(store.glob("artifacts/**/samples/epoch_001.png"))
    versions = client.search_model_versions("name='vaeops-decoder-srv'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="samples/epoch_001.png", dst_path=str(tmp_path / "dl")
    )
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_down_is_a_clear_error_before_training(tmp_path):
    proj = tiny_project(tmp_path / "proj")
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    res = vaeops("train", cwd=proj, uri=url)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking server {url} is not reachable")
    assert time.monotonic() - start < 60
    assert not (proj / "models/vae.pt").exists()
