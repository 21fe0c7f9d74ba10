"""export: the checkpoint's decoder (z → image) and encoder (image → mu, logvar) as ONNX, proven equal to
PyTorch in eval mode before they replace the previous models.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). With torch 2.13 it gives the
cleaner graph: eval-mode BatchNorm is folded into the Gemms, and the conv decoder's ConvTranspose
outputs keep exact static H×W, whereas the legacy TorchScript exporter (`dynamo=False`, deprecated)
keeps BatchNormalization nodes and leaves the image's H and W symbolic. Its one trap: an example batch
of 1 is specialised into a constant, so we trace with a batch of EXAMPLE_BATCH, declare the batch dim
dynamic, and then check that the graph really says so and that batches of 1, 3 and 257 run.
"""

import importlib.metadata
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from vaeops import tracking
from vaeops.config import ExportParams
from vaeops.errors import UsageError, WorkError
from vaeops.io import atomic_path, write_json
from vaeops.models import VAE, load_checkpoint, model_from_checkpoint
from vaeops.progress import log

EXAMPLE_BATCH = 4
SHAPE_CHECK_BATCHES = (1, 3, 257)
PARITY_SEED = 0
LARGE_BATCH = 512
EXTREME_Z = 6.0


class Decoder(nn.Module):
    """z → image in [0, 1] (the sigmoid is part of the graph: consumers get pixels, not logits)."""

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


def check_batches(session: ort.InferenceSession, make_input: Any, expected: dict[str, list[int]]) -> None:
    """Run batch sizes 1, 3, 257 through onnxruntime: the dynamic batch axis must really be dynamic."""
    names = [o.name for o in session.get_outputs()]
    for n in SHAPE_CHECK_BATCHES:
        outputs = session.run(None, {session.get_inputs()[0].name: make_input(n)})
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
    session: ort.InferenceSession, fn: Any, cases: dict[str, np.ndarray], atol: float, rtol: float
) -> dict[str, Any]:
    """Compare onnxruntime with the PyTorch function `fn` (eval mode, no grad) on each named input batch."""
    per_case = {}
    for case, x in cases.items():
        with torch.inference_mode():
            ref = fn(torch.from_numpy(x))
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, {session.get_inputs()[0].name: x})
        stats = [diff_stats(o, r.numpy(), atol, rtol) for o, r in zip(outs, refs, strict=True)]
        per_case[case] = {k: max(s[k] for s in stats) for k in stats[0]}
    worst = {
        k: max(c[k] for c in per_case.values()) for k in ("max_abs_diff", "max_rel_diff", "tolerance_ratio")
    }
    worst["worst_case"] = max(per_case, key=lambda c: per_case[c]["tolerance_ratio"])
    return {**worst, "cases": per_case}


