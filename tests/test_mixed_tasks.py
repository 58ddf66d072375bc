"""Mixed-task batches: a task tensor with one task per row. The reference against per-task runs (bitwise), the
Triton linear kernel (interpreter on the CPU) against the reference, the packed modules and a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TOLERANCES

import packnet
from packnet_kernels import masked_conv2d, masked_linear, masked_linear_ref, tile_map

NUM_TASKS = 5
# Where the Triton tests run: the GPU when there is one, else the CPU under the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tolerance(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def _layer(m, n, k, dtype=torch.float32, seed=0, lead=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=generator).to(dtype)
    task_ids = torch.randint(0, NUM_TASKS + 1, (n, k), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(n, k, generator=generator)).to(dtype)
    tables = [(0.5 + torch.rand(NUM_TASKS, n, generator=generator)).to(dtype) for _ in range(3)]
    return x, weight, task_ids, tables


def _on_device(x, weight, task_ids, tables):
    return x.to(DEVICE), weight.to(DEVICE), task_ids.to(DEVICE), [table.to(DEVICE) for table in tables]


def _per_task(x2d, weight, task_ids, tasks, tables, relu, alone=False, **kwargs):
    """Each task's rows run as a single-task call: what a service splitting the batch by task computes. ``alone``:
    each as a batch of that task alone (a task tensor, the mixed path's one-task loop and its split of K)."""
    out = torch.empty(x2d.shape[0], weight.shape[0], dtype=x2d.dtype, device=x2d.device)
    for task in tasks.unique().tolist():
        rows = (tasks == task).to(x2d.device)
        bias, scale, shift = (table[task - 1] for table in tables)
        if alone:
            count = int(rows.sum())
            task, bias, scale, shift = torch.full((count,), task, device=tasks.device), *tables
        out[rows] = masked_linear(
            x2d[rows], weight, task_ids, task, bias, scale=scale, shift=shift, relu=relu, **kwargs
        )
    return out


@pytest.fixture(params=["v2", "v1"])
def mixed_kernel(request, monkeypatch):
    """Run a test on the grouped mixed kernel (v2, batches up to 256 rows) and again on the 16-row mixed tiles
    (v1, which larger batches take): v1 forced by lowering the row limit, launch plans dropped."""
    from packnet_kernels import linear

    monkeypatch.setattr(linear, "_PLANS", {})
    if request.param == "v1":
        monkeypatch.setattr(linear, "MIXED_V2_MAX_ROWS", 0)
    return request.param


MIXES = {
    "random": lambda m, g: torch.randint(1, NUM_TASKS + 1, (m,), generator=g),
    "sorted": lambda m, g: torch.randint(1, NUM_TASKS + 1, (m,), generator=g).sort().values,
    "one_task": lambda m, g: torch.full((m,), 3),
    "all_tasks": lambda m, g: torch.arange(m) % NUM_TASKS + 1,
    "absent_2_and_4": lambda m, g: torch.tensor([1, 3, 5])[torch.randint(0, 3, (m,), generator=g)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_reference_rows_are_bitwise_the_per_task_runs(mix):
    x, weight, task_ids, tables = _layer(0, 12, 20, torch.float64, lead=(3, 7))
    tasks = MIXES[mix](21, torch.Generator().manual_seed(1)).to(torch.int32)
    got = masked_linear(x, weight, task_ids, tasks, tables[0], scale=tables[1], shift=tables[2], relu=True)
    assert got.shape == (3, 7, 12)
    expected = _per_task(x.reshape(21, 20), weight, task_ids, tasks, tables, relu=True, backend="reference")
    assert torch.equal(got.reshape(21, 12), expected)


def test_shared_vectors_and_conv_reference():
    x, weight, task_ids, tables = _layer(6, 8, 10, torch.float64)
    tasks = torch.tensor([2, 1, 2, 5, 1, 2])
    got = masked_linear(x, weight, task_ids, tasks, tables[0][0], scale=tables[1])
    for row, task in enumerate(tasks.tolist()):
        one = masked_linear(x[row : row + 1], weight, task_ids, task, tables[0][0], scale=tables[1][task - 1])
        torch.testing.assert_close(got[row : row + 1], one, rtol=1e-12, atol=1e-12)
    images = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    conv_ids = torch.randint(0, 4, (4, 2, 3, 3), dtype=torch.uint8)
    conv_weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, 4, dtype=torch.float64)
    got = masked_conv2d(images, conv_weight, conv_ids, torch.tensor([3, 1, 3]), bias, padding=1)
    for image, task in enumerate([3, 1, 3]):
        one = masked_conv2d(images[image : image + 1], conv_weight, conv_ids, task, bias[task - 1], padding=1)
        torch.testing.assert_close(got[image : image + 1], one, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("m", "mix", "dtype"),
    [
        (1, "random", torch.float32),
        (7, "random", torch.float16),
        (16, "all_tasks", torch.float32),
        (23, "random", torch.bfloat16),
        (23, "sorted", torch.float32),
        (13, "one_task", torch.float32),
        (40, "absent_2_and_4", torch.float16),
    ],
)
def test_kernel_matches_reference_and_per_task_runs(m, mix, dtype, mixed_kernel):
    x, weight, task_ids, tables = _on_device(*_layer(m, 37, 130, dtype, seed=m))
    tasks = MIXES[mix](m, torch.Generator().manual_seed(m)).to(DEVICE)
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True)
    got = masked_linear(x, weight, task_ids, tasks, tables[0], backend="triton", **kwargs)
    double = [table.double() for table in tables]
    expected = masked_linear_ref(
        x.double(), weight.double(), task_ids, tasks, double[0], scale=double[1], shift=double[2], relu=True
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    per_task = _per_task(x, weight, task_ids, tasks.cpu(), tables, relu=True, backend="triton")
    torch.testing.assert_close(got, per_task, atol=atol, rtol=rtol)
    # The tile map (raw tiles allowed: free weights are zero) changes what is read, never the result.
    mapped = masked_linear(
        x,
        weight,
        task_ids,
        tasks,
        tables[0],
        backend="triton",
        tile_map=tile_map(task_ids),
        free_weights_zero=True,
        **kwargs,
    )
    torch.testing.assert_close(mapped, got, atol=atol, rtol=rtol)


@pytest.mark.interpreter
def test_kernel_keeps_later_tasks_nan_out_of_earlier_rows():
    x, weight, task_ids, _ = _layer(9, 33, 70)
    task_ids[:, 5], weight[:, 5] = 4, float("nan")  # a whole column owned by task 4, all NaN
    tasks = torch.tensor([1, 4, 2, 5, 3, 1, 4, 2, 3])
    got = masked_linear(x.to(DEVICE), weight.to(DEVICE), task_ids.to(DEVICE), tasks.to(DEVICE), backend="triton")
    got, later = got.cpu(), tasks >= 4
    assert got[later].isnan().all() and not got[~later].isnan().any()


@pytest.mark.interpreter
def test_kernel_passes_over_more_tasks_than_one_pass_holds(mixed_kernel):
    """12 distinct tasks in one 16-row tile: two passes of 8 segments (v1); 12 groups in one pass (v2)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 40, generator=generator)
    task_ids = torch.randint(0, 13, (24, 40), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(24, 40, generator=generator))
    tasks = torch.randperm(16, generator=generator) % 12 + 1
    got = masked_linear(x.to(DEVICE), weight.to(DEVICE), task_ids.to(DEVICE), tasks.to(DEVICE), backend="triton")
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, tasks).to(DEVICE)
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bad_task_tensors(backend):
    x, weight, task_ids, tables = _layer(4, 8, 16)
    if backend == "triton" and DEVICE == "cuda":
        return  # task values are checked on CPU tensors only (a GPU check would cost a device sync per call)
    cases = [
        (torch.tensor([1, 2, 3]), ValueError, "3 entries but the input has 4 rows"),
        (torch.tensor([1.0, 2, 3, 4]), TypeError, "integer dtype"),
        (torch.tensor([True, True, False, True]), TypeError, "integer dtype"),
        (torch.ones(2, 2, dtype=torch.int64), ValueError, "must be 1-D"),
        (torch.tensor([1, 0, 2, 3]), ValueError, r"in 1\.\.255, got 0"),
        (torch.tensor([1, 256, 2, 3]), ValueError, r"in 1\.\.255, got 256"),
    ]
    for tasks, error, message in cases:
        with pytest.raises(error, match=message):
            masked_linear(x, weight, task_ids, tasks, backend=backend)
    with pytest.raises(ValueError, match=r"in 1\.\.5, got 6"):
        masked_linear(x, weight, task_ids, torch.tensor([1, 6, 2, 3]), tables[0], backend=backend)
    with pytest.raises(ValueError, match=r"table must have shape \(tasks, 8\)"):
        masked_linear(x, weight, task_ids, torch.tensor([1, 2, 2, 3]), tables[0][:, :4], backend=backend)


def _packed_mlp(backend, head_sizes=(3, 3, 3)):
    torch.manual_seed(0)
    model = packnet.mlp(in_features=12, hidden=16, depth=2, num_classes=3)
    ids = {
        name: torch.randint(1, 4, module.weight.shape, dtype=torch.uint8)
        for name, module in model.named_modules()
        if name.startswith("features") and isinstance(module, nn.Linear)
    }
    packnet.swap_packed_(model, ids, num_tasks=3, backend=backend)
    model.head = packnet.TaskSwitch([nn.Linear(16, size) for size in head_sizes])
    return model


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_model_mixed_batch_equals_per_task_runs(backend):
    device = DEVICE if backend == "triton" else "cpu"
    model = _packed_mlp(backend).to(device)
    x = torch.randn(11, 12, device=device)
    tasks = torch.tensor([3, 1, 2, 2, 1, 3, 3, 1, 2, 1, 3], device=device)
    with torch.no_grad(), packnet.set_task(model, tasks):
        mixed = model(x)
    for task in (1, 2, 3):
        with torch.no_grad(), packnet.set_task(model, task):
            alone = model(x[tasks == task])
        if backend == "reference":
            assert torch.equal(mixed[tasks == task], alone)
        else:
            torch.testing.assert_close(mixed[tasks == task], alone, **_tolerance(torch.float32))
    with pytest.raises(ValueError, match=r"outside 1\.\.3|in 1\.\.3"):
        packnet.set_task(model, torch.tensor([1, 4]))


def test_heads_of_different_sizes_refuse_a_mixed_batch():
    model = _packed_mlp("reference", head_sizes=(3, 5, 3))
    with torch.no_grad(), packnet.set_task(model, torch.tensor([1, 1, 3])):
        assert model(torch.randn(3, 12)).shape == (3, 3)  # tasks 1 and 3 share a head size
    with (
        torch.no_grad(),
        packnet.set_task(model, torch.tensor([1, 2])),
        pytest.raises(ValueError, match="one output shape"),
    ):
        model(torch.randn(2, 12))


@pytest.mark.interpreter
def test_mixed_kernel_compiles_to_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    x, weight, task_ids, tables = _on_device(*_layer(6, 24, 40, seed=11))
    tasks = torch.tensor([2, 5, 1, 2, 4, 1], device=DEVICE)

    def block(inputs, row_tasks):
        return masked_linear(inputs, weight, task_ids, row_tasks, tables[0], relu=True, backend="triton") * 2 + 1

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    assert torch.equal(compiled(x, tasks), block(x, tasks))
    assert counter.frame_count == 1


# (batch, in channels, out channels, kernel, groups, image size): the tap-by-tap GEMM loop in one launch (a 3x3 over
# 32 channels whose 20-pixel images pack into pixel tiles, a 1x1, a grouped 3x3), and a conv with 8 channels, which
# runs one launch per task present. The mixed conv kernel's own tests: tests/test_conv2d_mixed.py.
CONV_CASES = [(5, 32, 24, 3, 1, (4, 5)), (3, 16, 20, 1, 1, (3, 3)), (4, 64, 64, 3, 2, (3, 4)), (4, 8, 12, 3, 1, (4, 4))]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_conv_mixed_batch_in_one_launch(case, monkeypatch):
    from packnet_kernels import conv2d

    batch, in_channels, out_channels, kernel, groups, size = case
    generator = torch.Generator().manual_seed(in_channels + out_channels)
    shape = (out_channels, in_channels // groups, kernel, kernel)
    task_ids = torch.randint(0, NUM_TASKS + 1, shape, generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(shape, generator=generator)).half()
    x = torch.randn(batch, in_channels, *size, generator=generator).half()
    tables = [(0.5 + torch.rand(NUM_TASKS, out_channels, generator=generator)).half() for _ in range(3)]
    tasks = torch.tensor([4, 1, 4, 2, 5][:batch])
    layout = torch.channels_last
    x, weight, task_ids = (t.to(DEVICE).contiguous(memory_format=layout) for t in (x, weight, task_ids))
    tables, tasks = [table.to(DEVICE) for table in tables], tasks.to(DEVICE)
    launches = []
    launch = conv2d._launch
    monkeypatch.setattr(conv2d, "_launch", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True, backend="triton")
    got = masked_conv2d(x, weight, task_ids, tasks, tables[0], 1, kernel // 2, 1, groups, **kwargs)
    one_launch = conv2d.mixed_kernel_applies(in_channels // groups, out_channels // groups, groups)
    assert len(launches) == (1 if one_launch else len(set(tasks.tolist()))) and one_launch == (in_channels >= 16)
    double = [table.double() for table in tables]
    expected = masked_conv2d(
        x.double(), weight.double(), task_ids, tasks, double[0], 1, kernel // 2, 1, groups,
        scale=double[1], shift=double[2], relu=True, backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float16))
    for task in set(tasks.tolist()):
        rows = tasks == task
        alone = masked_conv2d(
            x[rows], weight, task_ids, task, tables[0][task - 1], 1, kernel // 2, 1, groups,
            scale=tables[1][task - 1], shift=tables[2][task - 1], relu=True, backend="triton",
        )  # fmt: skip
        torch.testing.assert_close(got[rows], alone, **_tolerance(torch.float16))


def _count_dots(monkeypatch) -> list:
    """Count the interpreter's dots (``tl.dot`` calls of every kernel launched after this)."""
    from triton.runtime.interpreter import InterpreterBuilder

    calls = []
    create_dot = InterpreterBuilder.create_dot
    monkeypatch.setattr(
        InterpreterBuilder, "create_dot", lambda self, *args: calls.append(1) or create_dot(self, *args)
    )
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("tasks", "dots_per_step"),
    [
        ([3] * 16, 2),  # one task: the loop of few segments (2 dots per step, not 8)
        ([1] * 9 + [4] * 7, 2),  # two tasks: still the few-segment loop
        ([1] * 6 + [2] * 5 + [5] * 5, 8),  # three: the 8-segment loop
        (list(range(1, 10)) + [9] * 7, 8 + 2),  # nine: a pass of 8 segments, then one of a single task
    ],
    ids=["1-task", "2-tasks", "3-tasks", "9-tasks"],
)
def test_mixed_linear_tile_runs_the_dots_its_tasks_need(tasks, dots_per_step, monkeypatch):
    """One 16-row tile of the v1 kernel (the interpreter's 32 x 16 x 32 tile, K = 96: 3 steps): per K step, 2
    masked dots for a pass of one or two tasks and 8 for a fuller one, with the results of the reference."""
    if DEVICE != "cpu":
        pytest.skip("counts the interpreter's dots")
    from packnet_kernels import linear

    monkeypatch.setattr(linear, "_PLANS", {})
    monkeypatch.setattr(linear, "MIXED_V2_MAX_ROWS", 0)
    assert linear._INTERPRETER_CONFIG["BLOCK_K"] == 32 and linear.mixed_segments(16) == 8
    generator = torch.Generator().manual_seed(len(set(tasks)))
    task_ids = torch.randint(0, 10, (32, 96), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(32, 96, generator=generator))
    x = torch.randn(16, 96, generator=generator)
    row_tasks = torch.tensor(tasks)[torch.randperm(16, generator=generator)]
    calls = _count_dots(monkeypatch)
    got = masked_linear(x, weight, task_ids, row_tasks, backend="triton")
    assert len(calls) == 3 * dots_per_step
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, row_tasks)
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_model_takes_the_task_per_call(backend):
    """``model(x, task=...)`` on a swapped model runs that task (or per-row tasks) for the call only, restores the
    active tasks afterwards, also after an error, and leaves a model's own ``task`` argument alone."""
    device = DEVICE if backend == "triton" else "cpu"
    model = _packed_mlp(backend).to(device)
    x = torch.randn(7, 12, device=device)
    tasks = torch.tensor([2, 1, 3, 3, 1, 2, 2], device=device)
    modules = packnet.task_modules(model)
    with torch.no_grad():
        packnet.set_task(model, 1)
        for task in (2, tasks):
            with packnet.set_task(model, task):
                expected = model(x)
            assert torch.equal(model(x, task=task), expected)
            assert all(module.active_task == 1 for module in modules)
        assert torch.equal(model(x, task=None), model(x))
        with pytest.raises(ValueError, match=r"outside 1\.\.3"):
            model(x, task=4)
        if device == "cpu":  # values of a GPU task tensor are read by the TaskSwitch head, which raises there
            with pytest.raises(ValueError, match=r"in 1\.\.3, got 0"):
                model(x, task=torch.tensor([1, 2, 0, 1, 1, 2, 3]))
        with pytest.raises(TypeError, match="task must be an int"):
            model(x, task=2.0)
        assert all(module.active_task == 1 for module in modules)


