"""End to end for the open model core: `dvc repro` (all five stages) and `vaeops sample` in a temp
copy of the project, for combinations of data and parts beyond the default.

- your own RGB images (generated here: no RGB data set is reachable offline) with resnet +
  discretized logistic;
- grey MNIST (real, small profile) with continuous Bernoulli + VampPrior + the IWAE objective;
- Fashion-MNIST (real) with the default parts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED, run_cli
from PIL import Image
from test_pipeline import copy_project

pytestmark = pytest.mark.slow

SMALL = {
    "preprocess": {"val_size": 100, "train_limit": 400},
    "train": {"epochs": 1, "batch_size": 50, "lr_warmup_steps": 0, "latent_dim": 4},
    "evaluate": {"iwae_samples": 4, "iwae_images": 50, "traversal_dims": 2, "interpolation_pairs": 2},
}


def shapes(folder: Path, n: int = 60, seed: int = 0) -> None:
    """Two classes of RGB images of odd sizes: red discs on dark ground, blue bars on light ground."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("discs", "bars")):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(18, 30, 2)
            yy, xx = np.mgrid[:h, :w]
            image = np.full((h, w, 3), 40 if label == 0 else 200, np.uint8)
            if label == 0:
                mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
                image[mask] = (220, 30, 30)
            else:
                image[:, w // 3 : w // 2] = (20, 40, 230)
            image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / name / f"{i}.png")


def merge(base: dict, extra: dict) -> dict:
    return {k: {**base.get(k, {}), **extra.get(k, {})} for k in base.keys() | extra.keys()}


def repro(proj: Path, params: dict, mirror: Path | None) -> None:
    text = yaml.safe_load((proj / "params.yaml").read_text())
    (proj / "params.yaml").write_text(yaml.safe_dump(merge(text, params)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("VAEOPS_DATA_MIRROR", None)
    if mirror is not None:
        env["VAEOPS_DATA_MIRROR"] = str(mirror)
    res = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def sampled_colour(proj: Path, n: int = 8) -> bool:
    """Run the torch-free sampler; whether its grid has colour (grey grids repeat one channel)."""
    res = run_cli("sample", "-n", str(n), "--out", "s.png", cwd=proj)
    assert res.returncode == 0, res.stderr
    image = np.asarray(Image.open(proj / "s.png").convert("RGB")).astype(int)
    return bool(np.abs(image - image[..., :1]).max() > 0)


def test_own_rgb_images_resnet_logistic(tmp_path):
    proj = copy_project(tmp_path / "proj")
    shapes(tmp_path / "images")
    params = {
        "data": {"dataset": "folder", "path": str(tmp_path / "images"), "image_size": 16, "channels": 3},
        "preprocess": {"val_size": 20, "test_size": 20, "train_limit": 0},
        "train": {
            "arch": "resnet",
            "channels": [8, 16],
            "likelihood": "logistic",
            "logistic_components": 2,
            "epochs": 15,
            "batch_size": 16,
        },
    }
    repro(proj, merge(SMALL, params), None)
    metrics = json.loads((proj / "reports/metrics.json").read_text())["test"]
    # A normalized likelihood of 8-bit RGB: log p(x) and bits/dim are reported, and bits/dim is
    # −log p(x) over 3·16·16 dims in bits.
    assert metrics["bpd"] == pytest.approx(-metrics["log_px_iwae"] / (3 * 16 * 16 * np.log(2)), rel=1e-3)
    assert 0 < metrics["bpd"] < 8  # trained: below the 8 bits of a uniform model of 8-bit pixels
    meta = json.loads((proj / "data/processed/meta.json").read_text())
    assert meta["classes"] == ["bars", "discs"] and meta["image_shape"] == [3, 16, 16]
    assert sampled_colour(proj)


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_grey_mnist_continuous_bernoulli_vamp_iwae(tmp_path):
    proj = copy_project(tmp_path / "proj")
    params = {
        "train": {
            "likelihood": "continuous_bernoulli",
            "prior": "vamp",
            "prior_components": 10,
            "objective": "iwae",
            "iwae_k": 3,
        }
    }
    repro(proj, merge(SMALL, params), SHARED / "mnist")
    metrics = json.loads((proj / "reports/metrics.json").read_text())["test"]
    assert {"elbo", "log_px_iwae", "bpd"} <= metrics.keys() and "bce" not in metrics
    # A density on [0, 1]: log p(x) may be positive; the IWAE bound is at least the ELBO on average.
    assert metrics["log_px_iwae"] > metrics["elbo_iwae_images"] - 1.0
    assert not sampled_colour(proj)


FASHION = next(
    (p for p in (SHARED / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")) if p.exists()), None
)


@pytest.mark.skipif(FASHION is None, reason="no Fashion-MNIST copy (../shared or dataset-fashion-mnist)")
def test_fashion_mnist_through_every_stage(tmp_path):
    proj = copy_project(tmp_path / "proj")
    repro(proj, merge(SMALL, {"data": {"dataset": "fashion-mnist"}}), FASHION)
    by_class = json.loads((proj / "reports/elbo_by_class.json").read_text())
    assert "Ankle boot" in json.dumps(by_class)
    assert (proj / "models/decoder.onnx").is_file() and (proj / "models/prior.onnx").is_file()
    assert not sampled_colour(proj)
