"""export: the checkpoint's decoder (z → the likelihood's mean image), encoder (image → mu, logvar) and
prior (noise → z) as ONNX, proven equal to PyTorch in eval mode before they replace the previous models.

The prior graph makes `vaeops sample` draw from the model's own p(z) without torch. Every prior here is
a mixture of K diagonal Gaussians (N(0, I) is K = 1), so one small graph serves all: given noise
eps ~ N(0, I) and u ~ U[0, 1), z = mu_k + eps·exp(logvar_k / 2) with k = floor(u·K). The components
are constants, computed once here in eval mode (for the VampPrior: the encoder on its pseudo-inputs).

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). With torch 2.13 it gives the
cleaner graph: eval-mode BatchNorm is folded into the Gemms, and the conv decoder's ConvTranspose
outputs keep exact static H×W, whereas the legacy TorchScript exporter (`dynamo=False`, deprecated)
keeps BatchNormalization nodes and leaves the image's H and W symbolic. Its one trap: an example batch
of 1 is specialised into a constant, so we trace with a batch of EXAMPLE_BATCH, declare the batch dim
dynamic, and then check that the graph really says so and that batches of 1, 3 and 257 run.

MLflow: the three models and the parity report go into the run that trained the checkpoint, by run id
(its status stays what training left); the decoder is registered, that version tagged with what it is
(the prior's logged model included), and the alias `latest-export` moved to it.
"""

import importlib.metadata
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from vaeops import tracking
from vaeops.config import ExportParams
from vaeops.errors import UsageError, WorkError
from vaeops.io import atomic_path, write_json
from vaeops.model.checkpoint import model_from_checkpoint, read_checkpoint
from vaeops.model.vae import VAE
from vaeops.progress import log, work

EXAMPLE_BATCH = 4
SHAPE_CHECK_BATCHES = (1, 3, 257)
PARITY_SEED = 0
LARGE_BATCH = 512
EXTREME_Z = 6.0
ALIAS = "latest-export"  # moved to each new decoder version: models:/<name>@latest-export


class Decoder(nn.Module):
    """z → the likelihood's mean image in [0, 1]: consumers get pixels, not the likelihood's parameters."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)


class Encoder(nn.Module):
    """image in [0, 1] → (mu, logvar) of q(z|x)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.vae.encode(image)


def prior_components(model: VAE) -> tuple[np.ndarray, np.ndarray]:
    """The prior's mixture as float32 K×D means and log-variances (N(0, I): one zero component)."""
    with torch.inference_mode():
        mu, logvar = model.prior.components(model.encode)
    return mu.float().numpy(), logvar.float().numpy()


