"""The `vaeops` command: one subcommand per DVC stage, plus `sample` and `ui`.

Each command imports its stage module (and with it torch, mlflow, onnx) only when it runs, so
`vaeops --help` stays fast.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from vaeops.errors import VaeopsError

app = typer.Typer(
    name="vaeops",
    help="A reproducible VAE pipeline: download → preprocess → train → evaluate → export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsFile = Annotated[Path, typer.Option("--params", help="params file (YAML, one section per stage)")]
PARAMS = Path("params.yaml")


@app.command()
def download(
    params_file: ParamsFile = PARAMS,
    out: Annotated[Path, typer.Option(help="verified IDX files go to <out>/<dataset>/")] = Path("data/raw"),
) -> None:
    """Fetch the dataset's IDX files (mirror, system folder, public mirrors) and verify SHA-256."""
    from vaeops.config import load_params
    from vaeops.stages import download

    data = load_params(params_file).data
    download.run(data, out / data.dataset)


@app.command()
def preprocess(
    params_file: ParamsFile = PARAMS,
    raw: Annotated[Path, typer.Option(help="folder holding <dataset>/ IDX files")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="folder for train/val/test .npz")] = Path("data/processed"),
    report: Annotated[Path, typer.Option(help="data statistics (JSON)")] = Path("reports/data.json"),
) -> None:
    """Validate the IDX files, split off a seeded validation set, store compact uint8 arrays."""
    from vaeops.config import load_params
    from vaeops.stages import preprocess

    p = load_params(params_file)
    preprocess.run(p.data, p.preprocess, raw / p.data.dataset, out, report)


def main() -> None:
    try:
        app()
    except VaeopsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
