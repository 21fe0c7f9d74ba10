"""`vaeops ui`: the MLflow UI on 127.0.0.1 against the project's tracking store."""

import errno
import ipaddress
import os
import socket
import sys

from vaeops.errors import UsageError, WorkError
from vaeops.tracking import ARTIFACTS, project_root, tracking_uri


def server_command(port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    root = project_root()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri(),
        "--default-artifact-root",
        (root / ARTIFACTS).as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def check_address(port: int, host: str) -> str:
    """Bind host:port once, as the server will, so that a busy port or a wrong host is one clear line
    here rather than a failure inside the server; return the address bound to."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: must be a TCP port, 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not a known host name or address ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        # As the server sets it: a port whose last connections linger in TIME_WAIT is free to use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            other = port + 1 if port < 65535 else port - 1
            if e.errno == errno.EADDRINUSE:
                raise WorkError(f"port {port} on {host} is in use; try --port {other}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host}: not an address of this machine") from None
            if e.errno == errno.EACCES:
                raise WorkError(
                    f"port {port} on {host}: permission denied (below 1024 needs root); try --port 5000"
                ) from None
            raise WorkError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return address[0]


def check_store(uri: str) -> None:
    """Check the store as far as can be done without MLflow: the server opens it only once it has
    started, and then prints tracebacks, or retries for minutes when it cannot open the file."""
    if uri.startswith(("http://", "https://")):
        raise UsageError(
            f"MLFLOW_TRACKING_URI = {uri} is a tracking server, which serves its own UI: open it in a "
            "browser, or unset MLFLOW_TRACKING_URI to serve the project's store"
        )
    from vaeops.tracking import check_sqlite_store

    check_sqlite_store(uri)


def serve(port: int, host: str) -> None:
    """Replace this process with the MLflow server, so its pid is the server's (Ctrl-C or kill stops it)."""
    address = check_address(port, host)
    check_store(tracking_uri())
    if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        print(
            f"warning: the MLflow UI has no authentication: anyone who can reach port {port} on {host} "
            "can read, change and delete runs and models",
            file=sys.stderr,
        )
    cmd = server_command(port, host)
    # The job runner (huey workers) serves GenAI evaluation jobs, which a VAE project never queues.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    url_host = f"[{host}]" if ":" in host else host
    print(f"MLflow UI on http://{url_host}:{port}  (store {tracking_uri()})", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
