"""`vaeops exps`: the short view of `dvc exp show`.

`dvc exp show` prints every param, every metric leaf and the hash of every dependency: dozens of
columns. This prints one row per commit and experiment with what a person compares: the params
that differ from the row's baseline commit, and the few numbers that say how good the model is.
"""

import json
import subprocess
import sys
from typing import Any

from vaeops.errors import UsageError, WorkError

# (header, metrics file, dotted key, format)
NUMBERS = [
    ("test ELBO", "reports/metrics.json", "test.elbo", "{:.2f}"),
    ("log p(x) IWAE", "reports/metrics.json", "test.log_px_iwae", "{:.2f}"),
    ("active units", "reports/metrics.json", "test.active_units", "{:d}"),
    ("epochs", "reports/train.json", "epochs", "{:d}"),
    ("train s", "reports/train.json", "seconds", "{:.1f}"),
]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params(data: dict[str, Any]) -> dict[str, Any]:
    files = data.get("params") or {}
    return flatten((files.get("params.yaml") or {}).get("data") or {})


def _number(data: dict[str, Any], file: str, key: str, fmt: str) -> str:
    value: Any = ((data.get("metrics") or {}).get(file) or {}).get("data") or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _changed(params: dict[str, Any], baseline: dict[str, Any]) -> str:
    diff = [f"{k}={v}" for k, v in params.items() if baseline.get(k) != v]
    return " ".join(diff) or "-"


def rows(shown: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows from `dvc exp show --json`: each commit, then its experiments, newest first."""
    out = []
    for commit in shown:
        data = commit.get("data") or {}
        base = _params(data)
        name = commit.get("name") or commit["rev"][:7]
        numbers = [_number(data, *n[1:]) for n in NUMBERS]
        if commit["rev"] == "workspace":
            head = (shown[1].get("data") or {}) if len(shown) > 1 else {}
            changed = _changed(base, _params(head)) if head else "-"
            # Only worth a row when it differs from HEAD: uncommitted params or new results.
            if head and changed == "-" and numbers == [_number(head, *n[1:]) for n in NUMBERS]:
                continue
            out.append(["workspace", changed, *numbers])
        elif commit is shown[1] or commit.get("experiments") or set(numbers) != {"-"}:
            # Older commits (`--all-commits`) only when they have results or experiments.
            out.append([name, "(baseline)", *numbers])
        for exp in commit.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            rdata = rev.get("data") or {}
            label = f"  └ {exp.get('name') or rev.get('name') or rev.get('rev', '?')[:7]}"
            if rev.get("error") or rdata.get("error") or exp.get("error"):
                out.append([label, _changed(_params(rdata), base), "failed", *["-"] * (len(NUMBERS) - 1)])
                continue
            out.append([label, _changed(_params(rdata), base)] + [_number(rdata, *n[1:]) for n in NUMBERS])
    return out


def render(table: list[list[str]]) -> str:
    header = ["experiment", "changed params", *(n[0] for n in NUMBERS)]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show(all_commits: bool = False) -> str:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise WorkError(f"could not run dvc ({e.strerror}); run `make setup`") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"dvc exp show failed: {last} (run from the project root, after `git init`)")
    try:
        shown = json.loads(res.stdout)
    except ValueError:
        raise WorkError("dvc exp show --json printed something that is not JSON") from None
    return render(rows(shown))
