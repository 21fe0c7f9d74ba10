"""`vaeops exps`: the short experiment table from `dvc exp show --json` (real runs: tests/test_e2e.py)."""

from vaeops import exps


def entry(rev: str, params: dict, elbo: float | None, name: str | None = None, experiments=None) -> dict:
    metrics = {}
    if elbo is not None:
        metrics = {
            "reports/metrics.json": {
                "data": {"test": {"elbo": elbo, "log_px_iwae": elbo + 3, "active_units": 7}}
            },
            "reports/train.json": {"data": {"epochs": 2, "seconds": 1.25}},
        }
    data = {"params": {"params.yaml": {"data": params}}, "metrics": metrics}
    return {"rev": rev, "name": name, "data": data, "experiments": experiments}


BASE = {"train": {"latent_dim": 20, "epochs": 2}, "preprocess": {"train_limit": 0}}


def exp(name: str, params: dict, elbo: float | None, error: bool = False) -> dict:
    rev = entry("f" * 40, params, elbo, name)
    if error:
        rev["error"] = {"msg": "failed"}
    return {"name": name, "revs": [rev]}


def test_rows_show_only_what_each_experiment_changed():
    wide = {"train": {"latent_dim": 32, "epochs": 2}, "preprocess": {"train_limit": 0}}
    small = {"train": {"latent_dim": 20, "epochs": 2}, "preprocess": {"train_limit": 1000}}
    shown = [
        entry("workspace", BASE, -100.0),
        entry("a" * 40, BASE, -100.0, "main", [exp("wide", wide, -99.5), exp("small", small, -120.25)]),
    ]
    table = exps.rows(shown)
    # The workspace equals HEAD, so it gets no row of its own.
    assert [r[0] for r in table] == ["main", "  └ wide", "  └ small"]
    assert table[0][1:3] == ["(baseline)", "-100.00"]
    assert table[1][1:3] == ["train.latent_dim=32", "-99.50"]
    assert table[2][1:3] == ["preprocess.train_limit=1000", "-120.25"]
    assert table[2][3:] == ["-117.25", "7", "2", "1.2"]


def test_uncommitted_workspace_params_and_failed_experiments_are_shown():
    changed = {"train": {"latent_dim": 8, "epochs": 2}, "preprocess": {"train_limit": 0}}
    shown = [
        entry("workspace", changed, None),
        entry("b" * 40, BASE, None, None, [exp("broken", changed, None, error=True)]),
    ]
    table = exps.rows(shown)
    assert table[0][:3] == ["workspace", "train.latent_dim=8", "-"]
    assert table[1][:2] == ["bbbbbbb", "(baseline)"]
    assert table[2][:3] == ["  └ broken", "train.latent_dim=8", "failed"]


def test_render_aligns_columns_under_a_header():
    text = exps.render([["main", "(baseline)", "-1.00", "-", "-", "-", "-"]])
    header, rule, row = text.splitlines()
    assert header.startswith("experiment") and set(rule) <= {"-", " "}
    assert row.index("(baseline)") == header.index("changed params")
