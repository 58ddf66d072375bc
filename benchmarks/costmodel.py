"""A cost model of the packed kernels, read from their compiled code and calibrated on measured GPU times.

    python benchmarks/costmodel.py features --source DIR --version V --out FILE [--triton-path DIR] [--dtype D]
    python benchmarks/costmodel.py calibrate --features FILE --measured RUN.json --out DIR
    python benchmarks/costmodel.py predict --features FILE --calibration CAL.json [--measured RUN.json [--check]]
                                           --out DIR

``features`` compiles, on the CPU, every kernel variant the headline benchmark's packed methods can launch: each
autotune config the version's launcher keeps (its own pruning and split-K plan, for 132 SMs), for each layer, batch
and method of ``benchmarks/headline.py``, for sm_90 (``tests/_codegen.py``), from the kernel sources in ``--source``
(a checkout of any kernel version: ``git worktree add /tmp/v6 103cbab``) with the Triton found first on
``--triton-path`` (the GPU machine's, 3.6: the calibration must read the code that ran). It records per variant its
main loops' SASS instructions per K step by kind, registers, shared memory and whether ptxas serialised its wgmma
(note C7515), and per case and config the grid, the steps per program and the bytes per step. ``calibrate`` fits the
model's parameters to a headline run's measured times (``graph_ms``, CUDA-graph replay) and reports its error per
case, overall and with each layer held out; ``predict`` applies a calibration to another version's (or dtype's)
features and, with ``--check``, compares with a run that measured them. Both write JSON and a Markdown table.

The model (:func:`resource_times`, :func:`combine`). A launch of ``P`` programs of ``W`` warps, each running ``S`` K
steps of ``I`` SASS instructions per warp, on an H200 (:data:`DEVICE`): the busiest SM runs ``ceil(P / 132)``
programs, ``occ`` of them at once (registers, shared memory, warps and blocks per SM). Three resource times:

- ``dram``: the compulsory bytes (weight, the ids the loop reads, input, output, split-K partials) over the run's
  measured copy bandwidth times ``dram_efficiency``;
- ``issue``: ``ceil(P / 132) x S x W x I`` instructions over the busiest SM's issue rate, ``clock x ipc`` per
  scheduler for the schedulers its resident warps keep busy (``min(4, W x min(occ, ceil(P / 132)))``);
- ``tensor``: the tiles' multiply-adds (padding included) on the busiest SM over its share of the run's measured
  cuBLAS rate (the depthwise kernel's FMAs are loop instructions: issue).

The time is the largest plus ``overlap`` times the others, plus ``launch_us``. Where ptxas serialised a kernel's
wgmma, a step's integer work and its wgmma run one after the other: issue and tensor add, as one term. The
autotuner keeps the fastest config, so a case's prediction is the smallest over the configs its launcher keeps
(run 4 did not record the configs it chose). The four parameters (:data:`PARAMETERS`) are fitted once for all cases,
by least squares on log times. Tried and dropped, because the fit drove them to their bounds (no case needed them):
an L2-to-SM bandwidth term and a per-step load-latency term over ``num_stages - 1`` steps in flight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The GPU of the calibration run (NVIDIA H200, sm_90): per-SM limits from the CUDA programming guide's table for
# compute capability 9.0; the boost clock is the datasheet's (the fitted ipc absorbs a lower sustained clock).
DEVICE = {
    "name": "NVIDIA H200",
    "sms": 132,
    "clock_hz": 1.98e9,
    "schedulers_per_sm": 4,
    "registers_per_sm": 65536,
    "register_granularity": 256,  # registers per warp are allocated in units of 256
    "shared_per_sm": 233472,  # 228 KB
    "shared_per_block_optin": 232448,  # 227 KB
    "shared_reserved_per_block": 1024,
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
}

# The headline benchmark's layers and batches (benchmarks/headline.py LAYERS; tests check they agree):
# (name, op, in, out, kernel, stride, padding, image size, groups, batches).
HEADLINE_LAYERS = (
    ("vgg16.fc6", "linear", 25088, 4096, 1, 1, 0, 0, 1, (1, 16, 256, 4096)),
    ("linear.4096", "linear", 4096, 4096, 1, 1, 0, 0, 1, (1, 16, 256, 4096)),
    ("mlp.up.4096-11008", "linear", 4096, 11008, 1, 1, 0, 0, 1, (1, 16, 256, 4096)),
    ("resnet50.conv3x3.256@14", "conv2d", 256, 256, 3, 1, 1, 14, 1, (1, 64)),
    ("resnet50.conv1x1.1024-256@14", "conv2d", 1024, 256, 1, 1, 0, 14, 1, (1, 64)),
    ("mobilenetv2.dw3x3.192@28", "conv2d", 192, 192, 3, 1, 1, 28, 192, (1, 64)),
)
NUM_TASKS = 3  # the headline packs: 3 tasks, nested 50 % magnitude pruning (unstructured)

# The packed methods of each kernel version and how they launch: (USE_MASK, tile map with free weights zero, id bits).
# A task of an unstructured pack owns weights in every tile, so with the map task 1 checks every step and the last
# task (3), which sees every owner, reads no ids: from v7 on its programs run the loop without ids (``raw``), in v6
# the same per-step loop as task 1.
METHODS = {
    "v6": {"packnet": (True, False, 8), "packnet_tilemap": (True, True, 8), "packnet_nomask": (False, False, 8)},
    "v7": {"packnet": (True, False, 8), "packnet_tilemap": (True, True, 8), "packnet_nomask": (False, False, 8)},
    "v8": {
        "packnet": (True, False, 8),
        "packnet_tilemap": (True, True, 8),
        "packnet_compact": (True, True, 2),
        "packnet_nomask": (False, False, 8),
    },
}
TASKS = (1, 3)
ELEMENT = 2  # bytes per fp16 or bf16 element
# Triton's pointer type of each dtype the features can be compiled for.
POINTER = {"float16": "*fp16", "bfloat16": "*bf16"}
TILE_CELL = (32, 32)
CHUNK_COLUMNS = 128  # packnet_kernels.id_layout.CHUNK_COLUMNS (the fields layout), kept here for older sources


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------- #
# features: what each variant's compiled code and each case's launch look like


class _Properties:
    """What ``device_properties`` returns on the H200, for the launchers' own plans and pruning."""

    multi_processor_count = DEVICE["sms"]
    shared_memory_per_block_optin = DEVICE["shared_per_block_optin"]
    major, minor = 9, 0


