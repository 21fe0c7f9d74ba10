"""evaluate: every combination of parts with honest metric names, the IWAE number against exact
quadrature, figures, MLflow, CLI errors, and a model trained by the real train stage on real MNIST."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, run_cli, tiny_config, tiny_vae, tree
from PIL import Image

from vaeops import tracking
from vaeops.config import EvaluateParams, TrainParams
from vaeops.errors import UsageError
from vaeops.model.checkpoint import checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from vaeops.stages import evaluate
from vaeops.stages.preprocess import save_split

SHAPE = (1, 12, 12)
CLASSES = [str(i) for i in range(10)]
NORMALIZED = {"elbo", "recon", "kl", "log_px_iwae", "bpd", "active_units", "elbo_iwae_images"}
NORMALIZED_SETTINGS = {"iwae_k", "iwae_images", "iwae_precision", "images"}
LOSS = {"bce", "kl", "loss", "active_units"}
FIGURES = {"samples", "reconstructions", "interpolations", "traversals", "latent_map"}


def write_data(
    folder: Path,
    n: int = 60,
    shape: tuple[int, int, int] = SHAPE,
    classes: list[str] = CLASSES,
    dataset: str = "mnist",
) -> Path:
    """test.npz + meta.json: per-class blobs at different places (and, in RGB, of different colours),
    so classes differ in latent space."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(classes)
    c, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    images = np.zeros((n, *shape), dtype=np.uint8)
    for i, k in enumerate(labels):
        cy, cx = 2 + (k % 4) * (h - 4) / 3, 2 + (k // 4 % 3) * (w - 4) / 2
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)
        colour = [1.0] if c == 1 else [(k + j) % 3 / 2 for j in range(3)]
        for j in range(c):
            images[i, j] = np.clip((colour[j] * blob + 0.2 * rng.random((h, w))) * 255, 0, 255)
    save_split(folder / "test.npz", images, labels.astype(np.int64))
    meta = {"dataset": dataset, "image_shape": list(shape), "classes": classes}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_checkpoint(
    folder: Path,
    arch: str,
    shape: tuple[int, int, int],
    latent_dim: int,
    model: torch.nn.Module | None = None,
    dataset: str = "mnist",
    **parts: object,
) -> str:
    """models/vae.pt + models/run.json as train writes them (a tiny model of these parts, or `model`),
    with a 'training' run in the current store."""
    import mlflow

    model = model or tiny_vae(arch, shape, latent_dim, **parts)
    experiment_id = tracking.setup("vaeops")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("train/elbo", -123.0)
    state = checkpoint(model, {**model.config, "dataset": dataset}, run_id=run.info.run_id, epoch=1)
    save_checkpoint(folder / "models/vae.pt", state)
    tracking.write_run_file(folder / "models/run.json", run.info.run_id, experiment_id)
    return run.info.run_id


def train_params(arch: str, latent_dim: int, **parts: object) -> TrainParams:
    """The train params that describe a tiny_config model (what params.yaml says of the checkpoint)."""
    return TrainParams(arch=arch, latent_dim=latent_dim, hidden_dim=32, channels=[4, 8], **parts)