def test_task_switch_refuses_tasks_it_does_not_hold():
    switch = packnet.TaskSwitch([nn.Linear(4, 2) for _ in range(3)]).to(DEVICE)
    x = torch.randn(3, 4, device=DEVICE)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=rf"in 1\.\.3, got {bad}"):
            switch(x, task=torch.tensor([1, bad, 2], device=DEVICE))


def test_loaded_and_custom_models_take_the_task_per_call(tmp_path):
    """A loaded pack's model (the built-in Classifier) takes ``task=``; a model whose forward has its own ``task``
    argument keeps it."""
    model = packnet.load_pack("tests/data/golden_v2.pack", backend="reference")
    x = torch.randn(5, *model.packnet_input_shape)
    tasks = torch.tensor([1, 2, 1, 2, 2])[:5] % packnet.task_modules(model)[0].num_tasks + 1
    with torch.no_grad():
        for task in (1, tasks):
            with packnet.set_task(model, task):
                expected = model(x)
            assert torch.equal(model(x, task=task), expected)

    class OwnTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x, task=None):
            return self.layer(x), task

    ids = torch.tensor([[1, 2, 1, 2]] * 3, dtype=torch.uint8)
    own = packnet.swap_packed_(OwnTask(), {"layer": ids}, num_tasks=2, backend="reference")
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = {}
        for task in (1, 2):
            with packnet.set_task(own, task):
                expected[task] = own(x)[0]
        assert not torch.equal(expected[1], expected[2])
        packnet.set_task(own, 1)
        # The forward gets its task, by keyword or by position, and every packed layer runs that task too.
        for output, task in (own(x, task=2), own(x, 2)):
            assert task == 2 and torch.equal(output, expected[2])
        assert own.layer.active_task == 1
        with pytest.raises(TypeError, match="task must be an int, got str 'mine'"):
            own(x, task="mine")


