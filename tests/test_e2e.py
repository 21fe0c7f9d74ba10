"""The README's experiment loop, for real: a fresh clone on real MNIST with the small-data profile,
a committed baseline, two experiments that do not inherit each other's params, the short and the DVC
comparisons, `dvc exp apply`, a DVC remote round trip, and the tracking-server recipe.

Every command the test runs from the README is asserted to be in the README, so the two cannot drift.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED, free_port, http_server
from test_pipeline import copy_project

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/datasets/mnist absent"),
]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
# The README's small-data profile: the whole pipeline in well under a minute of compute.
SMALL = {
    "preprocess": {"train_limit": 2000},
    "train": {"epochs": 1, "lr_warmup_steps": 0},
    "evaluate": {"iwae_samples": 20, "iwae_images": 200},
}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "VAEOPS_DATA_MIRROR": str(SHARED / "mnist")}
    for key in ("MLFLOW_TRACKING_URI", "VAEOPS_PROJECT_ROOT"):
        e.pop(key, None)
    return {**e, **extra}


def run(*args: str, cwd: Path, ok: bool = True, **extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=900)
    if ok:
        assert res.returncode == 0, f"{' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def readme(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    """A command exactly as the README writes it."""
    line = " ".join(args)
    assert line in README, f"the README no longer says `{line}`"
    return run(*args, cwd=cwd, **extra)


def start_queue(proj: Path) -> None:
    """`dvc queue start -j 2`, not holding its output: the workers it leaves running inherit the
    pipes, and reading them to the end would wait for the workers."""
    line = "dvc queue start -j 2"
    assert line in README
    res = subprocess.run(
        line.split(), cwd=proj, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert res.returncode == 0, line


def store_runs(db: Path) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("vaeops")
    return [r.to_dictionary() for r in client.search_runs([exp.experiment_id])]


def experiments(proj: Path) -> dict[str, dict]:
    """name → data of each DVC experiment, from `dvc exp show --json`."""
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=proj).stdout)
    return {
        e["name"]: e["revs"][0]["data"]
        for commit in shown
        for e in (commit.get("experiments") or [])
        if e.get("name")
    }


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of this project whose params.yaml holds the small-data profile."""
    origin = copy_project(tmp_path_factory.mktemp("origin"))
    params = yaml.safe_load((origin / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(*GIT, "add", "-A", cwd=origin)
    run(*GIT, "commit", "-qm", "vaeops with the small-data profile", cwd=origin)
    dest = tmp_path_factory.mktemp("work") / "vaeops"
    run("git", "clone", "-q", str(origin), str(dest), cwd=dest.parent)
    run(sys.executable, "-m", "vaeops.plots", cwd=dest)  # the step of `make setup` that a clone needs
    return dest


def tracking_server_recipe(proj: Path, tmp_path: Path) -> None:
    import mlflow

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination", str(store / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server_env = {**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with http_server(cmd, port, store, server_env, tmp_path / "server.log") as url:
        res = readme("dvc", "repro", "--force", "--downstream", "train", cwd=proj, MLFLOW_TRACKING_URI=url)
        for stage in ("train", "evaluate", "export"):
            assert f"Running stage '{stage}'" in res.stdout
        client = mlflow.MlflowClient(tracking_uri=url)
        (served,) = client.search_runs([client.get_experiment_by_name("vaeops").experiment_id])
        assert served.info.status == "FINISHED" and "test.elbo" in served.data.metrics
        assert (
            client.get_model_version_by_alias("vaeops-decoder", "latest-export").run_id == served.info.run_id
        )


def test_readme_experiment_loop(clone, tmp_path):
    import onnxruntime as ort

    proj = clone
    # 1. The baseline, committed with exactly the files the README names.
    res = readme("dvc", "repro", cwd=proj)
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in res.stdout
    readme("git", "add", "dvc.lock", "reports", "models/.gitignore", cwd=proj)
    run(*GIT, "commit", "-qm", "baseline: dvc repro", cwd=proj)
    assert run("git", "status", "--porcelain", cwd=proj).stdout == "", "the baseline commit left files out"
    test = json.loads((proj / "reports/metrics.json").read_text())["test"]
    untrained = -784 * 0.6931  # an untrained decoder's logits ≈ 0 cost about ln 2 nats per pixel
    assert untrained + 100 < test["elbo"] < 0 and test["active_units"] >= 1
    assert test["log_px_iwae"] >= test["elbo_iwae_images"]
    by_class = json.loads((proj / "reports/elbo_by_class.json").read_text())
    assert len(by_class) == 10 and "elbo_by_class" not in json.dumps(test)
    diff = readme("dvc", "metrics", "diff", cwd=proj)
    assert "failed to load" not in diff.stdout + diff.stderr
    assert run("dvc", "repro", cwd=proj).stdout.count("Running stage") == 0

    # An exported override of a tracked param is refused under DVC before any work.
    before = experiments(proj)
    refused = run(
        "dvc", "exp", "run", "--temp", "-S", "train.epochs=2", cwd=proj, ok=False, VAEOPS_TRAIN__EPOCHS="1"
    )
    assert refused.returncode != 0 and "VAEOPS_TRAIN__EPOCHS" in refused.stdout + refused.stderr
    assert experiments(proj) == before and run("git", "status", "--porcelain", cwd=proj).stdout == ""

    # 2. Two experiments, neither inheriting the other's params; the workspace stays at the baseline.
    readme("dvc", "exp", "run", "--temp", "-S", "train.latent_dim=32", cwd=proj)
    run("dvc", "exp", "run", "--queue", "-n", "tiny", "-S", "preprocess.train_limit=1000", cwd=proj)
    start_queue(proj)
    deadline = time.monotonic() + 900
    while "Queued" in (status := run("dvc", "queue", "status", cwd=proj).stdout) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert "Success" in status, status
    assert run("git", "status", "--porcelain", cwd=proj).stdout == ""
    assert yaml.safe_load((proj / "params.yaml").read_text())["train"]["latent_dim"] == 20
    exps = experiments(proj)
    assert len(exps) == 2, exps.keys()
    tiny = exps["tiny"]
    wide_name = next(n for n in exps if n != "tiny")
    ran = {n: d["params"]["params.yaml"]["data"] for n, d in exps.items()}
    assert ran[wide_name]["train"]["latent_dim"] == 32 and ran[wide_name]["preprocess"]["train_limit"] == 2000
    assert ran["tiny"]["train"]["latent_dim"] == 20 and ran["tiny"]["preprocess"]["train_limit"] == 1000
    assert tiny["metrics"]["reports/data.json"]["data"]["train"]["count"] == 1000

    # 3. Compare: the short view, metrics and plots against HEAD.
    table = readme("vaeops", "exps", cwd=proj).stdout
    lines = table.splitlines()
    assert "(baseline)" in table and all(len(line) < 160 for line in lines), table
    wide_row = next(line for line in lines if wide_name in line)
    tiny_row = next(line for line in lines if "tiny" in line)
    assert "train.latent_dim=32" in wide_row and "train_limit" not in wide_row, table
    assert "preprocess.train_limit=1000" in tiny_row and "latent_dim" not in tiny_row, table
    wide_elbo = exps[wide_name]["metrics"]["reports/metrics.json"]["data"]["test"]["elbo"]
    assert f"{wide_elbo:.2f}" in wide_row
    diff = run("dvc", "metrics", "diff", "HEAD", wide_name, cwd=proj).stdout
    assert "test.elbo" in diff and "failed" not in diff
    run("dvc", "plots", "diff", "HEAD", wide_name, "-o", str(tmp_path / "plots"), cwd=proj)
    page = (tmp_path / "plots/index.html").read_text()
    assert "ELBO (nats per image" in page and '"rev": "HEAD"' in page and f'"rev": "{wide_name}"' in page

    # The MLflow runs say what ran: the params DVC recorded, and the experiment's name.
    runs = {r["data"]["tags"].get("dvc_experiment"): r for r in store_runs(proj / "mlruns.db")}
    for name in exps:
        assert runs[name]["info"]["status"] == "FINISHED"
        assert runs[name]["info"]["run_name"] == name
        assert runs[name]["data"]["params"]["train.latent_dim"] == str(ran[name]["train"]["latent_dim"])
        assert "test.elbo" in runs[name]["data"]["metrics"]
    with sqlite3.connect(proj / "mlruns.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    # 5. Share without re-running: push, then pull into a fresh clone that is up to date.
    remote = tmp_path / "remote"
    run("dvc", "remote", "add", "-d", "storage", str(remote), cwd=proj)
    assert 'git commit -m "DVC remote" .dvc/config' in README
    run(*GIT, "commit", "-qm", "DVC remote", ".dvc/config", cwd=proj)
    readme("dvc", "push", cwd=proj)
    other = tmp_path / "other"
    run("git", "clone", "-q", str(proj), str(other), cwd=tmp_path)
    readme("dvc", "pull", cwd=other)
    assert (other / "models/vae.pt").read_bytes() == (proj / "models/vae.pt").read_bytes()
    assert "Data and pipelines are up to date." in readme("dvc", "repro", cwd=other).stdout

    # The tracking-server recipe: the pipeline is up to date, the forced rerun logs to a real server.
    tracking_server_recipe(proj, tmp_path)

    # 4. Keep one: apply the wide experiment; its decoder takes 32-wide input.
    assert "dvc exp apply <experiment>" in README
    run("dvc", "exp", "apply", wide_name, cwd=proj)
    session = ort.InferenceSession(str(proj / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 32
