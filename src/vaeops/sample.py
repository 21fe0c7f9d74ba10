"""The ONNX consumer: decode latents with models/decoder.onnx, no PyTorch needed.

Only onnxruntime, numpy and Pillow (through figures.save_png) are imported here, never torch, mlflow
or onnx: this is the path a deployment uses, and it must start fast.
"""

import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vaeops.errors import UsageError
from vaeops.figures import grid, save_png
from vaeops.io import atomic_path

FORMATS = ("png", "npy")
CHUNK = 1024  # latents per onnxruntime call: bounds memory for large -n


def session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the CLI reports problems itself
    return opts


def load_decoder(path: Path) -> ort.InferenceSession:
    if not path.is_file():
        raise UsageError(f"{path}: decoder not found; run `vaeops export` (or `dvc repro export`) first")
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"{path}: not a loadable ONNX model ({reason})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or not isinstance(inputs[0].shape[1], int):
        shapes = [(i.name, i.shape) for i in inputs]
        raise UsageError(
            f"{path}: not a vaeops decoder (expected one input z [batch, latent_dim], got {shapes})"
        )
    if len(outputs[0].shape) != 4:
        raise UsageError(
            f"{path}: not a vaeops decoder (output {outputs[0].name} has shape {outputs[0].shape})"
        )
    return session


def load_latents(path: Path, latent_dim: int) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"{path}: latent file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: not a .npy array of latents ({str(e)[:200]})") from None
    if not isinstance(z, np.ndarray) or not np.issubdtype(z.dtype, np.number):
        raise UsageError(f"{path}: expected a numeric N × {latent_dim} .npy array")
    if z.ndim == 1:
        z = z[None, :]
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise UsageError(f"{path}: latents have shape {z.shape}, the decoder wants N × {latent_dim}")
    if len(z) == 0:
        raise UsageError(f"{path}: holds no latents (shape {z.shape})")
    if not np.isfinite(z).all():
        raise UsageError(f"{path}: latents contain NaN or infinity")
    return z.astype(np.float32)


def decode(session: ort.InferenceSession, z: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: z[i : i + CHUNK]})[0] for i in range(0, len(z), CHUNK)])


def run(
    model: Path,
    out: Path,
    n: int = 64,
    seed: int = 0,
    z_file: Path | None = None,
    fmt: str = "png",
    nrow: int = 0,
) -> np.ndarray:
    """Decode `n` random latents (or those in `z_file`) and write a PNG grid or an .npy of images."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not allowed; expected one of {', '.join(FORMATS)}")
    if z_file is None and n < 1:
        raise UsageError(f"-n {n}: need at least one image")
    if nrow < 0:
        raise UsageError(f"--nrow {nrow}: must be ≥ 0 (0 = square-ish grid)")
    if out.suffix.lower() in (".png", ".npy") and out.suffix.lower() != f".{fmt}":
        raise UsageError(f"-o {out}: the suffix does not match --format {fmt}")
    session = load_decoder(model)
    latent_dim = session.get_inputs()[0].shape[1]
    if z_file is not None:
        z = load_latents(z_file, latent_dim)
    else:
        z = np.random.default_rng(seed).standard_normal((n, latent_dim), dtype=np.float32)
    images = decode(session, z)
    if out.is_dir():
        raise UsageError(f"-o {out}: is a folder; name the output file")
    try:
        if fmt == "npy":
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, images)  # a file object keeps numpy from appending ".npy" to the temp name
        else:
            save_png(out, grid(images, nrow or math.ceil(math.sqrt(len(images)))))
    except OSError as e:
        raise UsageError(f"-o {out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {out} ({len(images)} images of {list(images.shape[1:])})", file=sys.stderr)
    return images
