"""``packnet bench``: run the benchmark stages and write their results, a Markdown report and a plot each.

The suite is ``benchmarks/`` of a source checkout, in five stages, each run in a subprocess whose output goes to a log
file; results go to ``<out>/<device>-<YYYY-MM-DD>-<stage>.json`` with ``.md``, ``.log`` and ``.png`` (GPU runs only)
beside it. ``--out`` defaults to ``./packnet-bench`` under the current directory (never into the package or the
checkout's ``benchmarks/results/``, which holds the committed measurements), and files of an earlier run of the same
device, date and stage are overwritten only with ``--force``:

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

Stdout is a short table: per stage its result, what it measured, its wall time and its report; then the headline
stage's main rows with units. Ctrl-C stops the stage in progress and removes its files (the stages finished before it
keep theirs).
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
import time
from pathlib import Path

log = logging.getLogger("packnet.bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "benchmarks"
STAGES = ("headline", "layers", "models", "tiles", "mixed", "host")
# The pytest files of each pytest-benchmark stage.
STAGE_FILES = {"layers": ("test_layers.py", "test_host_path.py"), "models": ("test_models.py",)}
DEFAULT_OUT = "packnet-bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"directory for the results, created if missing (default: ./{DEFAULT_OUT} under the current directory)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the results of an earlier run of this device, date and stage"
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


def stage_files(out_dir: Path, stem: str, stage: str) -> list[Path]:
    """Every file a stage may write: results, report, plot, its output log and the results' temporary file."""
    base = out_dir / f"{stem}-{stage}"
    return [base.with_suffix(suffix) for suffix in (".json", ".md", ".png", ".log", ".tmp")]


def _run_logged(command: list[str], log_path: Path, env: dict) -> int:
    """Run ``command`` from the checkout's root with stdout and stderr into ``log_path``; returns its exit status.
    On Ctrl-C the child (which the terminal interrupted too) is given 10 s to stop, then killed."""
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            return process.wait()
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


