"""`vaeops ui`: the MLflow UI on 127.0.0.1 against the project's tracking store."""

import os
import sys

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


def serve(port: int, host: str) -> None:
    """Replace this process with the MLflow server, so its pid is the server's (Ctrl-C or kill stops it)."""
    cmd = server_command(port, host)
    # The job runner (huey workers) serves GenAI evaluation jobs, which a VAE project never queues.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    print(f"MLflow UI on http://{host}:{port}  (store {tracking_uri()})", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
