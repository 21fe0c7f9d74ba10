"""Everything MLflow: where the store is, opening or re-entering the training run, tags, images.

The embedded default is a SQLite store plus an artifact folder in the project root (git-ignored), so
no server is needed; MLFLOW_TRACKING_URI points elsewhere (e.g. an `mlflow server`).
"""

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vaeops.errors import UsageError

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


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    embedded = uri == embedded_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(embedded):
        try:
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is not None:
                return exp.experiment_id
            location = (project_root() / ARTIFACTS).as_uri() if embedded else None
            # The UI opens an experiment of this kind on its runs and charts, not the GenAI pages.
            tags = {"mlflow.experimentKind": "custom_model_development"}
            return mlflow.create_experiment(experiment, artifact_location=location, tags=tags)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"MLflow tracking store {uri} is not usable: {first}") from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_image(image: np.ndarray, artifact_file: str) -> None:
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


@contextmanager
def resume_run(run_file: Path | str, experiment: str) -> Iterator[Any]:
    """Re-enter the training run named in `run_file` so evaluate/export log next to training."""
    import mlflow

    run_id = read_run_id(run_file)
    setup(experiment)
    try:
        mlflow.get_run(run_id)
    except Exception:
        raise UsageError(
            f"{run_file}: MLflow run {run_id} is not in the store {tracking_uri()}; retrain or set "
            "MLFLOW_TRACKING_URI to the store that recorded it"
        ) from None
    with mlflow.start_run(run_id=run_id) as run:
        yield run
