"""`vaeops sample`: the ONNX consumer, run as the real console script against a real exported decoder."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli, tiny_vae, tree
from PIL import Image

from vaeops.stages import export

LATENT = 8
SHAPE = (1, 28, 28)


def write_decoder(path, arch="mlp", image_shape=SHAPE, latent_dim=LATENT):
    model = tiny_vae(arch, image_shape, latent_dim)
    proto = export.to_onnx(export.Decoder(model), torch.randn(4, latent_dim), "z", ["image"], 18)
    export.add_metadata(proto, {"latent_dim": latent_dim, "image_shape": list(image_shape)}, "test decoder")
    onnx.save_model(proto, path)
    return model


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
    (folder / "junk.onnx").write_text("this is not a model\n")
    (folder / "junk.npy").write_text("nor is this an array\n")
    return folder


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
    ],
)
def test_bad_input_exits_2_and_writes_nothing(decoder, bad_inputs, tmp_path, case):
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
