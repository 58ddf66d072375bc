"""The mixed conv benchmark on the CPU: a quick run end to end (checked outputs, a report that says what its numbers
are) and the warm pass."""

from __future__ import annotations

import json

import mixed_conv
import pytest

METHODS = {"mixed", "mixed_kernel", "one_task", "split_by_task"}


def test_quick_run_checks_every_method(tmp_path):
    assert mixed_conv.main(["--out", str(tmp_path), "--quick"]) == 0
    data = json.loads((tmp_path / "mixed_conv.json").read_text())
    assert {row["method"] for row in data["results"]} == METHODS
    assert len(data["results"]) == len(METHODS) * len(mixed_conv.QUICK_BATCHES) * len(mixed_conv.TASK_COUNTS)
    assert all(row["ok"] and row["error"] < 1e-5 for row in data["results"])
    report = mixed_conv.write_report(tmp_path / "mixed_conv.json")[0].read_text()
    assert "**not kernel numbers**" in report and report.count("\n| 7 |") == len(mixed_conv.TASK_COUNTS)


def test_warm_run_calls_every_method_of_every_case_once(tmp_path, monkeypatch):
    calls = []
    real = mixed_conv.build_methods

    def counting(*args):
        return {name: (lambda i, fn=fn, name=name: calls.append(name) or fn(i)) for name, fn in real(*args).items()}

    monkeypatch.setattr(mixed_conv, "build_methods", counting)
    monkeypatch.setattr(mixed_conv.timing, "latency_row", lambda *args, **kwargs: pytest.fail("a warm run timed"))
    assert mixed_conv.main(["--json", str(tmp_path / "warm.json"), "--quick", "--warm"]) == 0
    cases = len(mixed_conv.QUICK_BATCHES) * len(mixed_conv.TASK_COUNTS)
    assert sorted(calls) == sorted(list(METHODS) * cases)
