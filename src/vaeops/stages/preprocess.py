"""preprocess: verified raw files → compact uint8 arrays for train / val / test, plus data statistics.

The raw files must still be the ones download verified (their digests), so a file changed or
damaged since then is refused instead of silently trained on.

Images stay uint8 N×C×H×W; scaling to [0, 1] and binarization happen in the training loop on
whole batches. The validation split is a seeded random subset of the training set; a dataset
without a test split of its own (folder) has its test split drawn the same way first.
"""

import json
import zipfile
import zlib
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from vaeops.config import DataParams, PreprocessParams
from vaeops.datasets import get_spec
from vaeops.errors import UsageError
from vaeops.io import atomic_path
from vaeops.progress import log


def _savez(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to a temp name
        np.savez(f, images=images, labels=labels)


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        _savez(tmp, images, labels)


def load_split(
    path: Path, image_shape: Sequence[int] | None = None, classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A split as save_split wrote it: uint8 images N×C×H×W and integer labels N. A damaged or foreign
    file is one clear error here rather than a failure deep inside a stage. `image_shape` (C, H, W)
    and the number of `classes`, when given, are checked too."""
    redo = "rerun `dvc repro preprocess`"
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not a split; {redo}")
    if not path.is_file():
        raise UsageError(f"{path}: missing; run `dvc repro preprocess` first")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with data as z:
            missing = [key for key in ("images", "labels") if key not in z.files]
            if missing:
                raise UsageError(
                    f"{path}: has no {' or '.join(missing)} array; not a split of preprocess; {redo}"
                )
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # np.load's own message for a file that is no archive suggests unpickling it: never do that.
        reason = "not an .npz archive" if "pickle" in str(e) else str(e).strip().splitlines()[0][:200]
        raise UsageError(f"{path}: not a readable split ({reason}); {redo}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(
            f"{path}: images are {images.dtype} {list(images.shape)}, expected uint8 N×C×H×W; {redo}"
        )
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        expected = "×".join(map(str, image_shape))
        raise UsageError(f"{path}: images are {list(images.shape)}, expected N×{expected}; {redo}")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise UsageError(
            f"{path}: labels are {labels.dtype} {list(labels.shape)}, expected {len(images)} integers "
            f"(one per image); {redo}"
        )
    top = classes - 1 if classes is not None else None
    if len(labels) and (labels.min() < 0 or (top is not None and labels.max() > top)):
        bad = labels.min() if labels.min() < 0 else labels.max()
        allowed = f"0..{top}" if top is not None else "≥ 0"
        raise UsageError(f"{path}: label {bad} outside {allowed}; {redo}")
    return images, labels.astype(np.int64, copy=False)


def _stats(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    # From a histogram of the 256 pixel values, counted a slice at a time: exact, and never a
    # float copy of a whole split.
    counts = np.zeros(256, np.int64)
    flat = images.reshape(-1)
    for i in range(0, len(flat), 1 << 24):
        counts += np.bincount(flat[i : i + (1 << 24)], minlength=256)
    values = np.arange(256) / 255.0
    n = max(int(counts.sum()), 1)
    mean = float(counts @ values) / n
    std = float(np.sqrt(counts @ (values - mean) ** 2 / n))
    return {
        "count": int(len(images)),
        "pixel_mean": round(mean, 6),
        "pixel_std": round(std, 6),
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
    data_in = spec.read(raw_dir, data)
    train_x, train_y = data_in.train
    rng = np.random.default_rng(params.seed)
    if data_in.test is None:
        if params.test_size + params.val_size >= len(train_x):
            raise UsageError(
                f"preprocess.test_size = {params.test_size} plus val_size = {params.val_size} must be "
                f"fewer than the {len(train_x)} images of {spec.name}; lower them"
            )
        perm = rng.permutation(len(train_x))
        test_idx, pool = np.sort(perm[: params.test_size]), np.sort(perm[params.test_size :])
        test = train_x[test_idx], train_y[test_idx]
    else:
        pool, test = np.arange(len(train_x)), data_in.test
        if params.val_size >= len(train_x):
            raise UsageError(
                f"preprocess.val_size = {params.val_size} must be smaller than the {len(train_x)} "
                "training images"
            )
    # Indices into the pool until the end, so each split is copied out of the images once.
    perm = rng.permutation(len(pool))
    val_idx, train_idx = pool[np.sort(perm[: params.val_size])], pool[np.sort(perm[params.val_size :])]
    if params.train_limit:
        train_idx = train_idx[: params.train_limit]
    splits = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": test,
    }
    classes = list(data_in.classes)
    summary = {
        "dataset": spec.name,
        "image_shape": list(train_x.shape[1:]),
        "classes": classes,
        **{name: _stats(x, y, len(classes)) for name, (x, y) in splits.items()},
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