def isolate(mp: pytest.MonkeyPatch, store: Path, folder: Path) -> None:
    """Work in `folder`, with MLflow's embedded store in `store` (the env vars are restored on undo).

    The tests share one store: creating its SQLite schema takes seconds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    mp.chdir(folder)
    mp.setenv("VAEOPS_PROJECT_ROOT", str(store))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mp.setenv(var, "unset")  # so that undo removes what mlflow.set_tracking_uri() exports
        mp.delenv(var)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


def dead_unit_mlp(latent_dim: int, dead: list[int], seed: int = 0) -> torch.nn.Module:
    """An MLP whose encoder mean ignores the input on `dead` dims and strongly depends on it elsewhere."""
    model = tiny_vae("mlp", SHAPE, latent_dim, seed=seed)
    fc_mu = model.encoder.fc_mu
    with torch.no_grad():
        fc_mu.weight.mul_(20)
        fc_mu.weight[dead] = 0
        fc_mu.bias[dead] = 0.3  # a constant mean: no variance over the data however big it is
    return model


def run_stage(folder: Path, train: TrainParams, params: EvaluateParams) -> dict:
    return evaluate.run(
        train,
        params,
        folder / "data",
        folder / "models/vae.pt",
        folder / "models/run.json",
        folder / "reports/metrics.json",
        folder / "reports/figures",
    )


FAST = EvaluateParams(iwae_samples=50, iwae_images=0, iwae_batch=500, traversal_dims=3, interpolation_pairs=4)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, store):
    """One evaluate run on a 2-D MLP (Bernoulli on binarized pixels) with one dead latent dim, so
    the manifold figure is drawn too."""
    folder = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, store, folder)
        write_data(folder / "data")
        run_id = write_checkpoint(folder, "mlp", SHAPE, 2, model=dead_unit_mlp(2, dead=[1]))
        result = run_stage(folder, train_params("mlp", 2), FAST)
        import mlflow

        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        artifacts = [a.path for a in client.list_artifacts(run_id, "evaluate")]
        logged = json.loads(
            Path(client.download_artifacts(run_id, "evaluate/elbo_by_class.json", str(folder))).read_text()
        )
        assert logged == json.loads((folder / "reports/elbo_by_class.json").read_text())
    return folder, result, run, artifacts


# --- the numbers ----------------------------------------------------------------------------------


def exact_log_px(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log ∫ p(x|z) p(z) dz for a 1-D latent, by a Riemann sum on a fine grid over [-10, 10]."""
    z = torch.linspace(-10, 10, 40_001)[:, None]
    log_px_z = -model.likelihood.nll(model.decoder(z)[:, None], x)  # grid × images
    log_pz = model.prior.log_prob(z, model.encode)
    return torch.logsumexp(log_px_z + log_pz[:, None], 0) + math.log(float(z[1] - z[0]))


@pytest.mark.parametrize("prior", ["normal", "vamp"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "logistic"])
@torch.no_grad()
def test_log_px_iwae_is_the_exact_log_likelihood_by_quadrature(likelihood, prior):
    """What evaluate reports as test.log_px_iwae, for every normalized likelihood and prior: on a
    1-D latent and 1×2×2 images the integral is exact to ~1e-9, so the number can be checked.
    Each likelihood gets the data it is normalized on: binary, grey, 8-bit levels."""
    model = tiny_vae("mlp", (1, 2, 2), 1, likelihood=likelihood, prior=prior, prior_components=3)
    with torch.no_grad():  # a sharper decoder: a posterior unlike q, so the k samples have work to do
        model.decoder.fc_out.weight.mul_(4)
    levels = {
        "bernoulli": [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]],
        "continuous_bernoulli": [[0.9, 0.1, 0.3, 0.7], [0.5, 0.5, 0.5, 0.5], [0, 0.2, 1, 0.6], [1, 1, 0, 0]],
        "logistic": [[255, 0, 3, 128], [17, 17, 17, 17], [0, 0, 0, 0], [200, 100, 50, 250]],
    }[likelihood]
    x = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 2, 2)
    x = x / 255 if likelihood == "logistic" else x
    assert model.normalized(binary_targets=likelihood == "bernoulli")
    exact = exact_log_px(model, x)
    iwae = evaluate.iwae(model, x, 20_000, max_decoded=10_000, seed=0)
    assert (iwae - exact).abs().max() < 0.02, (iwae, exact)


def test_active_units_count_the_dims_the_encoder_uses():
    model = dead_unit_mlp(6, dead=[1, 3, 5])
    x = torch.rand(200, *SHAPE)
    stats = evaluate.elbo_pass(model, x, seed=0)
    n, var = evaluate.active_units(stats["mu"])
    assert n == 3
    assert var[[1, 3, 5]].max() == 0
    assert var[[0, 2, 4]].min() > evaluate.ACTIVE_VAR


def test_pca_projects_to_two_dims_with_stable_signs():
    mu = np.random.default_rng(0).normal(size=(500, 5)) * [5, 3, 1, 0.5, 0.1]
    points, labels = evaluate.pca_2d(mu)
    assert points.shape == (500, 2)
    assert points[:, 0].var() > points[:, 1].var() > 0
    flipped, _ = evaluate.pca_2d(-mu)
    assert np.allclose(np.abs(points), np.abs(flipped))
    assert "PC1" in labels[0]


