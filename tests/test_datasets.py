"""Datasets beyond MNIST: your own image folder, CIFAR-10's binary archive, Fashion-MNIST end to end."""

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, run_cli, tree
from PIL import Image

from vaeops import datasets
from vaeops.config import DataParams, PreprocessParams, load_params
from vaeops.datasets import cifar10
from vaeops.errors import UsageError, WorkError
from vaeops.stages import download, preprocess


@pytest.fixture(autouse=True)
def no_env_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VAEOPS_DATA_MIRROR", raising=False)
    monkeypatch.setenv("VAEOPS_SYSTEM_DATASETS", str(tmp_path / "no-system-datasets"))


def one_error_line(res, code: int) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# --- your own images --------------------------------------------------------------------------------


def save_image(
    path: Path, colour: int | tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG"
) -> Path:
    """A solid image of `colour` (a grey level, or RGB), `size` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if isinstance(colour, int) else "RGB"
    Image.new(mode, size, colour).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


# (file, colour, size): grey and RGB, PNG and JPEG, odd sizes, an upper-case suffix and a file one
# folder down; every colour differs from the others, so each output image tells which file it was.
CATS = [
    ("a.png", 40, (13, 17)),
    ("b.PNG", (200, 30, 60), (40, 31)),
    ("deeper/c.jpg", (30, 160, 90), (31, 40)),
]
DOGS = [
    ("d.jpeg", 120, (17, 13)),
    ("e.png", (10, 20, 230), (8, 8)),
    ("f.JPG", (250, 250, 20), (50, 20)),
]


def image_folder(root: Path) -> Path:
    for cls, files in (("cats", CATS), ("dogs", DOGS)):
        for name, colour, size in files:
            fmt = "JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG"
            save_image(root / cls / name, colour, size, fmt)
    (root / "dogs/notes.txt").write_text("not an image: skipped\n")
    save_image(root / "dogs/.hidden.png", 0, (4, 4))  # hidden: skipped
    save_image(root / ".thumbnails/x.png", 0, (4, 4))  # a hidden folder is no class
    return root


def folder_params(path: Path, **kw) -> DataParams:
    return DataParams(dataset="folder", path=str(path), **kw)


def prepare(tmp_path: Path, data: DataParams, **pp) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """download + preprocess in this process; the summary and each split's arrays."""
    download.run(data, tmp_path / "raw" / data.dataset)
    summary = preprocess.run(
        data, PreprocessParams(**pp), tmp_path / "raw" / data.dataset, tmp_path / "out", tmp_path / "d.json"
    )
    return summary, {s: preprocess.load_split(tmp_path / f"out/{s}.npz") for s in ("train", "val", "test")}


def grey(colour: int | tuple[int, int, int]) -> int:
    """Pillow's RGB → L: ITU-R 601-2 luma."""
    if isinstance(colour, int):
        return colour
    r, g, b = colour
    return round((r * 299 + g * 587 + b * 114) / 1000)


def solid_colours(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, tuple[int, ...]]]:
    """(label, colour per channel) of every output image, each checked to be one solid colour."""
    found = []
    for x, y in splits.values():
        for image, label in zip(x, y, strict=True):
            flat = image.reshape(image.shape[0], -1).astype(int)
            assert (flat.max(axis=1) - flat.min(axis=1)).max() <= 2, "a solid image did not stay solid"
            found.append((int(label), tuple(int(v) for v in flat.mean(axis=1).round())))
    return sorted(found)


