"""Evaluate-stage speed: the whole stage at the default k, and its IWAE against a naive loop, one run.

(a) the full `evaluate` stage (vaeops.stages.evaluate.run) on the real test split with the params in
    params.yaml (k = evaluate.iwae_samples over evaluate.iwae_images), broken down into the ELBO pass,
    the IWAE estimate, the figures, and the rest (MLflow logging, files);
(b) IWAE, same images and k, per-image time extrapolated to the whole test split:
    naive: the textbook way, one decoder call per importance sample (k calls over a batch of images,
           torch.distributions log-densities);
    chunked BCE: vaeops' first estimator, the same chunks of n x B latents per decoder call, but the
           targets expanded to n x B images and BCE-with-logits on them;
    vaeops: losses.iwae_log_px, the same chunks, log p(x|z) as x.l (einsum) - softplus(l) in place.

Weights do not change the speed: models/vae.pt is used when it matches --arch, else a fresh model.
MLflow logs go to a throw-away store.

    .venv/bin/python benchmarks/evaluate_speed.py [--arch mlp|conv] [--baseline-images 100]
"""

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from vaeops import models, tracking
from vaeops.config import load_params
from vaeops.stages import evaluate
from vaeops.stages.preprocess import load_split

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def naive_iwae(model: models.VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """One decoder call per importance sample; log-weights from torch.distributions."""
    from torch.distributions import Bernoulli, Normal

    mu, logvar = model.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    log_w = []
    for _ in range(k):
        z = q.sample()
        # validate_args=False: continuous targets in [0, 1], as the article trains on
        log_px_z = Bernoulli(logits=model.decode_logits(z), validate_args=False).log_prob(x).flatten(1).sum(1)
        log_w.append(log_px_z + prior.log_prob(z).sum(1) - q.log_prob(z).sum(1))
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


@torch.inference_mode()
def chunked_bce_iwae(model: models.VAE, x: torch.Tensor, k: int, max_decoded: int) -> torch.Tensor:
    """The estimator before the in-place rewrite: expanded targets, BCE, explicit Gaussian log-densities."""
    from vaeops.losses import recon_nll

    def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)

    out = []
    batch = max(1, min(len(x), max_decoded // k))
    chunk = max(1, max_decoded // batch)
    for xb in x.split(batch):
        mu, logvar = model.encode(xb)
        total = torch.full((len(xb),), -math.inf)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            z = mu + torch.randn(n, *mu.shape) * torch.exp(0.5 * logvar)
            logits = model.decode_logits(z.flatten(0, 1))
            target = xb.unsqueeze(0).expand(n, *xb.shape).flatten(0, 1)
            log_px_z = -recon_nll(logits, target).view(n, -1)
            zeros = torch.zeros_like(z)
            log_w = log_px_z + log_normal(z, zeros, zeros) - log_normal(z, mu, logvar)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
            done += n
        out.append(total - math.log(k))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mlp", "conv"], default="mlp")
    ap.add_argument("--baseline-images", type=int, default=100, help="test images for the IWAE comparison")
    args = ap.parse_args()

    p = load_params(ROOT / "params.yaml")
    train = p.train.model_copy(update={"arch": args.arch})
    data = ROOT / "data/processed"
    images, _ = load_split(data / "test.npz")
    ckpt = ROOT / "models/vae.pt"
    state = models.load_checkpoint(ckpt) if ckpt.is_file() else None
    if state and state["config"]["arch"] == args.arch:
        train = train.model_copy(update={k: state["config"][k] for k in ("latent_dim", "binarize")})
        model, source = models.model_from_checkpoint(state), str(ckpt.relative_to(ROOT))
    else:
        torch.manual_seed(0)
        shape = tuple(images.shape[1:])
        model, source = (
            models.build_model(args.arch, shape, train.latent_dim, train.hidden_dim).eval(),
            "untrained",
        )
    config = {
        "arch": args.arch,
        "latent_dim": model.latent_dim,
        "hidden_dim": train.hidden_dim,
        "image_shape": list(model.image_shape),
        "dataset": p.data.dataset,
        "binarize": train.binarize,
    }
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ["VAEOPS_PROJECT_ROOT"] = str(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        experiment_id = tracking.setup(train.experiment)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            pass
        models.save_checkpoint(tmp / "vae.pt", models.checkpoint(model, config, run_id=run.info.run_id))
        tracking.write_run_file(tmp / "run.json", run.info.run_id, experiment_id)

        start = time.perf_counter()
        result = evaluate.run(
            train, p.evaluate, data, tmp / "vae.pt", tmp / "run.json", tmp / "metrics.json", tmp / "figures"
        )
        total = time.perf_counter() - start

    t, tm = result["test"], result["timings"]
    k, n_iwae = t["iwae_k"], t["iwae_images"]
    print(f"\n(a) evaluate stage: {args.arch} z={model.latent_dim} ({source}), k={k} on {n_iwae} of")
    print(f"    {t['images']} test images, cpu, {threads} threads")
    print(f"{'part':<34}{'seconds':>10}")
    rows = [
        (f"ELBO pass ({t['images']} images)", tm["elbo"]),
        (f"IWAE ({n_iwae} images x k={k})", tm["iwae"]),
        ("figures", tm["figures"]),
        ("MLflow logging, files, loading", total - sum(tm.values())),
        ("total", total),
    ]
    for name, sec in rows:
        print(f"{name:<34}{sec:>10.1f}")

    x = torch.from_numpy(images[: args.baseline_images]).float() / 255
    if train.binarize:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    start = time.perf_counter()
    naive = naive_iwae(model, x, k)
    t_naive = time.perf_counter() - start
    start = time.perf_counter()
    chunked = chunked_bce_iwae(model, x, k, p.evaluate.iwae_batch)
    t_chunked = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluate.iwae(model, x, k, p.evaluate.iwae_batch, seed=0)
    t_ours = time.perf_counter() - start
    n, full = len(x), t["images"]
    print(f"\n(b) IWAE on {n} test images, k={k}, at most {p.evaluate.iwae_batch} decodes per call")
    print(
        f"{'method':<30}{'log p(x)':>10}{'seconds':>9}{'images/s':>10}{f'all {full}, est. s':>18}{'speed':>8}"
    )
    for name, est, sec in [
        ("naive: one decode per sample", naive, t_naive),
        ("chunked BCE", chunked, t_chunked),
        ("vaeops: chunked, in-place", ours, t_ours),
    ]:
        print(
            f"{name:<30}{est.mean():>10.2f}{sec:>9.1f}{n / sec:>10.1f}{sec / n * full:>18.0f}"
            f"{t_naive / sec:>7.1f}x"
        )


if __name__ == "__main__":
    main()
