"""MLflow store location and robustness: queued-experiment copies, concurrent writers, a dead server."""

import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from vaeops import tracking
from vaeops.errors import UsageError


def test_store_lives_in_the_real_project_for_queued_experiments(tmp_path, monkeypatch):
    monkeypatch.delenv("VAEOPS_PROJECT_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    queued = tmp_path / "proj/.dvc/tmp/exps/tmpab12cd"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    assert tracking.project_root() == tmp_path / "proj"
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/proj/mlruns.db?timeout=60"


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri() == "http://127.0.0.1:9"


def test_dead_server_is_a_clear_error_in_seconds(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(UsageError, match=f"MLflow tracking server http://127.0.0.1:{port} is not reachable"):
        tracking.setup("vaeops")


def test_concurrent_first_use_of_a_fresh_store(tmp_path: Path):
    """Parallel queued experiments all create the schema and the experiment at once; none may fail."""
    code = (
        "import mlflow\n"
        "from vaeops import tracking\n"
        "eid = tracking.setup('sweep')\n"
        "with mlflow.start_run(experiment_id=eid):\n"
        "    mlflow.log_metric('m', 1.0)\n"
        "print(eid)\n"
    )
    env = {"VAEOPS_PROJECT_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=PIPE, stderr=PIPE) for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e.decode()[-2000:] for _, e in outs]
    assert len({o.decode().split()[-1] for o, _ in outs}) == 1  # one experiment, shared

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    runs = mlflow.search_runs(experiment_names=["sweep"])
    assert len(runs) == 4