def matches(found: list, expected: list, tol: int = 4) -> bool:
    """Same (label, colour) pairs, colours within `tol` (JPEG moves a solid colour a little)."""
    return len(found) == len(expected) and all(
        fl == el and max(abs(a - b) for a, b in zip(fc, ec, strict=True)) <= tol
        for (fl, fc), (el, ec) in zip(found, expected, strict=True)
    )


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_classes_labels_and_resized_images(tmp_path, channels):
    src = image_folder(tmp_path / "pets")
    summary, splits = prepare(
        tmp_path, folder_params(src, image_size=8, channels=channels), val_size=1, test_size=2
    )
    assert summary["classes"] == ["cats", "dogs"]
    assert summary["image_shape"] == [channels, 8, 8]
    assert {s: summary[s]["count"] for s in splits} == {"train": 3, "val": 1, "test": 2}
    for x, y in splits.values():
        assert x.dtype == np.uint8 and x.shape[1:] == (channels, 8, 8) and y.dtype == np.int64

    def colour(c: int | tuple[int, int, int]) -> tuple[int, ...]:
        if channels == 1:
            return (grey(c),)
        return (c, c, c) if isinstance(c, int) else c

    expected = sorted([(0, colour(c)) for _, c, _ in CATS] + [(1, colour(c)) for _, c, _ in DOGS])
    assert matches(solid_colours(splits), expected), (solid_colours(splits), expected)
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta == {"dataset": "folder", "image_shape": [channels, 8, 8], "classes": ["cats", "dogs"]}


def test_folder_without_subfolders_is_one_class_and_crops_the_centre(tmp_path):
    src = tmp_path / "faces"
    # 30×10: black, white, black thirds. The centred 10×10 square is white (the filter reaches a
    # little past its edge); squeezing the whole image into a square would bring the black in.
    band = np.zeros((10, 30), np.uint8)
    band[:, 10:20] = 255
    src.mkdir()
    Image.fromarray(band).save(src / "wide.png")
    for i in range(4):
        save_image(src / f"{i}.png", (60 * i, 10, 10), (9 + i, 11))
    summary, splits = prepare(tmp_path, folder_params(src, image_size=5, channels=1), val_size=1, test_size=1)
    assert summary["classes"] == ["faces"]
    x = np.concatenate([s[0] for s in splits.values()])
    assert len(x) == 5 and all((y == 0).all() for _, y in splits.values())
    assert sum(image.min() >= 230 for image in x) == 1


def test_folder_download_copies_images_with_a_manifest(tmp_path):
    src = image_folder(tmp_path / "pets")
    out = tmp_path / "raw/folder"
    used = download.run(folder_params(src), out)
    assert set(used.values()) == {str(src.resolve())}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cats", "dogs"]
    assert sorted(e["path"] for e in manifest["images"]) == sorted(
        [f"cats/{n}" for n, _, _ in CATS] + [f"dogs/{n}" for n, _, _ in DOGS]
    )
    for entry in manifest["images"]:
        copy = (out / "images" / entry["path"]).read_bytes()
        assert copy == (src / entry["path"]).read_bytes()
        assert hashlib.sha256(copy).hexdigest() == entry["sha256"]
        assert entry["label"] == (0 if entry["path"].startswith("cats/") else 1)


def mixed(root: Path) -> None:
    save_image(root / "cats/a.png", 1, (4, 4))
    save_image(root / "stray.png", 1, (4, 4))


def empty_class(root: Path) -> None:
    save_image(root / "cats/a.png", 1, (4, 4))
    (root / "dogs").mkdir()


def no_images(root: Path) -> None:
    root.mkdir()
    (root / "readme.txt").write_text("no images here\n")


@pytest.mark.parametrize(
    "make, expected",
    [
        (mixed, "imgs: mixed layout, 1 images at the top (stray.png, …) beside the class sub-folders"),
        (
            empty_class,
            "imgs/dogs: class sub-folder without .png, .jpg or .jpeg images; add some or remove it",
        ),
        (no_images, "imgs: no .png, .jpg or .jpeg images (data.path)"),
        (lambda root: None, "imgs: not found (data.path); point data.path at the folder of your images"),
    ],
    ids=["mixed", "empty class", "no images", "no folder"],
)
def test_folder_layout_problems_are_one_line(tmp_path, make, expected):
    make(tmp_path / "imgs")
    with pytest.raises(UsageError) as err:
        download.run(folder_params(tmp_path / "imgs"), tmp_path / "raw/folder")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "inside", ["raw/folder", "raw/folder/images", "."], ids=["same", "in output", "above"]
)
def test_folder_overlapping_the_output_is_refused(tmp_path, inside):
    image_folder(tmp_path / "raw/folder/images")
    before = tree(tmp_path)
    with pytest.raises(UsageError, match="data.path overlaps download's output"):
        download.run(folder_params(tmp_path / inside), tmp_path / "raw/folder")
    assert tree(tmp_path) == before


