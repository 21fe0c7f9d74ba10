"""The whole default pipeline as a user waits for it, against the article's script, in one run.

(a) the five stages (download, preprocess, train, evaluate, export), each a fresh process started
    with its command from dvc.yaml, as DVC starts them, in a temporary copy of this project. Per
    stage: wall seconds, work seconds (the stage's real computation, which it reports through
    VAEOPS_TIMINGS, see vaeops.progress.work: train its epochs with validation, evaluate its scoring
    and figures, export building and checking the graphs, download and preprocess their data work),
    the fixed cost (wall - work: starting Python, imports, MLflow, writing outputs) and peak RSS;
(b) a real `dvc repro` of the same pipeline in a second fresh copy;
(c) the baseline: benchmarks/article_vae.py (pytorch/examples vae/main.py) for the same epochs;
(d) `vaeops train` alone with --short-epochs (3) against the article's script with as many.

The copies hold this checkout's tracked files as they are in its work tree, and link its .venv
(`make setup`), whose editable install runs this checkout's src/. MNIST comes from
VAEOPS_DATA_MIRROR, else ../shared/datasets/mnist beside the checkout (as .ci/run sets it). The
MLflow store is the copy's own. --epochs sets train.epochs in the copies' params.yaml for (a)-(c);
(d) overrides it with VAEOPS_TRAIN__EPOCHS.

    .venv/bin/python benchmarks/pipeline.py [--epochs N] [--short-epochs 3] [--skip-dvc]
"""

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
STAGES = ("download", "preprocess", "train", "evaluate", "export")


def copy_project(dest: Path, epochs: int | None) -> Path:
    """This checkout's files in a new git repository at dest (DVC and the run's git tag need one),
    with train.epochs set to `epochs` in its params.yaml (DVC refuses a VAEOPS_ override of it)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)  # every stage runs
    if epochs is not None:
        params = dest / "params.yaml"
        text, n = re.subn(r"^(  epochs:\s*)\d+", rf"\g<1>{epochs}", params.read_text(), flags=re.M)
        if n != 1:
            sys.exit(f"{params}: found {n} lines '  epochs: N', expected train's one")
        params.write_text(text)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *args], cwd=dest, check=True)
    return dest


def environment(timings: Path, epochs: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAEOPS_", "MLFLOW_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    mirror = os.environ.get("VAEOPS_DATA_MIRROR") or str(ROOT.parent / "shared" / "datasets" / "mnist")
    env["VAEOPS_DATA_MIRROR"] = mirror
    env["VAEOPS_TIMINGS"] = str(timings)
    if epochs is not None:
        env["VAEOPS_TRAIN__EPOCHS"] = str(epochs)
    return env


def timed(cmd: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the process and its children) of a shell command."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"`{cmd}` failed ({proc.returncode}):\n" + "".join(log.read_text().splitlines(True)[-20:]))
    return wall, usage.ru_maxrss / 1024


def work_seconds(timings: Path) -> dict[str, float]:
    """Seconds of work per stage: the sum of the lines vaeops.progress.work appended."""
    total: dict[str, float] = {}
    if timings.is_file():
        for line in timings.read_text().splitlines():
            row = json.loads(line)
            total[row["stage"]] = total.get(row["stage"], 0.0) + row["work_s"]
    return total


def article_data(mirror: Path, root: Path) -> str:
    """torchvision's MNIST root for the article's script: the mirror's IDX files, decompressed."""
    files = sorted(mirror.glob("*-ubyte.gz"))
    if len(files) != 4:
        sys.exit(f"{mirror}: expected MNIST's four *-ubyte.gz files; set VAEOPS_DATA_MIRROR to a copy")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in files:
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return str(root)


