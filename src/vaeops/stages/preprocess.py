"""preprocess: verified IDX → compact uint8 arrays for train / val / test, plus data statistics.

The raw files must still hold the payloads download verified (SHA-256), so a file changed or
damaged since then is refused instead of silently trained on.

Images stay uint8 N×C×H×W; scaling to [0, 1] and binarization happen in the training loop on
whole batches. The validation split is a seeded random subset of the training set.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from vaeops.config import DataParams, PreprocessParams
from vaeops.datasets import check_raw, get_spec, read_split
from vaeops.errors import UsageError
from vaeops.io import atomic_path
from vaeops.progress import log


def _savez(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to a temp name
        np.savez(f, images=images, labels=labels)


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        _savez(tmp, images, labels)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"{path}: missing; run `dvc repro preprocess` first")
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["labels"]


def _stats(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    x = images.astype(np.float64) / 255.0
    return {
        "count": int(len(images)),
        "pixel_mean": round(float(x.mean()), 6) if len(x) else 0.0,
        "pixel_std": round(float(x.std()), 6) if len(x) else 0.0,
        "class_histogram": np.bincount(labels, minlength=n_classes).tolist(),
    }


def run(data: DataParams, params: PreprocessParams, raw_dir: Path, out_dir: Path, report: Path) -> dict:
    spec = get_spec(data.dataset)
    meta = out_dir / "meta.json"
    outputs = [out_dir / f"{name}.npz" for name in ("train", "val", "test")] + [meta, report]
    for path in outputs:
        if path.is_dir():
            raise UsageError(f"{path}: is a folder; preprocess writes a file there")
        existing = next(p for p in path.parents if p.exists())
        if not existing.is_dir():
            raise UsageError(f"{path}: cannot be written, {existing} is a file and not a folder")
    check_raw(raw_dir, spec)
    train_x, train_y = read_split(raw_dir, spec, "train")
    test_x, test_y = read_split(raw_dir, spec, "test")
    if params.val_size >= len(train_x):
        raise UsageError(
            f"preprocess.val_size = {params.val_size} must be smaller than the {len(train_x)} training images"
        )
    perm = np.random.default_rng(params.seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(perm[: params.val_size]), np.sort(perm[params.val_size :])
    if params.train_limit:
        train_idx = train_idx[: params.train_limit]
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x, test_y),
    }
    summary = {
        "dataset": spec.name,
        "image_shape": list(spec.image_shape),
        "classes": list(spec.classes),
        **{name: _stats(x, y, len(spec.classes)) for name, (x, y) in splits.items()},
    }
    # All five files or none: each is written to a temp file, and they are renamed into place only
    # once every one is written, so a full disk never leaves new splits beside old statistics.
    with ExitStack() as stack:
        tmp = {path: stack.enter_context(atomic_path(path)) for path in outputs}
        for name, (x, y) in splits.items():
            _savez(tmp[out_dir / f"{name}.npz"], x, y)
        tmp[meta].write_text(
            json.dumps({k: summary[k] for k in ("dataset", "image_shape", "classes")}, indent=2) + "\n"
        )
        tmp[report].write_text(json.dumps(summary, indent=2) + "\n")
    log(", ".join(f"{n}: {len(x)}" for n, (x, _) in splits.items()) + f" images of {spec.name}")
    return summary
