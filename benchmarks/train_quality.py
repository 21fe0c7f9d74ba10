"""Quality of the training recipe: test-set −ELBO (nats per image, single sample) after N epochs.

Trains with vaeops' own loop (vaeops.training.loop.make_loop / train_epoch, no MLflow) on the
processed MNIST split and evaluates the test split at the end of each run, for
(a) the pytorch/examples recipe — Adam, lr 1e-3 constant, batch 128 — and
(b) the defaults in params.yaml (or train.* overrides given as key=value).
A run of N epochs is a separate run for each N, since a schedule depends on the total.

    .venv/bin/python benchmarks/train_quality.py --epochs 10 50 [--arch mlp] [lr=0.003 ...]
"""

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from vaeops.config import TrainParams, load_params
from vaeops.model.vae import model_config
from vaeops.stages.preprocess import load_split
from vaeops.stages.train import load_data
from vaeops.training.loop import evaluate, make_loop, scale, train_epoch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "none", "lr_warmup_steps": 0}
EXAMPLES |= {"kl_warmup_epochs": 0, "beta": 1.0, "batch_size": 128, "hidden_dim": 400, "latent_dim": 20}


def test_nelbo(params: TrainParams, data: Path, overrides: dict, epochs: int) -> tuple[float, float, float]:
    """(test −ELBO, val −ELBO, seconds) after training `epochs` epochs with these overrides."""
    p = params.model_copy(update=overrides | {"epochs": epochs, "device": "cpu"})
    if p.threads:
        torch.set_num_threads(p.threads)
    train_u8, val_u8, _ = load_data(data)
    test_u8 = torch.from_numpy(load_split(data / "test.npz")[0])
    config = model_config(p, tuple(train_u8.shape[1:]), "mnist")
    loop = make_loop(p, config, train_u8, torch.device("cpu"))
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_epoch(loop, epoch)
    seconds = time.perf_counter() - t0
    torch.manual_seed(12345)  # the same reparameterization noise for every evaluated model
    out = []
    for x in (test_u8, val_u8):
        gen = torch.Generator().manual_seed(0)  # binarized once, the same for every model
        recon, kl = evaluate(loop.model, scale(x, config["binarize"], gen), nullcontext())
        out.append(recon + kl)
    return out[0], out[1], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--data", type=Path, default=ROOT / "data/processed")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--skip-examples", action="store_true", help="only run (b)")
    ap.add_argument("overrides", nargs="*", help="train.* overrides for (b), e.g. lr=0.003")
    args = ap.parse_args()

    params = load_params(args.params).train
    if params.binarize:
        raise SystemExit("the targets are for continuous MNIST: set train.binarize = false")
    ours = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    arch = {"arch": args.arch} if args.arch else {}
    # Settings that change speed, not the recipe, apply to both.
    arch |= {k: ours.pop(k) for k in ("threads",) if k in ours}
    recipes = [] if args.skip_examples else [("(a) pytorch/examples: adam 1e-3 constant", EXAMPLES | arch)]
    recipes.append(("(b) vaeops " + (" ".join(args.overrides) or "defaults"), ours | arch))
    threads = arch.get("threads") or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; params: {args.params}")
    print(f"(b) uses: {params.model_copy(update=ours | arch).model_dump()}")
    print("\n| recipe | arch | epochs | test −ELBO | val −ELBO | train s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, overrides in recipes:
        for epochs in args.epochs:
            test, val, s = test_nelbo(params, args.data, overrides, epochs)
            a = overrides.get("arch", params.arch)
            print(f"| {name} | {a} | {epochs} | {test:.2f} | {val:.2f} | {s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
