"""What the README says of the article's recipe, checked on real MNIST: plain SGD at lr 0.01 on the
batch-summed loss diverges (one line, exit 1), while the same SGD on the per-image mean trains."""

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent"),
]
ARTICLE = {
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.0,
    "loss_reduction": "sum",
    "lr_warmup_steps": 0,
    "lr_schedule": "none",
    "epochs": 1,
    "threads": 1,
}
ENV = {"VAEOPS_DATA_MIRROR": str(SHARED / "mnist")}


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("article")
    (proj / "params.yaml").write_text("preprocess:\n  train_limit: 4000\n  val_size: 500\n")
    for stage in ("download", "preprocess"):
        res = run_cli(stage, cwd=proj, env=ENV)
        assert res.returncode == 0, res.stderr
    return proj


def train(proj: Path, **changes) -> tuple:
    params = {"preprocess": {"train_limit": 4000, "val_size": 500}, "train": {**ARTICLE, **changes}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**ENV, "VAEOPS_PROJECT_ROOT": str(proj)}
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "MLFLOW_TRACKING_URI"}
    return run_cli("train", cwd=proj, env=env)


def test_the_readme_writes_the_recipe_as_tested():
    readme = (ROOT / "README.md").read_text()
    for key, value in ARTICLE.items():
        if key not in ("epochs", "threads"):
            assert f"-S train.{key}={value}" in readme, key


def test_article_recipe_diverges_with_one_line(mnist):
    res = train(mnist)
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "Traceback" not in res.stderr
    assert "train.lr = 0.01" in errors[0]


def test_same_sgd_on_the_per_image_mean_trains(mnist):
    res = train(mnist, loss_reduction="mean")
    assert res.returncode == 0, res.stderr
    val = json.loads((mnist / "reports/train.json").read_text())["val"]
    untrained = -784 * 0.6931  # logits ≈ 0 cost about ln 2 nats per pixel
    assert untrained + 100 < val["elbo"] < 0
