"""The headline benchmark script and its report, on the CPU: a quick run end to end, and the target check."""

from __future__ import annotations

import json

import headline
import headline_report


def test_quick_run_writes_checked_results_and_a_cpu_report(tmp_path):
    assert headline.main(["--out", str(tmp_path), "--quick", "--dtypes", "fp32"]) == 0
    data = json.loads((tmp_path / "headline.json").read_text())
    rows = data["results"]
    layers = {layer.name for layer, _ in headline.QUICK_LAYERS}
    assert {row["layer"] for row in rows} == layers
    assert all(row["ok"] and row["error"] < 1e-5 and row["event_ms"] > 0 for row in rows)
    assert all(row["event_spread"] >= 0 and isinstance(row["unstable"], bool) for row in rows)
    methods = {"packnet", "packnet_tilemap", "dense_masking", "dense_masking_ids", "torch_prune", "premasked"}
    assert methods <= {r["method"] for r in rows}
    written = headline_report.write_report(tmp_path / "headline.json")
    text = written[0].read_text()
    assert len(written) == 1 and "not kernel numbers" in text and "## Targets" not in text
    # Every row has the header's cells: notes such as "unstable" sit in their own column, not in another's.
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| packed GB/s | notes |")
    assert {line.count(" | ") for line in table} == {table[0].count(" | ")}
    # The CPU run has event times only: the method columns show them rather than nothing.
    fc = next(line for line in table if line.startswith("| tiny.linear |")).split(" | ")
    assert fc[10] != "-" and fc[14] != "-"


def test_case_lines_say_units_and_never_nan():
    """The line printed per case on a CPU run (no graph or host times): units on every time, `-` where nothing was
    measured."""
    rows = [
        {"layer": "fc", "dtype": "float16", "batch": 1, "task": 3, "method": "packnet", "ok": True, "event_ms": 0.25},
        {"layer": "fc", "dtype": "float16", "batch": 1, "task": 3, "method": "dense_masking", "ok": True,
         "event_ms": 0.5, "graph_ms": None},
    ]  # fmt: skip
    line = headline._summary_line(rows)
    assert "nan" not in line and "packed event  250.0 us graph         - host        -" in line
    assert "vs masking  2.00x vs pre-masked     - (event times) | ok" in line


def _case(layer, op, batch, task, packed_ms, masking_ms, premasked_ms, host_us=10.0):
    common = {"layer": layer, "op": op, "dtype": "float16", "batch": batch, "task": task, "ok": True, "bytes": 1}
    return {
        "packnet": {**common, "method": "packnet", "graph_ms": packed_ms, "host_us": host_us},
        "dense_masking": {**common, "method": "dense_masking", "graph_ms": masking_ms},
        "premasked": {**common, "method": "premasked", "graph_ms": premasked_ms},
    }


def test_targets_are_met_only_when_every_case_meets_them():
    cases = {
        ("fc", "float16", 1, 3): _case("fc", "linear", 1, 3, 1.0, 2.1, 0.95),
        ("fc", "float16", 16, 3): _case("fc", "linear", 16, 3, 1.0, 1.9, 0.95),
        ("fc", "float16", 4096, 3): _case("fc", "linear", 4096, 3, 1.0, 1.0, 0.9, host_us=16.0),
        ("conv", "float16", 1, 3): _case("conv", "conv2d", 1, 3, 1.0, 1.6, 0.5),
    }
    met = {target: ok for target, _, ok in headline_report.targets(cases)}
    assert met["linear batch <= 256: >= 2.0x dense masking"] is False  # 2.1x and 1.9x
    assert met["linear batch <= 256: >= 0.6x pre-masked"] is True
    assert met["linear batch <= 256, latest task: >= 0.9x pre-masked"] is True
    assert met["linear batch >= 4096: >= 0.85x pre-masked"] is True
    assert met["conv batch 1: >= 1.5x dense masking"] is True
    assert met["host time per packed call <= 15 us"] is False  # one call took 16 us


def test_report_shows_spread_and_flags_unstable_rows():
    cases = {
        ("fc", "float16", 1, 3): _case("fc", "linear", 1, 3, 1.0, 2.1, 0.95),
        ("fc", "float16", 16, 3): _case("fc", "linear", 16, 3, 1.0, 1.9, 0.95),
    }
    cases[("fc", "float16", 1, 3)]["packnet"].update(graph_spread=0.04, unstable=False)
    cases[("fc", "float16", 16, 3)]["packnet"].update(graph_spread=0.02, unstable=False)
    cases[("fc", "float16", 16, 3)]["dense_masking"].update(graph_spread=0.3, unstable=True)
    report = {"device": {"device": "cuda", "gpu_name": "Test GPU"}, "limits": None, "cases": cases, "raw": {}}
    rows = [line for line in headline_report.markdown(report).splitlines() if line.startswith("| fc |")]
    assert "| 4 % |" in rows[0] and "unstable" not in rows[0]
    assert "| 2 % |" in rows[1] and rows[1].endswith("unstable: dense_masking |")
    assert "1 of 2 rows have an unstable method" in headline_report.markdown(report)


def test_latest_task_target_uses_the_packed_layers_tile_map_path():
    """The latest task reads no ids only through the tile map: its target is checked on that path's time."""
    case = _case("fc", "linear", 1, 3, 1.0, 2.1, 0.8)  # the plain kernel: 0.8x pre-masked
    case["packnet_tilemap"] = {**case["packnet"], "method": "packnet_tilemap", "graph_ms": 0.85}  # 0.94x
    met = {target: ok for target, _, ok in headline_report.targets({("fc", "float16", 1, 3): case})}
    assert met["linear batch <= 256, latest task: >= 0.9x pre-masked"] is True
    assert met["linear batch <= 256: >= 0.6x pre-masked"] is True
    case["packnet_tilemap"]["graph_ms"] = 1.0
    met = {target: ok for target, _, ok in headline_report.targets({("fc", "float16", 1, 3): case})}
    assert met["linear batch <= 256, latest task: >= 0.9x pre-masked"] is False


def test_tuned_config_names_the_autotuner_that_ran(monkeypatch):
    """``config`` comes from the one autotuner the call ran (each forgets its last choice first); none or several
    running give None."""
    from packnet_kernels import conv2d, linear

    class Tuner:
        def __init__(self):
            self.best_config = "left over from an earlier case"

    tuners = {name: Tuner() for name in ("small", "large", "mixed", "gemm", "direct")}
    monkeypatch.setattr(headline.torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(linear, "_tuned_kernel", lambda regime, major: tuners[regime])
    monkeypatch.setattr(conv2d, "_gpu_kernel", lambda kernel: tuners[kernel])

    def run(*names):
        def call():
            for name in names:
                tuners[name].best_config = f"{name} config"

        return call

    assert headline.tuned_config(run("small")) == "small config"
    assert headline.tuned_config(run("gemm")) == "gemm config"
    assert headline.tuned_config(run()) is None
    assert headline.tuned_config(run("small", "large")) is None