def decoder_cases(latent_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(PARITY_SEED)
    extreme = rng.uniform(-EXTREME_Z, EXTREME_Z, (LARGE_BATCH // 2, latent_dim))
    extreme[:2] = [[EXTREME_Z], [-EXTREME_Z]]  # the corners of the box, all dims at once
    return {
        "batch_1": rng.standard_normal((1, latent_dim)).astype(np.float32),
        f"batch_{LARGE_BATCH}": rng.standard_normal((LARGE_BATCH, latent_dim)).astype(np.float32),
        "extreme_z": extreme.astype(np.float32),
    }


def encoder_cases(model: VAE) -> dict[str, np.ndarray]:
    """Real-ish images without reading the dataset: the model's own samples, grey and binarized."""
    g = torch.Generator().manual_seed(PARITY_SEED)
    with torch.inference_mode():
        images = model.decode(torch.randn(LARGE_BATCH // 2 + 1, model.latent_dim, generator=g)).numpy()
    binary = (images[1:] > 0.5).astype(np.float32)
    return {"batch_1": images[:1], f"batch_{LARGE_BATCH}": np.concatenate([images[1:], binary])}


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


def log_to_mlflow(
    params: ExportParams,
    experiment: str,
    run_file: Path,
    decoder: onnx.ModelProto,
    encoder: onnx.ModelProto,
    dec_example: np.ndarray,
    enc_example: np.ndarray,
    report: dict[str, Any],
) -> int | None:
    """Log both models (signature + input example) into the training run; register the decoder."""
    import mlflow
    import mlflow.onnx
    from mlflow.models import infer_signature

    # With pip_requirements given, MLflow still probes `pip --version` for conda.yaml; uv venvs have no
    # pip, and the resulting warning on every export is noise.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    logging.getLogger("mlflow.utils.uv_utils").setLevel(logging.WARNING)

    dec_sig = infer_signature(
        {"z": dec_example}, {"image": session_for(decoder).run(None, {"z": dec_example})[0]}
    )
    mu, logvar = session_for(encoder).run(None, {"image": enc_example})
    enc_sig = infer_signature({"image": enc_example}, {"mu": mu, "logvar": logvar})
    with tracking.resume_run(run_file, experiment):
        mlflow.log_metrics(
            {
                f"onnx/{m}_{k}": report[m][k]
                for m in ("decoder", "encoder")
                for k in ("max_abs_diff", "max_rel_diff")
            }
        )
        mlflow.log_dict(report, "onnx/onnx_parity.json")
        common = {
            "onnx_execution_providers": ["CPUExecutionProvider"],
            "save_as_external_data": False,
            # Explicit requirements: MLflow would otherwise spend ~10 s inferring them in a subprocess.
            "pip_requirements": [f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        }
        info = mlflow.onnx.log_model(
            onnx.ModelProto.FromString(decoder.SerializeToString()),
            name="decoder_onnx",
            signature=dec_sig,
            input_example={"z": dec_example},
            registered_model_name=params.registered_model_name,
            **common,
        )
        mlflow.onnx.log_model(
            onnx.ModelProto.FromString(encoder.SerializeToString()),
            name="encoder_onnx",
            signature=enc_sig,
            input_example={"image": enc_example},
            **common,
        )
    version = getattr(info, "registered_model_version", None)
    return int(version) if version is not None else None


def run(
    params: ExportParams,
    experiment: str,
    checkpoint: Path,
    run_file: Path,
    decoder_out: Path,
    encoder_out: Path,
    report_out: Path,
) -> dict[str, Any]:
    """Export, check, prove parity, log to MLflow; only then rename the models into place."""
    state = load_checkpoint(checkpoint)
    run_id = tracking.read_run_id(run_file)  # fail on a missing run file before the slow part
    try:
        model = model_from_checkpoint(state)
    except (KeyError, TypeError, RuntimeError) as e:
        raise UsageError(
            f"{checkpoint}: does not match its own config ({str(e).splitlines()[0][:200]})"
        ) from None
    cfg = state["config"]
    image_shape, latent_dim = [int(d) for d in cfg["image_shape"]], int(cfg["latent_dim"])

    common_meta = {
        "latent_dim": latent_dim,
        "image_shape": image_shape,
        "dataset": cfg.get("dataset", "unknown"),
        "arch": cfg["arch"],
        "git_commit": tracking.git_commit(),
        "mlflow_run_id": run_id,
        "opset": params.opset,
        "created_by": f"vaeops {importlib.metadata.version('vaeops')}",
    }
    shape_txt = f"[batch, {', '.join(map(str, image_shape))}]"
    log(f"exporting {cfg['arch']} VAE (latent_dim {latent_dim}, image {image_shape}), opset {params.opset}")

    dec = to_onnx(Decoder(model), torch.randn(EXAMPLE_BATCH, latent_dim), "z", ["image"], params.opset)
    add_metadata(
        dec,
        {**common_meta, "input_names": ["z"], "output_names": ["image"]},
        f"vaeops VAE decoder. Input 'z': float32 [batch, {latent_dim}], latents ~ N(0, I). "
        f"Output 'image': float32 {shape_txt}, pixel intensities in [0, 1] (sigmoid applied).",
    )
    enc = to_onnx(
        Encoder(model), torch.rand(EXAMPLE_BATCH, *image_shape), "image", ["mu", "logvar"], params.opset
    )
    add_metadata(
        enc,
        {**common_meta, "input_names": ["image"], "output_names": ["mu", "logvar"]},
        f"vaeops VAE encoder. Input 'image': float32 {shape_txt} in [0, 1]. Outputs 'mu' and 'logvar': "
        f"float32 [batch, {latent_dim}], mean and log-variance of q(z|x).",
    )
    check_graph(dec, {"z": [latent_dim], "image": image_shape})
    check_graph(enc, {"image": image_shape, "mu": [latent_dim], "logvar": [latent_dim]})
    dec_session, enc_session = session_for(dec), session_for(enc)
    rng = np.random.default_rng(PARITY_SEED)
    check_batches(
        dec_session, lambda n: rng.standard_normal((n, latent_dim), dtype=np.float32), {"image": image_shape}
    )
    check_batches(
        enc_session,
        lambda n: rng.random((n, *image_shape), dtype=np.float32),
        {"mu": [latent_dim], "logvar": [latent_dim]},
    )

    report = {
        "arch": cfg["arch"],
        "opset": params.opset,
        "atol": params.atol,
        "rtol": params.rtol,
        "decoder": parity(dec_session, model.decode, decoder_cases(latent_dim), params.atol, params.rtol),
        "encoder": parity(enc_session, model.encode, encoder_cases(model), params.atol, params.rtol),
    }
    for name in ("decoder", "encoder"):
        r = report[name]
        log(f"{name} parity: max abs diff {r['max_abs_diff']:.3g}, max rel diff {r['max_rel_diff']:.3g}")
    for name in ("decoder", "encoder"):
        if report[name]["tolerance_ratio"] > 1:
            raise WorkError(_failure(name, report[name], params))

    with atomic_path(decoder_out) as dec_tmp, atomic_path(encoder_out) as enc_tmp:
        onnx.save_model(dec, dec_tmp)
        onnx.save_model(enc, enc_tmp)
        examples = decoder_cases(latent_dim)["batch_1"], encoder_cases(model)["batch_1"]
        version = log_to_mlflow(params, experiment, run_file, dec, enc, *examples, report)
        # DVC metrics: the per-model worst numbers only (the per-case breakdown goes to MLflow);
        # every numeric leaf becomes a column of `dvc metrics show` / `dvc exp show`.
        keys = ("max_abs_diff", "max_rel_diff", "tolerance_ratio")
        summary = {m: {k: report[m][k] for k in keys} for m in ("decoder", "encoder")}
        write_json(report_out, {**summary, "atol": params.atol, "rtol": params.rtol})
    log(f"wrote {decoder_out}, {encoder_out}; registered {params.registered_model_name} version {version}")
    return {**report, "registered_model": {"name": params.registered_model_name, "version": version}}
