"""Quality of the training recipe: test-set −ELBO (nats per image, single sample) after N epochs.

Trains with vaeops' own loop (vaeops.training.loop.make_loop / train_epoch, no MLflow) on the
processed MNIST split and evaluates the test split (in fp32) at the end of each run, for
(a) the pytorch/examples recipe — Adam, lr 1e-3 constant, batch 128 — and
(b) the defaults in params.yaml (or train.* overrides given as key=value).
A run of N epochs is a separate run for each N, since a schedule depends on the total.

    .venv/bin/python benchmarks/train_quality.py --epochs 10 50 [--arch mlp] [lr=0.003 ...]

With --precision it instead trains the params.yaml defaults in fp32 and in bf16, for each arch of
--archs and each N of --epochs, and prints bf16's change of the test ELBO: `train.precision: auto`
picks bf16 only for parts where it stays under 0.3 nats (BF16_PARTS in vaeops/training/loop.py).
Each --seeds value is a separate pair of runs, so the seed-to-seed spread of fp32 shows beside it.
--images N trains and tests on the first N images only (a quick check that it runs).

    .venv/bin/python benchmarks/train_quality.py --precision --archs mlp conv --epochs 10 50
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


def test_nelbo(
    params: TrainParams, data: Path, overrides: dict, epochs: int, images: int = 0
) -> tuple[float, float, float]:
    """(test −ELBO, val −ELBO, seconds) after training `epochs` epochs with these overrides; with
    `images`, on the first `images` train, val and test images only."""
    p = params.model_copy(update=overrides | {"epochs": epochs, "device": "cpu"})
    if p.threads:
        torch.set_num_threads(p.threads)
    train_u8, val_u8, _ = load_data(data)
    test_u8 = torch.from_numpy(load_split(data / "test.npz")[0])
    if images:
        train_u8, val_u8, test_u8 = train_u8[:images], val_u8[:images], test_u8[:images]
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


def precision_table(args: argparse.Namespace, params: TrainParams, overrides: dict) -> None:
    """fp32 against bf16, same seed and data, per arch, epochs and seed."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; params: {args.params}")
    print(f"uses: {params.model_copy(update=overrides).model_dump()}")
    print(
        "\n| arch | epochs | seed | test −ELBO fp32 | test −ELBO bf16 | bf16 − fp32 | train s fp32 / bf16 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for arch in args.archs:
        for epochs in args.epochs:
            for seed in args.seeds:
                run = overrides | {"arch": arch, "seed": seed}
                fp32, _, s32 = test_nelbo(params, args.data, run | {"precision": "fp32"}, epochs, args.images)
                bf16, _, s16 = test_nelbo(params, args.data, run | {"precision": "bf16"}, epochs, args.images)
                print(
                    f"| {arch} | {epochs} | {seed} | {fp32:.2f} | {bf16:.2f} | {bf16 - fp32:+.2f} | "
                    f"{s32:.0f} / {s16:.0f} |",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--data", type=Path, default=ROOT / "data/processed")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--skip-examples", action="store_true", help="only run (b)")
    ap.add_argument("--precision", action="store_true", help="fp32 against bf16 instead of the recipes")
    ap.add_argument("--archs", nargs="+", default=["mlp", "conv"], help="--precision: archs to compare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--precision: train.seed of each pair")
    ap.add_argument("--images", type=int, default=0, help="use only the first N images of each split")
    ap.add_argument("overrides", nargs="*", help="train.* overrides for (b), e.g. lr=0.003")
    args = ap.parse_args()

    params = load_params(args.params).train
    if args.precision:
        overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
        precision_table(args, params, overrides)
        return
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
            test, val, s = test_nelbo(params, args.data, overrides, epochs, args.images)
            a = overrides.get("arch", params.arch)
            print(f"| {name} | {a} | {epochs} | {test:.2f} | {val:.2f} | {s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
