"""DDP: `vaeops train` with train.nproc = 2 (torchrun, gloo, 2 CPU processes) follows the trajectory of
one process with the same global batch, and only rank 0 writes outputs and an MLflow run."""

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, isolate_mlflow, run_cli

from vaeops import tracking
from vaeops.model.checkpoint import load_checkpoint, model_from_checkpoint

# Float sums are reduced in another order (per-rank partial sums, then gloo's all-reduce), so the
# runs agree to rounding, not bit for bit; measured differences are ~1e-6 relative.
RTOL = 1e-4
TERMS = ["train_elbo", "train_recon", "train_kl", "val_elbo", "val_recon", "val_kl", "lr"]


def write_data(folder: Path, n_train: int = 512, n_val: int = 128) -> None:
    """28×28 blobs: bright rectangles a VAE learns from in a couple of epochs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("val", n_val)):
        x = np.zeros((n, 1, 28, 28), dtype=np.uint8)
        for img in x:
            r, c = rng.integers(0, 18, 2)
            h, w = rng.integers(4, 10, 2)
            img[0, r : r + h, c : c + w] = rng.integers(150, 256)
        np.savez(folder / f"{name}.npz", images=x, labels=np.zeros(n, dtype=np.int64))
    (folder / "meta.json").write_text(json.dumps({"dataset": "mnist", "image_shape": [1, 28, 28]}))


def train_cli(folder: Path, nproc: int, tag: str, **parts) -> dict[str, Path]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(
        arch="mlp", latent_dim=8, hidden_dim=64, epochs=2, batch_size=64, binarize=True, lr=5e-3
    )
    params["train"].update(parts)
    params["train"].update(lr_warmup_steps=4, threads=1, device="cpu", log_every_steps=4, nproc=nproc)
    (folder / f"{tag}.yaml").write_text(yaml.safe_dump(params))
    out = {k: folder / tag / v for k, v in (("model", "vae.pt"), ("curve", "curve.csv"))}
    args = ["--params", f"{tag}.yaml", "--model", str(out["model"]), "--curve", str(out["curve"])]
    args += ["--run-file", f"{tag}/run.json", "--metrics", f"{tag}/train.json", "--samples", f"{tag}/s.png"]
    res = run_cli("train", *args, cwd=folder, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


def curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(row[k]) for k in TERMS} for row in csv.DictReader(f)]


# The article's parts, and a learned prior trained by IWAE: the pseudo-inputs go through the encoder
# outside DDP's forward, yet their gradient must be averaged over the ranks like every other.
PARTS = [{}, {"prior": "vamp", "prior_components": 4, "objective": "iwae", "iwae_k": 3}]


@pytest.mark.slow
@pytest.mark.parametrize("parts", PARTS, ids=["article", "vamp-iwae"])
def test_two_processes_follow_one_process_and_only_rank_0_records(tmp_path, monkeypatch, parts):
    isolate_mlflow(monkeypatch, tmp_path)
    write_data(tmp_path / "data/processed")
    one = train_cli(tmp_path, 1, "one", **parts)
    two = train_cli(tmp_path, 2, "two", **parts)

    a, b = curve(one["curve"]), curve(two["curve"])
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        for k in TERMS:
            assert rb[k] == pytest.approx(ra[k], rel=RTOL), k
    assert a[1]["train_elbo"] > a[0]["train_elbo"]  # it did learn something

    wa, wb = load_checkpoint(one["model"])["model"], load_checkpoint(two["model"])["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)
    model = model_from_checkpoint(load_checkpoint(two["model"]))
    assert model.decode(torch.zeros(3, 8)).shape == (3, 1, 28, 28)

    # One MLflow run per training (rank 1 opened none), with the averaged curves and step losses.
    experiment = tracking.setup("vaeops")  # the embedded store in tmp_path both trainings used
    assert len(mlflow.search_runs([experiment], output_format="list")) == 2
    run_id = json.loads((tmp_path / "two/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).data.params["train.nproc"] == "2"
    history = client.get_metric_history(run_id, "val/elbo")
    assert [m.value for m in history] == pytest.approx([r["val_elbo"] for r in b], rel=1e-9)
    one_id = json.loads((tmp_path / "one/run.json").read_text())["run_id"]
    la = [m.value for m in client.get_metric_history(one_id, "train/loss")]
    lb = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert len(lb) == 4 and lb == pytest.approx(la, rel=RTOL)  # 8 steps an epoch, every 4th logged


def test_nproc_needs_a_global_batch_it_can_split(tmp_path, monkeypatch):
    isolate_mlflow(monkeypatch, tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(nproc=2, batch_size=63)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = run_cli("train", "--data", "nowhere", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size = 63 (global) does not split evenly over train.nproc = 2 processes; "
        "use a multiple of 2"
    )
    assert not (tmp_path / "models").exists()