def article(epochs: int, data: str, tmp: Path, env: dict[str, str]) -> tuple[float, float]:
    cmd = (
        f"{VENV_BIN / 'python'} {ROOT / 'benchmarks' / 'article_vae.py'} --epochs {epochs} "
        f"--data {data} --results {tmp / 'results'}"
    )
    return timed(cmd, tmp, env, tmp / f"article_{epochs}.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    ap.add_argument("--short-epochs", type=int, default=3, help="epochs of the train-alone comparison")
    ap.add_argument("--skip-dvc", action="store_true", help="leave out (b), the real `dvc repro`")
    args = ap.parse_args()
    epochs = args.epochs or yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["epochs"]
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    with tempfile.TemporaryDirectory(prefix="vaeops-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        env = environment(tmp / "stages.jsonl")
        data = article_data(Path(env["VAEOPS_DATA_MIRROR"]), tmp / "article_data")

        a_wall, a_rss = article(epochs, data, tmp, env)
        print(f"article's script, {epochs} epochs: {a_wall:.1f} s")

        stages_dir = copy_project(tmp / "stages", args.epochs)
        rows = []
        for stage in STAGES:
            wall, rss = timed(dvc[stage]["cmd"], stages_dir, env, tmp / f"{stage}.log")
            rows.append((dvc[stage]["cmd"], wall, work_seconds(tmp / "stages.jsonl").get(stage, 0.0), rss))
            print(f"{stage}: {wall:.1f} s")

        if not args.skip_dvc:
            dvc_env = environment(tmp / "dvc.jsonl")
            dvc_dir = copy_project(tmp / "dvc", args.epochs)
            dvc_wall, dvc_rss = timed("dvc repro", dvc_dir, dvc_env, tmp / "dvc.log")
            dvc_work = sum(work_seconds(tmp / "dvc.jsonl").values())
            print(f"dvc repro: {dvc_wall:.1f} s")

        short_env = environment(tmp / "short.jsonl", args.short_epochs)
        t_wall, t_rss = timed("vaeops train", stages_dir, short_env, tmp / "train_short.log")
        t_work = work_seconds(tmp / "short.jsonl").get("train", 0.0)
        s_wall, s_rss = article(args.short_epochs, data, tmp, env)

    print("\n| process | wall s | work s | fixed s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for cmd, wall, work, rss in rows:
        print(f"| `{cmd}` | {wall:.1f} | {work:.1f} | {wall - work:.1f} | {rss:,.0f} |")
    total = sum(r[1] for r in rows)
    total_work = sum(r[2] for r in rows)
    print(
        f"| five stages, sum | {total:.1f} | {total_work:.1f} | {total - total_work:.1f} | "
        f"{max(r[3] for r in rows):,.0f} |"
    )
    if not args.skip_dvc:
        print(
            f"| `dvc repro` | {dvc_wall:.1f} | {dvc_work:.1f} | {dvc_wall - dvc_work:.1f} | {dvc_rss:,.0f} |"
        )
    print(f"| article's script, {epochs} epochs | {a_wall:.1f} | | | {a_rss:,.0f} |")
    print(
        f"| `vaeops train`, {args.short_epochs} epochs | {t_wall:.1f} | {t_work:.1f} | "
        f"{t_wall - t_work:.1f} | {t_rss:,.0f} |"
    )
    print(f"| article's script, {args.short_epochs} epochs | {s_wall:.1f} | | | {s_rss:,.0f} |")

    print("\n| comparison | vaeops s | article s | speed-up | target |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| default pipeline ({epochs} epochs), five stages | {total:.1f} | {a_wall:.1f} | "
        f"{a_wall / total:.2f}x | 1.5x |"
    )
    if not args.skip_dvc:
        print(
            f"| default pipeline ({epochs} epochs), `dvc repro` | {dvc_wall:.1f} | {a_wall:.1f} | "
            f"{a_wall / dvc_wall:.2f}x | 1.5x |"
        )
    print(
        f"| train alone, {args.short_epochs} epochs | {t_wall:.1f} | {s_wall:.1f} | "
        f"{s_wall / t_wall:.2f}x | 2.5x |"
    )


if __name__ == "__main__":
    main()
