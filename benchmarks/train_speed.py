"""Training speed: the pytorch/examples VAE loop vs vaeops' loop, same data, same machine, one run.

(a) baseline: pytorch/examples vae/main.py — torchvision MNIST + ToTensor through a DataLoader
    (batch 128, shuffle), sigmoid decoder output, BCE summed, loss.item() every step.
(b) ours: vaeops.training.loop.train_epoch — the split as one uint8 tensor, seeded permutation,
    whole-batch scaling (and dynamic binarization, the default), BCE-with-logits, sums kept on the
    device; train.precision fp32.
(c) with --bf16: (b) with train.precision bf16 (pays off on CPUs with AVX512-BF16 or AMX).
Denormals are flushed to zero for all three, as vaeops' loop does: a thread keeps the mode it was
started with, so it is set before the baseline starts torch's threads.

Both train the same models (vaeops' mlp / conv archs, Bernoulli likelihood, N(0, I) prior) with Adam
at batch 128 on the processed train split; --parts switches (b) and (c) to other parts, e.g.
`--parts likelihood=logistic,prior=vamp,objective=iwae`, to see what a part costs. Each is warmed
up on a few batches, then the loops are timed alternately, whole epochs each (conv over a subset: a
full conv epoch takes minutes on 2 cores); the table shows each loop's best epoch, the least
disturbed by other work on a shared machine, and lists every epoch.

    .venv/bin/python benchmarks/train_speed.py [--epochs 3] [--conv-images 10000] [--parts k=v,...]
"""

import argparse
import gzip
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from vaeops.config import TrainParams
from vaeops.model.vae import build_model, model_config
from vaeops.stages.preprocess import load_split
from vaeops.training.loop import make_loop, train_epoch

ROOT = Path(__file__).resolve().parents[1]


def torchvision_mnist(images: torch.Tensor, labels: torch.Tensor, raw_dir: Path, tmp: Path):
    """A real torchvision.datasets.MNIST (PIL image + ToTensor per sample) holding our train split."""
    from torchvision import datasets, transforms

    folder = tmp / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for gz in raw_dir.glob("*.gz"):
        with gzip.open(gz) as src, open(folder / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ds = datasets.MNIST(str(tmp), train=True, download=False, transform=transforms.ToTensor())
    ds.data, ds.targets = images[:, 0].clone(), labels.clone()  # same images as (b)
    return ds


def baseline_epoch(model, opt, loader) -> int:
    """pytorch/examples vae/main.py `train(epoch)`, minus the printing."""
    model.train()
    train_loss, seen = 0.0, 0
    for data, _ in loader:
        opt.zero_grad()
        out, mu, logvar, _ = model(data, torch.randn(1, len(data), model.latent_dim))
        recon = torch.sigmoid(out[0])
        bce = F.binary_cross_entropy(recon.flatten(1), data.flatten(1), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = bce + kld
        loss.backward()
        train_loss += loss.item()
        opt.step()
        seen += len(data)
    return seen


def baseline(arch: str, ds) -> Callable[[], int]:
    """A warmed-up pytorch/examples model + optimizer; the returned function trains one epoch."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_model(model_config(TrainParams(arch=arch), (1, 28, 28), "mnist"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    baseline_epoch(model, opt, DataLoader(torch.utils.data.Subset(ds, range(128 * 5)), batch_size=128))
    loader = DataLoader(ds, batch_size=128, shuffle=True)
    return lambda: baseline_epoch(model, opt, loader)


def ours(
    arch: str, images: torch.Tensor, epochs: int, precision: str, parts: dict[str, str] | None = None
) -> Callable[[], int]:
    """vaeops' loop with the default params (and `parts`) in `precision`, warmed up; the returned
    function trains one epoch."""
    params = TrainParams(arch=arch, epochs=epochs + 1, device="cpu", precision=precision, **(parts or {}))
    config = model_config(params, tuple(images.shape[1:]), "mnist")
    loop = make_loop(params, config, images[: 128 * 5], torch.device("cpu"))
    train_epoch(loop, 1)  # warm-up on a few batches, like the baseline
    loop.data = images
    loop.__post_init__()
    epoch = iter(range(2, epochs + 2))

    def one() -> int:
        train_epoch(loop, next(epoch))
        return loop.steps * loop.batch

    return one


def timed(epoch: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    seen = epoch()
    return time.perf_counter() - t0, seen


NAMES = {
    "a": "(a) pytorch/examples DataLoader+ToTensor",
    "b": "(b) vaeops in-memory, fp32",
    "c": "(c) vaeops in-memory, bf16",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data/processed/train.npz")
    ap.add_argument("--raw", type=Path, default=ROOT.parent / "shared/datasets/mnist")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per arch and loop")
    ap.add_argument("--conv-images", type=int, default=10000, help="conv epochs use this many images")
    ap.add_argument("--archs", default="mlp,conv")
    ap.add_argument("--bf16", action="store_true", help="add (c): ours with train.precision bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for both loops (0 = default)")
    ap.add_argument("--parts", default="", help="train params for (b) and (c), e.g. prior=vamp,iwae_k=5")
    args = ap.parse_args()
    parts = dict(item.split("=", 1) for item in args.parts.split(",") if item)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    x, y = load_split(args.data)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(images)} train images")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            n = len(images) if arch == "mlp" else min(args.conv_images, len(images))
            ds = torchvision_mnist(images[:n], labels[:n], args.raw, Path(tmp) / arch)
            loops = {"a": baseline(arch, ds), "b": ours(arch, images[:n], args.epochs, "fp32", parts)}
            if args.bf16:
                loops["c"] = ours(arch, images[:n], args.epochs, "bf16", parts)
            # Alternate the loops epoch by epoch, so a burst of load elsewhere on a shared machine hits
            # each of them; the best epoch of each is its least disturbed measurement.
            times: dict[str, list[tuple[float, int]]] = {k: [] for k in loops}
            for _ in range(args.epochs):
                for k, epoch in loops.items():
                    times[k].append(timed(epoch))
            rows.append((arch, n, times))

    print("\n| arch | images/epoch | loop | best s/epoch | images/s | speed-up | all epochs (s) |")
    print("|---|---:|---|---:|---:|---:|---|")
    for arch, n, times in rows:
        base = min(times["a"])[0]
        for k, runs in times.items():
            t, seen = min(runs)
            every = [round(s, 2) for s, _ in runs]
            print(f"| {arch} | {n} | {NAMES[k]} | {t:.2f} | {seen / t:,.0f} | {base / t:.2f}x | {every} |")


if __name__ == "__main__":
    main()
