"""params.yaml validation: every bad value fails before any work, on one line, exit code 2."""

import os
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tree

from vaeops.config import (
    MAX_SEED,
    MAX_TRAIN_GIB,
    Params,
    TrainParams,
    env_overrides,
    load_params,
    train_memory_gib,
)
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
        ("data:\n  dataset: cifar\n", "data.dataset = 'cifar' is not allowed; expected 'mnist', 'fash"),
        ("preprocess:\n  val_size: -1\n", "preprocess.val_size = -1: Input should be greater than or equal"),
        ("train:\n  latnt_dim: 3\n", "unknown key 'train.latnt_dim'"),
        ("optimizer: adam\n", "unknown key 'optimizer'"),
        ("train:\n  bf16: true\n", "p.yaml: train.bf16 was renamed to train.precision: auto "),
        ("train:\n  arch: vit\n", "train.arch = 'vit' is not allowed; expected 'mlp', 'conv' or 'resnet'"),
        ("train: [1, 2]\n", "train = [1, 2] is not a mapping; list its keys indented under 'train:'"),
        ("train:\n  lr: .nan\n", "train.lr = nan: Input should be a finite number"),
        (
            "train:\n  batch_size: 10000000\n",
            "train.batch_size = 10000000: Input should be less than or equal",
        ),
        ("evaluate:\n  seed: -1\n", "evaluate.seed = -1: Input should be greater than or equal to 0"),
        ("train:\n  a: 1\n  b: 2\n  a: 3\n", "p.yaml:4: duplicate key 'a'"),
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
    assert res.returncode == 2
    expected = (
        "VAEOPS_PREPROCESS__VAL_SIZE = '-1' (preprocess.val_size): Input should be greater than or equal to 0"
    )
    assert res.stderr == f"error: {expected}\n"


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


@pytest.fixture
def clean_env(monkeypatch):
    """No VAEOPS_* param variables or DVC stage from the caller's shell."""
    for var in list(os.environ):
        if var.upper().startswith("VAEOPS_") or var in ("DVC_STAGE", "DVC_ROOT"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_env_overrides_as_given_and_merged(tmp_path, clean_env):
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    clean_env.setenv("VAEOPS_TRAIN", '{"epochs": 4, "beta": 0.5}')
    clean_env.setenv("VAEOPS_TRAIN__EPOCHS", "5")  # the single key beats the whole section
    clean_env.setenv("VAEOPS_DATA_MIRROR", "/somewhere")  # a setting, not a param
    assert env_overrides() == {"train": '{"epochs": 4, "beta": 0.5}', "train.epochs": "5"}
    p = load_params(tmp_path / "p.yaml").train
    assert (p.epochs, p.beta, p.lr) == (5, 0.5, 0.01)


@pytest.mark.parametrize(
    "value, mirrors",
    [
        ("http://127.0.0.1:9/", ["http://127.0.0.1:9/"]),
        ("http://a/, http://b/", ["http://a/", "http://b/"]),
        ('["http://a/"]', ["http://a/"]),
        ("", []),
    ],
)
def test_list_param_from_a_plain_string(tmp_path, clean_env, value, mirrors):
    (tmp_path / "p.yaml").write_text("{}\n")
    clean_env.setenv("VAEOPS_DATA__MIRRORS", value)
    assert load_params(tmp_path / "p.yaml").data.mirrors == mirrors


def test_empty_section_means_its_defaults(tmp_path, clean_env):
    (tmp_path / "p.yaml").write_text("train:\n  # epochs: 3\n")
    assert load_params(tmp_path / "p.yaml") == Params()


FLOATS = [
    (section, name)
    for section, field in Params.model_fields.items()
    for name, f in field.annotation.model_fields.items()
    if f.annotation is float
]


@pytest.mark.parametrize("section, name", FLOATS, ids=[f"{s}.{n}" for s, n in FLOATS])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_param_is_finite(tmp_path, clean_env, section, name, value):
    (tmp_path / "p.yaml").write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(UsageError, match=f"{section}.{name} = .*: Input should be a finite number"):
        load_params(tmp_path / "p.yaml")


def test_seed_bounds_are_what_numpy_and_torch_accept():
    import numpy as np
    import torch

    np.random.seed(MAX_SEED)
    torch.manual_seed(MAX_SEED)
    TrainParams(seed=MAX_SEED)
    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED + 1)


