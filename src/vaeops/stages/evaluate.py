"""evaluate: test-set numbers and the figures that show what the VAE learned; into reports/ and into
the MLflow run that trained the checkpoint (named inside it), by run id: the run's status stays what
training left.

What the numbers are depends on whether the likelihood is a normalized distribution of the test
pixels (`VAE.normalized`): the discretized logistic and the continuous Bernoulli are, the Bernoulli
only on binarized pixels.

- normalized: the ELBO and its terms (`test.elbo`, `test.recon`, `test.kl`), the IWAE bound on
  log p(x) (`test.log_px_iwae`) and bits/dim (`test.bpd`);
- not normalized (the article's Bernoulli on grey pixels): a loss, not a likelihood, so it is named
  as one: `test.bce`, `test.kl` and their sum `test.loss`; no log p(x) and no bits/dim.

Everything random is drawn from generators seeded by `evaluate.seed`, one per purpose, so the same
checkpoint gives the same numbers twice, and changing k does not move the single-sample ELBO.

The IWAE decodes k samples of every scored image; `evaluate.precision` says whether its decoder
computes in bf16 (auto: for a Bernoulli, where the hardware does so natively), recorded as
`iwae_precision`.
"""

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeops import figures, tracking
from vaeops.config import EvaluateParams, TrainParams
from vaeops.device import native_bf16, resolve_device
from vaeops.errors import UsageError, WorkError
from vaeops.evaluation.iwae import iwae_log_px
from vaeops.io import atomic_folder, atomic_path
from vaeops.model.checkpoint import model_from_checkpoint, read_checkpoint
from vaeops.model.vae import MODEL_KEYS, VAE
from vaeops.progress import log, work
from vaeops.stages.preprocess import load_split

ACTIVE_VAR = 0.01  # Burda et al. 2015: a unit is active if Var_x(E_q[z_u|x]) > 0.01
ELBO_BATCH = 1000
TRAVERSAL_SDS = np.linspace(-3, 3, 11)  # prior standard deviations either side of its mean
INTERPOLATION_STEPS = 10
MANIFOLD_SIZE = 20
# Offsets of the per-purpose generators from evaluate.seed.
SEED_BINARIZE, SEED_ELBO, SEED_IWAE, SEED_PRIOR, SEED_PICK = range(5)
# Settings in reports/metrics.json that are not results: MLflow params (evaluate.*), not metrics.
SETTINGS = {
    "iwae_k": "evaluate.iwae_samples",
    "iwae_images": "evaluate.iwae_scored_images",  # the count scored, not the setting (0 = all)
    "iwae_precision": "evaluate.iwae_precision",
    "images": "evaluate.test_images",
}
# What bits/dim means for each normalized likelihood, in the log line.
BPD_MEANS = {
    "bernoulli": "of the binarized test pixels",
    "logistic": "of the 8-bit test pixels",
    "continuous_bernoulli": "differential: a density on [0, 1], not comparable with discrete bits/dim",
}
# An IWAE expected to take longer than this says so after its first batch, with the way to shorten it.
SLOW_IWAE_S = 60


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_checkpoint(state: dict[str, Any], train: TrainParams, model_path: Path) -> dict[str, Any]:
    """The checkpoint's config, after checking it is the model params.yaml describes: every model
    key train params define, and binarize as it applies (to a Bernoulli only)."""
    cfg = state.get("config")
    if not isinstance(cfg, dict):
        raise UsageError(f"{model_path}: not a vaeops checkpoint (its config is not a dict)")
    missing = [k for k in (*MODEL_KEYS, "binarize") if k not in cfg]
    if missing:
        raise UsageError(
            f"{model_path}: written by an older vaeops (its config lacks {', '.join(missing)}); "
            "retrain with `dvc repro train`"
        )
    ours = {key: getattr(train, key) for key in MODEL_KEYS if key != "image_shape"}
    ours["binarize"] = train.binarize and train.likelihood == "bernoulli"
    for key, value in ours.items():
        theirs = cfg[key]
        if value != theirs:
            shown = train.binarize if key == "binarize" else value
            raise UsageError(
                f"{model_path} was trained with train.{key} = {theirs!r} but params say train.{key} = "
                f"{shown!r}; run `dvc repro train` (or set train.{key} back to {theirs!r})"
            )
    return cfg


