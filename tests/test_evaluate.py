"""evaluate: IWAE against exact quadrature, active units, metrics, figures, MLflow, CLI errors."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, tree
from PIL import Image

from vaeops import losses, models, tracking
from vaeops.config import EvaluateParams, TrainParams
from vaeops.stages import evaluate
from vaeops.stages.preprocess import save_split

SHAPE = (1, 12, 12)
CLASSES = [str(i) for i in range(10)]


def write_data(folder: Path, n: int = 60, shape: tuple[int, int, int] = SHAPE) -> Path:
    """test.npz + meta.json: per-class blobs at different places, so classes differ in latent space."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    images = np.zeros((n, *shape), dtype=np.uint8)
    for i, c in enumerate(labels):
        cy, cx = 2 + (c % 4) * 2.5, 2 + (c // 4) * 3.5
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4) + 0.2 * rng.random(shape[1:])
        images[i, 0] = np.clip(blob * 255, 0, 255).astype(np.uint8)
    save_split(folder / "test.npz", images, labels.astype(np.int64))
    meta = {"dataset": "mnist", "image_shape": list(shape), "classes": CLASSES}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_checkpoint(
    folder: Path, model: models.VAE, arch: str, binarize: bool = False, hidden_dim: int = 16
) -> str:
    """models/vae.pt + models/run.json as train writes them, with a 'training' run in the current store."""
    import mlflow

    experiment_id = tracking.setup("vaeops")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("train/elbo", -123.0)
    config = {
        "arch": arch,
        "latent_dim": model.latent_dim,
        "hidden_dim": hidden_dim,
        "image_shape": list(model.image_shape),
        "dataset": "mnist",
        "binarize": binarize,
    }
    state = models.checkpoint(model, config, run_id=run.info.run_id, epoch=1)
    models.save_checkpoint(folder / "models/vae.pt", state)
    tracking.write_run_file(folder / "models/run.json", run.info.run_id, experiment_id)
    return run.info.run_id


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


def dead_unit_mlp(latent_dim: int, dead: list[int], seed: int = 0) -> models.MLPVAE:
    """An MLP whose encoder mean ignores the input on `dead` dims and strongly depends on it elsewhere."""
    torch.manual_seed(seed)
    model = models.build_model("mlp", SHAPE, latent_dim, 16)
    with torch.no_grad():
        model.fc21.weight.mul_(20)
        model.fc21.weight[dead] = 0
        model.fc21.bias[dead] = 0.3  # a constant mean: no variance over the data however big it is
    return model.eval()


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
    """One evaluate run on a 2-D MLP with one dead latent dim (so the manifold figure is drawn too)."""
    folder = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, store, folder)
        write_data(folder / "data")
        run_id = write_checkpoint(folder, dead_unit_mlp(2, dead=[1]), "mlp")
        result = run_stage(folder, TrainParams(arch="mlp", latent_dim=2, hidden_dim=16), FAST)
        import mlflow

        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        artifacts = [a.path for a in client.list_artifacts(run_id, "evaluate")]
        logged = json.loads(
            Path(client.download_artifacts(run_id, "evaluate/elbo_by_class.json", str(folder))).read_text()
        )
        assert logged == json.loads((folder / "reports/elbo_by_class.json").read_text())
    return folder, result, run, artifacts


# --- the estimator -------------------------------------------------------------------------------


def test_iwae_is_above_the_elbo_and_rises_with_k():
    torch.manual_seed(0)
    model = models.build_model("mlp", SHAPE, 4, 16).double().eval()
    with torch.no_grad():  # a sharper decoder: a posterior far from q, so the bounds are nats apart
        model.fc3.weight.mul_(3)
        model.fc4.weight.mul_(3)
    x = torch.bernoulli(torch.full((40, *SHAPE), 0.3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    # k=1 is the single-sample ELBO; averaging 20 draws makes its mean precise enough to compare.
    elbo = torch.stack([losses.iwae_log_px(model, x, 1, generator=gen) for _ in range(20)]).mean()
    means = {k: losses.iwae_log_px(model, x, k, chunk=64, generator=gen).mean() for k in (10, 100, 1000)}
    assert elbo + 1 < means[10] < means[100] - 1 < means[1000] - 1


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_iwae_matches_the_textbook_formula_on_the_same_draws(arch):
    """The fast in-place log-weights equal log p(x|z) + log p(z) − log q(z|x) written out plainly."""
    torch.manual_seed(0)
    model = models.build_model(arch, SHAPE, 3, 16).eval()
    x = torch.rand(5, *SHAPE)
    k = 30
    fast = losses.iwae_log_px(model, x, k, chunk=k, generator=torch.Generator().manual_seed(1))

    def log_normal(z, mu, std):
        return torch.distributions.Normal(mu, std).log_prob(z).sum(-1)

    with torch.no_grad():
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn(k, *mu.shape, generator=torch.Generator().manual_seed(1)) * std
        log_px_z = -losses.recon_nll(model.decode_logits(z.flatten(0, 1)), x.repeat(k, 1, 1, 1)).view(k, -1)
        log_w = log_px_z + log_normal(z, torch.zeros(()), torch.ones(())) - log_normal(z, mu, std)
        plain = torch.logsumexp(log_w, 0) - math.log(k)
    assert torch.allclose(fast, plain, atol=2e-3), (fast, plain)


def exact_log_px(model: models.VAE, x: torch.Tensor) -> torch.Tensor:
    """log ∫ p(x|z) p(z) dz for a 1-D latent, by a Riemann sum on a fine grid over [-10, 10]."""
    z = torch.linspace(-10, 10, 40_001, dtype=torch.float64)[:, None]
    dz = float(z[1] - z[0])
    logits = model.decode_logits(z).flatten(1)  # G × pixels
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, None].expand(-1, len(x), -1), x.flatten(1)[None].expand(len(z), -1, -1), reduction="none"
    ).sum(-1)
    log_pz = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(log_px_z + log_pz, 0) + math.log(dz)


