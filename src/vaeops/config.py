"""Typed params: one pydantic model per `params.yaml` section, overridable by environment.

`VAEOPS_TRAIN__LATENT_DIM=32` overrides `train.latent_dim` (`VAEOPS_TRAIN='{"latent_dim": 32}'` a whole
section). Unknown keys or variables and invalid values fail before any work with one line naming the
key (or the variable), the value and what is allowed (exit code 2). Inside a DVC stage, overriding a
param that dvc.yaml tracks is refused: DVC would record params.yaml's value, not the one used.
"""

import difflib
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from vaeops.errors import UsageError

ENV_PREFIX = "VAEOPS_"
# VAEOPS_* variables that are settings of the machine, not params: DVC does not track them.
NOT_PARAMS = frozenset(
    {"VAEOPS_DATA_MIRROR", "VAEOPS_SYSTEM_DATASETS", "VAEOPS_PROJECT_ROOT", "VAEOPS_DEBUG", "VAEOPS_TIMINGS"}
)

MAX_SEED = 2**32 - 1
MAX_WORKERS = 1024
MAX_LATENT = 4096
MAX_HIDDEN = 65_536
MAX_BATCH = 1_000_000
MAX_FIGURE_ROWS = 100
# Training memory above this is refused up front, before torch tries to allocate it (train_memory_gib).
MAX_TRAIN_GIB = 64
TRAIN_IMAGES = 60_000  # the largest training split (MNIST, Fashion-MNIST), 28×28 pixels
PIXELS = 28 * 28

# Renamed keys: a params file or variable still using the old name is told the new one.
RENAMED = {"train.bf16": "train.precision: auto | fp32 | bf16 (`bf16: true` is `precision: bf16`)"}

# Why each upper bound exists: appended to the error of a value above it.
BOUND_WHY = {
    "seed": "numpy and torch take seeds in [0, 2**32)",
    "threads": f"more threads than cores only slows torch down; {MAX_WORKERS} is above any CPU's core count",
    "nproc": f"one process per core or GPU; {MAX_WORKERS} is above any single machine",
    "timeout_s": "an HTTP source silent for an hour is down",
    "latent_dim": f"a 28×28 image has {PIXELS} pixels, and z's layers grow with latent_dim × hidden_dim",
    "hidden_dim": "the dense layers grow with hidden_dim² (conv) and hidden_dim × pixels",
    "batch_size": f"the largest training split has {TRAIN_IMAGES} images (a bigger batch is all of it)",
    "iwae_batch": f"decoded images held at once: {MAX_BATCH} × {PIXELS} float32 is already ~3 GB",
    "traversal_dims": "rows of one figure",
    "interpolation_pairs": "rows of one figure",
}


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are valid YAML floats but never a sensible param.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class DataParams(Section):
    # The registry in src/vaeops/datasets/ has one entry per name.
    dataset: Literal["mnist", "fashion-mnist", "cifar10", "folder"] = Field(
        "mnist", description="mnist, fashion-mnist, cifar10, or folder (your images at data.path)"
    )
    # Extra base URLs tried after VAEOPS_DATA_MIRROR and the system folder; empty means the
    # dataset's canonical public mirrors (see src/vaeops/datasets/).
    mirrors: list[str] = Field(
        default_factory=list, description="extra base URLs to download from; empty = canonical public mirrors"
    )
    timeout_s: float = Field(
        30.0, gt=0, le=3600, description="seconds an HTTP read may wait; a whole file gets 10× that"
    )
    # Only `folder` reads these three: the other datasets come in one size and colour.
    path: str = Field(
        "", description="folder: where your PNG/JPEG images are (one sub-folder per class, or none)"
    )
    image_size: int = Field(
        32, ge=4, le=1024, description="folder: side of the square images (centre crop, then resize)"
    )
    # The environment gives text, and a Literal of ints takes no "3" for 3.
    channels: Annotated[
        Literal[1, 3],
        BeforeValidator(lambda v: int(v) if isinstance(v, str) and v.strip() in ("1", "3") else v),
    ] = Field(3, description="folder: 1 (greyscale) or 3 (RGB); every image is converted")


class PreprocessParams(Section):
    val_size: int = Field(5000, ge=0, description="images split off the training set")
    test_size: int = Field(
        5000, ge=1, description="images split off for the test set, where the dataset has none (folder)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the validation (and folder test) split")
    # Keep only the first N training images after the split (0 = all): a small-data profile.
    train_limit: int = Field(0, ge=0, description="keep only N training images (0 = all): small-data profile")


