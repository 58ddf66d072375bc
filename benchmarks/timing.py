"""Timing helpers shared by the benchmarks: device facts, rotated buffers, medians, measured limits, rooflines.

On CUDA a latency is the median of CUDA-event intervals around single calls, after a warm-up, each call reading the
next of several buffer sets so that the L2 cache (50 MB on an H100) cannot keep a small layer's weight and input
between calls. On the CPU it is the median of ``time.perf_counter`` intervals. The functions timed take the rotation
index ``i`` and must pick their tensors with ``i % n``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Milliseconds of measured calls per latency; lower it (PACKNET_BENCH_REP_MS) to shorten a run.
REP_MS = float(os.environ.get("PACKNET_BENCH_REP_MS", "40"))
WARMUP_MS = 10.0
MIN_REPS, MAX_REPS = 5, 300
# A latency whose interquartile range exceeds this fraction of its median is flagged unstable (clock changes, another
# process, a noisy neighbour); the reports say so beside the row rather than letting its ratios pass as measured.
UNSTABLE_SPREAD = 0.10
# Rotated buffer sets span this many L2 caches, so each call finds its operands evicted. The CPU subset only
# exercises the rotation (its timings are not the point), so it keeps few sets.
L2_SPAN = 4
MAX_ROTATIONS = {"cuda": 32, "cpu": 4}
# CUDA-graph timing: calls captured per graph (at least) and replays timed.
GRAPH_MIN_CALLS = 8
GRAPH_REPLAYS = 7
# Buffers of the measured limits: a copy far larger than L2, and a matmul large enough to saturate the tensor cores.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 32 << 20}
MATMUL_SIZE = {"cuda": 8192, "cpu": 384}


def device_info(device: str) -> dict:
    """Device name, library versions and cache size: the facts every result states."""
    import importlib.util

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    info = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu_name=props.name,
            sm_count=props.multi_processor_count,
            l2_bytes=int(getattr(props, "L2_cache_size", 50 << 20)),
            fp32_matmul_precision=torch.get_float32_matmul_precision(),
        )
    else:
        info.update(gpu_name=None, cpu=platform.processor() or platform.machine(), l2_bytes=8 << 20)
    return info


def rotation_count(bytes_per_set: int, l2_bytes: int, device: str) -> int:
    """How many buffer sets to cycle through so that together they span ``L2_SPAN`` L2 caches (1 for big sets)."""
    return max(1, min(MAX_ROTATIONS[device], math.ceil(L2_SPAN * l2_bytes / max(1, bytes_per_set))))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def call_each_once(methods: dict[str, Callable[[int], object]], device: str) -> None:
    """A ``--warm`` run's case: every method's ``fn(0)`` once (compiling its kernels), untimed and unchecked."""
    for fn in methods.values():
        fn(0)
    synchronize(device)


def median_ms(fn: Callable[[int], object], device: str, *, rep_ms: float = REP_MS, smoke: bool = False) -> float:
    """Median latency of ``fn(i)`` in milliseconds (see :func:`latency_samples`)."""
    return statistics.median(latency_samples(fn, device, rep_ms=rep_ms, smoke=smoke))


def latency(fn: Callable[[int], object], device: str, *, rep_ms: float = REP_MS, smoke: bool = False) -> dict:
    """``{"median_ms", "spread", "unstable"}`` of ``fn(i)``'s latency (see :func:`latency_samples` and
    :func:`relative_spread`)."""
    samples = latency_samples(fn, device, rep_ms=rep_ms, smoke=smoke)
    spread = relative_spread(samples)
    return {"median_ms": statistics.median(samples), "spread": spread, "unstable": spread > UNSTABLE_SPREAD}


def relative_spread(samples: list[float]) -> float:
    """Interquartile range over median: 0.05 means the middle half of the samples lie within 5 % of the median's
    width. 0 for fewer than 2 samples."""
    if len(samples) < 2:
        return 0.0
    first, _, third = statistics.quantiles(samples, n=4, method="inclusive")
    middle = statistics.median(samples)
    return (third - first) / middle if middle > 0 else 0.0


def latency_samples(
    fn: Callable[[int], object], device: str, *, rep_ms: float = REP_MS, smoke: bool = False
) -> list[float]:
    """Latencies of single calls of ``fn(i)`` in milliseconds over about ``rep_ms`` of calls, after a warm-up.

    ``fn(i)`` is called with increasing ``i`` (the rotation index). On CUDA each call sits between two events on the
    current stream and nothing synchronises in between, so the interval is what the GPU spent on the call plus any
    launch gap the host could not hide (part of an eager op's real latency at batch 1). ``smoke=True`` (pytest-benchmark
    disabled, as in CI) runs the same code with two measured calls and no warm-up.
    """
    calls = 0

    def call() -> None:
        nonlocal calls
        fn(calls)
        calls += 1

    # The first call may compile or autotune; an estimate from the next ones sets the warm-up and measured calls.
    call()
    estimate_calls = 1 if smoke else 3
    synchronize(device)
    start = time.perf_counter()
    for _ in range(estimate_calls):
        call()
    synchronize(device)
    estimate_ms = max((time.perf_counter() - start) * 1e3 / estimate_calls, 1e-3)
    warmup = 0 if smoke else max(1, min(MAX_REPS, int(WARMUP_MS / estimate_ms)))
    for _ in range(warmup):
        call()
    reps = 2 if smoke else max(MIN_REPS, min(MAX_REPS, int(rep_ms / estimate_ms)))
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize()
        for begin, end in events:
            begin.record()
            call()
            end.record()
        torch.cuda.synchronize()
        samples = [begin.elapsed_time(end) for begin, end in events]
    else:
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


def graph_latency(fn, rotations: int) -> dict:
    """``{"median_ms", "spread"}``: GPU time of one call from CUDA-graph replays of ``calls`` consecutive rotated calls
    (median, and interquartile range over median, of ``GRAPH_REPLAYS`` replays)."""
    calls = max(GRAPH_MIN_CALLS, rotations)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up on a side stream, as capture requires
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(GRAPH_REPLAYS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / calls)
    del graph
    return {"median_ms": statistics.median(samples), "spread": relative_spread(samples)}


def latency_row(fn: Callable[[int], object], device: str, rotations: int, rep_ms: float = 25.0) -> dict:
    """A benchmark row's times of ``fn(i)``: ``event_ms``/``event_spread`` (:func:`latency`) and, on CUDA,
    ``graph_ms``/``graph_spread`` (:func:`graph_latency`; None elsewhere); ``unstable`` when the time a report quotes
    (the graph time where there is one) spreads more than ``UNSTABLE_SPREAD``. Off CUDA the event time is a smoke
    measurement (two calls, no warm-up): a CPU run times the reference path or the interpreter, never a kernel, and
    its report says so."""
    event = latency(fn, device, rep_ms=rep_ms, smoke=device != "cuda")
    graph = graph_latency(fn, rotations) if device == "cuda" else {"median_ms": None, "spread": None}
    quoted = graph["spread"] if device == "cuda" else event["spread"]
    return {
        "event_ms": event["median_ms"],
        "event_spread": event["spread"],
        "graph_ms": graph["median_ms"],
        "graph_spread": graph["spread"],
        "unstable": quoted > UNSTABLE_SPREAD,
    }


def format_us(ms: float | None) -> str:
    """A time in milliseconds as microseconds with the unit, ``-`` when not measured."""
    return "-" if ms is None else f"{ms * 1e3:.1f} us"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a run stopped at any moment leaves the
    previous complete file (the scripts rewrite their results after every case)."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-write: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise


def markdown_report(json_path: str | Path, markdown: Callable[[dict], str]) -> list[Path]:
    """Write ``markdown(results)`` of the results in ``json_path`` to ``<json>.md`` beside it; returns that path."""
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(json.loads(json_path.read_text(encoding="utf-8"))), encoding="utf-8")
    return [md_path]


def stage_arguments(argv, description: str, file_name: str, quick_help: str, budget_help: str):
    """``(args, path)`` of a script stage's command line: ``--out DIR`` (results in ``DIR/file_name``) or ``--json
    FILE``, ``--quick``, ``--budget-s`` and ``--warm``; the results file's directory is created."""
    parser = argparse.ArgumentParser(description=description)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help=f"directory for {file_name}")
    target.add_argument("--json", help="the results file (instead of --out)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--budget-s", type=float, default=1e9, help=budget_help)
    parser.add_argument(
        "--warm",
        action="store_true",
        help="only call every method of every case once, untimed and unchecked: fills Triton's on-disk cache "
        "(compiled kernels) from a separate process before the timed run",
    )
    args = parser.parse_args(argv)
    path = Path(args.json) if args.json else Path(args.out) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return args, path