@pytest.mark.interpreter
def test_a_mixed_batch_is_sorted_once_per_forward(monkeypatch):
    """Inside one forward of a packed model, its layers reuse the grouping of the task tensor (one sort, not one per
    layer); every forward and every call outside one sorts again, so a task tensor rewritten between calls without
    its version counter moving (through ``.data``) still gives the new tasks' rows."""
    from packnet_kernels import linear

    sorts = []
    sort = torch.sort
    monkeypatch.setattr(linear.torch, "sort", lambda *args, **kwargs: sorts.append(1) or sort(*args, **kwargs))
    linear.release_workspaces()
    model = _packed_mlp("triton").to(DEVICE)
    x = torch.randn(9, 12, device=DEVICE)
    tasks = torch.tensor([3, 1, 2, 2, 1, 3, 3, 1, 2], device=DEVICE)
    with torch.no_grad():
        model(x, task=tasks)
        assert len(sorts) == 1  # two packed layers, one sort
        with packnet.set_task(model, tasks):
            model(x)
        assert len(sorts) == 2
        layer = model.features[0]
        layer(x, task=tasks), layer(x, task=tasks)  # outside a model's forward: each call sorts
        assert len(sorts) == 4
        version = tasks._version
        tasks.data[:4] = torch.tensor([1, 1, 3, 3], device=DEVICE)
        assert tasks._version == version  # a write no version counter sees
        got = model(x, task=tasks)
        with packnet.set_task(model, tasks):
            expected = _per_row(model, x, tasks)
    torch.testing.assert_close(got, expected, **_tolerance(torch.float32))


