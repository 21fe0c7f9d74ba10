"""The `vaeops` command: one subcommand per DVC stage, plus `sample` and `ui`.

Each command imports its stage module (and with it torch, mlflow, onnx) only when it runs, so
`vaeops --help` stays fast.
"""

import atexit
import errno
import gc
import logging
import os
import sys
import traceback
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

# At exit, Python's last garbage collections walk every object that torch, MLflow and onnx created,
# which takes as long as a small stage's work; frozen objects are skipped (the process's memory goes
# back to the system anyway). Registered before those libraries load, so their exit handlers run first.
atexit.register(gc.freeze)

ParamsFile = Annotated[Path, typer.Option("--params", help="params file (YAML, one section per stage)")]
PARAMS = Path("params.yaml")


@app.command()
def download(
    params_file: ParamsFile = PARAMS,
    out: Annotated[Path, typer.Option(help="verified files go to <out>/<dataset>/")] = Path("data/raw"),
) -> None:
    """Fetch the dataset's files (mirror, system folder, public mirrors) and verify them."""
    from vaeops.config import load_params
    from vaeops.progress import work
    from vaeops.stages import download

    data = load_params(params_file).data
    with work("download"):
        download.run(data, out / data.dataset)


@app.command()
def preprocess(
    params_file: ParamsFile = PARAMS,
    raw: Annotated[Path, typer.Option(help="folder holding <dataset>/ source files")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="folder for train/val/test .npz")] = Path("data/processed"),
    report: Annotated[Path, typer.Option(help="data statistics (JSON)")] = Path("reports/data.json"),
) -> None:
    """Validate the source files, split off seeded validation (and test) sets, store uint8 arrays."""
    from vaeops.config import load_params
    from vaeops.progress import work
    from vaeops.stages import preprocess

    p = load_params(params_file)
    with work("preprocess"):
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
        sys.exit(train.launch(p, sys.argv[1:]))
    try:
        train.run(p, train.Paths(data, model, run_file, metrics, curve, samples))
    except KeyboardInterrupt as e:
        import signal

        # SIGTERM and SIGHUP arrive as train.Interrupted; a bare KeyboardInterrupt is Ctrl-C.
        signum = getattr(e, "signum", signal.SIGINT)
        log(
            f"interrupted: {model} holds the last finished epoch; continue with train.resume = true "
            f"({signal.Signals(signum).name})"
        )
        # sys.exit, not typer.Exit: main() reads an exit code 130 that typer returns as a Ctrl-C
        # it caught, which this is not (the line above already says what happened).
        sys.exit(128 + signum)


@app.command()
def evaluate(
    params_file: ParamsFile = PARAMS,
    data: Annotated[Path, typer.Option(help="folder with test.npz and meta.json")] = Path("data/processed"),
    model: Annotated[Path, typer.Option(help="checkpoint written by train")] = Path("models/vae.pt"),
    run_file: Annotated[Path, typer.Option(help="the checkpoint's run (JSON)")] = Path("models/run.json"),
    metrics: Annotated[Path, typer.Option(help="test ELBO, IWAE log p(x), bits/dim, ... (JSON)")] = Path(
        "reports/metrics.json"
    ),
    figures: Annotated[Path, typer.Option(help="folder for the PNG figures")] = Path("reports/figures"),
    elbo_by_class: Annotated[Path, typer.Option(help="test ELBO per class (JSON)")] = Path(
        "reports/elbo_by_class.json"
    ),
) -> None:
    """Test-set ELBO, IWAE log p(x) and bits/dim (normalized likelihoods), per-class scores, figures."""
    from vaeops.config import load_params
    from vaeops.stages import evaluate

    p = load_params(params_file)
    evaluate.run(p.train, p.evaluate, data, model, run_file, metrics, figures, elbo_by_class)


