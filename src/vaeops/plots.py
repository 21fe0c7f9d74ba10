"""An HTML template for `dvc plots show` / `dvc plots diff` that draws the vega curves with no network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline the ELBO/KL/recon curves
stay blank. This template inlines all three (vl-convert-python ships them as one bundle) and leaves
out DVC's `{scripts}` placeholder, where the CDN tags would go. `.dvc/config` points
`plots.html_template` at the file; `make setup` (or `python -m vaeops.plots`) writes it.
Without the file dvc stops with "HTML template has to contain '{plot_divs}'". (That note lives here
and in README.md, not in .dvc/config: `dvc config` drops comments when it rewrites the file.)
"""

import os
import sys
from pathlib import Path

from vaeops.errors import UsageError, VaeopsError

# Relative to the project root; .dvc/config names it relative to .dvc (git-ignored: it is generated).
TEMPLATE = Path(".dvc/offline_plots.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
{bundle}
    </script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def vegalite_version(available: list[str]) -> str:
    """The newest Vega-Lite 5.x: DVC's plot templates are written against the v5 schema."""
    v5 = [v for v in available if v.split(".")[0] == "5"]
    return max(v5, key=lambda v: tuple(int(n) for n in v.split(".")))


def page_html() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=vegalite_version(vl_convert.get_vegalite_versions()))
    # DVC's plot divs call the globals vegaEmbed/vega/vegaLite (the bundle sets them on window) while the
    # page is still parsing, so the bundle is a plain script, not a module, placed before them. The
    # function scope keeps its many short top-level names from clashing with DVC's `var spec`.
    bundle = "(function () {\n" + bundle.replace("</script", "<\\/script") + "\n})();"
    return PAGE.replace("{bundle}", bundle)


def write_template(path: Path = TEMPLATE) -> Path:
    if not path.parent.is_dir():
        raise UsageError(f"no folder {path.parent}: run this from the project root (where .dvc is)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page_html(), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written template for dvc to read
    return path


def main() -> None:
    try:
        path = write_template(Path(sys.argv[1]) if len(sys.argv) > 1 else TEMPLATE)
    except VaeopsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"wrote {path} (vega for `dvc plots show` without network)")


if __name__ == "__main__":
    main()
