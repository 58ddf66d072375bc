"""``packnet bench``: run the benchmark stages and write their results, a Markdown report and a plot each.

The suite is ``benchmarks/`` of a source checkout, in three stages, each run in a subprocess and written to
``<out>/<device>-<YYYY-MM-DD>-<stage>.json`` with ``.md`` and ``.png`` (GPU runs only) beside it:

- ``headline``: ``benchmarks/headline.py``, the layers and methods README quotes, event and CUDA-graph times. It
  rewrites its JSON after every case, so a run stopped by a time limit keeps what it measured; ``--budget-s`` stops
  it from starting new cases.
- ``layers``: the pytest-benchmark layer matrix (``benchmarks/test_layers.py``) and the host-path benchmark.
- ``models``: whole packed models against dense masking and dense copies (``benchmarks/test_models.py``).
- ``tiles``: ``benchmarks/tiles.py``, the bytes each task reads with the tile map (block-structured and unstructured
  packs) and, on a GPU, each task's latency against pre-masked dense and a block-sparse (BSR) copy.
- ``mixed``: ``benchmarks/mixed.py``, batches mixing 1 to 8 tasks in one launch against splitting them by task.
- ``host``: ``benchmarks/host.py``, the host time of a packed module's call (kernel launch stubbed) against the same
  torch layer on meta tensors; runs without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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
STAGES = ("headline", "layers", "models", "tiles", "mixed", "host")
# The pytest files of each pytest-benchmark stage.
STAGE_FILES = {"layers": ("test_layers.py", "test_host_path.py"), "models": ("test_models.py",)}


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
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        help="run this stage (repeat for several; default: all: headline, layers, models, tiles, mixed, host)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="headline, tiles and mixed stages: start no new case after this many seconds (what ran is kept)",
    )
    parser.add_argument(
        "--dtypes", default="fp16,bf16", help="headline stage: comma-separated fp16, bf16, fp32 (default: fp16,bf16)"
    )
    parser.add_argument(
        "-k", dest="keyword", metavar="EXPR", help="layers and models stages: pytest -k expression selecting benchmarks"
    )


def device_slug(gpu_name: str | None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; ``None`` (no GPU) -> ``"cpu"``."""
    if not gpu_name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def _load_report_module(name: str = "report"):
    # benchmarks/ is a directory of pytest files and scripts, not a package: load a report module from its path.
    spec = importlib.util.spec_from_file_location(f"packnet_bench_{name}", BENCH_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise OSError(f"cannot load {BENCH_DIR / f'{name}.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_command(json_path: Path, keyword: str | None, stage: str = "layers") -> list[str]:
    """The pytest command line of a pytest-benchmark ``stage`` ("layers" or "models")."""
    files = [str(BENCH_DIR / name) for name in STAGE_FILES[stage]]
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"]
    command += [f"--benchmark-json={json_path}", "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
    if keyword:
        command += ["-k", keyword]
    return command


# Stages run as scripts that rewrite their JSON case by case (a run cut short keeps what it measured), with the module
# whose ``write_report(json_path)`` reports them.
SCRIPT_STAGES = {"headline": "headline_report", "tiles": "tiles", "mixed": "mixed", "host": "host"}


def headline_command(json_path: Path, args: argparse.Namespace, stage: str = "headline") -> list[str]:
    """The command line of a script stage (:data:`SCRIPT_STAGES`), writing ``json_path`` case by case."""
    command = [sys.executable, str(BENCH_DIR / f"{stage}.py"), "--json", str(json_path)]
    if stage == "headline":
        command += ["--dtypes", args.dtypes]
    if args.budget_s is not None:
        command += ["--budget-s", str(args.budget_s)]
    if args.quick:
        command.append("--quick")
    return command


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run(args: argparse.Namespace) -> int:
    """Run each requested stage and write ``<out>/<device>-<date>-<stage>.{json,md,png}``; returns the worst exit
    status of the stages (0 when every one passed).

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
    stem = f"{device_slug(_gpu_name())}-{datetime.date.today().isoformat()}"
    worst = 0
    for stage in args.stage or STAGES:
        json_path = out_dir / f"{stem}-{stage}.json"
        if json_path.exists():
            log.warning("overwriting %s", json_path)
        if stage in SCRIPT_STAGES:
            status = _run_script_stage(stage, json_path, args, env)
        else:
            status = _run_pytest_stage(stage, json_path, args, env)
        worst = max(worst, status)
    return worst


def _run_script_stage(stage: str, json_path: Path, args: argparse.Namespace, env: dict) -> int:
    command = headline_command(json_path, args, stage)
    log.info("running %s", " ".join(command))
    status = subprocess.call(command, cwd=REPO_ROOT, env=env)
    if not json_path.is_file():
        log.error("the %s stage wrote no results (exit status %d)", stage, status)
        return status or 1
    if status:
        log.warning("the %s stage exited with status %d; reporting the cases it measured", stage, status)
    for path in (json_path, *_load_report_module(SCRIPT_STAGES[stage]).write_report(json_path)):
        print(path)
    return status


def _run_pytest_stage(stage: str, json_path: Path, args: argparse.Namespace, env: dict) -> int:
    with tempfile.TemporaryDirectory(prefix="packnet-bench-") as scratch:
        raw = Path(scratch) / "results.json"
        command = pytest_command(raw, args.keyword, stage)
        log.info("running %s", " ".join(command))
        status = subprocess.call(command, cwd=REPO_ROOT, env=env)
        if status not in (0, 1):  # 1: some benchmark failed; the others' results are still worth writing
            log.error("the %s stage: pytest exited with status %d; no results written", stage, status)
            return status
        if not raw.is_file():
            log.error("the %s stage: pytest wrote no benchmark JSON (no benchmark ran)", stage)
            return status or 1
        if status == 1:
            log.warning("the %s stage: some benchmarks failed; writing the results of those that ran", stage)
        shutil.copyfile(raw, json_path)
    written = _load_report_module().write_report(json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png"))
    for path in (json_path, *written.values()):
        print(path)
    return status