@app.command()
def export(
    params_file: ParamsFile = PARAMS,
    model: Annotated[Path, typer.Option(help="checkpoint written by train")] = Path("models/vae.pt"),
    run_file: Annotated[Path, typer.Option(help="the checkpoint's run (JSON)")] = Path("models/run.json"),
    decoder: Annotated[Path, typer.Option(help="ONNX decoder z → image")] = Path("models/decoder.onnx"),
    encoder: Annotated[Path, typer.Option(help="ONNX encoder image → mu, logvar")] = Path(
        "models/encoder.onnx"
    ),
    report: Annotated[Path, typer.Option(help="ONNX vs PyTorch parity (JSON)")] = Path(
        "reports/onnx_parity.json"
    ),
) -> None:
    """Export decoder, encoder and prior to ONNX, prove parity with PyTorch, log them in MLflow."""
    from vaeops.config import load_params
    from vaeops.stages import export

    p = load_params(params_file)
    export.run(p.export, model, run_file, decoder, encoder, report)


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="ONNX decoder (+ prior.onnx)")] = Path("models/decoder.onnx"),
    n: Annotated[int, typer.Option("-n", help="number of images (z drawn from the model's prior)")] = 64,
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
    """Sample the exported prior and decoder (onnxruntime only, no torch) to a PNG grid or an .npy array."""
    from vaeops import sample as sampler

    sampler.run(model, out or Path(f"samples.{fmt}"), n=n, seed=seed, z_file=z_file, fmt=fmt, nrow=nrow)


@app.command()
def params() -> None:
    """Print the params reference (every key, default, meaning) as a Markdown table."""
    from vaeops.config import reference_table

    print(reference_table())


@app.command()
def exps(
    all_commits: Annotated[
        bool, typer.Option("--all-commits", "-A", help="every commit, not only HEAD")
    ] = False,
) -> None:
    """The short `dvc exp show`: per experiment, the params it changed and the numbers that matter."""
    from vaeops import exps as table

    print(table.show(all_commits))


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


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="on an error, show the traceback (as VAEOPS_DEBUG=1 does)")
    ] = False,
) -> None:
    if debug:
        os.environ["VAEOPS_DEBUG"] = "1"  # the environment, so torchrun's workers see it too


def _debug() -> bool:
    return os.environ.get("VAEOPS_DEBUG", "") not in ("", "0")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _store_uri() -> str:
    try:
        from vaeops.tracking import tracking_uri

        return tracking_uri()
    except Exception:
        return os.environ.get("MLFLOW_TRACKING_URI", "(unknown)")