class TrainParams(Section):
    # The model's parts (src/vaeops/model/): each name is a key of that part's registry.
    arch: Literal["mlp", "conv", "resnet"] = Field(
        "mlp", description="mlp (the article code), conv (the article's description) or resnet"
    )
    latent_dim: int = Field(20, ge=1, le=MAX_LATENT, description="width of z")
    hidden_dim: int = Field(400, ge=1, le=MAX_HIDDEN, description="hidden layer width (dense layers)")
    hidden_layers: int = Field(1, ge=1, le=8, description="mlp: hidden layers in encoder and decoder")
    channels: list[Annotated[int, Field(ge=1, le=MAX_HIDDEN)]] = Field(
        default_factory=lambda: [32, 64],
        min_length=1,
        max_length=6,
        description="conv/resnet: channels per level; each level halves H and W",
    )
    likelihood: Literal["bernoulli", "continuous_bernoulli", "logistic"] = Field(
        "bernoulli", description="p(x|z): bernoulli (the article), continuous_bernoulli, or logistic (8-bit)"
    )
    logistic_components: int = Field(1, ge=1, le=10, description="logistic: mixture components per channel")
    prior: Literal["normal", "vamp"] = Field("normal", description="p(z): normal N(0, I) or vamp (VampPrior)")
    prior_components: int = Field(500, ge=1, le=5000, description="vamp: pseudo-inputs")
    objective: Literal["elbo", "iwae"] = Field("elbo", description="elbo, or iwae with iwae_k samples")
    iwae_k: int = Field(5, ge=1, le=1000, description="iwae: importance samples per image in training")
    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="images per optimizer step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with momentum")
    # 5e-3 after a 500-step warm-up, then cosine decay: a lower test −ELBO than pytorch/examples'
    # constant 1e-3 after 10 and after 50 epochs (README, Benchmarks; benchmarks/train_quality.py).
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
    # The article sums the loss over the batch, so its gradient (and the step a learning rate makes)
    # grows with batch_size; the mean keeps one learning rate good for any batch size.
    loss_reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean or sum (the article) of the per-image loss over a batch"
    )
    binarize: bool = Field(
        True, description="bernoulli: dynamically binarized targets (a true likelihood) instead of grey"
    )
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 disables clipping")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of init, shuffling, sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present, else cpu")
    # CPU threads for torch (0 = torch's default, one per core). On a shared, busy machine 1 can be
    # many times faster: every op waits for its slowest thread to be scheduled.
    threads: int = Field(0, ge=0, le=MAX_WORKERS, description="torch CPU threads (0 = one per core)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training math; auto = bf16 where native (GPU, AVX512-BF16/AMX) for proven parts"
    )
    compile: bool = Field(False, description="CUDA only: torch.compile the model")
    resume: bool = Field(False, description="continue from models/vae.pt")
    log_every_steps: int = Field(100, ge=1, description="log the train loss to MLflow every N steps")
    experiment: str = Field("vaeops", min_length=1, description="MLflow experiment name")
    # > 1: `vaeops train` relaunches itself under torchrun (DistributedDataParallel, gloo on CPU, nccl on
    # CUDA); batch_size stays the global batch, split evenly over the processes.
    nproc: int = Field(
        1, ge=1, le=MAX_WORKERS, description="training processes (torchrun DDP); batch_size stays global"
    )


class EvaluateParams(Section):
    iwae_samples: int = Field(1000, ge=1, description="k importance samples per image")
    # The whole test split by default (benchmarks/evaluate_speed.py times it); on CPU a conv decoder
    # takes minutes for it, and evaluate says how many after its first batch.
    iwae_images: int = Field(
        0, ge=0, description="test images for the IWAE estimate (seeded subset); 0 = all"
    )
    # Samples drawn at once (on a GPU also decoded at once; a CPU decodes them a cache-sized step at a
    # time): 20k keeps a conv model's activations under ~1 GB and gives a GPU enough work per call.
    iwae_batch: int = Field(20_000, ge=1, le=MAX_BATCH, description="max IWAE samples drawn at once")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="IWAE decoder; auto = bf16 for a Bernoulli where native (GPU, AVX512-BF16/AMX)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of sampling and image choice")
    traversal_dims: int = Field(
        5, ge=1, le=MAX_FIGURE_ROWS, description="rows of traversals.png (most active dims)"
    )
    interpolation_pairs: int = Field(6, ge=1, le=MAX_FIGURE_ROWS, description="rows of interpolations.png")
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


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataParams = Field(default_factory=DataParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)


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


