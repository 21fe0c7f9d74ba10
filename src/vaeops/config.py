"""Typed params: one pydantic model per `params.yaml` section, overridable by environment.

`VAEOPS_TRAIN__LATENT_DIM=32` overrides `train.latent_dim`. Unknown keys and invalid values fail
before any work with one line naming the key, the value and what is allowed (exit code 2).
"""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from vaeops.errors import UsageError

DATASETS = ("mnist", "fashion-mnist")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataParams(Section):
    dataset: Literal["mnist", "fashion-mnist"] = Field("mnist", description="dataset to train on")
    # Extra base URLs tried after VAEOPS_DATA_MIRROR and the system folder; empty means the
    # dataset's canonical public mirrors (see datasets.py).
    mirrors: list[str] = Field(
        default_factory=list, description="extra base URLs to download from; empty = canonical public mirrors"
    )
    timeout_s: float = Field(30.0, gt=0, description="seconds before an HTTP source counts as unreachable")


class PreprocessParams(Section):
    val_size: int = Field(5000, ge=0, description="images split off the training set")
    seed: int = Field(0, ge=0, description="seed of the validation split")
    # Keep only the first N training images after the split (0 = all): a small-data profile.
    train_limit: int = Field(0, ge=0, description="keep only N training images (0 = all): small-data profile")


class TrainParams(Section):
    arch: Literal["mlp", "conv"] = Field("mlp", description="mlp (the article code) or conv")
    latent_dim: int = Field(20, ge=1, description="width of z")
    hidden_dim: int = Field(400, ge=1, description="hidden layer width (dense layers)")
    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with momentum")
    # 5e-3 after a 500-step warm-up, then cosine decay: test −ELBO 103.2 after 10 epochs and 100.3
    # after 50 (pytorch/examples' constant 1e-3: 106.0 / 102.1); see benchmarks/train_quality.py.
    lr: float = Field(5e-3, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    lr_schedule: Literal["none", "cosine"] = Field(
        "cosine", description="none, or cosine decay per step from lr to lr_min over all epochs"
    )
    lr_min: float = Field(0.0, ge=0, description="where the cosine schedule ends")
    lr_warmup_steps: int = Field(500, ge=0, description="linear lr warm-up from lr/N to lr")
    beta: float = Field(1.0, ge=0, description="weight of the KL term (β-VAE)")
    kl_warmup_epochs: int = Field(0, ge=0, description="epochs over which the KL weight ramps 0 → beta")
    binarize: bool = Field(False, description="dynamically binarized pixel targets instead of [0, 1]")
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 disables clipping")
    seed: int = Field(0, ge=0, description="seed of init, shuffling, sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present, else cpu")
    # CPU threads for torch (0 = torch's default, one per core). On a shared, busy machine 1 can be
    # many times faster: every op waits for its slowest thread to be scheduled.
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = one per core)")
    bf16: bool = Field(False, description="bf16 autocast (CUDA, or CPUs with AVX512-BF16/AMX)")
    compile: bool = Field(False, description="CUDA only: torch.compile the model")
    resume: bool = Field(False, description="continue from models/vae.pt")
    log_every_steps: int = Field(100, ge=1, description="log the train loss to MLflow every N steps")
    experiment: str = Field("vaeops", min_length=1, description="MLflow experiment name")
    # > 1: `vaeops train` relaunches itself under torchrun (DistributedDataParallel, gloo on CPU, nccl on
    # CUDA); batch_size stays the global batch, split evenly over the processes.
    nproc: int = Field(1, ge=1, description="training processes (torchrun DDP); batch_size stays global")


class EvaluateParams(Section):
    iwae_samples: int = Field(1000, ge=1, description="k importance samples per image")
    # k=1000 over all 10 000 test images takes ~3 min (mlp) and ~20 min (conv) on 2 shared CPU
    # cores, so by default the estimate uses a seeded random subset (mlp: −108.76 on 1000 images vs
    # −108.89 on all); 0 = the whole test split.
    iwae_images: int = Field(1000, ge=0, description="test images for the IWAE estimate; 0 = all")
    # Decoded images held at once: on CPU, chunks from 1k to 20k ran equally fast within noise; 20k
    # keeps a conv model's activations under ~1 GB and gives a GPU enough work per call.
    iwae_batch: int = Field(20_000, ge=1, description="max decoded images per IWAE chunk")
    seed: int = Field(0, ge=0, description="seed of sampling and image choice")
    traversal_dims: int = Field(5, ge=1, description="rows of traversals.png (most active dims)")
    interpolation_pairs: int = Field(6, ge=1, description="rows of interpolations.png")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present, else cpu")


class ExportParams(Section):
    # torch 2.13's exporter writes opset 18 natively; asking for less needs a down-conversion that
    # fails (silently keeping 18) for ops like Relu or Identity.
    opset: int = Field(18, ge=18, description="ONNX opset")
    atol: float = Field(1e-5, gt=0, description="parity: allowed absolute difference")
    rtol: float = Field(1e-5, gt=0, description="parity: allowed difference relative to the torch value")
    registered_model_name: str = Field(
        "vaeops-decoder", min_length=1, description="MLflow registry name of the decoder"
    )


class Params(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VAEOPS_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    data: DataParams = Field(default_factory=DataParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats params.yaml (passed as init kwargs), so a one-off override needs no edit.
        return (env_settings, init_settings)


def reference_table() -> str:
    """The README's params reference, generated from the models so it cannot drift."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, field in Params.model_fields.items():
        model = field.annotation
        for name, f in model.model_fields.items():
            default = f.get_default(call_default_factory=True)
            if f.description is None:
                raise ValueError(f"{section}.{name} has no description")
            rows.append(f"| `{section}.{name}` | `{default!r}` | {f.description} |")
    return "\n".join(rows)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}' (value {err['input']!r}); check the spelling against README"
    if err["type"] == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{key} = {err['input']!r} is not allowed; expected {allowed}"
    return f"{key} = {err['input']!r}: {err['msg']}"


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate every section; raise UsageError with one line on the first problem."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: params file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params(**raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(f"{path}: {_describe(errors[0])}{more}") from None
