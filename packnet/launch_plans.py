"""A packed layer's eager calls without per-call validation: its operands checked once, a launch plan per input.

What cannot change between two calls of one layer (the weight, the ids as the kernel reads them, the tile map, the
per-task epilogue tables, their dtypes, devices and strides) is derived and validated when a call first needs it and
again whenever one of them was replaced or written in place (their identity, data pointer and version counter say
so); each input shape then gets its launch plan (:class:`packnet_kernels.linear.LinearPlan`, the conv launcher's
cached plan) the first time it comes, after the full checks of the kernels' own entry points. Per call only the
input (shape, strides, dtype, device: the plan's key) and the task are looked at, and the plan launches.

A call takes this path when the layer runs its Triton kernel, eagerly, with nothing to record (no ``torch.compile``
trace, no dispatch or function mode, no autograd), on operands that keep version counters (not made under
``torch.inference_mode``). Any other call, and any call the checks refuse, goes through the packed layer's checked
path (:func:`packnet_kernels.masked_linear` and its kin), which raises the error. Writes that the version counters
do not see (``.data``, NumPy, DLPack) need ``layer.refresh_tile_map()``, which also forgets these plans.
"""

from __future__ import annotations

import torch

from packnet_kernels import CompactTaskIds
from packnet_kernels._checks import (
    KERNEL_DTYPES,
    check_conv2d,
    check_linear,
    check_tile_map,
    interpreter_enabled,
)

__all__ = ["Conv2dLaunchPlans", "LinearLaunchPlans"]


def _tensor_state(tensor: torch.Tensor | None):
    """What tells a tensor apart from its replacement or from itself after a write (raises RuntimeError for an
    inference tensor, which keeps no version counter)."""
    if tensor is None:
        return None
    return id(tensor), tensor._version, tensor.data_ptr()


class _LayerOperands:
    """A layer's operands as the kernel reads them: ``weight`` (for a linear layer with compact ids and 16-bit weights,
    its int32 view), ``ids`` (uint8 ids or compact words, ``id_bits`` per weight), the tile map, and the epilogue:
    ``rows[t - 1]`` the ``(bias, scale, shift)`` vectors of task ``t``, ``tables`` the per-task tables of a mixed
    batch. ``tensors`` keeps the layer's own tensors alive while the key holds their ``id``s."""

    __slots__ = (
        "weight",
        "checked_ids",
        "ids",
        "id_bits",
        "tile_map",
        "free_weights_zero",
        "rows",
        "tables",
    )

    def __init__(self, layer, x: torch.Tensor):
        weight, _ = layer.kernel_operands()
        self.checked_ids = layer.kernel_ids(x)  # what the checks take: uint8 ids or CompactTaskIds
        if isinstance(self.checked_ids, CompactTaskIds):
            self.ids, self.id_bits = self.checked_ids.words, self.checked_ids.bits
        else:
            self.ids, self.id_bits = self.checked_ids, 8
        self.weight = weight  # as the checks, the plan and the kernel see it
        tile_args = layer._kernel_tile_args(x)
        self.tile_map = tile_args.get("tile_map")
        self.free_weights_zero = tile_args.get("free_weights_zero", False)
        self.tables = (layer.bias, layer.scale, layer.shift)  # [num_tasks, out] each, or None
        self.rows = [layer._epilogue(task) for task in range(1, layer.num_tasks + 1)]


class _LaunchPlans:
    """The launch plans of one packed layer (see the module docstring); ``lookup`` is all a call does before its
    launch. Never copied or pickled with its layer: a copy starts empty."""

    # Input shapes kept per layer; more (a layer fed ever-changing shapes) start the cache over.
    MAX_SHAPES = 64

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Forget the operands and every plan (the next call derives and checks them again)."""
        self._operands_key = None
        self._operands: _LayerOperands | None = None
        self._held: tuple = ()
        self._shapes: dict = {}

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()

    def __len__(self) -> int:
        """Input shapes planned."""
        return len(self._shapes)

    def lookup(self, layer, x, task):
        """The launch of this call (``launch(x, task)`` returns the output), or None when the call must take the
        layer's checked path: the first call of an input shape that this path may serve plans it here, with the full
        checks. ``task`` is the resolved task: an int in ``1..num_tasks``, or a task tensor with one task per row of
        ``x``."""
        if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
            return None
        if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
            return None
        tensors = self._layer_tensors(layer)
        try:
            key = (*map(_tensor_state, tensors), *self._layer_flags(layer))
        except RuntimeError:
            return None  # an inference tensor: no version counter, so no way to see it change
        if key != self._operands_key:
            self.clear()
            self._operands_key, self._held = key, tensors
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
            return None
        mixed = type(task) is torch.Tensor
        shape = (x.shape, x.stride(), x.dtype, x.device, (task.shape, task.dtype, task.device) if mixed else None)
        launch = self._shapes.get(shape)
        if launch is None:
            if not self._kernel_runs(layer, x):
                return None
            if self._operands is None:
                self._operands = _LayerOperands(layer, x)
            try:
                launch = self._plan(layer, x, task, self._operands)
            except (TypeError, ValueError):
                return None  # the checked path raises it
            if launch is None:
                return None
            if len(self._shapes) >= self.MAX_SHAPES:
                self._shapes.clear()
            self._shapes[shape] = launch
        return launch

    @staticmethod
    def _kernel_runs(layer, x: torch.Tensor) -> bool:
        """The layer runs its Triton kernel on ``x``: a CUDA tensor (backend ``"auto"`` or ``"triton"``), or a CPU
        tensor under the interpreter with ``backend="triton"``."""
        if layer.backend == "triton":
            return x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())
        return layer.backend == "auto" and x.is_cuda

    @staticmethod
    def _layer_tensors(layer) -> tuple:
        parameters, buffers = layer._parameters, layer._buffers
        return (
            parameters["weight"],
            buffers["task_ids"],
            parameters.get("bias"),
            buffers.get("scale"),
            buffers.get("shift"),
        )

    @staticmethod
    def _layer_flags(layer) -> tuple:
        return layer.relu, layer.use_tile_map, layer.backend

    def _plan(self, layer, x, task, operands: _LayerOperands):
        raise NotImplementedError


class _LinearLaunch:
    """One input shape's launch of a packed linear layer."""

    __slots__ = ("plan", "operands", "mixed")

    def __init__(self, plan, operands: _LayerOperands, mixed: bool):
        self.plan, self.operands, self.mixed = plan, operands, mixed

    def __call__(self, x: torch.Tensor, task) -> torch.Tensor:
        ops = self.operands
        if self.mixed:
            (bias, scale, shift), active, tasks = ops.tables, 0, task
        else:
            (bias, scale, shift), active, tasks = ops.rows[task - 1], task, None
        return self.plan.launch(x, ops.weight, ops.ids, bias, scale, shift, ops.tile_map, active, tasks, True)


