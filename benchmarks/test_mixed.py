"""The mixed-batch benchmark on the CPU: a quick run end to end (checked outputs, a report that says what its
numbers are) and the target check on made-up graph times."""

from __future__ import annotations

import json

import mixed
import pytest
import torch


def test_row_tasks_deal_the_latest_tasks_evenly():
    tasks = mixed.row_tasks_for(64, 8, seed=1)
    assert sorted(torch.bincount(tasks, minlength=9)[1:].tolist()) == [8] * 8
    assert set(mixed.row_tasks_for(8, 2, seed=1).tolist()) == {7, 8}
    assert not torch.equal(tasks, torch.sort(tasks).values)  # shuffled, not grouped


def test_quick_run_checks_every_method(tmp_path):
    assert mixed.main(["--out", str(tmp_path), "--quick"]) == 0
    data = json.loads((tmp_path / "mixed.json").read_text())
    methods = {"mixed", "one_task", "split_by_task", "dense_masking_by_task"}
    assert {row["method"] for row in data["results"]} == methods
    assert len(data["results"]) == len(methods) * len(mixed.QUICK_BATCHES) * len(mixed.TASK_COUNTS)
    assert all(row["ok"] and row["error"] < 1e-5 for row in data["results"])
    report = mixed.write_report(tmp_path / "mixed.json")[0].read_text()
    assert "**not kernel numbers**" in report and "| target |" not in report


def test_warm_run_calls_every_method_of_every_case_once(tmp_path, monkeypatch):
    """``--warm`` (the GPU session's compile pass) runs each method of each case once, checks and times nothing."""
    calls = []
    real = mixed.build_methods

    def counting(*args):
        return {name: (lambda i, fn=fn, name=name: calls.append(name) or fn(i)) for name, fn in real(*args).items()}

    monkeypatch.setattr(mixed, "build_methods", counting)
    monkeypatch.setattr(mixed.timing, "latency_row", lambda *args, **kwargs: pytest.fail("a warm run timed a call"))
    assert mixed.main(["--json", str(tmp_path / "warm.json"), "--quick", "--warm"]) == 0
    cases = len(mixed.QUICK_BATCHES) * len(mixed.TASK_COUNTS)
    assert sorted(calls) == sorted(["mixed", "one_task", "split_by_task", "dense_masking_by_task"] * cases)
    assert json.loads((tmp_path / "warm.json").read_text())["results"] == []


def test_targets_from_graph_times():
    def rows(mixed_ms, one_ms, split_ms):
        return [
            {"batch": 64, "tasks": 8, "method": method, "graph_ms": ms}
            for method, ms in (("mixed", mixed_ms), ("one_task", one_ms), ("split_by_task", split_ms))
        ]

    assert [met for _, _, met in mixed.targets(rows(1.2, 1.0, 5.0))] == [True, True]
    assert [met for _, _, met in mixed.targets(rows(1.4, 1.0, 5.0))] == [False, False]
    assert [met for _, _, met in mixed.targets([])] == [None, None]
