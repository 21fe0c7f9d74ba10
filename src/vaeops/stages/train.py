"""train: fit the VAE on data/processed, checkpoint every epoch, log curves and grids to MLflow.

The loop is pytorch/examples vae/main.py without the DataLoader: each split lives in memory as one
uint8 tensor, every epoch draws a seeded permutation and slices batches, and scaling (or dynamic
binarization) happens on whole batches. Everything random in epoch e (permutation, binarization,
the reparameterization noise) is seeded from (seed, e), and the learning rate is a pure function of
the global step, so the epoch-e checkpoint (weights + optimizer state) is all a resumed run needs to
replay exactly what an uninterrupted run would have done.

Under torchrun (WORLD_SIZE > 1) every rank draws the same permutation, binarization and noise for
the global batch of train.batch_size and trains on its own rows of it; DistributedDataParallel
averages the gradients, so N processes follow the trajectory of one (up to float reduction order).
Rank 0 alone writes the checkpoint, the DVC outputs and the MLflow run.
"""

import csv
import json
import math
import os
import signal
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from vaeops import tracking
from vaeops.config import TrainParams, env_overrides
from vaeops.errors import UsageError, WorkError
from vaeops.figures import grid, save_png
from vaeops.io import atomic_path, remove_dead_temp_files, write_json
from vaeops.losses import elbo_terms
from vaeops.models import VAE, build_model, checkpoint, load_checkpoint, resolve_device, save_checkpoint
from vaeops.progress import log, step_bar
from vaeops.stages.preprocess import load_split

CURVE_COLUMNS = [
    "epoch",
    "train_elbo",
    "train_recon",
    "train_kl",
    "val_elbo",
    "val_recon",
    "val_kl",
    "lr",
    "images_per_s",
]
# Params that do not change the trained weights may differ between a run and its resumption.
# train.nproc only changes float reduction order.
RESUME_FREE = {"resume", "log_every_steps", "device", "threads", "compile", "experiment", "nproc"}
# Curve columns → MLflow metric names (DESIGN.md: train/elbo, val/kl, ... in nats per image).
METRIC_NAMES = {c: c.replace("_", "/", 1) for c in CURVE_COLUMNS[1:7]} | {
    "lr": "lr",
    "images_per_s": "images_per_s",
}
VAL_BATCH = 1000
GRID = 8  # samples and reconstructions are 8×8 grids


@dataclass
class Paths:
    data: Path = Path("data/processed")
    model: Path = Path("models/vae.pt")
    run_file: Path = Path("models/run.json")
    metrics: Path = Path("reports/train.json")
    curve: Path = Path("reports/train_curve.csv")
    samples: Path = Path("reports/train_samples.png")