def _per_row(model, x, tasks):
    """Each row run alone with its task: what a mixed batch must give, row for row."""
    return torch.cat([model(x[row : row + 1], task=int(tasks[row])) for row in range(x.shape[0])])


@pytest.mark.interpreter
def test_a_model_loaded_and_run_under_inference_mode(monkeypatch):
    """Inference-mode tensors keep no version counter: a model loaded under ``torch.inference_mode`` runs the Triton
    kernels (without the tile map) and a mixed batch whose task tensor was made there is sorted on every call."""
    from packnet_kernels import linear

    reference = packnet.load_pack("tests/data/golden_v2.pack", backend="reference")
    x = torch.randn(6, *reference.packnet_input_shape)
    sorts = []
    sort = torch.sort
    monkeypatch.setattr(linear.torch, "sort", lambda *args, **kwargs: sorts.append(1) or sort(*args, **kwargs))
    with torch.inference_mode():
        model = packnet.load_pack("tests/data/golden_v2.pack", backend="triton").to(DEVICE)
        tasks = torch.tensor([2, 1, 1, 2, 2, 1], device=DEVICE)
        for task in (1, tasks, tasks):
            got = model(x.to(DEVICE), task=task).cpu()
            expected = reference(x, task=task.cpu() if task is tasks else task)
            torch.testing.assert_close(got, expected, **_tolerance(got.dtype))
    linears = sum(isinstance(module, packnet.PackedLinear) for module in model.modules())
    assert len(sorts) == 2 * linears


