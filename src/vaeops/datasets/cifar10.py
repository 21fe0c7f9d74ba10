"""CIFAR-10 from its official binary archive, read with tarfile and numpy (never pickle).

`cifar-10-binary.tar.gz` holds cifar-10-batches-bin/data_batch_1..5.bin (training) and
test_batch.bin: records of one label byte and 3072 pixel bytes, the 32×32 red plane, then green,
then blue (C×H×W as stored); batches.meta.txt names the classes, one per line.
"""

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeops.config import DataParams
from vaeops.datasets.common import REDO, RawFile, Splits, check_raw
from vaeops.errors import UsageError

ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST = "test_batch.bin"
META = "batches.meta.txt"
SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class Cifar10Spec:
    name: str
    md5: str  # the digest https://www.cs.toronto.edu/~kriz/cifar.html publishes for the archive
    mirrors: tuple[str, ...]

    @property
    def raw_files(self) -> tuple[RawFile, ...]:
        # The archive is checked as published, still gzipped: its digest is of the .tar.gz.
        return (RawFile(ARCHIVE, self.md5, "md5", gzipped=False),)

    def read(self, folder: Path, data: DataParams | None = None) -> Splits:
        check_raw(folder, self)
        return read_archive(folder / ARCHIVE)


CIFAR10 = Cifar10Spec(
    name="cifar10",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
)


def read_archive(path: Path) -> Splits:
    """The training and test batches and class names of the archive at `path`; errors name the member."""
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN, TEST, META)}
    members: dict[str, bytes] = {}
    try:
        # One pass over the stream, keeping only the members named above, as bytes: nothing is
        # written to disk, so no member name or link in the archive can point anywhere.
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if not member.isfile():
                    raise UsageError(f"{path}: {member.name} is not a regular file; run {REDO} again")
                members[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UsageError(f"{path}: not a readable tar.gz archive ({e}); run {REDO} again") from None
    missing = sorted(wanted - set(members))
    if missing:
        raise UsageError(f"{path}: has no {missing[0]}; not the CIFAR-10 binary archive, run {REDO} again")

    names = members[f"{FOLDER}/{META}"].decode("ascii", "replace").splitlines()
    classes = tuple(n.strip() for n in names if n.strip())
    if len(classes) != 10:
        raise UsageError(f"{path}: {FOLDER}/{META} names {len(classes)} classes, expected CIFAR-10's 10")
    batches = [_batch(path, f"{FOLDER}/{name}", members.pop(f"{FOLDER}/{name}")) for name in TRAIN]
    train = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    return Splits(train, _batch(path, f"{FOLDER}/{TEST}", members.pop(f"{FOLDER}/{TEST}")), classes)


def _batch(path: Path, name: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % RECORD:
        raise UsageError(
            f"{path}: {name} holds {len(data)} bytes, not whole records of {RECORD} "
            f"(1 label byte + 3×32×32 pixels)"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UsageError(f"{path}: {name} has label {labels.max()}, outside 0..9")
    return records[:, 1:].reshape(-1, *SHAPE), labels