class _FakeTensor:
    """Enough of a tensor for the launchers' config pruning (device and dtype)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.device = None


def _row_words(columns: int, bits: int, groups: int, group: int, align_columns: int) -> int:
    """Words per row of compact ids (packnet_kernels.id_layout.compact_task_ids): each group packed on its own, a
    spare step for convs, padded to whole steps."""
    per_word = 32 // bits
    align = align_columns * bits // 32
    group_words = ceil_div(group, per_word)
    spare = align if groups > 1 else 0
    return ceil_div(max(groups * group_words, 1) + spare, align) * align


def _linear_candidates(linear, id_layout, layer: tuple, batch: int, method: tuple, dtype: str) -> list[dict]:
    """Every config the version's launcher keeps for one linear case, with the compile spec of each."""
    import torch

    name, _, k, n = layer[:4]
    use_mask, mapped, bits = method
    regime = linear.choose_regime(batch)
    split_k, k_per_split = linear._split_plan(batch, n, k, False, None)
    compact = use_mask and bits < 8
    # Since the fields layout (v8, third pass): the single-task loop on compact ids has its own configs, the weight
    # as it is and the ids' words read as bytes; before, the words and the weight's int32 pairs.
    fields = compact and hasattr(linear, "_field_configs")
    row_words = _row_words(k, bits, 1, k, id_layout.ROW_ALIGN_COLUMNS) if compact else 0
    cells = (ceil_div(n, TILE_CELL[0]), ceil_div(k, TILE_CELL[1]))
    named = {"x_ptr": _FakeTensor(getattr(torch, dtype)), "tile_map_ptr": object() if mapped else None, "M": batch}
    if fields:
        family = linear._configs(f"{regime}-fields{bits}", 9)
        configs = linear._prune_configs(family, named, MIXED=False, TASK=1, ID_BITS=bits)
    else:
        configs = linear._prune_configs(linear._configs(regime, 9), named, MIXED=False)
    args = {
        "x_ptr": POINTER[dtype],
        "w_ptr": "*i32" if compact and not fields else POINTER[dtype],
        "ids_ptr": "*i32" if compact else "*u8",
        "bias_ptr": None,
        "scale_ptr": None,
        "shift_ptr": None,
        "y_ptr": POINTER[dtype],
        "partials_ptr": "*fp32" if split_k > 1 else None,
        "counters_ptr": "*i32" if split_k > 1 else None,
        "tile_map_ptr": "*u8" if mapped else None,
        "row_tasks_ptr": None,
        "row_order_ptr": None,
        "M": batch,
        "N": n,
        "K": k,
        "active_task": NUM_TASKS,
        "k_per_split": k_per_split,
        "m_bucket": linear._m_bucket(batch),
        "max_task": 0,
        "stride_map_plane": cells[0] * cells[1] if mapped else 0,
        "stride_map_row": cells[1] if mapped else 0,
        "stride_xm": k,
        "stride_xk": 1,
        "stride_wn": k // 2 if compact and not fields else k,
        "stride_wk": 1,
        "stride_idn": row_words * (4 if fields else 1) if compact else k,
        "stride_idk": 1,
        "stride_bias": 0,
        "stride_scale": 0,
        "stride_shift": 0,
        "stride_bias_task": 0,
        "stride_scale_task": 0,
        "stride_shift_task": 0,
        "stride_ym": n,
        "stride_yn": 1,
    }
    flags = {
        "HAS_BIAS": False,
        "HAS_SCALE": False,
        "HAS_SHIFT": False,
        "RELU": False,
        "USE_MASK": use_mask,
        "TILE_MAP": mapped,
        "RAW_TILES": mapped,
        "CELL_N": TILE_CELL[0],
        "CELL_K": TILE_CELL[1],
        "SPLIT": split_k > 1,
        "UPCAST_BF16": False,
        "INPUT_PRECISION": "tf32",
        "MIXED": False,
        "SEGMENTS": 1,
        "ID_BITS": bits if use_mask else 8,
        "USE_ASM": True,
        # The compiled-in task of the fields loop (any task compiles the same instructions; linear.LinearPlan).
        "TASK": 1 if fields else 0,
    }
    if hasattr(linear, "whole_chunks"):
        # Inputs of whole chunks: no K step checks its columns (trees before it compile the checks).
        flags["EVEN_K"] = linear.whole_chunks(k)
    candidates = []
    for config in configs:
        tile = config.kwargs
        block_n, block_m, block_k = tile["BLOCK_N"], tile["BLOCK_M"], tile["BLOCK_K"]
        tiles = ceil_div(n, block_n) * ceil_div(batch, block_m)
        candidates.append(
            {
                "config": dict(tile, num_warps=config.num_warps, num_stages=config.num_stages),
                "spec": _spec(linear._masked_linear_kernel, "linear", "_masked_linear_kernel", args, flags, config),
                "programs": tiles * split_k,
                "steps": ceil_div(k_per_split, block_k),
                # K steps one iteration of the checked loop runs (the fields loop: a 128-column chunk).
                "chunk_steps": CHUNK_COLUMNS // block_k if fields else 1,
                "split_k": split_k,
                # Bytes one step's loads bring to the SM: the weight and id tiles, the batch rows that exist.
                "step_bytes": {
                    "weight": block_n * block_k * ELEMENT,
                    "ids": block_n * block_k * (bits if use_mask else 0) // 8,
                    "activations": block_k * min(block_m, batch) * ELEMENT,
                },
                "flops_per_step": 2 * block_n * block_m * block_k,
            }
        )
    return candidates


