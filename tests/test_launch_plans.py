"""Packed layers' launch plans (packnet.launch_plans): eager kernel calls checked once per input shape and operands.

On the CPU the kernels run under the interpreter (``backend="triton"``); the plans, their keys and what they launch
are the same code a GPU runs. Every result is compared bit for bit with the kernels' checked entry points
(``packnet_kernels.masked_linear`` / ``masked_conv2d``) given the layer's operands.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import packnet
from packnet_kernels import masked_conv2d, masked_linear

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter


def _linear(device, dtype=torch.float32, epilogue=False, seed=0, num_tasks=3):
    generator = torch.Generator().manual_seed(seed)
    layer = packnet.PackedLinear(40, 24, num_tasks, device=device, dtype=dtype, backend="triton")
    weight = torch.randn(24, 40, generator=generator)
    ids = torch.randint(0, num_tasks + 1, (24, 40), dtype=torch.uint8, generator=generator)
    biases = [torch.randn(24, generator=generator) for _ in range(num_tasks)]
    layer.load_packed(weight, ids, biases)
    if epilogue:
        scale = torch.rand(num_tasks, 24, generator=generator) + 0.5
        shift = torch.randn(num_tasks, 24, generator=generator)
        layer.set_epilogue(scale, shift, relu=True)
    return layer


def _conv(device, groups=1, seed=0, num_tasks=3):
    generator = torch.Generator().manual_seed(seed)
    channels = 16 if groups == 1 else groups
    layer = packnet.PackedConv2d(channels, 24 if groups == 1 else channels, 3, num_tasks, padding=1, groups=groups)
    layer.backend = "triton"
    weight = torch.randn(layer.weight.shape, generator=generator)
    ids = torch.randint(0, num_tasks + 1, layer.weight.shape, dtype=torch.uint8, generator=generator)
    layer.load_packed(weight, ids, [torch.randn(layer.out_channels, generator=generator) for _ in range(num_tasks)])
    return layer.to(device)


def _checked_linear(layer, x, task):
    """What the layer's checked path computes: the public op on the layer's operands (its epilogue per task)."""
    bias, scale, shift = layer._epilogue(task)
    x_rows = x
    if isinstance(task, torch.Tensor) and task.shape[0] != x.reshape(-1, x.shape[-1]).shape[0]:
        task = task.repeat_interleave(x.reshape(-1, x.shape[-1]).shape[0] // task.shape[0])
    return masked_linear(
        x_rows,
        layer.weight,
        layer.kernel_ids(x),
        task,
        bias,
        scale=scale,
        shift=shift,
        relu=layer.relu,
        backend="triton",
        **layer._kernel_tile_args(x),
    )


def _checked_conv(layer, x, task):
    bias, scale, shift = layer._epilogue(task)
    return masked_conv2d(
        x,
        layer.weight,
        layer.kernel_ids(x),
        task,
        bias,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        scale=scale,
        shift=shift,
        relu=layer.relu,
        backend="triton",
        **layer._kernel_tile_args(x),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40), "transposed"], ids=["2d", "3d", "strided"])
def test_linear_calls_equal_the_checked_path(dtype, shape, kernel_device):
    """Every task and a mixed batch, with a fused epilogue: each call after the first of its input shape runs from
    the plan and equals the checked op bit for bit; one plan per input layout and kind of task."""
    layer = _linear(kernel_device, dtype, epilogue=True)
    if shape == "transposed":
        x = torch.randn(40, 5, device=kernel_device, dtype=dtype).t()  # column-major rows
    else:
        x = torch.randn(shape, device=kernel_device, dtype=dtype)
    tasks = torch.tensor([3, 1, 2, 1, 3][: x.shape[0]], device=kernel_device)
    with torch.no_grad():
        for _ in range(2):
            for task in (1, 2, 3, tasks):
                assert torch.equal(layer(x, task=task), _checked_linear(layer, x, task))
    assert len(layer.launch_plans) == 2  # int tasks share a plan; the task tensor has its own


@pytest.mark.parametrize("groups", [1, 8], ids=["conv3x3", "depthwise"])
def test_conv_calls_equal_the_checked_path(groups, kernel_device):
    """Int tasks and a mixed batch: where the mixed batch runs in one launch it has its own plan; where it runs per
    task (depthwise: the checked path reads the tasks on the host) it takes the checked path every time."""
    layer = _conv(kernel_device, groups)
    x = torch.randn(3, layer.in_channels, 5, 6, device=kernel_device).contiguous(memory_format=torch.channels_last)
    tasks = torch.tensor([2, 1, 3], device=kernel_device)
    with torch.no_grad():
        for _ in range(2):
            for task in (1, 2, 3, tasks):
                assert torch.equal(layer(x, task=task), _checked_conv(layer, x, task))
    assert len(layer.launch_plans) == (2 if groups == 1 else 1)


def test_after_the_first_call_of_a_shape_every_call_launches_the_compiled_kernel(kernel_device):
    """With the launches stubbed at the launcher's boundary: one plain launch per input shape (the first call, as
    Triton binds it), then nothing but direct launches."""
    from packnet_kernels._launcher import stub_launches

    linear, conv = _linear(kernel_device), _conv(kernel_device)
    with torch.no_grad(), stub_launches() as stub:
        for batch in (2, 3):
            x = torch.randn(batch, 40, device=kernel_device)
            images = torch.randn(batch, 16, 5, 5, device=kernel_device)
            for task in (1, 2, 3, 1):
                linear(x, task=task)
                conv(images, task=task)
        assert (stub.plain_launches, stub.direct_launches) == (4, 12)


def _changes():
    def write_weight(layer):
        layer.weight.mul_(-2.0)

    def write_ids(layer):
        layer.task_ids[:, :32] = 1  # the tile-map cell task 2 skipped is now task 1's: it must be read

    def write_bias(layer):
        layer.bias[1].add_(1.0)

    def replace_weight(layer):
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 3, requires_grad=False)

    def replace_bias(layer):
        layer.bias = torch.nn.Parameter(layer.bias.detach() + 1, requires_grad=False)

    def fuse_epilogue(layer):
        layer.set_epilogue(torch.full((3, 24), 2.0), torch.ones(3, 24), relu=True)

    def toggle_relu(layer):
        layer.relu = True

    def toggle_tile_map(layer):
        layer.use_tile_map = False

    def data_write_and_refresh(layer):
        layer.task_ids.data[:, :32] = 1  # as write_ids, but no version counter sees it
        layer.refresh_tile_map()

    return [
        write_weight,
        write_ids,
        write_bias,
        replace_weight,
        replace_bias,
        fuse_epilogue,
        toggle_relu,
        toggle_tile_map,
        data_write_and_refresh,
    ]


@pytest.mark.parametrize("change", _changes(), ids=lambda change: change.__name__)
def test_operands_written_or_replaced_after_planning_are_seen(change, kernel_device):
    layer = _linear(kernel_device)
    x = torch.randn(4, 40, device=kernel_device)
    with torch.no_grad():
        layer.task_ids[:, :32] = 3  # tile-map cell (0, 0) is task 3's alone: task 2 skips it
        layer.weight[:, :32] = 1.0
        before = layer(x, task=2)
        assert torch.equal(layer(x, task=2), before) and len(layer.launch_plans) == 1
        change(layer)
        after = layer(x, task=2)
        assert torch.equal(after, _checked_linear(layer, x, 2)) and len(layer.launch_plans) == 1
        if change.__name__ == "toggle_tile_map":  # changes what is read, never the result
            assert not layer.launch_plans.lookup(layer, x, 2).plan.flags["TILE_MAP"]
        else:
            assert not torch.equal(after, before)


def test_calls_the_plans_must_not_serve_take_the_checked_path(kernel_device):
    """Autograd (an input that needs a gradient), a dispatch mode, the reference backend, and operands made under
    inference mode (no version counter to see a change by) are never served from a plan."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = _linear(kernel_device)
    x = torch.randn(4, 40, device=kernel_device)
    with torch.no_grad():
        layer(x, task=1)
    lookup = layer.launch_plans.lookup
    needs_grad = x.clone().requires_grad_()
    assert lookup(layer, needs_grad, 1) is None
    with torch.no_grad():
        assert lookup(layer, needs_grad, 1) is not None  # nothing to record without grad mode

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recording():
        assert lookup(layer, x, 1) is None
    layer.backend = "reference"
    with torch.no_grad():
        assert lookup(layer, x, 1) is None
        assert torch.allclose(layer(x, task=1), _checked_linear_reference(layer, x, 1), atol=1e-5)
    with torch.inference_mode():
        made_there = _linear(kernel_device)
        assert lookup(made_there, x, 1) is None and made_there.launch_plans.lookup(made_there, x, 1) is None
        assert torch.equal(made_there(x, task=1), _checked_linear(made_there, x, 1))


