"""Running as one of torchrun's processes: which one, relaunching under torchrun, the process group."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from vaeops.config import TrainParams
from vaeops.device import resolve_device
from vaeops.errors import UsageError
from vaeops.progress import log


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch(params: TrainParams, args: list[str]) -> int:
    """Run `vaeops <args>` again as nproc workers, as `torchrun --standalone --nproc-per-node nproc -m
    vaeops.cli <args>` would; returns the first failed worker's exit code (2 for bad usage), else 0.
    Workers see WORLD_SIZE, so they train instead of relaunching."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    nproc = params.nproc
    if params.batch_size % nproc:  # fail here, once, rather than in every worker
        raise UsageError(
            f"train.batch_size = {params.batch_size} (global) does not split evenly over train.nproc = "
            f"{nproc} processes; use a multiple of {nproc}"
        )
    log(f"train.nproc = {nproc}: relaunching under torchrun")
    argv = ["--nproc-per-node", str(nproc), "--standalone", "-m", "vaeops.cli", *args]
    try:
        torchrun(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        # The workers printed their own `error:` line; torchrun's traceback would only bury it.
        return next(iter(e.failures.values())).exitcode or 1
    return 0


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Inside, this torchrun worker is in the process group; a single process, or one already in a
    group (a caller that set it up), is left as it is."""
    join = world()[1] > 1 and not dist.is_initialized()
    if join:
        cuda = resolve_device(device, "train.device").type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        if join:
            dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This rank's own GPU (process_group picked it by LOCAL_RANK); any other device as it is."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_sum(t: Tensor) -> Tensor:
    """Sum of t over ranks (t itself when there is one process)."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t
