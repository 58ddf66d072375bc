"""The headline GPU benchmark: the layers and methods the README quotes, timed two ways, written case by case.

    python benchmarks/headline.py (--out DIR | --json FILE) [--budget-s SECONDS] [--dtypes fp16,bf16] [--quick]

Layers: linear VGG-16 fc6 (25088->4096), 4096->4096 and a transformer MLP up projection (4096->11008) at batch 1,
16, 256 and 4096; a 3x3, a 1x1 and a depthwise 3x3 conv at batch 1 and 64. Each is packed for 3 tasks by nested
magnitude pruning (50 %, then 50 % of the rest) and queried for task 1 and task 3 (the last). Methods:

- ``packnet``: ``packnet_kernels.masked_linear``/``masked_conv2d`` (the fused Triton kernel);
- ``packnet_tilemap``: the same with the layer's tile map and free weights declared zero, as a ``PackedLinear`` or
  ``PackedConv2d`` calls it (tiles a task does not use are skipped; tiles whose owners it all sees read no ids);
- ``packnet_compact``: that path on the compact run-time ids a ``PackedLinear`` or ``PackedConv2d`` holds on a GPU
  since kernel v8 (2 bits per weight for 3 tasks, decoded a word at a time; ``packnet_kernels.id_layout``); not for
  the depthwise conv, whose kernel reads bytes;
- ``packnet_nomask``: the same kernel with its predicate compiled out (the Triton-vs-cuBLAS/cuDNN gap);
- ``dense_masking``: ``F.linear(x, W * mask_t)`` with ``mask_t`` precomputed in the weight's dtype (the user's
  default, what ``torch.nn.utils.prune`` does in one line);
- ``dense_masking_ids``: the mask recomputed from the ids every call (``where((ids != 0) & (ids <= t), W, 0)``), a
  weaker baseline;
- ``torch_prune``: an ``nn.Linear``/``nn.Conv2d`` under ``torch.nn.utils.prune.custom_from_mask``;
- ``premasked``: one masked dense copy per task kept in memory, cuBLAS/cuDNN on it (T times the memory): the ceiling.

Every method's output is first checked against a float64 reference (normwise relative error). Then two times:
``event_ms``, the median CUDA-event interval around single eager calls (host launch gaps included, each call reading
the next of several buffer sets so that L2 cannot hold them), and ``graph_ms``, the same calls captured in a CUDA
graph and replayed (pure GPU time), each with its spread (interquartile range over median; a row whose quoted time
spreads more than ``timing.UNSTABLE_SPREAD`` is marked ``unstable``). For ``packnet``, ``host_us`` is the host time
to issue one call; for the three packed methods, ``config`` is the config the autotuner chose for the case. The
measured copy bandwidth and matmul rate come first. Results go to ``DIR/headline.json`` (or ``--json FILE``),
rewritten after every case, so a run stopped by a time limit keeps what it measured; ``--budget-s`` stops starting
new cases after that many seconds.

``--warm --shard I/N`` only runs the packed kernels once per case (compiling and autotuning them), for filling
Triton's on-disk cache from several processes before the timed run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shapes  # noqa: E402
import timing  # noqa: E402

from packnet.pruning import magnitude_task_ids  # noqa: E402
from packnet_kernels import compact_task_ids, interpreter_enabled, masked_conv2d, masked_linear, tile_map  # noqa: E402
from packnet_kernels._checks import conv_reads_compact_ids  # noqa: E402
from packnet_kernels.reference import effective_weight, task_mask  # noqa: E402

NUM_TASKS, PRUNE_RATIO = 3, 0.5
TASKS = (1, NUM_TASKS)
METHODS = (
    "packnet",
    "packnet_tilemap",
    "packnet_compact",
    "packnet_nomask",
    "dense_masking",
    "dense_masking_ids",
    "torch_prune",
    "premasked",
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Normwise relative error allowed against the float64 reference (fp32 runs TF32 dots, like cuBLAS with TF32 on).
MAX_ERROR = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 5e-3}


LINEAR_BATCHES = (1, 16, 256, 4096)
CONV_BATCHES = (1, 64)
# (layer shape, batches), named as in the committed results.
LAYERS = (
    (shapes.linear_shape("vgg16.fc6", 25088, 4096), LINEAR_BATCHES),
    (shapes.linear_shape("linear.4096", 4096, 4096), LINEAR_BATCHES),
    (shapes.linear_shape("mlp.up.4096-11008", 4096, 11008), LINEAR_BATCHES),
    (shapes.conv_shape("resnet50.conv3x3.256@14", 256, 256, 3, 14), CONV_BATCHES),
    (shapes.conv_shape("resnet50.conv1x1.1024-256@14", 1024, 256, 1, 14), CONV_BATCHES),
    (shapes.conv_shape("mobilenetv2.dw3x3.192@28", 192, 192, 3, 28, groups=192), CONV_BATCHES),
)
QUICK_LAYERS = (
    (shapes.linear_shape("tiny.linear", 96, 80), (1, 20)),
    (shapes.conv_shape("tiny.conv", 16, 24, 3, 9), (1, 2)),
    (shapes.conv_shape("tiny.dw", 16, 16, 3, 9, groups=16), (1,)),
)


class LayerSets:
    """Rotated weight sets of one layer: a random weight per set, its task ids, the weight with free entries zeroed
    (as in a pack), and channels-last copies: the cuDNN methods' fastest layout and, for a conv, the packed layer's
    K-contiguous layout on CUDA."""

    def __init__(self, layer: shapes.LayerShape, dtype: torch.dtype, device: str, count: int):
        fan_in = math.prod(layer.weight_shape[1:])
        generator = torch.Generator(device=device).manual_seed(sum(map(ord, layer.name)))
        self.weights, self.task_ids = [], []
        for _ in range(count):
            weight = (torch.randn(layer.weight_shape, generator=generator, device=device) / math.sqrt(fan_in)).to(dtype)
            ids = magnitude_task_ids(weight, NUM_TASKS, PRUNE_RATIO)
            self.weights.append(torch.where(ids != 0, weight, torch.zeros((), dtype=dtype, device=device)))
            self.task_ids.append(ids)
        layout = torch.channels_last if layer.op == "conv2d" and device == "cuda" else torch.contiguous_format
        self.dense_weights = [w.contiguous(memory_format=layout) for w in self.weights]
        self.dense_ids = [ids.contiguous(memory_format=layout) for ids in self.task_ids]
        self.tile_maps = [tile_map(ids).contiguous() for ids in self.task_ids]
        # What a PackedLinear or PackedConv2d reads on a GPU since kernels v8, where its kernel reads compact ids.
        per_group = (layer.in_ch // layer.groups, layer.out_ch // layer.groups, layer.groups)
        compact = layer.op == "linear" or conv_reads_compact_ids(*per_group)
        self.compact_ids = [compact_task_ids(ids, NUM_TASKS) for ids in self.dense_ids] if compact else []


def build_methods(layer: shapes.LayerShape, sets: LayerSets, xs: list, task: int) -> dict:
    """``{method: fn(i)}``; ``fn(i)`` runs the method on rotation ``i % len(xs)``."""
    n = len(xs)
    conv = layer.op == "conv2d"
    args = layer.conv_args() if conv else ()

    def dense(x, weight):
        return F.conv2d(x, weight, None, *args) if conv else F.linear(x, weight)

    packed_op = masked_conv2d if conv else masked_linear
    if conv:
        from packnet_kernels.conv2d import masked_conv2d_triton as raw_kernel
    else:
        from packnet_kernels.linear import masked_linear_triton as raw_kernel
    masks = [task_mask(ids, task).to(w.dtype) for w, ids in zip(sets.dense_weights, sets.dense_ids, strict=True)]
    premasked = [effective_weight(w, ids, task) for w, ids in zip(sets.dense_weights, sets.dense_ids, strict=True)]
    zero = torch.zeros((), dtype=sets.weights[0].dtype, device=sets.weights[0].device)
    modules = []
    for weight, ids in zip(sets.dense_weights, sets.dense_ids, strict=True):
        factory = {"device": weight.device, "dtype": weight.dtype}
        if conv:
            module = nn.Conv2d(layer.in_ch, layer.out_ch, layer.kernel, layer.stride, layer.padding,
                               groups=layer.groups, bias=False, **factory)  # fmt: skip
        else:
            module = nn.Linear(layer.in_ch, layer.out_ch, bias=False, **factory)
        module.weight = nn.Parameter(weight.clone(), requires_grad=False)
        modules.append(prune.custom_from_mask(module, "weight", task_mask(ids, task)))

    def ids_mask(i):
        ids = sets.dense_ids[i % n]
        return torch.where((ids != 0) & (ids <= task), sets.dense_weights[i % n], zero)

    def mapped(ids_sets):
        """The packed layer's call: the tile map, free weights declared zero, ids of ``ids_sets`` (bytes or compact)."""

        def call(i):
            weight, ids, cells = sets.dense_weights[i % n], ids_sets[i % n], sets.tile_maps[i % n]
            return packed_op(xs[i % n], weight, ids, task, None, *args, tile_map=cells, free_weights_zero=True)

        return call

    methods = {
        # The packed layer's own layout on CUDA: K-contiguous conv weights and ids (channels_last memory).
        "packnet": lambda i: packed_op(xs[i % n], sets.dense_weights[i % n], sets.dense_ids[i % n], task, None, *args),
        # Free weights are zero in every set (LayerSets zeroes them), as a packed layer checks before passing this.
        "packnet_tilemap": mapped(sets.dense_ids),
        "packnet_compact": mapped(sets.compact_ids),
        "packnet_nomask": lambda i: raw_kernel(
            xs[i % n], sets.dense_weights[i % n], sets.dense_ids[i % n], task, None, *args, use_mask=False
        ),
        "dense_masking": lambda i: dense(xs[i % n], sets.dense_weights[i % n] * masks[i % n]),
        "dense_masking_ids": lambda i: dense(xs[i % n], ids_mask(i)),
        "torch_prune": lambda i: modules[i % n](xs[i % n]),
        "premasked": lambda i: dense(xs[i % n], premasked[i % n]),
    }
    if not sets.compact_ids:
        del methods["packnet_compact"]
    if not xs[0].is_cuda and not interpreter_enabled():
        del methods["packnet_nomask"]  # the raw kernel runs only on CUDA or under TRITON_INTERPRET=1
    return methods