@pytest.mark.interpreter
def test_a_packed_model_with_its_call_hooks_compiles_to_one_graph():
    """The call hooks (``task=``, the packed-forward marking) trace into the graph of the whole model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from packnet_kernels import _checks

    model = _packed_mlp("triton").to(DEVICE)
    x = torch.randn(5, 12, device=DEVICE)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad(), packnet.set_task(model, 2):
        assert torch.equal(compiled(x), model(x))
    assert counter.frame_count == 1 and _checks.packed_forward() is None


# --------------------------------------------------------------------------------------------------------------- #
# The grouped mixed kernel (v2): one program per weight tile serves every row of a batch of up to 256 rows.


def _v2_layer(m, n, k, num_tasks, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype)
    task_ids = torch.randint(0, num_tasks + 1, (n, k), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(n, k, generator=generator)).to(dtype)
    tables = [(0.5 + torch.rand(num_tasks, n, generator=generator)).to(dtype) for _ in range(3)]
    return x, weight, task_ids, tables, generator


def _id_operand(task_ids, id_bits):
    from packnet_kernels.id_layout import compact_task_ids

    return task_ids if id_bits == 8 else compact_task_ids(task_ids, int(task_ids.max()), id_bits)


# (rows, tasks drawn from, distinct tasks at most 16 rows each so that per-task runs take the small regime, dtype)
V2_CASES = [
    (1, 5, torch.float32, 8),
    (13, 5, torch.float16, 8),
    (31, 3, torch.bfloat16, 8),
    (37, 5, torch.float16, 4),
    (29, 3, torch.float16, 2),
    (40, 15, torch.float32, 4),
    (23, 3, torch.bfloat16, 2),
    # One task (the single-task loop of the v2 kernel): every dtype, both compact widths.
    (11, 1, torch.bfloat16, 4),
    (7, 1, torch.float16, 2),
    (16, 1, torch.float32, 8),
]


@pytest.mark.interpreter
@pytest.mark.parametrize(("m", "num_tasks", "dtype", "id_bits"), V2_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_v2_rows_are_bitwise_the_per_task_kernel_runs(m, num_tasks, dtype, id_bits):
    """Unsorted random mixes (some tasks absent), prime batch sizes, uint8 and compact ids (int32 weight pairs),
    per-task bias/scale/shift tables: every row within the dtype's tolerance of the reference, and bit for bit the
    per-task kernel run of its task (the same tiles, split and summation order: each task's rows are at most 16,
    which the single-task small regime runs in one 16-row tile)."""
    if DEVICE != "cpu":
        pytest.skip("bitwise equality holds for the interpreter's fixed tiles")
    from packnet_kernels import linear

    x, weight, task_ids, tables, generator = _v2_layer(m, 37, 96, num_tasks, dtype, seed=m)
    tasks = torch.randint(1, num_tasks + 1, (m,), generator=generator)
    while any((tasks == t).sum() > 16 for t in range(1, num_tasks + 1)):
        tasks = torch.randint(1, num_tasks + 1, (m,), generator=generator)
    assert linear.mixed_v2_applies(m)
    ids = _id_operand(task_ids, id_bits)
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True)
    got = masked_linear(x, weight, ids, tasks, tables[0], backend="triton", **kwargs)
    double = [table.double() for table in tables]
    expected = masked_linear_ref(
        x.double(), weight.double(), task_ids, tasks, double[0], scale=double[1], shift=double[2], relu=True
    )
    torch.testing.assert_close(got.double(), expected, **_tolerance(dtype))
    assert torch.equal(got, _per_task(x, weight, ids, tasks, tables, relu=True, backend="triton"))


@pytest.mark.interpreter
@pytest.mark.parametrize(("id_bits", "num_tasks", "table_tasks"), [(2, 3, 3), (4, 5, 5), (2, 3, 5)])
def test_v2_one_task_batch_runs_the_fields_loop_of_its_task(id_bits, num_tasks, table_tasks):
    """A batch of one task on compact ids takes the fields layout's loop with the task compiled in (``FIELD_TASKS``
    copies, one per task of the tables): for every task of the layer, fp16, 200 input features in two splits (a
    chunk, and a partial one), its rows are the single-task kernel's, bit for bit in the interpreter (the same tiles
    and order), within fp16's tolerance on a GPU (each tunes its own tiles); a task past the tables' is refused."""
    from packnet_kernels import linear

    x, weight, task_ids, tables, generator = _v2_layer(9, 33, 200, num_tasks, torch.float16, seed=id_bits)
    # Tables of more tasks than the ids name: tasks above 2**bits - 1 run the last copy (every owner visible).
    tables = [torch.cat([table, table[-1:].expand(table_tasks - num_tasks, -1)]) for table in tables]
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    ids = _id_operand(task_ids, id_bits)
    tasks = torch.ones(9, dtype=torch.int64, device=DEVICE)
    plan_args = (x, weight, ids.words, tables[0], tables[1], tables[2], True, True, None, False, tasks, id_bits)
    assert linear.linear_plan(*plan_args).flags["FIELD_TASKS"] == min(table_tasks, (1 << id_bits) - 1)
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True, backend="triton")
    for task in range(1, table_tasks + 1):
        got = masked_linear(x, weight, ids, tasks * task, tables[0], **kwargs)
        expected = masked_linear(x, weight, ids, task, tables[0][task - 1], scale=tables[1][task - 1],
                                 shift=tables[2][task - 1], relu=True, backend="triton")  # fmt: skip
        if DEVICE == "cpu":
            assert torch.equal(got, expected), task
        else:
            torch.testing.assert_close(got, expected, **_tolerance(torch.float16))
    if DEVICE == "cpu":  # task values are checked on the host only (a GPU check would sync)
        with pytest.raises(ValueError, match="task"):
            masked_linear(x, weight, ids, tasks * (table_tasks + 1), tables[0], **kwargs)


@pytest.mark.interpreter
@pytest.mark.parametrize(("m", "num_tasks"), [(64, 1), (255, 255), (251, 8)], ids=["64-rows-1-task", "255-tasks",
                                                                                   "251-rows-8-tasks"])  # fmt: skip
def test_v2_one_task_and_every_task(m, num_tasks):
    """One task for a whole batch (4 full groups), 255 rows of 255 tasks (255 groups: 16 passes of 16) and a prime
    batch over 8 tasks: within tolerance of the reference, per-task tables included."""
    x, weight, task_ids, tables, generator = _v2_layer(m, 20, 40, num_tasks, torch.float32, seed=num_tasks)
    tasks = torch.randperm(m, generator=generator) % num_tasks + 1
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    got = masked_linear(x, weight, task_ids, tasks.to(DEVICE), tables[0], scale=tables[1], backend="triton")
    expected = masked_linear_ref(
        x.double(), weight.double(), task_ids, tasks.to(DEVICE), tables[0].double(), scale=tables[1].double()
    )
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_v2_one_task_split_k_is_bitwise_the_single_task_kernel(dtype):
    """A batch of one task whose K is split (4 splits of 64 under the interpreter): the one-task loop's partials and
    reduction give every row bit for bit the single-task kernel's (the same tiles and split plan)."""
    if DEVICE != "cpu":
        pytest.skip("bitwise equality holds for the interpreter's fixed tiles")
    from packnet_kernels import linear

    x, weight, task_ids, tables, _ = _v2_layer(16, 24, 256, 3, dtype, seed=7)
    tasks = torch.full((16,), 2)
    assert linear._mixed_split_plan(16, 24, 256, 2, True, None)[0] == 4
    got = masked_linear(x, weight, task_ids, tasks, tables[0], backend="triton")
    expected = masked_linear(x, weight, task_ids, 2, tables[0][1], backend="triton")
    assert torch.equal(got, expected)
    reference = masked_linear_ref(x.double(), weight.double(), task_ids, tasks, tables[0].double())
    torch.testing.assert_close(got.double(), reference, **_tolerance(dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("task", [0, 6, 300])
def test_v2_one_invalid_task_comes_out_nan(task):
    """A batch of one task outside 1..(table rows) takes the one-task loop and every row comes out NaN (the kernel
    launched directly: the public op refuses such tasks)."""
    from packnet_kernels import linear

    x, weight, task_ids, tables, _ = _v2_layer(5, 9, 40, 5, torch.float32, seed=task)
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    tasks = torch.full((5,), task, device=DEVICE)
    got = linear._launch(x, weight, task_ids, 0, tables[0], None, None, False, True, tasks=tasks)
    assert got.isnan().all()


@pytest.mark.interpreter
def test_v2_invalid_tasks_come_out_nan_and_later_tasks_nan_stays_out():
    """Rows whose task is outside 1..(table rows) are NaN, every other row is not, though a column owned by task 4 is
    all NaN (rows of tasks 1..3 never see it)."""
    from packnet_kernels import linear

    x, weight, task_ids, tables, _ = _v2_layer(21, 33, 70, 5, torch.float32, seed=4)
    task_ids[:, 5], weight[:, 5] = 4, float("inf")
    tasks = torch.tensor([1, 7, 2, 3, 0, 1, 2, 3, 3, 1, 2, -4, 1, 3, 2, 2, 1, 300, 3, 1, 2])
    device_args = [t.to(DEVICE) for t in (x, weight, task_ids, tables[0])]
    got = linear._launch(*device_args[:3], 0, device_args[3], None, None, False, True, tasks=tasks.to(DEVICE)).cpu()
    bad = (tasks < 1) | (tasks > 5)
    assert got[bad].isnan().all() and not got[~bad].isnan().any() and not got[~bad].isinf().any()


def _v2_counts(monkeypatch, tensors: dict) -> tuple[dict, list]:
    """Per launch under the interpreter: for each named tensor, how many times each of its bytes is loaded (a
    Counter of load counts over its elements), and each dot's right operand (the activations' columns)."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), t) for name, t in tensors.items()}
    loads = {name: np.zeros(t.numel(), dtype=np.int64) for name, t in tensors.items()}
    dots = []
    masked_load, create_dot = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_dot

    def counting_load(self, ptrs, mask, other, cache_policy, is_volatile):
        addresses = ptrs.data[mask.data.astype(bool)].astype(np.int64)
        for name, (start, end, tensor) in spans.items():
            inside = addresses[(addresses >= start) & (addresses < end)]
            np.add.at(loads[name], (inside - start) // tensor.element_size(), 1)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def counting_dot(self, a, b, d, *args):
        dots.append(b.data.copy())
        return create_dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counting_load)
    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting_dot)
    return loads, dots


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("counts", "passes"),
    [
        ({3: 64}, 1),  # one task: the single-task loop, one dot of 64 rows
        ({5: 23}, 1),  # one task: the single-task loop, one dot of 32 rows
        ({2: 200}, 1),  # one task: the single-task loop, one dot of 256 rows
        ({1: 128, 5: 128}, 1),  # two runs in four 64-row groups
        ({2: 100, 7: 156}, 2),  # 5 groups of 64 rows would be needed: 17 of 16, 2 passes
        ({1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 7: 8, 8: 8}, 1),  # 64 rows over 8 tasks: 8 groups of 8 rows
        ({1: 17, 4: 3, 9: 44}, 1),  # 64 rows over 3 tasks, tasks absent between: 2 + 1 + 3 groups
        ({1: 96, 2: 64, 5: 48, 6: 16, 7: 32}, 1),  # 256 rows, 5 tasks in 16 full groups: one pass
        ({t: 32 for t in range(1, 9)}, 1),  # 256 rows over 8 tasks of 32: 16 groups
        ({t: 20 for t in range(1, 9)} | {9: 96}, 2),  # 256 rows over 9 tasks: 22 groups, 2 passes of 16
    ],
    ids=["64x1", "23x1", "200x1", "256x2-wide", "256x2", "64x8", "64x3-absent", "256x5", "256x8", "256x9"],
)
def test_v2_reads_each_weight_once_per_pass_and_dots_cover_their_group(counts, passes, monkeypatch):
    """Under the interpreter, per launch: every weight and id element is loaded exactly once per pass over K (once
    for up to 16 groups of 16 rows of one task: any mix of 64 rows over up to 8 tasks, 256 rows in 16 full groups),
    and each K step runs one dot per group on that group's rows only: a dot's activation columns are those of one
    task's run of at most 16 rows (64 when a batch over 112 rows has runs that fit 64-row groups), padded with zero
    columns, every row in one dot per step."""
    if DEVICE != "cpu":
        pytest.skip("counts the interpreter's loads and dots")
    from packnet_kernels import linear

    monkeypatch.setattr(linear, "_PLANS", {})
    tasks = torch.cat([torch.full((rows,), task) for task, rows in counts.items()])
    m, num_tasks = tasks.numel(), max(counts)
    x, weight, task_ids, _, generator = _v2_layer(m, 24, 64, num_tasks, torch.float16, seed=m + num_tasks)
    x = x + 4.0 * x.sign()  # no zero activation: a dot's nonzero columns are exactly its rows
    tasks = tasks[torch.randperm(m, generator=generator)]
    loads, dots = _v2_counts(monkeypatch, {"weight": weight, "ids": task_ids})
    got = masked_linear(x, weight, task_ids, tasks, backend="triton")
    few, groups = linear.mixed_groups(m, 2)  # fp16: up to 16 groups per pass
    wide = linear.mixed_wide_groups(m, 2)
    wide = wide if sum(-(-rows // 64) for rows in counts.values()) <= wide else 0
    width = 64 if wide else 16
    steps = 64 // linear._INTERPRETER_V2_CONFIG["BLOCK_K"]  # one program, one split: K = 64 in 2 steps
    one_rows = linear.mixed_one_task(m, 2)[0] if len(counts) == 1 else 0
    if one_rows:
        # One task: the single-task loop, one dot of every row.
        width, wide = one_rows, 1
    group_count = 1 if one_rows else sum(-(-rows // width) for rows in counts.values())
    assert -(-group_count // groups) == passes and (passes > 1) == (group_count > groups)
    unrolled = wide or (few if group_count <= few else groups)
    assert {int(v) for v in loads["weight"]} == {passes} and {int(v) for v in loads["ids"]} == {passes}
    assert len(dots) == steps * passes * unrolled
    covered = [(dot != 0).any(axis=0) for dot in dots]
    assert all(dot.shape[1] == width for dot in dots)
    busy = [int(columns.sum()) for columns in covered if columns.any()]
    assert len(busy) == steps * group_count and sum(busy) == steps * m
    expected_rows = [[width] * (rows // width) + ([rows % width] if rows % width else []) for rows in counts.values()]
    assert sorted(busy) == sorted(r for rows in expected_rows for r in rows for _ in range(steps))
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, tasks)
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float16))


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("id_bits", "num_tasks", "counts", "slots"),
    [
        (2, 3, {1: 5, 2: 9, 3: 16}, True),  # every task of a 3-task layer: 3 slots
        (4, 8, {1: 3, 2: 11, 3: 16, 5: 1, 6: 7, 8: 13}, True),  # 6 of 8 tasks, 4-bit ids: 8 slots, 2 of them empty
        (4, 8, {1: 4, 8: 16, 7: 9, 2: 16}, True),  # 4 of 8: the least share that takes the slots
        (4, 8, {2: 12, 7: 9, 8: 3}, False),  # 3 of 8: the groups, one mask per distinct task
        (4, 8, {1: 8, 3: 17, 4: 2, 6: 5}, False),  # a task of 17 rows fills 2 groups: the groups
        (4, 8, {task: 32 for task in range(1, 9)}, True),  # 256 rows over 8 tasks: 8 slots of 32 rows, 2 passes
        (4, 8, {1: 32, 2: 30, 3: 25, 5: 32, 7: 17, 8: 20}, True),  # 156 rows, 6 of 8 tasks: slots of 32 rows
        (4, 8, {1: 32, 2: 33, 3: 32, 4: 32}, False),  # over 128 rows, a task of 33: the groups (9, one pass)
    ],
    ids=[
        "2bit-3of3",
        "4bit-6of8",
        "4bit-4of8",
        "4bit-3of8",
        "4bit-17rows",
        "4bit-256x8",
        "4bit-156rows",
        "4bit-33rows",
    ],
)
def test_v2_slots_run_every_task_of_the_layer_with_its_task_compiled_in(id_bits, num_tasks, counts, slots,
                                                                         monkeypatch):  # fmt: skip
    """On compact ids a batch whose distinct tasks each fill one group (of 16 rows up to 128 rows, else of 32) and
    are at least half of the layer's tasks takes the slots (``SLOT_TASKS``, one per task of the layer, its mask
    compiled in): under the interpreter (fp16, 200 input features in two splits, a chunk and a partial one) each K
    step runs one dot per slot of its pass (16-row slots: one pass; 32-row slots: two, of half the slots each) whose
    activation columns are exactly its task's rows (none for a task the batch does not hold); every weight element
    and (slots) id byte is loaded once per pass; every row is bit for bit its task's rows run alone as a batch of one
    task, and (tasks of up to 16 rows) the per-task single-task kernel run (the same tiles and summation order).
    Other batches take the groups. On a GPU (the same batches, autotuned
    tiles) every row is within fp16's tolerance of the per-task runs; everywhere within it of the reference."""
    from packnet_kernels import linear

    monkeypatch.setattr(linear, "_PLANS", {})
    tasks = torch.cat([torch.full((rows,), task) for task, rows in counts.items()])
    m = tasks.numel()
    x, weight, task_ids, tables, generator = _v2_layer(m, 33, 200, num_tasks, torch.float16, seed=m + id_bits)
    x = x + 4.0 * x.sign()  # no zero activation: a dot's nonzero columns are exactly its rows
    tasks = tasks[torch.randperm(m, generator=generator)].to(DEVICE)
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    ids = _id_operand(task_ids, id_bits)
    plan_args = (x, weight, ids.words, tables[0], tables[1], tables[2], True, True, None, False, tasks, id_bits)
    flags = linear.linear_plan(*plan_args).flags
    slot_tasks, slot_rows = flags["SLOT_TASKS"], flags["SLOT_ROWS"]
    assert slot_tasks == min(num_tasks, (1 << id_bits) - 1) and slot_rows == (16 if m <= 128 else 32)
    passes = slot_rows // 16 if slots else 1
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True, backend="triton")
    if DEVICE == "cpu":
        split_k, k_per_split = linear._mixed_split_plan(m, 33, 200, 2, True, None)
        assert (split_k, k_per_split) == (2, 128)
        loads, dots = _v2_counts(monkeypatch, {"weight": weight, "ids": ids.words})
    got = masked_linear(x, weight, ids, tasks, tables[0], **kwargs)
    if DEVICE == "cpu":
        monkeypatch.undo()  # the counts are the mixed call's
    per_task = _per_task(x, weight, ids, tasks, tables, relu=True, backend="triton")
    double = [table.double() for table in tables]
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, tasks, double[0], scale=double[1],
                                 shift=double[2], relu=True)  # fmt: skip
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float16))
    if DEVICE != "cpu":
        torch.testing.assert_close(got, per_task, **_tolerance(torch.float16))
        return
    # A single-task call of more than SMALL_M_MAX rows takes the large regime, unsplit: other sums. Its rows run as a
    # batch of that task alone take the mixed split and the single-task kernel's fields loop.
    small = torch.tensor([counts[int(task)] <= linear.SMALL_M_MAX for task in tasks])
    assert torch.equal(got[small], per_task[small])
    assert torch.equal(got, _per_task(x, weight, ids, tasks, tables, relu=True, alone=True, backend="triton"))
    assert {int(v) for v in loads["weight"]} == {passes}
    if slots:
        # Id bytes, counted per int32 word of the layout (rows padded to 256 columns): each byte once per chunk and
        # pass.
        assert {int(v) for v in loads["ids"]} == {4 * passes}
    # Per program (2 weight tiles of 32 rows, 2 splits): whole chunks of 128 columns in steps of 32.
    block = linear._INTERPRETER_V2_CONFIG
    chunks = sum(-(-(min(200, start + k_per_split) - start) // 128) for start in range(0, 200, k_per_split))
    steps = -(-33 // block["BLOCK_N"]) * chunks * 128 // block["BLOCK_K"]
    covered = [int((dot != 0).any(axis=0).sum()) for dot in dots]
    if slots:
        # Slot s's columns are task s + 1's rows; a program runs its passes one after the other, each its steps.
        assert slot_tasks % passes == 0
        per_step = slot_tasks // passes
        pass_columns = [[counts.get(task, 0) for task in range(first + 1, first + per_step + 1)]
                        for first in range(0, slot_tasks, per_step)]  # fmt: skip
        steps *= passes
    else:
        # The groups: 16 rows of one task each, in increasing task order, then empty groups up to the loop's count.
        few, groups = linear.mixed_groups(m, 2)
        group_rows = [min(16, rows - first) for task, rows in sorted(counts.items()) for first in range(0, rows, 16)]
        per_step = few if len(group_rows) <= few else groups
        expected_columns = group_rows + [0] * (per_step - len(group_rows))
        steps = -(-33 // block["BLOCK_N"]) * sum(-(-(min(200, start + k_per_split) - start) // block["BLOCK_K"])
                                                 for start in range(0, 200, k_per_split))  # fmt: skip
        pass_columns = [expected_columns]
    # Every step covers its pass's columns, but the steps past K (the last split ends mid-chunk) none.
    in_steps = [covered[step * per_step : (step + 1) * per_step] for step in range(steps)]
    assert len(dots) == steps * per_step
    assert all(step in [*pass_columns, [0] * per_step] for step in in_steps)
    assert all(columns in in_steps for columns in pass_columns)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("id_bits", "counts", "dots_per_step"),
    [(4, {task: 5 for task in range(1, 9)}, 8), (2, {1: 4, 2: 7, 3: 2}, 3), (4, {3: 12}, 1), (2, {2: 9}, 1)],
    ids=["4bit-slots", "2bit-slots", "4bit-one-task", "2bit-one-task"],
)
def test_v2_whole_chunks_check_no_column_against_k(id_bits, counts, dots_per_step, monkeypatch):
    """A layer whose inputs are whole chunks of the fields layout (``linear.whole_chunks``: 512 input features, two
    splits of two chunks) launches with ``EVEN_K``, and its loops that read it then mask by rows only: the slots
    (one dot per slot and step, each on its task's rows) and a batch of one task (the fields loop, one dot per
    step). Every row is still bit for bit its task's rows run alone and, where a task's rows take the small regime,
    the per-task single-task kernel's run (the single-task kernel on compact ids also bit for bit the byte path); all
    within fp16's tolerance of the reference. (Either EVEN_K branch with its activations a column off fails it.)"""
    from packnet_kernels import linear

    num_tasks = 3 if id_bits == 2 else 8
    tasks = torch.cat([torch.full((rows,), task) for task, rows in counts.items()])
    x, weight, task_ids, tables, generator = _v2_layer(tasks.numel(), 33, 512, num_tasks, torch.float16, seed=id_bits)
    x = x + 4.0 * x.sign()  # no zero activation: a dot's nonzero columns are exactly its rows
    tasks = tasks[torch.randperm(tasks.numel(), generator=generator)].to(DEVICE)
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    ids = _id_operand(task_ids, id_bits)
    plan_args = (x, weight, ids.words, tables[0], tables[1], tables[2], True, True, None, False, tasks, id_bits)
    flags = linear.linear_plan(*plan_args).flags
    assert flags["EVEN_K"] and linear.whole_chunks(512) and not linear.whole_chunks(200)
    assert flags["SLOT_TASKS"] == num_tasks and flags["FIELD_TASKS"] == num_tasks
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True, backend="triton")
    if DEVICE == "cpu":
        assert linear._mixed_split_plan(tasks.numel(), 33, 512, 2, True, None) == (2, 256)
        loads, dots = _v2_counts(monkeypatch, {"ids": ids.words})
    got = masked_linear(x, weight, ids, tasks, tables[0], **kwargs)
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, tasks, tables[0].double(),
                                 scale=tables[1].double(), shift=tables[2].double(), relu=True)  # fmt: skip
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float16))
    if DEVICE != "cpu":
        return
    monkeypatch.undo()
    # 2 weight tiles of 32 rows x 2 splits x 256 / 32 steps of 32 columns, each with its dots; each dot's columns
    # are one task's rows.
    assert len(dots) == 2 * 2 * 8 * dots_per_step
    assert {int((dot != 0).any(axis=0).sum()) for dot in dots} == set(counts.values())
    # The fields layout's loops read each id byte once per chunk (counted per int32 word: 4), the groups' more often.
    assert {int(v) for v in loads["ids"]} == {4}
    assert torch.equal(got, _per_task(x, weight, ids, tasks, tables, relu=True, alone=True, backend="triton"))
    small = torch.tensor([counts[int(task)] <= linear.SMALL_M_MAX for task in tasks])
    per_task = _per_task(x, weight, ids, tasks, tables, relu=True, backend="triton")
    assert torch.equal(got[small], per_task[small])
    for task in counts:
        rows = (tasks == task).cpu()
        on_bytes = masked_linear(x[rows], weight, task_ids, task, tables[0][task - 1], backend="triton")
        assert torch.equal(masked_linear(x[rows], weight, ids, task, tables[0][task - 1], backend="triton"), on_bytes)


