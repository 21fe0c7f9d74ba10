"""MLflow store location and robustness (queued-experiment copies, concurrent writers, a dead server);
logging into a run by id without touching its status; run names and descriptions."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import mlflow
import pytest

from vaeops import tracking
from vaeops.errors import UsageError, WorkError


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


# --- logging into a run by id: status, tags, description ------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the tests below (creating its schema takes seconds)."""
    folder = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEOPS_PROJECT_ROOT", str(folder))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_EXP_NAME"):
            mp.setenv(var, "unset")  # so that undo removes what mlflow.set_tracking_uri() exports
            mp.delenv(var)
        tracking.setup("vaeops")
        yield folder


@pytest.fixture
def finished_run(store, monkeypatch):
    """A FINISHED training run with the params train logs, as evaluate and export find it."""
    from vaeops.config import TrainParams

    monkeypatch.setenv("VAEOPS_PROJECT_ROOT", str(store))
    experiment_id = tracking.setup("vaeops")
    params = TrainParams(epochs=3, batch_size=64)
    with mlflow.start_run(experiment_id=experiment_id, run_name="probe") as run:
        mlflow.log_params(tracking.flatten({"train": params.model_dump(), "data": {"dataset": "mnist"}}))
        mlflow.log_params({"data.train_images": 256})
        mlflow.log_metric("val/elbo", -101.5, step=1)
    return run.info.run_id


def status_and_tags(run_id: str) -> tuple[str, dict[str, str]]:
    run = mlflow.MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags


def test_recording_tags_the_run_and_never_changes_its_status(finished_run):
    with pytest.raises(WorkError, match="parity failed"):
        with tracking.recording(finished_run, "export") as client:
            client.log_dict(finished_run, {"a": 1}, "onnx/partial.json")
            raise WorkError("decoder ONNX parity failed on 'batch_1'")
    status, tags = status_and_tags(finished_run)
    assert status == "FINISHED"
    assert tags["vaeops.export"] == "failed"
    assert tags["vaeops.export.error"] == "decoder ONNX parity failed on 'batch_1'"

    with tracking.recording(finished_run, "export") as client:
        assert mlflow.active_run() is None  # logging by id: no run is started
    status, tags = status_and_tags(finished_run)
    assert status == "FINISHED" and tags["vaeops.export"] == "done"
    assert "vaeops.export.error" not in tags  # the earlier failure's reason is gone with it


def test_a_replaced_checkpoint_records_nothing(finished_run, tmp_path):
    model = tmp_path / "vae.pt"
    model.write_bytes(b"the checkpoint evaluate read")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    tracking.check_unchanged(model, digest, "evaluate")  # unchanged: no error
    model.write_bytes(b"a new training's checkpoint")
    with pytest.raises(WorkError) as err:
        with tracking.recording(finished_run, "evaluate"):
            tracking.check_unchanged(model, digest, "evaluate")
    assert str(err.value) == f"{model} was replaced while evaluate ran (a new training?); rerun evaluate"
    status, tags = status_and_tags(finished_run)
    assert status == "FINISHED" and "vaeops.evaluate" not in tags and "vaeops.evaluate.error" not in tags


def test_rerun_params_stay_true_when_a_rerun_changes_them(finished_run):
    client = mlflow.MlflowClient()
    first = {"evaluate.iwae_samples": "1000", "evaluate.seed": "0"}
    tracking.log_rerun_params(client, finished_run, first)
    tracking.log_rerun_params(client, finished_run, {**first, "evaluate.iwae_samples": "20"})
    run = client.get_run(finished_run)
    assert run.data.params["evaluate.iwae_samples"] == "1000"  # MLflow params are write-once
    assert run.data.tags["evaluate.iwae_samples"] == "20" and "evaluate.seed" not in run.data.tags
    tracking.describe(finished_run)
    assert "`evaluate.iwae_samples` = 20" in client.get_run(finished_run).data.tags["mlflow.note.content"]

    tracking.log_rerun_params(client, finished_run, first)
    assert "evaluate.iwae_samples" not in client.get_run(finished_run).data.tags