@torch.no_grad()
def test_iwae_converges_to_exact_log_likelihood_by_quadrature():
    """1-D latent, 1×2×2 images: the integral is exact to ~1e-9 here, so the estimator can be checked.

    Tolerance: 0.02 nats at k = 20 000 (observed error < 0.005); the k=1 ELBO is > 0.1 nats off.
    """
    torch.manual_seed(0)
    model = models.build_model("mlp", (1, 2, 2), 1, 8).double().eval()
    with torch.no_grad():  # a sharper decoder, so the posterior differs from q and k matters
        model.fc4.weight.mul_(4)
        model.fc3.weight.mul_(3)
    patterns = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.float64)
    x = patterns.view(-1, 1, 2, 2)
    exact = exact_log_px(model, x)
    gen = torch.Generator().manual_seed(0)
    iwae = losses.iwae_log_px(model, x, 20_000, chunk=5_000, generator=gen)
    elbo = torch.stack([losses.iwae_log_px(model, x, 1, generator=gen) for _ in range(4000)]).mean(0)
    assert (iwae - exact).abs().max() < 0.02, (iwae, exact)
    assert (elbo - exact).max() < 0  # the ELBO is a lower bound
    assert (exact - elbo).max() > 0.1
    # and the bound tightens monotonically on the way
    errs = [(exact - losses.iwae_log_px(model, x, k, generator=gen)).abs().mean() for k in (1, 10, 100, 1000)]
    assert errs == sorted(errs, reverse=True)


def test_active_units_count_the_dims_the_encoder_uses():
    torch.manual_seed(0)
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


# --- the stage -----------------------------------------------------------------------------------


def test_metrics_file_holds_the_numbers(evaluated):
    folder, result, _, _ = evaluated
    metrics = json.loads((folder / "reports/metrics.json").read_text())
    t = metrics["test"]
    assert t["elbo"] == pytest.approx(-(t["recon"] + t["kl"]), abs=1e-3)
    assert t["kl"] >= 0
    assert t["log_px_iwae"] > t["elbo_iwae_images"]  # k=50 over all 60 images: above the ELBO
    assert t["bpd"] == pytest.approx(-t["log_px_iwae"] / (144 * math.log(2)), abs=1e-4)
    assert t["active_units"] == 1  # dim 1 is dead
    assert (t["iwae_k"], t["iwae_images"], t["images"]) == (50, 60, 60)
    assert "elbo_by_class" not in t  # its own file: ten columns in `dvc exp show` were noise
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
    expected = {"samples", "reconstructions", "interpolations", "traversals", "latent_map", "elbo_hist"}
    assert names == {f"{n}.png" for n in expected | {"manifold"}}
    size = {n: Image.open(figs / n).size for n in names}  # (width, height)

    h, w = expected_grid(8, 8)
    assert size["samples.png"] == (w, h)  # no row labels: exactly the upscaled grid plus the header
    for name, rows, cols in [
        ("reconstructions.png", 8, 8),
        ("interpolations.png", FAST.interpolation_pairs, evaluate.INTERPOLATION_STEPS + 2),
        ("traversals.png", 2, len(evaluate.TRAVERSAL_VALUES)),  # traversal_dims=3 capped at latent_dim=2
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
    results = ("elbo", "recon", "kl", "log_px_iwae", "bpd", "active_units", "elbo_iwae_images")
    assert {k for k in logged if k.startswith("test")} == {f"test.{k}" for k in results}
    for key in results:
        assert logged[f"test.{key}"] == pytest.approx(metrics[key]), key
    params = run.data.params
    assert (params["evaluate.iwae_samples"], params["evaluate.iwae_images"]) == ("50", "60")
    assert (params["evaluate.test_images"], params["evaluate.seed"]) == ("60", "0")
    figs = [f"evaluate/{p.name}" for p in (folder / "reports/figures").iterdir()]
    assert sorted(artifacts) == sorted([*figs, "evaluate/elbo_by_class.json"])
    assert f"Test ELBO **{metrics['elbo']:.2f}** nats per image" in run.data.tags["mlflow.note.content"]


def test_same_checkpoint_gives_the_same_metrics_twice(tmp_path, monkeypatch, store):
    isolate(monkeypatch, store, tmp_path)
    write_data(tmp_path / "data")
    write_checkpoint(tmp_path, models.build_model("conv", SHAPE, 3, 16).eval(), "conv", binarize=True)
    train = TrainParams(arch="conv", latent_dim=3, binarize=True)
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
    model = models.model_from_checkpoint(models.load_checkpoint(tmp_path / "models/vae.pt"))
    x = torch.rand(10, *SHAPE)
    assert torch.equal(evaluate.elbo_pass(model, x, 0)["recon"], evaluate.elbo_pass(model, x, 0)["recon"])
    assert not torch.equal(evaluate.elbo_pass(model, x, 0)["recon"], evaluate.elbo_pass(model, x, 1)["recon"])


def test_a_tiny_test_split_still_gets_every_figure(tmp_path, monkeypatch, store):
    isolate(monkeypatch, store, tmp_path)
    write_data(tmp_path / "data", n=5)
    write_checkpoint(tmp_path, models.build_model("mlp", SHAPE, 2, 16).eval(), "mlp")
    params = EvaluateParams(iwae_samples=5, interpolation_pairs=3)
    result = run_stage(tmp_path, TrainParams(arch="mlp", latent_dim=2), params)
    assert result["test"]["iwae_images"] == 5  # iwae_images=1000 capped at the split size
    assert len(list((tmp_path / "reports/figures").iterdir())) == 7
    h, _ = expected_grid(2, 5)  # one input row of 5 over one reconstruction row
    assert Image.open(tmp_path / "reports/figures/reconstructions.png").size[1] == h


# --- usage errors through the real CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory, store):
    """A project folder with data, a 3-D MLP checkpoint and run file, and a params.yaml to edit."""
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, store, folder)
        write_data(folder / "data/processed")
        write_checkpoint(folder, models.build_model("mlp", SHAPE, 3, 16).eval(), "mlp")
    return folder


