"""VAEOPS_TIMINGS: each stage reports the seconds of its real work, which benchmarks/pipeline.py
subtracts from the process's wall time to get its fixed cost."""

import json
import time

import pytest
from conftest import isolate_mlflow, run_cli
from test_train import write_data, write_params

from vaeops.progress import work


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_block_appends_its_seconds(tmp_path, monkeypatch):
    out = tmp_path / "t.jsonl"
    monkeypatch.setenv("VAEOPS_TIMINGS", str(out))
    for pause in (0.05, 0.1):
        with work("train"):
            time.sleep(pause)
    got = lines(out)
    assert [row["stage"] for row in got] == ["train", "train"]
    assert 0.05 <= got[0]["work_s"] < got[1]["work_s"] < 1


def test_nothing_written_without_the_variable_on_other_ranks_or_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "t.jsonl"
    monkeypatch.delenv("VAEOPS_TIMINGS", raising=False)
    with work("export"):
        pass
    monkeypatch.setenv("VAEOPS_TIMINGS", str(out))
    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than rank 0
    with work("train"):
        pass
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError), work("evaluate"):
        raise ValueError("the work failed: no time to report")
    assert not out.exists()


def test_cli_train_reports_one_line_per_epoch_within_its_wall_time(tmp_path, monkeypatch):
    isolate_mlflow(monkeypatch, tmp_path)
    write_data(tmp_path / "data/processed")
    write_params(tmp_path, epochs=2)
    out = tmp_path / "timings.jsonl"
    start = time.perf_counter()
    res = run_cli("train", cwd=tmp_path, env={"VAEOPS_TIMINGS": str(out)})
    wall = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    got = lines(out)
    assert [row["stage"] for row in got] == ["train", "train"]
    assert all(row["work_s"] > 0 for row in got)
    assert sum(row["work_s"] for row in got) < wall  # starting, importing and logging are not work
