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


def _per_task(x2d, weight, task_ids, tasks, tables, relu, **kwargs):
    """Each task's rows run as a single-task call: what a service splitting the batch by task computes."""
    out = torch.empty(x2d.shape[0], weight.shape[0], dtype=x2d.dtype)
    for task in tasks.unique().tolist():
        rows = tasks == task
        bias, scale, shift = (table[task - 1] for table in tables)
        out[rows] = masked_linear(
            x2d[rows], weight, task_ids, task, bias, scale=scale, shift=shift, relu=relu, **kwargs
        )
    return out


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
def test_kernel_matches_reference_and_per_task_runs(m, mix, dtype):
    x, weight, task_ids, tables = _layer(m, 37, 130, dtype, seed=m)
    tasks = MIXES[mix](m, torch.Generator().manual_seed(m))
    kwargs = dict(scale=tables[1], shift=tables[2], relu=True)
    got = masked_linear(x, weight, task_ids, tasks, tables[0], backend="triton", **kwargs)
    double = [table.double() for table in tables]
    expected = masked_linear_ref(
        x.double(), weight.double(), task_ids, tasks, double[0], scale=double[1], shift=double[2], relu=True
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    per_task = _per_task(x, weight, task_ids, tasks, tables, relu=True, backend="triton")
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
    got = masked_linear(x, weight, task_ids, tasks, backend="triton")
    later = tasks >= 4
    assert got[later].isnan().all() and not got[~later].isnan().any()


@pytest.mark.interpreter
def test_kernel_passes_over_more_tasks_than_one_pass_holds():
    """12 distinct tasks in one 16-row tile: two passes of 8 segments."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 40, generator=generator)
    task_ids = torch.randint(0, 13, (24, 40), generator=generator, dtype=torch.uint8)
    weight = torch.where(task_ids == 0, 0.0, torch.randn(24, 40, generator=generator))
    tasks = torch.randperm(16, generator=generator) % 12 + 1
    got = masked_linear(x, weight, task_ids, tasks, backend="triton")
    expected = masked_linear_ref(x.double(), weight.double(), task_ids, tasks)
    torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_bad_task_tensors(backend):
    x, weight, task_ids, tables = _layer(4, 8, 16)
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
    model = _packed_mlp(backend)
    x = torch.randn(11, 12)
    tasks = torch.tensor([3, 1, 2, 2, 1, 3, 3, 1, 2, 1, 3])
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

    x, weight, task_ids, tables = _layer(6, 24, 40, seed=11)
    tasks = torch.tensor([2, 5, 1, 2, 4, 1])

    def block(inputs, row_tasks):
        return masked_linear(inputs, weight, task_ids, row_tasks, tables[0], relu=True, backend="triton") * 2 + 1

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    assert torch.equal(compiled(x, tasks), block(x, tasks))
    assert counter.frame_count == 1
