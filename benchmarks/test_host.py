"""The host-time benchmark (host.py) on the CPU: a quick run end to end in its own process (it switches the
interpreter on before Triton loads), what it records, and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import host
import pytest

pytest.importorskip("triton")

BENCH_DIR = Path(__file__).resolve().parent


def test_quick_run_records_every_case_with_its_torch_yardstick(tmp_path):
    path = tmp_path / "host.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH_DIR.parent), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, str(BENCH_DIR / "host.py"), "--json", str(path), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode in (0, 1), completed.stderr  # 1: some case missed the target (timing, not a bug)
    data = json.loads(path.read_text())
    assert [row["case"] for row in data["results"]] == [
        "linear 4096x4096 b1",
        "linear 4096x4096 b256",
        "conv3x3 256@14 b1",
        "depthwise3x3 192@28 b1",
        "linear 4096x4096 b64, 8 tasks mixed",
    ]
    for row in data["results"]:
        assert row["packed_module_us"] > 0 and row["torch_module_us"] > 0 and row["calls"] >= 2000
        assert row["meets_target"] == (row["packed_module_us"] <= 2.0 * row["torch_module_us"])
        # The first call of the module plans and binds; every other call is a direct (stubbed) launch.
        assert row["launches"] == {"plain": 1, "direct": host.WARMUP_CALLS + row["calls"] - 1}
        assert "on meta" in row["torch_module"]
    assert completed.returncode == (0 if all(row["meets_target"] for row in data["results"]) else 1)
    report = host.write_report(path)[0].read_text()
    assert "| linear 4096x4096 b1 |" in report and "Target: packed <= 2.0 x torch" in report
