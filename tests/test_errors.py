"""The CLI's one error boundary: every failure is one `error:` line and an exit code, never a traceback
(unless asked for), and bad params or environment fail before any work."""

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED, run_cli, tree

from vaeops.cli import _explain
from vaeops.config import dvc_tracked


def assert_one_error_line(res: subprocess.CompletedProcess, code: int, *expected: str) -> str:
    """Exit code, stderr exactly one `error:` line holding every expected fragment, no traceback."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in expected:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"train:\n  experiment: caf\xe9\n", ["params.yaml: not UTF-8 text (byte 0xe9"]),
        (b"train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n", ["params.yaml:4: duplicate key 'epochs'"]),
        (b"train: 5\n", ["params.yaml: train = 5 is not a mapping"]),
        (b"train:\n  beta: .inf\n", ["params.yaml: train.beta = inf: Input should be a finite number"]),
        (b"data:\n  timeout_s: .nan\n", ["data.timeout_s = nan: Input should be a finite number"]),
        (b"train:\n  seed: 4294967296\n", ["train.seed = 4294967296", "2**32"]),
        (b"train:\n  threads: 100000\n", ["train.threads = 100000", "only slows torch down"]),
        (b"train:\n  arch: conv\n  hidden_dim: 50000\n", ["GiB while training", "hidden_dim = 50000"]),
    ],
)
def test_bad_params_file_is_one_line_before_any_work(tmp_path, content, expected):
    (tmp_path / "params.yaml").write_bytes(content)
    res = run_cli("preprocess", cwd=tmp_path)
    assert_one_error_line(res, 2, *expected)
    assert tree(tmp_path) == {"params.yaml": content}


def test_params_option_naming_a_folder(tmp_path):
    res = run_cli("download", "--params", str(tmp_path), cwd=tmp_path)
    assert_one_error_line(res, 2, f"{tmp_path}: is a folder")
    assert tree(tmp_path) == {}


@pytest.mark.parametrize(
    "env, expected",
    [
        # from the environment: the variable is named, not params.yaml
        (
            {"VAEOPS_TRAIN__EPOCHS": "abc"},
            "error: VAEOPS_TRAIN__EPOCHS = 'abc' (train.epochs): Input should be a valid integer",
        ),
        ({"VAEOPS_TRAIN": "notjson"}, "error: VAEOPS_TRAIN = 'notjson' is not a JSON object of train keys"),
        (
            {"VAEOPS_TRAIN": '{"beta": "nan"}'},
            "error: VAEOPS_TRAIN: train.beta = 'nan': Input should be a finite",
        ),
        (
            {"VAEOPS_TRIAN__EPOCHS": "1"},
            "error: VAEOPS_TRIAN__EPOCHS is not a vaeops variable; did you mean ",
        ),
        ({"VAEOPS_DATA_MIROR": "/x"}, "did you mean VAEOPS_DATA_MIRROR?"),
    ],
)
def test_bad_environment_names_the_variable(tmp_path, env, expected):
    (tmp_path / "params.yaml").write_text("{}\n")
    line = assert_one_error_line(run_cli("preprocess", cwd=tmp_path, env=env), 2, expected)
    assert "params.yaml" not in line
    assert tree(tmp_path) == {"params.yaml": b"{}\n"}


@pytest.mark.parametrize("how", [{"VAEOPS_DEBUG": "1"}, "--debug"])
def test_debug_shows_the_traceback(tmp_path, how):
    (tmp_path / "params.yaml").write_text("train: 5\n")
    args = ["--debug", "preprocess"] if how == "--debug" else ["preprocess"]
    res = run_cli(*args, cwd=tmp_path, env=how if isinstance(how, dict) else None)
    assert res.returncode == 2
    assert (
        "Traceback (most recent call last)" in res.stderr
        and "UsageError: params.yaml: train = 5" in res.stderr
    )


def run_main_with(body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`vaeops boom` in a real process through cli.main(), the command's body raising for real."""
    code = (
        "import sys\n"
        "from vaeops import cli\n"
        "@cli.app.command()\n"
        "def boom() -> None:\n"
        f"    {body}\n"
        "sys.argv = ['vaeops', 'boom']\n"
        "cli.main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_unexpected_exception_is_one_line_with_a_hint():
    res = run_main_with("{}['missing']")
    assert_one_error_line(res, 1, "error: unexpected KeyError: 'missing' (rerun with VAEOPS_DEBUG=1")
    debug = run_main_with("{}['missing']", env={"VAEOPS_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "KeyError: 'missing'" in debug.stderr


def test_a_full_disk_is_one_line():
    res = run_main_with("open('/dev/full', 'w').write('x' * 100_000)")
    assert_one_error_line(res, 1, "no space left on the device")


def test_interrupt_is_exit_130_and_one_line(tmp_path):
    # A mirror that accepts the connection and never answers: download is then blocked, mid-work.
    (tmp_path / "params.yaml").write_text("{}\n")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(120)
        env = {
            **os.environ,
            "VAEOPS_DATA_MIRROR": f"http://127.0.0.1:{server.getsockname()[1]}/",
            "VAEOPS_SYSTEM_DATASETS": str(tmp_path / "none"),
        }
        exe = Path(sys.executable).with_name("vaeops")
        proc = subprocess.Popen(
            [str(exe), "download"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = server.accept()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
            conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    assert tree(tmp_path / "data") == {}


def test_failure_families_map_to_one_line_and_exit_code(tmp_path):
    """Real exceptions of each family, as the libraries raise them, through the boundary's mapping."""
    import mlflow
    import onnxruntime
    import pydantic

    cases: list[tuple[Exception, int, str]] = [
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/x.npz"),
            1,
            "no space left on the device holding /out",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/x"),
            1,
            "cannot write /ro/x (read-only file system)",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/p/x"),
            1,
            "cannot write or read /p/x (permission",
        ),
        (FileNotFoundError(errno.ENOENT, "No such file", "/nope"), 1, "no such file or folder: /nope"),
        (MemoryError(), 1, "out of memory"),
        (mlflow.exceptions.MlflowException("Run 'abc' not found"), 1, "MLflow ("),
    ]
    try:
        sqlite3.connect(f"file:{tmp_path}/none/x.db?mode=ro", uri=True).execute("select 1")
    except sqlite3.Error as e:
        cases.append((e, 1, "MLflow store "))
    try:
        onnxruntime.InferenceSession(b"not a model")
    except Exception as e:
        cases.append((e, 1, "onnxruntime: "))
    try:
        yaml.safe_load("a: [1")
    except yaml.YAMLError as e:
        cases.append((e, 2, "not valid YAML: "))
    try:
        b"\xff".decode()
    except UnicodeDecodeError as e:
        cases.append((e, 2, "not UTF-8 text"))
    try:
        pydantic.TypeAdapter(int).validate_python("x")
    except pydantic.ValidationError as e:
        cases.append((e, 2, "Input should be a valid integer"))
    assert len(cases) == 11
    for exc, code, fragment in cases:
        message, got = _explain(exc)
        assert (got, "\n" in message) == (code, False), (exc, message)
        assert fragment in message, (exc, message)


# --- inside DVC: an exported override of a tracked param is refused ----------------------------------


def dvc_project(dest: Path) -> Path:
    from test_pipeline import copy_project

    proj = copy_project(dest)
    git = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=proj, check=True, env={**os.environ, **git}, capture_output=True)
    return proj


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(["dvc", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def outside_git_and_dvc(proj: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(proj).items() if not k.startswith((".git/", ".dvc/"))}


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [("repro", "download"), ("exp", "run", "-S", "train.epochs=2", "download")],
    ids=["repro", "exp-run"],
)
def test_dvc_stage_refuses_an_override_of_a_tracked_param(tmp_path, args):
    proj = dvc_project(tmp_path / "proj")
    before = outside_git_and_dvc(proj)
    res = dvc(*args, cwd=proj, env={"VAEOPS_TRAIN__EPOCHS": "1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "exited with 2" in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: VAEOPS_TRAIN__EPOCHS overrides train.epochs, which DVC tracks: DVC would record "
        "params.yaml's value, not this one; unset it and use `dvc exp run -S train.epochs=1` (or edit "
        "params.yaml)"
    ]
    assert "Traceback" not in out
    after = outside_git_and_dvc(proj)
    if args[0] == "exp":  # `-S` is DVC's own edit of the workspace's params.yaml, made before the stage runs
        assert yaml.safe_load(after.pop("params.yaml"))["train"]["epochs"] == 2
        before.pop("params.yaml")
    assert after == before  # no data, no dvc.lock, no MLflow store


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent")
def test_dvc_stage_allows_an_override_of_an_untracked_param(tmp_path):
    tracked = dvc_tracked(ROOT / "dvc.yaml")
    keys = [
        f"{s}.{k}"
        for s, v in yaml.safe_load((ROOT / "params.yaml").read_text()).items()
        for k in v
        if s not in tracked and f"{s}.{k}" not in tracked
    ]
    if not keys:
        pytest.skip("dvc.yaml tracks every param")
    section, key = keys[0].split(".")
    value = yaml.safe_load((ROOT / "params.yaml").read_text())[section][key]
    proj = dvc_project(tmp_path / "proj")
    env = {
        f"VAEOPS_{section.upper()}__{key.upper()}": str(value),
        "VAEOPS_DATA_MIRROR": str(SHARED / "mnist"),
    }
    res = dvc("repro", "download", cwd=proj, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (proj / "data/raw/mnist").is_dir()