def run(args: argparse.Namespace) -> int:
    """Run each requested stage and write ``<out>/<device>-<date>-<stage>.{json,md,png,log}``; print a table of
    what each measured. Returns the worst exit status of the stages (0 when every one passed).

    Raises:
        OSError: no ``benchmarks/`` directory (an installed package without its source checkout), ``--out`` not a
            writable directory. FileExistsError: a result of this device, date and stage is in ``--out`` already and
            ``--force`` was not given.
    """
    if not (BENCH_DIR / "conftest.py").is_file():
        raise OSError(f"the benchmark suite is not at {BENCH_DIR}: run `packnet bench` from a source checkout")
    # Absolute: the stages run from the checkout's root, not from the caller's directory.
    shown, out_dir = args.out, Path(os.path.abspath(args.out))
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {shown} exists and is not a directory")
    stages = list(dict.fromkeys(args.stage or STAGES))
    gpu_name = _gpu_name()
    stem = f"{device_slug(gpu_name)}-{datetime.date.today().isoformat()}"
    if not args.force:
        for stage in stages:
            for path in stage_files(out_dir, stem, stage):
                if path.exists():
                    raise FileExistsError(
                        f"--out {shown}: {path.name} exists (an earlier {stage} run on this device today); pass"
                        " --force to overwrite it, or give another --out"
                    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {shown} is not writable")
    env = dict(os.environ)
    if args.quick:
        env["PACKNET_BENCH_QUICK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
    from tqdm.auto import tqdm

    rows, worst, headline = [], 0, None
    # A bar on a terminal only (stderr), naming the stage running; the table goes to stdout at the end.
    bar = tqdm(stages, desc="packnet bench", unit="stage", disable=None, leave=False)
    for stage in bar:
        bar.set_postfix_str(stage)
        files = stage_files(out_dir, stem, stage)
        for path in files:  # --force: nothing of the earlier run may be mistaken for this one's
            path.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            if stage in SCRIPT_STAGES:
                status, report = _run_script_stage(stage, files[0], args, env)
            else:
                status, report = _run_pytest_stage(stage, files[0], args, env)
        except BaseException:
            for path in files:  # an interrupted stage leaves nothing half-written
                path.unlink(missing_ok=True)
            raise
        elapsed = time.perf_counter() - started
        worst = max(worst, status)
        results = _read_json(files[0])
        if stage == "headline" and results:
            headline = results
        rows.append(
            [stage, _result(status, results), _measured(stage, results), f"{elapsed:.1f} s", _shown(report or files[3])]
        )
    bar.close()
    on = gpu_name or "CPU (the PyTorch reference path: not kernel numbers)"
    print(f"packnet bench on {on}, results in {_shown(out_dir)}/")
    print("\n".join(_format_table(["stage", "result", "measured", "wall time", "report"], rows)))
    if headline:
        print()
        print("\n".join(headline_table(headline)))
    return worst


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def _format_table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    """Aligned text lines, header first; columns ``right`` right-aligned, the others left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _result(status: int, results: dict | None) -> str:
    if results is None:
        return f"no results (exit {status})"
    failed = [row for row in results.get("results") or [] if row.get("ok") is False and row.get("method") != "bsr"]
    if failed:
        return f"{len(failed)} failed"
    if status == 1:
        return "some failed"
    return "ok" if status == 0 else f"cut short (exit {status})"


def _measured(stage: str, results: dict | None) -> str:
    """What a stage's results hold, counted in its own unit."""
    if not results:
        return "-"
    if "benchmarks" in results:  # pytest-benchmark
        return f"{len(results['benchmarks'])} benchmarks"
    rows = results.get("results") or []
    if stage == "headline":
        cases = {(row["layer"], row["dtype"], row["batch"], row["task"]) for row in rows}
    elif stage == "mixed":
        cases = {(row["batch"], row["tasks"]) for row in rows}
    else:  # tiles: the byte model's rows, and on a GPU the timed ones
        model = sum(len(entries) for entries in (results.get("byte_model") or {}).values())
        return f"{model} byte-model rows" + (f", {len(rows)} timings" if rows else "")
    skipped = len(results.get("skipped") or [])
    return f"{len(cases)} cases" + (f", {skipped} skipped" if skipped else "")


def _us(ms: float | None) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f} us"


def _speed(numerator: float | None, denominator: float | None) -> str:
    return "-" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


def headline_table(results: dict) -> list[str]:
    """The headline stage's main rows: the last task, the first dtype measured; packed, dense masking and pre-masked
    times with units and the packed kernel's speed against each (> 1x: packed is faster). GPU: CUDA-graph times;
    CPU: one eager call's wall-clock time."""
    rows = results.get("results") or []
    if not rows:
        return []
    on_gpu = (results.get("device") or {}).get("device") == "cuda"
    key = "graph_ms" if on_gpu else "event_ms"
    dtype, task = rows[0]["dtype"], max(row["task"] for row in rows)
    cases: dict = {}
    for row in rows:
        if row["dtype"] == dtype and row["task"] == task:
            cases.setdefault((row["layer"], row["batch"]), {})[row["method"]] = row.get(key)
    table = [
        [
            layer,
            str(batch),
            _us(times.get("packnet")),
            _us(times.get("dense_masking")),
            _us(times.get("premasked")),
            _speed(times.get("dense_masking"), times.get("packnet")),
            _speed(times.get("premasked"), times.get("packnet")),
        ]
        for (layer, batch), times in cases.items()
    ]
    header = ["layer", "batch", "packed", "dense masking", "pre-masked", "vs masking", "vs pre-masked"]
    timed = "CUDA-graph replay" if on_gpu else "one eager call on the CPU: a smoke run, not a measurement"
    title = f"headline, {dtype}, task {task} of {task}, time per call ({timed}; vs: > 1x means packed is faster):"
    return [title, *_format_table(header, table, right=tuple(range(1, len(header))))]


def _run_script_stage(stage: str, json_path: Path, args: argparse.Namespace, env: dict) -> tuple[int, Path | None]:
    command = headline_command(json_path, args, stage)
    log.info("running %s", " ".join(command))
    status = _run_logged(command, json_path.with_suffix(".log"), env)
    if not json_path.is_file():
        log.error(
            "the %s stage wrote no results (exit status %d); see %s", stage, status, json_path.with_suffix(".log")
        )
        return status or 1, None
    if status:
        log.warning("the %s stage exited with status %d; reporting the cases it measured", stage, status)
    written = _load_report_module(SCRIPT_STAGES[stage]).write_report(json_path)
    return status, next((path for path in written if str(path).endswith(".md")), None)


def _run_pytest_stage(stage: str, json_path: Path, args: argparse.Namespace, env: dict) -> tuple[int, Path | None]:
    with tempfile.TemporaryDirectory(prefix="packnet-bench-") as scratch:
        raw = Path(scratch) / "results.json"
        command = pytest_command(raw, args.keyword, stage)
        log.info("running %s", " ".join(command))
        status = _run_logged(command, json_path.with_suffix(".log"), env)
        if status not in (0, 1):  # 1: some benchmark failed; the others' results are still worth writing
            log.error("the %s stage: pytest exited with status %d; no results written", stage, status)
            return status, None
        if not raw.is_file():
            log.error("the %s stage: pytest wrote no benchmark JSON (no benchmark ran)", stage)
            return status or 1, None
        if status == 1:
            log.warning("the %s stage: some benchmarks failed; writing the results of those that ran", stage)
        shutil.copyfile(raw, json_path)
    written = _load_report_module().write_report(json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png"))
    return status, written.get("md")
