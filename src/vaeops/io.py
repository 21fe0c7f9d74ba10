"""Atomic output: every stage writes to a temp file (or folder) beside the target and renames it."""

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# atomic_path's temp names: .<target name>.<writer pid>.<random>.tmp
TEMP_NAME = re.compile(r"\..+\.(\d+)\.[^.]+\.tmp")


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename onto the target only if the block succeeds.

    Same folder so the rename is atomic on POSIX; on any exception (Ctrl-C included) the temp file
    is removed and the previous target, if any, is left untouched. The temp name carries the writer's
    pid, so one left by a killed process (kill -9) can be told from one still being written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: Path | str) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; swap it in for the target only if the block succeeds.

    For a folder of outputs that must change as one set (evaluate's figures): on any exception the
    temp folder goes and the previous folder stays exactly as it was.
    """
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp"))
    old = tmp.with_name(tmp.name.replace(".tmp", ".old.tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where unknown.

    With the pid it names one process: the kernel hands a freed pid to later processes."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so count after its ')'.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def process_ended(pid: int, start: str | None = None) -> bool:
    """True only when process `pid` is surely gone: no such process, or `start` (its recorded
    process_start) says the pid now belongs to a later process. Unsure means False."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return start is not None and process_start(pid) not in (None, start)


def remove_dead_temp_files(folders: Iterable[Path | str]) -> list[Path]:
    """Remove atomic_path's temp files in `folders` whose writer has ended (killed mid-write); returns
    them. Another live process's temp file (say evaluate's, while train starts) is left alone."""
    removed = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(".*.tmp")):
            match = TEMP_NAME.fullmatch(path.name)
            if match and process_ended(int(match[1])):
                if path.is_dir() and not path.is_symlink():  # an atomic_folder's
                    import shutil

                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_json(target: Path | str, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