def train_memory_gib(p: TrainParams) -> float:
    """A rough upper estimate of what training holds at once for 28×28 images, in GiB of float32:
    weights, gradients and Adam's two moments (4 copies) plus one batch's activations and their
    gradients. Only the dense layers and feature maps count; biases and BatchNorm are noise."""
    h, z = p.hidden_dim, p.latent_dim
    weights = h * (2 * PIXELS + 3 * z)  # image → hidden → (mu, logvar); z → hidden → image
    per_image = 2 * PIXELS + 2 * h + 3 * z
    if p.arch in ("conv", "resnet"):
        maps, area = 0, PIXELS
        for c in p.channels:  # each level's feature maps at its size; resnet keeps ~6 per level
            maps += c * area * (6 if p.arch == "resnet" else 1)
            area //= 4
        feat = p.channels[-1] * area
        weights = h * (2 * feat + 2 * h + 3 * z) + sum(9 * c * c for c in p.channels) * 4
        per_image += 2 * maps  # encoder and decoder
    if p.objective == "iwae":
        per_image *= p.iwae_k  # k decoded samples per image
    batch = min(p.batch_size, TRAIN_IMAGES) + (p.prior_components if p.prior == "vamp" else 0)
    return 4 * (4 * weights + 2 * batch * per_image) / 2**30


# --- the environment -------------------------------------------------------------------------------


def _env_names() -> dict[str, tuple[str, str | None]]:
    """Every param variable: VAEOPS_TRAIN → (train, None), VAEOPS_TRAIN__EPOCHS → (train, epochs)."""
    names: dict[str, tuple[str, str | None]] = {}
    for section, field in Params.model_fields.items():
        names[f"{ENV_PREFIX}{section.upper()}"] = (section, None)
        for key in field.annotation.model_fields:
            names[f"{ENV_PREFIX}{section.upper()}__{key.upper()}"] = (section, key)
    return names


def _param_vars(environ: typing.Mapping[str, str]) -> list[tuple[str, str, str | None, str]]:
    """(variable, section, key or None, value) of each VAEOPS_* param variable, sorted; unknown ones fail."""
    names = _env_names()
    found = []
    for var in sorted(environ):
        upper = var.upper()  # case-insensitive, as pydantic-settings matches them
        if not upper.startswith(ENV_PREFIX) or upper in NOT_PARAMS:
            continue
        old = upper.removeprefix(ENV_PREFIX).lower().replace("__", ".")
        if old in RENAMED:
            raise UsageError(f"{var}: {old} was renamed to {RENAMED[old]}")
        if upper not in names:
            # Compared without the common prefix, which would make every name look close.
            known = [name.removeprefix(ENV_PREFIX) for name in [*names, *NOT_PARAMS]]
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), known, n=1)
            hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "params are VAEOPS_<SECTION>__<KEY>"
            raise UsageError(f"{var} is not a vaeops variable; {hint} (see README, Params reference)")
        found.append((var, *names[upper], environ[var]))
    return found


def env_overrides(environ: typing.Mapping[str, str] | None = None) -> dict[str, str]:
    """Params set by the environment: `train.epochs` (or `train` for a whole section) → the value as
    given. Raises UsageError on an unknown VAEOPS_* variable."""
    environ = os.environ if environ is None else environ
    return {
        section if key is None else f"{section}.{key}": value
        for _, section, key, value in _param_vars(environ)
    }


def _parse_env(var: str, section: str, key: str | None, text: str) -> Any:
    """The value a variable stands for: a JSON object for a whole section, a list for a list param
    (JSON, or comma-separated), else the string itself (pydantic converts it)."""
    if key is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise UsageError(
                f"{var} = {text!r} is not a JSON object of {section} keys; e.g. {var}='{{\"key\": value}}', "
                f"or set one key with {var}__<KEY>"
            )
        return value
    annotation = Params.model_fields[section].annotation.model_fields[key].annotation
    if typing.get_origin(annotation) is list:
        if text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{var} = {text!r} is not a JSON list ({e.msg})") from None
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def dvc_tracked(dvc_yaml: Path, params_name: str = "params.yaml") -> set[str] | None:
    """Keys listed under `params:` of any stage (`train`, `data.dataset`); None without a dvc.yaml."""
    try:
        doc = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise UsageError(f"{dvc_yaml}: cannot read it to check DVC-tracked params ({first})") from None
    if not isinstance(doc, dict):
        doc = {}
    tracked: set[str] = set()
    for stage in (doc.get("stages") or {}).values():
        stage = stage.get("do", stage) if isinstance(stage, dict) else {}  # foreach/matrix stages
        for entry in stage.get("params") or []:
            if isinstance(entry, str):
                tracked.add(entry)
            elif isinstance(entry, dict):
                for file, keys in entry.items():
                    if Path(file).name == params_name:
                        tracked.update(keys or Params.model_fields)  # no keys: the whole file
    return tracked


