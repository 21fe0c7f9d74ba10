"""train: the real loop on tiny synthetic data, a real MLflow store (temp SQLite), the real CLI."""

import csv
import json
import signal
import typing
from contextlib import nullcontext
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, SHARED, isolate_mlflow, run_cli
from PIL import Image
from test_signals import start_training

from vaeops import tracking
from vaeops.config import TrainParams
from vaeops.device import native_bf16
from vaeops.errors import UsageError, WorkError
from vaeops.model.archs import ARCHS
from vaeops.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from vaeops.model.likelihoods import LIKELIHOODS
from vaeops.model.priors import PRIORS
from vaeops.model.vae import MODEL_KEYS, model_config
from vaeops.stages import train
from vaeops.training import loop
from vaeops.training.resume import RESUME_FREE

SHAPE = (1, 12, 12)
TINY = {"latent_dim": 4, "hidden_dim": 32, "batch_size": 32, "epochs": 2, "log_every_steps": 4}
TINY |= {"device": "cpu", "threads": 1}  # tiny models gain nothing from threads


def blobs(n: int, seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Bright rectangles on a dark background, one colour per image: structure a VAE can learn in a
    couple of epochs."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, *shape), dtype=np.uint8)
    for img in x:
        r, c = rng.integers(0, shape[1] - 4), rng.integers(0, shape[2] - 4)
        h, w = rng.integers(3, 6, 2)
        img[:, r : r + h, c : c + w] = rng.integers(150, 256, (shape[0], 1, 1))
    return x


def write_data(
    folder: Path, n_train: int = 384, n_val: int = 64, shape: tuple[int, int, int] = SHAPE
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        np.savez(folder / f"{name}.npz", images=blobs(n, seed, shape), labels=np.zeros(n, dtype=np.int64))
    (folder / "meta.json").write_text(json.dumps({"dataset": "mnist", "image_shape": list(shape)}))
    return folder


def paths(folder: Path, model: str = "models/vae.pt") -> train.Paths:
    return train.Paths(
        data=folder / "data/processed",
        model=folder / model,
        run_file=folder / "models/run.json",
        metrics=folder / "reports/train.json",
        curve=folder / "reports/train_curve.csv",
        samples=folder / "reports/train_samples.png",
    )


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp_path with tiny data, as the working directory, holding its own MLflow store."""
    isolate_mlflow(monkeypatch, tmp_path)
    write_data(tmp_path / "data/processed")
    return tmp_path


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_loss_decreases_and_outputs_follow_the_contract(project):
    result = train.run(TrainParams(**TINY | {"epochs": 3}), paths(project))
    curve = read_curve(project / "reports/train_curve.csv")
    assert [r["epoch"] for r in curve] == [1, 2, 3]
    assert list(curve[0]) == train.CURVE_COLUMNS
    assert curve[0]["train_elbo"] < curve[1]["train_elbo"] < curve[2]["train_elbo"]
    assert curve[0]["val_elbo"] < curve[2]["val_elbo"]
    for r in curve:  # elbo = −(recon + kl), KL ≥ 0
        assert r["val_elbo"] == pytest.approx(-(r["val_recon"] + r["val_kl"]))
        assert r["train_kl"] >= 0 and r["val_kl"] >= 0 and r["images_per_s"] > 0

    metrics = json.loads((project / "reports/train.json").read_text())
    assert metrics == result and metrics["epochs"] == 3 and metrics["seconds"] > 0
    assert metrics["precision"] == loop.resolve_precision(TrainParams(), torch.device("cpu"))
    assert metrics["val"]["elbo"] == pytest.approx(curve[-1]["val_elbo"])

    state = load_checkpoint(project / "models/vae.pt")
    assert state["config"] == {
        "arch": "mlp",
        "latent_dim": 4,
        "hidden_dim": 32,
        "hidden_layers": 1,
        "channels": [32, 64],
        "likelihood": "bernoulli",
        "logistic_components": 1,
        "prior": "normal",
        "prior_components": 500,
        "image_shape": list(SHAPE),
        "dataset": "mnist",
        "binarize": True,
    }
    assert state["epoch"] == 3
    assert state["run_id"] == json.loads((project / "models/run.json").read_text())["run_id"]
    model = model_from_checkpoint(state)
    assert model.decode(torch.zeros(2, 4)).shape == (2, *SHAPE)
    samples = np.asarray(Image.open(project / "reports/train_samples.png"))
    assert samples.shape == (8 * 14 + 2, 8 * 14 + 2, 3)  # 8×8 grid of 12×12 images, 2 px padding


def test_same_seed_same_curve_and_weights_other_seed_differs(project):
    for i, seed in enumerate((0, 0, 1)):
        p = paths(project, f"models/{i}.pt")
        p.curve = project / f"reports/{i}.csv"
        train.run(TrainParams(**TINY | {"seed": seed, "binarize": True}), p)
    columns = [c for c in train.CURVE_COLUMNS if c != "images_per_s"]
    a, b, c = (
        [{k: r[k] for k in columns} for r in read_curve(project / f"reports/{i}.csv")] for i in range(3)
    )
    assert a == b and a != c
    wa, wb, wc = (weights(project / f"models/{i}.pt") for i in range(3))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def cli_paths(tag: str) -> list[str]:
    """`vaeops train` options that put every output under tag/ (the defaults stay free for another run)."""
    names = {"--model": "vae.pt", "--run-file": "run.json", "--metrics": "train.json"}
    names |= {"--curve": "curve.csv", "--samples": "samples.png"}
    return [arg for option, name in names.items() for arg in (option, f"{tag}/{name}")]


# Many small steps per epoch, so a signal sent once epoch 1 is checkpointed lands inside epoch 2.
RESUMABLE = [
    {"kl_warmup_epochs": 2},  # the article's parts; the KL weight's schedule spans the stop
    # A learned prior (its pseudo-inputs carry optimizer state too), the IWAE objective, BatchNorm.
    {"arch": "conv", "channels": [4, 8], "likelihood": "logistic", "prior": "vamp", "prior_components": 3}
    | {"objective": "iwae", "iwae_k": 2},
]


@pytest.mark.slow
@pytest.mark.parametrize("parts", RESUMABLE, ids=["mlp", "conv-logistic-vamp-iwae"])
def test_cli_stopped_mid_epoch_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch, parts):
    isolate_mlflow(monkeypatch, tmp_path)
    tracking.setup("vaeops")  # this process reads the store the CLI writes
    write_data(tmp_path / "data/processed", n_train=1600)
    write_params(tmp_path, epochs=2, batch_size=4, lr_warmup_steps=50, log_every_steps=100, **parts)
    env = {"OMP_NUM_THREADS": "1"}
    straight = run_cli("train", *cli_paths("straight"), cwd=tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr

    # A real Ctrl-C to a real `vaeops train`, once epoch 1 is checkpointed: it stops at the next step's
    # end and keeps epoch 1's checkpoint, whole, with nothing half-written beside it.
    proc = start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: models/vae.pt holds the last finished epoch" in err and "Traceback" not in err
    ckpt = tmp_path / "models/vae.pt"
    stopped = load_checkpoint(ckpt)
    assert stopped["epoch"] == 1  # stopped during epoch 2
    assert [r["epoch"] for r in read_curve(tmp_path / "reports/train_curve.csv")] == [1]
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".vae.pt.")]  # no temp file left
    run_id = json.loads((tmp_path / "models/run.json").read_text())["run_id"]
    assert stopped["run_id"] == run_id and mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"

    res = run_cli("train", cwd=tmp_path, env=env | {"VAEOPS_TRAIN__RESUME": "true"})
    assert res.returncode == 0, res.stderr
    assert f"resuming MLflow run {run_id} after epoch 1 of 2" in res.stderr
    a, b = load_checkpoint(tmp_path / "straight/vae.pt"), load_checkpoint(ckpt)
    assert a["model"].keys() == b["model"].keys()
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert b["epoch"] == 2 and b["run_id"] == run_id  # the same MLflow run, re-entered and finished
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_id, "val/elbo")
    assert sorted({m.step for m in history}) == [1, 2]
    columns = [c for c in train.CURVE_COLUMNS if c != "images_per_s"]
    resumed_rows, straight_rows = (
        [{c: r[c] for c in columns} for r in read_curve(tmp_path / f)]
        for f in ("reports/train_curve.csv", "straight/curve.csv")
    )
    assert resumed_rows == straight_rows


def val_elbo_untrained(params: TrainParams, folder: Path) -> float:
    """The val ELBO of the model train.run starts from (same seed, same val targets), before a step."""
    train_u8, val_u8, meta = train.load_data(folder)
    config = model_config(params, SHAPE, "mnist")
    start = loop.make_loop(params, config, train_u8, torch.device("cpu"))
    val_x = loop.scale(val_u8, config["binarize"], torch.Generator().manual_seed(params.seed))
    recon, kl = loop.evaluate(start.model, val_x, nullcontext())
    return -(recon + kl)


def autocast_dtypes(params: TrainParams, data: torch.Tensor) -> set[torch.dtype]:
    """The dtypes the encoder and decoder compute in during one epoch of the training loop."""
    run = loop.make_loop(params, model_config(params, SHAPE, "mnist"), data, torch.device("cpu"))
    seen: set[torch.dtype] = set()
    run.model.encoder.register_forward_hook(lambda m, i, out: seen.add(out[0].dtype))
    run.model.decoder.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    loop.train_epoch(run, 1)
    return seen


def test_bf16_trains_in_bf16_close_to_fp32_and_far_better_than_untrained(project):
    base = TrainParams(**TINY | {"epochs": 3, "lr_warmup_steps": 0, "precision": "fp32"})
    bf16 = base.model_copy(update={"precision": "bf16"})
    # Inside a training step the model really runs in bfloat16 (fp32 with precision fp32).
    data = torch.from_numpy(blobs(64, 0))
    assert autocast_dtypes(bf16, data) == {torch.bfloat16}
    assert autocast_dtypes(base, data) == {torch.float32}

    fp32_paths, bf16_paths = paths(project, "models/fp32.pt"), paths(project, "models/bf16.pt")
    bf16_paths.curve = project / "reports/bf16.csv"
    fp32 = train.run(base, fp32_paths)["val"]["elbo"]
    low = train.run(bf16, bf16_paths)["val"]["elbo"]
    untrained = val_elbo_untrained(base, project / "data/processed")
    gain = fp32 - untrained
    assert gain > 0
    # bf16 rounds differently: other weights and numbers, but learning as much, within a tenth of the gain.
    wa, wb = weights(fp32_paths.model), weights(bf16_paths.model)
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)
    assert low != fp32 and abs(low - fp32) < 0.1 * gain
    curve = read_curve(bf16_paths.curve)
    assert curve[0]["train_elbo"] < curve[1]["train_elbo"] < curve[2]["train_elbo"]
    assert all(t.dtype == torch.float32 for t in wb.values() if t.is_floating_point())


def test_auto_precision_is_bf16_only_where_native_and_for_proven_parts():
    cpu = torch.device("cpu")
    here = "bf16" if native_bf16(cpu) else "fp32"
    assert loop.resolve_precision(TrainParams(precision="auto", arch="conv"), cpu) == here
    for part, names in loop.BF16_PARTS["cpu"].items():
        field = TrainParams.model_fields[part].annotation
        for name in set(typing.get_args(field)) - names:  # a part bf16 does not pay off for: fp32
            parts = {"arch": "conv", part: name}
            assert loop.resolve_precision(TrainParams(precision="auto", **parts), cpu) == "fp32"
    for chosen in ("fp32", "bf16"):
        assert loop.resolve_precision(TrainParams(precision=chosen, arch="resnet"), cpu) == chosen
    # The same answer as the CPU's own flags (Linux); a machine without /proc/cpuinfo says fp32.
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    assert native_bf16(cpu) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_checkpoint_is_resumed_only_in_the_precision_it_was_trained_in(project):
    params = TrainParams(**TINY | {"epochs": 2})
    train.run(params, paths(project))
    state = load_checkpoint(project / "models/vae.pt")
    used = loop.resolve_precision(params, torch.device("cpu"))
    assert state["precision"] == used
    # As if trained on a machine where train.precision = auto meant the other precision.
    other = {"fp32": "bf16", "bf16": "fp32"}[used]
    torch.save(state | {"precision": other}, project / "models/vae.pt")
    again = params.model_copy(update={"resume": True})
    with pytest.raises(UsageError, match=f"trained in {other}, and train.precision = auto means {used} here"):
        train.run(again, paths(project))


def test_iwae_training_with_one_sample_is_elbo_training():
    """With a learned prior the ELBO's KL is a one-sample estimate too, so k = 1 trains identically."""
    data = torch.from_numpy(blobs(96, 0))
    trained = []
    for objective in ("elbo", "iwae"):
        params = TrainParams(**TINY | {"prior": "vamp", "prior_components": 3, "objective": objective})
        params = params.model_copy(update={"iwae_k": 1, "lr_warmup_steps": 0})
        run = loop.make_loop(params, model_config(params, SHAPE, "mnist"), data, torch.device("cpu"))
        ep = loop.train_epoch(run, 1)
        trained.append((ep["recon"], ep["kl"], run.model.state_dict()))
    (recon_a, kl_a, a), (recon_b, kl_b, b) = trained
    assert (recon_a, kl_a) == (recon_b, kl_b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def rotated(*registries: typing.Iterable[str]) -> list[tuple[str, ...]]:
    """Combinations in which every registered part appears at least once (each registry shifted by
    one, so the defaults' combination, trained by every other test, is not among them)."""
    lists = [list(r) for r in registries]
    n = max(len(r) for r in lists)
    return [tuple(r[(i + (j > 0)) % len(r)] for j, r in enumerate(lists)) for i in range(n)]


OBJECTIVES = typing.get_args(TrainParams.model_fields["objective"].annotation)
RGB = (3, 16, 12)


@pytest.mark.parametrize(
    "arch, likelihood, prior, objective", rotated(ARCHS, LIKELIHOODS, PRIORS, OBJECTIVES)
)
def test_every_part_trains_through_the_stage_on_odd_sized_rgb(
    tmp_path, monkeypatch, arch, likelihood, prior, objective
):
    isolate_mlflow(monkeypatch, tmp_path)
    write_data(tmp_path / "data/processed", n_train=64, n_val=16, shape=RGB)
    parts = {"arch": arch, "likelihood": likelihood, "prior": prior, "objective": objective}
    parts |= {"channels": [4, 8], "prior_components": 3, "logistic_components": 2, "iwae_k": 2}
    result = train.run(TrainParams(**TINY | parts | {"batch_size": 16}), paths(tmp_path))
    assert all(np.isfinite(result[split][k]) for split in ("train", "val") for k in ("elbo", "recon", "kl"))
    state = load_checkpoint(tmp_path / "models/vae.pt")
    assert {k: state["config"][k] for k in parts if k in MODEL_KEYS} == {
        k: v for k, v in parts.items() if k in MODEL_KEYS
    }
    assert state["config"]["image_shape"] == list(RGB) and state["config"]["binarize"] == (
        likelihood == "bernoulli"
    )
    model = model_from_checkpoint(state)
    assert model.sample(2, torch.Generator().manual_seed(0)).shape == (2, *RGB)
    samples = np.asarray(Image.open(tmp_path / "reports/train_samples.png"))
    assert samples.shape == (8 * 18 + 2, 8 * 14 + 2, 3)  # 8×8 grid of 16×12 colour images, 2 px padding
    assert (samples[..., 0] != samples[..., 1]).any()  # colour, not grey repeated


def test_resume_refuses_changed_params(project):
    params = TrainParams(**TINY | {"epochs": 1})
    train.run(params, paths(project))
    before = (project / "models/vae.pt").read_bytes()
    with pytest.raises(UsageError, match=f"train.lr = {TrainParams().lr}, now 0.01"):
        train.run(params.model_copy(update={"resume": True, "lr": 0.01}), paths(project))
    with pytest.raises(UsageError, match="latent_dim"):
        train.run(params.model_copy(update={"resume": True, "latent_dim": 5}), paths(project))
    with pytest.raises(UsageError, match="'prior': 'normal'.*not .*'prior': 'vamp'"):
        train.run(params.model_copy(update={"resume": True, "prior": "vamp"}), paths(project))
    with pytest.raises(UsageError, match="train.objective = 'elbo', now 'iwae'"):
        train.run(params.model_copy(update={"resume": True, "objective": "iwae"}), paths(project))
    assert (project / "models/vae.pt").read_bytes() == before
    # A checkpoint from before a param was renamed (train.bf16 → train.precision) names the old key.
    old = load_checkpoint(project / "models/vae.pt")
    old["params"]["bf16"] = False
    save_checkpoint(project / "models/vae.pt", old)
    with pytest.raises(UsageError, match=r"older vaeops with train\.bf16, which no longer exist"):
        train.run(params.model_copy(update={"resume": True}), paths(project))


def test_mlflow_run_has_params_curves_images_and_tags(project, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    train.run(TrainParams(**TINY | {"arch": "conv", "experiment": "train-test"}), paths(project))
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "train-test"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.arch"] == "conv" and run.data.params["train.lr"] == str(TrainParams().lr)
    assert run.data.params["data.dataset"] == "mnist" and run.data.params["data.image_shape"] == "1x12x12"
    used = loop.resolve_precision(TrainParams(arch="conv"), torch.device("cpu"))
    assert run.data.params["train.precision"] == "auto" and run.data.params["train.precision_used"] == used
    tags = run.data.tags
    assert tags["dataset"] == "mnist" and tags["arch"] == "conv" and tags["dvc_experiment"] == "tiny-exp"
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    keys = ["train/elbo", "train/recon", "train/kl", "val/elbo", "val/recon", "val/kl", "lr", "images_per_s"]
    for key in keys:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    curve = read_curve(project / "reports/train_curve.csv")
    assert client.get_metric_history(run_id, "val/elbo")[-1].value == pytest.approx(curve[-1]["val_elbo"])
    # 12 steps per epoch, logged every 4 global steps.
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [4, 8, 12, 16, 20, 24]

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(project / "art")))
    for name in ("samples/epoch_001.png", "samples/epoch_002.png", "reconstructions/epoch_002.png"):
        img = np.asarray(Image.open(local / name))
        side = 8 * (12 + 2) + 2  # 8×8 grid of 12×12 images, 2 px padding
        assert img.shape == (side, side, 3), name
    # Samples come from a fixed z: the grid changes between epochs only because the model does.
    assert not np.array_equal(
        np.asarray(Image.open(local / "samples/epoch_001.png")),
        np.asarray(Image.open(local / "samples/epoch_002.png")),
    )


def test_divergence_mid_run_keeps_the_last_good_epoch(project, monkeypatch):
    params = TrainParams(**TINY | {"epochs": 3, "optimizer": "sgd", "lr": 1e-3})
    # An lr that blows up from the first step of epoch 2 (12 steps per epoch).
    real_lr = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda s, total, p: 1e12 if s >= 12 else real_lr(s, total, p))
    with pytest.raises(WorkError) as err:
        train.run(params, paths(project))
    msg = str(err.value)
    assert "training diverged at epoch 2, step " in msg and "learning rate" in msg
    assert "keeps epoch 1, the last good one" in msg and "\n" not in msg
    assert load_checkpoint(project / "models/vae.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_curve(project / "reports/train_curve.csv")] == [1]
    assert not (project / "reports/train.json").exists()
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"


def write_params(folder: Path, **train_params) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TINY | train_params)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_divergent_lr_exits_1_with_one_line_and_keeps_checkpoint(project):
    train.run(TrainParams(**TINY | {"epochs": 1}), paths(project))  # what the CLI's defaults point at
    before = {p: (project / p).read_bytes() for p in ("models/vae.pt", "models/run.json")}

    # The article's recipe pushed to the extreme: SGD, summed-loss-sized lr.
    write_params(project, epochs=1, optimizer="sgd", lr=1e6, lr_schedule="none")
    res = run_cli("train", cwd=project)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged at epoch 1, step ")
    assert "learning rate is likely too high" in lines[-1] and "train.lr = 1000000.0" in lines[-1]
    assert "Traceback" not in res.stderr
    assert {p: (project / p).read_bytes() for p in before} == before


def test_cli_path_options_and_bad_data(project):
    write_params(project, epochs=1)
    args = ["--data", "data/processed", "--model", "m/v.pt", "--run-file", "m/r.json"]
    args += ["--metrics", "r/t.json", "--curve", "r/c.csv", "--samples", "r/s.png"]
    res = run_cli("train", *args, cwd=project)
    assert res.returncode == 0, res.stderr
    assert "epoch 1/1" in res.stderr  # one plain line per epoch when not on a terminal
    assert all((project / p).is_file() for p in ("m/v.pt", "m/r.json", "r/t.json", "r/c.csv", "r/s.png"))

    meta = {"dataset": "mnist", "image_shape": [1, 28, 28]}
    (project / "data/processed/meta.json").write_text(json.dumps(meta))
    res = run_cli("train", *args[:2], "--model", "m/w.pt", cwd=project)
    assert res.returncode == 2
    assert "train.npz: images are uint8 [384, 1, 12, 12], expected uint8 N×1×28×28" in res.stderr
    assert not (project / "m/w.pt").exists()
    res = run_cli("train", "--data", "nowhere", cwd=project)
    assert res.returncode == 2 and "nowhere/meta.json: missing" in res.stderr


def test_lr_schedule_and_kl_warmup():
    p = TrainParams(lr=1e-3, lr_warmup_steps=10, lr_schedule="cosine")
    lrs = [loop.lr_at(s, 110, p) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5e-4) and lrs[-1] < 1e-6
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert loop.lr_at(50, 110, TrainParams(lr=1e-3, lr_schedule="none", lr_warmup_steps=0)) == 1e-3
    assert [loop.beta_at(s, 4, 1.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert loop.beta_at(0, 0, 0.5) == 0.5


def test_batches_are_scaled_or_binarized_whole():
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    assert torch.equal(loop.scale(x, False, None), x.float() / 255)
    gen = torch.Generator().manual_seed(0)
    big = torch.full((1000, 10), 51, dtype=torch.uint8)  # p = 0.2
    b = loop.scale(big, True, gen)
    assert set(b.unique().tolist()) == {0.0, 1.0} and abs(b.mean().item() - 0.2) < 0.01
    # Every level v is 1 with probability v/255: black always 0, white always 1.
    levels = torch.arange(256, dtype=torch.uint8).repeat(4001, 1)
    b = loop.scale(levels, True, gen)
    assert b.shape == levels.shape and b.dtype == torch.float32
    assert b[:, 0].sum() == 0 and b[:, 255].sum() == len(levels)
    assert (b.mean(0) - torch.arange(256) / 255).abs().max() < 0.04  # 5 standard deviations
    odd = loop.scale(x, True, gen)  # 3 pixels: not a whole number of 64-bit draws
    assert odd.shape == x.shape and odd[0, 0] == 0 and odd[0, 2] == 1
    # A seeded draw: the same generator state gives the same targets, the next draw others.
    gen, same = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = loop.scale(levels, True, gen)
    assert torch.equal(first, loop.scale(levels, True, same)) and not torch.equal(
        first, loop.scale(levels, True, gen)
    )


def test_dvc_stage_declares_what_train_reads_and_writes():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc["stages"]["train"]
    assert stage["cmd"] == "vaeops train"
    # Exactly the params that change the weights: the rest (threads, device, ...) may change freely.
    weights = {f"train.{k}" for k in TrainParams.model_fields if k not in RESUME_FREE}
    assert set(stage["params"]) == weights
    modules = ["stages/train", "tracking", "figures"]
    # Every module of the training package: one added later must be declared too.
    package = ROOT / "src/vaeops/training"
    modules += [f"training/{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"]
    # The model core as a folder: a part added to it is a dependency without a dvc.yaml edit.
    code = {f"src/vaeops/{m}.py" for m in modules} | {"src/vaeops/model"}
    data = {f"data/processed/{f}" for f in ("train.npz", "val.npz", "meta.json")}
    assert set(stage["deps"]) == code | data
    assert stage["outs"] == [{"models/vae.pt": {"persist": True}}, "models/run.json"]
    assert stage["metrics"] == [{"reports/train.json": {"cache": False}}]
    assert [next(iter(p)) for p in stage["plots"]] == ["reports/train_curve.csv", "reports/train_samples.png"]
    drawn = {
        c for plot in dvc["plots"] for spec in plot.values() for c in spec["y"]["reports/train_curve.csv"]
    }
    assert {"train_elbo", "val_elbo", "train_kl", "val_kl"} <= drawn <= set(train.CURVE_COLUMNS)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_dvc_repro_train_on_real_mnist_plots_and_resume(tmp_path):
    from test_pipeline import copy_project, dvc

    proj = copy_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["preprocess"].update(train_limit=3000, val_size=1000)
    params["train"].update(epochs=2, threads=1)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("repro", "train", cwd=proj)
    metrics = json.loads((proj / "reports/train.json").read_text())
    curve = read_curve(proj / "reports/train_curve.csv")
    assert metrics["epochs"] == 2 and [r["epoch"] for r in curve] == [1, 2]
    # 2 × 23 steps, still in the lr warm-up: far from converged, but learning (random init: ~ -540).
    assert curve[0]["val_elbo"] < curve[1]["val_elbo"] == metrics["val"]["elbo"] < -100

    shown = json.loads(dvc("plots", "show", "--json", cwd=proj).stdout)
    # (Other stages' plots, not produced by `repro train`, may report errors of their own.)
    assert not [e for e in shown.get("errors", []) if "train" in e["source"]]
    assert {"ELBO (nats per image, higher is better)", "KL (nats per image)"} <= set(shown["data"])
    assert any("train_samples.png" in name for name in shown["data"])
    dvc("plots", "show", cwd=proj)
    assert "KL (nats per image)" in (proj / "dvc_plots/index.html").read_text()

    assert "Running stage" not in dvc("repro", "train", cwd=proj).stdout  # nothing changed

    # train.resume on a finished run. DVC does not track train.resume (it leaves the weights as they
    # are), so the rerun is forced; DVC must not delete the persistent checkpoint first, so train
    # picks up after epoch 2 and trains nothing more.
    before = (proj / "models/vae.pt").read_bytes()
    params["train"]["resume"] = True
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage" not in dvc("repro", "train", cwd=proj).stdout
    res = dvc("repro", "--force", "--single-item", "train", cwd=proj)
    assert "Running stage 'train'" in res.stdout and "after epoch 2 of 2" in res.stdout + res.stderr
    assert (proj / "models/vae.pt").read_bytes() == before
    again = json.loads((proj / "reports/train.json").read_text())
    assert again["val"] == metrics["val"] and again["epochs"] == 2