@torch.no_grad()
def test_traversals_and_manifold_span_the_prior_not_n01():
    """The sweeps come from the prior's own marginals: ±3 sd around 0 for N(0, I); for a VampPrior
    the moments of its mixture (checked against draws from it) and its quantiles (against its CDF)."""
    normal = tiny_vae("mlp", SHAPE, 2)
    mean, sd = evaluate.prior_marginals(normal)
    assert torch.equal(mean, torch.zeros(2, dtype=torch.float64)) and torch.equal(sd, torch.ones(2).double())
    probs = torch.linspace(0.05, 0.95, 7)
    q = evaluate.prior_quantiles(*normal.prior.components(normal.encode), probs)
    assert torch.allclose(q[0], torch.tensor([NormalDist().inv_cdf(float(p)) for p in probs]).double())

    vamp = tiny_vae("mlp", SHAPE, 2, prior="vamp", prior_components=3)
    with torch.no_grad():  # pseudo-inputs that encode far from N(0, I), and far from each other
        vamp.encoder.fc_mu.bias.add_(torch.tensor([4.0, -2.0]))
        vamp.encoder.fc_mu.weight.mul_(10)
    mean, sd = evaluate.prior_marginals(vamp)
    draws = vamp.prior.sample(200_000, vamp.encode, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(mean, draws.mean(0), atol=0.02) and torch.allclose(sd, draws.std(0), rtol=0.02)
    assert mean[0] > 2 and mean[1] < -1
    mu, logvar = vamp.prior.components(vamp.encode)
    q = evaluate.prior_quantiles(mu, logvar, probs)
    for d in range(2):
        parts = [
            NormalDist(float(m), float(s)) for m, s in zip(mu[:, d], (0.5 * logvar[:, d]).exp(), strict=True)
        ]
        cdf = [np.mean([p.cdf(float(v)) for p in parts]) for v in q[d]]
        assert np.allclose(cdf, probs.numpy(), atol=1e-6)


def test_checkpoint_must_be_the_model_params_describe():
    """Every model key train params define is compared; binarize as it applies (to a Bernoulli)."""
    path = Path("models/vae.pt")
    state = {"config": tiny_config("conv", (3, 16, 16), 4, likelihood="logistic", prior="vamp")}
    ours = train_params("conv", 4, likelihood="logistic", prior="vamp")
    assert evaluate.check_checkpoint(state, ours, path) == state["config"]
    # binarize only makes Bernoulli targets: a logistic model does not care what it says
    assert evaluate.check_checkpoint(state, ours.model_copy(update={"binarize": False}), path)
    for key, value in [
        ("arch", "resnet"),
        ("latent_dim", 5),
        ("hidden_dim", 33),
        ("hidden_layers", 2),
        ("channels", [4, 16]),
        ("likelihood", "continuous_bernoulli"),
        ("logistic_components", 3),
        ("prior", "normal"),
        ("prior_components", 7),
    ]:
        with pytest.raises(UsageError) as e:
            evaluate.check_checkpoint(state, ours.model_copy(update={key: value}), path)
        theirs = state["config"][key]
        assert str(e.value) == (
            f"models/vae.pt was trained with train.{key} = {theirs!r} but params say train.{key} = "
            f"{value!r}; run `dvc repro train` (or set train.{key} back to {theirs!r})"
        )
    grey = {"config": tiny_config("mlp", SHAPE, 2, binarize=False)}
    with pytest.raises(UsageError, match="train.binarize = False but params say train.binarize = True"):
        evaluate.check_checkpoint(grey, train_params("mlp", 2), path)
    old = {"config": {k: v for k, v in grey["config"].items() if k not in ("likelihood", "prior")}}
    with pytest.raises(UsageError, match="written by an older vaeops .its config lacks likelihood, prior"):
        evaluate.check_checkpoint(old, train_params("mlp", 2), path)


# --- the stage -----------------------------------------------------------------------------------


def test_metrics_file_holds_the_numbers(evaluated):
    folder, result, _, _ = evaluated
    metrics = json.loads((folder / "reports/metrics.json").read_text())
    t = metrics["test"]
    assert set(t) == NORMALIZED | NORMALIZED_SETTINGS
    assert t["elbo"] == pytest.approx(-(t["recon"] + t["kl"]), abs=1e-3)
    assert t["kl"] >= 0  # analytic KL to N(0, I)
    assert t["log_px_iwae"] > t["elbo_iwae_images"]  # k=50 over all 60 images: above the ELBO
    assert t["bpd"] == pytest.approx(-t["log_px_iwae"] / (144 * math.log(2)), abs=1e-4)
    assert t["active_units"] == 1  # dim 1 is dead
    assert (t["iwae_k"], t["iwae_images"], t["images"]) == (50, 60, 60)
    by_class = json.loads((folder / "reports/elbo_by_class.json").read_text())
    assert [c["class"] for c in by_class] == CLASSES and {c["images"] for c in by_class} == {6}
    assert np.mean([c["elbo"] for c in by_class]) == pytest.approx(t["elbo"], abs=1e-3)  # 6 per class
    assert len({c["elbo"] for c in by_class}) > 1  # the classes are blobs at different places
    assert result["elbo_by_class"] == by_class
    assert set(result["timings"]) == {"elbo", "iwae", "figures"}


def expected_grid(rows: int, cols: int, h: int = SHAPE[1], scale: int = 3) -> tuple[int, int]:
    """(height, width of the image part) of a figures.labelled_grid picture."""
    from vaeops.figures import HEADER_H

    return HEADER_H + scale * (rows * (h + 2) + 2), scale * (cols * (h + 2) + 2)


def test_figures_exist_with_the_right_pixel_sizes(evaluated):
    folder = evaluated[0]
    figs = folder / "reports/figures"
    names = {p.name for p in figs.iterdir()}
    assert names == {f"{n}.png" for n in FIGURES | {"elbo_hist", "manifold"}}
    size = {n: Image.open(figs / n).size for n in names}  # (width, height)

    h, w = expected_grid(8, 8)
    assert size["samples.png"][1] == h and size["samples.png"][0] >= w  # wider only for the subtitle
    for name, rows, cols in [
        ("reconstructions.png", 8, 8),
        ("interpolations.png", FAST.interpolation_pairs, evaluate.INTERPOLATION_STEPS + 2),
        ("traversals.png", 2, len(evaluate.TRAVERSAL_SDS)),  # traversal_dims=3 capped at latent_dim=2
    ]:
        h, w = expected_grid(rows, cols)
        assert size[name][1] == h and w + 30 < size[name][0] < w + 250, name  # + the row-label column
    assert size["latent_map.png"] == (900, 700)
    assert size["elbo_hist.png"] == (1000, 700)
    assert size["manifold.png"] == (800, 800)
    for n in names:  # not blank
        assert np.asarray(Image.open(figs / n)).std() > 10, n


def test_metrics_and_images_go_to_the_training_run(evaluated):
    folder, _, run, artifacts = evaluated
    metrics = json.loads((folder / "reports/metrics.json").read_text())["test"]
    logged = run.data.metrics
    assert logged["train/elbo"] == -123.0  # the training run itself, not a new one
    assert run.info.status == "FINISHED"  # logged by run id: training's status stays
    assert run.data.tags["vaeops.evaluate"] == "done"
    # Results are metrics named as in reports/metrics.json; settings are params; no per-class metrics.
    assert {k for k in logged if k.startswith("test")} == {f"test.{k}" for k in NORMALIZED}
    for key in NORMALIZED:
        assert logged[f"test.{key}"] == pytest.approx(metrics[key]), key
    params = run.data.params
    assert (params["evaluate.iwae_samples"], params["evaluate.iwae_scored_images"]) == ("50", "60")
    assert (params["evaluate.test_images"], params["evaluate.seed"]) == ("60", "0")
    figs = [f"evaluate/{p.name}" for p in (folder / "reports/figures").iterdir()]
    assert sorted(artifacts) == sorted([*figs, "evaluate/elbo_by_class.json"])
    assert f"Test ELBO **{metrics['elbo']:.2f}** nats per image" in run.data.tags["mlflow.note.content"]


# Pairwise over arch × likelihood × prior × grey/RGB, square or not, 1-D to 3-D latents; the
# Bernoulli on grey pixels and on binarized ones (same parts otherwise), and a folder dataset's classes.
COMBOS = [
    ("mlp", (1, 12, 12), 2, {"binarize": False}),
    ("mlp", (1, 12, 12), 2, {"binarize": True}),
    ("mlp", (3, 10, 14), 3, {"likelihood": "logistic", "prior": "vamp"}),
    ("conv", (1, 12, 12), 3, {"likelihood": "continuous_bernoulli"}),
    ("conv", (3, 16, 16), 2, {"binarize": True, "prior": "vamp"}),
    ("conv", (3, 12, 16), 1, {"likelihood": "logistic", "logistic_components": 2}),
    ("resnet", (3, 16, 16), 3, {"binarize": False, "prior": "vamp"}),
    ("resnet", (1, 13, 9), 2, {"likelihood": "logistic", "prior": "vamp"}),
    ("resnet", (3, 12, 12), 2, {"likelihood": "continuous_bernoulli", "prior": "vamp"}),
]
FOLDER_CLASSES = ["cat", "dog", "zebra crossing"]


@pytest.mark.parametrize("arch, shape, latent_dim, parts", COMBOS, ids=lambda v: str(v).replace(" ", ""))
def test_every_combination_of_parts_evaluates_with_honest_names(
    arch, shape, latent_dim, parts, tmp_path, monkeypatch, store, capsys
):
    """log p(x) and bits/dim only where the likelihood is normalized on the test pixels; elsewhere
    the BCE, the KL and their sum, the article's loss, under those names, and the log says why."""
    parts = {"prior_components": 3, **parts}
    normalized = parts.get("likelihood", "bernoulli") != "bernoulli" or parts["binarize"]
    folder_data = shape[0] == 3 and latent_dim == 3  # some combos read a folder dataset's classes
    classes = FOLDER_CLASSES if folder_data else CLASSES
    dataset = "folder" if folder_data else "mnist"
    isolate(monkeypatch, store, tmp_path)
    write_data(tmp_path / "data", n=30, shape=shape, classes=classes, dataset=dataset)
    run_id = write_checkpoint(tmp_path, arch, shape, latent_dim, dataset=dataset, **parts)
    params = EvaluateParams(iwae_samples=8, iwae_images=12, traversal_dims=2, interpolation_pairs=2)
    capsys.readouterr()
    result = run_stage(tmp_path, train_params(arch, latent_dim, **parts), params)
    err = capsys.readouterr().err

    t = json.loads((tmp_path / "reports/metrics.json").read_text())["test"]
    assert t == result["test"]
    score = "elbo" if normalized else "loss"
    if normalized:
        assert set(t) == NORMALIZED | NORMALIZED_SETTINGS
        dims = math.prod(shape)
        assert t["bpd"] == pytest.approx(-t["log_px_iwae"] / (dims * math.log(2)), abs=1e-3)
        assert f"log p(x) ≥ {t['log_px_iwae']:.2f} (IWAE, k=8)" in err and "bits/dim" in err
    else:
        assert set(t) == LOSS | {"images"}
        assert t["loss"] == pytest.approx(t["bce"] + t["kl"], abs=1e-3)
        assert "not a likelihood" in err and "log p(x) ≥" not in err
    by_class = json.loads((tmp_path / "reports/elbo_by_class.json").read_text())
    assert [c["class"] for c in by_class] == classes
    assert all(set(c) == {"class", "images", score} and math.isfinite(c[score]) for c in by_class)

    figs = {p.stem: np.asarray(Image.open(p)) for p in (tmp_path / "reports/figures").iterdir()}
    assert set(figs) == FIGURES | {f"{score}_hist"} | ({"manifold"} if latent_dim == 2 else set())
    for name, pic in figs.items():
        assert pic.ndim == 3 and pic.shape[2] == 3 and pic.std() > 5, name
    # The image grids of RGB models are in colour; those of grey ones grey, down to the last pixel.
    grids = [figs[name] for name in ("samples", "reconstructions", "interpolations", "traversals")]
    assert all((pic[..., 0] == pic[..., 1]).all() for pic in grids) == (shape[0] == 1)

    import mlflow

    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    expected = NORMALIZED if normalized else LOSS
    assert {k for k in logged if k.startswith("test")} == {f"test.{k}" for k in expected}


def test_same_checkpoint_gives_the_same_metrics_twice(tmp_path, monkeypatch, store):
    isolate(monkeypatch, store, tmp_path)
    write_data(tmp_path / "data")
    write_checkpoint(tmp_path, "conv", SHAPE, 3)
    train = train_params("conv", 3)
    params = EvaluateParams(iwae_samples=20, iwae_images=25, traversal_dims=2, interpolation_pairs=2)
    first = run_stage(tmp_path, train, params)
    first_file = (tmp_path / "reports/metrics.json").read_text()
    (tmp_path / "reports/figures/manifold.png").write_bytes(b"stale")  # from an earlier 2-D model
    second = run_stage(tmp_path, train, params)
    assert first["test"] == second["test"]
    assert (tmp_path / "reports/metrics.json").read_text() == first_file
    assert not (tmp_path / "reports/figures/manifold.png").exists()
    assert first["test"]["iwae_images"] == 25
    # A different seed draws different samples (so the seed is what makes it repeatable).
    model = model_from_checkpoint(load_checkpoint(tmp_path / "models/vae.pt"))
    x = torch.rand(10, *SHAPE)
    assert torch.equal(evaluate.elbo_pass(model, x, 0)["recon"], evaluate.elbo_pass(model, x, 0)["recon"])
    assert not torch.equal(evaluate.elbo_pass(model, x, 0)["recon"], evaluate.elbo_pass(model, x, 1)["recon"])


def test_a_tiny_test_split_still_gets_every_figure(tmp_path, monkeypatch, store):
    isolate(monkeypatch, store, tmp_path)
    write_data(tmp_path / "data", n=5)
    write_checkpoint(tmp_path, "mlp", SHAPE, 2)
    params = EvaluateParams(iwae_samples=5, iwae_images=1000, interpolation_pairs=3)
    result = run_stage(tmp_path, train_params("mlp", 2), params)
    assert result["test"]["iwae_images"] == 5  # iwae_images=1000 capped at the split size
    assert len(list((tmp_path / "reports/figures").iterdir())) == 7
    h, _ = expected_grid(2, 5)  # one input row of 5 over one reconstruction row
    assert Image.open(tmp_path / "reports/figures/reconstructions.png").size[1] == h


# --- usage errors through the real CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory, store):
    """A project folder with data, a 3-D MLP checkpoint and run file, and a params.yaml to edit; and
    beside the checkpoint, one an older vaeops wrote and one whose weights do not fit its config."""
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, store, folder)
        write_data(folder / "data/processed")
        write_checkpoint(folder, "mlp", SHAPE, 3)
        old = load_checkpoint(folder / "models/vae.pt")
        old["config"] = {k: v for k, v in old["config"].items() if k not in ("likelihood", "prior")}
        save_checkpoint(folder / "models/old.pt", old)
        misfit = load_checkpoint(folder / "models/vae.pt")
        misfit["config"]["hidden_dim"] = 64  # weights of hidden size 32
        save_checkpoint(folder / "models/misfit.pt", misfit)
    return folder