def write_params(folder: Path, **train: object) -> None:
    params = {
        "train": {"arch": "mlp", "latent_dim": 3, "hidden_dim": 16, **train},
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
        ((), {"binarize": True}, "train.binarize = False but params say train.binarize = True"),
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
    assert "active units" in err
    assert json.loads((cli_project / "reports/metrics.json").read_text())["test"]["iwae_images"] == 20
    assert not (cli_project / "reports/figures/manifold.png").exists()  # latent_dim 3: PCA map instead


# --- real data, real DVC --------------------------------------------------------------------------

PROCESSED = ROOT / "data/processed"


@pytest.mark.slow
@pytest.mark.skipif(
    not (PROCESSED / "test.npz").exists(), reason="data/processed absent (dvc repro preprocess)"
)
def test_dvc_repro_evaluate_on_real_mnist(tmp_path):
    """A briefly trained MLP on real MNIST through `dvc repro`: plausible numbers, metrics and plots shown."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    proj = tmp_path / "proj"
    for f in files:
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    shutil.copytree(PROCESSED, proj / "data/processed", dirs_exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "VAEOPS_PROJECT_ROOT": str(proj),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # In params.yaml: inside a DVC stage, an exported override of a tracked param is refused.
    small = (proj / "params.yaml").read_text().replace("iwae_images: 1000", "iwae_images: 200")
    (proj / "params.yaml").write_text(small.replace("iwae_samples: 1000", "iwae_samples: 200"))
    script = ["tests/scripts/quick_checkpoint.py", "--out", "models", "--epochs", "1", "--limit", "10000"]
    trained = subprocess.run(
        [sys.executable, *script], cwd=proj, env=env, capture_output=True, text=True, timeout=600
    )
    assert trained.returncode == 0, trained.stderr

    def dvc(*args: str) -> str:
        res = subprocess.run(["dvc", *args], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    dvc("repro", "--single-item", "evaluate")
    t = json.loads((proj / "reports/metrics.json").read_text())["test"]
    assert -200 < t["elbo"] < -90 and t["log_px_iwae"] > t["elbo_iwae_images"]
    assert t["active_units"] >= 5
    by_class = json.loads((proj / "reports/elbo_by_class.json").read_text())
    assert max(by_class, key=lambda c: c["elbo"])["class"] == "1"  # ones are the easiest digit
    shown = dvc("metrics", "show")
    for col in ("test.elbo", "test.kl", "test.log_px_iwae", "test.active_units"):
        assert col in shown
    dvc("plots", "show", "-o", "plots")
    html = (proj / "plots/index.html").read_text()
    for name in ("samples", "reconstructions", "interpolations", "traversals", "latent_map", "elbo_hist"):
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
        "train": {"epochs": 1, "batch_size": 64},
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
    assert new.data.tags["mlflow.note.content"].startswith(
        "**mlp VAE**, z = 20, trained on mnist (256 images)"
    )
    assert "`train.epochs` = 1, `train.batch_size` = 64" in new.data.tags["mlflow.note.content"]
