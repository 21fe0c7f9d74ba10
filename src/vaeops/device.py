"""Which torch device a stage runs on, and whether it computes in bf16 natively."""

import functools
from pathlib import Path

import torch

from vaeops.errors import UsageError


def resolve_device(name: str, key: str) -> torch.device:
    """`auto` | `cpu` | `cuda` (the value of params key `key`) → a torch device; cuda must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key} = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX, read from Linux's /proc/cpuinfo. Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