def write_params(folder: Path, **train: object) -> None:
    params = {
        "train": {"arch": "mlp", "latent_dim": 3, "hidden_dim": 32, "channels": [4, 8], **train},
        "evaluate": {"iwae_samples": 10, "iwae_images": 20, "traversal_dims": 2, "interpolation_pairs": 2},
    }
    (folder / "params.yaml").write_text(json.dumps(params))  # JSON is YAML


def cli(folder: Path, store: Path, *args: str, **train: object) -> subprocess.CompletedProcess:
    """The real `vaeops evaluate` console script in a subprocess."""
    write_params(folder, **train)
    env = {"VAEOPS_PROJECT_ROOT": str(store), "MLFLOW_TRACKING_URI": ""}
    return run_cli("evaluate", *args, cwd=folder, env=env)


@pytest.fixture
def cli_in_process(cli_project, store, monkeypatch, capsys):
    """vaeops.cli.main() in this process (no torch import per call): returns (exit code, stderr)."""
    from vaeops import cli as vaeops_cli

    isolate(monkeypatch, store, cli_project)

    def call(*args: str, **train: object) -> tuple[int, str]:
        write_params(cli_project, **train)
        monkeypatch.setattr(sys, "argv", ["vaeops", "evaluate", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            vaeops_cli.main()
        return exit_info.value.code, capsys.readouterr().err

    return call


def test_mismatched_and_missing_checkpoint_exit_2_through_the_console_script(cli_project, store):
    before = tree(cli_project / "reports")
    res = cli(cli_project, store, latent_dim=8)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: models/vae.pt was trained with train.latent_dim = 3 but params say train.latent_dim = 8; "
        "run `dvc repro train` (or set train.latent_dim back to 3)"
    )
    res = cli(cli_project, store, "--model", "models/none.pt")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: models/none.pt: checkpoint not found; run `dvc repro train` first"
    assert tree(cli_project / "reports") == before  # nothing written


@pytest.mark.parametrize(
    "args, train, message",
    [
        ((), {"arch": "conv"}, "trained with train.arch = 'mlp' but params say train.arch = 'conv'"),
        ((), {"binarize": False}, "train.binarize = True but params say train.binarize = False"),
        ((), {"likelihood": "logistic"}, "train.likelihood = 'bernoulli' but params say train.likelihood"),
        ((), {"prior": "vamp"}, "train.prior = 'normal' but params say train.prior = 'vamp'"),
        ((), {"channels": [4]}, "train.channels = [4, 8] but params say train.channels = [4]"),
        (("--model", "models/old.pt"), {}, "models/old.pt: written by an older vaeops"),
        (
            ("--model", "models/misfit.pt"),
            {"hidden_dim": 64},
            "misfit.pt: its weights do not fit its own config",
        ),
        (("--run-file", "models/none.json"), {}, "models/none.json: missing"),
        (
            ("--run-file", "models/other.json"),
            {},
            "models/other.json names MLflow run 0123abcd but models/vae.pt was trained in run ",
        ),
        (("--data", "nowhere"), {}, "nowhere/meta.json: missing"),
        (("--data", "partial"), {}, "partial/test.npz: missing"),
        (("--data", "badmeta"), {}, "badmeta/meta.json: not a preprocess meta file"),
        (("--model", "models/bad.pt"), {}, "models/bad.pt: not a loadable vaeops checkpoint"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(cli_project, cli_in_process, args, train, message):
    (cli_project / "partial").mkdir(exist_ok=True)
    shutil.copy(cli_project / "data/processed/meta.json", cli_project / "partial")
    (cli_project / "models/bad.pt").write_bytes(b"not a checkpoint")
    (cli_project / "badmeta").mkdir(exist_ok=True)
    (cli_project / "badmeta/meta.json").write_text("{")
    (cli_project / "models/other.json").write_text('{"run_id": "0123abcd"}')  # another training's
    before = tree(cli_project / "reports")
    code, err = cli_in_process(*args, **train)
    assert code == 2, err
    assert message in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert tree(cli_project / "reports") == before


def test_cli_writes_metrics_and_figures(cli_project, cli_in_process):
    code, err = cli_in_process()
    assert code == 0, err
    assert "active units" in err and "bits/dim (of the binarized test pixels)" in err
    assert json.loads((cli_project / "reports/metrics.json").read_text())["test"]["iwae_images"] == 20
    assert not (cli_project / "reports/figures/manifold.png").exists()  # latent_dim 3: PCA map instead


# --- real data, the real train stage, real DVC -------------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_evaluate_on_a_model_trained_on_real_mnist(tmp_path):
    """Real MNIST (from the shared copy, through download and preprocess) trained briefly by
    `vaeops train` with the default parts (Bernoulli on binarized pixels), then `dvc repro evaluate`:
    plausible numbers, metrics and plots shown."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    proj = tmp_path / "proj"
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("data/", "models/", "reports/")):
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    # the step of `make setup` that a clone needs for `dvc plots show`
    subprocess.run([sys.executable, "-m", "vaeops.plots"], cwd=proj, check=True, capture_output=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "VAEOPS_PROJECT_ROOT": str(proj),
        "VAEOPS_DATA_MIRROR": str(SHARED / "mnist"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # In params.yaml: inside a DVC stage, an exported override of a tracked param is refused.
    text = (proj / "params.yaml").read_text()
    for key, value in [
        ("train_limit", 10000),
        ("epochs", 2),
        ("lr_warmup_steps", 20),
        ("iwae_samples", 200),
        ("iwae_images", 200),
    ]:
        text, n = re.subn(rf"^(\s+{key}:) \S+", rf"\g<1> {value}", text, flags=re.M)
        assert n == 1, key
    (proj / "params.yaml").write_text(text)
    for stage in ("download", "preprocess", "train"):
        res = run_cli(stage, cwd=proj, env=env)
        assert res.returncode == 0, res.stderr

    def dvc(*args: str) -> str:
        res = subprocess.run(["dvc", *args], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    out = dvc("repro", "--single-item", "evaluate")
    assert "bits/dim (of the binarized test pixels)" in out
    t = json.loads((proj / "reports/metrics.json").read_text())["test"]
    assert set(t) == NORMALIZED | NORMALIZED_SETTINGS
    assert -200 < t["elbo"] < -80 and t["log_px_iwae"] > t["elbo_iwae_images"]
    assert 0.1 < t["bpd"] < 0.4  # binarized MNIST: ~0.13 for good models, 1 for a coin flip per pixel
    assert t["active_units"] >= 5
    by_class = json.loads((proj / "reports/elbo_by_class.json").read_text())
    assert max(by_class, key=lambda c: c["elbo"])["class"] == "1"  # ones are the easiest digit
    shown = dvc("metrics", "show")
    for col in ("test.elbo", "test.kl", "test.log_px_iwae", "test.bpd", "test.active_units"):
        assert col in shown
    dvc("plots", "show", "-o", "plots")
    html = (proj / "plots/index.html").read_text()
    for name in FIGURES | {"elbo_hist"}:
        assert f"reports_figures_{name}.png" in html


# --- a training that replaces the checkpoint while evaluate runs -----------------------------------


@pytest.mark.slow
def test_a_training_during_evaluate_gets_none_of_its_numbers(tmp_path, monkeypatch):
    """evaluate scores the checkpoint bytes it read. When `vaeops train` replaces them (and run.json)
    meanwhile, evaluate fails with one line and logs into neither run, and the previous reports stay.

    The evaluate process is paused (SIGSTOP) once its IWAE has started, so that the training
    certainly lands inside it however busy the machine is; then it is let go (SIGCONT)."""
    import signal

    import mlflow
    from conftest import isolate_mlflow, tiny_checkpoint, write_processed

    proj = tmp_path / "proj"
    write_processed(proj / "data/processed", {"train": 256, "val": 64, "test": 64})
    isolate_mlflow(monkeypatch, proj)
    old_run = tiny_checkpoint(proj, "mlp", (1, 28, 28), 20)
    params = {
        "train": {"epochs": 1, "batch_size": 64, "hidden_dim": 32, "channels": [4, 8]},
        "evaluate": {"iwae_samples": 20_000, "iwae_images": 0},
    }
    (proj / "params.yaml").write_text(json.dumps(params))
    previous = {"metrics.json": b'{"test": {"elbo": -1.0}}\n', "elbo_by_class.json": b"{}\n"}
    previous["figures/samples.png"] = b"an earlier evaluate's figure"
    for name, data in previous.items():
        (proj / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / "reports" / name).write_bytes(data)

    exe = Path(sys.executable).with_name("vaeops")
    evaluating = subprocess.Popen(
        [str(exe), "evaluate"], cwd=proj, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        while not any(line.startswith("IWAE: k=20000") for line in lines):
            line = evaluating.stderr.readline()
            assert line, "evaluate ended before its IWAE:\n" + "".join(lines)
            lines.append(line)
        evaluating.send_signal(signal.SIGSTOP)
        trained = run_cli("train", cwd=proj)
        assert trained.returncode == 0, trained.stderr
        evaluating.send_signal(signal.SIGCONT)
        err = "".join(lines) + evaluating.stderr.read()
        assert evaluating.wait(timeout=600) == 1, err
    finally:
        if evaluating.poll() is None:
            evaluating.send_signal(signal.SIGCONT)
            evaluating.kill()
            evaluating.wait()

    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: models/vae.pt was replaced while evaluate ran (a new training?); rerun evaluate"
    ]
    assert "Traceback" not in err
    assert {name: (proj / "reports" / name).read_bytes() for name in previous} == previous

    new_run = json.loads((proj / "models/run.json").read_text())["run_id"]
    assert new_run != old_run
    client = mlflow.MlflowClient()
    for run_id in (old_run, new_run):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert not [k for k in run.data.metrics if k.startswith("test")], run_id
        assert not [k for k in run.data.params if k.startswith("evaluate.")], run_id
        assert "vaeops.evaluate" not in run.data.tags
        assert not client.list_artifacts(run_id, "evaluate")
    # What train names and describes the new run with (no DVC experiment here).
    new = client.get_run(new_run)
    assert new.info.run_name == "mlp-z20-mnist-1ep"
    assert new.data.tags["mlflow.note.content"].startswith("**mlp VAE**")
    assert "z = 20, trained on mnist (256 images)" in new.data.tags["mlflow.note.content"]
    assert "`train.epochs` = 1, `train.batch_size` = 64" in new.data.tags["mlflow.note.content"]
