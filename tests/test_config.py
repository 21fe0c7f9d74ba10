"""params.yaml validation: every bad value fails before any work, on one line, exit code 2."""

from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tree

from vaeops.config import Params, load_params
from vaeops.errors import UsageError


def test_project_params_are_valid_and_equal_the_defaults():
    # params.yaml documents every key; the pydantic defaults are what an empty file means.
    assert load_params(ROOT / "params.yaml") == Params()


def test_environment_overrides_params_file(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text("train:\n  latent_dim: 3\n  arch: conv\n")
    monkeypatch.setenv("VAEOPS_TRAIN__LATENT_DIM", "32")
    p = load_params(tmp_path / "p.yaml")
    assert (p.train.latent_dim, p.train.arch) == (32, "conv")


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  latent_dim: 0\n", "train.latent_dim = 0: Input should be greater than or equal to 1"),
        ("data:\n  dataset: cifar\n", "data.dataset = 'cifar' is not allowed; expected 'mnist' or 'fash"),
        ("preprocess:\n  val_size: -1\n", "preprocess.val_size = -1: Input should be greater than or equal"),
        ("train:\n  latnt_dim: 3\n", "unknown key 'train.latnt_dim'"),
        ("optimizer: adam\n", "unknown key 'optimizer'"),
        ("train:\n  arch: resnet\n", "train.arch = 'resnet' is not allowed; expected 'mlp' or 'conv'"),
        ("train: [1, 2]\n", "train = [1, 2]: Input should be a valid dictionary"),
        ("train: {latent_dim: 2\n", "not valid YAML"),
        ("- 1\n", "expected a mapping of sections"),
    ],
)
def test_bad_params_are_one_clear_line(tmp_path, yaml_text, message):
    (tmp_path / "p.yaml").write_text(yaml_text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_params(tmp_path / "p.yaml")


def test_missing_params_file(tmp_path):
    with pytest.raises(UsageError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("stage", ["download", "preprocess"])
@pytest.mark.parametrize(
    "yaml_text, key",
    [("train:\n  latent_dim: 0\n", "train.latent_dim"), ("data:\n  dataset: cifar\n", "data.dataset")],
)
def test_cli_bad_params_exit_2_before_any_work(tmp_path, stage, yaml_text, key):
    (tmp_path / "params.yaml").write_text(yaml_text)
    res = run_cli(stage, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: params.yaml: {key} = ")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert tree(tmp_path) == {"params.yaml": yaml_text.encode()}


def test_cli_bad_env_override_exit_2(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("{}\n")
    res = run_cli("preprocess", cwd=tmp_path, env={"VAEOPS_PREPROCESS__VAL_SIZE": "-1"})
    assert res.returncode == 2 and "preprocess.val_size = '-1'" in res.stderr


def test_readme_params_reference_is_the_generated_one():
    from vaeops.config import reference_table

    text = (ROOT / "README.md").read_text()
    begin = text.index("<!-- params:begin")
    block = text[text.index("\n", begin) + 1 : text.index("<!-- params:end -->")].strip()
    assert block == reference_table(), "README params table is stale: paste the output of `vaeops params`"


def test_every_param_is_in_params_yaml_with_its_default():
    """params.yaml lists every key (it is the file users edit), each at the model's default."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = Params().model_dump()
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in defaults.items()}
