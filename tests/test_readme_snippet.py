"""README's "Using the ONNX decoder" snippet runs as written against an exported prior and decoder, and
draws the same images as `vaeops sample`."""

import re
import subprocess
import sys

import numpy as np
import onnx
import torch
from conftest import ROOT, run_cli, tiny_vae

from vaeops.stages import export

HEADING = "## Using the ONNX decoder"


def snippet() -> str | None:
    text = (ROOT / "README.md").read_text()
    if HEADING not in text:
        return None
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    return block.group(1) if block else None


def test_readme_onnx_snippet_runs(tmp_path):
    code = snippet()
    assert code is not None, f"README.md has no '{HEADING}' section with a python block"
    # An RGB model with a VampPrior: the snippet must handle C channels and a mixture prior.
    latent_dim = 7
    model = tiny_vae("conv", (3, 16, 16), latent_dim, prior="vamp", prior_components=4)
    proto = export.to_onnx(export.Decoder(model), torch.randn(4, latent_dim), "z", ["image"], 18)
    export.add_metadata(proto, {"latent_dim": latent_dim, "image_shape": [3, 16, 16]}, "test decoder")
    (tmp_path / "models").mkdir()
    onnx.save_model(proto, tmp_path / "models/decoder.onnx")
    onnx.save_model(export.prior_graph(*export.prior_components(model), 18), tmp_path / "models/prior.onnx")

    code += '\nnp.save("snippet.npy", images)\n'
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    # The snippet prints the decoded batch's shape: the model's latent width was read, not assumed.
    assert "(16, 3, 16, 16)" in res.stdout
    assert np.isfinite([float(x) for x in res.stdout.split()[-2:]]).all()

    # As the README says: the same images as `vaeops sample -n 16 --seed 0`.
    res = run_cli("sample", "-n", "16", "--seed", "0", "--format", "npy", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "snippet.npy"), np.load(tmp_path / "samples.npy"))
