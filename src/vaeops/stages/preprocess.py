"""preprocess: validated IDX → compact uint8 arrays for train / val / test, plus data statistics.

Images stay uint8 N×C×H×W; scaling to [0, 1] and binarization happen in the training loop on
whole batches. The validation split is a seeded random subset of the training set.
"""

from pathlib import Path

import numpy as np

from vaeops.config import DataParams, PreprocessParams
from vaeops.datasets import get_spec, read_split
from vaeops.errors import UsageError
from vaeops.io import atomic_path, write_json
from vaeops.progress import log


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object keeps numpy from appending ".npz" to the temp name.
        np.savez(f, images=images, labels=labels)


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
    for name, (x, y) in splits.items():
        save_split(out_dir / f"{name}.npz", x, y)
    summary = {
        "dataset": spec.name,
        "image_shape": list(spec.image_shape),
        "classes": list(spec.classes),
        **{name: _stats(x, y, len(spec.classes)) for name, (x, y) in splits.items()},
    }
    write_json(out_dir / "meta.json", {k: summary[k] for k in ("dataset", "image_shape", "classes")})
    write_json(report, summary)
    log(", ".join(f"{n}: {len(x)}" for n, (x, _) in splits.items()) + f" images of {spec.name}")
    return summary
