"""Everything MLflow: where the store is, the training run, logging into it by id, its description.

The embedded default is a SQLite store plus an artifact folder in the project root (git-ignored), so
no server is needed; MLFLOW_TRACKING_URI points elsewhere (e.g. an `mlflow server`).

Metric names follow how MLflow's run page lays out "Model metrics": one section per prefix before the
last '/', sections in alphabetical order, then the keys without '/'. The curves are `train/…` and
`val/…`, so they come first; the single numbers of evaluate and export are named as in DVC's reports
(`test.elbo`, `onnx.parity_max_abs_diff`), without '/', because a `test/` section would sort above
`train/`.
"""

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaeops.errors import UsageError, WorkError

if TYPE_CHECKING:
    import numpy as np

STORE_DB = "mlruns.db"
ARTIFACTS = "mlartifacts"


def project_root() -> Path:
    """The project folder that owns the embedded store.

    `dvc exp run --queue` runs each experiment in a throw-away copy under .dvc/tmp/exps/; a store
    relative to that copy would vanish with it, so runs are recorded in the real project instead.
    """
    if root := os.environ.get("VAEOPS_PROJECT_ROOT"):
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def embedded_uri() -> str:
    # timeout: parallel queued experiments share one SQLite file; wait for the lock instead of failing.
    return f"sqlite:///{project_root() / STORE_DB}?timeout=60"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


@contextmanager
def _store_lock(embedded: bool) -> Iterator[None]:
    """Serialise schema creation and experiment creation between processes sharing the embedded store."""
    if not embedded:
        yield
        return
    lock = project_root() / f".{STORE_DB}.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"git_commit": git_commit(), **(extra or {})}
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = exp
    return tags


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when a tracking server is down, rather than after MLflow's minutes of retries."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it or unset MLFLOW_TRACKING_URI"
        ) from None


