"""export: real torch.onnx export, real onnxruntime, real MLflow (temp SQLite store + registry)."""

import inspect
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import ROOT, SHARED, isolate_mlflow, run_cli, tiny_checkpoint, tiny_vae, tree
from PIL import Image

from vaeops import cli, tracking
from vaeops.config import ExportParams, load_params
from vaeops.errors import UsageError, WorkError
from vaeops.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from vaeops.model.vae import VAE
from vaeops.stages import export

# One export per combination of parts. conv gets an odd image size so both ConvTranspose layers need
# output_padding; mlp a 32-wide latent (what `dvc exp run -S train.latent_dim=32` would feed the export);
# RGB models with the discretized logistic (a mixture of 2 in "vamp"); a VampPrior of 3 components.
CASES = {
    "mlp": ("mlp", (1, 28, 28), 32, {}),
    "conv-cb": ("conv", (1, 13, 15), 5, {"likelihood": "continuous_bernoulli"}),
    "resnet-logistic": ("resnet", (3, 16, 16), 4, {"likelihood": "logistic"}),
    "vamp": (
        "conv",
        (3, 12, 12),
        3,
        {"likelihood": "logistic", "logistic_components": 2, "prior": "vamp", "prior_components": 3},
    ),
}


@dataclass
class Exported:
    folder: Path
    case: str
    arch: str
    image_shape: tuple[int, int, int]
    latent_dim: int
    parts: dict
    run_id: str
    uri: str
    result: dict


