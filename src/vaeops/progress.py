"""Progress bars on a terminal, plain log lines elsewhere (CI logs, DVC output captured to files)."""

import sys

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
