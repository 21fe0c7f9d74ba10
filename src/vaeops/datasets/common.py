"""What every dataset shares: its raw files with their published digests, and the splits it reads."""

import gzip
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from vaeops.errors import UsageError

REDO = "`vaeops download` (or `dvc repro download`)"
T = TypeVar("T")


@dataclass(frozen=True)
class RawFile:
    """One file download fetches into data/raw/<dataset>/ and checks against its published digest."""

    name: str
    digest: str
    algorithm: str = "sha256"
    # Sources may serve it as <name>.gz; the digest is of the decompressed payload.
    gzipped: bool = True


class Fetched(Protocol):
    """A dataset that download fetches from mirrors: MNIST, Fashion-MNIST, CIFAR-10."""

    name: str
    mirrors: tuple[str, ...]

    @property
    def raw_files(self) -> tuple[RawFile, ...]: ...


@dataclass
class Splits:
    """What preprocess gets from a dataset: uint8 N×C×H×W images and int64 labels per split."""

    train: tuple[np.ndarray, np.ndarray]
    # None where the dataset has no official test split: preprocess splits one off the training images.
    test: tuple[np.ndarray, np.ndarray] | None
    classes: tuple[str, ...]


def digest_file(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return digest_file(path, "sha256")


def payload(data: bytes) -> bytes:
    """The payload of raw or gzipped bytes (mirrors differ in whether and how they gzip)."""
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def check_raw(folder: Path, spec: Fetched) -> None:
    """Each raw file of `spec` in `folder` is the one download verified: present, with its digest.

    A changed pixel or a truncated file can pass every structural check of a reader; only the
    digest catches it.
    """
    for raw in spec.raw_files:
        path = folder / raw.name
        if not path.is_file():
            what = "missing" if not path.exists() else "not a file"
            raise UsageError(f"{path}: {what}; run {REDO} first")
        got = digest_file(path, raw.algorithm)
        if got != raw.digest:
            raise UsageError(
                f"{path}: changed since download verified it ({raw.algorithm} {got[:12]}… of "
                f"{path.stat().st_size} bytes, expected {raw.digest[:12]}…); run {REDO} to fetch it again"
            )


LOG_EVERY_S = 10.0


def progress(items: Sequence[T], label: str) -> Iterator[T]:
    """Yield `items` with a bar on a terminal, and a log line every LOG_EVERY_S seconds elsewhere
    (a DVC log), so a big folder never looks stuck."""
    from vaeops.progress import log, step_bar

    with step_bar() as bar:
        task = bar.add_task(label, total=len(items), info="")
        last = time.monotonic()
        for i, item in enumerate(items):
            yield item
            bar.advance(task)
            if bar.disable and time.monotonic() - last >= LOG_EVERY_S:
                log(f"{label}: {i + 1} of {len(items)}")
                last = time.monotonic()
