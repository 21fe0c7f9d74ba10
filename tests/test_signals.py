"""Stopping training: SIGTERM and SIGHUP end it as Ctrl-C does (checkpoint kept, MLflow run KILLED,
exit 128 + signal), and what a kill -9 leaves (a RUNNING run, temp files) the next training cleans up.

Real `vaeops train` subprocesses on tiny data with many small steps, a real MLflow store in tmp_path."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import ROOT, SHARED, isolate_mlflow, run_cli, write_processed

from vaeops import tracking
from vaeops.io import atomic_path, remove_dead_temp_files
from vaeops.model.checkpoint import load_checkpoint
from vaeops.training.signals import Interrupted, StopFlag

EPOCHS = 6
# Hundreds of small steps per epoch: a signal sent mid-epoch lands between steps, well before the end.
TRAIN = {"latent_dim": 4, "hidden_dim": 32, "batch_size": 4, "epochs": EPOCHS, "lr_warmup_steps": 0}
TRAIN |= {"log_every_steps": 50, "device": "cpu", "threads": 1}
ENV = {"OMP_NUM_THREADS": "1"}


def write_params(folder: Path, **train) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TRAIN | train)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def project(tmp_path, monkeypatch):
    isolate_mlflow(monkeypatch, tmp_path)
    write_processed(tmp_path / "data/processed", {"train": 1600, "val": 64})
    write_params(tmp_path)
    tracking.setup("vaeops")  # this process reads the same store the CLI writes
    return tmp_path


def start_training(project: Path) -> subprocess.Popen:
    """`vaeops train`, returned once epoch 1 is checkpointed and epoch 2's steps are under way."""
    exe = Path(sys.executable).with_name("vaeops")
    proc = subprocess.Popen(
        [str(exe), "train"],
        cwd=project,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    curve = project / "reports/train_curve.csv"  # written after epoch 1's checkpoint and run file
    deadline = time.monotonic() + 300
    while not curve.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"training ended or stalled before epoch 2: {proc.communicate()[1]}")
        time.sleep(0.05)
    time.sleep(0.1)
    assert proc.poll() is None, "training finished before it could be stopped; give it more steps"
    return proc


def run_of(project: Path) -> mlflow.entities.Run:
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    return mlflow.MlflowClient().get_run(run_id)


def temp_files(project: Path) -> list[Path]:
    return [p for d in ("models", "reports") for p in (project / d).glob(".*.tmp")]


def stop_line(name: str) -> str:
    return (
        "interrupted: models/vae.pt holds the last finished epoch; continue with train.resume = true "
        f"({name})"
    )


def stop_training(project: Path, signum: signal.Signals) -> tuple[subprocess.Popen, dict]:
    """Send `signum` to a training in epoch 2 and check what every stop signal must leave: exit
    128 + signum, one `interrupted` line naming it, the checkpoint of a finished epoch, the MLflow run
    KILLED by its own process, no temp files. Returns the process and the checkpoint."""
    proc = start_training(project)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1] == stop_line(signum.name)
    assert sum(line.startswith("interrupted") for line in lines) == 1
    state = load_checkpoint(project / "models/vae.pt")
    assert 1 <= state["epoch"] < EPOCHS
    run = run_of(project)
    assert run.info.run_id == state["run_id"]
    assert run.info.status == "KILLED"
    assert run.data.tags["vaeops.pid"] == str(proc.pid)
    assert "vaeops.stale" not in run.data.tags  # closed by its own process, not found orphaned
    assert temp_files(project) == []
    return proc, state


