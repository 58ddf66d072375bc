"""Layer benchmarks: one masked linear or conv, six ways, on identical inputs in one process.

Methods (``METHODS``):
- ``packnet``: ``packnet_kernels.masked_linear``/``masked_conv2d`` (the Triton kernel on CUDA, the reference on CPU).
- ``packnet_nomask``: the same Triton kernel with the predicate switched off (GPU only). Against ``premasked`` it
  measures the Triton-vs-cuBLAS/cuDNN gap; against ``packnet`` it measures what the mask itself costs.
- ``dense_masking``: ``where(mask_t, W, 0)`` written to memory, then cuBLAS/cuDNN (``masked_*_ref``).
- ``torch_prune``: an ``nn.Linear``/``nn.Conv2d`` under ``torch.nn.utils.prune.custom_from_mask``: a forward pre-hook
  computes ``weight_orig * weight_mask`` every call.
- ``premasked``: one pre-masked dense copy per task, cuBLAS/cuDNN on it: T times the memory, the speed ceiling.
- ``compiled_masking``: ``torch.compile(mode="max-autotune-no-cudagraphs")`` of ``dense_masking``, for a few cases
  (``shapes.COMPILE_CASES``); ``extra_info`` records the kernels Inductor launched and whether the mask was fused
  into the GEMM/conv template as a prologue (Inductor refuses prologues that read more bytes than they write,
  and ``where(ids <= t, W, 0)`` reads 3 bytes per fp16 element to write 2).

Task ids come from nested magnitude pruning over 3 tasks (50 %, then 50 % of the rest, ...), queried for tasks
1, 2 and 3. Every method's output is checked against the float64 reference before it is timed.
"""

from __future__ import annotations

import math
import re

import models
import pytest
import shapes
import timing
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from packnet_kernels import effective_weight, masked_conv2d, masked_conv2d_ref, masked_linear, masked_linear_ref
from packnet_kernels.reference import task_mask

METHODS = ("packnet", "packnet_nomask", "dense_masking", "torch_prune", "premasked", "compiled_masking")
GPU_ONLY = frozenset({"packnet_nomask"})
BASELINES = ("dense_masking", "premasked")
COMPILE_MODE = "max-autotune-no-cudagraphs"
BENCH_ROUNDS = 10  # pytest-benchmark's own rounds (synchronised wall time); the median_ms in extra_info is primary


