"""`vaeops sample`: the ONNX consumer, run as the real console script against a real exported decoder
and prior (tests/test_export.py runs it on whole exports: RGB, logistic, VampPrior)."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli, tiny_vae, tree
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from vaeops import sample
from vaeops.stages import export

LATENT = 8
SHAPE = (1, 28, 28)


def write_decoder(path, arch="mlp", image_shape=SHAPE, latent_dim=LATENT, prior=True):
    """The decoder at `path` and, unless `prior` is false (an export from before priors were
    exported), the model's prior next to it, as export writes them."""
    model = tiny_vae(arch, image_shape, latent_dim)
    proto = export.to_onnx(export.Decoder(model), torch.randn(4, latent_dim), "z", ["image"], 18)
    export.add_metadata(proto, {"latent_dim": latent_dim, "image_shape": list(image_shape)}, "test decoder")
    onnx.save_model(proto, path)
    if prior:
        write_prior(path.with_name("prior.onnx"), *export.prior_components(model))
    return model


def write_prior(path, mu, logvar):
    onnx.save_model(export.prior_graph(np.asarray(mu, np.float32), np.asarray(logvar, np.float32), 18), path)


def normal_prior(path, latent_dim=LATENT):
    write_prior(path, np.zeros((1, latent_dim)), np.zeros((1, latent_dim)))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    model = write_decoder(folder / "decoder.onnx")
    return folder / "decoder.onnx", model


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files that look right by name only: an encoder model, junk, latents one dim too narrow."""
    folder = tmp_path_factory.mktemp("bad")
    encoder = export.Encoder(tiny_vae("mlp", SHAPE, LATENT))
    onnx.save_model(
        export.to_onnx(encoder, torch.rand(2, *SHAPE), "image", ["mu", "logvar"], 18), folder / "encoder.onnx"
    )
    np.save(folder / "narrow.npy", np.zeros((4, LATENT - 1), np.float32))
    np.save(folder / "cube.npy", np.zeros((2, 2, LATENT), np.float32))
    np.save(folder / "nan.npy", np.full((3, LATENT), np.nan, np.float32))
    np.save(folder / "huge.npy", np.full((3, LATENT), 1e300))  # finite float64, inf as float32
    np.save(folder / "empty.npy", np.zeros((0, LATENT), np.float32))
    np.save(folder / "complex.npy", np.zeros((3, LATENT), np.complex64))
    linear_decoder(folder / "int_input.onnx", "batch", TensorProto.INT64)
    (folder / "old").mkdir()
    write_decoder(folder / "old/decoder.onnx", prior=False)
    (folder / "wide").mkdir()
    write_decoder(folder / "wide/decoder.onnx", prior=False)
    normal_prior(folder / "wide/prior.onnx", LATENT + 1)
    (folder / "junk").mkdir()
    write_decoder(folder / "junk/decoder.onnx", prior=False)
    (folder / "junk/prior.onnx").write_text("not a prior\n")
    (folder / "junk.onnx").write_text("this is not a model\n")
    (folder / "junk.npy").write_text("nor is this an array\n")
    return folder


def linear_decoder(path, batch, elem=TensorProto.FLOAT):
    """A hand-made decoder z → sigmoid(z W) as 1×28×28 images, with the given batch dim and element
    type (one that torch's exporter would not write), and N(0, I)'s prior.onnx next to it; returns W."""
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}.get(elem, np.float32)
    w = np.random.default_rng(0).standard_normal((LATENT, 28 * 28)).astype(dtype)
    nodes = [
        helper.make_node("Cast", ["z"], ["zf"], to=TensorProto.FLOAT if elem == TensorProto.INT64 else elem),
        helper.make_node("MatMul", ["zf", "w"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["image"]),
    ]
    out_elem = TensorProto.FLOAT if elem == TensorProto.INT64 else elem
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("z", elem, [batch, LATENT])],
        [helper.make_tensor_value_info("image", out_elem, [batch, *SHAPE])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1, *SHAPE], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    normal_prior(path.with_name("prior.onnx"))
    return w


def expected_images(z, w):
    return (1 / (1 + np.exp(-(z.astype(w.dtype) @ w)))).reshape(len(z), *SHAPE)


@pytest.mark.parametrize(
    "batch, elem",
    [(1, TensorProto.FLOAT), (4, TensorProto.FLOAT), ("batch", TensorProto.DOUBLE)],
    ids=["fixed batch 1", "fixed batch 4", "float64 input"],
)
def test_decoders_with_a_fixed_batch_or_float64_input(tmp_path, batch, elem):
    """A fixed batch is decoded that many latents at a time (the last call padded); latents are cast
    to the input type the model declares."""
    w = linear_decoder(tmp_path / "d.onnx", batch, elem)
    args = ["sample", "--model", "d.onnx", "-n", "5", "--seed", "2", "--format", "npy", "-o", "x.npy"]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    images = np.load(tmp_path / "x.npy")
    z = np.random.default_rng(2).standard_normal((5, LATENT), dtype=np.float32)
    assert images.dtype == w.dtype
    np.testing.assert_allclose(images, expected_images(z, w), rtol=1e-5, atol=1e-6)
    res = run_cli("sample", "--model", "d.onnx", "-n", "3", "-o", "x.png", cwd=tmp_path)
    assert res.returncode == 0 and Image.open(tmp_path / "x.png").size == (2 * 30 + 2, 2 * 30 + 2)


@pytest.fixture(scope="module")
def big_z(tmp_path_factory):
    """A header claiming 10⁹ latents over a sparse file: refused before any of it is read. Kept out
    of the test's folder, whose every file the test reads."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**9, LATENT)}
        )
        f.truncate(f.tell() + 10**9 * LATENT * 4)
    return path


