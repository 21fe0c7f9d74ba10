"""The ONNX consumer: draw z from the model's own prior (models/prior.onnx, next to the decoder) and
decode it with models/decoder.onnx, no PyTorch needed. `--z-file` decodes given latents instead.

Only onnxruntime, numpy and Pillow (through figures.save_png) are imported here, never torch, mlflow
or onnx: this is the path a deployment uses, and it must start fast.
"""

import errno
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vaeops.errors import UsageError, WorkError
from vaeops.figures import grid, save_png
from vaeops.io import atomic_path

FORMATS = ("png", "npy")
CHUNK = 1024  # latents per onnxruntime call: bounds memory for large -n
# The input types a decoder may declare; latents are cast to it.
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
# Drawing a PNG grid holds several float32 and uint8 copies of the images at once (figures.grid).
PNG_COPIES = 12


def session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the CLI reports problems itself
    return opts


def open_session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session on the CPU; a file onnxruntime cannot load is one line naming it."""
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"{path}: not a loadable ONNX model ({reason})") from None


def load_decoder(path: Path) -> ort.InferenceSession:
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; name the decoder's .onnx file")
    if not path.is_file():
        raise UsageError(f"{path}: decoder not found; run `vaeops export` (or `dvc repro export`) first")
    session = open_session(path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or not isinstance(inputs[0].shape[1], int):
        shapes = [(i.name, i.shape) for i in inputs]
        raise UsageError(
            f"{path}: not a vaeops decoder (expected one input z [batch, latent_dim], got {shapes})"
        )
    if inputs[0].type not in FLOAT_TYPES:
        raise UsageError(
            f"{path}: not a vaeops decoder (input {inputs[0].name} is {inputs[0].type}, not float)"
        )
    if len(outputs[0].shape) != 4:
        raise UsageError(
            f"{path}: not a vaeops decoder (output {outputs[0].name} has shape {outputs[0].shape})"
        )
    return session


def load_prior(decoder: Path, latent_dim: int) -> ort.InferenceSession:
    """prior.onnx next to the decoder: (eps [batch, D], u [batch]) → z [batch, D]."""
    path = decoder.with_name("prior.onnx")
    if not path.is_file():
        raise UsageError(
            f"{path}: the model's prior is missing next to {decoder.name} (exported by an older vaeops?); "
            "rerun `vaeops export` (or `dvc repro export`), or decode given latents with --z-file"
        )
    session = open_session(path)
    got = {i.name: (i.type, i.shape[1:]) for i in session.get_inputs()}
    outputs = [(o.name, o.type, o.shape[1:]) for o in session.get_outputs()]
    want = {"eps": ("tensor(float)", [latent_dim]), "u": ("tensor(float)", [])}
    if got != want or outputs[:1] != [("z", "tensor(float)", [latent_dim])]:
        raise UsageError(
            f"{path}: not the prior of this {latent_dim}-wide decoder (expected inputs eps [batch, "
            f"{latent_dim}] and u [batch], output z [batch, {latent_dim}]; got {got} → {outputs})"
        )
    return session


def draw_latents(prior: ort.InferenceSession, n: int, latent_dim: int, seed: int) -> np.ndarray:
    """n draws from the prior: seeded noise eps ~ N(0, I) and u ~ U[0, 1) (which mixture component)
    through prior.onnx. For N(0, I) z is eps itself, the same latents as before priors were exported."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((n, latent_dim), dtype=np.float32)
    u = rng.random(n, dtype=np.float32)
    z = np.empty_like(eps)
    for i in range(0, n, CHUNK):
        z[i : i + CHUNK] = prior.run(["z"], {"eps": eps[i : i + CHUNK], "u": u[i : i + CHUNK]})[0]
    return z


def load_latents(path: Path, latent_dim: int) -> np.ndarray:
    """The N × latent_dim array in `path`, memory-mapped: only its header has been read yet."""
    if not path.is_file():
        raise UsageError(f"{path}: latent file not found")
    try:
        z = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        # numpy's message for a file without a .npy header suggests unpickling it: never do that.
        reason = "no .npy header, or pickled objects" if "pickle" in str(e) else str(e).strip()[:200]
        raise UsageError(f"{path}: not a .npy array of latents ({reason})") from None
    if not isinstance(z, np.ndarray) or z.dtype.kind not in "iuf":
        raise UsageError(f"{path}: expected a numeric N × {latent_dim} .npy array")
    if z.ndim == 1:
        z = z[None, :]
    if z.ndim != 2 or z.shape[1] != latent_dim:
        raise UsageError(f"{path}: latents have shape {z.shape}, the decoder wants N × {latent_dim}")
    if len(z) == 0:
        raise UsageError(f"{path}: holds no latents (shape {z.shape})")
    return z