def _layer_cases() -> list:
    if shapes.quick_mode():
        matrix = {dtype: shapes.CPU_SHAPES for dtype in shapes.CPU_DTYPES}
        batches, compile_cases = shapes.CPU_BATCHES, shapes.CPU_COMPILE_CASES
    else:
        matrix, batches, compile_cases = shapes.GPU_MATRIX, shapes.BATCHES, shapes.COMPILE_CASES
    order = {name: index for index, name in enumerate(shapes.ALL_SHAPES)}
    # Shape-major order, so that each shape's weights are generated once and freed before the next shape.
    pairs = sorted(((name, dtype) for dtype, names in matrix.items() for name in names), key=lambda p: order[p[0]])
    cases = []
    for name, dtype in pairs:
        for batch in batches:
            for task in shapes.TASKS:
                for method in METHODS:
                    if method == "compiled_masking" and (
                        (name, dtype, batch) not in compile_cases or task != shapes.TASKS[len(shapes.TASKS) // 2]
                    ):
                        continue
                    marks = (pytest.mark.gpu,) if method in GPU_ONLY else ()
                    case_id = f"{name}-{shapes.DTYPE_NAMES[dtype]}-b{batch}-t{task}-{method}"
                    cases.append(pytest.param(name, dtype, batch, task, method, id=case_id, marks=marks))
    return cases


class LayerSets:
    """Rotated weight sets of one layer shape and dtype: each set is its own random weight, its task ids from
    magnitude pruning, and the weight with free entries zeroed, as in a pack. Grows on demand."""

    def __init__(self, shape: shapes.LayerShape, dtype: torch.dtype, device: str):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.weights: list[torch.Tensor] = []
        self.task_ids: list[torch.Tensor] = []
        self.seed = sum(map(ord, shape.name))

    def ensure(self, count: int) -> None:
        fan_in = math.prod(self.shape.weight_shape[1:])
        generator = torch.Generator(device=self.device).manual_seed(self.seed + len(self.weights))
        while len(self.weights) < count:
            weight = torch.randn(self.shape.weight_shape, generator=generator, device=self.device)
            weight = (weight / math.sqrt(fan_in)).to(self.dtype)
            task_ids = _magnitude_task_ids(weight)
            self.weights.append(
                torch.where(task_ids != 0, weight, torch.zeros((), dtype=self.dtype, device=weight.device))
            )
            self.task_ids.append(task_ids)


def _magnitude_task_ids(weight: torch.Tensor) -> torch.Tensor:
    from packnet.pruning import magnitude_task_ids

    return magnitude_task_ids(weight, shapes.NUM_TASKS, shapes.PRUNE_RATIO)


class LayerCase:
    """Inputs, per-method operands, reference output and baseline timings of one (shape, dtype, batch, task)."""

    def __init__(self, sets: LayerSets, batch: int, task: int, l2_bytes: int):
        shape, dtype, device = sets.shape, sets.dtype, sets.device
        self.shape, self.dtype, self.device, self.batch, self.task = shape, dtype, device, batch, task
        element = torch.empty((), dtype=dtype).element_size()
        weight_numel = math.prod(shape.weight_shape)
        self.x_bytes = math.prod(shape.input_shape(batch)) * element
        self.y_bytes = math.prod(shape.output_shape(batch)) * element
        self.w_bytes, self.ids_bytes = weight_numel * element, weight_numel
        self.rotations = timing.rotation_count(
            self.x_bytes + self.w_bytes + self.ids_bytes + self.y_bytes, l2_bytes, device
        )
        sets.ensure(self.rotations)
        self.weights, self.task_ids = sets.weights[: self.rotations], sets.task_ids[: self.rotations]
        # cuDNN is fastest on channels-last activations and weights: the input of every method is channels-last on
        # CUDA, the dense methods get channels-last copies of the same weights, the packed kernel the pack's layout.
        channels_last = shape.op == "conv2d" and device == "cuda"
        layout = torch.channels_last if channels_last else torch.contiguous_format
        generator = torch.Generator(device=device).manual_seed(batch * 1000 + task)
        self.xs = [
            torch.randn(shape.input_shape(batch), generator=generator, device=device)
            .to(dtype)
            .contiguous(memory_format=layout)
            for _ in range(self.rotations)
        ]
        self.dense_weights = [w.contiguous(memory_format=layout) for w in self.weights]
        self.dense_ids = [ids.contiguous(memory_format=layout) for ids in self.task_ids]
        self.premasked = [
            effective_weight(w, ids, task) for w, ids in zip(self.dense_weights, self.dense_ids, strict=True)
        ]
        self._expected: dict[bool, torch.Tensor] = {}
        self.baselines: dict[str, dict] = {}  # method -> timing.latency(...)

    @property
    def key(self) -> tuple:
        return (self.shape.name, self.dtype, self.device, self.batch, self.task)

    def dense_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.shape.op == "linear":
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, *self.shape.conv_args())

    def masked_ref(self, x, weight, task_ids, task) -> torch.Tensor:
        if self.shape.op == "linear":
            return masked_linear_ref(x, weight, task_ids, task)
        return masked_conv2d_ref(x, weight, task_ids, task, None, *self.shape.conv_args())

    def expected(self, use_mask: bool = True) -> torch.Tensor:
        """Float64 output on rotation 0: for this task, or (``use_mask=False``) for the whole stored weight."""
        if use_mask not in self._expected:
            x, weight = self.xs[0].double(), self.weights[0].double()
            task = self.task if use_mask else 255
            self._expected[use_mask] = self.masked_ref(x, weight, self.task_ids[0], task)
        return self._expected[use_mask]

    def traffic_bytes(self, method: str, fused: bool = False) -> int:
        """Compulsory DRAM traffic of ``method``: the GEMM/conv reads x and a weight and writes y; the packed kernel
        also reads the ids; a method that materialises ``W_t`` first reads W and its mask and writes ``W_t``."""
        gemm = self.x_bytes + self.w_bytes + self.y_bytes
        if method == "packnet" or (method == "compiled_masking" and fused):
            return gemm + self.ids_bytes
        if method in ("packnet_nomask", "premasked"):
            return gemm
        if method in ("dense_masking", "compiled_masking"):
            return gemm + self.w_bytes + self.ids_bytes + self.w_bytes
        if method == "torch_prune":  # weight_orig * weight_mask, the mask stored in the weight's dtype
            return gemm + 3 * self.w_bytes
        raise ValueError(f"unknown method {method!r}")


