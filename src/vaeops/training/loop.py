"""The training loop: one epoch of steps, the per-epoch validation pass, the schedules.

It is pytorch/examples vae/main.py without the DataLoader: the split lives in memory as one uint8
tensor, every epoch draws a seeded permutation and slices batches, and scaling (or dynamic
binarization) happens on whole batches; `train.precision` picks fp32 or bf16 (`resolve_precision`).
Everything random in epoch e (permutation, binarization, the reparameterization noise) is seeded
from (seed, e), and the learning rate is a pure function of the global step, so the epoch-e
checkpoint (weights + optimizer state) is all a resumed run needs to replay exactly what an
uninterrupted run would have done.

Under torchrun (WORLD_SIZE > 1) every rank draws the same permutation, binarization and noise for
the global batch of train.batch_size and trains on its own rows of it; DistributedDataParallel
averages the gradients, so N processes follow the trajectory of one (up to float reduction order).
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vaeops.config import TrainParams
from vaeops.device import native_bf16
from vaeops.model.vae import VAE, build_model, objective
from vaeops.training.adam import FusedAdam
from vaeops.training.distributed import all_sum, world
from vaeops.training.signals import StopFlag

VAL_BATCH = 1000
# Where `auto` trains in bf16, per device type (with native bf16). A part belongs here when bf16 keeps
# its test ELBO within 0.3 nats of fp32 after 10 and after 50 epochs (benchmarks/train_quality.py
# --precision) and, on CPU, trains faster (benchmarks/train_speed.py --bf16): the mlp's batch-128
# GEMMs there win back less than autocast's casts cost. Other parts train in fp32.
BF16_PARTS = {
    "cuda": {"arch": {"mlp", "conv"}, "likelihood": {"bernoulli"}},
    "cpu": {"arch": {"conv"}, "likelihood": {"bernoulli"}},
}


@dataclass
class Loop:
    """Everything one epoch of training needs (`run` builds it; so does benchmarks/train_speed.py)."""

    params: TrainParams
    model: VAE
    opt: Any  # FusedAdam or torch.optim.SGD
    data: Tensor  # uint8 N×C×H×W, on the training device
    forward: Any = None  # the model, or its torch.compile'd wrapper
    binarize: bool = False  # the model config's: binarization is for a Bernoulli only
    precision: str = "fp32"  # what train.precision resolved to: fp32 or bf16
    autocast: Any = field(default_factory=nullcontext)
    stop: StopFlag = field(default_factory=StopFlag)

    def __post_init__(self) -> None:
        self.forward = self.model if self.forward is None else self.forward
        # Whole batches only: each epoch's permutation differs, so every image is still visited, and
        # no trailing batch of one reaches BatchNorm (which cannot train on it).
        self.batch = min(self.params.batch_size, len(self.data))
        self.steps = max(1, len(self.data) // self.batch)


def resolve_precision(params: TrainParams, device: torch.device) -> str:
    """fp32 or bf16: what train.precision means on `device`. auto is bf16 where the hardware computes in
    bf16 natively (see vaeops.device.native_bf16) and every part is in BF16_PARTS for its type."""
    if params.precision != "auto":
        return params.precision
    parts = BF16_PARTS[device.type]
    proven = all(getattr(params, key) in names for key, names in parts.items())
    return "bf16" if proven and native_bf16(device) else "fp32"


def make_loop(params: TrainParams, config: dict[str, Any], data: Tensor, device: torch.device) -> Loop:
    """config: the model config (`model_config`), which the checkpoint stores too."""
    cuda = device.type == "cuda"
    precision = resolve_precision(params, device)
    # Denormal floats flushed to zero, for the rest of the process. A decoder's saturated logits (say,
    # always-black pixels) make gradients and Adam moments below float32's normal range, where CPU
    # arithmetic runs up to a hundred times slower; at zero they change nothing a loss can show. A
    # thread keeps the mode it was started with, so this comes before torch starts its CPU threads.
    torch.set_flush_denormal(True)
    torch.manual_seed(params.seed)
    model = build_model(config).to(device)
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
        binarize=config["binarize"],
        precision=precision,
        # GEMMs and convolutions in bfloat16 with fp32 accumulation; the loss stays fp32 (VAE.terms).
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext(),
    )


def make_optimizer(params: TrainParams, model: torch.nn.Module) -> Any:
    # fused: one kernel for all parameters instead of ~10 elementwise passes over each. Adam, the
    # default, skips torch.optim, whose import of torch._dynamo would slow every training start.
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            fused=True,
        )
    return FusedAdam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


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
    """uint8 batch → float targets in [0, 1], or a fresh Bernoulli draw of them (dynamic binarization):
    pixel v is 1 with probability v/255, exactly for 0 and 255 and within 2^-16 between."""
    if not binarize:
        return x.float().div_(255)
    # A uniform 16-bit u per pixel, from full-range 64-bit draws (torch.bernoulli and torch.rand draw
    # 32 bits per value, one at a time); u < v·65536/255 has probability ceil(v·65536/255)/65536.
    n = (x.numel() + 3) // 4
    bits = torch.empty(n, dtype=torch.int64, device=x.device).random_(-(2**63), None, generator=gen)
    u = bits.view(torch.int16)[: x.numel()].view(x.shape).int().add_(2**15)  # int16 → [0, 65536)
    return (u.mul_(255) < x.int().mul_(65536)).float()


class NonFinite(Exception):
    """Raised inside an epoch; `run` turns it into a WorkError naming the checkpoint it kept."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