def _checked_linear_reference(layer, x, task):
    bias, _, _ = layer._epilogue(task)
    return masked_linear(x, layer.weight, layer.task_ids, task, bias, backend="reference")


def test_a_bad_input_after_planning_raises_the_checked_paths_error(kernel_device):
    layer = _linear(kernel_device)
    with torch.no_grad():
        layer(torch.randn(4, 40, device=kernel_device), task=1)
        with pytest.raises(TypeError, match="input dtype torch.float16 does not match weight dtype torch.float32"):
            layer(torch.randn(4, 40, device=kernel_device, dtype=torch.float16), task=1)
        with pytest.raises(ValueError, match="last dimension must equal in_features=40"):
            layer(torch.randn(4, 39, device=kernel_device), task=1)
        with pytest.raises(ValueError, match="task 4 is outside 1..3"):
            layer(torch.randn(4, 40, device=kernel_device), task=4)
    assert len(layer.launch_plans) == 1


def test_copies_start_without_plans_and_run(kernel_device):
    layer = _linear(kernel_device)
    x = torch.randn(4, 40, device=kernel_device)
    with torch.no_grad():
        expected = layer(x, task=3)
        layer(x, task=3)
        duplicate = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (duplicate, loaded):
            assert len(other.launch_plans) == 0 and other.launch_plans is not layer.launch_plans
            assert torch.equal(other(x, task=3), expected) and torch.equal(other(x, task=3), expected)


def test_a_task_tensor_rewritten_between_calls_is_read_anew(kernel_device):
    layer = _linear(kernel_device)
    x = torch.randn(4, 40, device=kernel_device)
    tasks = torch.tensor([1, 2, 3, 1], device=kernel_device)
    with torch.no_grad():
        first = layer(x, task=tasks)
        tasks.data.copy_(torch.tensor([3, 3, 1, 2]))  # no version counter sees it
        second = layer(x, task=tasks)
        assert torch.equal(second, _checked_linear(layer, x, tasks)) and not torch.equal(first, second)


def test_the_shapes_kept_per_layer_are_bounded(kernel_device, monkeypatch):
    layer = _linear(kernel_device)
    monkeypatch.setattr(type(layer.launch_plans), "MAX_SHAPES", 2)
    with torch.no_grad():
        for rows in range(1, 6):
            x = torch.randn(rows, 40, device=kernel_device)
            assert torch.equal(layer(x, task=1), _checked_linear(layer, x, 1))
            assert len(layer.launch_plans) <= 2