def _refuse_tracked_overrides(found: list[tuple[str, str, str | None, Any]], params_path: Path) -> None:
    """Inside a DVC stage, an environment override of a tracked param would make DVC record
    params.yaml's value for a run that used another: refuse it."""
    if not found or "DVC_STAGE" not in os.environ:
        return
    tracked = dvc_tracked(params_path.resolve().parent / "dvc.yaml", params_path.name)
    if tracked is None and os.environ.get("DVC_ROOT"):
        tracked = dvc_tracked(Path(os.environ["DVC_ROOT"]) / "dvc.yaml", params_path.name)
    for var, section, key, value in found:
        items = value.items() if key is None else [(key, value)]
        for k, v in items:
            name = f"{section}.{k}"
            if tracked is None or section in tracked or name in tracked:
                shown = ",".join(map(str, v)) if isinstance(v, list) else v
                file = params_path.name
                raise UsageError(
                    f"{var} overrides {name}, which DVC tracks: DVC would record {file}'s value, not this "
                    f"one; unset it and use `dvc exp run -S {name}={shown}` (or edit {file})"
                )


# --- reading ---------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one, DVC rejects the file."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; --params takes a YAML file such as params.yaml")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: params file not found (run from the project root)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the params file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader) or {}
    except _DuplicateKey as e:
        raise UsageError(
            f"{path}:{e.line}: duplicate key '{e.key}' (DVC rejects such a file too); keep one"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for section in Params.model_fields:
        if raw.get(section, {}) is None:
            raw[section] = {}  # a section whose keys are all commented out: the defaults
        elif not isinstance(raw.get(section, {}), dict):
            raise UsageError(
                f"{path}: {section} = {raw[section]!r} is not a mapping; list its keys indented under "
                f"'{section}:' (see README, Params reference)"
            )
    return raw


def _describe(err: dict[str, Any], where: str, origin: dict[str, str]) -> str:
    """One line for a pydantic error, naming the variable when the value came from the environment."""
    key = ".".join(str(p) for p in err["loc"])
    var = origin.get(".".join(str(p) for p in err["loc"][:2]))
    if var is None:
        prefix, subject = f"{where}: ", f"{key} = {err['input']!r}"
    elif "__" in var:  # one key: the variable, its value as given, and the key it sets
        prefix, subject = "", f"{var} = {err['input']!r} ({key})"
    else:  # a whole section as JSON
        prefix, subject = f"{var}: ", f"{key} = {err['input']!r}"
    if err["type"] == "extra_forbidden" and key in RENAMED:
        return f"{prefix}{key} was renamed to {RENAMED[key]}"
    if err["type"] == "extra_forbidden":
        return f"{prefix}unknown key '{key}' (value {err['input']!r}); check the spelling against README"
    if err["type"] == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{prefix}{subject} is not allowed; expected {allowed}"
    why = BOUND_WHY.get(str(err["loc"][-1])) if err["type"] in ("less_than", "less_than_equal") else None
    return f"{prefix}{subject}: {err['msg']}" + (f" ({why})" if why else "")


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate every section, environment overrides applied; raise UsageError with one
    line on the first problem."""
    path = Path(path)
    raw = _read_yaml(path)
    found = [(var, s, k, _parse_env(var, s, k, text)) for var, s, k, text in _param_vars(os.environ)]
    _refuse_tracked_overrides(found, path)

    # Whole sections first, so that VAEOPS_TRAIN__EPOCHS beats an epochs in VAEOPS_TRAIN.
    origin: dict[str, str] = {}
    for var, section, key, value in sorted(found, key=lambda f: f[2] is not None):
        values = value if key is None else {key: value}
        raw[section] = {**raw.get(section, {}), **values}
        origin.update({f"{section}.{k}": var for k in values})
    try:
        params = Params(**raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(_describe(errors[0], str(path), origin) + more) from None

    gib = train_memory_gib(params.train)
    if gib > MAX_TRAIN_GIB:
        t = params.train
        # Name the variables when the environment set any of the three, else the params file.
        keys = ("train.latent_dim", "train.hidden_dim", "train.batch_size")
        sources = sorted({origin[k] for k in keys if k in origin}) or [str(path)]
        raise UsageError(
            f"{', '.join(sources)}: train.latent_dim = {t.latent_dim}, hidden_dim = {t.hidden_dim}, "
            f"batch_size = {t.batch_size} ({t.arch}) would hold ~{gib:.0f} GiB while training (weights, "
            f"gradients, Adam moments, one batch), over the {MAX_TRAIN_GIB} GiB refused up front; lower them"
        )
    return params
