"""When a checkpoint may be resumed: only when going on from it reproduces the uninterrupted run."""

from pathlib import Path
from typing import Any

from vaeops.config import TrainParams
from vaeops.errors import UsageError
from vaeops.model.checkpoint import load_checkpoint
from vaeops.progress import log

# Params that do not change the trained weights may differ between a run and its resumption.
# train.nproc only changes float reduction order.
RESUME_FREE = {"resume", "log_every_steps", "device", "threads", "compile", "experiment", "nproc"}


def resume_state(
    params: TrainParams, path: Path, config: dict[str, Any], precision: str
) -> dict[str, Any] | None:
    """The checkpoint at `path` to go on from, or None to start from scratch; a UsageError when it
    was trained with another model config, other weight-changing params, or another precision than
    `precision` (what train.precision means on this machine: auto may differ between machines)."""
    if not params.resume:
        return None
    if not path.exists():
        log(f"train.resume: {path} does not exist yet, starting from scratch")
        return None
    state = load_checkpoint(path)
    if "optimizer" not in state or "params" not in state:
        raise UsageError(f"{path}: holds final weights only, no training state to resume from")
    if state["config"] != config:
        raise UsageError(
            f"{path}: was trained with {state['config']}, not {config}; "
            "set train.resume = false to start over"
        )
    now = params.model_dump()
    if gone := sorted(set(state["params"]) - set(now)):
        raise UsageError(
            f"{path}: was trained by an older vaeops with train.{', train.'.join(gone)}, which no longer "
            "exist; its run cannot be continued: set train.resume = false to start over"
        )
    for key, value in state["params"].items():
        if key not in RESUME_FREE and now.get(key) != value:
            raise UsageError(
                f"{path}: was trained with train.{key} = {value!r}, now {now.get(key)!r}; resuming would not "
                "reproduce an uninterrupted run: restore it or set train.resume = false"
            )
    if state.get("precision", precision) != precision:
        raise UsageError(
            f"{path}: was trained in {state['precision']}, and train.precision = {params.precision} means "
            f"{precision} here; resuming would not reproduce an uninterrupted run: set train.precision = "
            f"{state['precision']} or train.resume = false"
        )
    return state
