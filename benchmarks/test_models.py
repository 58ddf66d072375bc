"""Whole-model benchmarks: VGG-16 and ResNet-50 (random weights) packed with 3 tasks, served three ways.

- ``packnet``: every conv/linear swapped for ``PackedConv2d``/``PackedLinear`` (Triton kernels on CUDA).
- ``dense_masking``: the same packed model on the reference backend: ``where(mask_t, W, 0)`` every forward, then
  cuBLAS/cuDNN. It stores exactly what ``packnet`` stores.
- ``dense_copies``: three plain models, one per task with its weights pre-masked: three times the weight memory.

Per task: the latency (median), the bytes kept in memory to serve all 3 tasks (``weight_bytes``) and on CUDA the
extra memory one forward allocates (``peak_bytes``: activations plus any masked weight copies).
"""

from __future__ import annotations

import models
import pytest
import shapes
import timing
import torch

MODEL_METHODS = ("packnet", "dense_masking", "dense_copies")
GPU_MODELS = {"dtype": torch.float16, "width": 1.0, "image_size": 224, "batches": (1, 32)}
# 1/16 of the channels at 32x32 pixels: the same layers and code paths, in milliseconds on the CPU.
CPU_MODELS = {"dtype": torch.float32, "width": 1 / 16, "image_size": 32, "batches": (2,)}
# A whole network compounds the per-layer rounding, so it gets this multiple of the per-layer tolerance.
MODEL_TOLERANCE_FACTOR = 4


def _config() -> dict:
    return CPU_MODELS if shapes.quick_mode() else GPU_MODELS


def _model_cases() -> list:
    config = _config()
    return [
        pytest.param(
            name, batch, task, method, id=f"{name}-{shapes.DTYPE_NAMES[config['dtype']]}-b{batch}-t{task}-{method}"
        )
        for name in models.BUILDERS
        for batch in config["batches"]
        for task in shapes.TASKS
        for method in MODEL_METHODS
    ]


class ServedModel:
    """One architecture with random weights, packed with magnitude-pruned task ids, in the three served forms."""

    def __init__(self, name: str, device: str):
        config = _config()
        self.dtype, self.image_size = config["dtype"], config["image_size"]
        torch.manual_seed(0)
        base = models.build(name, width=config["width"], device=device)
        calibration = torch.randn(8, 3, self.image_size, self.image_size, device=device)
        models.calibrate_batchnorm(base, calibration)
        task_ids = models.magnitude_ids(base, shapes.NUM_TASKS, shapes.PRUNE_RATIO)
        base = base.to(self.dtype)
        # Channels-last activations suit cuDNN (and the conv kernel accepts them): every method gets the same input.
        self.memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
        self.forms = {
            "packnet": [models.packed_copy(base, task_ids, shapes.NUM_TASKS, backend="auto")],
            "dense_masking": [
                models.packed_copy(base, task_ids, shapes.NUM_TASKS, backend="reference").to(
                    memory_format=self.memory_format
                )
            ],
            "dense_copies": [
                copy.to(memory_format=self.memory_format)
                for copy in models.dense_copies(base, task_ids, shapes.NUM_TASKS)
            ],
        }
        self.weight_bytes = {method: models.state_bytes(*form) for method, form in self.forms.items()}
        self.baselines: dict[tuple, dict[str, dict]] = {}  # (batch, task) -> method -> timing.latency(...)

    def forward_fn(self, method: str, task: int) -> torch.nn.Module:
        """The module that serves ``task`` with ``method`` (the packed forms are switched to ``task``)."""
        import packnet

        form = self.forms[method]
        if method == "dense_copies":
            return form[task - 1]
        packnet.set_task(form[0], task)
        return form[0]


_SERVED: dict[tuple, ServedModel] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _SERVED.clear()


def served_model(name: str, device: str) -> ServedModel:
    key = (name, device)
    if key not in _SERVED:
        _SERVED.clear()  # one architecture in memory at a time
        _SERVED[key] = ServedModel(name, device)
    return _SERVED[key]


def _latency(served: ServedModel, method: str, task: int, xs: list, device: str, smoke: bool) -> dict:
    model = served.forward_fn(method, task)
    return timing.latency(lambda i: model(xs[i % len(xs)]), device, smoke=smoke)


def _peak_bytes(model, x: torch.Tensor, device: str) -> int | None:
    """Memory one forward allocates beyond what is already held (activations, masked weight copies)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize(("model_name", "batch", "task", "method"), _model_cases())
def test_model(benchmark, bench_device, device_facts, tolerances, model_name, batch, task, method):
    served = served_model(model_name, bench_device)
    size = served.image_size
    generator = torch.Generator(device=bench_device).manual_seed(batch * 10 + task)
    # Two input batches alternate: enough to keep small activations out of L2 next to 100+ MB of weights.
    xs = [
        torch.randn(batch, 3, size, size, generator=generator, device=bench_device)
        .to(served.dtype)
        .contiguous(memory_format=served.memory_format)
        for _ in range(2)
    ]
    with torch.no_grad():
        # Every form must compute the task's network: compare with the pre-masked copy of that task (and that copy
        # with dense masking).
        other = "dense_masking" if method == "dense_copies" else "dense_copies"
        expected = served.forward_fn(other, task)(xs[0])
        model = served.forward_fn(method, task)
        logits = model(xs[0])
        peak = _peak_bytes(model, xs[0], bench_device)
        error = timing.normwise_error(logits, expected)
        bound = MODEL_TOLERANCE_FACTOR * tolerances[served.dtype][1]
        assert error <= bound, f"{model_name} {method} task {task}: normwise error {error:.2e} > {bound}"

        key = (batch, task)
        if key not in served.baselines:
            served.baselines[key] = {
                baseline: _latency(served, baseline, task, xs, bench_device, benchmark.disabled)
                for baseline in ("dense_masking", "dense_copies")
            }
        baselines = {name: measured["median_ms"] for name, measured in served.baselines[key].items()}
        measured = served.baselines[key].get(method) or _latency(
            served, method, task, xs, bench_device, benchmark.disabled
        )
        ms = measured["median_ms"]
        benchmark.group = f"{model_name} {shapes.DTYPE_NAMES[served.dtype]} batch {batch} task {task}"
        benchmark.extra_info.update(
            kind="model",
            model=model_name,
            dtype=shapes.DTYPE_NAMES[served.dtype],
            image_size=size,
            batch=batch,
            task=task,
            method=method,
            median_ms=ms,
            spread=measured["spread"],
            unstable=measured["unstable"],
            timer="cuda_events" if bench_device == "cuda" else "perf_counter",
            weight_bytes=served.weight_bytes[method],
            peak_bytes=peak,
            normwise_error=error,
            dense_masking_ms=baselines["dense_masking"],
            premasked_ms=baselines["dense_copies"],
            speedup_vs_dense_masking=baselines["dense_masking"] / ms,
            speedup_vs_premasked=baselines["dense_copies"] / ms,
            **{key: device_facts[key] for key in ("device", "gpu_name", "torch", "triton", "cuda")},
        )
        model = served.forward_fn(method, task)
        rounds = 3 if bench_device == "cpu" else 10
        benchmark.pedantic(
            timing.synced_calls(lambda i: model(xs[i % 2]), bench_device), rounds=rounds, warmup_rounds=1
        )
