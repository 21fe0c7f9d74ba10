"""The fault matrix: the real CLI against a table of broken inputs and surroundings.

Each row copies a small project that went once through the whole pipeline (tiny synthetic data,
a trained checkpoint, its MLflow store, exported ONNX models), breaks one thing, runs one command
and asserts: the exit code, exactly one `error:` line and it last (a stopped training prints its
`interrupted:` line instead), no traceback, and every file that was there before byte-identical,
or, where the command may legitimately complete, its new set complete.

Full and read-only file systems are a tmpfs or a read-only bind mount in a private mount namespace
(`unshare -m` as root, `unshare -rm` otherwise). Root ignores file modes, so a permission drill
(EACCES) drops CAP_DAC_OVERRIDE with setpriv first. prlimit's RLIMIT_FSIZE gives EFBIG.

The rows run ahead of their tests, two at a time (see `outcomes`); each test asserts one row.
"""

import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, free_port, make_idx_set, tree, write_processed, write_set
from test_preprocess import TINY_MAIN

VAEOPS = Path(sys.executable).with_name("vaeops")
DIGESTS = json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in make_idx_set().items()})
PARAMS = {
    "preprocess": {"val_size": 10},
    "train": {"latent_dim": 4, "hidden_dim": 32, "epochs": 1, "batch_size": 16, "lr_warmup_steps": 0}
    | {"device": "cpu", "threads": 1},
    "evaluate": {"iwae_samples": 4, "iwae_images": 10, "traversal_dims": 2, "interpolation_pairs": 2}
    | {"device": "cpu"},
}
RAW = "data/raw/mnist"
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SPLIT = "data/processed/{}.npz"
STORE = ("mlruns.db", ".mlruns.db.lock", "mlartifacts/")
# What a stopped training legitimately rewrites: the checkpoint of the last finished epoch, beside
# the run it was logged in and the curve up to it.
LAST_EPOCH = ("models/vae.pt", "models/run.json", "reports/train_curve.csv")
TRAIN_SET = (*LAST_EPOCH, "reports/train.json", "reports/train_samples.png")
RESUME = {"VAEOPS_TRAIN__RESUME": "true"}
STOP_TRAIN = {
    "VAEOPS_TRAIN__BATCH_SIZE": "4",
    "VAEOPS_TRAIN__EPOCHS": "6",
    "VAEOPS_TRAIN__LOG_EVERY_STEPS": "50",
}
DROP_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]

# $1: a folder or file of the project, made read-only by a bind mount; the command follows $3.
READ_ONLY = """t="$1"; shift 3
mount --bind "$t" "$t" && mount -o remount,bind,ro "$t" "$t" || exit 99
cd "$PWD" && exec "$@"
"""
# $1: a folder of the project, replaced by a copy on a tmpfs filled up but for $3 bytes; what the
# tmpfs holds after the command is copied to $2, since it vanishes with the mount namespace.
FULL = """t="$1"; out="$2"; free="$3"; shift 3; here="$PWD"
s=$(mktemp -d) && mount -t tmpfs -o size=$(( $(du -sb "$t" | cut -f1) * 2 + 1048576 )) tmpfs "$s" || exit 99
cp -a "$t/." "$s/" && { cat /dev/zero > "$s/.fill"; truncate -s "-$free" "$s/.fill"; } 2>/dev/null
mount --bind "$s" "$t" || exit 99
cd "$here" && "$@"; rc=$?
cd / && umount "$t" && rm "$s/.fill" && mkdir -p "$out" && cp -a "$s/." "$out/" && umount "$s" && rmdir "$s"
exit $rc
"""

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Row:
    family: str
    args: tuple[str, ...]
    code: int
    setup: Setup | None = None
    env: dict[str, str] = field(default_factory=dict)
    expect: str = ""  # a fragment of the error line
    tiny: bool = False  # through cli.main() with the tiny set's digests in the mnist registry
    mount: tuple[str, str] | None = None  # ("ro" | "full", a folder or file of the project)
    free: int = 0  # bytes left free on a full mount
    no_write: str = ""  # a folder made read-only by its mode (EACCES)
    fsize: int = 0  # RLIMIT_FSIZE in bytes (EFBIG)
    stop: tuple[int, str] | None = None  # a signal, sent once stderr holds this text ("mirror": on a request)
    store: bool = False  # the MLflow store may change: the stage logged its failure into it
    changes: tuple[str, ...] = ()  # files that may change (and must still be there)
    creates: tuple[str, ...] = ()  # the complete new set of a command that succeeds
    timeout: float = 180