def ort_decode(path, z):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"z": z})[0]


def test_png_grid_of_the_right_size_and_seeded(decoder, tmp_path):
    model_path, _ = decoder
    res = run_cli(
        "sample", "--model", str(model_path), "-n", "64", "--seed", "0", "-o", "s.png", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    image = Image.open(tmp_path / "s.png")
    # 8 × 8 grid of 28-pixel images with a 2-pixel border: 8 · 30 + 2.
    assert (image.format, image.size, image.mode) == ("PNG", (242, 242), "RGB")

    run_cli("sample", "--model", str(model_path), "-n", "64", "--seed", "0", "-o", "again.png", cwd=tmp_path)
    run_cli("sample", "--model", str(model_path), "-n", "64", "--seed", "1", "-o", "other.png", cwd=tmp_path)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "s.png").read_bytes()
    assert (tmp_path / "other.png").read_bytes() != (tmp_path / "s.png").read_bytes()

    res = run_cli(
        "sample", "--model", str(model_path), "-n", "5", "--nrow", "5", "-o", "row.png", cwd=tmp_path
    )
    assert res.returncode == 0 and Image.open(tmp_path / "row.png").size == (5 * 30 + 2, 32)


def test_npy_holds_the_decoded_images(decoder, tmp_path):
    model_path, model = decoder
    res = run_cli(
        "sample", "--model", str(model_path), "-n", "5", "--seed", "3", "--format", "npy", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    images = np.load(tmp_path / "samples.npy")
    assert images.shape == (5, *SHAPE) and images.dtype == np.float32
    z = np.random.default_rng(3).standard_normal((5, LATENT), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(images, model.decode(torch.from_numpy(z)).numpy(), atol=1e-5)


def test_z_file_decodes_given_latents(decoder, tmp_path):
    model_path, _ = decoder
    z = np.linspace(-3, 3, 3 * LATENT).reshape(3, LATENT)  # float64 on purpose: cast, not refused
    np.save(tmp_path / "z.npy", z)
    res = run_cli(
        "sample",
        "--model",
        str(model_path),
        "--z-file",
        "z.npy",
        "--format",
        "npy",
        "-o",
        "x.npy",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), ort_decode(model_path, z.astype(np.float32)))


def test_an_old_export_without_prior_still_decodes_given_latents(bad_inputs, tmp_path):
    z = np.full((2, LATENT), 0.5, np.float32)
    np.save(tmp_path / "z.npy", z)
    old = bad_inputs / "old/decoder.onnx"
    res = run_cli("sample", "--model", str(old), "--z-file", "z.npy", "--format", "npy", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npy"), ort_decode(old, z))


def test_latents_come_from_the_mixture_not_from_n01(tmp_path):
    """A prior of 3 far-apart, narrow components: every seeded draw sits at one of them, each drawn
    about a third of the time; N(0, I) would put them all near the origin."""
    mu = np.array([[10.0] * LATENT, [-10.0] * LATENT, [0.0, 20.0] * (LATENT // 2)])
    write_prior(tmp_path / "prior.onnx", mu, np.full((3, LATENT), 2 * np.log(0.01)))
    prior = sample.load_prior(tmp_path / "decoder.onnx", LATENT)
    z = sample.draw_latents(prior, 3000, LATENT, seed=7)
    distance = np.linalg.norm(z[:, None, :] - mu[None].astype(np.float32), axis=2)  # 3000 × 3
    assert (distance.min(1) < 0.01 * 6 * np.sqrt(LATENT)).all()
    counts = np.bincount(distance.argmin(1), minlength=3)
    assert (np.abs(counts - 1000) < 5 * np.sqrt(3000 * (1 / 3) * (2 / 3))).all(), counts  # 5 sigma
    np.testing.assert_array_equal(z, sample.draw_latents(prior, 3000, LATENT, seed=7))  # seeded


def test_conv_decoder_with_odd_image_size(tmp_path):
    write_decoder(tmp_path / "conv.onnx", arch="conv", image_shape=(1, 13, 15), latent_dim=3)
    res = run_cli("sample", "--model", "conv.onnx", "-n", "2", "--format", "npy", "-o", "c.npy", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "c.npy").shape == (2, 1, 13, 15)


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "not onnx",
        "encoder model",
        "wrong width",
        "missing z",
        "not npy",
        "n zero",
        "bad format",
        "output is a folder",
        "unwritable output",
        "model is a folder",
        "int input",
        "seed negative",
        "nrow negative",
        "nrow above n",
        "n beyond memory",
        "z beyond memory",
        "z not 2-D",
        "z NaN",
        "z beyond float32",
        "z empty",
        "z complex",
        "prior missing",
        "prior of another width",
        "prior not onnx",
    ],
)
def test_bad_input_exits_2_and_writes_nothing(decoder, bad_inputs, big_z, tmp_path, case):
    model_path, _ = decoder
    for f in bad_inputs.iterdir():
        (tmp_path / f.name).symlink_to(f)
    args, expected = {
        "missing model": (["--model", "nope.onnx"], "nope.onnx: decoder not found"),
        "not onnx": (["--model", "junk.onnx"], "junk.onnx: not a loadable ONNX model"),
        "encoder model": (["--model", "encoder.onnx"], "encoder.onnx: not a vaeops decoder"),
        "wrong width": (["--z-file", "narrow.npy"], f"wants N × {LATENT}"),
        "missing z": (["--z-file", "nope.npy"], "nope.npy: latent file not found"),
        "not npy": (["--z-file", "junk.npy"], "junk.npy: not a .npy array"),
        "n zero": (["-n", "0"], "-n 0: need at least one image"),
        "bad format": (["--format", "jpg"], "--format 'jpg' is not allowed"),
        "output is a folder": (["-o", "."], "-o .: is a folder"),
        "unwritable output": (["-o", "junk.onnx/x.png"], "junk.onnx/x.png: cannot write"),
        "model is a folder": (["--model", "."], ".: is a folder; name the decoder's .onnx file"),
        "int input": (["--model", "int_input.onnx"], "input z is tensor(int64), not float"),
        "seed negative": (["--seed", "-1"], "--seed -1: must be ≥ 0"),
        "nrow negative": (["--nrow", "-2"], "--nrow -2: must be ≥ 0"),
        "nrow above n": (["-n", "4", "--nrow", "5"], "--nrow 5: more than the 4 images"),
        "n beyond memory": (
            ["-n", "1000000000", "--format", "npy", "-o", "out.npy"],
            # per image: its 784 float32 pixels, the noise eps and u, z drawn and z as the decoder's input
            "-n 1000000000: that many 1×28×28 float32 images as npy need about 2.94 TiB of memory, more than",
        ),
        "z beyond memory": (
            ["--z-file", str(big_z)],
            "big.npy (1000000000 latents): that many 1×28×28 float32",
        ),
        "z not 2-D": (["--z-file", "cube.npy"], f"cube.npy: latents have shape (2, 2, {LATENT})"),
        "z NaN": (["--z-file", "nan.npy"], "nan.npy: latents contain NaN or infinity"),
        "z beyond float32": (
            ["--z-file", "huge.npy"],
            "huge.npy: latents contain NaN or infinity (as float32)",
        ),
        "z empty": (["--z-file", "empty.npy"], "empty.npy: holds no latents"),
        "z complex": (["--z-file", "complex.npy"], "complex.npy: expected a numeric N × 8 .npy array"),
        "prior missing": (
            ["--model", "old/decoder.onnx"],
            "old/prior.onnx: the model's prior is missing next to decoder.onnx (exported by an older "
            "vaeops?); rerun `vaeops export`",
        ),
        "prior of another width": (
            ["--model", "wide/decoder.onnx"],
            "wide/prior.onnx: not the prior of this 8-wide decoder",
        ),
        "prior not onnx": (["--model", "junk/decoder.onnx"], "junk/prior.onnx: not a loadable ONNX model"),
    }[case]
    if "--model" not in args:
        args = ["--model", str(model_path), *args]
    before = tree(tmp_path)
    if "-o" not in args:
        args = [*args, "-o", "out.png"]
    res = run_cli("sample", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert tree(tmp_path) == before


def test_sample_path_imports_no_torch_mlflow_or_onnx(decoder, tmp_path):
    model_path, _ = decoder
    code = (
        "import sys\n"
        "from vaeops.cli import main\n"
        f"sys.argv = ['vaeops', 'sample', '--model', {str(model_path)!r}, '-n', '4', '-o', 'x.png']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'onnx', 'onnxscript') if m in sys.modules))\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
    assert (tmp_path / "x.png").is_file()
