"""The CLI surface: every stage is a command, and help does not pay for torch/mlflow/onnx."""

import subprocess
import sys

from conftest import ROOT, run_cli

HEAVY = ("torch", "mlflow", "onnx", "onnxruntime", "numpy", "dvc")


def test_help_lists_every_stage():
    res = run_cli("--help", cwd=ROOT)
    assert res.returncode == 0
    for stage in ("download", "preprocess"):
        assert stage in res.stdout


def test_help_imports_no_heavy_library():
    code = (
        "import sys, typer\n"
        "from vaeops import cli\n"
        "names = sorted(typer.main.get_command(cli.app).commands)\n"
        "for args in [['--help']] + [[n, '--help'] for n in names]:\n"
        "    sys.argv = ['vaeops', *args]\n"
        "    try:\n"
        "        cli.main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_is_usage_error():
    res = run_cli("trian", cwd=ROOT)
    assert res.returncode == 2 and "No such command" in res.stderr