def test_folder_needs_a_path(tmp_path):
    with pytest.raises(UsageError, match="reads your images from data.path, which is empty"):
        download.run(DataParams(dataset="folder"), tmp_path / "raw/folder")


def test_channels_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("data:\n  dataset: folder\n  path: x\n")
    monkeypatch.setenv("VAEOPS_DATA__CHANNELS", "1")
    assert load_params(tmp_path / "p.yaml").data.channels == 1
    monkeypatch.setenv("VAEOPS_DATA__CHANNELS", "2")
    with pytest.raises(UsageError) as err:
        load_params(tmp_path / "p.yaml")
    assert str(err.value) == "VAEOPS_DATA__CHANNELS = '2' (data.channels) is not allowed; expected 1 or 3"


def test_folder_too_small_for_test_and_val(tmp_path):
    src = image_folder(tmp_path / "pets")
    with pytest.raises(UsageError, match="test_size = 3 plus val_size = 3 must be fewer than the 6 images"):
        prepare(tmp_path, folder_params(src), val_size=3, test_size=3)
    assert not (tmp_path / "out").exists()


def test_folder_split_is_seeded(tmp_path):
    src = image_folder(tmp_path / "pets")
    a, b, c = (
        prepare(tmp_path / str(i), folder_params(src, image_size=4), val_size=1, test_size=2, seed=seed)[1]
        for i, seed in enumerate((5, 5, 6))
    )
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert not np.array_equal(a["test"][0], c["test"][0])


def test_reading_a_big_folder_logs_progress_outside_a_terminal(tmp_path, monkeypatch, capsys):
    from vaeops.datasets import common

    monkeypatch.setattr(common, "LOG_EVERY_S", 0.0)
    src = image_folder(tmp_path / "pets")
    prepare(tmp_path, folder_params(src), val_size=1, test_size=1)
    err = capsys.readouterr().err
    assert f"copying {src.resolve()}: 6 of 6" in err
    assert f"reading {tmp_path / 'raw/folder'}: 6 of 6" in err


def write_params(folder: Path, text: str) -> None:
    (folder / "params.yaml").write_text(text)


FOLDER_PARAMS = (
    "data:\n  dataset: folder\n  path: pets\n  image_size: 8\npreprocess:\n  val_size: 1\n  test_size: 1\n"
)


def test_cli_corrupt_image_is_named_and_nothing_is_copied(tmp_path):
    src = image_folder(tmp_path / "pets").resolve()
    write_params(tmp_path, FOLDER_PARAMS)
    assert run_cli("download", cwd=tmp_path).returncode == 0
    before = tree(tmp_path / "data")
    bad = src / "dogs/e.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    line = one_error_line(run_cli("download", cwd=tmp_path), 2)
    assert line.startswith(f"error: {bad}: unreadable image (") and line.endswith("; fix or remove it"), line
    assert tree(tmp_path / "data") == before
    bad.write_bytes(b"not a png at all")
    line = one_error_line(run_cli("download", cwd=tmp_path), 2)
    assert line == f"error: {bad}: unreadable image (not a PNG or JPEG image); fix or remove it"
    assert tree(tmp_path / "data") == before


def test_cli_truncated_jpeg_is_named_by_preprocess(tmp_path):
    """A JPEG cut short passes download's header check; decoding it in preprocess fails, named."""
    src = image_folder(tmp_path / "pets").resolve()
    jpeg = src / "dogs/f.JPG"
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    jpeg.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    write_params(tmp_path, FOLDER_PARAMS)
    assert run_cli("download", cwd=tmp_path).returncode == 0
    line = one_error_line(run_cli("preprocess", cwd=tmp_path), 2)
    raw = Path("data/raw/folder/images/dogs/f.JPG")
    assert line.startswith(f"error: {raw}: unreadable image (image file is truncated"), line
    assert f"fix or remove {jpeg}, then run `vaeops download` (or `dvc repro -f download`)" in line
    assert not (tmp_path / "data/processed").exists() and not (tmp_path / "reports").exists()


