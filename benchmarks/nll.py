"""Literature-grade NLL: IWAE log p(x) on dynamically binarized MNIST, beside published numbers.

Each row trains a model with vaeops' own loop (vaeops.training.loop, no MLflow, no DVC) on all
60 000 MNIST training images, binarized afresh every epoch, then scores all 10 000 test images
(binarized once with a fixed seed) with the importance-weighted bound (Burda et al. 2015), k
samples per image. Rows are named in ROWS, each with its epochs and k; pick some with --rows:

    .venv/bin/python benchmarks/nll.py --rows mlp-normal mlp-vamp conv-normal [--epochs 50] [--k 1000]

The MNIST files come from VAEOPS_DATA_MIRROR, else data/raw/mnist (what `vaeops download` wrote).
Run it alone on the machine: the wall times are part of the table.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vaeops.config import TrainParams
from vaeops.datasets import check_raw, get_spec, payload, read_split
from vaeops.evaluation.iwae import iwae_log_px
from vaeops.model.vae import model_config
from vaeops.training.loop import evaluate, make_loop, scale, train_epoch

ROOT = Path(__file__).resolve().parents[1]
# Each row: (train.* params on top of the defaults, which binarize; epochs; IWAE k). conv's decoder
# costs far more per sample than the mlp's, so its rows score with fewer importance samples.
ROWS: dict[str, tuple[dict, int, int]] = {
    "mlp-normal": ({}, 50, 1000),
    "mlp-vamp": ({"prior": "vamp"}, 50, 1000),
    "mlp-normal-iwae5": ({"objective": "iwae", "iwae_k": 5}, 50, 1000),
    "mlp2-vamp": ({"hidden_layers": 2, "hidden_dim": 512, "latent_dim": 32, "prior": "vamp"}, 50, 1000),
    # Burda et al.'s shape (two hidden layers, z=50), trained on the bound it is scored with.
    "mlp2-normal-iwae5": (
        {"hidden_layers": 2, "hidden_dim": 512, "latent_dim": 50, "objective": "iwae", "iwae_k": 5},
        100,
        1000,
    ),
    "mlp2-normal": ({"hidden_layers": 2, "hidden_dim": 512, "latent_dim": 50}, 100, 1000),
    "conv-normal": ({"arch": "conv", "latent_dim": 32}, 10, 100),
    # Each step encodes every pseudo-input too: with conv, 50 keep a step within ~1.5× the normal prior's.
    "conv-vamp": ({"arch": "conv", "latent_dim": 32, "prior": "vamp", "prior_components": 50}, 10, 100),
    "resnet-vamp": ({"arch": "resnet", "channels": [32, 64], "latent_dim": 32, "prior": "vamp"}, 10, 100),
}
# Published IWAE log p(x) (nats) on binarized MNIST; static binarization where marked.
LITERATURE = [
    ("VAE, 1 stochastic layer (Burda et al. 2015, k=5000)", -86.76),
    ("IWAE k=50, 2 stochastic layers (Burda et al. 2015)", -84.78),
    ("VAE + VampPrior (Tomczak & Welling 2018, static)", -85.57),
    ("conv HVAE + VampPrior (Tomczak & Welling 2018, static)", -81.09),
    ("ResNet ladder VAE (≈, e.g. BIVA/IAF era)", -78.3),
]


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 images, from data/raw/mnist or the VAEOPS_DATA_MIRROR folder, verified."""
    spec = get_spec("mnist")
    folder = ROOT / "data/raw/mnist"
    if not folder.is_dir() and (mirror := os.environ.get("VAEOPS_DATA_MIRROR")):
        folder = Path("/tmp/vaeops-nll-mnist")
        folder.mkdir(exist_ok=True)
        for name in spec.sha256:
            source = Path(mirror) / f"{name}.gz"
            (folder / name).write_bytes(payload(source.read_bytes() if source.exists() else b""))
    check_raw(folder, spec)
    train, _ = read_split(folder, spec, "train")
    test, _ = read_split(folder, spec, "test")
    return torch.from_numpy(train), torch.from_numpy(test)


def run_row(
    name: str, epochs: int | None, k: int | None, images: int, train_u8: torch.Tensor, test_u8: torch.Tensor
) -> dict:
    overrides, default_epochs, default_k = ROWS[name]
    epochs, k = epochs or default_epochs, k or default_k
    # fp32 unless a row asks otherwise: the published rows and ours so far were trained in fp32.
    p = TrainParams(**{"precision": "fp32", **overrides}, epochs=epochs, device="cpu", log_every_steps=10**6)
    config = model_config(p, tuple(train_u8.shape[1:]), "mnist")
    loop = make_loop(p, config, train_u8, torch.device("cpu"))
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        ep = train_epoch(loop, epoch)
        print(
            f"  {name} epoch {epoch}/{epochs}: -elbo {ep['recon'] + ep['kl']:.2f}  {ep['seconds']:.1f} s",
            flush=True,
        )
    train_s = time.perf_counter() - t0
    model = loop.model.eval()
    x = scale(test_u8[:images], True, torch.Generator().manual_seed(0))
    recon, kl = evaluate(model, x, torch.autocast("cpu", enabled=False))
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        log_px = torch.cat(
            [iwae_log_px(model, x[i : i + 100], k, chunk=100, generator=gen) for i in range(0, len(x), 100)]
        )
    return {
        "row": name,
        "params": overrides,
        "epochs": epochs,
        "train_s": round(train_s, 1),
        "iwae_s": round(time.perf_counter() - t0, 1),
        "k": k,
        "images": len(x),
        "elbo": round(-(recon + kl), 2),
        "log_px_iwae": round(log_px.mean().item(), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ["mlp-normal", "mlp-vamp", "mlp-normal-iwae5", "conv-normal", "conv-vamp"]
    ap.add_argument("--rows", nargs="+", default=default, choices=list(ROWS))
    ap.add_argument("--epochs", type=int, default=None, help="for every row (default: the row's own)")
    ap.add_argument(
        "--k", type=int, default=None, help="importance samples per test image (default: the row's)"
    )
    ap.add_argument("--images", type=int, default=10_000, help="test images scored (10 000 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_u8, test_u8 = mnist()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    results = []
    for name in args.rows:
        results.append(run_row(name, args.epochs, args.k, args.images, train_u8, test_u8))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nbinarized MNIST, IWAE log p(x) in nats (higher is better); machine: {machine}\n")
    print("| model | epochs | train s | IWAE s | k × images | test ELBO | IWAE log p(x) |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in results:
        print(
            f"| vaeops {r['row']} | {r['epochs']} | {r['train_s']} | {r['iwae_s']} "
            f"| {r['k']} × {r['images']} | {r['elbo']:.2f} | **{r['log_px_iwae']:.2f}** |"
        )
    for what, value in LITERATURE:
        print(f"| {what} | | | | | | {value:.2f} |")


if __name__ == "__main__":
    main()