_SETS: dict[tuple, LayerSets] = {}
_CASES: dict[tuple, LayerCase] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_layer_buffers():
    """Drop the cached buffers when this module is done, before the model benchmarks allocate theirs."""
    yield
    _SETS.clear()
    _CASES.clear()


def layer_case(name: str, dtype: torch.dtype, batch: int, task: int, device: str, l2_bytes: int) -> LayerCase:
    """The case for these parameters, reusing the previous one when only the method changed. Only the latest shape's
    sets and the latest case stay alive, which bounds memory by the largest layer."""
    sets_key = (name, dtype, device)
    if sets_key not in _SETS:
        _SETS.clear()
        _CASES.clear()
        _SETS[sets_key] = LayerSets(shapes.ALL_SHAPES[name], dtype, device)
    case_key = (name, dtype, device, batch, task)
    if case_key not in _CASES:
        _CASES.clear()
        _CASES[case_key] = LayerCase(_SETS[sets_key], batch, task, l2_bytes)
    return _CASES[case_key]


def build_method(method: str, case: LayerCase):
    """``(fn, info)``: ``fn(i)`` runs ``method`` on rotation ``i % rotations``; ``info`` goes to ``extra_info``."""
    n, task, shape = case.rotations, case.task, case.shape
    xs = case.xs
    conv_args = shape.conv_args() if shape.op == "conv2d" else ()
    if method == "packnet":
        op = masked_linear if shape.op == "linear" else masked_conv2d
        return (lambda i: op(xs[i % n], case.weights[i % n], case.task_ids[i % n], task, None, *conv_args)), {}
    if method == "packnet_nomask":
        # The kernel with its predicate off: the weight as stored, the ids not applied (GPU only, lazily imported).
        if shape.op == "linear":
            from packnet_kernels.linear import masked_linear_triton as kernel
        else:
            from packnet_kernels.conv2d import masked_conv2d_triton as kernel
        return (
            lambda i: kernel(
                xs[i % n], case.weights[i % n], case.task_ids[i % n], task, None, *conv_args, use_mask=False
            )
        ), {}
    if method == "dense_masking":
        return (lambda i: case.masked_ref(xs[i % n], case.dense_weights[i % n], case.dense_ids[i % n], task)), {}
    if method == "premasked":
        return (lambda i: case.dense_op(xs[i % n], case.premasked[i % n])), {}
    if method == "torch_prune":
        modules = [
            _pruned_module(shape, weight, ids, task)
            for weight, ids in zip(case.dense_weights, case.dense_ids, strict=True)
        ]
        return (lambda i: modules[i % n](xs[i % n])), {}
    if method == "compiled_masking":
        return _compiled_masking(case)
    raise ValueError(f"unknown method {method!r}")


