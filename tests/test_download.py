"""download: sources in order, payload checksums, fall-through on every kind of failure, atomic output."""

import gzip
import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import SHARED, run_cli, tree, write_set

from vaeops.config import DataParams
from vaeops.errors import WorkError
from vaeops.stages import download


@pytest.fixture
def serve() -> Iterator:
    """Start real HTTP servers on 127.0.0.1 serving folders; return their base URLs."""
    servers = []

    def start(folder: Path) -> str:
        handler = partial(QuietHandler, directory=str(folder))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Serves train-images a byte at a time, never silent for long (only a whole-file deadline ends
    it), in the headers or in the body; 404 for every other file. Stops by itself after 30 s."""

    in_headers = False

    def do_GET(self) -> None:
        if not self.path.startswith("/train-images"):
            self.send_error(404)
            return
        if self.in_headers:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
        stop = time.monotonic() + 30
        try:
            while time.monotonic() < stop:
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.01)
        except OSError:  # the client hung up
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickle() -> Iterator:
    servers = []

    def start(in_headers: bool = False) -> str:
        handler = type("Handler", (TrickleHandler,), {"in_headers": in_headers})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def dead_url() -> str:
    """A loopback port with nothing listening: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def no_env_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VAEOPS_DATA_MIRROR", raising=False)
    monkeypatch.setenv("VAEOPS_SYSTEM_DATASETS", str(tmp_path / "no-system-datasets"))