def _read_meta(data_dir: Path, cfg: dict[str, Any]) -> list[str]:
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UsageError(f"{path}: missing; run `dvc repro preprocess` first")
    try:
        meta = json.loads(path.read_text())
        shape, dataset, classes = meta["image_shape"], meta["dataset"], meta["classes"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path}: not a preprocess meta file; rerun `dvc repro preprocess`") from None
    if list(shape) != list(cfg["image_shape"]):
        raise UsageError(f"{path}: images are {shape} but the checkpoint expects {cfg['image_shape']}")
    if cfg.get("dataset", dataset) != dataset:
        raise UsageError(
            f"{path}: test data is {dataset!r} but the checkpoint was trained on {cfg['dataset']!r}"
        )
    return [str(c) for c in classes]


@torch.inference_mode()
def elbo_pass(model: VAE, x: Tensor, seed: int) -> dict[str, Tensor]:
    """Single-sample terms per image, recon = −log p(x|z) and kl (analytic for N(0, I), else its
    one-sample estimate), and the encoder's mean, in batches."""
    gen = _generator(seed, x.device)
    out: dict[str, list[Tensor]] = {"recon": [], "kl": [], "mu": []}
    for xb in x.split(ELBO_BATCH):
        eps = torch.randn((1, len(xb), model.latent_dim), generator=gen, device=x.device)
        params, mu, logvar, z = model(xb, eps)
        recon, kl = model.terms(xb, params, mu, logvar, z)
        for name, t in (("recon", recon[0]), ("kl", kl[0]), ("mu", mu)):
            out[name].append(t)
    return {name: torch.cat(ts) for name, ts in out.items()}


def iwae_precision(name: str, device: torch.device, likelihood: str) -> str:
    """evaluate.precision → the IWAE decoder's precision, "bf16" or "fp32". auto picks bf16 where the
    device computes it natively, for the Bernoulli only: its −log p(x|z) barely moves when the decoder
    rounds (a pixel it is sure of adds ~0 whatever its logit), while the continuous likelihoods'
    densities of grey pixels move with every rounded output."""
    if name == "auto":
        return "bf16" if likelihood == "bernoulli" and native_bf16(device) else "fp32"
    return name