def test_memory_estimate_grows_with_the_model_and_caps_it(tmp_path, clean_env):
    small = train_memory_gib(TrainParams())
    assert small < 1
    assert train_memory_gib(TrainParams(hidden_dim=4000)) > 5 * small
    assert train_memory_gib(TrainParams(arch="conv")) > train_memory_gib(TrainParams(arch="mlp"))
    (tmp_path / "p.yaml").write_text("train:\n  arch: conv\n")
    clean_env.setenv("VAEOPS_TRAIN__HIDDEN_DIM", "60000")
    with pytest.raises(UsageError) as e:
        load_params(tmp_path / "p.yaml")
    assert str(e.value).startswith(
        "VAEOPS_TRAIN__HIDDEN_DIM: train.latent_dim = 20, hidden_dim = 60000"
    ) and f"over the {MAX_TRAIN_GIB} GiB" in str(e.value)


DVC_YAML = """
stages:
  a:
    cmd: vaeops download
    params: [data, train.epochs]
  b:
    cmd: vaeops evaluate
    params:
      - evaluate.seed
      - other.yaml: [train.lr]
"""


@pytest.mark.parametrize(
    "var, value, refused",
    [
        ("VAEOPS_TRAIN__EPOCHS", "2", True),  # a tracked key
        ("VAEOPS_DATA__TIMEOUT_S", "5", True),  # a key of a tracked section
        ("VAEOPS_TRAIN", '{"threads": 1, "epochs": 2}', True),  # a whole section holding a tracked key
        ("VAEOPS_EVALUATE__SEED", "1", True),
        ("VAEOPS_TRAIN__THREADS", "1", False),  # untracked: it changes no result DVC records
        ("VAEOPS_TRAIN", '{"threads": 1}', False),
        ("VAEOPS_TRAIN__LR", "0.1", False),  # tracked in another params file only
        ("VAEOPS_DATA_MIRROR", "/x", False),  # settings, not params
        ("VAEOPS_DEBUG", "1", False),
    ],
)
def test_inside_dvc_overrides_of_tracked_params_are_refused(tmp_path, clean_env, var, value, refused):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    clean_env.setenv(var, value)
    load_params(tmp_path / "params.yaml")  # outside DVC every override is fine
    clean_env.setenv("DVC_STAGE", "a")
    if refused:
        with pytest.raises(
            UsageError, match=f"^{var} overrides .*, which DVC tracks: .* use `dvc exp run -S "
        ):
            load_params(tmp_path / "params.yaml")
    else:
        load_params(tmp_path / "params.yaml")


def test_inside_dvc_without_a_dvc_yaml_every_override_is_refused(tmp_path, clean_env):
    (tmp_path / "params.yaml").write_text("{}\n")
    clean_env.setenv("VAEOPS_TRAIN__THREADS", "1")
    clean_env.setenv("DVC_STAGE", "a")
    with pytest.raises(UsageError, match="overrides train.threads, which DVC tracks"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "root").mkdir()
    (tmp_path / "root/dvc.yaml").write_text(DVC_YAML)
    clean_env.setenv("DVC_ROOT", str(tmp_path / "root"))  # the stage's project root, as DVC sets it
    assert load_params(tmp_path / "params.yaml").train.threads == 1


def test_unknown_variable_gets_a_did_you_mean(tmp_path, clean_env):
    (tmp_path / "p.yaml").write_text("{}\n")
    clean_env.setenv("VAEOPS_TRAIN__LATENTDIM", "3")
    with pytest.raises(
        UsageError,
        match="^VAEOPS_TRAIN__LATENTDIM is not a vaeops variable; did you mean VAEOPS_TRAIN__LATENT_DIM\\?",
    ):
        load_params(tmp_path / "p.yaml")
