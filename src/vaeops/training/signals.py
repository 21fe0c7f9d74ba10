"""Stopping a training cleanly, and cleaning up after one that was killed."""

import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vaeops import tracking
from vaeops.io import remove_dead_temp_files
from vaeops.progress import log
from vaeops.training.distributed import world


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT, SIGTERM or SIGHUP; the CLI exits 128 + signum, as a shell does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Ctrl-C, SIGTERM (schedulers, `docker stop`) and SIGHUP (a closed terminal) set a flag that
    training checks between steps, so the stop never lands inside an MLflow or checkpoint write
    (SQLite left locked, a half-logged epoch). A second signal stops at once. Either way the MLflow
    run named in `run_id` ends KILLED, not FAILED as MLflow marks a run left by an exception.

    Under torchrun only Ctrl-C waits for a step's end, as before: each rank checks its own flag, and
    a rank stopping a step early would leave the others waiting in an all-reduce. SIGTERM keeps its
    default there, so torchrun's agent can stop the workers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.run_id = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        signums = [signal.SIGINT] if world()[1] > 1 else [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        try:
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals keep their default behaviour
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.run_id and isinstance(exc, KeyboardInterrupt):
                import mlflow

                mlflow.MlflowClient().set_terminated(self.run_id, "KILLED")
        finally:
            for signum, previous in self._previous.items():
                if previous is not None:  # None: set outside Python, cannot be restored
                    signal.signal(signum, previous)
            self._previous.clear()

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def clean_up_after_killed(experiment: str, outputs: Iterable[Path]) -> None:
    """What a killed training (kill -9, out of memory) left: close its MLflow runs as KILLED and remove
    its temp files from the outputs' folders. A live process's runs and temp files are left alone."""
    for run_id, why in tracking.end_orphaned_runs(tracking.setup(experiment)):
        log(f"marked MLflow run {run_id} KILLED: {why}")
    for path in remove_dead_temp_files(p.parent for p in outputs):
        log(f"removed {path}: its writer ended before finishing it")
