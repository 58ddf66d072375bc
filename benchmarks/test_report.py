"""report.py and the ``packnet bench`` helpers on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import pytest
import report

FACTS = {"device": "cuda", "gpu_name": "Test GPU 80GB", "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8"}
LAYER_MS = {"packnet": 1.0, "dense_masking": 2.0, "premasked": 0.8, "compiled_masking": 1.9}


def _entry(name: str, extra_info: dict, median_s: float = 1e-3) -> dict:
    stats = {"min": median_s, "max": median_s, "mean": median_s, "median": median_s, "rounds": 3, "iterations": 1}
    return {
        "group": None,
        "name": name,
        "fullname": f"benchmarks/x.py::{name}",
        "extra_info": extra_info,
        "stats": stats,
    }


def _synthetic() -> dict:
    benchmarks = [
        _entry("limits", {"kind": "limit", "copy_gbps": 2900.0, "matmul_tflops": {"float16": 700.0}, **FACTS})
    ]
    for layer, shape in (("vgg16.classifier.0", "25088->4096"), ("resnet50.conv1", "3->64 7x7 s2 @224")):
        for batch in (1, 8, 64):
            for method, ms in LAYER_MS.items():
                info = {
                    "kind": "layer",
                    "layer": layer,
                    "shape": shape,
                    "op": "linear",
                    "dtype": "fp16",
                    "batch": batch,
                    "task": 2,
                    "method": method,
                    "median_ms": ms * batch,
                    "gbps": 1500.0,
                    "tflops": 10.0,
                    "bound": "memory",
                    "limit_fraction": 0.5,
                    "speedup_vs_dense_masking": LAYER_MS["dense_masking"] / ms,
                    "speedup_vs_premasked": LAYER_MS["premasked"] / ms,
                    "spread": 0.25 if (method, batch) == ("dense_masking", 8) else 0.03,
                    "unstable": (method, batch) == ("dense_masking", 8),
                    **FACTS,
                }
                if method == "compiled_masking":
                    info.update(
                        inductor_launches=["triton_poi_fused_where_0", "extern_kernels.mm"], prologue_fused=False
                    )
                benchmarks.append(_entry(f"test_layer[{layer}-{batch}-{method}]", info))
    for method, ms, weight_bytes in (("packnet", 3.0, 3 << 20), ("dense_copies", 2.0, 6 << 20)):
        info = {
            "kind": "model",
            "model": "vgg16",
            "dtype": "fp16",
            "batch": 1,
            "task": 1,
            "method": method,
            "median_ms": ms,
            "weight_bytes": weight_bytes,
            "peak_bytes": None,
            "speedup_vs_dense_masking": 1.5,
            "speedup_vs_premasked": 2.0 / ms,
            **FACTS,
        }
        benchmarks.append(_entry(f"test_model[vgg16-{method}]", info))
    # An entry from another suite: no 'kind', skipped with a warning. One without median_ms uses the stats.
    benchmarks.append(_entry("test_other", {}))
    benchmarks.append(
        _entry(
            "test_layer[stats-only]",
            {"kind": "layer", "layer": "tiny", "dtype": "fp32", "batch": 1, "task": 1, "method": "packnet"},
            median_s=2e-3,
        )
    )
    return {"datetime": "2025-01-01T00:00:00", "version": "5.3.1", "benchmarks": benchmarks}


@pytest.fixture
def results_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_synthetic()), encoding="utf-8")
    return path


def test_load_splits_kinds_and_falls_back_to_stats(results_json):
    rows = report.load(results_json)
    assert len(rows["limit"]) == 1 and len(rows["model"]) == 2 and len(rows["layer"]) == 2 * 3 * 4 + 1
    assert rows["meta"]["gpu_name"] == "Test GPU 80GB"
    stats_only = next(row for row in rows["layer"] if row["layer"] == "tiny")
    assert math.isclose(stats_only["median_ms"], 2.0)


def test_markdown_tables(results_json):
    text = report.markdown(report.load(results_json))
    assert text.startswith("# packnet benchmarks: Test GPU 80GB")
    assert "torch 2.13.0, triton 3.9.0, CUDA 12.8" in text
    assert "| device-to-device copy | 2900 GB/s (read + write) |" in text
    # One layer row per (layer, dtype, batch, task); packnet's speedups come from its own row.
    row = next(line for line in text.splitlines() if line.startswith("| vgg16.classifier.0 | 25088->4096 | fp16 | 8 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5:9] == ["8.000", "16.000", "6.400", "15.200"]  # packnet, dense masking, pre-masked, compiled
    assert cells[9:] == ["2.00x", "0.80x", "1500 GB/s", "50 % (memory)", "3 %", "dense masking"]
    batch_1 = next(
        line for line in text.splitlines() if line.startswith("| vgg16.classifier.0 | 25088->4096 | fp16 | 1 |")
    )
    assert batch_1.endswith("| 3 % | - |")  # nothing unstable there
    assert "| vgg16.classifier.0 | fp16 | 1 | no | `triton_poi_fused_where_0`, `extern_kernels.mm` | 1.05x |" in text
    assert "| vgg16 | fp16 | 1 | 1 | 3 dense copies | 2.000 | 6.0 | - | 1.50x | 1.00x | - |" in text
    assert "not kernel numbers" not in text
    # Layer rows keep the suite's order (first appearance), not alphabetical order.
    assert text.index("| vgg16.classifier.0 |") < text.index("| resnet50.conv1 |")


def test_cpu_results_are_labelled_and_not_plotted(tmp_path):
    """A CPU run times the reference path: the report says so and draws no plot of noise."""
    data = _synthetic()
    for entry in data["benchmarks"]:
        entry["extra_info"].update(device="cpu", gpu_name=None)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    written = report.write_report(path, tmp_path / "cpu.md", tmp_path / "cpu.png")
    assert set(written) == {"md"} and not (tmp_path / "cpu.png").exists()
    assert "**CPU run: these numbers are not kernel numbers.**" in written["md"].read_text()


def test_plot_writes_png(results_json, tmp_path):
    path = report.plot(report.load(results_json), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no layer results"):
        report.plot({"layer": [], "meta": {}}, tmp_path / "empty.png")


def test_main_writes_report_and_plot(results_json, tmp_path, capsys):
    assert report.main([str(results_json), str(tmp_path / "r.md"), str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.md").read_text().startswith("# packnet benchmarks")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert report.main([]) == 2


def test_bench_cli_helpers(results_json, tmp_path):
    from packnet import bench

    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.device_slug(None) == "cpu"
    command = bench.pytest_command(tmp_path / "out.json", "tiny and packnet", "models")
    assert command[1:3] == ["-m", "pytest"] and command[-2:] == ["-k", "tiny and packnet"]
    assert command[3].endswith("test_models.py") and not any("test_layers" in part for part in command)
    assert f"--benchmark-json={tmp_path / 'out.json'}" in command


def _fake_suite(calls: list, headline_status: int = 0):
    """Stands in for the stages' subprocesses: writes what each would write, records the command lines."""

    def call(command, cwd, env):
        calls.append(command)
        if command[1].endswith("headline.py"):
            row = {"layer": "fc", "op": "linear", "dtype": "float16", "batch": 1, "task": 3, "ok": True, "bytes": 3}
            results = [
                {**row, "method": method, "graph_ms": ms, "event_ms": ms, "graph_spread": 0.01, "unstable": False}
                for method, ms in (("packnet", 1.0), ("dense_masking", 2.0), ("premasked", 0.8))
            ]
            path = Path(command[command.index("--json") + 1])
            path.write_text(json.dumps({"device": {"device": "cuda", "gpu_name": "Test GPU"}, "results": results}))
            return headline_status
        target = next(part for part in command if part.startswith("--benchmark-json="))
        Path(target.split("=", 1)[1]).write_text(json.dumps(_synthetic()))
        return 0

    return call


