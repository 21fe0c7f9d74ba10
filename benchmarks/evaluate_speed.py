"""Evaluate-stage speed: the whole stage at the default settings, and its IWAE against the previous
implementation and a naive loop, one run.

(a) the full `evaluate` stage (vaeops.stages.evaluate.run) on the real test split with the params in
    params.yaml (k = evaluate.iwae_samples over evaluate.iwae_images, 0 = all), broken down into the
    ELBO pass, the IWAE estimate, the figures, and the rest (MLflow logging, files);
(b) IWAE, k = evaluate.iwae_samples over --images test images (default all), binarized as evaluate
    does, each method with the same seeded noise where it draws the same way:
    naive: the textbook way, one decoder call per importance sample (k calls over a batch of images),
           log q(z|x) from torch.distributions; timed on --naive-images and extrapolated;
    previous: vaeops before the IWAE was batched for the CPU (kept below as `previous_iwae`): chunks
           of n x B latents per decoder call, the likelihood broadcasting over the samples;
    vaeops fp32 / bf16: evaluate.iwae now (decoded a cache-sized step at a time; the Bernoulli on an
           mlp without passes over x·l), with an fp32 and, where the hardware has it, a bf16 decoder.
    The mean log p(x) of each is printed with its difference from `previous`, in nats.

Weights do not change the speed: --checkpoint (models/vae.pt) is used when it matches --arch, else a
fresh model of the parts params.yaml names (the differences in nats mean most for a trained model).
MLflow logs go to a throw-away store. (b) needs a likelihood that is normalized on the test pixels
(evaluate computes no IWAE otherwise). Run it alone on the machine: the times are the point.

    .venv/bin/python benchmarks/evaluate_speed.py [--arch mlp|conv|resnet] [--checkpoint models/vae.pt]
        [--images 0] [--naive-images 100]
"""

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from vaeops import tracking
from vaeops.config import load_params
from vaeops.device import native_bf16
from vaeops.model.checkpoint import checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from vaeops.model.vae import VAE, build_model, model_config
from vaeops.stages import evaluate
from vaeops.stages.preprocess import load_split

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def naive_iwae(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """One decoder call per importance sample; log q(z|x) from torch.distributions."""
    from torch.distributions import Normal

    mu, logvar = model.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    log_w = []
    for _ in range(k):
        z = q.sample()
        log_px_z = -model.likelihood.nll(model.decoder(z), x)
        log_w.append(log_px_z + model.prior.log_prob(z, model.encode) - q.log_prob(z).sum(1))
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


@torch.inference_mode()
def previous_iwae(model: VAE, x: torch.Tensor, k: int, max_decoded: int, seed: int) -> torch.Tensor:
    """evaluate.iwae and evaluation.iwae.iwae_log_px as they were before this benchmark's change:
    all B × chunk samples of a chunk decoded at once, `model.terms` on them. Same noise as now."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    batch = max(1, min(len(x), max_decoded // k))
    chunk = max(1, max_decoded // batch)
    out = []
    for xb in x.split(batch):
        mu, logvar = model.encode(xb)
        total = torch.full((xb.shape[0],), -math.inf, dtype=torch.float32, device=x.device)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            eps = torch.randn(n, *mu.shape, generator=gen, dtype=mu.dtype, device=x.device)
            z = mu + eps * torch.exp(0.5 * logvar)
            dec = model.decoder(z.flatten(0, 1))
            recon, kl = model.terms(
                xb, dec.view(n, *xb.shape[:1], *dec.shape[1:]), mu, logvar, z, analytic_kl=False
            )
            total = torch.logaddexp(total, torch.logsumexp(-(recon + kl), dim=0))
            done += n
        out.append(total - math.log(k))
    return torch.cat(out)


def timed(fn, *args, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mlp", "conv", "resnet"], default="mlp")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/vae.pt")
    ap.add_argument("--images", type=int, default=0, help="test images for the IWAE comparison (0 = all)")
    ap.add_argument("--naive-images", type=int, default=100, help="test images for the naive loop")
    args = ap.parse_args()

    p = load_params(ROOT / "params.yaml")
    train = p.train.model_copy(update={"arch": args.arch})
    data = ROOT / "data/processed"
    images, _ = load_split(data / "test.npz")
    meta = json.loads((data / "meta.json").read_text())
    ckpt = args.checkpoint.resolve()
    state = load_checkpoint(ckpt) if ckpt.is_file() else None
    if state and state["config"]["arch"] == args.arch:
        config = state["config"]
        train = train.model_copy(update={k: v for k, v in config.items() if k in type(train).model_fields})
        model, source = model_from_checkpoint(state), str(ckpt)
    else:
        torch.manual_seed(0)
        config = model_config(train, meta["image_shape"], meta["dataset"])
        model, source = build_model(config).eval(), "untrained"
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ["VAEOPS_PROJECT_ROOT"] = str(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        experiment_id = tracking.setup(train.experiment)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            pass
        save_checkpoint(tmp / "vae.pt", checkpoint(model, config, run_id=run.info.run_id))
        tracking.write_run_file(tmp / "run.json", run.info.run_id, experiment_id)

        start = time.perf_counter()
        result = evaluate.run(
            train, p.evaluate, data, tmp / "vae.pt", tmp / "run.json", tmp / "metrics.json", tmp / "figures"
        )
        total = time.perf_counter() - start

    t, tm = result["test"], result["timings"]
    parts = f"{config['likelihood']} likelihood, {config['prior']} prior"
    print(
        f"\n(a) evaluate stage: {args.arch} z={model.latent_dim}, {parts} ({source}), cpu, {threads} threads"
    )
    print(f"{'part':<40}{'seconds':>10}")
    rows = [(f"score pass ({t['images']} images)", tm.get("elbo", tm.get("loss", 0.0)))]
    if "iwae" in tm:
        rows.append(
            (f"IWAE ({t['iwae_images']} images x k={t['iwae_k']}, {t['iwae_precision']})", tm["iwae"])
        )
    rows += [
        ("figures", tm["figures"]),
        ("MLflow logging, files, loading", total - sum(tm.values())),
        ("total", total),
    ]
    for name, sec in rows:
        print(f"{name:<40}{sec:>10.1f}")
    if "iwae" not in tm:
        print("\n(b) skipped: the likelihood is not normalized on these pixels, so evaluate computes no IWAE")
        return

    k, batch, seed = t["iwae_k"], p.evaluate.iwae_batch, p.evaluate.seed + evaluate.SEED_IWAE
    device = torch.device("cpu")
    x = torch.from_numpy(images).float() / 255
    if config["binarize"]:  # as evaluate binarizes the test set
        gen = torch.Generator().manual_seed(p.evaluate.seed + evaluate.SEED_BINARIZE)
        x = (torch.rand(x.shape, generator=gen) < x).float()
    x = x[: args.images or len(x)]
    model = model.to(memory_format=torch.channels_last)
    n, naive_n = len(x), min(args.naive_images, len(x))
    torch.manual_seed(0)
    naive, t_naive = timed(naive_iwae, model, x[:naive_n], k)
    methods = [
        (f"naive: one decode per sample (est. from {naive_n})", naive, t_naive * n / naive_n),
        ("previous vaeops: all chunk samples at once", *timed(previous_iwae, model, x, k, batch, seed)),
        ("vaeops fp32", *timed(evaluate.iwae, model, x, k, batch, seed)),
    ]
    if native_bf16(device):
        methods.append(("vaeops bf16 decoder", *timed(evaluate.iwae, model, x, k, batch, seed, bf16=True)))
    previous, t_previous = methods[1][1], methods[1][2]
    print(f"\n(b) IWAE on {n} test images, k={k}, at most {batch} samples drawn at once, cpu")
    print(f"{'method':<46}{'log p(x)':>10}{'vs previous':>13}{'seconds':>9}{'speed-up':>10}")
    for name, est, sec in methods:
        diff = "" if est is naive else f"{(est.mean() - previous.mean()).item():+.4f}"
        print(f"{name:<46}{est.mean():>10.3f}{diff:>13}{sec:>9.1f}{t_previous / sec:>9.1f}x")
    print("(the naive row scores fewer images: its log p(x) is of those, with other noise)")


if __name__ == "__main__":
    main()
