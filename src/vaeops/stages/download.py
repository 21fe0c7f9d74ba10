"""download: fetch the dataset's raw files from the first source that serves a verified payload.

Sources, in order: VAEOPS_DATA_MIRROR (a folder or URL), the system dataset folder
(/usr/share/datasets/<name>, where Debian's dataset packages install), then `data.mirrors`
(the dataset's canonical public mirrors when empty). Each file must match its published digest
(of the decompressed payload for IDX files, which mirrors gzip or not; of the archive as published
for CIFAR-10); anything else moves on to the next source.

`data.dataset: folder` copies your own images instead (datasets/folder.py).

`data.timeout_s` bounds each read from an HTTP source, and a whole file gets FILE_DEADLINE times
that: a mirror that trickles a byte now and then is never silent for long, yet must not hold the
download forever.
"""

import hashlib
import http.client
import os
import socket
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from vaeops.config import DataParams
from vaeops.datasets import Fetched, FolderSpec, RawFile, digest_file, get_spec, payload
from vaeops.datasets import folder as image_folder
from vaeops.errors import UsageError, WorkError
from vaeops.io import write_bytes
from vaeops.progress import download_bar, log

SYSTEM_DATASETS = "/usr/share/datasets"
FILE_DEADLINE = 10  # × data.timeout_s: the most one file from one HTTP source may take


def sources(params: DataParams, spec: Fetched) -> list[str]:
    found = []
    if mirror := os.environ.get("VAEOPS_DATA_MIRROR"):
        found.append(mirror)
    found.append(str(Path(os.environ.get("VAEOPS_SYSTEM_DATASETS", SYSTEM_DATASETS)) / spec.name))
    found.extend(params.mirrors or spec.mirrors)
    return found


def _is_url(source: str) -> bool:
    return source.split("://", 1)[0] in ("http", "https", "file")


class _Deadline:
    """Ends one download when its time is up by shutting down its sockets: a read blocked on a
    connection that still gets a byte now and then returns at once, in the headers or the body."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)

    def connection(self, base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        deadline = self

        class Watched(base):  # type: ignore[valid-type, misc]
            def connect(self) -> None:
                super().connect()
                deadline.watch(self.sock)

        return Watched

    def opener(self) -> urllib.request.OpenerDirector:
        # Redirects open new connections; each is made through these handlers and so watched too.
        handlers = [_WatchedHTTP(), _WatchedHTTPS()]
        for handler in handlers:
            handler.deadline = self
        return urllib.request.build_opener(*handlers)


def _shutdown(sock: socket.socket) -> None:
    try:
        # socket.socket's own method: on a TLS socket it cuts the connection under the TLS layer.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Watched:
    """Mixed into urllib's HTTP(S) handlers: each connection they open is watched by `deadline`."""

    deadline: _Deadline

    def do_open(
        self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request, **kwargs: Any
    ) -> http.client.HTTPResponse:
        return super().do_open(self.deadline.connection(http_class), req, **kwargs)  # type: ignore[misc]


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def _http_get(url: str, timeout: float, label: str) -> bytes:
    seconds = timeout * FILE_DEADLINE
    late = TimeoutError(
        f"not complete after {seconds:g} s (data.timeout_s = {timeout:g} bounds each read and "
        f"{FILE_DEADLINE}× that the whole file; raise it for a slow link)"
    )
    with _Deadline(seconds) as deadline:
        try:
            with deadline.opener().open(url, timeout=timeout) as resp, download_bar() as bar:
                total = int(resp.headers.get("Content-Length") or 0) or None
                task = bar.add_task(label, total=total)
                chunks = []
                while chunk := resp.read(1 << 16):
                    chunks.append(chunk)
                    bar.advance(task, len(chunk))
        except Exception:
            if deadline.expired:  # the cut connection surfaces as whatever the read was doing
                raise late from None
            raise
        if deadline.expired:  # cut between reads of a body of unknown length: it looks complete
            raise late
    return b"".join(chunks)


def fetch(source: str, raw: RawFile, timeout: float) -> bytes:
    """The bytes of `raw` (gzipped or not, where it may be) from one source; raises OSError-like
    errors on failure."""
    name = raw.name
    candidates = [name + ".gz", name] if raw.gzipped else [name]
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
    raise FileNotFoundError(f"no {name}{'(.gz)' if raw.gzipped else ''} there")


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f"unreachable ({e.reason})"
    if isinstance(e, EOFError | zlib.error) or "gzip" in type(e).__name__.lower():
        return f"corrupt or truncated gzip ({e or type(e).__name__})"
    return str(e) or type(e).__name__


def run(params: DataParams, out_dir: Path) -> dict[str, str]:
    """Ensure every file of the dataset is in `out_dir` and verified; return file -> source used."""
    spec = get_spec(params.dataset)
    blocked = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"{blocked}: is a file; download writes the dataset's files into a folder {out_dir}")
    if isinstance(spec, FolderSpec):
        return image_folder.download(params, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: dict[str, str] = {}
    for raw in spec.raw_files:
        name, digest, algorithm = raw.name, raw.digest, raw.algorithm
        target = out_dir / name
        if target.is_file() and digest_file(target, algorithm) == digest:
            used[name] = "already verified"
            continue
        tried = []
        for source in sources(params, spec):
            try:
                data = fetch(source, raw, params.timeout_s)
                data = payload(data) if raw.gzipped else data
            except Exception as e:  # every failure of a source means: try the next one
                tried.append(f"{source}: {_reason(e)}")
                continue
            got = hashlib.new(algorithm, data).hexdigest()
            if got != digest:
                tried.append(
                    f"{source}: checksum mismatch ({algorithm} {got[:12]}…, expected {digest[:12]}…)"
                )
                continue
            write_bytes(target, data)
            used[name] = source
            log(f"{spec.name}/{name}: verified, from {source}")
            break
        else:
            raise WorkError(f"could not get {spec.name}/{name} from any source: " + " | ".join(tried))
    return used