def outputs(folder: Path) -> list[Path]:
    return [
        folder / "models/decoder.onnx",
        folder / "models/encoder.onnx",
        folder / "reports/onnx_parity.json",
    ]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """One real export per case, shared by the tests below (an export costs a few seconds)."""
    arch, image_shape, latent_dim, parts = CASES[request.param]
    folder = tmp_path_factory.mktemp(f"export-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        isolate_mlflow(mp, folder)
        run_id = tiny_checkpoint(folder, arch, image_shape, latent_dim, **parts)
        mp.setenv("DVC_EXP_NAME", f"exp-{request.param}")
        if arch == "mlp":  # as if evaluate had run: the registered version then carries the test ELBO
            mlflow.MlflowClient().log_metric(run_id, "test.elbo", -101.25)
        result = export.run(ExportParams(), Path("models/vae.pt"), Path("models/run.json"), *outputs(folder))
        yield Exported(
            folder,
            request.param,
            arch,
            image_shape,
            latent_dim,
            parts,
            run_id,
            tracking.tracking_uri(),
            result,
        )


def reference_model(ex: Exported) -> VAE:
    return model_from_checkpoint(load_checkpoint(ex.folder / "models/vae.pt"))


def mixture_sample(model: VAE, eps: np.ndarray, u: np.ndarray) -> np.ndarray:
    """z from the model's own prior in PyTorch, given the noise: component k = floor(u·K), then
    mu_k + eps·std_k, as priors.VampPrior.sample draws it."""
    with torch.inference_mode():
        mu, logvar = model.prior.components(model.encode)
        k = torch.from_numpy(np.minimum(np.floor(u * len(mu)), len(mu) - 1).astype(np.int64))
        return (mu[k] + torch.from_numpy(eps) * torch.exp(0.5 * logvar[k])).numpy()


def test_parity_report_within_1e5(exported):
    report = json.loads((exported.folder / "reports/onnx_parity.json").read_text())
    assert (report["atol"], report["rtol"]) == (1e-5, 1e-5)
    full = exported.result
    assert set(full["decoder"]["cases"]) == {"batch_1", "batch_512", "extreme_z", "prior_z"}
    assert set(full["encoder"]["cases"]) == {"batch_1", "batch_512"}
    assert set(full["prior"]["cases"]) == {"batch_1", "batch_512", "edge_u"}
    for name in ("decoder", "encoder", "prior"):
        assert report[name] == {k: full[name][k] for k in ("max_abs_diff", "max_rel_diff", "tolerance_ratio")}
        assert report[name]["max_abs_diff"] <= 1e-5
        assert report[name]["tolerance_ratio"] <= 1
    for name in ("decoder", "encoder"):
        # The checks compared real numbers, not two copies of the same array.
        assert report[name]["max_abs_diff"] > 0 or exported.arch == "mlp"


def test_dynamic_batch_and_exact_shapes(exported):
    model = reference_model(exported)
    c, h, w = exported.image_shape
    d = exported.latent_dim
    dec = session(exported.folder / "models/decoder.onnx")
    enc = session(exported.folder / "models/encoder.onnx")
    prior = session(exported.folder / "models/prior.onnx")
    assert [(i.name, i.shape) for i in dec.get_inputs()] == [("z", ["batch", d])]
    assert [(o.name, o.shape) for o in dec.get_outputs()] == [("image", ["batch", c, h, w])]
    assert [(i.name, i.shape) for i in enc.get_inputs()] == [("image", ["batch", c, h, w])]
    assert [(o.name, o.shape) for o in enc.get_outputs()] == [("mu", ["batch", d]), ("logvar", ["batch", d])]
    assert [(i.name, i.shape) for i in prior.get_inputs()] == [("eps", ["batch", d]), ("u", ["batch"])]
    assert [(o.name, o.shape) for o in prior.get_outputs()] == [("z", ["batch", d])]

    rng = np.random.default_rng(1)
    for n in (1, 3, 257):
        eps, u = rng.standard_normal((n, d), dtype=np.float32), rng.random(n, dtype=np.float32)
        (z,) = prior.run(None, {"eps": eps, "u": u})
        np.testing.assert_allclose(z, mixture_sample(model, eps, u), atol=1e-5, rtol=1e-5)
        (images,) = dec.run(None, {"z": z})
        assert images.shape == (n, c, h, w)
        # Each image is decoded the same alone as in a batch: no batch statistics in the graph.
        np.testing.assert_allclose(dec.run(None, {"z": z[-1:]})[0], images[-1:], atol=1e-6)
        assert images.min() >= 0 and images.max() <= 1
        with torch.inference_mode():
            np.testing.assert_allclose(
                images, model.decode(torch.from_numpy(z)).numpy(), atol=1e-5, rtol=1e-5
            )
        mu, logvar = enc.run(None, {"image": images})
        assert mu.shape == logvar.shape == (n, d)
        with torch.inference_mode():
            ref_mu, ref_logvar = model.encode(torch.from_numpy(images))
        np.testing.assert_allclose(mu, ref_mu.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logvar, ref_logvar.numpy(), atol=1e-5, rtol=1e-5)


def test_prior_graph_holds_the_models_mixture(exported):
    """With eps = 0 the prior graph returns its components' means, with eps = 1 mean + std: for the
    VampPrior those are the encoder's outputs on the pseudo-inputs, not N(0, I)'s origin."""
    model = reference_model(exported)
    with torch.inference_mode():
        mu, logvar = (t.numpy() for t in model.prior.components(model.encode))
    k, d = mu.shape
    assert k == exported.parts.get("prior_components", 1)
    prior = session(exported.folder / "models/prior.onnx")
    u = ((np.arange(k) + 0.5) / k).astype(np.float32)  # the middle of each component's share of [0, 1)
    (at_means,) = prior.run(None, {"eps": np.zeros((k, d), np.float32), "u": u})
    np.testing.assert_allclose(at_means, mu, atol=1e-6)
    (one_std,) = prior.run(None, {"eps": np.ones((k, d), np.float32), "u": u})
    np.testing.assert_allclose(one_std - at_means, np.exp(0.5 * logvar), rtol=1e-5)
    if exported.parts.get("prior") == "vamp":
        assert len(np.unique(at_means, axis=0)) == k  # every component reachable, each its own
        assert np.abs(at_means).max() > 1e-3 and not np.allclose(np.exp(0.5 * logvar), 1, atol=1e-3)
    else:
        np.testing.assert_array_equal(at_means, 0)
        np.testing.assert_array_equal(one_std, 1)


def test_vaeops_sample_draws_from_the_exported_prior(exported, tmp_path):
    """The real CLI, torch-free: its images are the decode of seeded draws from the model's own prior."""
    model = reference_model(exported)
    decoder = str(exported.folder / "models/decoder.onnx")
    res = run_cli("sample", "--model", decoder, "-n", "12", "--seed", "5", "--format", "npy", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    images = np.load(tmp_path / "samples.npy")
    assert images.shape == (12, *exported.image_shape)

    rng = np.random.default_rng(5)  # the sampler's draws: eps, then u
    eps = rng.standard_normal((12, exported.latent_dim), dtype=np.float32)
    u = rng.random(12, dtype=np.float32)
    z = mixture_sample(model, eps, u)
    with torch.inference_mode():
        expected = model.decode(torch.from_numpy(z)).numpy()
        from_normal = model.decode(torch.from_numpy(eps)).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=1e-5)
    # N(0, I) latents give other images, unless N(0, I) is the prior.
    assert np.allclose(images, from_normal, atol=1e-5) == (exported.parts.get("prior") != "vamp")

    res = run_cli(
        "sample", "--model", decoder, "-n", "4", "--seed", "5", "--nrow", "4", "-o", "s.png", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    grid = np.asarray(Image.open(tmp_path / "s.png"))
    c, h, w = exported.image_shape
    first = grid[2 : 2 + h, 2 : 2 + w]  # the first image, inside the 2-pixel border
    pixels = (np.clip(images[0], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(first, np.broadcast_to(pixels, (h, w, 3)))  # RGB kept, grey repeated


def test_graph_is_clean_and_checked(exported):
    for name in ("decoder", "encoder", "prior"):
        proto = onnx.load(exported.folder / f"models/{name}.onnx")
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version == 18
    proto = onnx.load(exported.folder / "models/decoder.onnx")
    ops = {n.op_type for n in proto.graph.node}
    # No batch statistics can sneak into the deployed graph: BatchNorm after a layer is folded into it,
    # and a pre-activation one (resnet, after a residual add) stays in inference mode, running stats.
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("training_mode", 0) == 0 and len(node.output) == 1
    assert ("BatchNormalization" in ops) == (exported.arch == "resnet")
    assert ("ConvTranspose" in ops) == (exported.arch in ("conv", "resnet"))


def test_metadata(exported):
    config = load_checkpoint(exported.folder / "models/vae.pt")["config"]
    for name, inputs, outs in (
        ("decoder", ["z"], ["image"]),
        ("encoder", ["image"], ["mu", "logvar"]),
        ("prior", ["eps", "u"], ["z"]),
    ):
        meta_proto = session(exported.folder / f"models/{name}.onnx").get_modelmeta()
        meta = meta_proto.custom_metadata_map
        assert int(meta["latent_dim"]) == exported.latent_dim
        assert json.loads(meta["image_shape"]) == list(exported.image_shape)
        assert meta["dataset"] == "mnist" and meta["arch"] == exported.arch
        assert json.loads(meta["config"]) == config  # every part: enough to rebuild the model
        assert meta["likelihood"] == config["likelihood"] and meta["prior"] == config["prior"]
        assert meta["mlflow_run_id"] == exported.run_id
        assert meta["git_commit"]
        assert json.loads(meta["input_names"]) == inputs and json.loads(meta["output_names"]) == outs
        assert meta["created_by"].startswith("vaeops ")
        assert ("[0, 1]" in meta_proto.description) == (name != "prior")
    prior_meta = session(exported.folder / "models/prior.onnx").get_modelmeta().custom_metadata_map
    assert int(prior_meta["prior_components"]) == exported.parts.get("prior_components", 1)


def test_mlflow_run_and_registry(exported):
    client = mlflow.MlflowClient(tracking_uri=exported.uri, registry_uri=exported.uri)
    run = client.get_run(exported.run_id)
    report = json.loads((exported.folder / "reports/onnx_parity.json").read_text())
    # One summary number; the per-case breakdown is the JSON artifact below.
    assert [k for k in run.data.metrics if k.startswith("onnx")] == ["onnx.parity_max_abs_diff"]
    worst = max(report[name]["max_abs_diff"] for name in ("decoder", "encoder", "prior"))
    assert run.data.metrics["onnx.parity_max_abs_diff"] == pytest.approx(worst)
    assert run.info.status == "FINISHED"  # logged by run id: training's status stays
    assert run.data.tags["vaeops.export"] == "done"
    note = run.data.tags["mlflow.note.content"]
    assert "- logged models: decoder_onnx, encoder_onnx, prior_onnx" in note
    assert "- registered: vaeops-decoder version 1" in note

    logged = client.download_artifacts(exported.run_id, "onnx/onnx_parity.json", str(exported.folder))
    assert json.loads(Path(logged).read_text())["decoder"]["cases"].keys() == {
        "batch_1",
        "batch_512",
        "extreme_z",
        "prior_z",
    }
    experiment_id = client.get_run(exported.run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id])
    assert sorted(m.name for m in models) == ["decoder_onnx", "encoder_onnx", "prior_onnx"]
    assert {m.source_run_id for m in models} == {exported.run_id}

    versions = client.search_model_versions("name = 'vaeops-decoder'")
    assert [v.run_id for v in versions] == [exported.run_id]
    assert exported.result["registered_model"] == {
        "name": "vaeops-decoder",
        "version": int(versions[0].version),
        "alias": "latest-export",
    }
    tags = versions[0].tags
    assert tags["dataset"] == "mnist" and tags["arch"] == exported.arch
    assert tags["likelihood"] == exported.parts.get("likelihood", "bernoulli")
    assert tags["prior"] == exported.parts.get("prior", "normal")
    assert tags["latent_dim"] == str(exported.latent_dim) and tags["git_commit"]
    assert tags["dvc_experiment"] == f"exp-{exported.case}"
    assert tags.get("test_elbo") == ("-101.25" if exported.arch == "mlp" else None)  # only once evaluated
    assert client.get_model_version_by_alias("vaeops-decoder", "latest-export").version == versions[0].version
    # The version names the prior it samples with: the same graph as models/prior.onnx.
    prior = mlflow.onnx.load_model(tags["prior_model_uri"])
    assert prior.SerializeToString() == onnx.load(exported.folder / "models/prior.onnx").SerializeToString()

    # The registered model is the exported decoder: load it back through MLflow and decode.
    source = client.get_model_version_download_uri("vaeops-decoder", versions[0].version)
    loaded = mlflow.pyfunc.load_model(source)
    sig = loaded.metadata.signature
    assert sig.inputs.input_names() == ["z"] and sig.outputs.input_names() == ["image"]
    z = np.random.default_rng(2).standard_normal((4, exported.latent_dim), dtype=np.float32)
    dec = session(exported.folder / "models/decoder.onnx")
    np.testing.assert_array_equal(loaded.predict({"z": z})["image"], dec.run(None, {"z": z})[0])
    # ...and by its alias, the way a consumer asks for "the latest export".
    proto = mlflow.onnx.load_model("models:/vaeops-decoder@latest-export")
    assert proto.SerializeToString() == onnx.load(exported.folder / "models/decoder.onnx").SerializeToString()


def test_opset_is_the_one_asked_for(tmp_path, monkeypatch):
    model = tiny_vae("conv", (1, 12, 12), 3)
    proto = export.to_onnx(export.Decoder(model), torch.randn(4, 3), "z", ["image"], 21)
    assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 21)]
    prior = export.prior_graph(*export.prior_components(model), 21)
    assert [(o.domain, o.version) for o in prior.opset_import] == [("", 21)]
    export.session_for(prior)  # onnxruntime takes it
    # Below 18 torch's down-conversion silently keeps 18, so params refuse it up front.
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("VAEOPS_EXPORT__OPSET", "13")
    with pytest.raises(UsageError, match="export.opset"):
        load_params(tmp_path / "params.yaml")


def test_diff_stats_tolerance_and_non_finite_outputs():
    ref = np.array([0.0, 1.0, 100.0], np.float32)
    stats = export.diff_stats(ref + np.float32(1e-5), ref, atol=1e-5, rtol=1e-5)
    assert stats["max_abs_diff"] == pytest.approx(1e-5, rel=1e-2)
    assert stats["tolerance_ratio"] == pytest.approx(1.0, rel=1e-2)  # at 0: exactly atol
    nan = np.array([np.nan, 1.0, 100.0], np.float32)
    assert export.diff_stats(nan, nan, 1e-5, 1e-5)["tolerance_ratio"] == float("inf")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a conv checkpoint, a run file and an isolated embedded MLflow store."""
    isolate_mlflow(monkeypatch, tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    tiny_checkpoint(tmp_path, "conv", (1, 12, 12), 4)
    return tmp_path


def test_parity_failure_exits_1_and_keeps_previous_models(project):
    # A previous export's files: after the failed run they must be byte-for-byte the same.
    (project / "models/decoder.onnx").write_bytes(b"previous decoder")
    (project / "models/encoder.onnx").write_bytes(b"previous encoder")
    (project / "models/prior.onnx").write_bytes(b"previous prior")
    (project / "reports").mkdir()
    (project / "reports/onnx_parity.json").write_text("{}\n")
    before = tree(project / "models") | tree(project / "reports")

    env = {"VAEOPS_EXPORT__ATOL": "1e-30", "VAEOPS_EXPORT__RTOL": "1e-30"}
    res = run_cli("export", cwd=project, env=env)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "parity failed" in last and "× the allowed" in last
    assert "Traceback" not in res.stderr
    assert tree(project / "models") | tree(project / "reports") == before  # no temp files either

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
    assert client.search_registered_models() == []
    run = client.get_run(json.loads((project / "models/run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["vaeops.export"] == "failed"
    assert "parity failed" in run.data.tags["vaeops.export.error"]


def test_a_registry_name_mlflow_refuses_fails_the_export_not_the_training(project):
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    res = run_cli("export", cwd=project, env={"VAEOPS_EXPORT__REGISTERED_MODEL_NAME": "vaeops/decoder"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: export.registered_model_name = 'vaeops/decoder': MLflow refuses it "
        "(Invalid model name 'vaeops/decoder'. Names cannot contain '/' or ':'.)"
    )
    assert [line for line in res.stderr.splitlines() if line.startswith("error")] == [
        res.stderr.strip().splitlines()[-1]
    ]
    assert not any(p.exists() for p in outputs(project))
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # the training run is not made FAILED by its export
    assert run.data.tags["vaeops.export"] == "failed"
    assert "MLflow refuses it" in run.data.tags["vaeops.export.error"]
    assert client.search_registered_models() == [] and not run.outputs.model_outputs


def test_run_file_of_another_training_is_a_usage_error(project):
    (project / "models/run.json").write_text('{"run_id": "0123abcd"}')
    res = run_cli("export", cwd=project)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith(
        "error: models/run.json names MLflow run 0123abcd but models/vae.pt was trained in run "
    )
    assert res.stderr.strip().count("\n") == 0
    assert not any(p.exists() for p in outputs(project))


def test_diverged_checkpoint_fails_parity(project):
    state = load_checkpoint(project / "models/vae.pt")
    state["model"]["decoder.dense.0.weight"][0, 0] = float("nan")
    save_checkpoint(project / "models/vae.pt", state)
    with pytest.raises(WorkError, match="decoder ONNX parity failed .* NaN or infinite outputs"):
        export.run(ExportParams(), Path("models/vae.pt"), Path("models/run.json"), *outputs(project))
    assert not any(p.exists() for p in outputs(project))


def test_missing_inputs_are_usage_errors(project):
    os.remove(project / "models/run.json")
    with pytest.raises(UsageError, match="run.json: missing"):
        export.run(ExportParams(), Path("models/vae.pt"), Path("models/run.json"), *outputs(project))
    res = run_cli("export", "--model", "models/nope.pt", cwd=project)
    assert res.returncode == 2 and "nope.pt: checkpoint not found" in res.stderr
    assert not (project / "models/decoder.onnx").exists()


def test_dvc_stage_reads_exactly_what_it_declares():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export"]
    assert stage["cmd"] == "vaeops export"
    assert {"models/vae.pt", "models/run.json", "src/vaeops/stages/export.py"} <= set(stage["deps"])
    assert stage["params"] == ["export"]
    assert stage["outs"][:3] == ["models/decoder.onnx", "models/encoder.onnx", "models/prior.onnx"]
    # No train key: export logs into the run the checkpoint names, whatever train.experiment says now.
    source = (ROOT / "src/vaeops/stages/export.py").read_text() + inspect.getsource(cli.export)
    assert "train." not in source


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_dvc_exp_run_latent_dim_reaches_the_onnx_decoder(tmp_path, monkeypatch):
    """`dvc exp run -S train.latent_dim=32` on real MNIST (2000 images, 1 epoch): a 32-wide decoder."""
    from test_pipeline import copy_project, dvc

    proj = copy_project(tmp_path / "proj")
    isolate_mlflow(monkeypatch, proj)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=proj, check=True)

    overrides = ["-S", "train.epochs=1", "-S", "preprocess.train_limit=2000", "-S", "train.latent_dim=32"]
    res = dvc("exp", "run", "export", *overrides, cwd=proj)
    assert "Running stage 'export'" in res.stdout

    session = ort.InferenceSession(str(proj / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 32]
    assert session.get_modelmeta().custom_metadata_map["latent_dim"] == "32"
    prior = ort.InferenceSession(str(proj / "models/prior.onnx"), providers=["CPUExecutionProvider"])
    assert prior.get_outputs()[0].shape == ["batch", 32]
    report = json.loads((proj / "reports/onnx_parity.json").read_text())
    assert report["decoder"]["max_abs_diff"] <= 1e-5 and report["encoder"]["max_abs_diff"] <= 1e-5
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")
    run_id = json.loads((proj / "models/run.json").read_text())["run_id"]
    (version,) = client.search_model_versions("name = 'vaeops-decoder'")
    assert version.run_id == run_id
    # Under `dvc exp run`, the run and the registered version carry the experiment's name.
    run = client.get_run(run_id)
    assert run.info.run_name == run.data.tags["dvc_experiment"] == version.tags["dvc_experiment"]

    again = dvc("repro", "export", cwd=proj)
    assert "Running stage" not in again.stdout