def prior_graph(mu: np.ndarray, logvar: np.ndarray, opset: int) -> onnx.ModelProto:
    """(eps [batch, D], u [batch]) → z = mu_k + eps·exp(logvar_k / 2), k = floor(u·K) clipped to
    0..K−1 (u·K may round up to K in float32): a draw from the mixture of K diagonal Gaussians, given
    its noise. Built by hand: it is a handful of ops around two constant tables."""
    k, d = mu.shape
    constants = {
        "mu": mu.astype(np.float32),
        "logvar": logvar.astype(np.float32),
        "K": np.array(k, np.float32),
        "half": np.array(0.5, np.float32),
        "first": np.array(0, np.int64),
        "last": np.array(k - 1, np.int64),
    }
    nodes = [
        helper.make_node("Mul", ["u", "K"], ["u_k"]),
        helper.make_node("Floor", ["u_k"], ["k_float"]),
        helper.make_node("Cast", ["k_float"], ["k_int"], to=TensorProto.INT64),
        helper.make_node("Clip", ["k_int", "first", "last"], ["k"]),
        helper.make_node("Gather", ["mu", "k"], ["mu_k"], axis=0),
        helper.make_node("Gather", ["logvar", "k"], ["logvar_k"], axis=0),
        helper.make_node("Mul", ["logvar_k", "half"], ["half_logvar_k"]),
        helper.make_node("Exp", ["half_logvar_k"], ["std_k"]),
        helper.make_node("Mul", ["eps", "std_k"], ["noise"]),
        helper.make_node("Add", ["mu_k", "noise"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vaeops_prior",
        [
            helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", d])],
        initializer=[numpy_helper.from_array(v, name) for name, v in constants.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def prior_reference(mu: Tensor, logvar: Tensor) -> Any:
    """What prior_graph computes, in PyTorch: the sampling of priors.VampPrior.sample given its noise."""

    def draw(eps: Tensor, u: Tensor) -> Tensor:
        k = torch.floor(u * len(mu)).long().clamp(0, len(mu) - 1)
        return mu[k] + eps * torch.exp(0.5 * logvar[k])

    return draw


def to_onnx(
    module: nn.Module, example: Tensor, input_name: str, output_names: list[str], opset: int
) -> onnx.ModelProto:
    # The wrapper must be in eval mode too: the exporter restores the top module's mode afterwards,
    # and a wrapper left in training mode would switch the VAE's BatchNorm back to batch statistics.
    module.eval()
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # torch.export's own deprecation noise (pytree internals), nothing about our model.
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={input_name: {0: batch}},
            verbose=False,
        )
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise UsageError(f"export.opset = {opset}: torch's exporter produced opset {got} instead")
    return proto


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def check_graph(proto: onnx.ModelProto, expected: dict[str, list[int]]) -> None:
    """Full ONNX check, then: every input and output has a symbolic batch dim and exact static other dims.

    `expected` maps each graph input/output name to its per-example shape (without the batch dim).
    ConvTranspose outputs are checked separately, since a wrong output_padding would show there first.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise WorkError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from None
    values = {v.name: v for v in [*proto.graph.input, *proto.graph.output]}
    if sorted(values) != sorted(expected):
        raise WorkError(f"exported graph has inputs/outputs {sorted(values)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        dims = _dims(values[name])
        if not (isinstance(dims[0], str) and dims[0]) or dims[1:] != shape:
            raise WorkError(
                f"exported '{name}' has shape {dims}, expected [batch, {', '.join(map(str, shape))}]"
            )
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    shapes = {v.name: _dims(v) for v in [*inferred.graph.value_info, *inferred.graph.output]}
    for node in inferred.graph.node:
        if node.op_type == "ConvTranspose":
            dims = shapes.get(node.output[0], [])
            if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
                raise WorkError(f"ConvTranspose '{node.name}' has no exact output shape: {dims}")


def check_batches(session: ort.InferenceSession, make_feeds: Any, expected: dict[str, list[int]]) -> None:
    """Run batch sizes 1, 3, 257 through onnxruntime: the dynamic batch axis must really be dynamic.
    `make_feeds(n)` gives the graph's inputs by name for a batch of n."""
    names = [o.name for o in session.get_outputs()]
    for n in SHAPE_CHECK_BATCHES:
        outputs = session.run(None, make_feeds(n))
        for name, out in zip(names, outputs, strict=True):
            if list(out.shape) != [n, *expected[name]]:
                raise WorkError(f"onnxruntime gave '{name}' shape {list(out.shape)} for a batch of {n}")


def diff_stats(onnx_out: np.ndarray, torch_out: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """max |Δ|, max relative |Δ| / max(|ref|, atol) (relative error below atol is noise) and the worst
    |Δ| / (atol + rtol·|ref|): the check passes where that ratio is ≤ 1, like numpy.allclose."""
    if not (np.isfinite(onnx_out).all() and np.isfinite(torch_out).all()):
        return dict.fromkeys(
            ("max_abs_diff", "max_rel_diff", "tolerance_ratio"), math.inf
        )  # NaN > 1 is False
    diff = np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))
    ref = np.abs(torch_out.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(ref, atol)).max()),
        "tolerance_ratio": float((diff / (atol + rtol * ref)).max()),
    }


def parity(
    session: ort.InferenceSession, fn: Any, cases: dict[str, dict[str, np.ndarray]], atol: float, rtol: float
) -> dict[str, Any]:
    """Compare onnxruntime with the PyTorch function `fn` (eval mode, no grad; the graph's inputs as
    positional arguments) on each named case: the inputs by name."""
    per_case = {}
    for case, feeds in cases.items():
        with torch.inference_mode():
            ref = fn(*(torch.from_numpy(x) for x in feeds.values()))
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, feeds)
        stats = [diff_stats(o, r.numpy(), atol, rtol) for o, r in zip(outs, refs, strict=True)]
        per_case[case] = {k: max(s[k] for s in stats) for k in stats[0]}
    worst = {
        k: max(c[k] for c in per_case.values()) for k in ("max_abs_diff", "max_rel_diff", "tolerance_ratio")
    }
    worst["worst_case"] = max(per_case, key=lambda c: per_case[c]["tolerance_ratio"])
    return {**worst, "cases": per_case}


