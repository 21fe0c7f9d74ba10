"""download: fetch the dataset's IDX files from the first source that serves a verified payload.

Sources, in order: VAEOPS_DATA_MIRROR (a folder or URL), the system dataset folder
(/usr/share/datasets/<name>, where Debian's dataset packages install), then `data.mirrors`
(the dataset's canonical public mirrors when empty). Each file's decompressed payload must match
its SHA-256; anything else moves on to the next source.
"""

import hashlib
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from vaeops.config import DataParams
from vaeops.datasets import DatasetSpec, get_spec, payload, sha256_file
from vaeops.errors import WorkError
from vaeops.io import write_bytes
from vaeops.progress import download_bar, log

SYSTEM_DATASETS = "/usr/share/datasets"


def sources(params: DataParams, spec: DatasetSpec) -> list[str]:
    found = []
    if mirror := os.environ.get("VAEOPS_DATA_MIRROR"):
        found.append(mirror)
    found.append(str(Path(os.environ.get("VAEOPS_SYSTEM_DATASETS", SYSTEM_DATASETS)) / spec.name))
    found.extend(params.mirrors or spec.mirrors)
    return found


def _is_url(source: str) -> bool:
    return source.split("://", 1)[0] in ("http", "https", "file")


def _http_get(url: str, timeout: float, label: str) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp, download_bar() as bar:
        total = int(resp.headers.get("Content-Length") or 0) or None
        task = bar.add_task(label, total=total)
        chunks = []
        while chunk := resp.read(1 << 16):
            chunks.append(chunk)
            bar.advance(task, len(chunk))
    return b"".join(chunks)


def fetch(source: str, name: str, timeout: float) -> bytes:
    """The raw bytes of `name` (gzipped or not) from one source; raises OSError-like errors on failure."""
    candidates = [name + ".gz", name]
    if _is_url(source):
        base = source if source.endswith("/") else source + "/"
        errors = []
        for cand in candidates:
            try:
                return _http_get(base + cand, timeout, cand)
            except urllib.error.HTTPError as e:
                errors.append(f"HTTP {e.code} for {cand}")
        raise FileNotFoundError("; ".join(errors))
    folder = Path(source).expanduser()
    for cand in candidates:
        if (folder / cand).is_file():
            return (folder / cand).read_bytes()
    raise FileNotFoundError(f"no {name}(.gz) there")


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f"unreachable ({e.reason})"
    if isinstance(e, EOFError | zlib.error) or "gzip" in type(e).__name__.lower():
        return f"corrupt or truncated gzip ({e or type(e).__name__})"
    return str(e) or type(e).__name__


def run(params: DataParams, out_dir: Path) -> dict[str, str]:
    """Ensure every file of the dataset is in `out_dir` and verified; return file -> source used."""
    spec = get_spec(params.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: dict[str, str] = {}
    for name, digest in spec.sha256.items():
        target = out_dir / name
        if target.is_file() and sha256_file(target) == digest:
            used[name] = "already verified"
            continue
        tried = []
        for source in sources(params, spec):
            try:
                data = payload(fetch(source, name, params.timeout_s))
            except Exception as e:  # every failure of a source means: try the next one
                tried.append(f"{source}: {_reason(e)}")
                continue
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                tried.append(f"{source}: checksum mismatch (sha256 {got[:12]}…, expected {digest[:12]}…)")
                continue
            write_bytes(target, data)
            used[name] = source
            log(f"{spec.name}/{name}: verified, from {source}")
            break
        else:
            raise WorkError(f"could not get {spec.name}/{name} from any source: " + " | ".join(tried))
    return used
