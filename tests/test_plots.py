"""`dvc plots show` and `dvc plots diff` draw the training curves in headless Chromium with no network."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_pipeline import copy_project, dvc

from vaeops import plots
from vaeops.stages.train import CURVE_COLUMNS

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (make system-deps)"
)
SCREENSHOTS = ROOT / "reports" / "screenshots"
COLUMNS = CURVE_COLUMNS  # what train writes to reports/train_curve.csv

# Per chart: its title, how many lines it has drawn (vega's line marks), how wide the narrowest is
# (in pixels) next to the plot area's width, and the legend's labels.
CHARTS_JS = """() => [...document.querySelectorAll('svg.marks')].map(svg => {
    const lines = [...svg.querySelectorAll('g.mark-line path')].filter(p => p.getAttribute('d'));
    const frame = svg.querySelector('g.mark-group.role-scope path.background, g.role-frame path.background');
    return {
        title: [...svg.querySelectorAll('.role-title-text text')].map(t => t.textContent).join(' '),
        lines: lines.length,
        narrowest: Math.min(...lines.map(p => p.getBBox().width)),
        plot_width: frame ? frame.getBBox().width : 0,
        legend: [...svg.querySelectorAll('.role-legend-label text')].map(t => t.textContent),
    };
})"""


def curve_titles() -> dict[str, int]:
    """The project's own plot definitions over train_curve.csv (bottom of dvc.yaml): title -> line count."""
    defs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    return {title: len(props["y"]["reports/train_curve.csv"]) for d in defs for title, props in d.items()}


def write_curve(path: Path, epochs: int, shift: float) -> None:
    rows = [",".join(COLUMNS)]
    for e in range(1, epochs + 1):
        elbo, kl = -180.0 + 12 * e + shift, 18.0 + 1.5 * e + shift / 4
        values = [e, elbo, -elbo - kl, kl, elbo - 4, -elbo - kl + 3, kl + 1, 1e-3, 4000 + 50 * e]
        rows.append(",".join(str(v) for v in values))
    path.write_text("\n".join(rows) + "\n")


def render_offline(html: Path, screenshot: Path | None = None) -> tuple[list[dict], list[str]]:
    """Open the page in Chromium, every non-file:// request refused; the drawn charts and refused URLs."""
    from playwright.sync_api import sync_playwright

    refused: list[str] = []

    def file_only(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.route("**/*", file_only)
        page.goto(html.as_uri())
        n_charts = len(curve_titles())
        page.wait_for_function(
            f"document.querySelectorAll('svg.marks g.mark-line path').length >= {n_charts}", timeout=60_000
        )
        page.wait_for_timeout(500)  # vega-embed draws one chart after another
        charts = page.evaluate(CHARTS_JS)
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return charts, refused


def assert_curves_drawn(charts: list[dict], revs: int) -> None:
    by_title = {c["title"]: c for c in charts}
    for title, n_fields in curve_titles().items():
        assert title in by_title, f"{title!r} not drawn; charts: {sorted(by_title)}"
        chart = by_title[title]
        assert chart["lines"] >= n_fields * revs, chart
        # Every line spans the epochs, i.e. most of the plot's width: the curve itself, not a stub.
        assert chart["plot_width"] > 100 and chart["narrowest"] > 0.8 * chart["plot_width"], chart


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repo with a hand-written training curve; the page template made as `make setup` does."""
    proj = copy_project(tmp_path / "proj")
    made = subprocess.run([sys.executable, "-m", "vaeops.plots"], cwd=proj, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    write_curve(proj / "reports/train_curve.csv", epochs=6, shift=0.0)
    return proj


def test_template_inlines_vega_and_is_what_dvc_config_names():
    page = plots.page_html()
    assert "{plot_divs}" in page and "window.vegaEmbed" in page
    # No `{scripts}`: that is where DVC puts its CDN <script src> tags.
    assert "{scripts}" not in page and not re.search(r"<script[^>]*\bsrc=", page)
    config = (ROOT / ".dvc/config").read_text()
    assert re.search(rf"^\s*html_template\s*=\s*{re.escape(plots.TEMPLATE.name)}\s*$", config, re.M)
    assert plots.TEMPLATE.parent == Path(".dvc")


def test_template_needs_the_dvc_folder(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vaeops.plots"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_chromium
def test_dvc_plots_show_draws_curves_offline(project):
    dvc("plots", "show", "-o", "shown", cwd=project)
    html = project / "shown" / "index.html"
    assert "cdn.jsdelivr" not in html.read_text()
    charts, refused = render_offline(html, SCREENSHOTS / "dvc_plots.png")
    assert refused == []
    assert_curves_drawn(charts, revs=1)


@pytest.mark.slow
@needs_chromium
def test_dvc_plots_diff_draws_both_revisions_offline(project):
    git = ["git", "-c", "user.name=vaeops test", "-c", "user.email=test@vaeops.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "first"], cwd=project, check=True)
    write_curve(project / "reports/train_curve.csv", epochs=6, shift=15.0)
    subprocess.run([*git, "commit", "-qam", "second"], cwd=project, check=True)

    dvc("plots", "diff", "HEAD~1", "HEAD", "-o", "diffed", cwd=project)
    charts, refused = render_offline(project / "diffed" / "index.html", SCREENSHOTS / "dvc_plots_diff.png")
    assert refused == []
    assert_curves_drawn(charts, revs=2)
    for chart in charts:
        if chart["title"] in curve_titles():
            assert {"HEAD~1", "HEAD"} <= set(chart["legend"]), chart["legend"]