def prior_cases(latent_dim: int) -> dict[str, dict[str, np.ndarray]]:
    """Noise as the sampler draws it, plus the edges of u (0, the last float32 below 1, and 1 itself,
    which the clip keeps on the last component) with extreme eps."""
    rng = np.random.default_rng(PARITY_SEED)

    def noise(n: int) -> dict[str, np.ndarray]:
        return {"eps": rng.standard_normal((n, latent_dim), np.float32), "u": rng.random(n, np.float32)}

    edge_u = np.array([0.0, np.nextafter(np.float32(1), np.float32(0)), 1.0], np.float32)
    edge_eps = np.stack(
        [np.zeros(latent_dim), np.full(latent_dim, EXTREME_Z), np.full(latent_dim, -EXTREME_Z)]
    )
    return {
        "batch_1": noise(1),
        f"batch_{LARGE_BATCH}": noise(LARGE_BATCH),
        "edge_u": {"eps": edge_eps.astype(np.float32), "u": edge_u},
    }


def decoder_cases(latent_dim: int, prior_z: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """N(0, I) latents, a box of extreme ones, and the prior's own samples (a VampPrior's components
    may sit anywhere)."""
    rng = np.random.default_rng(PARITY_SEED)
    extreme = rng.uniform(-EXTREME_Z, EXTREME_Z, (LARGE_BATCH // 2, latent_dim))
    extreme[:2] = [[EXTREME_Z], [-EXTREME_Z]]  # the corners of the box, all dims at once
    return {
        "batch_1": {"z": rng.standard_normal((1, latent_dim)).astype(np.float32)},
        f"batch_{LARGE_BATCH}": {"z": rng.standard_normal((LARGE_BATCH, latent_dim)).astype(np.float32)},
        "extreme_z": {"z": extreme.astype(np.float32)},
        "prior_z": {"z": prior_z.astype(np.float32)},
    }


def encoder_cases(model: VAE) -> dict[str, dict[str, np.ndarray]]:
    """Real-ish images without reading the dataset: the model's own samples, grey and binarized."""
    g = torch.Generator().manual_seed(PARITY_SEED)
    with torch.inference_mode():
        images = model.decode(torch.randn(LARGE_BATCH // 2 + 1, model.latent_dim, generator=g)).numpy()
    binary = (images[1:] > 0.5).astype(np.float32)
    return {
        "batch_1": {"image": images[:1]},
        f"batch_{LARGE_BATCH}": {"image": np.concatenate([images[1:], binary])},
    }


def add_metadata(proto: onnx.ModelProto, props: dict[str, Any], doc: str) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(
        proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}
    )
    proto.doc_string = doc


def session_for(proto: onnx.ModelProto) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors, e.g. for a too-new opset
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WorkError(f"onnxruntime {ort.__version__} cannot load the exported graph: {reason}") from None


def _failure(name: str, result: dict[str, Any], params: ExportParams) -> str:
    case = result["cases"][result["worst_case"]]
    if math.isinf(case["tolerance_ratio"]):
        return (
            f"{name} ONNX parity failed on '{result['worst_case']}': NaN or infinite outputs "
            "(is the checkpoint diverged?); previous models left in place"
        )
    return (
        f"{name} ONNX parity failed on '{result['worst_case']}': "
        f"max |onnx − torch| = {case['max_abs_diff']:.3g}, "
        f"max relative {case['max_rel_diff']:.3g}, {case['tolerance_ratio']:.3g}× the allowed "
        f"export.atol + export.rtol·|torch| (atol = {params.atol:g}, rtol = {params.rtol:g}); "
        "previous models left in place"
    )


MODELS = ("decoder", "encoder", "prior")


def export_and_check(
    model: VAE, params: ExportParams, meta: dict[str, Any]
) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """({decoder, encoder, prior}, parity report): exported, graph-checked, run at several batch sizes
    and proven equal to PyTorch within export.atol/rtol (else WorkError)."""
    image_shape, latent_dim = meta["image_shape"], meta["latent_dim"]
    shape_txt = f"[batch, {', '.join(map(str, image_shape))}]"
    log(f"exporting {meta['arch']} VAE (latent_dim {latent_dim}, image {image_shape}), opset {params.opset}")

    dec = to_onnx(Decoder(model), torch.randn(EXAMPLE_BATCH, latent_dim), "z", ["image"], params.opset)
    add_metadata(
        dec,
        {**meta, "input_names": ["z"], "output_names": ["image"]},
        f"vaeops VAE decoder. Input 'z': float32 [batch, {latent_dim}], latents from the prior (prior.onnx). "
        f"Output 'image': float32 {shape_txt}, the {meta['likelihood']} likelihood's mean, pixel "
        "intensities in [0, 1].",
    )
    enc = to_onnx(
        Encoder(model), torch.rand(EXAMPLE_BATCH, *image_shape), "image", ["mu", "logvar"], params.opset
    )
    add_metadata(
        enc,
        {**meta, "input_names": ["image"], "output_names": ["mu", "logvar"]},
        f"vaeops VAE encoder. Input 'image': float32 {shape_txt} in [0, 1]. Outputs 'mu' and 'logvar': "
        f"float32 [batch, {latent_dim}], mean and log-variance of q(z|x).",
    )
    mu, logvar = prior_components(model)
    k = len(mu)
    prior = prior_graph(mu, logvar, params.opset)
    add_metadata(
        prior,
        {**meta, "prior_components": k, "input_names": ["eps", "u"], "output_names": ["z"]},
        f"vaeops VAE prior p(z) ({meta['prior']}, a mixture of {k} diagonal Gaussian(s)). Inputs 'eps': "
        f"float32 [batch, {latent_dim}] ~ N(0, I) and 'u': float32 [batch] ~ U[0, 1), which picks the "
        f"component k = floor(u·{k}). Output 'z': float32 [batch, {latent_dim}], a draw from p(z) for "
        "decoder.onnx.",
    )
    check_graph(dec, {"z": [latent_dim], "image": image_shape})
    check_graph(enc, {"image": image_shape, "mu": [latent_dim], "logvar": [latent_dim]})
    check_graph(prior, {"eps": [latent_dim], "u": [], "z": [latent_dim]})
    models = {"decoder": dec, "encoder": enc, "prior": prior}
    sessions = {name: session_for(proto) for name, proto in models.items()}
    rng = np.random.default_rng(PARITY_SEED)
    check_batches(
        sessions["decoder"],
        lambda n: {"z": rng.standard_normal((n, latent_dim), dtype=np.float32)},
        {"image": image_shape},
    )
    check_batches(
        sessions["encoder"],
        lambda n: {"image": rng.random((n, *image_shape), dtype=np.float32)},
        {"mu": [latent_dim], "logvar": [latent_dim]},
    )
    check_batches(
        sessions["prior"],
        lambda n: {"eps": rng.standard_normal((n, latent_dim), np.float32), "u": rng.random(n, np.float32)},
        {"z": [latent_dim]},
    )

    draw = prior_reference(torch.from_numpy(mu), torch.from_numpy(logvar))
    cases = prior_cases(latent_dim)
    with torch.inference_mode():
        prior_z = draw(*(torch.from_numpy(x) for x in cases[f"batch_{LARGE_BATCH}"].values())).numpy()
    fns = {"decoder": model.decode, "encoder": model.encode, "prior": draw}
    all_cases = {
        "decoder": decoder_cases(latent_dim, prior_z),
        "encoder": encoder_cases(model),
        "prior": cases,
    }
    report: dict[str, Any] = {
        "arch": meta["arch"],
        "opset": params.opset,
        "atol": params.atol,
        "rtol": params.rtol,
    }
    for name in MODELS:
        report[name] = parity(sessions[name], fns[name], all_cases[name], params.atol, params.rtol)
        r = report[name]
        log(f"{name} parity: max abs diff {r['max_abs_diff']:.3g}, max rel diff {r['max_rel_diff']:.3g}")
    for name in MODELS:
        if report[name]["tolerance_ratio"] > 1:
            raise WorkError(_failure(name, report[name], params))
    return models, report


def check_registry_name(client: Any, name: str) -> None:
    """Fail before the slow part when MLflow's registry refuses the name (e.g. one with '/' or ':')."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "INVALID_PARAMETER_VALUE":
            reason = (str(e.message).splitlines() or [e.error_code])[0]
            raise UsageError(
                f"export.registered_model_name = {name!r}: MLflow refuses it ({reason})"
            ) from None
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # a new name is fine: registering creates it
            raise


def log_to_mlflow(
    client: Any,
    run_id: str,
    params: ExportParams,
    models: dict[str, onnx.ModelProto],
    examples: dict[str, dict[str, np.ndarray]],
    report: dict[str, Any],
    version_tags: dict[str, str],
) -> str:
    """Log the three models (signature + input example) and the parity report into the run by id;
    register the decoder, tag that version (with the prior's logged model, which a consumer of the
    decoder needs for sampling) and point the alias at it. Returns the version."""
    import mlflow
    import mlflow.onnx
    from mlflow.entities import Metric
    from mlflow.models import infer_signature

    # With pip_requirements given, MLflow still probes `pip --version` for conda.yaml; uv venvs have no
    # pip, and the resulting warning on every export is noise.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    logging.getLogger("mlflow.utils.uv_utils").setLevel(logging.WARNING)

    # One number on the run page; the per-model, per-case breakdown is the JSON artifact.
    worst = max(report[m]["max_abs_diff"] for m in MODELS)
    client.log_batch(run_id, metrics=[Metric("onnx.parity_max_abs_diff", worst, int(time.time() * 1000), 0)])
    client.log_dict(run_id, report, "onnx/onnx_parity.json")
    run = client.get_run(run_id)

    def log_model(name: str) -> Any:
        proto, example = models[name], examples[name]
        outputs = session_for(proto).run(None, example)
        names = [o.name for o in proto.graph.output]
        signature = infer_signature(example, dict(zip(names, outputs, strict=True)))
        # run_id reaches Model.log, which then logs into this run without starting or ending it. The
        # logged model is created here, in the run's experiment: Model.log would file it under the
        # process's active experiment (the Default one, as nothing here starts a run).
        logged = client.create_logged_model(
            run.info.experiment_id, name=f"{name}_onnx", source_run_id=run_id, params=run.data.params
        )
        return mlflow.onnx.log_model(
            onnx.ModelProto.FromString(proto.SerializeToString()),
            name=f"{name}_onnx",
            model_id=logged.model_id,
            run_id=run_id,
            signature=signature,
            input_example=example,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            # Explicit requirements: MLflow would otherwise spend ~10 s inferring them in a subprocess.
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        )

    info = {name: log_model(name) for name in MODELS}
    name = params.registered_model_name
    version = str(mlflow.register_model(info["decoder"].model_uri, name).version)
    for key, value in {**version_tags, "prior_model_uri": info["prior"].model_uri}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS, version)
    return version


def run(
    params: ExportParams,
    checkpoint: Path,
    run_file: Path,
    decoder_out: Path,
    encoder_out: Path,
    report_out: Path,
    prior_out: Path | None = None,
) -> dict[str, Any]:
    """Export, check, prove parity, log into the checkpoint's MLflow run; only then rename the models
    into place. The prior goes next to the decoder unless `prior_out` says otherwise: that is where
    `vaeops sample` looks for it."""
    prior_out = prior_out or decoder_out.with_name("prior.onnx")
    state, sha256 = read_checkpoint(checkpoint)
    run_id = tracking.checkpoint_run_id(state, checkpoint, run_file)
    model = model_from_checkpoint(state, checkpoint)
    cfg = state["config"]
    image_shape, latent_dim = [int(d) for d in cfg["image_shape"]], int(cfg["latent_dim"])
    tracking.require_run(run_id)  # fail on a missing run before the slow part

    with tracking.recording(run_id, "export") as client:
        check_registry_name(client, params.registered_model_name)
        common_meta = {
            "latent_dim": latent_dim,
            "image_shape": image_shape,
            "dataset": cfg.get("dataset", "unknown"),
            "arch": cfg["arch"],
            "likelihood": cfg["likelihood"],
            "prior": cfg["prior"],
            "config": cfg,  # every part and its params: enough to rebuild the model
            "git_commit": tracking.git_commit(),
            "mlflow_run_id": run_id,
            "opset": params.opset,
            "created_by": f"vaeops {importlib.metadata.version('vaeops')}",
        }
        with work("export"):
            models, report = export_and_check(model, params, common_meta)

        # The models are the bytes read above: if a training replaced them meanwhile, log and write
        # nothing rather than register an export of a model that is gone.
        tracking.check_unchanged(checkpoint, sha256, "export")
        tag_keys = ("dataset", "arch", "likelihood", "prior", "latent_dim", "git_commit")
        version_tags = {k: str(common_meta[k]) for k in tag_keys}
        if (test_elbo := client.get_run(run_id).data.metrics.get("test.elbo")) is not None:
            version_tags["test_elbo"] = str(test_elbo)  # evaluate ran on this model
        if exp := os.environ.get("DVC_EXP_NAME"):
            version_tags["dvc_experiment"] = exp
        examples = {
            "decoder": {"z": np.random.default_rng(PARITY_SEED).standard_normal((1, latent_dim), np.float32)},
            "encoder": encoder_cases(model)["batch_1"],
            "prior": prior_cases(latent_dim)["batch_1"],
        }
        with (
            atomic_path(decoder_out) as dec_tmp,
            atomic_path(encoder_out) as enc_tmp,
            atomic_path(prior_out) as prior_tmp,
        ):
            for name, tmp in (("decoder", dec_tmp), ("encoder", enc_tmp), ("prior", prior_tmp)):
                onnx.save_model(models[name], tmp)
            version = log_to_mlflow(client, run_id, params, models, examples, report, version_tags)
            tracking.check_unchanged(checkpoint, sha256, "export")  # again: logging takes seconds
            # DVC metrics: the per-model worst numbers only (the per-case breakdown goes to MLflow);
            # every numeric leaf becomes a column of `dvc metrics show` / `dvc exp show`.
            keys = ("max_abs_diff", "max_rel_diff", "tolerance_ratio")
            summary = {m: {k: report[m][k] for k in keys} for m in MODELS}
            write_json(report_out, {**summary, "atol": params.atol, "rtol": params.rtol})

    name = params.registered_model_name
    log(f"wrote {decoder_out}, {encoder_out}, {prior_out}; logged into MLflow run {run_id}")
    log(f"registered {name} version {version}; models:/{name}@{ALIAS} now loads it")
    return {**report, "registered_model": {"name": name, "version": int(version), "alias": ALIAS}}