def test_v2_slots_only_where_their_loop_compiles_clean():
    """Slots (``linear.mixed_slots``): compact ids with the mask, 16-bit operands, splits on whole chunks, 2 or more
    tasks whose slots hold no more rows per pass than the pass's groups (16-row slots beside passes of up to 8
    groups, up to 128 rows; 32-row slots beside more) and together at least the batch's rows, sm_90 and later; else
    none."""
    from packnet_kernels import linear

    assert linear.mixed_slots(4, True, 2, 1, 0, 8, 8, 64) == (8, 16)
    assert linear.mixed_slots(4, True, 2, 1, 0, 8, 16, 256) == (8, 32)  # 256 rows: 8 slots of 32 rows
    assert linear.mixed_slots(4, True, 2, 1, 0, 8, 9, 129) == (8, 32)
    assert linear.mixed_slots(4, True, 2, 2, 256, 15, 8, 64) == (0, 16)  # 15 tasks, 8 groups
    assert linear.mixed_slots(4, True, 2, 2, 256, 9, 16, 256) == (0, 16)  # 9 slots of 32 rows: over 8 groups' rows
    assert linear.mixed_slots(2, True, 2, 2, 256, 5, 8, 48) == (3, 16)  # 2-bit ids name 3 tasks
    assert linear.mixed_slots(2, True, 2, 1, 0, 1, 8, 16) == (0, 16)  # one task: the one-task loop
    # Slots that cannot hold the batch's rows (a task would fill more than one group): none compiled.
    assert linear.mixed_slots(2, True, 2, 1, 0, 3, 8, 49) == (0, 16)  # 3 slots of 16 rows
    assert linear.mixed_slots(2, True, 2, 1, 0, 3, 13, 200) == (0, 16)  # 3 slots of 32 rows
    assert linear.mixed_slots(4, True, 2, 1, 0, 4, 9, 129) == (0, 16)  # 4 slots of 32 rows
    for args in [(8, True, 2, 1, 0, 8, 8, 64), (4, False, 2, 1, 0, 8, 8, 64), (4, True, 4, 1, 0, 8, 8, 64),
                 (4, True, 2, 2, 96, 8, 8, 64), (4, True, 2, 1, 0, 8, 4, 4)]:  # fmt: skip
        assert linear.mixed_slots(*args) == (0, 16), args
    assert linear.mixed_slots(4, True, 2, 1, 0, 8, 8, 64, major=8) == (0, 16)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("id_bits", "layer_tasks", "table_tasks", "tasks"),
    [
        (2, 3, 3, [0, 1, 1, 2, 3, 3]),  # task 0 before the slots' tasks
        (2, 3, 3, [-1, 1, 2, 3]),
        (2, 3, 3, [1, 2, 3, 4]),  # a task past the tables
        (2, 3, 5, [1, 2, 4, 4]),  # a task the tables hold past the slots (2-bit ids name 3): it sees every owner
        (2, 3, 5, [4, 5, 5]),
        (4, 8, 8, [0] * 4 + [task for task in range(1, 9) for _ in range(19)]),  # 156 rows: 32-row slots but task 0
        (4, 8, 8, [task for task in range(1, 10) for _ in range(17)]),  # 153 rows, task 9 past the tables
    ],
    ids=["task0", "task-1", "past-tables", "past-slots", "past-slots-only", "156rows-task0", "153rows-past-tables"],
)
def test_v2_slots_leave_batches_with_tasks_outside_them_to_the_groups(id_bits, layer_tasks, table_tasks, tasks):
    """A batch on compact ids holding a task outside the slots' 1..``SLOT_TASKS`` takes the groups: rows of invalid
    tasks (outside 1..table rows) come out NaN, every other row is its task's (a task the tables hold past the
    slots sees every owner); the kernel launched directly (the public op refuses invalid tasks)."""
    from packnet_kernels import linear

    x, weight, task_ids, tables, _ = _v2_layer(len(tasks), 33, 200, layer_tasks, torch.float32, seed=len(tasks))
    tables = [torch.cat([table, table[-1:].expand(table_tasks - layer_tasks, -1)]) for table in tables]
    x, weight, task_ids, tables = _on_device(x, weight, task_ids, tables)
    x = x.to(torch.float16)
    weight = weight.to(torch.float16)
    ids = _id_operand(task_ids, id_bits)
    tasks = torch.tensor(tasks, device=DEVICE)
    bias = tables[0].to(torch.float16)
    plan_args = (x, weight, ids.words, bias, None, None, False, True, None, False, tasks, id_bits)
    assert linear.linear_plan(*plan_args).flags["SLOT_TASKS"] == min(layer_tasks, table_tasks, (1 << id_bits) - 1)
    got = linear._launch(x, weight, ids.words, 0, bias, None, None, False, True, tasks=tasks, id_bits=id_bits).cpu()
    bad = ((tasks < 1) | (tasks > table_tasks)).cpu()
    assert got[bad].isnan().all() and not got[~bad].isnan().any()
    good = (~bad).nonzero().squeeze(1)
    reference = masked_linear_ref(x.double(), weight.double(), task_ids, tasks.clamp(1, table_tasks),
                                  bias.double())  # fmt: skip
    torch.testing.assert_close(got[good].double(), reference.cpu()[good], **_tolerance(torch.float16))


