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
    methods = {"mixed", "one_task", "split_by_task", "dense_masking_by_task", "mixed_ids4", "one_task_ids4"}
    assert {row["method"] for row in data["results"]} == methods
    compact = sum(batch in mixed.COMPACT_BATCHES for batch in mixed.QUICK_BATCHES)
    cases = len(mixed.QUICK_BATCHES) * len(mixed.TASK_COUNTS)
    assert len(data["results"]) == 4 * cases + 2 * compact * len(mixed.TASK_COUNTS)
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
    compact = sum(batch in mixed.COMPACT_BATCHES for batch in mixed.QUICK_BATCHES) * len(mixed.TASK_COUNTS)
    expected = ["mixed", "one_task", "split_by_task", "dense_masking_by_task"] * cases
    assert sorted(calls) == sorted(expected + ["mixed_ids4", "one_task_ids4"] * compact)
    assert json.loads((tmp_path / "warm.json").read_text())["results"] == []


def test_targets_from_graph_times():
    def rows(mixed_ms, one_ms, split_ms, suffix=""):
        return [
            {"batch": 64, "tasks": 8, "method": method, "graph_ms": ms}
            for method, ms in (("mixed" + suffix, mixed_ms), ("one_task" + suffix, one_ms), ("split_by_task", split_ms))
        ]

    def wide(mixed_ms, one_ms, suffix=""):
        return [{"batch": 256, "tasks": 8, "method": method + suffix, "graph_ms": ms}
                for method, ms in (("mixed", mixed_ms), ("one_task", one_ms))]  # fmt: skip

    assert [met for _, _, met in mixed.targets(rows(1.2, 1.0, 5.0))] == [True, True, None] + [None] * 3
    assert [met for _, _, met in mixed.targets(rows(1.4, 1.0, 5.0))] == [False, False, None] + [None] * 3
    assert [met for _, _, met in mixed.targets(rows(1.2, 1.0, 5.0, "_ids4"))] == [None] * 3 + [True, True, None]
    assert [met for _, _, met in mixed.targets(rows(1.2, 0.9, 4.0, "_ids4"))] == [None] * 3 + [False, False, None]
    assert [met for _, _, met in mixed.targets(wide(1.5, 1.0))] == [None, None, True] + [None] * 3
    assert [met for _, _, met in mixed.targets(wide(1.6, 1.0, "_ids4"))] == [None] * 5 + [False]
    assert [met for _, _, met in mixed.targets([])] == [None] * 6


# --------------------------------------------------------------------------------------------------------------- #
# The byte-and-step model (benchmarks/mixed_model.py), from the committed features of the compiled kernels.


def test_model_cases_are_the_benchmarks():
    import mixed_model

    assert mixed_model.MODEL_LAYER == mixed.LAYER and mixed_model.BATCHES == mixed.BATCHES
    assert mixed_model.TASK_COUNTS == mixed.TASK_COUNTS
    for batch, count in mixed_model.MODEL_CASES:
        assert mixed_model.case_tasks(batch, count) == sorted(mixed.row_tasks_for(batch, count, seed=0).tolist())


def test_model_groups_are_the_kernels():
    """The model's row groups of a mix are those the launcher lays out for the kernel."""
    import mixed_model

    from packnet_kernels import linear

    for tasks in ([3] * 40, [1, 5, 5, 2, 8, 8, 8] * 9, mixed.row_tasks_for(64, 8, seed=2).tolist()):
        group_rows, group_tasks, counts = linear._row_groups(torch.tensor(tasks), reuse=False)
        groups, wide = mixed_model.v2_groups(tasks), mixed_model.v2_groups(tasks, 64)
        slots = mixed_model.v2_groups(tasks, 32)
        assert counts.tolist() == [len(groups), len(wide), len(set(tasks)), len(slots)]
        assert group_tasks[2 * len(tasks) : 2 * len(tasks) + len(slots)].tolist() == slots
        assert group_tasks[: len(groups)].tolist() == groups
        assert group_tasks[len(tasks) : len(tasks) + len(wide)].tolist() == wide
        filled = (group_rows.view(-1, 16)[: len(groups)] >= 0).sum(1).tolist()
        for task in set(tasks):
            runs = [rows for rows, group_task in zip(filled, groups, strict=True) if group_task == task]
            assert sum(runs) == tasks.count(task) and all(rows == 16 for rows in runs[:-1])


def test_model_reproduces_its_committed_predictions_and_fits_run_4():
    """The committed predictions follow from the committed features and calibration; on run 4's v6 mixed cases
    (nothing fitted to them) the v1 model is within 15 % of every measured time."""
    import mixed_model

    report = mixed_model.model_report(*mixed_model.load_model_inputs())
    committed = json.loads((mixed_model.RESULTS / "mixed-model-predictions.json").read_text())
    assert report == committed
    assert all(abs(case["v1_error"]) <= 0.15 for case in report["cases"])
    assert len(report["cases"]) == len(mixed.BATCHES) * len(mixed.TASK_COUNTS)
    assert (mixed_model.RESULTS / "mixed-model-predictions.md").read_text() == mixed_model.model_markdown(report)


def test_gpu_report_sets_measured_mixed_times_beside_the_model():
    """A GPU run of the model's layer reports each mixed launch (uint8 and 4-bit ids) against the model's v2
    prediction for those ids."""
    import mixed_model

    predicted = json.loads((mixed_model.RESULTS / "mixed-model-predictions.json").read_text())["cases"][7]
    data = {
        "device": {"device": "cuda", "gpu_name": "NVIDIA H200"},
        "layer": list(mixed.LAYER),
        "dtype": "float16",
        "results": [
            {"batch": 64, "tasks": 8, "method": "mixed", "ok": True, "graph_ms": 0.2},
            {"batch": 64, "tasks": 8, "method": "mixed_ids4", "ok": True, "graph_ms": 0.1},
        ],
    }
    assert (predicted["batch"], predicted["tasks"]) == (64, 8)
    report = mixed.markdown(data)
    for ids, measured, model in (("uint8", 200, "v2_predicted_us"), ("4-bit", 100, "v2_ids4_predicted_us")):
        error = 100 * (predicted[model] / measured - 1)
        assert f"| 64 | 8 | {ids} | {measured:.1f} | {predicted[model]:.1f} | {error:+.0f} % |" in report
    assert "v2 predicted" not in mixed.markdown(dict(data, layer=[96, 80]))
