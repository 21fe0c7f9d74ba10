"""IDX reading with validation, the seeded split, compact arrays and data statistics."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import idx_bytes, make_idx_set, run_cli, tree, write_set

from vaeops.config import DataParams, PreprocessParams
from vaeops.datasets import DATASETS, read_idx, read_split
from vaeops.errors import UsageError
from vaeops.stages import preprocess

SPEC = DATASETS["mnist"]


def test_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    np.testing.assert_array_equal(read_idx(tmp_path / "a", 3), a)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "bad magic number"),  # float IDX, not uint8
        (lambda b: b[:3] + b"\x02" + b[4:], "has 2 dimensions, expected 3"),
        (lambda b: b[:-5], "does not match its header"),
        (lambda b: b + b"\x00", "does not match its header"),
        (lambda b: b"", "bad magic number empty"),
    ],
)
def test_idx_corruptions_name_the_file(tmp_path, mutate, message):
    good = idx_bytes(np.zeros((2, 3, 4), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(UsageError, match=message) as err:
        read_idx(path, 3)
    assert str(path) in str(err.value)


def test_labels_count_must_match_images(tmp_path):
    files = make_idx_set(n_train=10)
    files["train-labels-idx1-ubyte"] = idx_bytes(np.zeros(9, np.uint8))
    write_set(tmp_path, files, gz=False)
    with pytest.raises(UsageError, match="9 labels for 10 images"):
        read_split(tmp_path, SPEC, "train")


def test_label_out_of_range(tmp_path):
    files = make_idx_set(n_train=10)
    files["train-labels-idx1-ubyte"] = idx_bytes(np.full(10, 10, np.uint8))
    write_set(tmp_path, files, gz=False)
    with pytest.raises(UsageError, match="label 10 outside 0..9"):
        read_split(tmp_path, SPEC, "train")


def test_wrong_image_size(tmp_path):
    write_set(tmp_path, make_idx_set(size=8), gz=False)
    with pytest.raises(UsageError, match=r"images are \(8, 8\), expected \(28, 28\)"):
        read_split(tmp_path, SPEC, "train")


def run_tiny(tmp_path: Path, **pp) -> dict:
    raw = write_set(tmp_path / "raw", make_idx_set(n_train=60, n_test=20), gz=False)
    return preprocess.run(DataParams(), PreprocessParams(**pp), raw, tmp_path / "out", tmp_path / "data.json")


def test_split_sizes_dtypes_and_report(tmp_path):
    summary = run_tiny(tmp_path, val_size=15, seed=3)
    x, y = preprocess.load_split(tmp_path / "out/train.npz")
    assert x.shape == (45, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert preprocess.load_split(tmp_path / "out/val.npz")[0].shape[0] == 15
    assert preprocess.load_split(tmp_path / "out/test.npz")[0].shape[0] == 20
    report = json.loads((tmp_path / "data.json").read_text())
    assert report == summary
    assert report["train"]["count"] == 45 and sum(report["val"]["class_histogram"]) == 15
    assert report["train"]["pixel_mean"] == pytest.approx(x.mean() / 255, abs=1e-6)
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta == {"dataset": "mnist", "image_shape": [1, 28, 28], "classes": list(SPEC.classes)}


def test_split_is_seeded_and_disjoint(tmp_path):
    run_tiny(tmp_path / "a", val_size=15, seed=1)
    run_tiny(tmp_path / "b", val_size=15, seed=1)
    run_tiny(tmp_path / "c", val_size=15, seed=2)
    va, vb, vc = (preprocess.load_split(tmp_path / d / "out/val.npz")[0] for d in "abc")
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)
    # Together train and val are exactly the original training images.
    tr = preprocess.load_split(tmp_path / "a/out/train.npz")[0]
    full = read_split(tmp_path / "a/raw", SPEC, "train")[0]
    both = np.concatenate([tr, va]).reshape(60, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, full.reshape(60, -1)))


def test_train_limit(tmp_path):
    assert run_tiny(tmp_path, val_size=10, train_limit=7)["train"]["count"] == 7


def test_val_size_too_large(tmp_path):
    with pytest.raises(UsageError, match="val_size = 60 must be smaller than the 60 training images"):
        run_tiny(tmp_path, val_size=60)
    assert not (tmp_path / "out").exists()


def test_cli_corrupt_idx_exits_2_and_leaves_outputs_untouched(tmp_path):
    files = make_idx_set()
    write_set(tmp_path / "data/raw/mnist", files, gz=False)
    (tmp_path / "params.yaml").write_text("preprocess:\n  val_size: 10\n")
    assert run_cli("preprocess", cwd=tmp_path).returncode == 0
    before = tree(tmp_path / "data/processed"), tree(tmp_path / "reports")
    (tmp_path / "data/raw/mnist/t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    res = run_cli("preprocess", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: data/raw/mnist/t10k-images-idx3-ubyte: truncated IDX header"
    assert (tree(tmp_path / "data/processed"), tree(tmp_path / "reports")) == before