def test_cli_changed_copy_is_refused(tmp_path):
    image_folder(tmp_path / "pets")
    write_params(tmp_path, FOLDER_PARAMS)
    assert run_cli("download", cwd=tmp_path).returncode == 0
    res = run_cli("preprocess", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    before = tree(tmp_path / "data/processed")
    copy = tmp_path / "data/raw/folder/images/cats/a.png"
    save_image(copy, 41, (13, 17))
    line = one_error_line(run_cli("preprocess", cwd=tmp_path), 2)
    assert line.startswith("error: data/raw/folder/images/cats/a.png: changed since download copied it")
    assert "`dvc repro download`" in line
    assert tree(tmp_path / "data/processed") == before


def test_cli_folder_without_images_exits_2(tmp_path):
    (tmp_path / "pets").mkdir()
    write_params(tmp_path, FOLDER_PARAMS)
    line = one_error_line(run_cli("download", cwd=tmp_path), 2)
    assert line == (
        f"error: {(tmp_path / 'pets').resolve()}: no .png, .jpg or .jpeg images (data.path); put your "
        "images there, in one sub-folder per class or none"
    )
    assert tree(tmp_path / "data") == {}


# --- CIFAR-10 ---------------------------------------------------------------------------------------

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: one label byte, then the image's 3072 bytes as C×H×W."""
    return b"".join(bytes([int(y)]) + x.tobytes() for x, y in zip(images, labels, strict=True))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar_archive(
    path: Path, per_batch: int = 3, seed: int = 0, change: dict[str, bytes | None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cifar-10-binary.tar.gz in the official layout with `per_batch` records per batch; `change`
    replaces (bytes) or leaves out (None) members. Returns train and test images and labels."""
    rng = np.random.default_rng(seed)
    n = 6 * per_batch
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    members = {
        f"data_batch_{i + 1}.bin": batch_bytes(
            x[i * per_batch : (i + 1) * per_batch], y[i * per_batch : (i + 1) * per_batch]
        )
        for i in range(5)
    }
    members["test_batch.bin"] = batch_bytes(x[5 * per_batch :], y[5 * per_batch :])
    members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    members["readme.html"] = b"<html></html>"
    members.update(change or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if data is not None:
                add(tar, name, data)
    cut = 5 * per_batch
    return x[:cut], y[:cut], x[cut:], y[cut:]


def test_cifar_archive_is_parsed_as_chw_with_classes(tmp_path):
    train_x, train_y, test_x, test_y = cifar_archive(tmp_path / cifar10.ARCHIVE)
    got = cifar10.read_archive(tmp_path / cifar10.ARCHIVE)
    assert got.classes == tuple(CLASSES)
    np.testing.assert_array_equal(got.train[0], train_x)
    np.testing.assert_array_equal(got.train[1], train_y)
    np.testing.assert_array_equal(got.test[0], test_x)
    np.testing.assert_array_equal(got.test[1], test_y)
    assert got.train[0].shape == (15, 3, 32, 32) and got.train[0].dtype == np.uint8


def symlink_member(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"data_batch_3.bin": b"\x01" * 3072},
            "data_batch_3.bin holds 3072 bytes, not whole records of 3073",
        ),
        ({"test_batch.bin": b""}, "test_batch.bin holds 0 bytes"),
        ({"data_batch_2.bin": b"\x0a" + bytes(3072)}, "data_batch_2.bin has label 10, outside 0..9"),
        ({"data_batch_5.bin": None}, "has no cifar-10-batches-bin/data_batch_5.bin"),
        ({"batches.meta.txt": b"cat\ndog\n"}, "batches.meta.txt names 2 classes, expected CIFAR-10's 10"),
    ],
    ids=["partial record", "empty", "label", "missing", "classes"],
)
def test_cifar_bad_member_is_named(tmp_path, change, expected):
    path = tmp_path / cifar10.ARCHIVE
    cifar_archive(path, change=change)
    with pytest.raises(UsageError, match=expected) as err:
        cifar10.read_archive(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_cifar_link_member_and_non_archive_are_refused(tmp_path):
    path = tmp_path / cifar10.ARCHIVE
    symlink_member(path)
    with pytest.raises(UsageError, match="data_batch_1.bin is not a regular file"):
        cifar10.read_archive(path)
    path.write_bytes(b"not gzip")
    with pytest.raises(UsageError, match="not a readable tar.gz archive"):
        cifar10.read_archive(path)


@pytest.fixture
def tiny_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mirror folder holding a tiny archive, and the registry's md5 pointed at it."""
    mirror = tmp_path / "mirror"
    cifar_archive(mirror / cifar10.ARCHIVE)
    md5 = hashlib.md5((mirror / cifar10.ARCHIVE).read_bytes()).hexdigest()
    monkeypatch.setitem(
        datasets.DATASETS, "cifar10", dataclasses.replace(cifar10.CIFAR10, md5=md5, mirrors=())
    )
    return mirror


def test_cifar_download_and_preprocess(tmp_path, tiny_cifar):
    data = DataParams(dataset="cifar10", mirrors=[str(tiny_cifar)])
    used = download.run(data, tmp_path / "raw/cifar10")
    assert used == {cifar10.ARCHIVE: str(tiny_cifar)}
    # Kept as published, still gzipped: its digest is of the archive.
    assert (tmp_path / "raw/cifar10" / cifar10.ARCHIVE).read_bytes() == (
        tiny_cifar / cifar10.ARCHIVE
    ).read_bytes()
    summary = preprocess.run(
        data, PreprocessParams(val_size=5), tmp_path / "raw/cifar10", tmp_path / "out", tmp_path / "d.json"
    )
    assert summary["image_shape"] == [3, 32, 32] and summary["classes"] == CLASSES
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [10, 5, 3]


def test_cifar_digest_mismatch_is_refused(tmp_path, tiny_cifar):
    (tiny_cifar / cifar10.ARCHIVE).write_bytes((tiny_cifar / cifar10.ARCHIVE).read_bytes() + b"\0")
    with pytest.raises(WorkError, match=f"{tiny_cifar}: checksum mismatch \\(md5 ") as err:
        download.run(DataParams(dataset="cifar10", mirrors=[str(tiny_cifar)]), tmp_path / "raw/cifar10")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw/cifar10" / cifar10.ARCHIVE).exists()


def test_cli_cifar_archive_not_the_published_one_exits_2(tmp_path):
    """The registry's own md5: an archive that is not the official one is refused by preprocess."""
    cifar_archive(tmp_path / "data/raw/cifar10" / cifar10.ARCHIVE)
    write_params(tmp_path, "data:\n  dataset: cifar10\n")
    line = one_error_line(run_cli("preprocess", cwd=tmp_path), 2)
    assert line.startswith(
        f"error: data/raw/cifar10/{cifar10.ARCHIVE}: changed since download verified it (md5 "
    )
    assert "expected c32a1d4ab5d0…" in line
    assert not (tmp_path / "data/processed").exists()


# --- Fashion-MNIST through download and preprocess ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "fashion-mnist").exists(), reason="../shared/datasets/fashion-mnist absent")
def test_cli_real_fashion_mnist_download_and_preprocess(tmp_path):
    write_params(tmp_path, "data:\n  dataset: fashion-mnist\n  mirrors: ['http://127.0.0.1:9/']\n")
    env = {"VAEOPS_DATA_MIRROR": str(SHARED / "fashion-mnist")}
    for stage in ("download", "preprocess"):
        res = run_cli(stage, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "data/processed/meta.json").read_text())
    assert meta["dataset"] == "fashion-mnist" and meta["image_shape"] == [1, 28, 28]
    assert meta["classes"][:2] == ["T-shirt/top", "Trouser"] and meta["classes"][-1] == "Ankle boot"
    counts = {}
    for split in ("train", "val", "test"):
        x, y = preprocess.load_split(tmp_path / f"data/processed/{split}.npz", (1, 28, 28), 10)
        counts[split] = len(x)
        assert len(np.unique(y)) == 10
    assert counts == {"train": 55_000, "val": 5_000, "test": 10_000}
    report = json.loads((tmp_path / "reports/data.json").read_text())
    assert report["test"]["class_histogram"] == [1000] * 10  # Fashion-MNIST's test set is balanced