def connect() -> str:
    """Point MLflow at the store (a server that is down fails in seconds); returns the store's URI."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    check_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_sqlite_store(uri: str) -> None:
    """An SQLite store MLflow cannot open fails here in one line: MLflow itself retries for minutes."""
    import sqlite3
    from contextlib import closing

    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"{path}: the MLflow store's folder does not exist")
        return  # MLflow creates a new store
    if not path.is_file():
        raise UsageError(f"{path}: the MLflow store is not a file; move it away to start a new store")
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise UsageError(
            f"{path}: the MLflow store cannot be read ({e}); restore it from a backup, or move it away "
            "to start a new store"
        ) from None


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    import mlflow

    uri = connect()
    embedded = uri == embedded_uri()
    with _store_lock(embedded):
        try:
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                location = (project_root() / ARTIFACTS).as_uri() if embedded else None
                # The UI opens an experiment of this kind on its runs and charts, not the GenAI pages.
                tags = {"mlflow.experimentKind": "custom_model_development"}
                return mlflow.create_experiment(experiment, artifact_location=location, tags=tags)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"MLflow tracking store {uri} is not usable: {first}") from None
    if exp.lifecycle_stage == "deleted":
        # Deleted in the UI: the name stays taken until the store is cleaned, so it can't be recreated.
        raise UsageError(
            f"MLflow experiment '{experiment}' was deleted (in the UI?); restore it with "
            f"`{restore_command('experiments', '--experiment-id', exp.experiment_id)}`, or set "
            "train.experiment to a new name"
        )
    return exp.experiment_id


def restore_command(kind: str, option: str, value: str) -> str:
    """The `mlflow ... restore` command line for this store (the embedded one needs its URI)."""
    uri = tracking_uri()
    prefix = f"MLFLOW_TRACKING_URI='{uri}' " if uri == embedded_uri() else ""
    return f"{prefix}mlflow {kind} restore {option} {value}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_image(image: "np.ndarray", artifact_file: str) -> None:
    """Log an H×W×3 uint8 array as a PNG artifact of the active run."""
    import mlflow

    mlflow.log_image(image, artifact_file=artifact_file)


def write_run_file(path: Path | str, run_id: str, experiment_id: str) -> None:
    from vaeops.io import write_json

    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri()})


def read_run_id(path: Path | str) -> str:
    import json

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: missing; run `dvc repro train` first")
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path}: not a run file (expected JSON with 'run_id')") from None


def run_name(arch: str, latent_dim: int, dataset: str, epochs: int, parts: tuple[str, ...] = ()) -> str:
    """The run's name in the MLflow UI: the DVC experiment's name, else what was trained. `parts` are
    the likelihood and prior when they are not the defaults (mlp-vamp-z20-mnist-10ep)."""
    what = "-".join((arch, *parts))
    return os.environ.get("DVC_EXP_NAME") or f"{what}-z{latent_dim}-{dataset}-{epochs}ep"


# --- evaluate and export: log into the run of the checkpoint they read, and only that one ----------


class CheckpointReplaced(WorkError):
    """The checkpoint changed under a running stage: its results describe a model that is gone."""


def checkpoint_run_id(state: dict[str, Any], model_path: Path, run_file: Path) -> str:
    """The MLflow run that trained the checkpoint `state`, after checking that run_file names it too."""
    run_id = state.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise UsageError(f"{model_path}: names no MLflow run (not written by `vaeops train`); rerun train")
    named = read_run_id(run_file)
    if named != run_id:
        raise UsageError(
            f"{run_file} names MLflow run {named} but {model_path} was trained in run {run_id}; they come "
            "from different trainings: rerun `dvc repro train`"
        )
    return run_id


def require_run(run_id: str) -> None:
    """Point MLflow at the store, which must hold the run (its experiment is the run's business)."""
    import mlflow

    uri = connect()
    with _store_lock(uri == embedded_uri()):  # a first access creates the schema
        client = mlflow.MlflowClient()
        try:
            run = client.get_run(run_id)
            experiment = client.get_experiment(run.info.experiment_id)
        except Exception:
            raise UsageError(
                f"MLflow run {run_id} of the checkpoint is not in the store {uri}; retrain or set "
                "MLFLOW_TRACKING_URI to the store that recorded it"
            ) from None
    # MLflow refuses to log into a deleted run, or a run of a deleted experiment.
    if run.info.lifecycle_stage == "deleted":
        raise UsageError(
            f"MLflow run {run_id} of the checkpoint was deleted (in the UI?); restore it with "
            f"`{restore_command('runs', '--run-id', run_id)}`, or retrain"
        )
    if experiment.lifecycle_stage == "deleted":
        raise UsageError(
            f"MLflow experiment '{experiment.name}' of the checkpoint's run was deleted (in the UI?); "
            f"restore it with `{restore_command('experiments', '--experiment-id', experiment.experiment_id)}`"
            ", or retrain"
        )


def check_unchanged(model_path: Path, sha256: str, stage: str) -> None:
    """Fail when model_path no longer holds the bytes the stage read (a training ran meanwhile)."""
    from vaeops.model.checkpoint import file_sha256

    if file_sha256(model_path) != sha256:
        raise CheckpointReplaced(
            f"{model_path} was replaced while {stage} ran (a new training?); rerun {stage}"
        )


@contextmanager
def recording(run_id: str, stage: str) -> Iterator[Any]:
    """Yield an MlflowClient to log into the run by id. Afterwards tag the run `vaeops.<stage>` = done,
    or = failed plus `vaeops.<stage>.error` = the one-line reason, and rewrite its description.

    The run's status stays what training left (no start_run/end_run here): a failed evaluate does not
    make a good training FAILED. A replaced checkpoint records nothing: that run did nothing wrong.
    """
    import mlflow

    client = mlflow.MlflowClient()
    try:
        yield client
    except CheckpointReplaced:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
        try:
            client.set_tag(run_id, f"vaeops.{stage}", "failed")
            client.set_tag(run_id, f"vaeops.{stage}.error", reason)
        except Exception:  # the store itself failing: the error being raised says so
            pass
        raise
    client.set_tag(run_id, f"vaeops.{stage}", "done")
    if f"vaeops.{stage}.error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, f"vaeops.{stage}.error")
    describe(run_id)


def log_rerun_params(client: Any, run_id: str, values: dict[str, str]) -> None:
    """Params of a stage that may run again on the same run with other settings (evaluate with another
    k). MLflow params are write-once, so a value that differs from the logged one goes to a tag of the
    same key, which the description reads first; that tag goes again once the values agree."""
    from mlflow.entities import Param, RunTag

    run = client.get_run(run_id)
    logged, tags = run.data.params, run.data.tags
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in values.items() if k not in logged],
        tags=[RunTag(k, v) for k, v in values.items() if logged.get(k, v) != v],
    )
    for key in values.keys() & tags.keys():
        if logged.get(key, values[key]) == values[key]:
            client.delete_tag(run_id, key)