def test_description_summarises_the_run(finished_run):
    client = mlflow.MlflowClient()
    tracking.describe(finished_run)
    text = client.get_run(finished_run).data.tags["mlflow.note.content"]
    assert text.startswith(
        "**mlp VAE**, bernoulli likelihood, normal prior, z = 20, trained on mnist (256 images) for 3 epochs."
    )
    # Only what differs from the defaults in vaeops.config.
    assert "Changed from the defaults: `train.epochs` = 3, `train.batch_size` = 64." in text
    assert "\n\nVal ELBO -101.50 at the last epoch.\n\n" in text
    assert "test ELBO" not in text and "Artifacts" not in text  # evaluate has not run: not claimed

    client.log_metric(finished_run, "test.elbo", -102.25)
    client.log_metric(finished_run, "test.log_px_iwae", -98.5)
    client.log_param(finished_run, "evaluate.iwae_samples", "50")
    client.log_param(finished_run, "evaluate.iwae_scored_images", "60")
    client.log_dict(finished_run, {"a": 1}, "evaluate/elbo_by_class.json")
    client.log_text(finished_run, "x", "evaluate/b.txt")
    tracking.describe(finished_run)
    text = client.get_run(finished_run).data.tags["mlflow.note.content"]
    assert (
        "\n\nTest ELBO **-102.25** nats per image, IWAE log p(x) ≥ -98.50 (k = 50 on 60 images), "
        "val ELBO -101.50 at the last epoch.\n\n"
    ) in text
    assert "- evaluate/ (2 files)" in text and "http" not in text


def test_run_name_is_the_dvc_experiment_else_what_was_trained(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.run_name("conv", 32, "fashion-mnist", 10) == "conv-z32-fashion-mnist-10ep"
    monkeypatch.setenv("DVC_EXP_NAME", "pupal-myth")
    assert tracking.run_name("conv", 32, "fashion-mnist", 10) == "pupal-myth"


def test_run_file_must_name_the_checkpoints_run(tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"run_id": "bbbb"}))
    assert tracking.checkpoint_run_id({"run_id": "bbbb"}, tmp_path / "vae.pt", run_file) == "bbbb"
    with pytest.raises(UsageError, match=r"names MLflow run bbbb but .*vae.pt was trained in run aaaa"):
        tracking.checkpoint_run_id({"run_id": "aaaa"}, tmp_path / "vae.pt", run_file)
    with pytest.raises(UsageError, match="names no MLflow run"):
        tracking.checkpoint_run_id({}, tmp_path / "vae.pt", run_file)


def test_deleted_experiment_or_run_is_one_line_with_a_restore_command_that_works(tmp_path):
    """Deleted in the UI: train and evaluate say so and print the `mlflow ... restore` that fixes it."""
    import os
    import shlex

    from conftest import run_cli, write_processed

    write_processed(tmp_path / "data/processed", {"train": 64, "val": 32, "test": 32})
    (tmp_path / "params.yaml").write_text(
        "train:\n  epochs: 1\n  batch_size: 32\n  hidden_dim: 16\n  latent_dim: 2\n"
        "evaluate:\n  iwae_samples: 2\n  iwae_images: 8\n"
    )
    # run_cli starts from os.environ: name this project's embedded store outright, whatever an earlier
    # test's fixture left there.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": "",
        "VAEOPS_PROJECT_ROOT": str(tmp_path),
    }
    assert run_cli("train", cwd=tmp_path, env=env).returncode == 0
    run_id = json.loads((tmp_path / "models/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")

    def refused(stage: str, what: str) -> str:
        res = run_cli(stage, cwd=tmp_path, env=env)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"{what} was deleted" in errors[0]
        return errors[0].split("`")[1]  # the restore command, between backticks

    def restore(command: str) -> None:
        """Run `MLFLOW_TRACKING_URI='...' mlflow <kind> restore ...` as the line says."""
        assignment, program, *args = shlex.split(command)
        name, value = assignment.split("=", 1)
        assert program == "mlflow"
        exe = Path(sys.executable).with_name("mlflow")
        assert subprocess.run([str(exe), *args], env={**env, name: value}, cwd=tmp_path).returncode == 0

    client.delete_run(run_id)
    restore(refused("evaluate", f"MLflow run {run_id} of the checkpoint"))
    assert run_cli("evaluate", cwd=tmp_path, env=env).returncode == 0

    client.delete_experiment(client.get_run(run_id).info.experiment_id)
    restore(refused("train", "MLflow experiment 'vaeops'"))
    assert run_cli("train", cwd=tmp_path, env=env).returncode == 0