def row(id: str, family: str, args: str, code: int, xfail: str = "", cuda: bool = False, **kw: object):
    """One row; `xfail`: why it fails today; `cuda`: it asks for a CUDA device, so fails only without one."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    if cuda:
        marks.append(
            pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a CUDA device is here")
        )
    return pytest.param(Row(family, tuple(args.split()), code, **kw), id=f"{family}-{id}", marks=marks)


# --- what breaks things ---------------------------------------------------------------------------


def put(rel: str, data: bytes | str) -> Setup:
    def do(p: Path) -> None:
        (p / rel).parent.mkdir(parents=True, exist_ok=True)
        (p / rel).write_bytes(data.encode() if isinstance(data, str) else data)

    return do


def delete(rel: str) -> Setup:
    return lambda p: shutil.rmtree(p / rel) if (p / rel).is_dir() else (p / rel).unlink()


def cut(rel: str, keep: float = 0.5) -> Setup:
    def do(p: Path) -> None:
        data = (p / rel).read_bytes()
        (p / rel).write_bytes(data[: int(len(data) * keep)])

    return do


def garble(rel: str) -> Setup:
    def do(p: Path) -> None:
        n = max(64, (p / rel).stat().st_size)
        (p / rel).write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())

    return do


def flip(rel: str, at: int) -> Setup:
    def do(p: Path) -> None:
        data = bytearray((p / rel).read_bytes())
        data[at] ^= 0x80
        (p / rel).write_bytes(bytes(data))

    return do


def to_folder(rel: str) -> Setup:
    def do(p: Path) -> None:
        (p / rel).unlink()
        (p / rel).mkdir()

    return do


def both(*setups: Setup) -> Setup:
    def do(p: Path) -> None:
        for setup in setups:
            setup(p)

    return do


def save(rel: str, write: Callable[[object], None]) -> Setup:
    """`write` gets the open file: numpy would append .npy or .npz to a name not ending in it."""

    def do(p: Path) -> None:
        with open(p / rel, "wb") as f:
            write(f)

    return do


def latents(z: np.ndarray) -> Setup:
    return lambda p: np.save(p / "z.npy", z, allow_pickle=True)


def npz(split: str, edit: Callable[[dict], object]) -> Setup:
    """data/processed/<split>.npz rewritten with `edit` applied to its arrays."""

    def do(p: Path) -> None:
        path = p / SPLIT.format(split)
        with np.load(path) as z:
            arrays = dict(z)
        edit(arrays)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    return do


def edit_json(rel: str, edit: Callable[[dict], object]) -> Setup:
    def do(p: Path) -> None:
        data = json.loads((p / rel).read_text())
        edit(data)
        (p / rel).write_text(json.dumps(data))

    return do


def other_run(run: dict) -> None:
    run["run_id"] = "0123456789abcdef0123456789abcdef"


def params(text: str | bytes) -> Setup:
    return put("params.yaml", text)


def with_bom(p: Path) -> None:
    (p / "params.yaml").write_bytes(b"\xef\xbb\xbf" + (p / "params.yaml").read_bytes())


def dangling_link(p: Path) -> None:
    (p / "link.yaml").symlink_to(p / "gone.yaml")


def dvc_yaml(p: Path) -> None:
    shutil.copy(ROOT / "dvc.yaml", p / "dvc.yaml")


def checkpoint(make: Callable[[dict], object]) -> Setup:
    """models/vae.pt rewritten by torch.save with what `make` makes of its state."""

    def do(p: Path) -> None:
        import torch

        torch.save(make(torch.load(p / "models/vae.pt", weights_only=True)), p / "models/vae.pt")

    return do


def without(key: str) -> Callable[[dict], dict]:
    return lambda state: {k: v for k, v in state.items() if k != key}


def hidden_64(state: dict) -> dict:
    """Weights of hidden size 32 under a config that says 64."""
    return state | {"config": state["config"] | {"hidden_dim": 64}}


class Payload:
    """Unpickling this runs `touch pwned`: a file carrying code."""

    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def pickled_code(p: Path) -> None:
    import pickle

    (p / "models/vae.pt").write_bytes(pickle.dumps({"model": Payload()}))


def store(edit: Callable[[object, str], None]) -> Setup:
    """Change the project's MLflow store through MLflow's own client, as the UI does."""

    def do(p: Path) -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{p / 'mlruns.db'}")
        edit(client, json.loads((p / "models/run.json").read_text())["run_id"])

    return do


def delete_experiment(client, run_id: str) -> None:
    client.delete_experiment(client.get_run(run_id).info.experiment_id)


def delete_run(client, run_id: str) -> None:
    client.delete_run(run_id)


def bigger_training_set(p: Path) -> None:
    """Hundreds of small steps per epoch, so a signal lands mid-epoch, after the first checkpoint."""
    write_processed(p / "data/processed", {"train": 1600, "val": 64, "test": 20})


def decoder(name: str, batch: object, elem: str) -> Setup:
    """A hand-made decoder with the given batch dim and input type (what torch's exporter never writes)."""

    def do(p: Path) -> None:
        from onnx import TensorProto
        from test_sample import linear_decoder

        linear_decoder(p / name, batch, getattr(TensorProto, elem))

    return do


# --- the table ------------------------------------------------------------------------------------

ROWS = [
    # params.yaml: read by every command before any work (download here, with nothing to fetch)
    *(
        row(id, "params", "download", 2, setup=params(text), expect=expect, tiny=True)
        for id, text, expect in [
            ("epochs-text", "train:\n  epochs: abc\n", "train.epochs = 'abc'"),
            ("latent-float", "train:\n  latent_dim: 2.5\n", "train.latent_dim = 2.5"),
            ("binarize-word", "train:\n  binarize: maybe\n", "train.binarize = 'maybe'"),
            ("mirrors-string", "data:\n  mirrors: http://x/\n", "data.mirrors"),
            ("experiment-number", "train:\n  experiment: 5\n", "train.experiment = 5"),
            ("epochs-null", "train:\n  epochs:\n", "train.epochs = None"),
            ("epochs-zero", "train:\n  epochs: 0\n", "greater than or equal to 1"),
            ("lr-negative", "train:\n  lr: -0.1\n", "train.lr = -0.1"),
            ("momentum-one", "train:\n  momentum: 1.0\n", "less than 1"),
            ("val-size-negative", "preprocess:\n  val_size: -1\n", "preprocess.val_size = -1"),
            ("opset-old", "export:\n  opset: 17\n", "export.opset = 17"),
            ("experiment-empty", "train:\n  experiment: ''\n", "train.experiment"),
            ("registry-name-empty", "export:\n  registered_model_name: ''\n", "registered_model_name"),
            ("seed-2-32", "train:\n  seed: 4294967296\n", "2**32"),
            ("seed-huge", "preprocess:\n  seed: 1000000000000000000000000000000\n", "preprocess.seed"),
            ("eval-seed-negative", "evaluate:\n  seed: -5\n", "evaluate.seed = -5"),
            ("threads-huge", "train:\n  threads: 100000\n", "only slows torch down"),
            ("nproc-huge", "train:\n  nproc: 5000\n", "train.nproc = 5000"),
            ("latent-huge", "train:\n  latent_dim: 100000\n", "train.latent_dim = 100000"),
            ("hidden-huge-conv", "train:\n  arch: conv\n  hidden_dim: 50000\n", "GiB while training"),
            ("batch-huge", "train:\n  batch_size: 10000000\n", "train.batch_size = 10000000"),
            ("iwae-batch-huge", "evaluate:\n  iwae_batch: 1000000000\n", "evaluate.iwae_batch"),
            ("figure-rows-huge", "evaluate:\n  traversal_dims: 100000\n", "rows of one figure"),
            ("epochs-overflow", "train:\n  epochs: 1.0e+400\n", "train.epochs"),
            ("beta-inf", "train:\n  beta: .inf\n", "train.beta = inf: Input should be a finite number"),
            ("timeout-inf", "data:\n  timeout_s: .inf\n", "data.timeout_s = inf"),
            ("lr-nan", "train:\n  lr: .nan\n", "train.lr = nan"),
            ("atol-minus-inf", "export:\n  atol: -.inf\n", "export.atol"),
            ("arch-unknown", "train:\n  arch: transformer\n", "expected 'mlp', 'conv' or 'resnet'"),
            ("dataset-unknown", "data:\n  dataset: cifar100\n", "data.dataset = 'cifar100' is not allowed"),
            ("device-unknown", "train:\n  device: tpu\n", "train.device = 'tpu'"),
            ("key-typo", "train:\n  epoch: 3\n", "unknown key 'train.epoch'"),
            ("section-typo", "trian:\n  epochs: 3\n", "unknown key 'trian'"),
            ("top-level-list", "- train\n- data\n", "expected a mapping of sections, got list"),
            ("top-level-scalar", "just words\n", "expected a mapping of sections, got str"),
            ("section-scalar", "train: 5\n", "train = 5 is not a mapping"),
            ("section-list", "train:\n  - epochs\n", "is not a mapping"),
            ("yaml-unclosed", "train: {epochs: 1\n", "not valid YAML"),
            ("yaml-tab", "train:\n\tepochs: 1\n", "not valid YAML"),
            ("yaml-python-tag", "train: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
            ("duplicate-key", "train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n", ":4: duplicate key 'epochs'"),
            ("duplicate-section", "train:\n  epochs: 1\ntrain:\n  epochs: 2\n", "duplicate key 'train'"),
            ("latin-1", b"train:\n  experiment: caf\xe9\n", "not UTF-8 text (byte 0xe9"),
            ("utf-16", "train:\n  epochs: 1\n".encode("utf-16"), "not UTF-8 text (byte 0xff"),
            ("binary", bytes(range(256)) * 4, "not UTF-8 text"),
        ]
    ),
    row("folder", "params", "download --params data", 2, expect="data: is a folder", tiny=True),
    row("missing", "params", "download --params nope.yaml", 2, expect="params file not found", tiny=True),
    row(
        "dangling-link",
        "params",
        "download --params link.yaml",
        2,
        setup=dangling_link,
        expect="not found",
        tiny=True,
    ),
    # Accepted, not refused: a byte-order mark, as Windows editors write it.
    row("utf-8-bom", "params", "download", 0, setup=with_bom, tiny=True),
    # The environment: VAEOPS_* variables are checked as strictly as the file, and named in the error
    *(
        row(id, "env", "download", 2, env=env, expect=expect, tiny=True)
        for id, env, expect in [
            ("typo", {"VAEOPS_TRIAN__EPOCHS": "1"}, "VAEOPS_TRIAN__EPOCHS is not a vaeops variable; did you"),
            ("typo-mirror", {"VAEOPS_DATA_MIROR": "/x"}, "did you mean VAEOPS_DATA_MIRROR?"),
            ("bare-prefix", {"VAEOPS_": "1"}, "VAEOPS_ is not a vaeops variable"),
            (
                "section-not-json",
                {"VAEOPS_TRAIN": "notjson"},
                "VAEOPS_TRAIN = 'notjson' is not a JSON object",
            ),
            ("section-json-list", {"VAEOPS_TRAIN": "[1, 2]"}, "is not a JSON object of train keys"),
            ("section-bad-value", {"VAEOPS_TRAIN": '{"beta": "nan"}'}, "VAEOPS_TRAIN: train.beta = 'nan'"),
            ("section-unknown-key", {"VAEOPS_TRAIN": '{"epoch": 3}'}, "unknown key 'train.epoch'"),
            ("key-text", {"VAEOPS_TRAIN__EPOCHS": "abc"}, "VAEOPS_TRAIN__EPOCHS = 'abc' (train.epochs)"),
            ("key-empty", {"VAEOPS_TRAIN__EPOCHS": ""}, "VAEOPS_TRAIN__EPOCHS = ''"),
            ("key-lowercase", {"vaeops_train__epochs": "abc"}, "vaeops_train__epochs = 'abc'"),
            ("key-inf", {"VAEOPS_TRAIN__BETA": "inf"}, "VAEOPS_TRAIN__BETA = 'inf'"),
            ("seed-negative", {"VAEOPS_PREPROCESS__SEED": "-1"}, "VAEOPS_PREPROCESS__SEED = '-1'"),
            ("dataset-unknown", {"VAEOPS_DATA__DATASET": "cifar"}, "VAEOPS_DATA__DATASET = 'cifar'"),
            ("list-bad-json", {"VAEOPS_DATA__MIRRORS": "[http://x"}, "is not a JSON list"),
            (
                "memory",
                {"VAEOPS_TRAIN__ARCH": "conv", "VAEOPS_TRAIN__HIDDEN_DIM": "60000"},
                "GiB while training",
            ),
        ]
    ),
    # Inside a DVC stage an exported override of a tracked param is refused; an untracked one is fine.
    *(
        row(id, "env", "download", code, setup=setup, env=env, expect=expect, tiny=True)
        for id, code, setup, env, expect in [
            (
                "dvc-tracked",
                2,
                dvc_yaml,
                {"VAEOPS_TRAIN__EPOCHS": "1"},
                "use `dvc exp run -S train.epochs=1`",
            ),
            (
                "dvc-tracked-section",
                2,
                dvc_yaml,
                {"VAEOPS_DATA": '{"timeout_s": 5}'},
                "data.timeout_s, which DVC",
            ),
            ("dvc-no-dvc-yaml", 2, None, {"VAEOPS_TRAIN__THREADS": "1"}, "overrides train.threads"),
            (
                "dvc-yaml-garbage",
                2,
                put("dvc.yaml", "stages: [\n"),
                {"VAEOPS_TRAIN__THREADS": "1"},
                "cannot read it",
            ),
            ("dvc-untracked", 0, dvc_yaml, {"VAEOPS_TRAIN__THREADS": "1"}, ""),
        ]
        for env in [env | {"DVC_STAGE": "train"}]
    ),
    # Work that cannot start on this machine or in this folder
    row(
        "cuda-train",
        "env",
        "train",
        2,
        env={"VAEOPS_TRAIN__DEVICE": "cuda"},
        expect="no CUDA device",
        cuda=True,
    ),
    row(
        "cuda-evaluate",
        "env",
        "evaluate",
        2,
        env={"VAEOPS_EVALUATE__DEVICE": "cuda"},
        expect="no CUDA",
        cuda=True,
    ),
    row(
        "nproc-uneven-batch",
        "env",
        "train",
        2,
        env={"VAEOPS_TRAIN__NPROC": "2", "VAEOPS_TRAIN__BATCH_SIZE": "3"},
        expect="does not split evenly over train.nproc = 2",
    ),
    row("exps-not-a-repository", "env", "exps", 2, expect="not inside of a DVC repository"),
    # typer's own usage errors, one line too
    *(
        row(id, "usage", args, 2, expect=expect)
        for id, args, expect in [
            ("n-text", "sample -n abc", "Invalid value for '-n'"),
            ("port-text", "ui --port abc", "Invalid value for '--port'"),
            ("unknown-command", "traine", "No such command 'traine'"),
            ("unknown-option", "train --bogus", "No such option: --bogus"),
            ("extra-argument", "params extra", "unexpected extra argument"),
            ("option-without-value", "evaluate --model", "requires an argument"),
        ]
    ),
    # Raw IDX files, each one each way: preprocess uses only what download verified
    *(
        row(
            f"{name[:-10]}-{way}",
            "raw",
            "preprocess",
            2,
            setup=damage(f"{RAW}/{name}"),
            expect=f"{name}: ",
            tiny=True,
        )
        for name in RAW_FILES
        for way, damage in [
            ("missing", delete),
            ("empty", lambda rel: put(rel, b"")),
            ("garbage", garble),
            ("truncated", cut),
            ("wrong-magic", lambda rel: flip(rel, 2)),
            ("one-byte", lambda rel: flip(rel, -1)),
        ]
    ),
    *(
        row(id, "raw", args, 2, setup=setup, env=env, expect=expect, tiny=True)
        for id, args, setup, env, expect in [
            ("folder-missing", "preprocess", delete(RAW), {}, "missing; run `vaeops download`"),
            ("file-is-folder", "preprocess", to_folder(f"{RAW}/t10k-labels-idx1-ubyte"), {}, "not a file"),
            (
                "val-size-too-big",
                "preprocess",
                None,
                {"VAEOPS_PREPROCESS__VAL_SIZE": "60"},
                "smaller than the 60",
            ),
            (
                "other-dataset",
                "preprocess",
                None,
                {"VAEOPS_DATA__DATASET": "fashion-mnist"},
                "raw/fashion-mnist/",
            ),
            ("out-under-a-file", "preprocess --out params.yaml/x", None, {}, "params.yaml is a file"),
            ("report-is-folder", "preprocess --report data", None, {}, "data: is a folder"),
        ]
    ),
    # download: every source failing its own way (the verified files removed first)
    *(
        row(id, "download", "download", 1, setup=delete(RAW), env=env, expect=expect, tiny=True)
        for id, env, expect in [
            ("mirror-refused", {"VAEOPS_DATA__MIRRORS": "http://127.0.0.1:9/"}, "unreachable"),
            ("mirror-404", {"VAEOPS_DATA_MIRROR": "{mirror}/missing/"}, "HTTP 404"),
            ("mirror-junk", {"VAEOPS_DATA_MIRROR": "{mirror}/junk/"}, "checksum mismatch"),
            ("mirror-bad-gzip", {"VAEOPS_DATA_MIRROR": "{mirror}/badgzip/"}, "corrupt or truncated gzip"),
            (
                "mirror-trickles",
                {"VAEOPS_DATA_MIRROR": "{mirror}/trickle/", "VAEOPS_DATA__TIMEOUT_S": "0.3"},
                "not complete after 3 s",
            ),
            (
                "mirror-folder-empty",
                {"VAEOPS_DATA_MIRROR": "{proj}/models"},
                "no train-images-idx3-ubyte(.gz) there",
            ),
        ]
    ),
    row(
        "out-is-a-file",
        "download",
        "download",
        2,
        setup=both(delete(RAW), put(RAW, "x")),
        expect="mnist: is a file",
    ),
    # The splits and meta.json, as train and evaluate read them
    *(
        row(f"{file}-{way}", "processed", cmd, 2, setup=setup, expect=f"{file}.")
        for cmd, file, way, setup in [
            ("train", "train", "missing", delete(SPLIT.format("train"))),
            ("train", "train", "garbage", garble(SPLIT.format("train"))),
            ("train", "train", "float-images", npz("train", lambda a: a.update(images=a["images"] / 255))),
            (
                "train",
                "train",
                "wrong-shape",
                npz("train", lambda a: a.update(images=a["images"][:, :, :14].copy())),
            ),
            (
                "train",
                "train",
                "one-image",
                npz("train", lambda a: a.update(images=a["images"][:1], labels=a["labels"][:1])),
            ),
            (
                "train",
                "val",
                "empty",
                npz("val", lambda a: a.update(images=a["images"][:0], labels=a["labels"][:0])),
            ),
            ("train", "val", "garbage", garble(SPLIT.format("val"))),
            ("train", "meta", "missing", delete("data/processed/meta.json")),
            ("evaluate", "test", "missing", delete(SPLIT.format("test"))),
            ("evaluate", "test", "empty-file", put(SPLIT.format("test"), b"")),
            ("evaluate", "meta", "garbage", garble("data/processed/meta.json")),
            ("evaluate", "test", "garbage", garble(SPLIT.format("test"))),
            ("evaluate", "test", "truncated", cut(SPLIT.format("test"))),
            (
                "evaluate",
                "test",
                "npy-not-npz",
                save(SPLIT.format("test"), lambda f: np.save(f, np.zeros(3))),
            ),
            ("evaluate", "test", "no-labels", npz("test", lambda a: a.pop("labels"))),
            (
                "evaluate",
                "test",
                "labels-out-of-range",
                npz("test", lambda a: a["labels"].__setitem__(0, 12)),
            ),
            ("evaluate", "test", "labels-negative", npz("test", lambda a: a["labels"].__setitem__(0, -1))),
            (
                "evaluate",
                "test",
                "wrong-shape",
                npz("test", lambda a: a.update(images=a["images"][:, :, :14].copy())),
            ),
            ("evaluate", "test", "float-images", npz("test", lambda a: a.update(images=a["images"] / 255))),
            (
                "evaluate",
                "test",
                "object-images",
                npz("test", lambda a: a.update(images=np.array([None, 1]))),
            ),
            (
                "evaluate",
                "test",
                "one-image",
                npz("test", lambda a: a.update(images=a["images"][:1], labels=a["labels"][:1])),
            ),
            (
                "evaluate",
                "meta",
                "other-dataset",
                edit_json("data/processed/meta.json", lambda m: m.update(dataset="x")),
            ),
            (
                "evaluate",
                "meta",
                "other-shape",
                edit_json("data/processed/meta.json", lambda m: m.update(image_shape=[1, 9, 9])),
            ),
        ]
    ),
    # Checkpoints, as evaluate, export and a resumed training read them
    *(
        row(f"{cmd}-{way}", "checkpoint", cmd, 2, setup=setup, env=env, expect=expect, xfail=xfail)
        for cmd, way, setup, env, expect, xfail in [
            ("evaluate", "missing", delete("models/vae.pt"), {}, "models/vae.pt: checkpoint not found", ""),
            ("evaluate", "garbage", garble("models/vae.pt"), {}, "models/vae.pt: not a loadable", ""),
            ("evaluate", "pickled-code", pickled_code, {}, "models/vae.pt: not a loadable", ""),
            (
                "evaluate",
                "a-tensor",
                checkpoint(lambda s: s["model"]["encoder.fc_mu.weight"]),
                {},
                "not a vaeops checkpoint",
                "",
            ),
            ("evaluate", "no-config", checkpoint(without("config")), {}, "not a vaeops checkpoint", ""),
            ("evaluate", "no-run-id", checkpoint(without("run_id")), {}, "names no MLflow run", ""),
            (
                "evaluate",
                "other-arch",
                None,
                {"VAEOPS_TRAIN__ARCH": "conv"},
                "train.arch = 'mlp' but params say",
                "",
            ),
            (
                "evaluate",
                "other-latent",
                None,
                {"VAEOPS_TRAIN__LATENT_DIM": "8"},
                "train.latent_dim = 4 but",
                "",
            ),
            (
                "evaluate",
                "weights-of-another-size",
                checkpoint(hidden_64),
                {"VAEOPS_TRAIN__HIDDEN_DIM": "64"},
                "its weights do not fit its own config",
                "",
            ),
            ("export", "missing", delete("models/vae.pt"), {}, "models/vae.pt: checkpoint not found", ""),
            ("export", "garbage", garble("models/vae.pt"), {}, "models/vae.pt: not a loadable", ""),
            ("export", "pickled-code", pickled_code, {}, "models/vae.pt: not a loadable", ""),
            (
                "export",
                "a-tensor",
                checkpoint(lambda s: s["model"]["encoder.fc_mu.weight"]),
                {},
                "not a vaeops checkpoint",
                "",
            ),
            ("export", "no-run-id", checkpoint(without("run_id")), {}, "names no MLflow run", ""),
            (
                "export",
                "weights-of-another-size",
                checkpoint(hidden_64),
                {},
                "its weights do not fit its own config",
                "",
            ),
            ("train", "resume-garbage", garble("models/vae.pt"), RESUME, "models/vae.pt: not a loadable", ""),
            (
                "train",
                "resume-other-latent",
                None,
                RESUME | {"VAEOPS_TRAIN__LATENT_DIM": "8"},
                "train.resume = false",
                "",
            ),
            (
                "train",
                "resume-weights-only",
                checkpoint(without("optimizer")),
                RESUME,
                "no training state",
                "",
            ),
        ]
    ),
    # models/run.json: the MLflow run evaluate and export log into
    *(
        row(f"{cmd}-{way}", "run-file", cmd, 2, setup=setup, expect=expect)
        for cmd, way, setup, expect in [
            ("evaluate", "missing", delete("models/run.json"), "models/run.json: missing"),
            ("evaluate", "garbage", garble("models/run.json"), "models/run.json: not a run file"),
            (
                "evaluate",
                "another-run",
                edit_json("models/run.json", other_run),
                "models/run.json names MLflow run",
            ),
            ("export", "missing", delete("models/run.json"), "models/run.json: missing"),
            ("export", "json-list", put("models/run.json", "[1, 2]\n"), "models/run.json: not a run file"),
            (
                "export",
                "another-run",
                edit_json("models/run.json", other_run),
                "models/run.json names MLflow run",
            ),
        ]
    ),
    # The MLflow store: damaged, read-only, full, changed in the UI, or a server that is down
    *(
        row(id, "mlflow", cmd, code, setup=setup, env=env, expect=expect, xfail=xfail, timeout=timeout)
        for id, cmd, code, setup, env, expect, xfail, timeout in [
            ("garbage-train", "train", 2, garble("mlruns.db"), {}, "file is not a database", "", 180),
            (
                "garbage-evaluate",
                "evaluate",
                2,
                garble("mlruns.db"),
                {},
                "not a database",
                "",
                180,
            ),
            ("truncated-train", "train", 2, cut("mlruns.db", 0.3), {}, "malformed", "", 180),
            # Well under MLflow's minutes of retries, with room for a slow start on a busy machine.
            ("store-is-folder", "train", 2, to_folder("mlruns.db"), {}, "is not a file", "", 60),
            (
                "lock-is-folder",
                "train",
                1,
                to_folder(".mlruns.db.lock"),
                {},
                ".mlruns.db.lock: Is a directory",
                "",
                180,
            ),
            (
                "experiment-deleted-train",
                "train",
                2,
                store(delete_experiment),
                {},
                "experiments restore",
                "",
                180,
            ),
            (
                "experiment-deleted-evaluate",
                "evaluate",
                2,
                store(delete_experiment),
                {},
                "restore it with",
                "",
                180,
            ),
            ("run-deleted-evaluate", "evaluate", 2, store(delete_run), {}, "runs restore --run-id", "", 180),
            (
                "run-deleted-resume",
                "train",
                2,
                store(delete_run),
                RESUME,
                "runs restore",
                "",
                180,
            ),
            (
                "server-down-train",
                "train",
                2,
                None,
                {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                "not reachable",
                "",
                180,
            ),
            (
                "server-down-evaluate",
                "evaluate",
                2,
                None,
                {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                "not reachable",
                "",
                180,
            ),
            (
                "unknown-scheme",
                "train",
                2,
                None,
                {"MLFLOW_TRACKING_URI": "nosuch://store"},
                "nosuch://store",
                "",
                180,
            ),
        ]
    ),
    # A new training does not need the deleted run: it completes a new set in a new run.
    row("run-deleted-train", "mlflow", "train", 0, setup=store(delete_run), store=True, creates=TRAIN_SET),
    row(
        "registry-name-refused",
        "mlflow",
        "export",
        2,
        env={"VAEOPS_EXPORT__REGISTERED_MODEL_NAME": "a/b:c"},
        store=True,
        expect="MLflow refuses it",
    ),
    *(
        row(id, "mlflow", cmd, 1, mount=mount, store=store, expect=expect)
        for id, cmd, mount, store, expect in [
            (
                "read-only-db-train",
                "train",
                ("ro", "mlruns.db"),
                False,
                "attempt to write a readonly database",
            ),
            (
                "read-only-db-evaluate",
                "evaluate",
                ("ro", "mlruns.db"),
                False,
                "attempt to write a readonly database",
            ),
            ("read-only-artifacts-train", "train", ("ro", "mlartifacts"), True, "read-only file system"),
            (
                "read-only-artifacts-evaluate",
                "evaluate",
                ("ro", "mlartifacts"),
                True,
                "read-only file system",
            ),
            ("read-only-artifacts-export", "export", ("ro", "mlartifacts"), True, "read-only file system"),
            ("full-store-train", "train", ("full", "."), False, "database or disk is full"),
            ("full-artifacts-evaluate", "evaluate", ("full", "mlartifacts"), True, "no space left"),
        ]
    ),
    # Full, read-only or unwritable folders for each stage's outputs. A new seed (preprocess) or
    # evaluate.seed (evaluate) makes new outputs, so a set replaced half-way would show.
    *(
        row(
            f"preprocess-{way}",
            "filesystem",
            "preprocess",
            1,
            env={"VAEOPS_PREPROCESS__SEED": "1"},
            tiny=True,
            **kw,
        )
        for way, kw in [
            ("full", {"mount": ("full", "data/processed"), "expect": "no space left"}),
            # the splits fit, the report does not: none of the five files may change
            ("full-reports", {"mount": ("full", "reports"), "expect": "no space left"}),
            ("read-only", {"mount": ("ro", "data/processed"), "expect": "read-only file system"}),
            ("no-permission", {"no_write": "data/processed", "expect": "permission denied"}),
            ("file-size-limit", {"fsize": 8192, "expect": "file-size limit"}),
        ]
    ),
    row(
        "download-read-only",
        "filesystem",
        "download",
        1,
        setup=delete(f"{RAW}/t10k-labels-idx1-ubyte"),
        mount=("ro", "data/raw"),
        env={"VAEOPS_DATA_MIRROR": "{proj}/mirror"},
        expect="read-only file system",
        tiny=True,
    ),
    *(
        row(f"{cmd}-{way}", "filesystem", cmd, 1, store=True, xfail=xfail, **kw)
        for cmd, way, xfail, kw in [
            ("train", "full-models", "", {"mount": ("full", "models"), "expect": "no space left"}),
            ("train", "read-only-models", "", {"mount": ("ro", "models"), "expect": "read-only file system"}),
            ("train", "no-permission", "", {"no_write": "models", "expect": "permission denied"}),
            # The checkpoint of the finished epoch is kept by design, as when training is stopped.
            (
                "train",
                "read-only-reports",
                "",
                {"mount": ("ro", "reports"), "changes": LAST_EPOCH[:2], "expect": "read-only file system"},
            ),
            (
                "evaluate",
                "full-reports",
                "",
                {
                    "mount": ("full", "reports"),
                    "env": {"VAEOPS_EVALUATE__SEED": "1"},
                    "expect": "no space left",
                },
            ),
            # Room for metrics.json and elbo_by_class.json but not the figures: the previous set stays.
            (
                "evaluate",
                "full-figures",
                "",
                {"mount": ("full", "reports"), "free": 16384, "env": {"VAEOPS_EVALUATE__SEED": "1"}}
                | {"expect": "no space left"},
            ),
            (
                "evaluate",
                "no-permission",
                "",
                {"no_write": "reports", "env": {"VAEOPS_EVALUATE__SEED": "1"}, "expect": "permission denied"},
            ),
            ("export", "full-models", "", {"mount": ("full", "models"), "expect": "no space left"}),
        ]
    ),
    *(
        row(id, "filesystem", args, code, setup=put("out/keep", ""), expect=expect, **kw)
        for id, args, code, expect, kw in [
            ("sample-read-only", "sample -o out/s.png", 2, "Read-only file system", {"mount": ("ro", "out")}),
            ("sample-full", "sample -o out/s.png", 1, "No space left", {"mount": ("full", "out")}),
            ("sample-file-size-limit", "sample -o out/s.png", 1, "File too large", {"fsize": 4096}),
        ]
    ),
    # Signals: a stopped training says so in one `interrupted:` line; other stages in `error: interrupted`
    *(
        row(
            f"train-{sig.name.lower()}",
            "signals",
            "train",
            128 + sig,
            setup=bigger_training_set,
            env=STOP_TRAIN,
            stop=(sig, "epoch 1/6"),
            store=True,
            changes=LAST_EPOCH,
            expect=f"({sig.name})",
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    ),
    row(
        "download-sigint",
        "signals",
        "download",
        130,
        setup=delete(RAW),
        env={"VAEOPS_DATA_MIRROR": "{mirror}/hang/"},
        stop=(signal.SIGINT, "mirror"),
        expect="error: interrupted",
        tiny=True,
    ),
    row(
        "evaluate-sigint",
        "signals",
        "evaluate",
        130,
        env={"VAEOPS_EVALUATE__IWAE_SAMPLES": "200000", "VAEOPS_EVALUATE__IWAE_IMAGES": "20"},
        stop=(signal.SIGINT, "IWAE:"),
        expect="error: interrupted",
    ),
    # ui: what would fail inside the server is checked before it starts
    *(
        row(id, "ui", args, code, setup=setup, env=env, expect=expect)
        for id, args, code, setup, env, expect in [
            ("busy-port", "ui --port {busy}", 1, None, {}, "is in use; try --port"),
            ("busy-port-all-interfaces", "ui --host 0.0.0.0 --port {busy}", 1, None, {}, "is in use"),
            ("port-too-big", "ui --port 99999", 2, None, {}, "--port 99999: must be a TCP port"),
            ("port-zero", "ui --port 0", 2, None, {}, "--port 0: must be a TCP port"),
            (
                "host-elsewhere",
                "ui --host 192.0.2.1 --port {free}",
                2,
                None,
                {},
                "not an address of this machine",
            ),
            ("store-garbage", "ui --port {free}", 2, garble("mlruns.db"), {}, "file is not a database"),
            ("store-is-folder", "ui --port {free}", 2, to_folder("mlruns.db"), {}, "is not a file"),
            (
                "store-is-a-server",
                "ui --port {free}",
                2,
                None,
                {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                "is a tracking server",
            ),
        ]
    ),
    # sample: the ONNX consumer, its models and latents
    *(
        row(id, "sample", f"sample {args}", 2, setup=setup, expect=expect)
        for id, args, setup, expect in [
            ("n-huge", "-n 1000000000", None, "-n 1000000000: that many"),
            ("n-huge-npy", "-n 1000000000 --format npy -o x.npy", None, "as npy need about"),
            ("n-zero", "-n 0", None, "-n 0: need at least one image"),
            ("seed-negative", "--seed -1", None, "--seed -1: must be ≥ 0"),
            ("nrow-negative", "--nrow -1", None, "--nrow -1"),
            ("nrow-above-n", "-n 4 --nrow 5", None, "--nrow 5: more than the 4 images"),
            ("format-unknown", "--format jpg", None, "--format 'jpg' is not allowed"),
            ("suffix-mismatch", "--format npy -o x.png", None, "does not match --format npy"),
            ("output-is-folder", "-o models", None, "-o models: is a folder"),
            ("model-missing", "--model nope.onnx", None, "nope.onnx: decoder not found"),
            ("model-folder", "--model models", None, "models: is a folder"),
            ("model-garbage", "", garble("models/decoder.onnx"), "not a loadable ONNX model"),
            ("model-truncated", "", cut("models/decoder.onnx"), "not a loadable ONNX model"),
            ("model-empty", "", put("models/decoder.onnx", b""), "not a loadable ONNX model"),
            ("model-is-encoder", "--model models/encoder.onnx", None, "not a vaeops decoder"),
            (
                "model-int-input",
                "--model int.onnx",
                decoder("int.onnx", "batch", "INT64"),
                "tensor(int64), not float",
            ),
            ("z-missing", "--z-file z.npy", None, "z.npy: latent file not found"),
            ("z-garbage", "--z-file z.npy", put("z.npy", "not an array\n"), "z.npy: not a .npy array"),
            ("z-pickled", "--z-file z.npy", latents(np.array([Payload()])), "z.npy: not a .npy array"),
            (
                "z-npz",
                "--z-file z.npy",
                save("z.npy", lambda f: np.savez(f, z=np.zeros((2, 4)))),
                "expected a numeric",
            ),
            (
                "z-wrong-width",
                "--z-file z.npy",
                latents(np.zeros((3, 5), np.float32)),
                "the decoder wants N × 4",
            ),
            (
                "z-3d",
                "--z-file z.npy",
                latents(np.zeros((2, 2, 4), np.float32)),
                "latents have shape (2, 2, 4)",
            ),
            ("z-nan", "--z-file z.npy", latents(np.full((3, 4), np.nan, np.float32)), "NaN or infinity"),
            ("z-empty", "--z-file z.npy", latents(np.zeros((0, 4), np.float32)), "holds no latents"),
        ]
    ),
    # Decoders exported with a fixed batch of 1, or taking float64: decoded, not refused.
    *(
        row(
            id,
            "sample",
            f"sample --model d.onnx -n 5 --format {fmt} -o x.{fmt}",
            0,
            creates=(f"x.{fmt}",),
            **kw,
        )
        for id, fmt, kw in [
            ("fixed-batch-1", "npy", {"setup": decoder("d.onnx", 1, "FLOAT")}),
            ("float64-input", "png", {"setup": decoder("d.onnx", "batch", "DOUBLE")}),
        ]
    ),
]


# --- the project and the machinery ----------------------------------------------------------------


def base_env(proj: Path) -> dict[str, str]:
    """This process's environment without anything that would point the CLI elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("VAEOPS_", "MLFLOW_", "DVC_"))}
    return env | {"OMP_NUM_THREADS": "1", "VAEOPS_SYSTEM_DATASETS": str(proj / "no-system-datasets")}


def run_ok(args: list[str], cwd: Path) -> None:
    res = subprocess.run(args, cwd=cwd, env=base_env(cwd), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project every row copies: params, raw files, splits, a trained checkpoint in its MLflow
    store, the evaluate reports and the exported ONNX models."""
    proj = tmp_path_factory.mktemp("seed")
    (proj / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    write_set(proj / RAW, make_idx_set(), gz=False)
    write_set(proj / "mirror", make_idx_set(), gz=True)  # a local mirror for download rows
    run_ok([sys.executable, "-c", TINY_MAIN, DIGESTS, "preprocess"], proj)
    for stage in ("train", "evaluate", "export"):
        run_ok([str(VAEOPS), stage], proj)
    return proj


def copy_project(seed: Path, dest: Path) -> Path:
    """A copy of the seed whose MLflow store names the copy's artifact folder, not the seed's."""
    shutil.copytree(seed, dest, symlinks=True)
    with sqlite3.connect(dest / "mlruns.db") as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for col in db.execute(f"PRAGMA table_info({table})").fetchall():
                if col[2].upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(
                        f"UPDATE {table} SET {col[1]} = replace({col[1]}, ?, ?) WHERE {col[1]} LIKE ?",
                        (str(seed), str(dest), f"%{seed}%"),
                    )
    db.close()
    return dest


@functools.cache
def mounts_allowed() -> str:
    """'' where a private mount namespace with a tmpfs works here, else why not."""
    cmd = [*namespace(), "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d" && umount "$d"']
    res = subprocess.run(cmd, capture_output=True, text=True)
    return "" if res.returncode == 0 else f"no private mount namespace here: {res.stderr.strip()}"


def namespace() -> list[str]:
    return ["unshare", "-m", "--propagation", "private", *([] if os.geteuid() == 0 else ["-r"])]


class Mirror(BaseHTTPRequestHandler):
    """/hang/ never answers, /trickle/ sends a byte now and then, /junk/ and /badgzip/ serve the wrong
    bytes, anything else is 404."""

    hits: Counter = Counter()
    stop = threading.Event()

    def do_GET(self) -> None:
        kind = self.path.strip("/").split("/")[0]
        Mirror.hits[kind] += 1
        if kind == "hang":
            Mirror.stop.wait()
        elif kind == "trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            try:
                while not Mirror.stop.wait(0.05):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:  # the client gave up
                pass
        elif kind in ("junk", "badgzip"):
            body = b"\x1f\x8b" + b"\0" * 100 if kind == "badgzip" else b"not an IDX file\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def mirror() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    Mirror.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def busy() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def fill(text: str, places: dict[str, object]) -> str:
    """{proj}, {mirror}, ... replaced (not str.format: JSON values hold braces)."""
    for name, value in places.items():
        text = text.replace(f"{{{name}}}", str(value))
    return text


def command(r: Row, proj: Path, overlay: Path, places: dict[str, object]) -> list[str]:
    args = [fill(a, places) for a in r.args]
    cmd = [sys.executable, "-c", TINY_MAIN, DIGESTS, *args] if r.tiny else [str(VAEOPS), *args]
    if r.fsize:
        cmd = ["prlimit", f"--fsize={r.fsize}", "--", *cmd]
    if r.no_write and os.geteuid() == 0:
        cmd = [*DROP_DAC, "--", *cmd]
    if r.mount:
        kind, target = r.mount
        script = READ_ONLY if kind == "ro" else FULL
        where = [str((proj / target).resolve()), str(overlay), str(r.free)]
        cmd = [*namespace(), "sh", "-c", script, "sh", *where, *cmd]
    return cmd


def run_and_stop(cmd: list[str], proj: Path, env: dict[str, str], r: Row) -> subprocess.CompletedProcess:
    """Run cmd; once its stderr shows the row's text (or the mirror got a request), send the signal."""
    signum, when = r.stop
    hits = Mirror.hits["hang"]
    proc = subprocess.Popen(
        cmd, cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + r.timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if Mirror.hits["hang"] > hits if when == "mirror" else any(when in line for line in lines):
            proc.send_signal(signum)
            break
        time.sleep(0.05)
    try:
        proc.wait(timeout=r.timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", "".join(lines))


def files_after(r: Row, proj: Path, overlay: Path) -> dict[str, bytes]:
    """Every file of the project after the command; a full folder as the command left its tmpfs."""
    after = tree(proj)
    if r.mount and r.mount[0] == "full":
        target = r.mount[1]
        prefix = "" if target == "." else f"{target}/"
        after = {k: v for k, v in after.items() if not k.startswith(prefix)}
        after |= {prefix + k: v for k, v in tree(overlay).items()}
    return after


@dataclass
class Outcome:
    res: subprocess.CompletedProcess
    before: dict[str, bytes]
    after: dict[str, bytes]
    pwned: bool  # the marker a payload's code would have created


def run_row(r: Row, seed: Path, folder: Path, places: dict[str, object]) -> Outcome:
    """Copy the seed, break it as the row says, run the command, and read the project before and after."""
    if r.mount and (why := mounts_allowed()):
        pytest.skip(why)
    proj = copy_project(seed, folder / "proj")
    places = places | {"proj": proj, "free": free_port()}
    if r.setup:
        r.setup(proj)
    if r.no_write:
        (proj / r.no_write).chmod(0o555)
    before = tree(proj)
    env = base_env(proj) | {k: fill(v, places) for k, v in r.env.items()}
    cmd = command(r, proj, folder / "overlay", places)
    try:
        if r.stop:
            res = run_and_stop(cmd, proj, env, r)
        else:
            res = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=r.timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`vaeops {' '.join(r.args)}` still running after {r.timeout:g} s")
    finally:
        if r.no_write:
            (proj / r.no_write).chmod(0o755)
    return Outcome(res, before, files_after(r, proj, folder / "overlay"), (proj / "pwned").exists())


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest,
    seed: Path,
    mirror: str,
    busy: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Future]]:
    """Every selected row, run ahead of its test two at a time: each row is one process or a few, most
    of their time is starting Python and importing torch, and the rows share nothing."""
    places = {"mirror": mirror, "busy": busy}
    rows = {
        item.callspec.id: item.callspec.params["r"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_fault"
    }
    with ThreadPoolExecutor(2) as pool:
        yield {
            id: pool.submit(run_row, r, seed, tmp_path_factory.mktemp(id, numbered=True), places)
            for id, r in rows.items()
        }
        pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("r", ROWS)
def test_fault(r: Row, outcomes: dict[str, Future], request: pytest.FixtureRequest) -> None:
    out = outcomes[request.node.callspec.id].result()
    res = out.res
    assert res.returncode == r.code, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    stopped = [line for line in lines if line.startswith("interrupted:")]
    if r.code == 0:
        assert errors == [], res.stderr
    elif r.stop and r.args[0] == "train":
        assert errors == [] and len(stopped) == 1 and r.expect in stopped[0], res.stderr
    else:
        assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
        assert r.expect in errors[0], errors[0]
        # A failure never suggests loading something unsafely.
        assert "weights_only" not in errors[0] and "allow_pickle" not in errors[0]

    may_change = {*r.changes, *r.creates}
    for path in sorted(out.before.keys() | out.after.keys()):
        if path in may_change or (r.store and path.startswith(STORE)):
            continue
        changed = "changed" if path in out.after else "removed"
        assert out.before.get(path) == out.after.get(path), (
            f"{path} {changed if path in out.before else 'new'}"
        )
    for path in (*r.changes, *r.creates):
        assert out.after.get(path), f"{path} missing after the command"
    assert not out.pwned