def _causes(e: BaseException) -> list[BaseException]:
    """e and the errors it was raised from (`raise ... from`), outermost first."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or getattr(e, "orig", None)  # sqlalchemy keeps the driver's error in .orig
    return chain


# What to do about the SQLite errors a damaged, read-only or full store gives, and the exit code:
# 2 where the store itself must be fixed, as for any other damaged input.
DAMAGED = "the file is damaged; restore it from a backup, or move it away to start a new store"
SQLITE_HINTS = {
    "readonly database": (
        "the file or its folder is read-only; make them writable or set MLFLOW_TRACKING_URI",
        1,
    ),
    "disk is full": ("free some space and rerun", 1),
    "not a database": (DAMAGED, 2),
    "malformed": (DAMAGED, 2),
    "unable to open": ("check that it is a file in a folder you can write", 1),
    "locked": ("another process holds it; wait for it, or stop it", 1),
}


def _explain_os_error(e: OSError) -> str:
    path = e.filename
    if e.errno == errno.ENOSPC:
        return f"no space left on the device holding {path or 'the output'}; free some and rerun"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {path or 'the output'}; free some space and rerun"
    if e.errno == errno.EFBIG:
        return (
            f"{path or 'an output'}: file too large for this process's file-size limit (ulimit -f) or the "
            "file system; raise the limit or write somewhere else"
        )
    if e.errno == errno.EROFS:
        return f"cannot write {path or 'the output'} (read-only file system); write somewhere else"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write or read {path or 'a file'} (permission denied); check its owner and mode"
    if e.errno == errno.ENOENT:
        return f"no such file or folder: {path or _first_line(e)}"
    return f"{path}: {e.strerror}" if path and e.strerror else f"{type(e).__name__}: {_first_line(e)}"


def _explain(e: Exception) -> tuple[str, int]:
    """One line and an exit code for a failure: 2 when the user must change an input, else 1.

    Third-party errors are recognised by class and module name, so that neither this module nor
    `vaeops --help` imports mlflow, sqlalchemy or onnxruntime. A library error raised from an OS or
    SQLite error (MLflow wraps both) is explained by that cause, which says what to fix.
    """
    if isinstance(e, VaeopsError):
        return str(e), e.exit_code
    names = {c.__name__ for c in type(e).__mro__}
    module = type(e).__module__
    first = _first_line(e)
    chain = _causes(e)
    if isinstance(e, MemoryError) or "OutOfMemoryError" in names or "can't allocate memory" in first:
        return f"out of memory ({first}); lower train.batch_size, evaluate.iwae_batch or the model size", 1
    if os_error := next((c for c in chain if isinstance(c, OSError) and c.errno), None):
        return _explain_os_error(os_error), 1
    if store := next((c for c in reversed(chain) if type(c).__module__.startswith("sqlite3")), None):
        reason = _first_line(store)
        hint, code = next((h for key, h in SQLITE_HINTS.items() if key in reason), ("", 1))
        return f"MLflow store {_store_uri()}: {reason}" + (f"; {hint}" if hint else ""), code
    if "MlflowException" in names:
        return f"MLflow ({_store_uri()}): {_first_line(Exception(getattr(e, 'message', e)))}", 1
    if module.startswith("sqlalchemy"):
        return f"MLflow store {_store_uri()}: {type(e).__name__}: {first}", 1
    if module.startswith("onnxruntime"):
        return f"onnxruntime: {first}", 1
    if isinstance(e, OSError):
        return _explain_os_error(e), 1
    if module.startswith("yaml"):
        return f"not valid YAML: {first}", 2
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})", 2
    if "ValidationError" in names and module.startswith("pydantic"):
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"{e.title}: {loc} = {err.get('input')!r}: {err['msg']}", 2
    return f"unexpected {type(e).__name__}: {first} (rerun with VAEOPS_DEBUG=1 for the traceback)", 1


def _explain_click(e: Exception) -> tuple[str, int]:
    """typer's own errors (a bad option, an unknown command) as one line, instead of its boxed usage."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "vaeops"
    return f"{e.format_message()} (see `{command} --help`)", e.exit_code


_quieted = False  # main() may run more than once in a process (tests)


def _quiet_library_errors() -> None:
    """Libraries log some errors, traceback included, just before they raise them (MLflow's SQL store
    logs the SQL too); the boundary reports the raised error in one line, which their records would
    bury. Other records keep their message but lose the traceback. VAEOPS_DEBUG=1 keeps everything."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    logging.getLogger("mlflow.store.db.utils").addFilter(lambda r: r.levelno < logging.ERROR or _debug())
    make_record = logging.getLogRecordFactory()

    def record(*args: object, **kwargs: object) -> logging.LogRecord:
        rec = make_record(*args, **kwargs)
        if not _debug():
            rec.exc_info, rec.exc_text = None, None
        return rec

    logging.setLogRecordFactory(record)


def _interrupted(code: int = 130) -> None:
    print("error: interrupted", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """The one error boundary: every failure ends as one `error:` line and an exit code
    (VAEOPS_DEBUG=1 or --debug: the traceback instead)."""
    _quiet_library_errors()
    try:
        # Not standalone: typer would print its own usage errors as a box of several lines.
        code = app(standalone_mode=False)
    except KeyboardInterrupt as e:  # outside typer's reach, e.g. while it starts
        if _debug():
            traceback.print_exception(e)
        _interrupted()
    except Exception as e:
        names = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in names:  # `vaeops` alone: typer has printed the help
            sys.exit(2)
        if "Abort" in names:  # typer's answer to end of input at a prompt
            _interrupted(1)
        message, code = _explain_click(e) if "ClickException" in names else _explain(e)
        if _debug():
            traceback.print_exception(e)
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
    # typer returns 130 for a Ctrl-C that no command handled (train handles its own and exits
    # with sys.exit), and 0 or None when the command returned.
    if code == 130:
        _interrupted()
    sys.exit(code or 0)


if __name__ == "__main__":  # `python -m vaeops.cli`, as torchrun's workers start it
    main()