def as_input(z: np.ndarray, dtype: type, path: Path) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond the type become inf: caught below
        z = np.asarray(z, dtype=dtype)
    if not np.isfinite(z).all():
        raise UsageError(f"{path}: latents contain NaN or infinity (as {np.dtype(dtype).name})")
    return z


def decode(session: ort.InferenceSession, z: np.ndarray) -> np.ndarray:
    """All of z's images in one array, decoded in chunks. A model exported with a fixed batch size
    gets exactly that many latents per call, the last chunk padded with zeros."""
    z_in = session.get_inputs()[0]
    fixed = z_in.shape[0] if isinstance(z_in.shape[0], int) and z_in.shape[0] > 0 else None
    step, dtype = fixed or CHUNK, FLOAT_TYPES[z_in.type]
    out = None
    for i in range(0, len(z), step):
        chunk = np.asarray(z[i : i + step], dtype=dtype)
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n, chunk.shape[1]), dtype)])
        images = session.run(None, {z_in.name: chunk})[0][:n]
        if out is None:
            out = np.empty((len(z), *images.shape[1:]), images.dtype)
        out[i : i + n] = images
    assert out is not None
    return out


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup limit; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.3g} TiB"


def check_fits(n: int, probe: np.ndarray, latent_bytes: int, fmt: str, what: str) -> None:
    """Refuse up front what cannot fit in memory, instead of failing after a long decode."""
    per_image = probe[0].nbytes * (PNG_COPIES if fmt == "png" else 1) + latent_bytes
    need, free = n * per_image, available_memory()
    if free is not None and need > free:
        shape = "×".join(map(str, probe.shape[1:]))
        raise UsageError(
            f"{what}: that many {shape} {probe.dtype} images as {fmt} need about {_size(need)} of memory, "
            f"more than the {_size(free)} available; decode fewer per run"
        )


def run(
    model: Path,
    out: Path,
    n: int = 64,
    seed: int = 0,
    z_file: Path | None = None,
    fmt: str = "png",
    nrow: int = 0,
) -> np.ndarray:
    """Decode `n` latents drawn from the model's prior (or those in `z_file`) and write a PNG grid or an
    .npy of images."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not allowed; expected one of {', '.join(FORMATS)}")
    if z_file is None and n < 1:
        raise UsageError(f"-n {n}: need at least one image")
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be ≥ 0")
    if nrow < 0:
        raise UsageError(f"--nrow {nrow}: must be ≥ 0 (0 = square-ish grid)")
    if out.suffix.lower() in (".png", ".npy") and out.suffix.lower() != f".{fmt}":
        raise UsageError(f"-o {out}: the suffix does not match --format {fmt}")
    if out.is_dir():
        raise UsageError(f"-o {out}: is a folder; name the output file")
    session = load_decoder(model)
    z_in = session.get_inputs()[0]
    latent_dim, dtype = z_in.shape[1], FLOAT_TYPES[z_in.type]
    probe = decode(session, np.zeros((1, latent_dim), dtype))  # the size and type of one image
    latent_bytes = latent_dim * np.dtype(dtype).itemsize
    if z_file is not None:
        z = load_latents(z_file, latent_dim)
        check_fits(len(z), probe, latent_bytes, fmt, f"--z-file {z_file} ({len(z)} latents)")
        z = as_input(z, dtype, z_file)
    else:
        prior = load_prior(model, latent_dim)
        # eps, u and z are held at once.
        check_fits(n, probe, latent_bytes + (2 * latent_dim + 1) * 4, fmt, f"-n {n}")
        z = draw_latents(prior, n, latent_dim, seed)
    if fmt == "png" and nrow > len(z):
        raise UsageError(f"--nrow {nrow}: more than the {len(z)} images")
    try:
        images = decode(session, z)
        if fmt == "npy":
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, images)  # a file object keeps numpy from appending ".npy" to the temp name
        else:
            save_png(out, grid(images, nrow or math.ceil(math.sqrt(len(images)))))
    except MemoryError:
        raise WorkError(f"out of memory decoding {len(z)} images; decode fewer per run") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the place is right, it is full
            raise WorkError(
                f"-o {out}: cannot write ({e.strerror or e}); free some space and rerun"
            ) from None
        raise UsageError(f"-o {out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {out} ({len(images)} images of {list(images.shape[1:])})", file=sys.stderr)
    return images
