"""Whole packed models at batch 1, eager and as CUDA graphs, against their dense twins (issue 26, item 5).

    python benchmarks/graphs.py (--out DIR | --json FILE) [--quick] [--budget-s SECONDS] [--warm]

ResNet-50 (224 x 224 images, channels_last) and a 12-layer BERT-base encoder (128 tokens of hidden states), random
weights, fp16, every conv and linear layer packed for 3 tasks by nested magnitude pruning (half of what reaches a
task is released), task 2 served; norms stay unfused in both forms. Per model:

- ``packed_eager_ms`` / ``dense_eager_ms``: one eager forward between CUDA events (median), the packed model
  (``model(x, task=2)``: launch plans, direct launches) and its dense twin (a plain copy with task 2's weights
  pre-masked: cuDNN/cuBLAS). At batch 1 both are mostly host time. Target: packed within 1.3x of dense.
- ``packed_graph_ms`` / ``dense_graph_ms``: the replay of one captured forward (``packnet.cuda_graphs``, and a plain
  ``torch.cuda.CUDAGraph`` of the dense twin); ``packed_kernels_ms``: the sum of the GPU kernels of one eager packed
  forward (``torch.profiler``). Target: the replay at the kernels' sum.
- ``packed_host_us_per_layer``: the eager forward's time to return (no synchronisation: what the host spends) over
  its packed layers, beside the dense twin's per layer.

Kernels run untuned (``AUTOTUNE = False``: one compile per kernel variant instead of tuning each of ResNet-50's
shapes); the results say so. The last case tries ``torch.compile(mode="reduce-overhead")`` on a packed BERT layer:
whether Inductor takes our Triton ops into its CUDA graphs, and its replay time. Outputs are checked against the
dense twin first. Without CUDA (``--quick``): tiny models on the reference path, eager times only (smoke).
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402
import timing  # noqa: E402

NUM_TASKS = 3
TASK = 2
PRUNE_RATIO = 0.5
# (name, builder kwargs, input shape) at full size and for the CPU smoke run.
MODELS = {
    "resnet50": ({"width": 1.0}, (1, 3, 224, 224)),
    "bert_base_encoder": ({"layers": 12, "width": 1.0}, (1, 128, 768)),
}
QUICK_MODELS = {
    "resnet50": ({"width": 1 / 16}, (1, 3, 32, 32)),
    "bert_base_encoder": ({"layers": 2, "width": 1 / 12}, (1, 8, 64)),
}
EAGER_TARGET = 1.3


def build(name: str, kwargs: dict, shape: tuple, device: str, dtype: torch.dtype):
    """``(packed, dense twin, input)``: the model with random weights, its packed copy for task ``TASK`` and a plain
    copy holding task ``TASK``'s weights pre-masked."""
    torch.manual_seed(0)
    if name == "resnet50":
        base = models.ResNet50(**kwargs).to(device).eval()
        models.calibrate_batchnorm(base, torch.randn(8, *shape[1:], device=device))
    else:
        base = models.BertEncoder(**kwargs).to(device).eval()
    task_ids = models.magnitude_ids(base, NUM_TASKS, PRUNE_RATIO)
    base = base.to(dtype)
    memory_format = torch.channels_last if len(shape) == 4 and device == "cuda" else torch.contiguous_format
    packed = models.packed_copy(base, task_ids, NUM_TASKS, backend="auto")
    dense = models.dense_copies(base, task_ids, NUM_TASKS)[TASK - 1]
    if len(shape) == 4:
        packed, dense = packed.to(memory_format=memory_format), dense.to(memory_format=memory_format)
    x = torch.randn(shape, device=device).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=memory_format)
    return packed, dense, x


def host_ms(forward, device: str, calls: int = 20) -> float:
    """Median time for ``forward()`` to return, not waiting for the GPU (the host's part), after the GPU caught up
    with each previous call (so the queue never throttles the host)."""
    samples = []
    for _ in range(calls):
        timing.synchronize(device)
        start = time.perf_counter()
        forward()
        samples.append((time.perf_counter() - start) * 1e3)
    timing.synchronize(device)
    return statistics.median(samples)


