"""Progress bars on a terminal, plain log lines elsewhere (CI logs, DVC output captured to files), and
the seconds a stage spends on its real work."""

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


def interactive() -> bool:
    return sys.stderr.isatty()


def log(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)


def download_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not interactive(),
        transient=True,
    )


def step_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not interactive(),
        transient=True,
    )


@contextmanager
def work(stage: str) -> Iterator[None]:
    """Time a stage's real computation (its epochs, its scoring, its graphs), as opposed to starting
    Python, importing and logging. With VAEOPS_TIMINGS naming a file, each block appends one JSON line
    {"stage": ..., "work_s": ...} to it; a stage may time several blocks (train: one per epoch), whose
    seconds add up; under torchrun only rank 0 writes. benchmarks/pipeline.py reads the file."""
    start = time.perf_counter()
    yield
    if (path := os.environ.get("VAEOPS_TIMINGS")) and os.environ.get("RANK", "0") == "0":
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "work_s": round(time.perf_counter() - start, 4)}) + "\n")