def load_data(folder: Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(train uint8 N×C×H×W, val uint8, meta) with the image shape taken from meta.json."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UsageError(f"{meta_path}: missing; run `dvc repro preprocess` first")
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(d) for d in meta["image_shape"])
        str(meta["dataset"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{meta_path}: expected JSON with 'dataset' and 'image_shape'") from None
    splits = []
    for name in ("train", "val"):
        path = folder / f"{name}.npz"
        try:
            x, _ = load_split(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UsageError(f"{path}: not a readable split ({type(e).__name__}); rerun preprocess") from None
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise UsageError(
                f"{path}: images are {x.dtype} {list(x.shape)}, expected uint8 N×{'×'.join(map(str, shape))} "
                "as meta.json says; rerun preprocess"
            )
        splits.append(torch.from_numpy(x))
    train, val = splits
    if len(train) < 2:
        raise UsageError(f"{folder}/train.npz: {len(train)} images; training needs at least 2")
    if len(val) == 0:
        raise UsageError(f"{folder}/val.npz: no images; set preprocess.val_size > 0")
    return train, val, meta


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch(params: TrainParams, args: list[str]) -> int:
    """Run `vaeops <args>` again as nproc workers, as `torchrun --standalone --nproc-per-node nproc -m
    vaeops.cli <args>` would; returns the first failed worker's exit code (2 for bad usage), else 0.
    Workers see WORLD_SIZE, so they train instead of relaunching."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    nproc = params.nproc
    if params.batch_size % nproc:  # fail here, once, rather than in every worker
        raise UsageError(
            f"train.batch_size = {params.batch_size} (global) does not split evenly over train.nproc = "
            f"{nproc} processes; use a multiple of {nproc}"
        )
    log(f"train.nproc = {nproc}: relaunching under torchrun")
    argv = ["--nproc-per-node", str(nproc), "--standalone", "-m", "vaeops.cli", *args]
    try:
        torchrun(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        # The workers printed their own `error:` line; torchrun's traceback would only bury it.
        return next(iter(e.failures.values())).exitcode or 1
    return 0


def all_sum(t: Tensor) -> Tensor:
    """Sum of t over ranks (t itself when there is one process)."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> torch.optim.Optimizer:
    # fused: one kernel per parameter instead of ~10 elementwise passes; ~15% of a CPU mlp epoch.
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            fused=True,
        )
    return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=True)


def lr_at(step: int, total_steps: int, params: TrainParams) -> float:
    """Learning rate for global step `step` (0-based): linear warm-up, then constant or cosine to 0."""
    warm = params.lr_warmup_steps
    if step < warm:
        return params.lr * (step + 1) / warm
    if params.lr_schedule == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        return params.lr_min + (params.lr - params.lr_min) * 0.5 * (1 + math.cos(math.pi * t))
    return params.lr


def beta_at(step: int, warmup_steps: int, beta: float) -> float:
    """KL weight: linear warm-up from ~0 to beta over the first train.kl_warmup_epochs."""
    return beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else beta


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def scale(x: Tensor, binarize: bool, gen: torch.Generator | None) -> Tensor:
    """uint8 batch → float targets in [0, 1], or a fresh Bernoulli draw of them (dynamic binarization)."""
    x = x.float().div_(255)
    return torch.bernoulli(x, generator=gen) if binarize else x


@torch.no_grad()
def evaluate(model: VAE, x: Tensor, autocast: Any) -> tuple[float, float]:
    """Mean (recon, kl) per image over x (already scaled), single-sample, in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), VAL_BATCH):
        xb = x[i : i + VAL_BATCH]
        with autocast:
            logits, mu, logvar = model(xb)
        recon, kl = elbo_terms(logits.float(), xb, mu.float(), logvar.float())
        sums += torch.stack([recon.sum(), kl.sum()]).double()
    model.train(was_training)
    recon, kl = (sums / len(x)).tolist()
    return recon, kl


@torch.no_grad()
def figures(model: VAE, z: Tensor, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(8×8 samples decoded from the fixed z, fixed val images in rows above their reconstructions)."""
    model.eval()
    samples = model.decode(z).float().cpu().numpy()
    mu, _ = model.encode(images)
    recon = model.decode(mu).float()
    model.train()
    # Interleave rows: 8 inputs, their 8 reconstructions, the next 8 inputs, ...
    rows = []
    for i in range(0, len(images), GRID):
        rows += [images[i : i + GRID], recon[i : i + GRID]]
    pairs = torch.cat(rows).cpu().numpy()
    return grid(samples, GRID), grid(pairs, GRID)


def _resume_state(params: TrainParams, path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    if not params.resume:
        return None
    if not path.exists():
        log(f"train.resume: {path} does not exist yet, starting from scratch")
        return None
    state = load_checkpoint(path)
    if "optimizer" not in state or "params" not in state:
        raise UsageError(f"{path}: holds final weights only, no training state to resume from")
    if state["config"] != config:
        raise UsageError(
            f"{path}: was trained with {state['config']}, not {config}; "
            "set train.resume = false to start over"
        )
    now = params.model_dump()
    for key, value in state["params"].items():
        if key not in RESUME_FREE and now.get(key) != value:
            raise UsageError(
                f"{path}: was trained with train.{key} = {value!r}, now {now.get(key)!r}; resuming would not "
                "reproduce an uninterrupted run: restore it or set train.resume = false"
            )
    return state


def _start_run(params: TrainParams, state: dict[str, Any] | None, tags: dict[str, str]) -> Any:
    import mlflow

    experiment_id = tracking.setup(params.experiment)
    if state is None:
        name = tracking.run_name(params.arch, params.latent_dim, tags["dataset"], params.epochs)
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tracking.run_tags(tags))
    try:
        mlflow.get_run(state["run_id"])
    except Exception:
        raise UsageError(
            f"MLflow run {state['run_id']} from the checkpoint is not in the store "
            f"{tracking.tracking_uri()}; set MLFLOW_TRACKING_URI to the store that recorded it, "
            "or train.resume = false"
        ) from None
    return mlflow.start_run(run_id=state["run_id"])


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)


