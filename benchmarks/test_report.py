"""report.py and the ``packnet bench`` helpers on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import json
import math

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