def _pruned_module(shape: shapes.LayerShape, weight: torch.Tensor, task_ids: torch.Tensor, task: int) -> nn.Module:
    factory = {"device": weight.device, "dtype": weight.dtype}
    if shape.op == "linear":
        module = nn.Linear(shape.in_ch, shape.out_ch, bias=False, **factory)
    else:
        module = nn.Conv2d(shape.in_ch, shape.out_ch, shape.kernel, shape.stride, shape.padding, bias=False, **factory)
    # clone() keeps the weight's memory format (channels-last for the cuDNN methods on CUDA).
    module.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return prune.custom_from_mask(module, "weight", task_mask(task_ids, task))


def _compiled_masking(case: LayerCase):
    """Compile ``dense_masking`` afresh for this case and inspect the code Inductor generated for it."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    n, task, shape = case.rotations, case.task, case.shape
    if shape.op == "linear":
        target, conv_args = masked_linear_ref, ()
    else:
        target, conv_args = masked_conv2d_ref, (None, *shape.conv_args())
    compiled = torch.compile(target, mode=COMPILE_MODE, dynamic=False)

    def fn(i):
        return compiled(case.xs[i % n], case.dense_weights[i % n], case.dense_ids[i % n], task, *conv_args)

    # Kernel names that list the aten ops they fuse, which is how a fused mask shows in a template's name.
    with inductor_config.patch({"triton.descriptive_names": "original_aten"}):
        _, codes = run_and_get_code(fn, 0)
    launches = [launch for code in codes for launch in inductor_launches(code)]
    return fn, {"inductor_launches": launches, "prologue_fused": prologue_fused(launches)}


_LAUNCH_PATTERNS = (
    re.compile(r"\b(triton_\w+)\.run\("),
    re.compile(r"\b(extern_kernels\.\w+)\("),
    re.compile(r"\b(cpp_fused_\w+)\("),
    re.compile(r"\b(torch\.ops\.\w+\.\w+(?:\.\w+)?)\("),
)


def inductor_launches(code: str) -> list[str]:
    """The kernels an Inductor wrapper launches, in order: Triton kernels (``name.run(``), extern calls (cuBLAS,
    cuDNN), C++ kernels and aten fallbacks. Kernel sources (triple-quoted strings) and comments are skipped."""
    launches, in_string = [], False
    for line in code.splitlines():
        quotes = line.count("'''") + line.count('"""')
        if in_string or quotes:
            in_string ^= quotes % 2 == 1
            continue
        if line.lstrip().startswith("#"):
            continue
        for pattern in _LAUNCH_PATTERNS:
            launches += pattern.findall(line)
    return launches


def prologue_fused(launches: list[str]) -> bool:
    """True when the ``where`` of the mask runs inside a GEMM/conv template kernel (``triton_tem_*``) rather than in
    a kernel of its own that writes the masked weight to memory."""
    return any(name.startswith("triton_tem") and "where" in name for name in launches)


def _measure_baselines(case: LayerCase, smoke: bool) -> None:
    if case.baselines:
        return
    for method in BASELINES:
        fn, _ = build_method(method, case)
        case.baselines[method] = timing.latency(fn, case.device, smoke=smoke)


def _result_facts(device_facts: dict) -> dict:
    return {key: device_facts[key] for key in ("device", "gpu_name", "torch", "triton", "cuda")}


def test_shape_tables_match_models():
    """Every shape in the VGG-16 and ResNet-50 tables is the shape of the module it is named after, with the right
    count, and every distinct layer shape of the models is in the tables."""
    for family, table in (("vgg16", shapes.VGG16), ("resnet50", shapes.RESNET50)):
        with torch.device("meta"):
            model = models.BUILDERS[family]()
        traced = models.traced_layers(model, image_size=224)
        counts: dict[tuple, int] = {}
        first: dict[tuple, str] = {}
        for name, signature in traced.items():
            counts[signature] = counts.get(signature, 0) + 1
            first.setdefault(signature, f"{family}.{name}")
        expected = {first[signature]: (signature, count) for signature, count in counts.items()}
        actual = {
            shape.name: (
                (shape.op, shape.in_ch, shape.out_ch, shape.kernel, shape.stride, shape.padding, shape.hw),
                shape.count,
            )
            for shape in table
        }
        assert actual == expected


def test_matrices_are_consistent():
    """Every shape the matrices name exists, and every compile case is a case of its matrix."""
    for matrix, batches, compile_cases in (
        (shapes.GPU_MATRIX, shapes.BATCHES, shapes.COMPILE_CASES),
        ({dtype: shapes.CPU_SHAPES for dtype in shapes.CPU_DTYPES}, shapes.CPU_BATCHES, shapes.CPU_COMPILE_CASES),
    ):
        assert all(name in shapes.ALL_SHAPES for names in matrix.values() for name in names)
        for name, dtype, batch in compile_cases:
            assert name in matrix.get(dtype, ()) and batch in batches, (name, dtype, batch)


@pytest.mark.parametrize(("shape_name", "dtype", "batch", "task", "method"), _layer_cases())
def test_layer(benchmark, bench_device, device_facts, limits, tolerances, shape_name, dtype, batch, task, method):
    case = layer_case(shape_name, dtype, batch, task, bench_device, device_facts["l2_bytes"])
    with torch.no_grad():
        fn, info = build_method(method, case)
        error = timing.normwise_error(fn(0), case.expected(use_mask=method != "packnet_nomask"))
        rtol = tolerances[dtype][1]
        assert error <= rtol, f"{method} differs from the float64 reference by {error:.2e} (normwise) > {rtol}"
        _measure_baselines(case, smoke=benchmark.disabled)
        measured = case.baselines.get(method) or timing.latency(fn, bench_device, smoke=benchmark.disabled)
        ms = measured["median_ms"]
        dense_masking_ms, premasked_ms = (case.baselines[name]["median_ms"] for name in ("dense_masking", "premasked"))
        traffic = case.traffic_bytes(method, fused=info.get("prologue_fused", False))
        benchmark.group = f"{shape_name} {shapes.DTYPE_NAMES[dtype]} batch {batch} task {task}"
        benchmark.extra_info.update(
            kind="layer",
            layer=shape_name,
            family=case.shape.family,
            op=case.shape.op,
            shape=case.shape.describe(),
            dtype=shapes.DTYPE_NAMES[dtype],
            batch=batch,
            task=task,
            method=method,
            median_ms=ms,
            spread=measured["spread"],
            unstable=measured["unstable"],
            timer="cuda_events" if bench_device == "cuda" else "perf_counter",
            rotations=case.rotations,
            traffic_bytes=traffic,
            flops=case.shape.flops(batch),
            normwise_error=error,
            dense_masking_ms=dense_masking_ms,
            premasked_ms=premasked_ms,
            speedup_vs_dense_masking=dense_masking_ms / ms,
            speedup_vs_premasked=premasked_ms / ms,
            **timing.roofline(case.shape.flops(batch), traffic, ms, dtype, limits),
            **info,
            **_result_facts(device_facts),
        )
        rounds = 3 if bench_device == "cpu" else BENCH_ROUNDS
        benchmark.pedantic(timing.synced_calls(fn, bench_device), rounds=rounds, warmup_rounds=1)


def test_measured_limits(benchmark, bench_device, device_facts, limits):
    """The ceilings the layer results are measured against, recorded in the JSON (and a timed copy)."""
    assert limits["copy_gbps"] > 0 and all(rate > 0 for rate in limits["matmul_tflops"].values())
    benchmark.group = "measured limits"
    benchmark.extra_info.update(kind="limit", **limits, **_result_facts(device_facts))
    benchmark.pedantic(timing.synced_calls(timing.copy_fn(bench_device), bench_device), rounds=5, warmup_rounds=1)