def _conv_candidates(conv2d, id_layout, layer: tuple, batch: int, method: tuple, dtype: str) -> list[dict]:
    """Every config the version's launcher keeps for one conv case, with the compile spec of each."""
    import torch

    name, _, cin, cout, kernel, stride, padding, size, groups = layer[:9]
    use_mask, mapped, bits = method
    cin_g, cout_g = cin // groups, cout // groups
    out_size = (size + 2 * padding - kernel) // stride + 1
    pixels = batch * out_size * out_size
    direct = conv2d._uses_direct_kernel(groups, cin_g, cout_g)
    if bits < 8 and direct:
        return []  # the headline runs no compact-id method for a kernel that reads bytes (the depthwise one)
    mapped = mapped and not direct and conv2d.tile_map_applies(cin_g, cout_g, groups)
    compact = use_mask and bits < 8

    def strides(prefix, shape):
        tensor = torch.empty(shape, device="meta").contiguous(memory_format=torch.channels_last)
        dims = "nchw" if prefix in "xo" else "ochw"
        return {f"stride_{prefix}{d}": s for d, s in zip(dims, conv2d.kernel_strides(tensor), strict=True)}

    args = {
        "x_ptr": POINTER[dtype],
        "w_ptr": POINTER[dtype],
        "ids_ptr": "*i32" if compact else "*u8",
        "bias_ptr": None,
        "scale_ptr": None,
        "shift_ptr": None,
        "out_ptr": POINTER[dtype],
        "active_task": NUM_TASKS,
        "total_pixels": pixels,
        "m_bucket": conv2d._row_bucket(pixels),
        "in_h": size,
        "in_w": size,
        "out_h": out_size,
        "out_w": out_size,
        "cin_per_group": cin_g,
        "cout_per_group": cout_g,
        **strides("x", (batch, cin, size, size)),
        **strides("w", (cout, cin_g, kernel, kernel)),
        **strides("i", (cout, cin_g, kernel, kernel)),
        **strides("o", (batch, cout, out_size, out_size)),
        "conv_stride_h": stride,
        "conv_stride_w": stride,
        "pad_top": padding,
        "pad_left": padding,
        "dilation_h": 1,
        "dilation_w": 1,
        "out_channels": cout,
        "tile_map_ptr": "*u8" if mapped else None,
        # the mixed batch's arguments of every kernel version (v6's and v7's image tasks, the later pixel tiles)
        "image_tasks_ptr": None,
        "image_order_ptr": None,
        "pixel_tiles_ptr": None,
        "max_task": 0,
        "stride_bias_task": 0,
        "stride_scale_task": 0,
        "stride_shift_task": 0,
    }
    if compact:
        group_words = ceil_div(cin_g, 32 // bits)
        row_words = _row_words(kernel * kernel * cin_g, bits, kernel * kernel, cin_g, id_layout.ROW_ALIGN_COLUMNS)
        args.update(stride_io=row_words, stride_ic=0, stride_ih=kernel * group_words, stride_iw=group_words)
    if mapped:
        cells = (ceil_div(cout, TILE_CELL[0]), ceil_div(kernel * kernel * cin_g, TILE_CELL[1]))
        args.update(stride_map_plane=cells[0] * cells[1], stride_map_row=cells[1])
    else:
        args.update(stride_map_plane=0, stride_map_row=0)
    flags = {
        "KH": kernel,
        "KW": kernel,
        "USE_MASK": use_mask,
        "HAS_BIAS": False,
        "HAS_SCALE": False,
        "HAS_SHIFT": False,
        "APPLY_RELU": False,
        "TAPS_OUTER": cin_g >= conv2d._TAPS_OUTER_MIN_CHANNELS,
        "TILE_MAP": mapped,
        "RAW_TILES": mapped,
        "CELL_N": TILE_CELL[0],
        "CELL_K": TILE_CELL[1],
        "MIXED": False,
        "SEGMENTS": 1,
        "CHANNELS_INNER": True,
        "UPCAST_DOT": False,
        "INPUT_PRECISION": "tf32",
        "ID_BITS": bits,
        "USE_ASM": True,
    }
    kernel_name = "direct" if direct else "gemm"
    jit = getattr(conv2d, f"_masked_conv2d_{kernel_name}_kernel")
    named = {"x_ptr": _FakeTensor(getattr(torch, dtype))}
    configs = conv2d._prune_configs(conv2d._configs(kernel_name), named, TAPS_OUTER=flags["TAPS_OUTER"], MIXED=False)
    candidates = []
    for config in configs:
        tile = config.kwargs
        block_m, block_n = tile["BLOCK_M"], tile["BLOCK_N"]
        if direct:
            # One input channel per output channel (depthwise): the tap loop is the main loop, one tap per step.
            programs = ceil_div(pixels, block_m) * ceil_div(cout, block_n)
            steps = cin_g * kernel * kernel
            step_bytes = {"weight": block_n * ELEMENT, "ids": block_n if use_mask else 0,
                          "activations": block_m * block_n * ELEMENT}  # fmt: skip
            flops = 2 * block_m * block_n
        else:
            block_k = tile["BLOCK_K"]
            programs = ceil_div(pixels, block_m) * ceil_div(cout_g, block_n) * groups
            steps = kernel * kernel * ceil_div(cin_g, block_k)
            step_bytes = {
                "weight": block_k * block_n * ELEMENT,
                "ids": block_k * block_n * (bits if use_mask else 0) // 8,
                "activations": block_m * block_k * ELEMENT,
            }
            flops = 2 * block_m * block_n * block_k
        candidates.append(
            {
                "config": dict(tile, num_warps=config.num_warps, num_stages=config.num_stages),
                "spec": _spec(jit, "conv2d", jit.fn.__name__, args, flags, config, direct=direct),
                "programs": programs,
                "steps": steps,
                "split_k": 1,
                "step_bytes": step_bytes,
                "flops_per_step": flops,
            }
        )
    return candidates


def _spec(jit, module: str, kernel: str, args: dict, flags: dict, config, direct: bool = False) -> dict:
    """A ``tests/_codegen.compile_variant`` spec with only the arguments this version's kernel takes."""
    names = set(jit.arg_names)
    constexprs = {key: value for key, value in {**flags, **config.kwargs}.items() if key in names}
    return {
        "module": module,
        "kernel": kernel,
        "args": {key: value for key, value in args.items() if key in names and key not in constexprs},
        "constexprs": constexprs,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "arch": 90,
        "ptxas_notes": True,
        "fma_loop": direct,
    }


def _codegen():
    """``tests/_codegen.py``, the compile-and-read machinery of the codegen tests."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import _codegen

    return _codegen


def _compile(spec: dict) -> dict:
    """``tests/_codegen.compile_variant`` in a worker; the depthwise kernel's main loop holds FMAs, not tensor-core
    instructions, so for it ``FFMA`` counts as the loop's arithmetic (``loops[i]["kinds"]["tensor"]``)."""
    codegen = _codegen()
    spec = dict(spec)
    fma_loop = spec.pop("fma_loop", False)
    tensor_kinds = set(codegen.SASS_KINDS["tensor"])
    if fma_loop:
        codegen.SASS_KINDS["tensor"] = tensor_kinds | {"FFMA"}
    try:
        summary = codegen.compile_variant(spec)
    finally:
        codegen.SASS_KINDS["tensor"] = tensor_kinds
    summary["loops"] = [
        {"instructions": loop["instructions"], "kinds": dict(loop["kinds"])} for loop in summary["loops"]
    ]
    summary["load_bytes"] = {str(width): count for width, count in summary["load_bytes"].items()}
    return summary


def _slim(spec: dict, summary: dict) -> dict:
    """What the features file keeps of a variant: its kernel and constants, resources, loops and ptxas's notes."""
    if "error" in summary:
        return {"kernel": spec["kernel"], "constexprs": spec["constexprs"], "error": summary["error"]}
    return {
        "kernel": spec["kernel"],
        "constexprs": spec["constexprs"],
        "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"],
        "fma_loop": spec["fma_loop"],
        "registers": summary["registers"],
        "shared": summary["shared"],
        "stack": summary["stack"],
        "serialized_wgmma": summary.get("serialized_wgmma", 0),
        "load_bytes": summary["load_bytes"],
        "loops": [{"instructions": loop["instructions"], "kinds": loop["kinds"]} for loop in summary["loops"]],
    }


