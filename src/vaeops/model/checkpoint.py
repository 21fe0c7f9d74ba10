"""The checkpoint: plain data that rebuilds any model, read once and hashed."""

import hashlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from vaeops.errors import UsageError
from vaeops.model.vae import MODEL_KEYS, VAE, build_model


# The checkpoint is plain data (tensors, str, int, float, lists, dicts) so it loads with
# weights_only=True: a file carrying code is refused instead of executed.
def checkpoint(model: VAE, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """config: `model_config(...)`, every part and its params (enough to rebuild the model)."""
    return {"model": model.state_dict(), "config": dict(config), **extra}


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    from vaeops.io import atomic_path

    # Serialised in memory first: torch.save straight to a full disk fails with an opaque C++ error,
    # while a plain write says "no space left on device".
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    return read_checkpoint(path)[0]


def read_checkpoint(path: Path | str) -> tuple[dict[str, Any], str]:
    """(state, SHA-256 of its bytes). The file is read once, so the hash names exactly what was loaded:
    a stage can later tell whether the file it read has been replaced (`file_sha256`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint not found; run `dvc repro train` first")
    data = path.read_bytes()
    state = load_checkpoint_bytes(data, path)
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UsageError(
            f"{path}: not a vaeops checkpoint (expected a dict with 'model' and 'config'); "
            "retrain with `dvc repro train`"
        )
    return state, hashlib.sha256(data).hexdigest()


def load_checkpoint_bytes(data: bytes, name: Path | str = "checkpoint") -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before refusing
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running code from the file: never that.
        raise UsageError(
            f"{name}: not a loadable vaeops checkpoint (it holds more than tensors and plain values, or is "
            "not a torch file); retrain with `dvc repro train`"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name}: not a loadable vaeops checkpoint ({first[:200]})") from None


def file_sha256(path: Path | str) -> str | None:
    """SHA-256 of the file's bytes; None when it is gone."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def model_from_checkpoint(state: dict[str, Any], name: Path | str = "models/vae.pt") -> VAE:
    cfg = state["config"]
    missing = [key for key in MODEL_KEYS if key not in cfg]
    if missing:
        raise UsageError(
            f"{name}: written by an older vaeops (its config lacks {', '.join(missing)}); "
            "retrain with `dvc repro train`"
        )
    try:
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name}: its weights do not fit its own config ({first}); retrain") from None
    return model.eval()