class NonFinite(Exception):
    """Raised inside an epoch; `run` turns it into a WorkError naming the checkpoint it kept."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT, SIGTERM or SIGHUP; the CLI exits 128 + signum, as a shell does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Ctrl-C, SIGTERM (schedulers, `docker stop`) and SIGHUP (a closed terminal) set a flag that
    training checks between steps, so the stop never lands inside an MLflow or checkpoint write
    (SQLite left locked, a half-logged epoch). A second signal stops at once. Either way the MLflow
    run named in `run_id` ends KILLED, not FAILED as MLflow marks a run left by an exception.

    Under torchrun only Ctrl-C waits for a step's end, as before: each rank checks its own flag, and
    a rank stopping a step early would leave the others waiting in an all-reduce. SIGTERM keeps its
    default there, so torchrun's agent can stop the workers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.run_id = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        signums = [signal.SIGINT] if world()[1] > 1 else [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        try:
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals keep their default behaviour
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.run_id and isinstance(exc, KeyboardInterrupt):
                import mlflow

                mlflow.MlflowClient().set_terminated(self.run_id, "KILLED")
        finally:
            for signum, previous in self._previous.items():
                if previous is not None:  # None: set outside Python, cannot be restored
                    signal.signal(signum, previous)
            self._previous.clear()

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def clean_up_after_killed(experiment: str, paths: Paths) -> None:
    """What a killed training (kill -9, out of memory) left: close its MLflow runs as KILLED and remove
    its temp files from the output folders. A live process's runs and temp files are left alone."""
    for run_id, why in tracking.end_orphaned_runs(tracking.setup(experiment)):
        log(f"marked MLflow run {run_id} KILLED: {why}")
    outputs = (paths.model, paths.run_file, paths.metrics, paths.curve, paths.samples)
    for path in remove_dead_temp_files(p.parent for p in outputs):
        log(f"removed {path}: its writer ended before finishing it")