def _spec_key(spec: dict, kernel) -> str:
    """What the compiled code depends on: the kernel, its launch specialisation (argument types, constants, 16-byte
    divisibility: the values themselves do not enter it) and the warps and stages. Layers of one shape class share a
    variant."""
    types, constants, attrs = _codegen().signature(kernel, spec["args"], spec["constexprs"])
    specialisation = (spec["kernel"], types, sorted(constants.items()), sorted(attrs.items()))
    return json.dumps([specialisation, spec["num_warps"], spec["num_stages"], spec["fma_loop"]], default=str)


def collect_features(
    source: Path,
    version: str,
    dtype: str = "float16",
    jobs: int = 2,
    progress: bool = True,
    only=None,
    methods=None,
    max_configs=None,
) -> dict:
    """Compile every variant of ``version``'s headline cases from the kernels in ``source`` (already first on
    ``sys.path``) and return the features file's content (module docstring). ``only`` (``{(layer, batch)}``),
    ``methods`` and ``max_configs`` (the first configs of each case) narrow it, for a quick check."""
    import multiprocessing
    import subprocess
    from concurrent.futures import ProcessPoolExecutor

    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    from packnet_kernels import _checks, conv2d, linear

    try:
        from packnet_kernels import id_layout
    except ImportError:  # before v8: no compact ids
        id_layout = None
    for module in (linear, conv2d, _checks):
        module.device_properties = lambda device: _Properties
    if not str(Path(linear.__file__).resolve()).startswith(str(source.resolve())):
        raise RuntimeError(f"packnet_kernels came from {linear.__file__}, not from --source {source}")

    cases, specs = [], {}
    for layer in HEADLINE_LAYERS:
        name, op = layer[:2]
        for batch in layer[-1]:
            if only is not None and (name, batch) not in only:
                continue
            for method, launch in METHODS[version].items():
                if methods is not None and method not in methods:
                    continue
                build = _linear_candidates if op == "linear" else _conv_candidates
                module = linear if op == "linear" else conv2d
                candidates = build(module, id_layout, layer, batch, launch, dtype)[:max_configs]
                if not candidates:
                    continue
                for candidate in candidates:
                    spec = candidate.pop("spec")
                    key = _spec_key(spec, getattr(module, spec["kernel"]))
                    specs.setdefault(key, spec)
                    candidate["variant"] = key
                cases.append({"layer": name, "op": op, "batch": batch, "method": method, "dtype": dtype,
                              "launch": dict(zip(("use_mask", "tile_map", "id_bits"), launch, strict=True)),
                              "candidates": candidates})  # fmt: skip

    keys = sorted(specs)
    summaries = {}
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc=f"compiling {version} {dtype}", unit="variant")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(_compile, specs[key]) for key in keys}
        for key, future in futures.items():
            try:
                summaries[key] = future.result()
            except Exception as error:  # a variant that does not compile is never launched: recorded, not fitted
                summaries[key] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    # Short ids for the variants: the file stays readable and each case names its variants.
    ids = {key: f"{version}-{index:03d}" for index, key in enumerate(keys)}
    variants = {ids[key]: _slim(specs[key], summaries[key]) for key in keys}
    for case in cases:
        for candidate in case["candidates"]:
            candidate["variant"] = ids[candidate["variant"]]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {
        "version": version,
        "source_commit": commit.strip(),
        "triton": triton.__version__,
        "dtype": dtype,
        "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
        "device": DEVICE,
        "cases": cases,
        "variants": variants,
    }


