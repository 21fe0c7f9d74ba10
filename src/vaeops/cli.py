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


@app.command()
def train(
    params_file: ParamsFile = PARAMS,
    data: Annotated[Path, typer.Option(help="folder with train/val .npz and meta.json")] = Path(
        "data/processed"
    ),
    model: Annotated[Path, typer.Option(help="checkpoint, rewritten every epoch")] = Path("models/vae.pt"),
    run_file: Annotated[Path, typer.Option(help="MLflow run id for later stages (JSON)")] = Path(
        "models/run.json"
    ),
    metrics: Annotated[Path, typer.Option(help="final train/val ELBO, KL, seconds (JSON)")] = Path(
        "reports/train.json"
    ),
    curve: Annotated[Path, typer.Option(help="one row per epoch (CSV)")] = Path("reports/train_curve.csv"),
    samples: Annotated[Path, typer.Option(help="8×8 samples of the final model (PNG)")] = Path(
        "reports/train_samples.png"
    ),
) -> None:
    """Train the VAE; checkpoint every epoch; log curves and sample grids to MLflow."""
    from vaeops.config import load_params
    from vaeops.progress import log
    from vaeops.stages import train

    p = load_params(params_file).train
    if p.nproc > 1 and train.world()[1] == 1:
        # Not under torchrun yet: run this same command as train.nproc workers (see README, DDP).
        raise typer.Exit(train.launch(p, sys.argv[1:]))
    try:
        train.run(p, train.Paths(data, model, run_file, metrics, curve, samples))
    except KeyboardInterrupt:
        log(f"interrupted: {model} holds the last finished epoch; continue with train.resume = true")
        raise typer.Exit(130) from None


@app.command()
def evaluate(
    params_file: ParamsFile = PARAMS,
    data: Annotated[Path, typer.Option(help="folder with test.npz and meta.json")] = Path("data/processed"),
    model: Annotated[Path, typer.Option(help="checkpoint written by train")] = Path("models/vae.pt"),
    run_file: Annotated[Path, typer.Option(help="MLflow run of training (JSON)")] = Path("models/run.json"),
    metrics: Annotated[Path, typer.Option(help="test ELBO, IWAE log p(x), bits/dim, ... (JSON)")] = Path(
        "reports/metrics.json"
    ),
    figures: Annotated[Path, typer.Option(help="folder for the PNG figures")] = Path("reports/figures"),
) -> None:
    """Test-set ELBO, IWAE log-likelihood, bits/dim, active units, per-class ELBO, and figures."""
    from vaeops.config import load_params
    from vaeops.stages import evaluate

    p = load_params(params_file)
    evaluate.run(p.train, p.evaluate, data, model, run_file, metrics, figures)


@app.command()
def export(
    params_file: ParamsFile = PARAMS,
    model: Annotated[Path, typer.Option(help="checkpoint written by train")] = Path("models/vae.pt"),
    run_file: Annotated[Path, typer.Option(help="MLflow run of training (JSON)")] = Path("models/run.json"),
    decoder: Annotated[Path, typer.Option(help="ONNX decoder z → image")] = Path("models/decoder.onnx"),
    encoder: Annotated[Path, typer.Option(help="ONNX encoder image → mu, logvar")] = Path(
        "models/encoder.onnx"
    ),
    report: Annotated[Path, typer.Option(help="ONNX vs PyTorch parity (JSON)")] = Path(
        "reports/onnx_parity.json"
    ),
) -> None:
    """Export decoder and encoder to ONNX, prove parity with PyTorch, log and register them in MLflow."""
    from vaeops.config import load_params
    from vaeops.stages import export

    p = load_params(params_file)
    export.run(p.export, p.train.experiment, model, run_file, decoder, encoder, report)


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="ONNX decoder written by export")] = Path("models/decoder.onnx"),
    n: Annotated[int, typer.Option("-n", help="number of images (random z ~ N(0, I))")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the random latents")] = 0,
    z_file: Annotated[
        Path | None, typer.Option(help="decode these latents (.npy, N × latent_dim) instead of random ones")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="png (a grid) or npy (the N×C×H×W float32 images)")
    ] = "png",
    nrow: Annotated[int, typer.Option(help="images per grid row (0 = square-ish)")] = 0,
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="output file [default: samples.<format>]")
    ] = None,
) -> None:
    """Decode latents with the ONNX decoder (onnxruntime only, no torch) to a PNG grid or an .npy array."""
    from vaeops import sample as sampler

    sampler.run(model, out or Path(f"samples.{fmt}"), n=n, seed=seed, z_file=z_file, fmt=fmt, nrow=nrow)


@app.command()
def params() -> None:
    """Print the params reference (every key, default, meaning) as a Markdown table."""
    from vaeops.config import reference_table

    print(reference_table())


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
    host: Annotated[str, typer.Option(help="interface; keep 127.0.0.1 unless you mean to share it")] = (
        "127.0.0.1"
    ),
) -> None:
    """Start the MLflow UI against the project's tracking store (MLFLOW_TRACKING_URI if set)."""
    from vaeops import ui

    ui.serve(port, host)


def main() -> None:
    try:
        app()
    except VaeopsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":  # `python -m vaeops.cli`, as torchrun's workers start it
    main()
