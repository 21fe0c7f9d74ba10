"""Which torch device a stage runs on."""

import torch

from vaeops.errors import UsageError


def resolve_device(name: str, key: str) -> torch.device:
    """`auto` | `cpu` | `cuda` (the value of params key `key`) → a torch device; cuda must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key} = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
