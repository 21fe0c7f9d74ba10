"""MNIST and Fashion-MNIST: four IDX files each, the payload SHA-256 of every one pinned."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeops.config import DataParams
from vaeops.datasets.common import RawFile, Splits, check_raw
from vaeops.errors import UsageError


@dataclass(frozen=True)
class IdxSpec:
    name: str
    # split -> (images file, labels file); names are of the decompressed IDX payloads.
    files: dict[str, tuple[str, str]]
    sha256: dict[str, str]
    image_shape: tuple[int, int, int]  # C, H, W
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]

    @property
    def raw_files(self) -> tuple[RawFile, ...]:
        return tuple(RawFile(name, digest) for name, digest in self.sha256.items())

    def read(self, folder: Path, data: DataParams | None = None) -> Splits:
        check_raw(folder, self)
        return Splits(read_split(folder, self, "train"), read_split(folder, self, "test"), self.classes)


MNIST = IdxSpec(
    name="mnist",
    files={
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    },
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    image_shape=(1, 28, 28),
    classes=tuple(str(i) for i in range(10)),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
)

FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    files=MNIST.files,
    sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    image_shape=(1, 28, 28),
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)


# IDX: 2 zero bytes, a type code (0x08 = uint8), the number of dims, then big-endian uint32 sizes.
def read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """Read an uncompressed uint8 IDX file, checking magic, dims and size; errors name the file."""
    raw = Path(path).read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path}: not a uint8 IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim != expect_ndim:
        raise UsageError(f"{path}: IDX has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise UsageError(
            f"{path}: IDX size {len(raw)} bytes does not match its header {dims} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_split(folder: Path, spec: IdxSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 N×C×H×W and labels as int64 N, checked against each other and the spec."""
    img_name, lbl_name = spec.files[split]
    images = read_idx(folder / img_name, 3)
    labels = read_idx(folder / lbl_name, 1)
    if len(images) != len(labels):
        raise UsageError(f"{folder / lbl_name}: {len(labels)} labels for {len(images)} images in {img_name}")
    c, h, w = spec.image_shape
    if images.shape[1:] != (h, w):
        raise UsageError(f"{folder / img_name}: images are {images.shape[1:]}, expected {(h, w)}")
    if len(labels) and labels.max() >= len(spec.classes):
        raise UsageError(f"{folder / lbl_name}: label {labels.max()} outside 0..{len(spec.classes) - 1}")
    return images.reshape(-1, c, h, w), labels.astype(np.int64)