def test_bench_runs_the_chosen_stages_and_reports_each(tmp_path, monkeypatch):
    import argparse

    from packnet import bench

    calls = []
    monkeypatch.setattr(bench.subprocess, "call", _fake_suite(calls))
    monkeypatch.setattr(bench, "_gpu_name", lambda: "Test GPU 80GB")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--stage", "headline", "--stage", "models", "--budget-s", "300"])
    assert bench.run(args) == 0
    assert calls[0][1].endswith("headline.py") and calls[0][-2:] == ["--budget-s", "300.0"]
    assert calls[1][3].endswith("test_models.py") and len(calls) == 2
    stem = f"test-gpu-80gb-{datetime.date.today().isoformat()}"
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(
        f"{stem}-{stage}.{ext}" for stage in ("headline", "models") for ext in ("json", "md", "png")
    )
    assert (tmp_path / f"{stem}-headline.md").read_text().startswith("# Headline benchmark: Test GPU")


def test_bench_reports_a_headline_stage_cut_short(tmp_path, monkeypatch):
    """A headline stage stopped by a time limit (status 124) keeps and reports the cases it measured."""
    import argparse

    from packnet import bench

    monkeypatch.setattr(bench.subprocess, "call", _fake_suite([], headline_status=124))
    monkeypatch.setattr(bench, "_gpu_name", lambda: None)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--out", str(tmp_path), "--stage", "headline"])) == 124
    assert "| fc | float16 | 1 | 3 |" in (tmp_path / f"cpu-{datetime.date.today().isoformat()}-headline.md").read_text()