def corrupt_set(folder: Path, files: dict[str, bytes]) -> Path:
    """gzip files cut in half: the decompressor hits EOF."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(data)[: len(data) // 4 + 20])
    return folder


def wrong_set(folder: Path, files: dict[str, bytes]) -> Path:
    """Valid gzip files whose payload differs by one byte: only the checksum catches it."""
    return write_set(folder, {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in files.items()})


def test_good_http_mirror(tmp_path, tiny_registry, serve):
    url = serve(write_set(tmp_path / "good", tiny_registry))
    used = download.run(DataParams(mirrors=[url]), tmp_path / "out")
    assert set(used.values()) == {url}
    for name, data in tiny_registry.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_falls_through_dead_corrupt_and_wrong_to_good(tmp_path, tiny_registry, serve, dead_url):
    corrupt = serve(corrupt_set(tmp_path / "corrupt", tiny_registry))
    wrong = serve(wrong_set(tmp_path / "wrong", tiny_registry))
    good = serve(write_set(tmp_path / "good", tiny_registry))
    used = download.run(DataParams(mirrors=[dead_url, corrupt, wrong, good]), tmp_path / "out")
    assert set(used.values()) == {good}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(tiny_registry)


def test_all_sources_fail_lists_each_and_leaves_nothing(tmp_path, tiny_registry, serve, dead_url):
    corrupt = serve(corrupt_set(tmp_path / "corrupt", tiny_registry))
    wrong = serve(wrong_set(tmp_path / "wrong", tiny_registry))
    empty = serve((tmp_path / "empty").resolve())
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(WorkError) as err:
        download.run(DataParams(mirrors=[dead_url, corrupt, wrong, empty], timeout_s=5), out)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{dead_url}: unreachable" in msg
    assert f"{corrupt}: corrupt or truncated gzip" in msg
    assert f"{wrong}: checksum mismatch" in msg
    assert f"{empty}: HTTP 404" in msg
    assert "no-system-datasets/mnist: no train-images-idx3-ubyte(.gz) there" in msg
    assert tree(out) == {}


# Each read is answered well within data.timeout_s; only the whole-file deadline (10×) can end it.
SLOW = DataParams(timeout_s=0.2).timeout_s


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_trickling_source_hits_the_file_deadline_and_the_next_one_serves(
    tmp_path, tiny_registry, serve, trickle, in_headers
):
    slow = trickle(in_headers)
    good = serve(write_set(tmp_path / "good", tiny_registry))
    start = time.monotonic()
    used = download.run(DataParams(mirrors=[slow, good], timeout_s=SLOW), tmp_path / "out")
    took = time.monotonic() - start
    assert set(used.values()) == {good}
    assert download.FILE_DEADLINE * SLOW <= took < download.FILE_DEADLINE * SLOW + 10
    assert (tmp_path / "out/train-images-idx3-ubyte").read_bytes() == tiny_registry["train-images-idx3-ubyte"]


def test_timeout_description_states_the_file_deadline():
    assert f"{download.FILE_DEADLINE}× that" in DataParams.model_fields["timeout_s"].description


def test_cli_only_a_trickling_source_exits_1_with_its_reason(tmp_path, trickle):
    slow = trickle()
    write_params(tmp_path, f"data:\n  mirrors: ['{slow}']\n  timeout_s: {SLOW}\n")
    res = run_cli("download", cwd=tmp_path, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not get mnist/train-images-idx3-ubyte"), (
        lines
    )
    deadline = download.FILE_DEADLINE * SLOW
    assert (
        f"{slow}: not complete after {deadline:g} s (data.timeout_s = {SLOW:g} bounds each read" in lines[0]
    )
    assert tree(tmp_path / "data") == {}


def test_env_mirror_folder_comes_first(tmp_path, tiny_registry, monkeypatch, dead_url):
    folder = write_set(tmp_path / "mirror", tiny_registry, gz=False)
    monkeypatch.setenv("VAEOPS_DATA_MIRROR", str(folder))
    used = download.run(DataParams(mirrors=[dead_url]), tmp_path / "out")
    assert set(used.values()) == {str(folder)}


def test_env_mirror_url(tmp_path, tiny_registry, monkeypatch, serve):
    url = serve(write_set(tmp_path / "mirror", tiny_registry))
    monkeypatch.setenv("VAEOPS_DATA_MIRROR", url)
    assert set(download.run(DataParams(), tmp_path / "out").values()) == {url}


def test_system_folder_before_public_mirrors(tmp_path, tiny_registry, monkeypatch, dead_url):
    system = tmp_path / "system"
    write_set(system / "mnist", tiny_registry)
    monkeypatch.setenv("VAEOPS_SYSTEM_DATASETS", str(system))
    used = download.run(DataParams(mirrors=[dead_url]), tmp_path / "out")
    assert set(used.values()) == {str(system / "mnist")}


def test_verified_files_are_not_fetched_again_but_bad_ones_are(tmp_path, tiny_registry, serve, dead_url):
    good = serve(write_set(tmp_path / "good", tiny_registry))
    out = tmp_path / "out"
    download.run(DataParams(mirrors=[good]), out)
    (out / "t10k-labels-idx1-ubyte").write_bytes(b"damaged")
    used = download.run(DataParams(mirrors=[dead_url, good]), out)
    assert used["t10k-labels-idx1-ubyte"] == good
    assert {v for k, v in used.items() if k != "t10k-labels-idx1-ubyte"} == {"already verified"}
    assert (out / "t10k-labels-idx1-ubyte").read_bytes() == tiny_registry["t10k-labels-idx1-ubyte"]


# --- the real CLI on real MNIST / Fashion-MNIST -------------------------------------------------

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/datasets (offline mirror) absent")


def write_params(folder: Path, text: str) -> Path:
    (folder / "params.yaml").write_text(text)
    return folder / "params.yaml"


def payload_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_shared
def test_cli_real_mnist_over_http(tmp_path, serve, dead_url):
    from vaeops.datasets import DATASETS

    url = serve(SHARED / "mnist")
    write_params(tmp_path, f"data:\n  mirrors: ['{dead_url}']\n")
    res = run_cli("download", cwd=tmp_path, env={"VAEOPS_DATA_MIRROR": url})
    assert res.returncode == 0, res.stderr
    for name, digest in DATASETS["mnist"].sha256.items():
        assert payload_sha(tmp_path / "data/raw/mnist" / name) == digest


@needs_shared
def test_cli_fashion_mnist_from_shared_folder(tmp_path, dead_url):
    from vaeops.datasets import DATASETS

    write_params(tmp_path, f"data:\n  dataset: fashion-mnist\n  mirrors: ['{dead_url}']\n")
    res = run_cli("download", cwd=tmp_path, env={"VAEOPS_DATA_MIRROR": str(SHARED / "fashion-mnist")})
    assert res.returncode == 0, res.stderr
    for name, digest in DATASETS["fashion-mnist"].sha256.items():
        assert payload_sha(tmp_path / "data/raw/fashion-mnist" / name) == digest


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
def test_cli_fashion_mnist_from_debian_package(tmp_path, dead_url, monkeypatch):
    monkeypatch.delenv("VAEOPS_SYSTEM_DATASETS")
    write_params(tmp_path, f"data:\n  dataset: fashion-mnist\n  mirrors: ['{dead_url}']\n")
    res = run_cli("download", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "from /usr/share/datasets/fashion-mnist" in res.stderr


def test_cli_every_source_failing_exits_1_with_one_line(tmp_path, dead_url):
    write_params(tmp_path, f"data:\n  mirrors: ['{dead_url}']\n  timeout_s: 5\n")
    res = run_cli("download", cwd=tmp_path, env={"VAEOPS_DATA_MIRROR": str(tmp_path / "nowhere")})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not get mnist/")
    assert str(tmp_path / "nowhere") in lines[0] and dead_url in lines[0]
    assert "Traceback" not in res.stderr
    assert tree(tmp_path / "data") == {}