# --------------------------------------------------------------------------------------------------------------- #
# the model

# Fitted parameters: (name, starting value, lower bound, upper bound, what it is).
PARAMETERS = (
    ("dram_efficiency", 0.9, 0.3, 1.0, "fraction of the measured copy bandwidth the kernel's compulsory bytes reach"),
    ("ipc", 0.5, 0.05, 1.0, "SASS instructions a busy scheduler issues per cycle in a main loop"),
    ("overlap", 0.2, 0.0, 1.0, "share of the non-limiting resource times that adds to the limiting one"),
    ("launch_us", 3.0, 0.0, 20.0, "fixed time per launch (start, pipeline fill, epilogue, drain), microseconds"),
)
PARAMETER_NAMES = tuple(parameter[0] for parameter in PARAMETERS)
TERMS = ("dram", "issue", "tensor")


def occupancy(registers: int, shared: int, warps: int, device: dict = DEVICE) -> int:
    """Programs of ``warps`` warps an SM holds at once with ``registers`` per thread and ``shared`` bytes each
    (registers are given out per warp in units of ``register_granularity``; each block also reserves 1 KB)."""
    granule = device["register_granularity"]
    per_warp = ceil_div(max(registers, 1) * 32, granule) * granule
    by_registers = device["registers_per_sm"] // per_warp // warps
    by_shared = device["shared_per_sm"] // (shared + device["shared_reserved_per_block"])
    by_warps = device["max_warps_per_sm"] // warps
    return max(0, min(by_registers, by_shared, by_warps, device["max_blocks_per_sm"]))


def _layer(name: str) -> tuple:
    return next(layer for layer in HEADLINE_LAYERS if layer[0] == name)