def train_epoch(loop: Loop, epoch: int, bar: Any = None) -> dict[str, Any]:
    """One pass over a seeded permutation of the data; returns mean recon and KL per image, and more."""
    p, model, opt, bs = loop.params, loop.model, loop.opt, loop.batch
    device = loop.data.device
    rank, size = world()
    mine = slice(rank * bs // size, (rank + 1) * bs // size)  # this rank's rows of each global batch
    total_steps, kl_warmup_steps = loop.steps * p.epochs, loop.steps * p.kl_warmup_epochs
    k = p.iwae_k if p.objective == "iwae" else 1  # samples of z per image
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
        x = scale(loop.data.index_select(0, perm[i * bs : (i + 1) * bs]), loop.binarize, gen)[mine]
        eps = torch.randn(k, bs, p.latent_dim, device=device)[:, mine]
        with loop.autocast:
            out, mu, logvar, z = loop.forward(x, eps)
        recon, kl = loop.model.terms(x, out, mu, logvar, z, analytic_kl=p.objective == "elbo")
        # Mean over the batch of the per-image loss, so the learning rate does not scale with batch size
        # (DDP averages the ranks' gradients of their equal shares: the global batch's mean). "sum" is
        # that mean times the global batch, on every rank alike: the article's batch sum.
        loss = objective(recon, kl, p.objective, beta_at(step, kl_warmup_steps, p.beta)).mean()
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
        sums += torch.stack((recon.detach(), kl.detach())).sum((1, 2))
        if logged:
            step_losses.append((step + 1, loss_all))
        if task is not None and i % 20 == 0:
            ips = (i + 1) * bs / (time.perf_counter() - t0)
            bar.update(task, completed=i + 1, info=f"loss {loss.item():.2f}  {ips:,.0f} img/s")
    recon_mean, kl_mean = (all_sum(sums) / (loop.steps * bs * k)).tolist()
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


@torch.no_grad()
def evaluate(model: VAE, x: Tensor, autocast: Any) -> tuple[float, float]:
    """Mean (recon, kl) per image over x (already scaled), single-sample, in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), VAL_BATCH):
        xb = x[i : i + VAL_BATCH]
        eps = torch.randn(1, len(xb), model.latent_dim, device=x.device)
        with autocast:
            out, mu, logvar, z = model(xb, eps)
        recon, kl = model.terms(xb, out, mu, logvar, z)
        sums += torch.stack([recon.sum(), kl.sum()]).double()
    model.train(was_training)
    recon, kl = (sums / len(x)).tolist()
    return recon, kl


def _unzip(pairs: list[tuple[int, Tensor]]) -> tuple[list[int], list[float]]:
    if not pairs:
        return [], []
    steps, values = zip(*pairs, strict=True)
    return list(steps), torch.stack(values).tolist()