def host_us(fn, calls: int = 50) -> float:
    """Host time to issue one call: back-to-back calls with no synchronisation (the launch queue does not fill in
    ``calls`` calls), after the device is idle."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def tuned_config(call) -> str | None:
    """The autotuned config a packed kernel call launched with (CUDA, autotuning on), as Triton prints a config: every
    autotuner of the packed kernels forgets its last choice, ``call()`` runs, and the one that ran tells its choice
    (None when none or several did)."""
    from packnet_kernels import conv2d, linear

    major = torch.cuda.get_device_capability()[0]
    tuners = [linear._tuned_kernel(regime, major) for regime in ("small", "large", "mixed")]
    tuners += [conv2d._gpu_kernel(kernel) for kernel in ("gemm", "direct")]
    for tuner in tuners:
        tuner.best_config = None
    call()
    chosen = [str(tuner.best_config) for tuner in tuners if tuner.best_config is not None]
    return chosen[0] if len(chosen) == 1 else None


def traffic_bytes(layer: shapes.LayerShape, batch: int, element: int, method: str) -> int:
    """Compulsory DRAM traffic: x, W and y; the ids for the packed kernel; the mask and a written-then-read masked
    copy for the methods that materialise it."""
    numel = math.prod(layer.weight_shape)
    gemm = (math.prod(layer.input_shape(batch)) + math.prod(layer.output_shape(batch)) + numel) * element
    if method in ("packnet", "packnet_tilemap"):  # the tile map's savings depend on the task: the reports show them
        return gemm + numel
    if method == "packnet_compact":  # 2-bit ids for 3 tasks (rows padded to whole 256-column steps)
        return gemm + layer.weight_shape[0] * -(-numel // layer.weight_shape[0] // 256) * 256 // 4
    if method in ("packnet_nomask", "premasked"):
        return gemm
    if method == "dense_masking_ids":
        return gemm + numel * (element + 1 + element)
    return gemm + numel * (3 * element)  # W and an fp mask read, the masked copy written (then read by the GEMM)


def run_case(layer, dtype, batch, task, sets, device, rotations, warm_only) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(batch * 1000 + task)
    layout = torch.channels_last if layer.op == "conv2d" and device == "cuda" else torch.contiguous_format
    xs = [
        torch.randn(layer.input_shape(batch), generator=generator, device=device)
        .to(dtype)
        .contiguous(memory_format=layout)
        for _ in range(rotations)
    ]
    methods = build_methods(layer, sets, xs, task)
    if warm_only:
        for method in ("packnet", "packnet_tilemap", "packnet_compact", "packnet_nomask"):
            if method in methods:
                methods[method](0)
        return []
    references = {}

    def reference(for_task):
        """Float64 output on rotation 0 with task ``for_task``'s weight (the raw weight for the no-mask kernel)."""
        if for_task not in references:
            weight = effective_weight(sets.weights[0].double(), sets.task_ids[0], for_task)
            if layer.op == "conv2d":
                references[for_task] = F.conv2d(xs[0].double(), weight, None, *layer.conv_args())
            else:
                references[for_task] = F.linear(xs[0].double(), weight)
        return references[for_task]

    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for method, fn in methods.items():
        row = {
            "layer": layer.name,
            "op": layer.op,
            "shape": list(layer.weight_shape),
            "dtype": str(dtype).removeprefix("torch."),
            "batch": batch,
            "task": task,
            "method": method,
            "flops": layer.flops(batch),
            "bytes": traffic_bytes(layer, batch, element, method),
        }
        try:
            out = fn(0)
            row["error"] = timing.normwise_error(out, reference(NUM_TASKS if method == "packnet_nomask" else task))
            row["ok"] = bool(row["error"] <= MAX_ERROR[dtype])
            if not row["ok"]:
                row["note"] = f"normwise error {row['error']:.2e} > {MAX_ERROR[dtype]:.0e}"
            row.update(timing.latency_row(fn, device, rotations))
            if method in ("packnet", "packnet_tilemap", "packnet_compact") and device == "cuda":
                row["host_us"] = host_us(fn)
            if method.startswith("packnet") and device == "cuda":
                row["config"] = tuned_config(lambda fn=fn: fn(0))
        except Exception as error:  # a failing method is a result too; the others still run
            row.update(ok=False, note=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
    return rows


def _summary_line(rows: list[dict]) -> str:
    """One case's line: the packed kernel's times with units (``-`` for what was not measured: graph and host times
    on the CPU) and its speed against dense masking and pre-masked dense (> 1x: packed is faster)."""
    by = {row["method"]: row for row in rows}
    first = rows[0]
    packed = by.get("packnet", {})
    key = "graph_ms" if packed.get("graph_ms") else "event_ms"

    def us(value, width=9):
        return f"{'-':>{width}}" if value is None else f"{value * 1e3:>{width - 3}.1f} us"

    def speed(method):
        other, own = by.get(method, {}).get(key), packed.get(key)
        return "    -" if not other or not own else f"{other / own:5.2f}x"

    host = packed.get("host_us")
    return (
        f"{first['layer']:30s} {first['dtype']:8s} b{first['batch']:<5d} t{first['task']} "
        f"packed event {us(packed.get('event_ms'))} graph {us(packed.get('graph_ms'))} "
        f"host {us(None if host is None else host / 1e3, 8)} | vs masking {speed('dense_masking')} "
        f"vs pre-masked {speed('premasked')} ({key.removesuffix('_ms')} times) | "
        f"{'ok' if all(row.get('ok') for row in rows) else 'FAILED'}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="directory for headline.json")
    target.add_argument("--json", help="the results file (instead of --out)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32")
    parser.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny layers (a CPU smoke run of the script)")
    parser.add_argument("--warm", action="store_true", help="only compile and autotune the packed kernels")
    parser.add_argument("--shard", default="0/1", help="I/N: this process runs every N-th case from I (with --warm)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    path = Path(args.json) if args.json else Path(args.out) / "headline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shard, shards = (int(part) for part in args.shard.split("/"))
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
    layers = QUICK_LAYERS if args.quick or device == "cpu" else LAYERS
    if args.layers:
        layers = tuple((layer, batches) for layer, batches in layers if layer.name in args.layers.split(","))
    info = timing.device_info(device)
    if device == "cuda":
        info["driver"] = _driver_version()
    result = {"device": info, "argv": sys.argv[1:], "results": [], "skipped": []}
    if not args.warm:
        result["limits"] = timing.measure_limits(device, dtypes)
        print(f"limits: copy {result['limits']['copy_gbps']:.0f} GB/s, matmul {result['limits']['matmul_tflops']}")
    case_index = 0
    for dtype in dtypes:
        for layer, batches in layers:
            sets = None
            for batch in batches:
                for task in TASKS:
                    case_index += 1
                    if args.warm and (case_index - 1) % shards != shard:
                        continue
                    if time.perf_counter() - started > args.budget_s:
                        result["skipped"].append([layer.name, str(dtype), batch, task])
                        continue
                    if sets is None:
                        per_set = math.prod(layer.weight_shape) * (torch.empty((), dtype=dtype).element_size() + 1)
                        count = timing.rotation_count(per_set, info["l2_bytes"], device)
                        sets = LayerSets(layer, dtype, device, count)
                    rows = run_case(layer, dtype, batch, task, sets, device, len(sets.weights), args.warm)
                    if rows:
                        result["results"].extend(rows)
                        print(_summary_line(rows), flush=True)
                        result["elapsed_s"] = time.perf_counter() - started
                        timing.write_json(path, result)
            del sets
            if device == "cuda":
                torch.cuda.empty_cache()
    if result["skipped"]:
        print(f"budget reached: {len(result['skipped'])} cases skipped")
    failed = [row for row in result["results"] if not row.get("ok")]
    for row in failed:
        print(f"FAILED {row['layer']} {row['dtype']} b{row['batch']} t{row['task']} {row['method']}: {row.get('note')}")
    return 1 if failed else 0


def _driver_version() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