def _id_bytes_per_weight(layer_name: str, bits: int) -> float:
    """Id bytes per weight a checked loop reads: 1 for uint8 ids, compact words (rows padded) else."""
    if bits >= 8:
        return 1.0
    name, op, cin, cout, kernel, _, _, _, groups = _layer(layer_name)[:9]
    columns = cin // groups * kernel * kernel
    taps = 1 if op == "linear" else kernel * kernel
    return _row_words(columns, bits, taps, columns // taps, 256) * 4 / columns


def compulsory_bytes(layer_name: str, batch: int, id_bits: int, split_k: int) -> float:
    """DRAM bytes a launch cannot avoid: the weight, the ids it reads (``id_bits`` per weight, 0 for none), the input
    and the output once, and split-K's fp32 partials written and read back."""
    name, op, cin, cout, kernel, stride, padding, size, groups = _layer(layer_name)[:9]
    if op == "linear":
        weights, inputs, outputs = cin * cout, batch * cin, batch * cout
    else:
        out_size = (size + 2 * padding - kernel) // stride + 1
        weights = cout * (cin // groups) * kernel * kernel
        inputs, outputs = batch * cin * size * size, batch * cout * out_size * out_size
    ids = weights * _id_bytes_per_weight(layer_name, id_bits) if id_bits else 0.0
    partials = 2 * 4 * split_k * outputs if split_k > 1 else 0
    return (weights + inputs + outputs) * ELEMENT + ids + partials


def case_rows(features: dict, tasks=TASKS) -> list[dict]:
    """One row per (case, task, config) with what :func:`resource_times` needs.

    Which loop runs: the headline packs are unstructured, so every tile holds weights of every task. The last task
    sees every owner: with the tile map and free weights declared zero its tiles read no ids, and from v7 on its
    programs run the kernel's second, raw loop (the shorter of two main loops); task 1 runs the checked loop."""
    rows = []
    for case in features["cases"]:
        for task in tasks:
            for candidate in case["candidates"]:
                variant = features["variants"][candidate["variant"]]
                if "error" in variant or not variant["loops"]:
                    continue  # never launched: the launcher's pruning and the compiler agree
                constants = variant["constexprs"]
                raw = constants.get("TILE_MAP", False) and task == NUM_TASKS
                loops = sorted(variant["loops"], key=lambda loop: loop["instructions"])
                loop = loops[0] if raw else loops[-1]
                # Instructions per K step: the fields loop runs a chunk of them per iteration.
                per_step = 1 if raw else candidate.get("chunk_steps", 1)
                id_bits = constants.get("ID_BITS", 8) if constants["USE_MASK"] and not raw else 0
                config = candidate["config"]
                rows.append(
                    {
                        "layer": case["layer"],
                        "batch": case["batch"],
                        "method": case["method"],
                        "task": task,
                        "config": config,
                        "variant": candidate["variant"],
                        "programs": candidate["programs"],
                        "steps": candidate["steps"],
                        "warps": config["num_warps"],
                        "occupancy": occupancy(variant["registers"], variant["shared"], config["num_warps"]),
                        "instructions": loop["instructions"] / per_step,
                        "serialized": bool(variant["serialized_wgmma"]),
                        # The depthwise kernel's FMAs are instructions of its loop (issue), not tensor-core work.
                        "flops_per_step": 0 if variant["fma_loop"] else candidate["flops_per_step"],
                        "dram_bytes": compulsory_bytes(case["layer"], case["batch"], id_bits, candidate["split_k"]),
                    }
                )
    return rows


def resource_times(row: dict, params: dict, limits: dict, device: dict = DEVICE) -> dict:
    """Seconds per resource (:data:`TERMS`) for one config of one case (module docstring). The busiest SM runs
    ``ceil(P / SMs)`` programs; its schedulers issue for the warps it holds (a 2-warp program alone on an SM keeps 2
    of its 4 schedulers busy)."""
    sms = device["sms"]
    busiest = ceil_div(row["programs"], sms)
    resident = min(max(row["occupancy"], 1), busiest)
    schedulers = min(device["schedulers_per_sm"], row["warps"] * resident)
    steps = busiest * row["steps"]
    return {
        "dram": row["dram_bytes"] / (limits["copy_bps"] * params["dram_efficiency"]),
        "issue": steps * row["warps"] * row["instructions"] / (schedulers * device["clock_hz"] * params["ipc"]),
        "tensor": steps * row["flops_per_step"] / (limits["matmul_flops"] / sms),
    }


def combine(times: dict, serialized: bool, params: dict) -> float:
    """The limiting time plus ``overlap`` times the others, plus ``launch_us`` (seconds). With serialised wgmma a
    step's integer work and tensor work run one after the other: they add, as one term."""
    times = dict(times)
    if serialized:
        times["issue"] += times.pop("tensor")
    largest = max(times.values())
    return largest + params["overlap"] * (sum(times.values()) - largest) + params["launch_us"] * 1e-6


def limiting_term(row: dict, params: dict, limits: dict) -> str:
    times = resource_times(row, params, limits)
    if row["serialized"]:
        times["issue+tensor"] = times.pop("issue") + times.pop("tensor")
    return max(times, key=times.get)


def predict_rows(rows: list[dict], params: dict, limits: dict) -> dict:
    """``{(layer, batch, method, task): (seconds, row)}``: per case the config the model finds fastest (the autotuner
    keeps the fastest) and its time."""
    best = {}
    for row in rows:
        seconds = combine(resource_times(row, params, limits), row["serialized"], params)
        key = (row["layer"], row["batch"], row["method"], row["task"])
        if key not in best or seconds < best[key][0]:
            best[key] = (seconds, row)
    return best


def run_limits(run: dict, dtype: str = "float16") -> dict:
    """A headline run's measured limits: copy bandwidth (bytes read + written per second), matmul rate (flop/s)."""
    limits = run["limits"]
    return {"copy_bps": limits["copy_gbps"] * 1e9, "matmul_flops": limits["matmul_tflops"][dtype] * 1e12}


def measured_times(run: dict, methods, dtype: str = "float16") -> dict:
    """``{(layer, batch, method, task): seconds}``: a headline run's CUDA-graph replay times (pure GPU time) of the
    given methods, for rows that matched the reference."""
    return {
        (row["layer"], row["batch"], row["method"], row["task"]): row["graph_ms"] * 1e-3
        for row in run["results"]
        if row["dtype"] == dtype and row["method"] in methods and row.get("graph_ms") and row.get("ok", False)
    }


def fit(rows: list[dict], measured: dict, limits: dict, starts: int = 3) -> dict:
    """The parameters that minimise a robust (soft-L1) sum of squared log errors over ``measured``'s cases, within
    :data:`PARAMETERS`' bounds, best of ``starts`` starting points (the minimum over configs makes the loss piecewise
    smooth). Needs scipy."""
    import numpy as np
    from scipy.optimize import least_squares

    lower = np.array([parameter[2] for parameter in PARAMETERS])
    upper = np.array([parameter[3] for parameter in PARAMETERS])
    keys = sorted(measured)
    wanted = set(keys)
    rows = [row for row in rows if (row["layer"], row["batch"], row["method"], row["task"]) in wanted]
    missing = wanted - {(row["layer"], row["batch"], row["method"], row["task"]) for row in rows}
    if missing:
        raise ValueError(f"no compiled variant for {len(missing)} measured cases, e.g. {sorted(missing)[0]}")

    def residuals(vector):
        predicted = predict_rows(rows, dict(zip(PARAMETER_NAMES, vector, strict=True)), limits)
        return np.array([math.log(predicted[key][0] / measured[key]) for key in keys])

    generator = np.random.default_rng(0)
    best = None
    for start in range(starts):
        if start == 0:
            x0 = np.array([parameter[1] for parameter in PARAMETERS])
        else:
            x0 = lower + (upper - lower) * generator.uniform(0.1, 0.9, size=len(PARAMETERS))
        result = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=0.1, diff_step=1e-3)
        if best is None or result.cost < best.cost:
            best = result
    return dict(zip(PARAMETER_NAMES, (float(value) for value in best.x), strict=True))


def median(values) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def calibrate(features: dict, run: dict, cross_validate: bool = True) -> dict:
    """Fit the model to a run's measured times of the packed methods of ``features``' version (in the features'
    dtype) and report it: the parameters, per case measured and predicted time, error, limiting term and config, the
    median and 90th-percentile absolute error, and (``cross_validate``) the same median when each layer is predicted
    by a fit to the other layers.

    Raises:
        ValueError: the run has no measured case of the version's methods, or a measured case has no variant.
    """
    dtype = features.get("dtype", "float16")
    limits = run_limits(run, dtype)
    measured = measured_times(run, METHODS[features["version"]], dtype)
    if not measured:
        raise ValueError(f"the measured run has no {dtype} times of {sorted(METHODS[features['version']])}")
    rows = case_rows(features)
    params = fit(rows, measured, limits)
    predicted = predict_rows(rows, params, limits)
    cases = []
    for key in sorted(measured):
        seconds, row = predicted[key]
        cases.append(
            {
                "layer": key[0],
                "batch": key[1],
                "method": key[2],
                "task": key[3],
                "measured_us": measured[key] * 1e6,
                "predicted_us": seconds * 1e6,
                "error": seconds / measured[key] - 1,
                "limit": limiting_term(row, params, limits),
                "config": row["config"],
            }
        )
    errors = sorted(abs(case["error"]) for case in cases)
    report = {
        "version": features["version"],
        "triton": features["triton"],
        "source_commit": features["source_commit"],
        "device": run["device"],
        "dtype": dtype,
        "limits": limits,
        "params": params,
        "parameters": {name: doc for name, _, _, _, doc in PARAMETERS},
        "median_error": median(errors),
        "p90_error": errors[int(0.9 * (len(errors) - 1))],
        "cases": cases,
    }
    if cross_validate:
        held_out = []
        for layer in sorted({key[0] for key in measured}):
            train = {key: value for key, value in measured.items() if key[0] != layer}
            layer_params = fit(rows, train, limits, starts=1)
            layer_predicted = predict_rows(rows, layer_params, limits)
            held_out += [abs(layer_predicted[key][0] / measured[key] - 1) for key in measured if key[0] == layer]
        report["held_out_layer_median_error"] = median(held_out)
    return report


def predict(features: dict, calibration: dict, run: dict | None = None, check: bool = False) -> dict:
    """A calibration applied to ``features`` (another kernel version, or the same in another dtype): per case and
    task the predicted time, its limiting term and config; given a measured ``run`` (the calibration's device), its
    limits for the features' dtype, the speed against its pre-masked (cuBLAS/cuDNN) time of the same case, and with
    ``check`` the error against its time of the same method (a held-out test: only for the version that ran)."""
    dtype = features.get("dtype", "float16")
    params = calibration["params"]
    limits = run_limits(run, dtype) if run is not None else calibration["limits"]
    rows = case_rows(features)
    predicted = predict_rows(rows, params, limits)
    premasked = measured_times(run, ("premasked",), dtype) if run is not None else {}
    measured = measured_times(run, METHODS[features["version"]], dtype) if run is not None and check else {}
    cases = []
    for key in sorted(predicted):
        seconds, row = predicted[key]
        reference = premasked.get((key[0], key[1], "premasked", key[3]))
        cases.append(
            {
                "layer": key[0],
                "batch": key[1],
                "method": key[2],
                "task": key[3],
                "predicted_us": seconds * 1e6,
                "limit": limiting_term(row, params, limits),
                "config": row["config"],
                "premasked_speed": reference / seconds if reference else None,
            }
        )
        if key in measured:
            cases[-1].update(measured_us=measured[key] * 1e6, error=seconds / measured[key] - 1)
    report = {
        "version": features["version"],
        "triton": features["triton"],
        "source_commit": features["source_commit"],
        "dtype": dtype,
        "calibration": {key: calibration[key] for key in ("version", "triton", "dtype", "params", "median_error")},
        "cases": cases,
    }
    if measured:
        report["median_error"] = median([abs(case["error"]) for case in cases if "error" in case])
    return report


# --------------------------------------------------------------------------------------------------------------- #
# reports and CLI

SHORT_LAYER = {
    "vgg16.fc6": "fc6 25088->4096",
    "linear.4096": "4096->4096",
    "mlp.up.4096-11008": "4096->11008",
    "resnet50.conv3x3.256@14": "conv 3x3 256@14",
    "resnet50.conv1x1.1024-256@14": "conv 1x1 1024->256@14",
    "mobilenetv2.dw3x3.192@28": "depthwise 3x3 192@28",
}
LAYER_ORDER = [layer[0] for layer in HEADLINE_LAYERS]


CONFIG_LEGEND = (
    "Configs: `BLOCK_N x BLOCK_M x BLOCK_K` (output features or channels, batch rows or pixels, reduction), warps "
    "(w), stages (s)."
)


def _config_text(config: dict) -> str:
    tile = "x".join(str(config[key]) for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K") if key in config)
    return f"{tile} w{config['num_warps']} s{config['num_stages']}"


def _order(case: dict) -> tuple:
    return (LAYER_ORDER.index(case["layer"]), case["batch"], case["method"], case["task"])


def calibration_markdown(report: dict) -> str:
    """The calibration as Markdown: the fitted parameters, the error summary, and one row per measured case."""
    params = report["params"]
    held_out = report.get("held_out_layer_median_error")
    lines = [
        f"# Cost model calibration: kernels {report['version']} on {report['device'].get('gpu_name', 'the GPU')}",
        "",
        f"Compiled with triton {report['triton']} (sources at {report['source_commit'][:7]}); measured times are "
        f"the run's CUDA-graph replays ({report['dtype']}); `benchmarks/costmodel.py` describes the model.",
        "",
        "| parameter | fitted | meaning |",
        "|---|---:|---|",
        *(f"| `{name}` | {params[name]:.3g} | {report['parameters'][name]} |" for name in PARAMETER_NAMES),
        "",
        f"Median absolute error {report['median_error'] * 100:.1f} % over {len(report['cases'])} cases, 90th "
        f"percentile {report['p90_error'] * 100:.1f} %"
        + (f"; each layer predicted by a fit to the other layers: median {held_out * 100:.1f} %." if held_out else "."),
        "",
        CONFIG_LEGEND,
        "",
        "| layer | batch | method | task | measured us | predicted us | error | limit | model's config |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for case in sorted(report["cases"], key=_order):
        lines.append(
            f"| {SHORT_LAYER[case['layer']]} | {case['batch']} | {case['method']} | {case['task']} | "
            f"{case['measured_us']:.1f} | {case['predicted_us']:.1f} | {case['error'] * 100:+.0f} % | "
            f"{case['limit']} | {_config_text(case['config'])} |"
        )
    return "\n".join(lines) + "\n"


def predictions_markdown(report: dict) -> str:
    """Predictions as Markdown, one row per case and task."""
    calibration = report["calibration"]
    lines = [
        f"# Cost model predictions: kernels {report['version']} (triton {report['triton']}, sources at "
        f"{report['source_commit'][:7]})",
        "",
        f"{report['dtype']}. Calibrated on kernels {calibration['version']} (triton {calibration['triton']}, "
        f"{calibration['dtype']}), median error {calibration['median_error'] * 100:.1f} % there. `speed vs "
        "pre-masked`: the measured run's pre-masked (cuBLAS/cuDNN) time over the predicted time. " + CONFIG_LEGEND,
        "",
    ]
    checked = "median_error" in report
    if checked:
        lines += [
            f"Checked against the run's {report['dtype']} times: median error {report['median_error'] * 100:.1f} %.",
            "",
        ]
    lines += [
        "| layer | batch | method | task | predicted us |"
        + (" measured us | error |" if checked else "")
        + " speed vs pre-masked | limit | model's config |",
        "|---|---:|---|---:|---:|" + ("---:|---:|" if checked else "") + "---:|---|---|",
    ]
    for case in sorted(report["cases"], key=_order):
        speed = f"{case['premasked_speed']:.2f}" if case["premasked_speed"] else "-"
        measured = ""
        if checked:
            measured = f" {case['measured_us']:.1f} | {case['error'] * 100:+.0f} % |" if "error" in case else " - | - |"
        lines.append(
            f"| {SHORT_LAYER[case['layer']]} | {case['batch']} | {case['method']} | {case['task']} | "
            f"{case['predicted_us']:.1f} |{measured} {speed} | {case['limit']} | {_config_text(case['config'])} |"
        )
    return "\n".join(lines) + "\n"


def _write_json(path: Path, content: dict) -> None:
    """JSON with one line per case, variant or row: small, and a diff shows what changed."""
    lines = ["{"]
    items = list(content.items())
    for index, (key, value) in enumerate(items):
        comma = "," if index < len(items) - 1 else ""
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            inner = ",\n".join("  " + json.dumps(item, separators=(",", ":")) for item in value)
            lines.append(f"{json.dumps(key)}: [\n{inner}\n]{comma}")
        elif isinstance(value, dict) and value and all(isinstance(item, dict) for item in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            lines.append(f"{json.dumps(key)}: {{\n{inner}\n}}{comma}")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def _load(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"costmodel: {what} file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"costmodel: {what} file {path} is not JSON ({error})") from None


def _features_command(args) -> None:
    source = Path(args.source).resolve()
    if not (source / "packnet_kernels" / "linear.py").is_file():
        raise SystemExit(f"costmodel: --source {source} holds no packnet_kernels/linear.py (give a kernel checkout)")
    for path in reversed([str(source), *(args.triton_path or [])]):
        sys.path.insert(0, path)
    only = None
    if args.only:
        only = {(name, int(batch)) for name, batch in (item.rsplit(":", 1) for item in args.only.split(","))}
    methods = args.methods.split(",") if args.methods else None
    features = collect_features(source, args.version, args.dtype, args.jobs, only=only, methods=methods,
                                max_configs=args.max_configs)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, features)
    failed = sum("error" in variant for variant in features["variants"].values())
    print(f"{len(features['variants'])} variants ({failed} failed) for {len(features['cases'])} cases -> {out}")


def _calibrate_command(args) -> None:
    features, run = _load(args.features, "features"), _load(args.measured, "measured run")
    report = calibrate(features, run, cross_validate=not args.no_cross_validation)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{out}/costmodel-{features['version']}-calibration"
    _write_json(Path(f"{stem}.json"), report)
    Path(f"{stem}.md").write_text(calibration_markdown(report))
    print(f"median error {report['median_error'] * 100:.1f} % over {len(report['cases'])} cases -> {stem}.{{json,md}}")


def _predict_command(args) -> None:
    features, calibration = _load(args.features, "features"), _load(args.calibration, "calibration")
    run = _load(args.measured, "measured run") if args.measured else None
    if args.check and run is None:
        raise SystemExit("costmodel: --check needs --measured (the run whose times the predictions are checked on)")
    report = predict(features, calibration, run, check=args.check)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = features.get("dtype", "float16")
    triton = ".".join(features["triton"].split(".")[:2])
    suffix = ("" if dtype == "float16" else f"-{dtype}") + f"-triton{triton}"
    # Names with dots ("triton3.6"): no Path.with_suffix, which would cut them there.
    stem = f"{out}/costmodel-{features['version']}{suffix}-predictions"
    _write_json(Path(f"{stem}.json"), report)
    Path(f"{stem}.md").write_text(predictions_markdown(report))
    checked = f", median error {report['median_error'] * 100:.1f} %" if "median_error" in report else ""
    print(f"{len(report['cases'])} predictions{checked} -> {stem}.{{json,md}}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="compile a kernel version's variants and record their features")
    features.add_argument("--source", required=True, help="checkout of the kernel version (its packnet_kernels/)")
    features.add_argument("--version", required=True, choices=sorted(METHODS))
    features.add_argument("--triton-path", action="append", help="directory put first on sys.path (triton 3.6)")
    features.add_argument("--dtype", default="float16", choices=sorted(POINTER))
    features.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    features.add_argument("--only", help="LAYER:BATCH[,...]: these cases only")
    features.add_argument("--methods", help="METHOD[,...]: these methods only")
    features.add_argument("--max-configs", type=int, help="the first N configs of each case only")
    features.add_argument("--out", required=True, help="features JSON to write")
    calibrate_parser = commands.add_parser("calibrate", help="fit the model to a run's measured times")
    calibrate_parser.add_argument("--features", required=True, help="features JSON of the version that ran")
    calibrate_parser.add_argument("--measured", required=True, help="the run's headline JSON (graph_ms per case)")
    calibrate_parser.add_argument("--no-cross-validation", action="store_true", help="skip the held-out-layer fits")
    calibrate_parser.add_argument("--out", required=True, help="directory for costmodel-VERSION-calibration.{json,md}")
    predict_parser = commands.add_parser("predict", help="apply a calibration to another version's features")
    predict_parser.add_argument("--features", required=True)
    predict_parser.add_argument("--calibration", required=True, help="a calibrate command's JSON")
    predict_parser.add_argument("--measured", help="the calibration run's JSON, for the speed against pre-masked")
    predict_parser.add_argument("--check", action="store_true", help="compare with --measured's times of the methods")
    predict_parser.add_argument(
        "--out", required=True, help="directory for costmodel-VERSION[-DTYPE]-tritonX.Y-predictions.{json,md}"
    )
    args = parser.parse_args(argv)
    {"features": _features_command, "calibrate": _calibrate_command, "predict": _predict_command}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