def describe(run_id: str) -> None:
    """Rewrite the run's description (the markdown on its Overview page, tag mlflow.note.content) from
    what the run holds now: what was trained, params that differ from the defaults, results, artifacts.
    Train, evaluate and export each call it after logging, so it never describes a step not taken."""
    import mlflow

    from vaeops.config import Params

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    params = params | {k: v for k, v in run.data.tags.items() if k in params}  # see log_rerun_params

    def p(key: str) -> str:
        return params.get(key, "?")

    defaults = flatten({name: f.annotation().model_dump() for name, f in Params.model_fields.items()})
    changed = [f"`{k}` = {params[k]}" for k in defaults if k in params and params[k] != str(defaults[k])]
    results = []
    if "test.elbo" in metrics:
        results.append(f"test ELBO **{metrics['test.elbo']:.2f}** nats per image")
    if "test.loss" in metrics:
        results.append(
            f"test loss (BCE + KL, not a likelihood) **{metrics['test.loss']:.2f}** nats per image"
        )
    if "test.log_px_iwae" in metrics:
        k, n = p("evaluate.iwae_samples"), p("evaluate.iwae_scored_images")
        results.append(f"IWAE log p(x) ≥ {metrics['test.log_px_iwae']:.2f} (k = {k} on {n} images)")
    if "val/elbo" in metrics:
        results.append(f"val ELBO {metrics['val/elbo']:.2f} at the last epoch")
    lines = [
        f"**{p('train.arch')} VAE**, {p('train.likelihood')} likelihood, {p('train.prior')} prior, "
        f"z = {p('train.latent_dim')}, trained on {p('data.dataset')} "
        f"({p('data.train_images')} images) for {p('train.epochs')} epochs.",
        "",
    ]
    if results:  # the numbers first: the Overview page shows the description's first lines only
        sentence = ", ".join(results) + "."
        lines += [sentence[0].upper() + sentence[1:], ""]
    lines.append("Changed from the defaults: " + (", ".join(changed) if changed else "nothing") + ".")

    artifacts = []
    for item in client.list_artifacts(run_id):
        count = len(client.list_artifacts(run_id, item.path)) if item.is_dir else 0
        artifacts.append(f"{item.path}/ ({count} file{'s' * (count != 1)})" if item.is_dir else item.path)
    outputs = run.outputs.model_outputs if run.outputs else []
    names = sorted({client.get_logged_model(o.model_id).name for o in outputs})
    if names:
        artifacts.append("logged models: " + ", ".join(names))
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    artifacts += [f"registered: {v.name} version {v.version}" for v in versions]
    if artifacts:
        lines += ["", "Artifacts:", "", *[f"- {a}" for a in artifacts]]
    client.set_tag(run_id, "mlflow.note.content", "\n".join(lines) + "\n")


def process_tags() -> dict[str, str]:
    """Tags naming the process that trains a run, so a later training can tell a run whose process
    died without closing it (kill -9, out of memory) from a live one."""
    import socket

    from vaeops.io import process_start

    tags = {"vaeops.host": socket.gethostname(), "vaeops.pid": str(os.getpid())}
    if start := process_start(os.getpid()):
        tags["vaeops.pid_start"] = start
    try:  # containers sharing the host's name still see each other's pids only in one namespace
        tags["vaeops.pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return tags


def end_orphaned_runs(experiment_id: str) -> list[tuple[str, str]]:
    """Mark KILLED the experiment's RUNNING runs whose training process on this host has ended;
    returns (run id, why) for each. Runs of live processes, or of other hosts, are left alone."""
    import mlflow

    from vaeops.io import process_ended

    me = process_tags()
    client = mlflow.MlflowClient()
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("vaeops.pid", "")
        same_host = all(tags.get(k) == me.get(k) for k in ("vaeops.host", "vaeops.pid_ns"))
        if not (same_host and pid.isdigit() and process_ended(int(pid), tags.get("vaeops.pid_start"))):
            continue
        why = f"process {pid} on {me['vaeops.host']} ended without closing the run (killed?)"
        client.set_tag(run.info.run_id, "vaeops.stale", why)
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append((run.info.run_id, why))
    return ended
