"""IDX reading with validation, the seeded split, compact arrays and data statistics."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, idx_bytes, make_idx_set, run_cli, tree, write_set

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
    """preprocess on the tiny set; the tests calling it take `tiny_registry`, whose digests it has."""
    raw = write_set(tmp_path / "raw", make_idx_set(n_train=60, n_test=20), gz=False)
    return preprocess.run(DataParams(), PreprocessParams(**pp), raw, tmp_path / "out", tmp_path / "data.json")


def test_split_sizes_dtypes_and_report(tmp_path, tiny_registry):
    summary = run_tiny(tmp_path, val_size=15, seed=3)
    x, y = preprocess.load_split(tmp_path / "out/train.npz")
    assert x.shape == (45, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert preprocess.load_split(tmp_path / "out/val.npz")[0].shape[0] == 15
    assert preprocess.load_split(tmp_path / "out/test.npz")[0].shape[0] == 20
    report = json.loads((tmp_path / "data.json").read_text())
    assert report == summary
    assert report["train"]["count"] == 45 and sum(report["val"]["class_histogram"]) == 15
    assert report["train"]["pixel_mean"] == pytest.approx(x.mean() / 255, abs=1e-6)
    assert report["train"]["pixel_std"] == pytest.approx((x / 255).std(), abs=1e-6)
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta == {"dataset": "mnist", "image_shape": [1, 28, 28], "classes": list(SPEC.classes)}


def test_split_is_seeded_and_disjoint(tmp_path, tiny_registry):
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


def test_train_limit(tmp_path, tiny_registry):
    assert run_tiny(tmp_path, val_size=10, train_limit=7)["train"]["count"] == 7


def test_val_size_too_large(tmp_path, tiny_registry):
    with pytest.raises(UsageError, match="val_size = 60 must be smaller than the 60 training images"):
        run_tiny(tmp_path, val_size=60)
    assert not (tmp_path / "out").exists()


# --- the real CLI: raw files that are not the ones download verified --------------------------------

TINY_MAIN = """
import dataclasses, json, sys
from vaeops import cli, datasets
datasets.DATASETS["mnist"] = dataclasses.replace(
    datasets.DATASETS["mnist"], sha256=json.loads(sys.argv[1]), mirrors=()
)
sys.argv = ["vaeops", *sys.argv[2:]]
cli.main()
"""


def run_cli_tiny(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`vaeops ARGS` through cli.main() in a real process whose mnist registry holds the tiny set's
    digests, as tiny_registry does in this one."""
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in make_idx_set().items()}
    return subprocess.run(
        [sys.executable, "-c", TINY_MAIN, json.dumps(digests), *args],
        cwd=cwd,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def preprocessed(tmp_path: Path) -> Path:
    """A project folder after a good download + preprocess of the tiny set."""
    write_set(tmp_path / "data/raw/mnist", make_idx_set(), gz=False)
    (tmp_path / "params.yaml").write_text("preprocess:\n  val_size: 10\n")
    res = run_cli_tiny("preprocess", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return tmp_path


def outputs(folder: Path) -> tuple[dict, dict]:
    return tree(folder / "data/processed"), tree(folder / "reports")


RAW = Path("data/raw/mnist")


def flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x80])


def replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.unlink(), "t10k-images-idx3-ubyte: missing; run `vaeops download`"),
        (replace_with_folder, "t10k-images-idx3-ubyte: not a file; run `vaeops"),
        (
            lambda p: p.write_bytes(b"\x00\x00\x08\x03garbage"),
            "t10k-images-idx3-ubyte: changed since download",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "t10k-images-idx3-ubyte: changed since download"),
        # One pixel: the file is still a well-formed IDX of the right size, only its digest differs.
        (lambda p: p.write_bytes(flip(p.read_bytes())), "t10k-images-idx3-ubyte: changed since"),
    ],
    ids=["deleted", "a folder", "garbage", "truncated", "one pixel"],
)
def test_cli_raw_file_not_the_verified_one_exits_2_and_keeps_outputs(preprocessed, damage, expected):
    before = outputs(preprocessed)
    damage(preprocessed / RAW / "t10k-images-idx3-ubyte")
    line = one_error_line(run_cli_tiny("preprocess", cwd=preprocessed), 2)
    assert line.startswith(f"error: {RAW / 't10k-images-idx3-ubyte'}: ") and expected in line, line
    assert "`dvc repro download`" in line
    assert outputs(preprocessed) == before


def test_cli_before_any_download_names_the_first_file(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    line = one_error_line(run_cli_tiny("preprocess", cwd=tmp_path), 2)
    first = RAW / "train-images-idx3-ubyte"
    assert line == f"error: {first}: missing; run `vaeops download` (or `dvc repro download`) first"
    assert tree(tmp_path) == {"params.yaml": b"{}\n"}


def test_cli_report_is_a_folder_writes_nothing(preprocessed):
    (preprocessed / "elsewhere").mkdir()
    line = one_error_line(
        run_cli_tiny("preprocess", "--report", "elsewhere", "--out", "new", cwd=preprocessed), 2
    )
    assert line == "error: elsewhere: is a folder; preprocess writes a file there"
    assert not (preprocessed / "new").exists()


def test_cli_report_under_a_file_writes_nothing(preprocessed):
    (preprocessed / "blocked").write_text("a file where the report's folder should be\n")
    before = outputs(preprocessed)
    line = one_error_line(run_cli_tiny("preprocess", "--report", "blocked/data.json", cwd=preprocessed), 2)
    assert line == "error: blocked/data.json: cannot be written, blocked is a file and not a folder"
    assert outputs(preprocessed) == before


def test_cli_one_output_failing_replaces_none(preprocessed):
    """All five outputs or none: a report that cannot be created leaves the splits, which come
    first, as they were (and no temp file beside them)."""
    (preprocessed / "params.yaml").write_text("preprocess:\n  val_size: 20\n")
    before = outputs(preprocessed)
    res = run_cli_tiny("preprocess", "--report", "x" * 250 + ".json", cwd=preprocessed)
    assert "File name too long" in one_error_line(res, 1)
    assert outputs(preprocessed) == before


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_cli_real_mnist_with_one_pixel_changed(tmp_path):
    """The registry's own digests: one pixel of the real test set changed is refused."""
    raw = tmp_path / RAW
    raw.mkdir(parents=True)
    for gz in (SHARED / "mnist").glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    (raw / "t10k-images-idx3-ubyte").write_bytes(flip((raw / "t10k-images-idx3-ubyte").read_bytes()))
    (tmp_path / "params.yaml").write_text("{}\n")
    line = one_error_line(run_cli("preprocess", cwd=tmp_path), 2)
    assert f"{RAW / 't10k-images-idx3-ubyte'}: changed since download verified it" in line
    assert "expected 0fa7898d5092" in line
    assert not (tmp_path / "data/processed").exists() and not (tmp_path / "reports").exists()