@pytest.mark.slow
def test_sigterm_stops_between_steps_marks_the_run_killed_and_resume_finishes_it(project):
    proc, state = stop_training(project, signal.SIGTERM)
    run = run_of(project)
    assert run.data.tags["vaeops.host"] == socket.gethostname()
    # Every epoch the checkpoint holds was logged before it was saved.
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/elbo")
    assert set(range(1, state["epoch"] + 1)) <= {m.step for m in history}

    res = run_cli("train", cwd=project, env=ENV | {"VAEOPS_TRAIN__RESUME": "true"})
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(project / "models/vae.pt")["epoch"] == EPOCHS
    resumed = run_of(project)
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["vaeops.pid"] != str(proc.pid)  # now owned by the resuming process
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/elbo")
    assert {m.step for m in history} == set(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_sighup_stops_like_ctrl_c_with_exit_129(project):
    stop_training(project, signal.SIGHUP)


@pytest.mark.slow
def test_after_kill_9_the_next_training_closes_the_run_and_removes_dead_temp_files(project):
    proc = start_training(project)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = run_of(project)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves: nobody closed it

    # A checkpoint write cut short is hard to time, so plant what it leaves; beside it, the temp file
    # of a live writer (this test process, standing in for an evaluate running meanwhile) and a file
    # whose name is not atomic_path's.
    dead = [
        project / f"models/.vae.pt.{proc.pid}.k9abcdef.tmp",
        project / f"reports/.train.json.{proc.pid}.x.tmp",
    ]
    live = project / f"models/.vae.pt.{os.getpid()}.livewrit.tmp"
    other = project / "models/.notes.tmp"
    for path in [*dead, live, other]:
        path.write_bytes(b"partial")

    write_params(project, epochs=1)  # a fresh training in the same project
    res = run_cli("train", cwd=project, env=ENV)
    assert res.returncode == 0, res.stderr

    why = f"process {proc.pid} on {socket.gethostname()} ended without closing the run (killed?)"
    run = mlflow.MlflowClient().get_run(killed.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["vaeops.stale"] == why
    assert f"marked MLflow run {killed.info.run_id} KILLED: {why}" in res.stderr
    assert not any(p.exists() for p in dead)
    assert [p for p in temp_files(project) if f".{proc.pid}." in p.name] == []
    assert live.read_bytes() == b"partial" and other.read_bytes() == b"partial"
    fresh = run_of(project)
    assert fresh.info.run_id != killed.info.run_id and fresh.info.status == "FINISHED"


def test_only_runs_of_ended_processes_on_this_host_are_closed(project):
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = ended.stdout.strip()
    me = tracking.process_tags()
    client = mlflow.MlflowClient()
    experiment_id = tracking.setup("vaeops")
    runs = {
        "live": me,
        "reused pid": me | {"vaeops.pid_start": "1"},  # this pid, but a process started at another time
        "dead": me | {"vaeops.pid": dead_pid},
        "dead, other host": me | {"vaeops.pid": dead_pid, "vaeops.host": "elsewhere"},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment_id, tags=tags).info.run_id for name, tags in runs.items()}
    finished = client.create_run(experiment_id, tags=me | {"vaeops.pid": dead_pid}).info.run_id
    client.set_terminated(finished, "FINISHED")

    closed = dict(tracking.end_orphaned_runs(experiment_id))
    assert set(closed) == {ids["reused pid"], ids["dead"]}
    assert (
        closed[ids["dead"]]
        == f"process {dead_pid} on {me['vaeops.host']} ended without closing the run (killed?)"
    )
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {
        "live": "RUNNING",
        "reused pid": "KILLED",
        "dead": "KILLED",
        "dead, other host": "RUNNING",
        "untagged": "RUNNING",
    }
    assert client.get_run(finished).info.status == "FINISHED"


def test_temp_files_name_their_writer_and_only_dead_writers_files_are_removed(tmp_path):
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f".vae.pt.{ended.stdout.strip()}.abcdefgh.tmp"
    orphan.write_bytes(b"partial")
    with atomic_path(tmp_path / "vae.pt") as tmp:
        tmp.write_bytes(b"new")
        assert tmp.name.startswith(f".vae.pt.{os.getpid()}.") and tmp.name.endswith(".tmp")
        # A writer still at work (this process) keeps its temp file; the ended one's goes.
        assert remove_dead_temp_files([tmp_path, tmp_path / "absent"]) == [orphan]
        assert tmp.exists()
    assert (tmp_path / "vae.pt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.pt"]


def test_a_signal_waits_for_the_check_and_a_second_one_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with StopFlag() as stop:
        stop.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler has run: a deferred stop, nothing raised yet
        with pytest.raises(Interrupted) as first:
            stop.check()
        assert first.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # interrupted by the handler's raise
        assert second.value.signum == signal.SIGHUP
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_sigterm_to_dvc_repro_then_resume_as_the_readme_says(tmp_path):
    """`docker stop` on `dvc repro`, then `VAEOPS_TRAIN__RESUME=true dvc repro` finishes the same run."""
    from test_pipeline import copy_project, dvc

    proj = copy_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"].update(epochs=3, threads=1)
    params["evaluate"].update(iwae_samples=2, iwae_images=10)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("repro", "preprocess", cwd=proj)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    repro = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=proj,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (proj / "models/vae.pt").exists():  # epoch 1 is checkpointed: stop during epoch 2
        assert repro.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(repro.pid, signal.SIGTERM)  # what `docker stop` sends to the container's processes
    repro.wait(timeout=120)
    assert repro.returncode != 0
    kept = load_checkpoint(proj / "models/vae.pt")["epoch"]
    assert 1 <= kept < 3
    resumed = dvc("repro", "train", cwd=proj, VAEOPS_TRAIN__RESUME="true")
    assert f"after epoch {kept} of 3" in resumed.stdout + resumed.stderr
    assert json.loads((proj / "reports/train.json").read_text())["epochs"] == 3
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vaeops").experiment_id])
    assert run.info.status == "FINISHED"