@dataclass
class Loop:
    """Everything one epoch of training needs (`run` builds it; so does benchmarks/train_speed.py)."""

    params: TrainParams
    model: VAE
    opt: torch.optim.Optimizer
    data: Tensor  # uint8 N×C×H×W, on the training device
    forward: Any = None  # the model, or its torch.compile'd wrapper
    autocast: Any = field(default_factory=nullcontext)
    stop: StopFlag = field(default_factory=StopFlag)

    def __post_init__(self) -> None:
        self.forward = self.forward or self.model
        # Whole batches only: each epoch's permutation differs, so every image is still visited, and
        # no trailing batch of one reaches BatchNorm (which cannot train on it).
        self.batch = min(self.params.batch_size, len(self.data))
        self.steps = max(1, len(self.data) // self.batch)


def make_loop(params: TrainParams, data: Tensor, device: torch.device) -> Loop:
    cuda = device.type == "cuda"
    torch.manual_seed(params.seed)
    model = build_model(params.arch, tuple(data.shape[1:]), params.latent_dim, params.hidden_dim).to(device)
    net: torch.nn.Module = model
    if world()[1] > 1:
        # Batch statistics over the global batch, as one process would see them. SyncBatchNorm runs
        # on GPUs only: on CPU each rank normalizes its own rows (conv only; mlp has no BatchNorm).
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    return Loop(
        params,
        model,
        make_optimizer(params, model),
        data.to(device),
        forward=torch.compile(net) if params.compile and cuda else net,
        # bf16 autocast: GEMMs in bfloat16 with fp32 accumulation (GPUs; CPUs with AVX512-BF16 or AMX).
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if params.bf16 else nullcontext(),
    )


def train_epoch(loop: Loop, epoch: int, bar: Any = None) -> dict[str, Any]:
    """One pass over a seeded permutation of the data; returns mean recon and KL per image, and more."""
    p, model, opt, bs = loop.params, loop.model, loop.opt, loop.batch
    device = loop.data.device
    rank, size = world()
    mine = slice(rank * bs // size, (rank + 1) * bs // size)  # this rank's rows of each global batch
    total_steps, kl_warmup_steps = loop.steps * p.epochs, loop.steps * p.kl_warmup_epochs
    # Checking finiteness reads the loss back: free on CPU, a sync on a GPU, so only now and then there.
    check_every = p.log_every_steps if device.type == "cuda" else 1
    torch.manual_seed(epoch_seed(p.seed, epoch))
    gen = torch.Generator(device=device).manual_seed(epoch_seed(p.seed, epoch))
    perm = torch.randperm(len(loop.data), generator=gen, device=device)
    sums = torch.zeros(2, device=device)  # summed on the device, read once per epoch
    step_losses: list[tuple[int, Tensor]] = []
    task = bar.add_task(f"epoch {epoch}/{p.epochs}", total=loop.steps, info="") if bar else None
    t0 = time.perf_counter()
    model.train()
    for i in range(loop.steps):
        step = (epoch - 1) * loop.steps + i
        lr = lr_at(step, total_steps, p)
        for group in opt.param_groups:
            group["lr"] = lr
        # Every rank draws the whole global batch's binarization and noise, then keeps its rows.
        x = scale(loop.data[perm[i * bs : (i + 1) * bs]], p.binarize, gen)[mine]
        eps = torch.randn(bs, p.latent_dim, device=device)[mine]
        with loop.autocast:
            logits, mu, logvar = loop.forward(x, eps)
        recon, kl = elbo_terms(logits.float(), x, mu.float(), logvar.float())
        # Mean over the batch of the per-image loss, so the learning rate does not scale with batch size
        # (DDP averages the ranks' gradients of their equal shares: the global batch's mean). "sum" is
        # that mean times the global batch, on every rank alike: the article's batch sum.
        loss = (recon + beta_at(step, kl_warmup_steps, p.beta) * kl).mean()
        checked = (i + 1) % check_every == 0
        logged = (step + 1) % p.log_every_steps == 0
        if checked or logged:
            # Averaged over ranks, so all ranks see the same value and stop together on a NaN.
            loss_all = all_sum(loss.detach()) / size
        if checked and not torch.isfinite(loss_all):
            raise NonFinite(i + 1, f"loss {loss_all.item()}")
        opt.zero_grad(set_to_none=True)
        (loss * bs if p.loss_reduction == "sum" else loss).backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        loop.stop.check()
        sums += torch.stack([recon.sum(), kl.sum()]).detach()
        if logged:
            step_losses.append((step + 1, loss_all))
        if task is not None and i % 20 == 0:
            ips = (i + 1) * bs / (time.perf_counter() - t0)
            bar.update(task, completed=i + 1, info=f"loss {loss.item():.2f}  {ips:,.0f} img/s")
    recon_mean, kl_mean = (all_sum(sums) / (loop.steps * bs)).tolist()
    if size > 1:
        # BatchNorm running stats (conv on CPU) differ per rank: keep rank 0's, which it checkpoints.
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    seconds = time.perf_counter() - t0
    if not math.isfinite(recon_mean + kl_mean):
        raise NonFinite(loop.steps, "the epoch's mean loss")
    return {
        "recon": recon_mean,
        "kl": kl_mean,
        "lr": lr,
        "seconds": seconds,
        "images_per_s": loop.steps * bs / seconds,
        "step_losses": _unzip(step_losses),
    }


def run(params: TrainParams, paths: Paths) -> dict[str, Any]:
    """Train, checkpointing each epoch; returns (and writes to paths.metrics) the final train/val terms.

    Under torchrun, joins the process group for the run; ranks other than 0 write nothing, return {}."""
    previous = torch.get_num_threads()
    if params.threads:
        torch.set_num_threads(params.threads)
    distributed = world()[1] > 1 and not dist.is_initialized()
    if distributed:
        device = resolve_device(params.device, "train.device")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(params, paths)
    finally:
        torch.set_num_threads(previous)  # the setting is process-wide: leave it as it was
        if distributed:
            dist.destroy_process_group()


def _run(params: TrainParams, paths: Paths) -> dict[str, Any]:
    import mlflow
    from mlflow.entities import Metric

    device = resolve_device(params.device, "train.device")
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    rank, size = world()
    lead = rank == 0
    if params.compile and device.type != "cuda":
        log("train.compile applies on CUDA only; ignored on cpu")
    train_u8, val_u8, meta = load_data(paths.data)
    shape = tuple(int(d) for d in meta["image_shape"])
    config = {
        "arch": params.arch,
        "latent_dim": params.latent_dim,
        "hidden_dim": params.hidden_dim,
        "image_shape": list(shape),
        "dataset": str(meta["dataset"]),
        "binarize": params.binarize,
    }
    state = _resume_state(params, paths.model, config)
    if min(params.batch_size, len(train_u8)) % size:
        raise UsageError(
            f"train.batch_size = {params.batch_size} (global) does not split evenly over {size} processes; "
            f"use a multiple of {size}"
        )
    loop = make_loop(params, train_u8, device)
    if state is not None:
        loop.model.load_state_dict(state["model"])
        loop.opt.load_state_dict(state["optimizer"])

    fixed = torch.Generator(device=device).manual_seed(params.seed)
    # Validation targets are drawn once, so the val curve compares epochs on the same binarized images.
    val_x = scale(val_u8.to(device), params.binarize, fixed)
    z_fixed = torch.randn(GRID * GRID, params.latent_dim, generator=fixed, device=device)
    shown = val_x[: GRID * GRID // 2]
    curve: list[dict[str, float]] = list(state["curve"]) if state else []
    start = int(state["epoch"]) if state else 0
    seconds = float(state["seconds"]) if state else 0.0
    kept = start

    def diverged(epoch: int, step: int, what: str) -> WorkError:
        return WorkError(
            f"training diverged at epoch {epoch}, step {step}: {what} is not finite; the learning rate is "
            f"likely too high (train.optimizer = {params.optimizer}, train.lr = {params.lr}): lower "
            f"train.lr or set train.grad_clip; "
            + (f"{paths.model} keeps epoch {kept}, the last good one" if kept else f"{paths.model} untouched")
        )

    tags = {"dataset": config["dataset"], "arch": params.arch}
    owner = tracking.process_tags()  # lets a later training tell if this process died (kill -9)
    tags |= owner
    if overrides := env_overrides():
        # Outside DVC the environment may override params.yaml: say so where the run is read.
        tags["vaeops.env_overrides"] = " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    if lead:
        clean_up_after_killed(params.experiment, paths)
    # Only rank 0 opens (or re-enters) the MLflow run; the other ranks train and write nothing.
    with loop.stop, _start_run(params, state, tags) if lead else nullcontext() as mlrun:
        run_id = mlrun.info.run_id if lead else ""
        if lead and state is None:
            mlflow.log_params(
                tracking.flatten({"train": params.model_dump(), "data": {"dataset": config["dataset"]}})
                | {"data.image_shape": "x".join(map(str, shape)), "data.train_images": len(train_u8)}
            )
            tracking.describe(run_id)  # the run page's summary; evaluate and export rewrite it
        elif lead:
            log(f"resuming MLflow run {run_id} after epoch {start} of {params.epochs}")
        client = mlflow.MlflowClient() if lead else None
        if lead:
            loop.stop.run_id = run_id  # a stop signal now ends this run KILLED
            if state is not None:  # the re-entered run belongs to this process now
                mlflow.set_tags(owner)

        for epoch in range(start + 1, params.epochs + 1):
            loop.stop.check()  # a signal during the last epoch's logging and checkpoint stops here
            t0 = time.perf_counter()
            try:
                with step_bar() as bar:
                    ep = train_epoch(loop, epoch, None if bar.disable or not lead else bar)
            except NonFinite as e:
                raise diverged(epoch, e.step, e.what) from None
            val_recon, val_kl = evaluate(loop.model, val_x, loop.autocast)
            if not math.isfinite(val_recon + val_kl):
                raise diverged(epoch, loop.steps, "the validation loss")
            row = {
                "epoch": epoch,
                "train_elbo": -(ep["recon"] + ep["kl"]),
                "train_recon": ep["recon"],
                "train_kl": ep["kl"],
                "val_elbo": -(val_recon + val_kl),
                "val_recon": val_recon,
                "val_kl": val_kl,
                "lr": ep["lr"],
                "images_per_s": ep["images_per_s"],
            }
            curve.append(row)
            if not lead:
                kept = epoch  # rank 0 saves it; should it fail, torchrun stops every rank
                continue

            # MLflow before the checkpoint: an interrupt in between replays this epoch and logs the
            # same values again, rather than leaving a hole in the curves.
            now = int(time.time() * 1000)
            metrics = [Metric(METRIC_NAMES[k], v, now, epoch) for k, v in row.items() if k != "epoch"]
            metrics += [Metric("train/loss", v, now, s) for s, v in zip(*ep["step_losses"], strict=True)]
            client.log_batch(run_id, metrics=metrics)
            samples, recons = figures(loop.model, z_fixed, shown)
            tracking.log_image(samples, f"samples/epoch_{epoch:03d}.png")
            tracking.log_image(recons, f"reconstructions/epoch_{epoch:03d}.png")

            seconds += time.perf_counter() - t0
            extra = {"optimizer": loop.opt.state_dict(), "params": params.model_dump(), "curve": curve}
            save_checkpoint(
                paths.model,
                checkpoint(loop.model, config, run_id=run_id, epoch=epoch, seconds=seconds, **extra),
            )
            # The run file follows the checkpoint, so the two always name the same run.
            tracking.write_run_file(paths.run_file, run_id, mlrun.info.experiment_id)
            kept = epoch
            write_curve(paths.curve, curve)
            log(
                f"epoch {epoch}/{params.epochs}  train -elbo {-row['train_elbo']:.2f} "
                f"(recon {ep['recon']:.2f}, kl {ep['kl']:.2f})  val -elbo {-row['val_elbo']:.2f}  "
                f"lr {ep['lr']:.2e}  {ep['images_per_s']:,.0f} img/s  {time.perf_counter() - t0:.1f} s"
            )

        if not lead:
            return {}
        write_curve(paths.curve, curve)
        tracking.write_run_file(paths.run_file, run_id, mlrun.info.experiment_id)
        save_png(paths.samples, figures(loop.model, z_fixed, shown)[0])
        last = curve[-1]
        summary = {
            "train": {k: last[f"train_{k}"] for k in ("elbo", "recon", "kl")},
            "val": {k: last[f"val_{k}"] for k in ("elbo", "recon", "kl")},
            "epochs": int(last["epoch"]),
            "seconds": round(seconds, 2),
        }
        mlflow.log_metric("train.seconds", seconds)  # one value: no chart among the curves
        write_json(paths.metrics, summary)
    return summary


def _unzip(pairs: list[tuple[int, Tensor]]) -> tuple[list[int], list[float]]:
    if not pairs:
        return [], []
    steps, values = zip(*pairs, strict=True)
    return list(steps), torch.stack(values).tolist()