class LinearLaunchPlans(_LaunchPlans):
    """The launch plans of a :class:`~packnet.PackedLinear`."""

    @staticmethod
    def _layer_flags(layer) -> tuple:
        # PyTorch's fp32 matmul precision decides TF32 dots for fp32 layers (a plan constant).
        return layer.relu, layer.use_tile_map, layer.backend, torch.get_float32_matmul_precision()

    def _plan(self, layer, x, task, operands: _LayerOperands):
        from packnet_kernels import linear

        mixed = type(task) is torch.Tensor
        bias, scale, shift = operands.tables if mixed else operands.rows[0]
        # The checks every call of the checked path makes, once for this input shape and these operands.
        check_linear(x, operands.weight, operands.checked_ids, task, bias, scale, shift, dtypes=KERNEL_DTYPES)
        check_tile_map("masked_linear", operands.tile_map, operands.weight, operands.free_weights_zero)
        plan = linear.linear_plan(
            x,
            operands.weight,
            operands.ids,
            bias,
            scale,
            shift,
            layer.relu,
            True,
            operands.tile_map,
            operands.free_weights_zero,
            task if mixed else None,
            operands.id_bits,
        )
        return _LinearLaunch(plan, operands, mixed)


class _Conv2dLaunch:
    """One input shape's launch of a packed conv layer: its conv plan's key and geometry."""

    __slots__ = ("key", "operands", "mixed", "geometry", "device")

    def __init__(self, key, operands: _LayerOperands, mixed: bool, geometry: tuple, device: torch.device):
        self.key, self.operands, self.mixed, self.geometry, self.device = key, operands, mixed, geometry, device

    def __call__(self, x: torch.Tensor, task) -> torch.Tensor:
        from packnet_kernels import conv2d
        from packnet_kernels._checks import as_is, on_device

        ops = self.operands
        if self.mixed:
            (bias, scale, shift), active, tasks = ops.tables, 0, task
        else:
            (bias, scale, shift), active, tasks = ops.rows[task - 1], task, None
        stride, pads, dilation, groups, relu = self.geometry
        with on_device(self.device):
            return conv2d._launch(
                x,
                ops.weight,
                ops.ids,
                active,
                bias,
                scale,
                shift,
                stride,
                pads,
                dilation,
                groups,
                relu,
                True,
                ops.tile_map,
                ops.free_weights_zero,
                tasks,
                wrap=as_is,
                cache_plan=True,
                plan_key=self.key,
            )


class Conv2dLaunchPlans(_LaunchPlans):
    """The launch plans of a :class:`~packnet.PackedConv2d`."""

    @staticmethod
    def _layer_flags(layer) -> tuple:
        return (
            layer.relu,
            layer.use_tile_map,
            layer.backend,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            torch.backends.cudnn.allow_tf32,
        )

    def _plan(self, layer, x, task, operands: _LayerOperands):
        from packnet_kernels import conv2d

        mixed = type(task) is torch.Tensor
        weight = operands.weight
        if operands.id_bits != 8:
            return None  # compact ids: the conv launcher's checked path knows how to pass them
        if mixed and not conv2d.mixed_kernel_applies(weight.shape[1], weight.shape[0] // layer.groups, layer.groups):
            return None  # one launch per task present, reading the tasks on the host: the checked path
        bias, scale, shift = operands.tables if mixed else operands.rows[0]
        if mixed:
            bias, scale, shift = (None if v is None else v.contiguous() for v in (bias, scale, shift))
            operands.tables = (bias, scale, shift)
        _, stride, padding, dilation = check_conv2d(
            x,
            weight,
            operands.ids,
            task,
            bias,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            scale,
            shift,
            dtypes=KERNEL_DTYPES,
        )
        check_tile_map("masked_conv2d", operands.tile_map, weight, operands.free_weights_zero)
        pads = conv2d._resolve_padding(padding, weight.shape[2:], dilation)
        tasks = task if mixed else None
        key = conv2d._plan_key(
            x,
            weight,
            operands.ids,
            bias,
            scale,
            shift,
            stride,
            pads,
            dilation,
            layer.groups,
            layer.relu,
            True,
            operands.tile_map,
            operands.free_weights_zero,
            tasks,
        )
        geometry = (stride, pads, dilation, layer.groups, layer.relu)
        return _Conv2dLaunch(key, operands, mixed, geometry, x.device)
