"""End to end: real `dvc repro` in a temp copy of the project against the offline MNIST mirror."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent"),
]


def copy_project(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files only: what a fresh clone plus local edits would hold."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    # What `make setup` generates into a checkout: the offline page template `dvc plots` uses.
    template = ROOT / ".dvc/offline_plots.html"
    if template.is_file():
        shutil.copy2(template, dest / ".dvc/offline_plots.html")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def dvc(*args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "VAEOPS_DATA_MIRROR": str(SHARED / "mnist"),
        **extra_env,
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded store of the copied project
    res = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_dvc_repro_download_preprocess_on_real_mnist(tmp_path):
    proj = copy_project(tmp_path / "proj")
    dvc("repro", "preprocess", cwd=proj)
    report = json.loads((proj / "reports/data.json").read_text())
    assert (report["train"]["count"], report["val"]["count"], report["test"]["count"]) == (55000, 5000, 10000)
    assert report["train"]["class_histogram"][1] > 5000  # ones are the most common digit

    again = dvc("repro", "preprocess", cwd=proj)
    assert "Running stage" not in again.stdout

    params = (proj / "params.yaml").read_text().replace("val_size: 5000", "val_size: 1000")
    (proj / "params.yaml").write_text(params)
    changed = dvc("repro", "preprocess", cwd=proj)
    assert "Running stage 'preprocess'" in changed.stdout
    assert "Running stage 'download'" not in changed.stdout
    assert json.loads((proj / "reports/data.json").read_text())["val"]["count"] == 1000
