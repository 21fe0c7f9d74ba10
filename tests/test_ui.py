"""The MLflow UI as a person sees it: `vaeops ui`, headless Chromium, the runs table, the run's name,
description and charts (train/val curves first), and its sample grids. Screenshots go to
reports/screenshots/."""

import json
import os
import re
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
SCREENSHOTS = ROOT / "reports" / "screenshots"
RUN_NAME = "mlp-z20-mnist-2ep"  # arch, latent size, dataset, epochs: no DVC experiment here
# A laptop-sized screen: what a person sees before scrolling.
VIEWPORT = {"width": 1600, "height": 1400}


def tiny_project(folder: Path) -> Path:
    write_processed(folder / "data/processed", {"train": 256, "val": 64, "test": 64})
    (folder / "params.yaml").write_text(
        "train:\n  epochs: 2\n  batch_size: 64\nevaluate:\n  iwae_samples: 4\n  iwae_images: 16\n"
    )
    return folder


@pytest.fixture
def ui_server(tmp_path):
    """A trained, evaluated and exported run in a fresh embedded store, and `vaeops ui` serving it;
    stopped by its process id."""
    proj = tiny_project(tmp_path / "proj")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "VAEOPS_PROJECT_ROOT", "DVC_EXP_NAME")
    }
    bindir = Path(sys.executable).parent
    for stage in ("train", "evaluate", "export"):
        res = subprocess.run(
            [bindir / "vaeops", stage], cwd=proj, env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, f"{stage}: {res.stderr}"
    run_id = json.loads((proj / "models/run.json").read_text())["run_id"]

    port = free_port()
    cmd = [str(bindir / "vaeops"), "ui", "--port", str(port)]
    with http_server(cmd, port, proj, env, tmp_path / "ui.log") as url:
        yield url, run_id
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)


def test_ui_shows_the_run_by_name_with_its_curves_first(ui_server):
    from playwright.sync_api import expect, sync_playwright

    url, run_id = ui_server
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync", "--no-first-run"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)

        # As a person would: the experiments list, the experiment, its runs table.
        page.goto(url + "/#/experiments")
        page.get_by_text("Model training", exact=True).click()
        page.get_by_role("link", name="vaeops", exact=True).click()
        run_link = page.locator(f"a[href*='/runs/{run_id}']").first
        expect(run_link).to_have_text(RUN_NAME)
        page.screenshot(path=str(SCREENSHOTS / "mlflow_runs.png"))

        # The run: its name on top, the description on the Overview.
        run_link.click()
        expect(page.get_by_text(RUN_NAME, exact=True).first).to_be_visible()
        expect(page.get_by_text("Changed from the defaults:").first).to_be_visible()
        page.screenshot(path=str(SCREENSHOTS / "mlflow_overview.png"), full_page=True)

        # Model metrics: the train section, then val, then the single numbers (test.*, onnx.*, lr).
        page.get_by_text("Model metrics", exact=True).first.click()
        train_elbo, val_elbo = page.get_by_text("(train/elbo)"), page.get_by_text("(val/elbo)")
        expect(train_elbo).to_be_in_viewport()
        expect(val_elbo).to_be_in_viewport()
        page.screenshot(path=str(SCREENSHOTS / "mlflow_run.png"))
        headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
        expect(headers.first).to_be_visible()
        # Each header reads "<section> (<number of charts>)".
        sections = [re.sub(r"\s*\(\d+\).*", "", h.inner_text(), flags=re.S).strip() for h in headers.all()]
        assert sections == ["train", "val", "Model metrics"], sections
        # lr, images_per_s, train.seconds, one ONNX parity number and seven test numbers; charts render
        # once in view.
        expect(headers.last).to_contain_text("(11)")
        headers.last.scroll_into_view_if_needed()
        # The first row of single-number charts (the section's count above covers the rest).
        for metric in ("images_per_s", "onnx.parity_max_abs_diff"):
            expect(page.get_by_text(metric, exact=True).first).to_be_attached()

        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("samples", exact=True).first.click()
        page.get_by_text("epoch_002.png", exact=True).first.click()
        grid = page.locator("img[src^='blob:']").first
        expect(grid).to_be_visible()
        width, height = grid.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        # 8 × 8 samples of 28 px with 2 px padding.
        assert (width, height) == (8 * 30 + 2, 8 * 30 + 2)
        page.screenshot(path=str(SCREENSHOTS / "mlflow_samples.png"), full_page=True)
        browser.close()