@torch.inference_mode()
def iwae(model: VAE, x: Tensor, k: int, max_decoded: int, seed: int, bf16: bool = False) -> Tensor:
    """log p(x) estimates per image with k importance samples, at most `max_decoded` drawn at once.

    Images are batched so one chunk covers all k samples of a few images when it fits. The first
    batch times the rest: a long estimate says how long, and how to shorten it.
    """
    gen = _generator(seed, x.device)
    batch = max(1, min(len(x), max_decoded // k))
    chunk = max(1, max_decoded // batch)
    start = time.perf_counter()
    log_px = []
    for xb in x.split(batch):
        log_px.append(iwae_log_px(model, xb, k, chunk, generator=gen, bf16=bf16))
        if len(log_px) == 1 and (eta := (time.perf_counter() - start) * len(x) / len(xb)) > SLOW_IWAE_S:
            log(
                f"IWAE: about {eta / 60:.0f} min for {len(x)} images at this model's speed; "
                "evaluate.iwae_images: N scores a seeded subset of N (or lower evaluate.iwae_samples)"
            )
    return torch.cat(log_px)


def active_units(mu: Tensor) -> tuple[int, Tensor]:
    """(count of dims with Var_x(E_q[z|x]) > ACTIVE_VAR, per-dim variances)."""
    var = mu.double().var(0, correction=0)
    return int((var > ACTIVE_VAR).sum()), var


def prior_marginals(model: VAE) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of each latent dim under the prior (an equal-weight mixture of
    diagonal Gaussians; N(0, I) is one component): D each."""
    mu, logvar = (t.double() for t in model.prior.components(model.encode))
    mean = mu.mean(0)
    var = (logvar.exp() + mu.pow(2)).mean(0) - mean.pow(2)
    return mean, var.clamp(min=0).sqrt()


def prior_quantiles(mu: Tensor, logvar: Tensor, probs: Tensor) -> Tensor:
    """Quantiles of each dim's prior marginal, the equal-weight mixture of the K components' Gaussians
    (mu, logvar: K×D): D × len(probs). By bisection on the mixture's CDF, which has no inverse in
    closed form above one component."""
    mu, sd = mu.double().T[:, :, None], torch.exp(0.5 * logvar.double()).T[:, :, None]  # D×K×1
    probs = probs.double().to(mu.device)
    lo = (mu - 10 * sd).amin(1).expand(-1, len(probs))
    hi = (mu + 10 * sd).amax(1).expand(-1, len(probs))
    for _ in range(100):
        mid = (lo + hi) / 2
        below = torch.special.ndtr((mid[:, None, :] - mu) / sd).mean(1) < probs
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def pca_2d(mu: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Project latent means to 2-D: PCA above 2 dims; axis labels say what each axis is."""
    d = mu.shape[1]
    if d == 1:
        jitter = np.random.default_rng(0).uniform(-1, 1, len(mu))
        return np.stack([mu[:, 0], jitter], 1), ["z0", "random jitter (1-D latent)"]
    if d == 2:
        return mu, ["z0", "z1"]
    centred = mu - mu.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = s**2 / (s**2).sum()
    # Fix each component's sign so the picture does not flip between runs or platforms.
    vt = vt[:2] * np.sign(vt[:2, np.abs(vt[:2]).argmax(1)].diagonal())[:, None]
    return centred @ vt.T, [f"PC{i + 1} ({share[i]:.0%} of latent variance)" for i in range(2)]


def _prior_name(model: VAE) -> str:
    if model.config["prior"] == "vamp":
        return f"the VampPrior ({model.config['prior_components']} pseudo-inputs)"
    return "N(0, I)"


@torch.inference_mode()
def make_figures(
    model: VAE,
    x: Tensor,
    labels: np.ndarray,
    classes: list[str],
    stats: dict[str, Tensor],
    variances: Tensor,
    params: EvaluateParams,
    score: tuple[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """name → H×W×3 uint8 picture. x: the test images as [0, 1] floats (continuous, for display);
    score: ("elbo", ELBO per image) or ("loss", BCE + KL per image) for the histogram."""
    dev, d = x.device, model.latent_dim
    shape = model.image_shape
    pics: dict[str, np.ndarray] = {}

    def show(t: Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    samples = model.sample(64, _generator(params.seed + SEED_PRIOR, dev))
    pics["samples"] = figures.labelled_grid(
        show(samples),
        8,
        "Samples from the prior",
        f"likelihood means at 64 draws of z from {_prior_name(model)}",
    )

    cols = min(8, len(x))
    n_rows = min(4, len(x) // cols)
    inputs = x[: n_rows * cols]
    recon = model.decode(model.encode(inputs)[0])
    rows = torch.stack([inputs.view(n_rows, cols, *shape), recon.view(n_rows, cols, *shape)], 1).flatten(0, 2)
    pics["reconstructions"] = figures.labelled_grid(
        show(rows),
        cols,
        "Reconstructions",
        "each test image above its reconstruction (likelihood mean at E_q[z|x])",
        row_labels=["test image", "reconstruction"] * n_rows,
    )

    # Pairs of test images from different classes, so the path crosses between them.
    rng = np.random.default_rng(params.seed + SEED_PICK)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < params.interpolation_pairs:
        a, b = (int(i) for i in rng.choice(len(x), 2, replace=False))
        if labels[a] != labels[b] or len(set(labels.tolist())) == 1:
            pairs.append((a, b))
    a_idx, b_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    mu = stats["mu"]
    t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=dev)[None, :, None]
    path = mu[a_idx][:, None] * (1 - t) + mu[b_idx][:, None] * t  # pairs × steps × d
    decoded = model.decode(path.flatten(0, 1)).view(len(pairs), INTERPOLATION_STEPS, *shape)
    rows = torch.cat([x[a_idx][:, None], decoded, x[b_idx][:, None]], 1).flatten(0, 1)
    pics["interpolations"] = figures.labelled_grid(
        show(rows),
        INTERPOLATION_STEPS + 2,
        "Latent interpolations",
        "test image, decoded straight line between the two latent means, test image",
        row_labels=[f"{classes[labels[a]]} to {classes[labels[b]]}" for a, b in pairs],
    )

    # Traversals: the most active dims, each swept over the prior's mean ± 3 sd (±3 for N(0, I)) from
    # the first test image's code.
    dims = variances.argsort(descending=True)[: min(params.traversal_dims, d)].tolist()
    mean, sd = (m.to(mu.dtype) for m in prior_marginals(model))
    sds = torch.tensor(TRAVERSAL_SDS, dtype=mu.dtype, device=dev)
    codes = mu[0].repeat(len(dims), len(sds), 1)
    for r, dim in enumerate(dims):
        codes[r, :, dim] = mean[dim] + sds * sd[dim]
    decoded = model.decode(codes.flatten(0, 1))
    pics["traversals"] = figures.labelled_grid(
        show(decoded),
        len(sds),
        "Latent traversals (most active dims first)",
        f"one latent swept from the prior's mean {TRAVERSAL_SDS[0]:g} sd to {TRAVERSAL_SDS[-1]:+g} sd, "
        "the rest fixed at a test image's code",
        row_labels=[f"z{dim}  var {variances[dim]:.2f}" for dim in dims],
    )

    points, axes = pca_2d(mu.double().cpu().numpy())
    how = "" if d <= 2 else f" (PCA of the {d}-D means)"
    pics["latent_map"] = figures.latent_map(
        points, labels, classes, axes[0], axes[1], f"Test-set latent means E_q[z|x]{how}"
    )

    name, values = score
    higher_is_better = name == "elbo"
    order = np.argsort(-values if not higher_is_better else values, kind="stable")
    worst = order[:10]
    if higher_is_better:
        xlabel = "ELBO per test image (nats, higher = more typical)"
    else:
        xlabel = "BCE + KL per test image (nats, lower = more typical; a loss, not −log p(x))"
    pics[f"{name}_hist"] = figures.score_histogram(
        values,
        show(x[torch.from_numpy(worst).to(dev)]),
        values[worst],
        f"Per-image {'ELBO' if higher_is_better else 'loss'} on the {len(values)} test images",
        xlabel,
        higher_is_better,
    )

    if d == 2:
        # Kingma & Welling fig. 4: a grid over each prior marginal's quantiles, so each tile covers
        # equal mass of it.
        probs = torch.linspace(0.05, 0.95, MANIFOLD_SIZE)
        q = prior_quantiles(*model.prior.components(model.encode), probs)
        q0, q1 = q[0], q[1].flip(0)  # top row = highest z1
        zz = torch.stack([q0.repeat(MANIFOLD_SIZE), q1.repeat_interleave(MANIFOLD_SIZE)], 1)
        pics["manifold"] = figures.manifold(
            show(model.decode(zz.float().to(dev))),
            q[0].cpu().numpy(),
            q[1].cpu().numpy(),
            "Decoded 2-D latent manifold (quantiles 5%–95% of each prior marginal)",
        )
    return pics


def _by_class(values: Tensor, labels: np.ndarray, classes: list[str], name: str) -> list[dict[str, Any]]:
    by_class = []
    for i, cls in enumerate(classes):
        if n := int((labels == i).sum()):
            mean = float(values[torch.from_numpy(labels == i).to(values.device)].mean())
            by_class.append({"class": cls, "images": n, name: round(mean, 4)})
    return by_class


def score(
    model: VAE,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    cfg: dict[str, Any],
    params: EvaluateParams,
    device: torch.device,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, np.ndarray], dict[str, float]]:
    """(test metrics, score per class, figures, timings in seconds) of the model on the test images.
    The score is the ELBO when the likelihood is normalized on the test pixels, else the loss."""
    timings: dict[str, float] = {}
    x = torch.from_numpy(images).to(device).float() / 255
    target = x
    if cfg["binarize"]:
        # Once, with a fixed seed: the test set is then a fixed binary set, as in the IWAE literature.
        gen = _generator(params.seed + SEED_BINARIZE, device)
        target = (torch.rand(x.shape, generator=gen, device=device) < x).float()
    normalized = model.normalized(cfg["binarize"])
    name = "elbo" if normalized else "loss"

    start = time.perf_counter()
    stats = elbo_pass(model, target, params.seed + SEED_ELBO)
    loss = stats["recon"] + stats["kl"]  # −ELBO where normalized, else the article's BCE + KL
    if not torch.isfinite(loss).all():
        raise WorkError(f"the test {name} is not finite on some test images (diverged model?)")
    timings[name] = time.perf_counter() - start
    n_active, variances = active_units(stats["mu"])

    if normalized:
        values = -loss
        n_iwae = len(x) if params.iwae_images == 0 else min(params.iwae_images, len(x))
        subset = np.sort(np.random.default_rng(params.seed + SEED_PICK).permutation(len(x))[:n_iwae])
        precision = iwae_precision(params.precision, device, cfg["likelihood"])
        log(f"IWAE: k={params.iwae_samples} on {n_iwae} test images ({device.type}, {precision} decoder)")
        start = time.perf_counter()
        idx = torch.from_numpy(subset).to(device)
        log_px = iwae(
            model,
            target[idx],
            params.iwae_samples,
            params.iwae_batch,
            params.seed + SEED_IWAE,
            bf16=precision == "bf16",
        )
        timings["iwae"] = time.perf_counter() - start
        dim = math.prod(cfg["image_shape"])
        test = {
            "elbo": float(values.mean()),
            "recon": float(stats["recon"].mean()),
            "kl": float(stats["kl"].mean()),
            "log_px_iwae": float(log_px.mean()),
            "bpd": float(-log_px.mean() / (dim * math.log(2))),
            "active_units": n_active,
            "elbo_iwae_images": float(values[idx].mean()),  # the ELBO on the IWAE subset, to read the gap
            "iwae_k": params.iwae_samples,
            "iwae_images": n_iwae,
            "iwae_precision": precision,
            "images": len(x),
        }
    else:
        values = loss
        test = {
            "bce": float(stats["recon"].mean()),
            "kl": float(stats["kl"].mean()),
            "loss": float(loss.mean()),
            "active_units": n_active,
            "images": len(x),
        }
    test = {k: round(v, 4) if isinstance(v, float) else v for k, v in test.items()}
    by_class = _by_class(values, labels, classes, name)

    start = time.perf_counter()
    pics = make_figures(
        model, x, labels, classes, stats, variances.float(), params, (name, values.cpu().numpy())
    )
    timings["figures"] = time.perf_counter() - start
    return test, by_class, pics, timings


def log_to_mlflow(
    client: Any,
    run_id: str,
    test: dict[str, Any],
    by_class: list[dict[str, Any]],
    pics: dict[str, np.ndarray],
    params: EvaluateParams,
) -> None:
    """Results as metrics named like DVC's (`test.elbo`, see tracking.py), settings as params, the
    per-class score as one JSON artifact, the figures under evaluate/."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    results = [Metric(f"test.{k}", float(v), now, 0) for k, v in test.items() if k not in SETTINGS]
    client.log_batch(run_id, metrics=results)
    settings = {name: str(test[k]) for k, name in SETTINGS.items() if k in test}
    tracking.log_rerun_params(client, run_id, settings | {"evaluate.seed": str(params.seed)})
    client.log_dict(run_id, by_class, "evaluate/elbo_by_class.json")  # a list: MLflow writes any JSON
    for name, pic in pics.items():
        client.log_image(run_id, pic, artifact_file=f"evaluate/{name}.png")


def summary(test: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The log line: what the numbers are, and for a loss, that it is not a likelihood."""
    units = f"{test['active_units']}/{cfg['latent_dim']} active units"
    if "elbo" in test:
        return (
            f"test: elbo {test['elbo']:.2f}  recon {test['recon']:.2f}  kl {test['kl']:.2f}  "
            f"log p(x) ≥ {test['log_px_iwae']:.2f} (IWAE, k={test['iwae_k']})  "
            f"{test['bpd']:.4f} bits/dim ({BPD_MEANS[cfg['likelihood']]})  {units}"
        )
    return (
        f"test: bce {test['bce']:.2f}  kl {test['kl']:.2f}  loss (bce + kl) {test['loss']:.2f}  {units}; "
        "not a likelihood: the Bernoulli is not normalized on grey pixels, so there is no log p(x) or "
        "bits/dim (train.binarize: true, or likelihood continuous_bernoulli or logistic, gives them)"
    )


def run(
    train: TrainParams,
    params: EvaluateParams,
    data_dir: Path,
    model_path: Path,
    run_file: Path,
    metrics_path: Path,
    figures_dir: Path,
    by_class_path: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint on the test split and log into the MLflow run that trained it (the one
    the checkpoint names); returns the metrics, plus "elbo_by_class" and "timings" in seconds.

    by_class_path: the per-class score file (default: elbo_by_class.json beside metrics_path).
    """
    by_class_path = by_class_path or metrics_path.with_name("elbo_by_class.json")
    state, sha256 = read_checkpoint(model_path)
    cfg = check_checkpoint(state, train, model_path)
    run_id = tracking.checkpoint_run_id(state, model_path, run_file)
    classes = _read_meta(data_dir, cfg)
    images, labels = load_split(data_dir / "test.npz", cfg["image_shape"], len(classes))
    if len(images) < 2:
        raise UsageError(f"{data_dir / 'test.npz'}: {len(images)} test images; evaluate needs at least 2")
    device = resolve_device(params.device, "evaluate.device")
    model = model_from_checkpoint(state, model_path)
    tracking.require_run(run_id)  # fail now, not after minutes of IWAE

    with tracking.recording(run_id, "evaluate") as client:
        model = model.to(device)  # the conv archs keep their own weights channels_last (model/archs.py)
        with work("evaluate"):
            test, by_class, pics, timings = score(model, images, labels, classes, cfg, params, device)
        # The reports change as one set: written to temp files and a temp folder first, renamed into
        # place only after MLflow has the same numbers, so a failure half-way (disk full, a store that
        # refuses) leaves the previous set.
        with (
            atomic_path(metrics_path) as metrics_tmp,
            atomic_path(by_class_path) as by_class_tmp,
            atomic_folder(figures_dir) as figures_tmp,
        ):
            metrics_tmp.write_text(json.dumps({"test": test}, indent=2) + "\n")
            # One record per class: what a DVC bar plot reads.
            by_class_tmp.write_text(json.dumps(by_class, indent=2) + "\n")
            for name, pic in pics.items():
                figures.save_png(figures_tmp / f"{name}.png", pic)
            # The numbers describe the bytes read above: if a training replaced them meanwhile, log and
            # write nothing rather than pin them on the new model (or leave reports about a gone one).
            tracking.check_unchanged(model_path, sha256, "evaluate")
            log_to_mlflow(client, run_id, test, by_class, pics, params)
            tracking.check_unchanged(model_path, sha256, "evaluate")  # again: logging takes seconds

    log(summary(test, cfg))
    log("time: " + "  ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    log(f"logged into MLflow run {run_id}")
    return {"test": test, "elbo_by_class": by_class, "timings": timings}