@pytest.mark.interpreter
def test_v2_row_groups_are_built_once_per_forward(monkeypatch):
    """A packed model's layers share the row groups of the forward's task tensor, as they share its sort."""
    from packnet_kernels import linear

    layouts = []
    kernel = linear._row_groups_kernel

    class Counting:
        def __getitem__(self, grid):
            layouts.append(grid)
            return kernel[grid]

    monkeypatch.setattr(linear, "_row_groups_kernel", Counting())
    linear.release_workspaces()
    model = _packed_mlp("triton").to(DEVICE)
    x = torch.randn(9, 12, device=DEVICE)
    tasks = torch.tensor([3, 1, 2, 2, 1, 3, 3, 1, 2], device=DEVICE)
    with torch.no_grad():
        got = model(x, task=tasks)
        assert len(layouts) == 1  # two packed layers, one layout
        expected = _per_row(model, x, tasks)
    torch.testing.assert_close(got, expected, **_tolerance(torch.float32))


@pytest.mark.interpreter
@pytest.mark.parametrize(("m", "dtype"), [(1, torch.int64), (17, torch.uint8), (256, torch.int16)])
def test_v2_row_groups_layout(m, dtype):
    """The device layouts of a batch's rows: each run of one task in groups of 16 rows, of 64 and of 32 (its input
    rows in sorted order, -1 after the run's last row), the groups' tasks in increasing order (clamped to -1..256),
    and their counts, and the number of runs; task tensors of any integer dtype (uint8: no negative values)."""
    from packnet_kernels import linear

    generator = torch.Generator().manual_seed(m)
    values = [0, 1, 2, 2, 3, 7, 255] if dtype == torch.uint8 else [-5, 0, 1, 2, 2, 3, 7, 300]
    tasks = torch.tensor(values)[torch.randint(0, len(values), (m,), generator=generator)].to(dtype)
    group_rows, group_tasks, counts = (t.cpu() for t in linear._row_groups(tasks.to(DEVICE), reuse=False))
    order = torch.sort(tasks, stable=True).indices
    assert int(counts[2]) == len(set(tasks.tolist()))  # runs of one task: the distinct tasks
    assert group_rows.numel() == m * (16 + 64 + 32) and group_tasks.numel() == 3 * m and counts.numel() == 4
    layouts = zip((16, 64, 32), group_rows.split([m * 16, m * 64, m * 32]), group_tasks.split([m, m, m]),
                  counts[[0, 1, 3]], strict=True)  # fmt: skip
    for width, rows_of, tasks_of, count in layouts:
        expected_rows, expected_tasks, position = [], [], 0
        for task in sorted(set(tasks.tolist())):
            run = order[position : position + int((tasks == task).sum())].tolist()
            position += len(run)
            for first in range(0, len(run), width):
                chunk = run[first : first + width]
                expected_rows.append(chunk + [-1] * (width - len(chunk)))
                expected_tasks.append(max(-1, min(256, task)))
        assert int(count) == len(expected_rows)
        assert rows_of.view(-1, width)[: len(expected_rows)].tolist() == expected_rows
        assert tasks_of[: len(expected_tasks)].tolist() == expected_tasks
