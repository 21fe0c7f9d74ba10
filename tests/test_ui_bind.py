"""`vaeops ui` checks its address before it starts MLflow: a bad port or host, or a busy port, is one
line and no server; a host other than loopback gets a warning that the UI has no authentication."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, http_server, run_cli, tree

WARNING = "warning: the MLflow UI has no authentication"


def one_error_line(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--port", "99999"], "error: --port 99999: must be a TCP port, 1 to 65535"),
        (["--port", "0"], "error: --port 0: must be a TCP port, 1 to 65535"),
        (["--port", "-1"], "error: --port -1: must be a TCP port, 1 to 65535"),
        # TEST-NET-1 (RFC 5737): never an address of this machine, and no name lookup.
        (["--host", "192.0.2.1"], "error: --host 192.0.2.1: not an address of this machine"),
    ],
)
def test_bad_port_or_host_exits_2_before_any_server(tmp_path, args, expected):
    res = run_cli("ui", *args, cwd=tmp_path, timeout=60)
    assert one_error_line(res, 2) == expected
    assert tree(tmp_path) == {}  # no store created: MLflow never started


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_busy_port_exits_1_and_names_the_next_one(tmp_path, host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli("ui", "--port", str(port), "--host", host, cwd=tmp_path, timeout=60)
    line = one_error_line(res, 1)
    assert line == f"error: port {port} on {host} is in use; try --port {port + 1}"
    assert WARNING not in res.stderr
    assert tree(tmp_path) == {}


@pytest.mark.slow
def test_on_every_interface_it_warns_and_a_second_ui_on_its_port_is_refused(tmp_path):
    """The real server on 0.0.0.0 (an empty store): the warning, then the port it holds is busy."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VAEOPS_PROJECT_ROOT")}
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("vaeops")), "ui", "--host", "0.0.0.0", "--port", str(port)]
    log = tmp_path / "ui.log"
    with http_server(cmd, port, tmp_path, env, log):
        again = run_cli("ui", "--port", str(port), cwd=tmp_path, env=env, timeout=60)
        assert one_error_line(again, 1) == f"error: port {port} on 127.0.0.1 is in use; try --port {port + 1}"
    lines = log.read_text().splitlines()
    assert lines[0] == (
        f"{WARNING}: anyone who can reach port {port} on 0.0.0.0 can read, change and delete runs and models"
    )
    assert not [line for line in lines if line.startswith("error:")]
