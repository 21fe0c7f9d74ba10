"""Evaluate-stage speed: the whole stage at the default k, and its IWAE against a naive loop, one run.

(a) the full `evaluate` stage (vaeops.stages.evaluate.run) on the real test split with the params in
    params.yaml (k = evaluate.iwae_samples over evaluate.iwae_images), broken down into the ELBO pass,
    the IWAE estimate, the figures, and the rest (MLflow logging, files);
(b) IWAE, same images and k, per-image time extrapolated to the whole test split:
    naive: the textbook way, one decoder call per importance sample (k calls over a batch of images),
           log q(z|x) from torch.distributions;
    vaeops: evaluate.iwae, chunks of n x B latents per decoder call, the likelihood broadcasting
           over the samples.

Weights do not change the speed: models/vae.pt is used when it matches --arch, else a fresh model of
the parts params.yaml names. MLflow logs go to a throw-away store. (b) needs a likelihood that is
normalized on the test pixels (evaluate computes no IWAE otherwise).

    .venv/bin/python benchmarks/evaluate_speed.py [--arch mlp|conv|resnet] [--baseline-images 100]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["mlp", "conv", "resnet"], default="mlp")
    ap.add_argument("--baseline-images", type=int, default=100, help="test images for the IWAE comparison")
    args = ap.parse_args()

    p = load_params(ROOT / "params.yaml")
    train = p.train.model_copy(update={"arch": args.arch})
    data = ROOT / "data/processed"
    images, _ = load_split(data / "test.npz")
    meta = json.loads((data / "meta.json").read_text())
    ckpt = ROOT / "models/vae.pt"
    state = load_checkpoint(ckpt) if ckpt.is_file() else None
    if state and state["config"]["arch"] == args.arch:
        config = state["config"]
        train = train.model_copy(update={k: v for k, v in config.items() if k in type(train).model_fields})
        model, source = model_from_checkpoint(state), str(ckpt.relative_to(ROOT))
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
    print(f"{'part':<34}{'seconds':>10}")
    rows = [(f"score pass ({t['images']} images)", tm.get("elbo", tm.get("loss", 0.0)))]
    if "iwae" in tm:
        rows.append((f"IWAE ({t['iwae_images']} images x k={t['iwae_k']})", tm["iwae"]))
    rows += [
        ("figures", tm["figures"]),
        ("MLflow logging, files, loading", total - sum(tm.values())),
        ("total", total),
    ]
    for name, sec in rows:
        print(f"{name:<34}{sec:>10.1f}")
    if "iwae" not in tm:
        print("\n(b) skipped: the likelihood is not normalized on these pixels, so evaluate computes no IWAE")
        return

    k = t["iwae_k"]
    x = torch.from_numpy(images[: args.baseline_images]).float() / 255
    if config["binarize"]:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    start = time.perf_counter()
    naive = naive_iwae(model, x, k)
    t_naive = time.perf_counter() - start
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
        ("vaeops: chunked", ours, t_ours),
    ]:
        print(
            f"{name:<30}{est.mean():>10.2f}{sec:>9.1f}{n / sec:>10.1f}{sec / n * full:>18.0f}"
            f"{t_naive / sec:>7.1f}x"
        )


if __name__ == "__main__":
    main()
