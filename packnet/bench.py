"""``packnet bench``: run the benchmark suite and write its results, a Markdown report and a plot.

The suite is ``benchmarks/`` of a source checkout (pytest-benchmark). It runs in a subprocess
(``python -m pytest benchmarks --benchmark-json ...``); the raw JSON is then copied to
``<out>/<device>-<YYYY-MM-DD>.json`` with ``.md`` and ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("packnet.bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument(
        "--out", default=str(BENCH_DIR / "results"), help="directory for the results (default: benchmarks/results)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the tiny CPU subset (what runs anyway without CUDA): a smoke test of the suite on this device",
    )
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression selecting benchmarks")


def device_slug(gpu_name: str | None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; ``None`` (no GPU) -> ``"cpu"``."""
    if not gpu_name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def _load_report_module():
    # benchmarks/ is a directory of pytest files, not a package: load report.py from its path.
    spec = importlib.util.spec_from_file_location("packnet_bench_report", BENCH_DIR / "report.py")
    if spec is None or spec.loader is None:
        raise OSError(f"cannot load {BENCH_DIR / 'report.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_name_of(json_path: Path) -> str | None:
    """The GPU the suite ran on, as recorded in its results (None on the CPU)."""
    with open(json_path, encoding="utf-8") as handle:
        data = json.load(handle)
    for entry in data.get("benchmarks", []):
        name = (entry.get("extra_info") or {}).get("gpu_name")
        if name:
            return name
    return None


def pytest_command(json_path: Path, keyword: str | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-p", "no:cacheprovider"]
    command += [f"--benchmark-json={json_path}", "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
    if keyword:
        command += ["-k", keyword]
    return command


def run(args: argparse.Namespace) -> int:
    """Run the suite and write ``<out>/<device>-<date>.{json,md,png}``; returns pytest's exit status.

    Raises:
        OSError: no ``benchmarks/`` directory (an installed package without its source checkout).
    """
    if not (BENCH_DIR / "conftest.py").is_file():
        raise OSError(f"the benchmark suite is not at {BENCH_DIR}: run `packnet bench` from a source checkout")
    env = dict(os.environ)
    if args.quick:
        env["PACKNET_BENCH_QUICK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="packnet-bench-") as scratch:
        raw = Path(scratch) / "results.json"
        command = pytest_command(raw, args.keyword)
        log.info("running %s", " ".join(command))
        status = subprocess.call(command, cwd=REPO_ROOT, env=env)
        if status not in (0, 1):  # 1: some benchmark failed; the others' results are still worth writing
            log.error("pytest exited with status %d; no results written", status)
            return status
        if not raw.is_file():
            log.error("pytest wrote no benchmark JSON (no benchmark ran)")
            return status or 1
        if status == 1:
            log.warning("some benchmarks failed; writing the results of those that ran")
        stem = f"{device_slug(_gpu_name_of(raw))}-{datetime.date.today().isoformat()}"
        json_path = out_dir / f"{stem}.json"
        if json_path.exists():
            log.warning("overwriting %s", json_path)
        shutil.copyfile(raw, json_path)
    written = _load_report_module().write_report(json_path, out_dir / f"{stem}.md", out_dir / f"{stem}.png")
    for path in (json_path, *written.values()):
        print(path)
    return status