def kernels_ms(forward) -> float | None:
    """The summed GPU time of the kernels one ``forward()`` runs (``torch.profiler``), or None where it cannot tell."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            forward()
            torch.cuda.synchronize()
        total_us = sum(event.self_device_time_total for event in profiler.key_averages())
    except Exception:  # noqa: BLE001 - a profiler that cannot run here leaves the figure out, not the run
        return None
    return total_us / 1e3 if total_us else None


def replay_ms(replay) -> float:
    """Median GPU time of ``replay()`` between CUDA events."""
    replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return statistics.median(samples)


def dense_graph_replay(dense, x):
    """A plain CUDA graph of ``dense(x)`` (warmed up on a side stream); returns its ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            dense(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense(x)
    return graph.replay


def measure_model(name: str, kwargs: dict, shape: tuple, device: str, dtype: torch.dtype, warm: bool) -> dict:
    import packnet

    packed, dense, x = build(name, kwargs, shape, device, dtype)
    packed_layers = sum(isinstance(m, (packnet.PackedLinear, packnet.PackedConv2d)) for m in packed.modules())
    row = {"model": name, "input": list(shape), "dtype": str(dtype).removeprefix("torch."), "task": TASK}
    row["packed_layers"] = packed_layers
    with torch.no_grad():
        expected = dense(x).float()
        got = packed(x, task=TASK).float()
        if warm:
            return row
        row["error"] = timing.normwise_error(got, expected)
        smoke = device != "cuda"
        row["packed_eager_ms"] = timing.latency(lambda i: packed(x, task=TASK), device, smoke=smoke)["median_ms"]
        row["dense_eager_ms"] = timing.latency(lambda i: dense(x), device, smoke=smoke)["median_ms"]
        row["eager_ratio"] = row["packed_eager_ms"] / row["dense_eager_ms"]
        row["eager_target"] = EAGER_TARGET
        calls = 3 if smoke else 20
        row["packed_host_us_per_layer"] = host_ms(lambda: packed(x, task=TASK), device, calls) * 1e3 / packed_layers
        row["dense_host_us_per_layer"] = host_ms(lambda: dense(x), device, calls) * 1e3 / packed_layers
        if device != "cuda":
            return row
        row["packed_kernels_ms"] = kernels_ms(lambda: packed(x, task=TASK))
        row["dense_kernels_ms"] = kernels_ms(lambda: dense(x))
        graphed = packnet.cuda_graphs(packed, x, [TASK], batch_sizes=[x.shape[0]])
        replayed = graphed(x, task=TASK).float()
        row["graph_error"] = timing.normwise_error(replayed, got)
        row["packed_graph_ms"] = replay_ms(graphed._graphs[(x.shape[0], TASK)].replay)
        row["packed_graph_call_ms"] = timing.latency(lambda i: graphed(x, task=TASK), device)["median_ms"]
        row["dense_graph_ms"] = replay_ms(dense_graph_replay(dense, x))
        if row["packed_kernels_ms"]:
            row["graph_over_kernels"] = row["packed_graph_ms"] / row["packed_kernels_ms"]
    return row


def reduce_overhead_probe(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """``torch.compile(mode="reduce-overhead")`` of one packed BERT layer: does it compile and replay our ops, and
    at what time against the eager call."""
    import packnet

    row = {"model": "bert_layer_reduce_overhead", "task": TASK}
    kwargs, shape = (QUICK_MODELS if quick else MODELS)["bert_base_encoder"]
    packed, dense, x = build("bert_base_encoder", {**kwargs, "layers": 1}, shape, device, dtype)
    try:
        packnet.set_task(packed, TASK)
        compiled = torch.compile(packed, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            eager = packed(x)
            started = time.perf_counter()
            for _ in range(3):  # compile, record, replay
                got = compiled(x)
            row["compile_s"] = time.perf_counter() - started
            row["error"] = timing.normwise_error(got.float(), eager.float())
            row["compiled_ms"] = timing.latency(lambda i: compiled(x), device, smoke=device != "cuda")["median_ms"]
            row["eager_ms"] = timing.latency(lambda i: packed(x), device, smoke=device != "cuda")["median_ms"]
        row["works"] = True
    except Exception as error:  # noqa: BLE001 - the finding is whether it works; the reason is recorded
        row["works"] = False
        row["failure"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        row["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    return row


def markdown(results: dict) -> str:
    device = results["device"]
    lines = [
        "# Whole packed models at batch 1: eager and CUDA graphs against dense twins",
        "",
        f"{device.get('gpu_name') or device.get('cpu')}; torch {device['torch']}, triton {device['triton']};"
        f" kernels {'autotuned' if results['autotune'] else 'untuned (default configs)'}; task {TASK} of"
        f" {NUM_TASKS}.",
        "",
        "| model | packed eager (ms) | dense eager (ms) | ratio (target <= 1.3) | packed graph (ms) | packed kernels"
        " (ms) | graph / kernels | dense graph (ms) | host us per layer (packed / dense) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(value, digits=3):
        return "" if value is None else f"{value:.{digits}f}"

    for row in results["results"]:
        if "packed_eager_ms" not in row:
            continue
        lines.append(
            f"| {row['model']} | {cell(row['packed_eager_ms'])} | {cell(row['dense_eager_ms'])} |"
            f" {cell(row['eager_ratio'], 2)} | {cell(row.get('packed_graph_ms'))} |"
            f" {cell(row.get('packed_kernels_ms'))} | {cell(row.get('graph_over_kernels'), 2)} |"
            f" {cell(row.get('dense_graph_ms'))} | {cell(row['packed_host_us_per_layer'], 1)} /"
            f" {cell(row['dense_host_us_per_layer'], 1)} |"
        )
    for row in results["results"]:
        if row["model"] == "bert_layer_reduce_overhead":
            if row["works"]:
                lines += [
                    "",
                    f"torch.compile(mode='reduce-overhead') of one packed BERT layer: works, {row['compiled_ms']:.3f}"
                    f" ms against {row['eager_ms']:.3f} ms eager (compile {row['compile_s']:.0f} s).",
                ]
            else:
                lines += [
                    "",
                    f"torch.compile(mode='reduce-overhead') of one packed BERT layer failed: {row['failure']}",
                ]
    if results["device"]["device"] != "cuda":
        lines += ["", "**CPU smoke run: reference path, not kernel numbers.**"]
    return "\n".join(lines) + "\n"


def write_report(json_path: str | Path) -> list[Path]:
    """``<json>.md`` beside the results."""
    return timing.markdown_report(json_path, markdown)


def main(argv=None) -> int:
    args, path = timing.stage_arguments(
        argv,
        __doc__.split("\n\n")[0],
        "graphs.json",
        "tiny models (a CPU smoke run)",
        "start no new case after this many seconds",
    )
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    autotune = False
    try:
        from packnet_kernels import conv2d, linear
    except ImportError:  # no triton: the reference path runs
        kernel_modules = []
    else:
        kernel_modules = [linear, conv2d]
    saved = [module.AUTOTUNE for module in kernel_modules]
    for module in kernel_modules:
        module.AUTOTUNE = autotune
    try:
        return _run(args, path, started, device, quick, dtype, autotune)
    finally:
        for module, value in zip(kernel_modules, saved, strict=True):
            module.AUTOTUNE = value


def _run(args, path: Path, started: float, device: str, quick: bool, dtype: torch.dtype, autotune: bool) -> int:
    results = {"device": timing.device_info(device), "autotune": autotune, "results": [], "skipped": []}
    status = 0
    for name, (kwargs, shape) in (QUICK_MODELS if quick else MODELS).items():
        if time.perf_counter() - started > args.budget_s:
            results["skipped"].append(name)
            continue
        try:
            row = measure_model(name, kwargs, shape, device, dtype, args.warm)
        except Exception as error:  # noqa: BLE001 - one model's failure is recorded; the next still runs
            row = {"model": name, "failure": f"{type(error).__name__}: {error}"}
            row["traceback_tail"] = traceback.format_exc().splitlines()[-8:]
            status = 1
        results["results"].append(row)
        timing.write_json(path, results)
        print({key: value for key, value in row.items() if key != "traceback_tail"}, flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None
    if not args.warm and time.perf_counter() - started <= args.budget_s:
        row = reduce_overhead_probe(device, dtype, quick)
        results["results"].append(row)
        print({key: value for key, value in row.items() if key != "traceback_tail"}, flush=True)
    elif not args.warm:
        results["skipped"].append("bert_layer_reduce_overhead")
    timing.write_json(path, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