def synced_calls(fn: Callable[[int], object], device: str) -> Callable[[], object]:
    """A no-argument callable for pytest-benchmark: the next rotated call of ``fn``, then a device synchronise, so
    that the wall time pytest-benchmark measures includes the GPU work and not just the launch."""
    counter = iter(range(1 << 62))

    def run() -> object:
        out = fn(next(counter))
        synchronize(device)
        return out

    return run


def measure_limits(device: str, dtypes, smoke: bool = False) -> dict:
    """The measured ceilings of this device, in the same process as the benchmarks.

    ``copy_gbps``: bytes read plus bytes written per second by a device-to-device copy far larger than L2.
    ``matmul_tflops[dtype name]``: a large square matmul (cuBLAS on CUDA; for fp32 with the TF32 setting in force,
    as for every fp32 benchmark).
    """
    copy_ms = median_ms(copy_fn(device), device, smoke=smoke)
    limits = {"copy_gbps": 2 * COPY_BYTES[device] / copy_ms / 1e6, "matmul_tflops": {}}
    size = MATMUL_SIZE[device]
    for dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        matmul_ms = median_ms(lambda i, a=a, b=b: a @ b, device, smoke=smoke)
        limits["matmul_tflops"][str(dtype).removeprefix("torch.")] = 2 * size**3 / matmul_ms / 1e9
    limits["copy_bytes"] = COPY_BYTES[device]
    limits["matmul_size"] = size
    return limits


def copy_fn(device: str) -> Callable[[int], object]:
    """``fn(i)``: copy a fresh random fp32 buffer of ``COPY_BYTES[device]`` bytes into another."""
    source = torch.randn(COPY_BYTES[device] // 4, device=device)
    target = torch.empty_like(source)
    return lambda i: target.copy_(source)


def roofline(flops: int, traffic_bytes: int, ms: float, dtype: torch.dtype, limits: dict) -> dict:
    """Achieved rates and the fraction of the binding limit: the memory limit (measured copy bandwidth) when moving
    ``traffic_bytes`` takes longer than doing ``flops`` at the measured matmul rate, the compute limit otherwise."""
    memory_ms = traffic_bytes / (limits["copy_gbps"] * 1e6)
    compute_ms = flops / (limits["matmul_tflops"][str(dtype).removeprefix("torch.")] * 1e9)
    return {
        "gbps": traffic_bytes / ms / 1e6,
        "tflops": flops / ms / 1e9,
        "bound": "memory" if memory_ms >= compute_ms else "compute",
        "limit_fraction": max(memory_ms, compute_ms) / ms,
    }


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64: one number robust to the sizes of large layers."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
