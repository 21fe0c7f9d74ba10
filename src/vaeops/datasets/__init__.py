"""The datasets: a registry name → spec, and what download and preprocess need from each.

Every spec has a `name` and `read(raw folder, data params) -> Splits`, which first checks that
the raw files are the ones download verified. The ones fetched from mirrors (MNIST, Fashion-MNIST,
CIFAR-10) list their `raw_files` with published digests and their canonical `mirrors`; `folder`
copies your own images instead (folder.download).
"""

from vaeops.datasets.cifar10 import CIFAR10, Cifar10Spec
from vaeops.datasets.common import Fetched, RawFile, Splits, check_raw, digest_file, payload, sha256_file
from vaeops.datasets.folder import FOLDER, FolderSpec
from vaeops.datasets.idx import FASHION_MNIST, MNIST, IdxSpec, read_idx, read_split
from vaeops.errors import UsageError

DatasetSpec = IdxSpec  # the name tests use for an IDX dataset's spec
Spec = IdxSpec | Cifar10Spec | FolderSpec

DATASETS: dict[str, Spec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10, FOLDER)}

__all__ = [
    "DATASETS",
    "Cifar10Spec",
    "DatasetSpec",
    "Fetched",
    "FolderSpec",
    "IdxSpec",
    "RawFile",
    "Spec",
    "Splits",
    "check_raw",
    "digest_file",
    "get_spec",
    "payload",
    "read_idx",
    "read_split",
    "sha256_file",
]


def get_spec(name: str) -> Spec:
    if name not in DATASETS:
        raise UsageError(f"dataset {name!r} is not supported; expected one of {sorted(DATASETS)}")
    return DATASETS[name]
