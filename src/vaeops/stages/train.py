"""train: fit the VAE on data/processed, checkpoint every epoch, log curves and grids to MLflow.

The parts live in vaeops.training: loop (an epoch, the validation pass), distributed (torchrun),
resume (when a checkpoint may be continued) and signals (stopping cleanly). This module runs them
in order; rank 0 alone writes the checkpoint, the DVC outputs and the MLflow run.
"""

import csv
import json
import math
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeops import tracking
from vaeops.config import TrainParams, env_overrides
from vaeops.device import resolve_device
from vaeops.errors import UsageError, WorkError
from vaeops.figures import grid, save_png
from vaeops.io import atomic_path, write_json
from vaeops.model.checkpoint import checkpoint, save_checkpoint
from vaeops.model.vae import VAE, model_config
from vaeops.progress import log, step_bar, work
from vaeops.stages.preprocess import load_split
from vaeops.training.distributed import launch as launch  # for cli.py: train.launch
from vaeops.training.distributed import process_group, rank_device, world
from vaeops.training.loop import NonFinite, evaluate, make_loop, resolve_precision, scale, train_epoch
from vaeops.training.resume import resume_state
from vaeops.training.signals import Interrupted as Interrupted  # for cli.py: train.Interrupted
from vaeops.training.signals import clean_up_after_killed

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
# Curve columns → MLflow metric names (DESIGN.md: train/elbo, val/kl, ... in nats per image).
METRIC_NAMES = {c: c.replace("_", "/", 1) for c in CURVE_COLUMNS[1:7]} | {
    "lr": "lr",
    "images_per_s": "images_per_s",
}
GRID = 8  # samples and reconstructions are 8×8 grids


@dataclass
class Paths:
    data: Path = Path("data/processed")
    model: Path = Path("models/vae.pt")
    run_file: Path = Path("models/run.json")
    metrics: Path = Path("reports/train.json")
    curve: Path = Path("reports/train_curve.csv")
    samples: Path = Path("reports/train_samples.png")

    def outputs(self) -> tuple[Path, ...]:
        return (self.model, self.run_file, self.metrics, self.curve, self.samples)


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


def run(params: TrainParams, paths: Paths) -> dict[str, Any]:
    """Train, checkpointing each epoch; returns (and writes to paths.metrics) the final train/val terms.

    Under torchrun, joins the process group for the run; ranks other than 0 write nothing, return {}."""
    previous = torch.get_num_threads()
    if params.threads:
        torch.set_num_threads(params.threads)
    try:
        with process_group(params.device):
            return _run(params, paths)
    finally:
        torch.set_num_threads(previous)  # the setting is process-wide: leave it as it was


def _run(params: TrainParams, paths: Paths) -> dict[str, Any]:
    import mlflow
    from mlflow.entities import Metric

    device = rank_device(resolve_device(params.device, "train.device"))
    rank, size = world()
    lead = rank == 0
    if params.compile and device.type != "cuda":
        log("train.compile applies on CUDA only; ignored on cpu")
    train_u8, val_u8, meta = load_data(paths.data)
    shape = tuple(int(d) for d in meta["image_shape"])
    config = model_config(params, shape, str(meta["dataset"]))
    check_model(params, shape)
    state = resume_state(params, paths.model, config, resolve_precision(params, device))
    if min(params.batch_size, len(train_u8)) % size:
        raise UsageError(
            f"train.batch_size = {params.batch_size} (global) does not split evenly over {size} processes; "
            f"use a multiple of {size}"
        )
    loop = make_loop(params, config, train_u8, device)
    if lead:
        log(f"training in {loop.precision} (train.precision = {params.precision}, on {device.type})")
    if state is not None:
        loop.model.load_state_dict(state["model"])
        loop.opt.load_state_dict(state["optimizer"])

    fixed = torch.Generator(device=device).manual_seed(params.seed)
    # Validation targets are drawn once, so the val curve compares epochs on the same binarized images.
    val_x = scale(val_u8.to(device), config["binarize"], fixed)
    z_fixed = torch.randn(GRID * GRID, params.latent_dim, generator=fixed, device=device)  # see figures
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
        clean_up_after_killed(params.experiment, paths.outputs())
    # Only rank 0 opens (or re-enters) the MLflow run; the other ranks train and write nothing.
    with loop.stop, _start_run(params, state, tags) if lead else nullcontext() as mlrun:
        run_id = mlrun.info.run_id if lead else ""
        if lead and state is None:
            mlflow.log_params(
                tracking.flatten({"train": params.model_dump(), "data": {"dataset": config["dataset"]}})
                | {"data.image_shape": "x".join(map(str, shape)), "data.train_images": len(train_u8)}
                | {"train.precision_used": loop.precision}
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
                with work("train"), step_bar() as bar:
                    ep = train_epoch(loop, epoch, None if bar.disable or not lead else bar)
                    val_recon, val_kl = evaluate(loop.model, val_x, loop.autocast)
            except NonFinite as e:
                raise diverged(epoch, e.step, e.what) from None
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
            extra["precision"] = loop.precision  # what train.precision meant here: resume checks it
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
            "precision": loop.precision,
        }
        mlflow.log_metric("train.seconds", seconds)  # one value: no chart among the curves
        write_json(paths.metrics, summary)
    return summary


def check_model(params: TrainParams, shape: tuple[int, ...]) -> None:
    """Refuse part choices the data cannot take, before any work."""
    if params.arch == "conv" and min(shape[1:]) < 2 ** len(params.channels):
        raise UsageError(
            f"train.arch = conv pools {len(params.channels)} times (train.channels = {params.channels}), "
            f"too often for {shape[1]}×{shape[2]} images; use fewer train.channels or arch resnet"
        )
    if params.binarize and params.likelihood != "bernoulli":
        log(
            f"train.binarize applies to the bernoulli likelihood; {params.likelihood} models the 8-bit pixels"
        )


def _start_run(params: TrainParams, state: dict[str, Any] | None, tags: dict[str, str]) -> Any:
    import mlflow

    experiment_id = tracking.setup(params.experiment)
    if state is None:
        parts = tuple(
            v for v, default in ((params.prior, "normal"), (params.likelihood, "bernoulli")) if v != default
        )
        name = tracking.run_name(params.arch, params.latent_dim, tags["dataset"], params.epochs, parts)
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tracking.run_tags(tags))
    tracking.require_run(state["run_id"])  # in this store, not deleted (else one line: how to restore)
    return mlflow.start_run(run_id=state["run_id"])


@torch.no_grad()
def figures(model: VAE, z: Tensor, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(8×8 samples, fixed val images in rows above their reconstructions). The samples decode z from
    the prior: N(0, I) is fixed noise; a learned prior maps the same noise through its components."""
    model.eval()
    mu_k, logvar_k = model.prior.components(model.encode)
    pick = torch.arange(len(z), device=z.device) % len(mu_k)
    samples = model.decode(mu_k[pick] + z * torch.exp(0.5 * logvar_k[pick])).float().cpu().numpy()
    mu, _ = model.encode(images)
    recon = model.decode(mu).float()
    model.train()
    # Interleave rows: 8 inputs, their 8 reconstructions, the next 8 inputs, ...
    rows = []
    for i in range(0, len(images), GRID):
        rows += [images[i : i + GRID], recon[i : i + GRID]]
    pairs = torch.cat(rows).cpu().numpy()
    return grid(samples, GRID), grid(pairs, GRID)


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)
