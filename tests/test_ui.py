"""The MLflow UI as a person sees it: `vaeops ui`, headless Chromium, the run's charts and sample grids."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, http_server, write_processed

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make system-deps)"),
]
SCREENSHOT = ROOT / "reports" / "screenshots" / "mlflow_run.png"


def tiny_project(folder: Path) -> Path:
    write_processed(folder / "data/processed", {"train": 256, "val": 64})
    (folder / "params.yaml").write_text("train:\n  epochs: 2\n  batch_size: 64\n")
    return folder


@pytest.fixture
def ui_server(tmp_path):
    """A trained run in a fresh embedded store, and `vaeops ui` serving it; stopped by its process id."""
    proj = tiny_project(tmp_path / "proj")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VAEOPS_PROJECT_ROOT")}
    bindir = Path(sys.executable).parent
    train = subprocess.run(
        [bindir / "vaeops", "train"], cwd=proj, env=env, capture_output=True, text=True, timeout=600
    )
    assert train.returncode == 0, train.stderr
    run_id = json.loads((proj / "models/run.json").read_text())["run_id"]

    port = free_port()
    cmd = [str(bindir / "vaeops"), "ui", "--port", str(port)]
    with http_server(cmd, port, proj, env, tmp_path / "ui.log") as url:
        yield url, run_id
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)


def test_ui_shows_curves_and_sample_grids(ui_server):
    from playwright.sync_api import expect, sync_playwright

    url, run_id = ui_server
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1700})
        page.set_default_timeout(60_000)

        # As a person would: the experiments list, the experiment, then the run.
        page.goto(url + "/#/experiments")
        page.get_by_text("Model training", exact=True).click()
        page.get_by_role("link", name="vaeops", exact=True).click()
        page.locator(f"a[href*='/runs/{run_id}']").first.click()

        page.get_by_text("Model metrics", exact=True).first.click()
        search = page.get_by_placeholder("Search metric charts")
        for metric in ("train/elbo", "val/elbo", "train/kl"):
            search.fill(metric)
            expect(page.get_by_text(f"({metric})").first).to_be_visible()
        search.fill("")
        expect(page.get_by_text("(train/elbo)").first).to_be_visible()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("samples", exact=True).first.click()
        page.get_by_text("epoch_002.png", exact=True).first.click()
        grid = page.locator("img[src^='blob:']").first
        expect(grid).to_be_visible()
        width, height = grid.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        # 8 × 8 samples of 28 px with 2 px padding.
        assert (width, height) == (8 * 30 + 2, 8 * 30 + 2)
        page.screenshot(path=str(SCREENSHOT.with_name("mlflow_samples.png")), full_page=True)
        browser.close()
