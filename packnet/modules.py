"""Packed drop-in modules: one shared weight, its ``task_ids`` and per-task biases, epilogues and small modules.

``PackedLinear``/``PackedConv2d`` replace ``nn.Linear``/``nn.Conv2d``; ``TaskSwitch`` holds one copy per task of a
module whose state is per task (a BatchNorm, a classifier head). The active task is set for a whole model with
:func:`set_task` (also a context manager) or passed per call as ``model(x, task=t)`` (a packed model built by
:func:`packnet.compile_pack`, :func:`packnet.load_pack` or :func:`swap_packed_` takes the argument whatever its
architecture: see :func:`accept_task_argument`) or ``module(x, task=t)``.

Mixed-task batches: the task may also be a 1-D integer tensor with one task per row (per image for convs, per row of
the flattened leading dimensions for linears): row ``i`` then gives, row for row, what a run of task ``tasks[i]``
gives. Checked where: :func:`set_task` checks a task tensor's values against every module's ``num_tasks`` once (one
device sync, at set time); a per-call ``task=`` tensor has its dtype and shape checked on every call and its values
only on the CPU (no sync on the GPU's hot path: a packed layer with per-task biases or epilogues writes NaN rows for a
task beyond its tables). A :class:`TaskSwitch` runs each task's module on that task's rows (it reads the task values
on the host), and its outputs must have one shape per row across tasks: heads with different output sizes cannot
share a mixed batch (a ``ValueError`` says so; run such heads per task).
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from packnet_kernels import MAX_TASKS, bits_for, compact_task_ids, masked_conv2d, masked_linear, tile_map
from packnet_kernels._checks import (
    TASK_TENSOR_DTYPES,
    check_backend,
    check_task_values,
    conv_reads_compact_ids,
    enter_packed_forward,
    leave_packed_forward,
    linear_rows,
)
from packnet_kernels.reference import empty_rows_like

from .launch_plans import Conv2dLaunchPlans, LinearLaunchPlans
from .models import INPUT_SHAPE_ATTR

__all__ = [
    "PackedConv2d",
    "PackedLinear",
    "TaskParameters",
    "TaskSwitch",
    "accept_task_argument",
    "set_task",
    "swap_packed_",
    "task_modules",
]

# Attribute of a packed model holding its plain architecture (the model before packing) on the meta device: shapes
# and module classes, no weights. save_pack rebuilds the written file on it to check it, and fingerprints it.
SKELETON_ATTR = "_packnet_skeleton"


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are on the meta device (no memory).

    Non-persistent buffers stay real: a pack does not store them, so a model rebuilt on this skeleton needs them.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for key, buffer in module._buffers.items():
            if buffer is not None and key not in module._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def record_skeleton(model: nn.Module, skeleton: nn.Module) -> None:
    """Attach ``skeleton`` (the plain model ``model`` was packed from) to ``model`` as a meta-device copy."""
    # object.__setattr__: an nn.Module attribute would register it as a submodule (and put it in the state dict).
    object.__setattr__(model, SKELETON_ATTR, meta_skeleton(skeleton))


def recorded_skeleton(model: nn.Module) -> nn.Module | None:
    """The meta-device plain skeleton recorded by :func:`record_skeleton`, or None."""
    return getattr(model, SKELETON_ATTR, None)


def _check_num_tasks(num_tasks: int) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"num_tasks must be an int in 1..{MAX_TASKS}, got {num_tasks!r}")
    return num_tasks


# The packed-model calls in progress on this thread, outermost first: ``(model, args, kwargs)``. Read only when a
# packed layer refuses its input, to name the layer and the shape the caller gave (see _input_error).
_MODEL_CALLS = threading.local()


def _model_calls() -> list:
    calls = getattr(_MODEL_CALLS, "stack", None)
    if calls is None:
        calls = _MODEL_CALLS.stack = []
    return calls


def _push_model_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    # Not while torch.compile traces: a compiled forward's errors are raised at trace time, and dynamo would break
    # the graph on the thread-local (fullgraph=True would fail).
    if not torch.compiler.is_compiling():
        _model_calls().append((model, args, kwargs))


def _pop_model_call() -> None:
    if not torch.compiler.is_compiling():
        calls = _model_calls()
        if calls:
            calls.pop()


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _input_error(layer: nn.Module, error: Exception, shape_mismatch: bool) -> Exception:
    """``error`` (a refused input) of the same type, its message naming the layer inside the model the caller called
    and, for a wrong input size, the shape the caller gave and the one the model takes. Unchanged for a layer called
    on its own (the caller's input is the layer's)."""
    calls = _model_calls()
    if not calls:
        return error
    model, args, kwargs = calls[0]
    name = next((name for name, module in model.named_modules() if module is layer), None)
    if name is None:
        return error
    message = str(error)
    for prefix in ("masked_linear: ", "masked_conv2d: ", f"{type(layer).__name__}: "):
        message = message.removeprefix(prefix)
    message = f"layer {name!r} ({type(layer).__name__}) of {type(model).__name__}: {message}"
    if shape_mismatch:
        given = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if given is not None:
            message += f"; the model was called with an input of shape {tuple(given.shape)}"
        expected = getattr(model, INPUT_SHAPE_ATTR, None)
        if expected is not None:
            message += f" and takes (batch, {', '.join(map(str, expected))})"
    return type(error)(message)


def _require_tensor(layer: nn.Module, x) -> None:
    if not isinstance(x, torch.Tensor):
        fix = "; convert it with torch.from_numpy(x)" if type(x).__module__ == "numpy" else ""
        raise _input_error(
            layer, TypeError(f"{type(layer).__name__}: input must be a torch.Tensor, got {_type_name(x)}{fix}"), False
        )


class _TaskSelecting(nn.Module):
    """Shared task bookkeeping: ``num_tasks``, ``active_task`` and the per-call override."""

    num_tasks: int
    active_task: int | None

    def _resolve_task(self, task: int | torch.Tensor | None, check_values: bool = False) -> int | torch.Tensor:
        """The call's task (else the active one) checked: an int in 1..num_tasks, or a 1-D integer task tensor whose
        values are checked on the CPU or with ``check_values`` (a device sync on a GPU)."""
        task = self.active_task if task is None else task
        if task is None:
            raise RuntimeError(f"{type(self).__name__}: no active task; call packnet.set_task(model, t) or pass task=t")
        # A 0-D tensor is refused below like any other non-int (a mixed batch's tasks are 1-D).
        if isinstance(task, torch.Tensor) and task.dim() == 1:
            if task.dtype not in TASK_TENSOR_DTYPES:
                raise TypeError(
                    f"{type(self).__name__}: a task tensor must have an integer dtype (one task per row), got"
                    f" {task.dtype}"
                )
            if check_values or not (task.is_cuda or torch.compiler.is_compiling()):
                check_task_values(type(self).__name__, task, self.num_tasks)
            return task
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"{type(self).__name__}: task must be an int, got {type(task).__name__} {task!r}")
        if not 1 <= task <= self.num_tasks:
            raise ValueError(
                f"{type(self).__name__}: task {task} is outside 1..{self.num_tasks} (this model holds"
                f" {self.num_tasks} task{'s' if self.num_tasks > 1 else ''})"
            )
        return task


# The last per-sample task tensor spread over rows, for the next layer of the same forward: (weak reference to the
# per-sample tasks, their version counter, rows per sample, the spread tensor). Every layer of one forward then gets
# the same spread tensor, so the kernels sort a mixed batch once per forward (see packnet_kernels.linear).
_LAST_SPREAD: list = []


def spread_tasks(what: str, task: torch.Tensor, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, tasks)`` with one task per row of an op whose input ``x`` has ``rows`` rows (a linear's flattened leading
    dimensions, an embedding's indices, a conv's images).

    The batch is dimension 0, and a task tensor of ``x.shape[0]`` entries is one task per sample, spread over the
    sample's rows: a ``[B]`` task tensor for ``[B, S, H]`` or ``[B, S]`` inputs runs every token of sample ``i`` with
    task ``tasks[i]``. An input of one sample (``[1, S, ...]``: a position embedding's ``[1, S]`` ids, a buffer
    broadcast over the batch) meets ``B > 1`` tasks by being expanded to ``B`` samples, each its task's result, so
    that it broadcasts as before. Otherwise a task tensor of ``rows`` entries gives one task per row. Sequence-first
    layouts (``[S, B, H]``) must pass one task per row.

    Raises:
        ValueError: a task tensor whose length fits none of these.
    """
    count = task.shape[0]
    samples = x.shape[0] if x.dim() else 0
    if count == samples:
        return x, task if count == rows else _spread(task, rows // max(count, 1))
    if samples == 1 and count > 1:
        return x.expand(count, *x.shape[1:]), _spread(task, rows)
    if count == rows:
        return x, task
    raise ValueError(
        f"{what}: {count} tasks for an input of shape {tuple(x.shape)}: give one task per sample (dimension 0,"
        f" {samples}) or one per row ({rows})"
    )


def _spread(task: torch.Tensor, per_sample: int) -> torch.Tensor:
    """``task`` with each entry repeated ``per_sample`` times (no device sync), the same tensor object for the same
    (unchanged) task tensor within a forward."""
    cacheable = not (torch.compiler.is_compiling() or task.is_inference())
    if cacheable and _LAST_SPREAD:
        reference, version, last_per_sample, spread = _LAST_SPREAD
        if reference() is task and version == task._version and last_per_sample == per_sample:
            return spread
    spread = task.repeat_interleave(per_sample)
    if cacheable:
        _LAST_SPREAD[:] = [weakref.ref(task), task._version, per_sample, spread]
    return spread


class _PackedLayer(_TaskSelecting):
    """Common storage of the packed layers: weight, task ids, per-task bias and per-task epilogue.

    ``kind`` names the layer type in a pack; ``weight_key`` and ``bias_key`` are the plain module's state-dict names
    of the packed weight and of the bias stored per task."""

    kind = "linear"
    weight_key = "weight"
    bias_key = "bias"
    # Whether this layer's kernel reads compact run-time ids (see uses_compact_ids).
    COMPACT_IDS = False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "_compact_state" in self.__dict__:  # storage made (_init_storage)
            self._place_ids()
        return self

    def _init_storage(self, weight_shape, num_tasks, bias, device, dtype, backend, out_features=None) -> None:
        self.num_tasks = _check_num_tasks(num_tasks)
        self.backend = check_backend(backend)
        self.active_task = None
        out_features = weight_shape[0] if out_features is None else out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(weight_shape, **factory), requires_grad=False)
        self.register_buffer("task_ids", torch.zeros(weight_shape, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(num_tasks, out_features, **factory), requires_grad=False) if bias else None
        # A fused per-task epilogue (a folded BatchNorm): y = relu?((conv + bias[t]) * scale[t] + shift[t]).
        self.register_buffer("scale", None)
        self.register_buffer("shift", None)
        self.relu = False
        # The unfused normalisation a compile folded in, kept so a pack can be saved with its original parameters.
        self.fused_norm_name: str | None = None
        self.fused_norm_keys: list[str] = []
        # True when the folded normalisation was one module shared by all tasks, not one per task.
        self.fused_norm_shared = False
        # Let the kernels skip what a task does not use (see tile_map_state); never saved, always recomputed.
        self.use_tile_map = True
        self._tile_state: tuple | None = None
        # The kernels' run-time ids (packnet_kernels.id_layout), derived from task_ids when needed: see kernel_ids.
        self._compact_state: tuple | None = None
        self._place_ids()

    def load_packed(
        self,
        weight: torch.Tensor,
        task_ids: torch.Tensor,
        biases: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Copy in the shared weight (free entries forced to exactly 0), its ids and one bias per task."""
        if weight.shape != self.weight.shape or task_ids.shape != self.weight.shape:
            raise ValueError(
                f"{type(self).__name__}: expected weight and task_ids of shape {tuple(self.weight.shape)}, got"
                f" {tuple(weight.shape)} and {tuple(task_ids.shape)}"
            )
        if task_ids.dtype != torch.uint8:
            raise TypeError(f"{type(self).__name__}: task_ids must be torch.uint8, got {task_ids.dtype}")
        if task_ids.numel() and int(task_ids.max()) > self.num_tasks:
            raise ValueError(
                f"{type(self).__name__}: task_ids hold task {int(task_ids.max())} but the layer has {self.num_tasks}"
            )
        with torch.no_grad():
            owned = task_ids.to(self.weight.device) != 0
            self.weight.copy_(torch.where(owned, weight.to(self.weight), torch.zeros_like(self.weight)))
            self.task_ids.copy_(task_ids)
            if self.bias is not None:
                if biases is None or len(biases) != self.num_tasks:
                    raise ValueError(f"{type(self).__name__}: expected {self.num_tasks} per-task biases")
                for task_index, bias in enumerate(biases):
                    self.bias[task_index].copy_(bias)

    def set_epilogue(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor,
        relu: bool,
        norm_name: str | None = None,
        norm_state: Mapping[str, torch.Tensor] | None = None,
        norm_shared: bool = False,
    ) -> None:
        """Fuse a per-task affine epilogue: ``scale``/``shift`` ``[num_tasks, out]``; ReLU last if ``relu``.

        ``norm_state`` (per-task stacked tensors of the folded normalisation, keyed by its state-dict keys) is kept
        only so that the unfused parameters can be written back into a pack; ``norm_shared`` says they were one
        module shared by all tasks (then every task's slice is the same) and go back as shared state.
        """
        expected = (self.num_tasks, self.bias_features())
        if scale.shape != expected or shift.shape != expected:
            raise ValueError(f"epilogue scale and shift must have shape {expected}")
        self.scale = scale.to(self.weight).contiguous()
        self.shift = shift.to(self.weight).contiguous()
        self.relu = bool(relu)
        self.fused_norm_name = norm_name
        self.fused_norm_keys = list(norm_state or {})
        self.fused_norm_shared = bool(norm_shared)
        for key, value in (norm_state or {}).items():
            self.register_buffer(_norm_buffer_name(key), value.clone())

    def bias_features(self) -> int:
        """Length of one task's bias and epilogue vectors (the output features)."""
        return self.weight.shape[0]

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, task_ids)`` as the kernels read them (views of the stored tensors, never copies): the stored
        ones for Linear and Conv2d; a transposed view for a weight stored ``[in, out]``, a height-1 view for a 1-D
        conv. Tile maps are computed on these."""
        return self.weight, self.task_ids

    def fused_norm_state(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s state dict of the normalisation folded into this layer (empty when none)."""
        return {key: getattr(self, _norm_buffer_name(key))[task - 1] for key in self.fused_norm_keys}

    def _epilogue(self, task: int | torch.Tensor):
        """Task ``task``'s bias, scale and shift; for a task tensor the whole ``[num_tasks, out]`` tables."""
        if isinstance(task, torch.Tensor):
            return self.bias, self.scale, self.shift
        bias = None if self.bias is None else self.bias[task - 1]
        scale = None if self.scale is None else self.scale[task - 1]
        shift = None if self.shift is None else self.shift[task - 1]
        return bias, scale, shift

    def tile_map_state(self) -> tuple[torch.Tensor, bool]:
        """``(tile_map, free_weights_zero)`` of the current ``task_ids`` and ``weight``, recomputed whenever either was
        replaced or modified in place (their version counters say so) and reused otherwise.

        ``tile_map`` is :func:`packnet_kernels.tile_map` of ``task_ids`` on their device; ``free_weights_zero`` is
        True when every free weight (id 0) is exactly zero, checked here (one device sync per recomputation), never
        assumed: only then may the kernels read tiles whose owners are all visible without their ids. Inside
        ``torch.compile`` the state last computed eagerly is used as it is. Writes the version counters do not see
        (``.data``, NumPy, DLPack) need :meth:`refresh_tile_map`."""
        if torch.compiler.is_compiling():
            return self._tile_state[1], self._tile_state[2]
        weight, task_ids = self.weight, self.task_ids
        key = (weight.data_ptr(), weight._version, task_ids.data_ptr(), task_ids._version, weight.device)
        if self._tile_state is None or self._tile_state[0] != key:
            with torch.no_grad():
                ids = self.kernel_operands()[1].to(weight.device)  # a host copy beside compact ids on a GPU
                free_weights_zero = bool(((task_ids.to(weight.device) != 0) | (weight == 0)).all())
            self._tile_state = (key, tile_map(ids).contiguous(), free_weights_zero)
        return self._tile_state[1], self._tile_state[2]

    def uses_compact_ids(self) -> bool:
        """True when the device holds the compact run-time ids (:mod:`packnet_kernels.id_layout`: 2 bits per weight
        up to 3 tasks, 4 up to 15) instead of the uint8 ``task_ids``, which then stay on the host: a layer whose
        kernel reads them (``COMPACT_IDS``) on a CUDA device with at most 15 tasks."""
        return self.COMPACT_IDS and self.weight.is_cuda and bits_for(self.num_tasks) < 8

    def _place_ids(self) -> None:
        """After a move: the uint8 ids on the weight's device, or on the host beside compact ids on the device."""
        device = torch.device("cpu") if self.uses_compact_ids() else self.weight.device
        if self.task_ids.device != device:
            self.task_ids = self.task_ids.to(device)
        self._compact_state = None

    def kernel_ids(self, x: torch.Tensor):
        """The ids a kernel call on ``x`` reads: the compact run-time ids (:meth:`compact_ids`) when
        :meth:`uses_compact_ids` and the kernel runs; else ``task_ids`` on the weight's device (the reference backend
        reads uint8 ids)."""
        kernel_path = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        if kernel_path and self.uses_compact_ids():
            return self.compact_ids()
        return self.task_ids.to(self.weight.device)

    def compact_ids(self):
        """``task_ids`` in the kernels' run-time layout on the weight's device (:func:`packnet_kernels.
        compact_task_ids`), derived whenever the ids were replaced or written in place (their version counter) and
        reused otherwise; inside ``torch.compile``, the last ones made eagerly. Ids made under
        ``torch.inference_mode`` keep no version counter: their compact copy is derived on every call."""
        if torch.compiler.is_compiling() and self._compact_state is not None:
            return self._compact_state[1]
        task_ids = self.task_ids
        key = (task_ids.data_ptr(), task_ids._version, self.weight.device)
        if task_ids.is_inference() or self._compact_state is None or self._compact_state[0] != key:
            with torch.no_grad():
                compact = compact_task_ids(task_ids.to(self.weight.device), self.num_tasks)
            if task_ids.is_inference():
                return compact
            self._compact_state = (key, compact)
        return self._compact_state[1]

    def device_id_bytes(self) -> int:
        """Bytes the task ids take on the weight's device: the compact ids' where the layer holds them, else the uint8
        ids'."""
        if self.uses_compact_ids():
            return self.compact_ids().nbytes()
        return self.task_ids.numel() * self.task_ids.element_size()

    def refresh_tile_map(self) -> None:
        """Forget the tile map, so that the next kernel call recomputes it (and re-checks free weights). Needed only
        after writing ``weight`` or ``task_ids`` in a way PyTorch's version counters do not see (through ``.data``,
        NumPy or DLPack): a stale map would skip tiles the new ids use. Writes through PyTorch operations, in place
        or not, are seen without it. The compact run-time ids (:meth:`kernel_ids`) are derived again too, and the
        layer's launch plans (:mod:`packnet.launch_plans`) are forgotten."""
        self._tile_state = None
        self._compact_state = None
        plans = self.__dict__.get("launch_plans")
        if plans is not None:
            plans.clear()

    def _kernel_tile_args(self, x: torch.Tensor) -> dict:
        """The tile-map keywords of a kernel call: none when the reference path runs (it has no use for them) or the
        map is switched off (``use_tile_map = False``), or inside ``torch.compile`` before any eager call made one.
        None either for a weight or ids made under ``torch.inference_mode`` (e.g. a model loaded or moved there):
        such tensors keep no version counter, so a change made in place could not be seen and a stale map would skip
        tiles the new ids use; the kernels then apply the predicate to every element."""
        kernel_path = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        if not (kernel_path and self.use_tile_map):
            return {}
        if torch.compiler.is_compiling():
            if self._tile_state is None:
                return {}
        elif self.weight.is_inference() or self.task_ids.is_inference():
            return {}
        cells, free_weights_zero = self.tile_map_state()
        return {"tile_map": cells, "free_weights_zero": free_weights_zero}

    def owned_counts(self) -> list[int]:
        """Weights owned per task, index 0 = free."""
        return torch.bincount(self.task_ids.flatten().long(), minlength=self.num_tasks + 1).tolist()


def _norm_buffer_name(key: str) -> str:
    return "fused_norm__" + key.replace(".", "__")


class PackedLinear(_PackedLayer):
    """``nn.Linear`` for a pack: ``y = x @ where(task_ids in 1..t, W, 0)^T + bias[t]`` (+ fused epilogue).

    Shapes: ``weight``/``task_ids`` ``[out, in]``, ``bias`` ``[num_tasks, out]``; input ``[..., in]``. On a CUDA
    device with at most 15 tasks the kernel reads compact ids (2 or 4 bits per weight, derived from ``task_ids``)
    and ``task_ids`` stays on the host: see :meth:`uses_compact_ids`.
    """

    COMPACT_IDS = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tasks: int,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), num_tasks, bias, device, dtype, backend)
        self.launch_plans = LinearLaunchPlans()

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedLinear:
        """Pack ``linear``'s weight with ``task_ids``; each task gets ``biases[t-1]`` or else ``linear.bias``."""
        packed = cls(
            linear.in_features,
            linear.out_features,
            num_tasks,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            backend=backend,
        )
        if biases is None and linear.bias is not None:
            biases = [linear.bias.detach()] * num_tasks
        packed.load_packed(linear.weight.detach(), task_ids, biases)
        return packed

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``; ``task`` an int or a task tensor with one entry per sample (``x``'s
        dimension 0) or per row of ``x.reshape(-1, in)`` (:func:`spread_tasks`)."""
        task = self._resolve_task(task)
        _require_tensor(self, x)
        if isinstance(task, torch.Tensor):
            x, task = spread_tasks(type(self).__name__, task, x, linear_rows(x))
        # An eager kernel call on an input shape seen before: its launch plan, checked then (packnet.launch_plans).
        launch = self.launch_plans.lookup(self, x, task)
        if launch is not None:
            return launch(x, task)
        bias, scale, shift = self._epilogue(task)
        weight, _ = self.kernel_operands()
        try:
            return masked_linear(
                x,
                weight,
                self.kernel_ids(x),
                task,
                bias,
                scale=scale,
                shift=shift,
                relu=self.relu,
                backend=self.backend,
                **self._kernel_tile_args(x),
            )
        except (TypeError, ValueError) as error:
            raise _input_error(self, error, x.dim() < 1 or x.shape[-1] != self.in_features) from None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}, fused_epilogue={self.scale is not None}, relu={self.relu}"
        )


class PackedConv2d(_PackedLayer):
    """``nn.Conv2d`` for a pack: ``y = conv2d(x, where(task_ids in 1..t, W, 0)) + bias[t]`` (+ fused epilogue).

    Shapes: ``weight``/``task_ids`` ``[out, in/groups, kh, kw]``, ``bias`` ``[num_tasks, out]``; input ``[N, C, H, W]``.
    """

    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        num_tasks: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_storage((out_channels, in_channels // groups, *kernel_size), num_tasks, bias, device, dtype, backend)
        self._use_kernel_layout()
        self.launch_plans = Conv2dLaunchPlans()

    COMPACT_IDS = True

    def uses_compact_ids(self) -> bool:
        """As for a linear layer, where this conv's kernel reads compact ids (``packnet_kernels.conv2d.
        compact_ids_apply``: 16 or more channels per group, not a depthwise conv)."""
        cin_per_group, cout_per_group = self.in_channels // self.groups, self.out_channels // self.groups
        return super().uses_compact_ids() and conv_reads_compact_ids(cin_per_group, cout_per_group, self.groups)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._use_kernel_layout()
        return self

    def _use_kernel_layout(self) -> None:
        """On CUDA, hold ``weight`` and ``task_ids`` K-contiguous: ``[out, kh, kw, in/groups]`` in memory (PyTorch's
        channels_last), so the Triton kernel loads a tap's input channels as 16-byte vectors. On the CPU, PyTorch's
        default layout, so the reference path computes exactly what ``nn.Conv2d`` does. Shapes never change, and a
        saved pack always holds the default layout."""
        memory_format = torch.channels_last if self.weight.is_cuda else torch.contiguous_format
        if not self.weight.is_contiguous(memory_format=memory_format):
            self.weight.data = self.weight.data.contiguous(memory_format=memory_format)
        if not self.task_ids.is_contiguous(memory_format=memory_format):
            self.task_ids = self.task_ids.contiguous(memory_format=memory_format)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedConv2d:
        """Pack ``conv``'s weight with ``task_ids``; each task gets ``biases[t-1]`` or else ``conv.bias``.

        Raises:
            ValueError: ``conv`` pads with a mode other than zeros.
        """
        if conv.padding_mode != "zeros":
            raise ValueError(f"PackedConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        packed = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            num_tasks,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            backend=backend,
        )
        if biases is None and conv.bias is not None:
            biases = [conv.bias.detach()] * num_tasks
        packed.load_packed(conv.weight.detach(), task_ids, biases)
        return packed

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, C, H, W]``; ``task`` an int or a task tensor ``[N]``, one task per image (an input of one image
        meets ``[B]`` tasks expanded: :func:`spread_tasks`)."""
        task = self._resolve_task(task)
        _require_tensor(self, x)
        if isinstance(task, torch.Tensor):
            x, task = spread_tasks(type(self).__name__, task, x, x.shape[0] if x.dim() else 0)
        # An eager kernel call on an input shape seen before: its launch plan, checked then (packnet.launch_plans).
        launch = self.launch_plans.lookup(self, x, task)
        if launch is not None:
            return launch(x, task)
        bias, scale, shift = self._epilogue(task)
        try:
            return masked_conv2d(
                x,
                self.weight,
                self.kernel_ids(x),
                task,
                bias,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                scale=scale,
                shift=shift,
                relu=self.relu,
                backend=self.backend,
                **self._kernel_tile_args(x),
            )
        except (TypeError, ValueError) as error:
            raise _input_error(self, error, x.dim() != 4 or x.shape[1] != self.in_channels) from None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}, fused_epilogue={self.scale is not None}, relu={self.relu}"
        )


class TaskSwitch(_TaskSelecting):
    """One copy per task of a module whose state differs between tasks (BatchNorm, a head); runs the active one."""

    def __init__(self, per_task: Sequence[nn.Module]):
        super().__init__()
        self.per_task = nn.ModuleList(per_task)
        self.num_tasks = _check_num_tasks(len(self.per_task))
        self.active_task = None

    def forward(self, *args, task: int | torch.Tensor | None = None, **kwargs):
        """The task's module on ``args``. With a task tensor (one task per sample of ``args[0]``), each task's module
        runs on its samples (``args[0][rows]``; the other arguments as they are) and the results are put back in
        order (a tensor, or tuples, lists and dicts of them, e.g. a ``ModelOutput``). An ``args[0]`` of one sample
        (a ``[1, S]`` buffer broadcast over the batch) meets ``B`` tasks by being expanded to ``B`` samples.

        Raises:
            ValueError: a task tensor whose length is neither ``args[0]``'s nor broadcast from 1, a task outside
                1..num_tasks (checked on the host, where the task values are read anyway), or tasks whose outputs
                differ in shape beyond the batch dimension (e.g. heads with different numbers of classes).
        """
        task = self._resolve_task(task)
        if not isinstance(task, torch.Tensor):
            return self.per_task[task - 1](*args, **kwargs)
        return run_per_task_rows(
            "TaskSwitch", task, self.num_tasks, args, kwargs, lambda each_task: self.per_task[each_task - 1]
        )


def run_per_task_rows(what: str, task: torch.Tensor, num_tasks: int, args: tuple, kwargs: dict, run_task):
    """A mixed batch run one task at a time: ``run_task(t)(args[0][rows of t], *args[1:], **kwargs)`` for each task
    ``t`` present, the results put back row by row (see :meth:`TaskSwitch.forward`)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError(f"{what}: a mixed batch needs the batch as the first positional argument, a tensor")
    batch, *rest = args
    if batch.dim() and batch.shape[0] == 1 and task.shape[0] > 1:
        batch = batch.expand(task.shape[0], *batch.shape[1:])
    if not batch.dim() or task.shape[0] != batch.shape[0]:
        rows = batch.shape[0] if batch.dim() else 0
        raise ValueError(f"{what}: {task.shape[0]} tasks for an input of {rows} rows")
    present = torch.unique(task).tolist()
    # The values are on the host now anyway: a task outside 1..num_tasks would otherwise index another task's
    # module (task 0 is per_task[-1]).
    if present and not 1 <= present[0] <= present[-1] <= num_tasks:
        bad = present[0] if present[0] < 1 else present[-1]
        raise ValueError(f"{what}: every task must be in 1..{num_tasks}, got {bad}")
    if not present:  # an empty batch: any task's module gives the shape
        return run_task(1)(batch, *rest, **kwargs)
    parts = []
    for each_task in present:
        rows = (task == each_task).nonzero().squeeze(1).to(batch.device)
        parts.append((each_task, rows, run_task(each_task)(batch[rows], *rest, **kwargs)))
    return _merge_rows(what, parts, batch.shape[0])


def _merge_rows(what: str, parts: list, count: int):
    """Put per-task results back in row order: ``parts`` is ``[(task, rows, output)]``, every output of the same
    structure (a tensor, None, or a tuple, list or dict of them)."""
    first_task, _, first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        result = empty_rows_like(first, count)
        for each_task, rows, part in parts:
            if part.shape[1:] != result.shape[1:]:
                raise ValueError(
                    f"{what}: task {each_task}'s output has per-row shape {tuple(part.shape[1:])} but task"
                    f" {first_task}'s has {tuple(result.shape[1:])}; a mixed batch needs one output shape (run"
                    " tasks with different heads separately)"
                )
            result[rows] = part
        return result
    if isinstance(first, Mapping):
        merged = {key: _merge_rows(what, [(t, r, part[key]) for t, r, part in parts], count) for key in first}
        return type(first)(**merged) if type(first) is not dict else merged
    if isinstance(first, (tuple, list)):
        merged = [
            _merge_rows(what, [(t, r, part[index]) for t, r, part in parts], count) for index in range(len(first))
        ]
        return type(first)(*merged) if hasattr(first, "_fields") else type(first)(merged)
    raise TypeError(f"{what}: cannot merge a mixed batch's outputs of type {type(first).__name__} row by row")


# Name of the submodule holding the per-task values of the parameters and buffers a module holds itself (see
# TaskParameters); the module reads them through properties of its class, swapped for a subclass.
TASK_STATE_NAME = "packnet_task_state"
_TASK_STATE_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


class TaskParameters(_TaskSelecting):
    """Per-task values of the parameters and buffers one module holds itself beside packed children (a class token, a
    position embedding, a layer scale, a norm's weight in a module that also holds packed layers).

    Each value is stored stacked, ``[num_tasks, *shape]``, as a buffer named like the original; the owning module
    (see :func:`hold_task_state`) reads ``module.<name>`` as the active task's ``[*shape]`` value, so its own
    ``forward`` runs unchanged. A mixed batch runs the owning module once per task present, on that task's samples
    (the value has one task's shape; no broadcasting rule could be right for every use of it).
    """

    def __init__(self, per_task: Mapping[str, Sequence[torch.Tensor]]):
        super().__init__()
        counts = {len(values) for values in per_task.values()}
        if len(counts) != 1:
            raise ValueError(f"TaskParameters: every value needs one tensor per task, got counts {sorted(counts)}")
        self.num_tasks = _check_num_tasks(counts.pop())
        self.active_task = None
        self.names = list(per_task)
        for name, values in per_task.items():
            self.register_buffer(name, torch.stack([value.detach() for value in values]))

    def value(self, name: str) -> torch.Tensor:
        """The active task's value of ``name`` (task 1's while ``torch.fx`` traces with no active task)."""
        if self.active_task is None and _fx_tracing():
            return self._buffers[name][0]
        task = self._resolve_task(None)
        if isinstance(task, torch.Tensor):
            raise RuntimeError(
                f"TaskParameters: {name!r} read during a mixed batch outside its module's forward; the module runs"
                " once per task present (read the value inside forward)"
            )
        return self._buffers[name][task - 1]

    def task_value(self, name: str, task: int) -> torch.Tensor:
        """Task ``task``'s value of ``name``."""
        return self._buffers[name][task - 1]

    def extra_repr(self) -> str:
        return f"{', '.join(self.names)}, num_tasks={self.num_tasks}"


def _fx_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` traces (not torch.export or torch.compile)."""
    symbolic = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return symbolic() if symbolic is not None else torch.fx._symbolic_trace.is_fx_tracing()


def _read_task_value(name: str):
    def read(module: nn.Module) -> torch.Tensor:
        return module._modules[TASK_STATE_NAME].value(name)

    return property(read, doc=f"The active task's {name!r} (packnet.TaskParameters)")


def _forward_per_task(self, *args, **kwargs):
    """A module holding per-task values: with a task tensor active, its own forward once per task present, on that
    task's samples (with the int task active in its whole subtree), the results put back in row order."""
    holder = self._modules[TASK_STATE_NAME]
    task = holder.active_task
    plain_forward = super(type(self), self).forward
    if not isinstance(task, torch.Tensor):
        return plain_forward(*args, **kwargs)

    def run_task(each_task: int):
        def run(*task_args, **task_kwargs):
            with set_task(self, each_task):
                return plain_forward(*task_args, **task_kwargs)

        return run

    return run_per_task_rows(type(self).__name__, task, holder.num_tasks, args, kwargs, run_task)


def hold_task_state(module: nn.Module, per_task: Mapping[str, Sequence[torch.Tensor]]) -> TaskParameters:
    """Move the parameters and buffers ``per_task`` names (the module's own, local names) into a
    :class:`TaskParameters` submodule of ``module`` holding one value per task, in place; ``module``'s class becomes a
    subclass (same name) whose properties read the active task's values and whose forward runs a mixed batch one task
    at a time. Returns the holder.

    Raises:
        KeyError: a name that is not a parameter or buffer ``module`` holds itself.
    """
    names = tuple(per_task)
    for name in names:
        if module._parameters.get(name) is None and module._buffers.get(name) is None:
            raise KeyError(f"hold_task_state: {type(module).__name__} holds no parameter or buffer {name!r}")
    holder = TaskParameters(per_task)
    for name in names:
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)
    base = type(module)
    key = (base, names)
    if key not in _TASK_STATE_CLASSES:
        namespace = {name: _read_task_value(name) for name in names}
        namespace.update(forward=_forward_per_task, __module__=base.__module__, __qualname__=base.__qualname__)
        namespace["__doc__"] = base.__doc__
        _TASK_STATE_CLASSES[key] = type(base.__name__, (base,), namespace)
    module.__class__ = _TASK_STATE_CLASSES[key]
    module.add_module(TASK_STATE_NAME, holder)
    return holder


def task_modules(model: nn.Module) -> list[_TaskSelecting]:
    """Every module of ``model`` that selects by task (packed layers and task switches)."""
    return [module for module in model.modules() if isinstance(module, _TaskSelecting)]


class _ActiveTask:
    """Result of :func:`set_task`: the change is already made; as a context manager it is undone on exit."""

    def __init__(self, previous: list[tuple[_TaskSelecting, int | None]]):
        self._previous = previous

    def __enter__(self) -> _ActiveTask:
        return self

    def __exit__(self, *exc_info) -> None:
        for module, task in self._previous:
            module.active_task = task


def set_task(model: nn.Module, task: int | torch.Tensor) -> _ActiveTask:
    """Make ``task`` the active task of every packed module in ``model``.

    Use plainly (``set_task(model, 2)``) or as a context manager (``with set_task(model, 2): ...``), which restores
    the previous task on exit. ``task`` may be a 1-D integer tensor of per-row tasks (a mixed batch: the next
    forward's batch must have that many rows); its values are checked here, once (a device sync on a GPU).

    Raises:
        ValueError: ``model`` has no packed modules, or a task is outside 1..num_tasks of some module.
        TypeError: ``task`` is neither an int nor a 1-D integer tensor.
    """
    modules = task_modules(model)
    if not modules:
        raise ValueError("set_task: the model has no packed modules (compile or swap_packed_ it first)")
    for module in modules:
        module._resolve_task(task, check_values=True)
    previous = [(module, module.active_task) for module in modules]
    for module in modules:
        module.active_task = task
    return _ActiveTask(previous)


# Attribute of a packed model with the call hooks of accept_task_argument: the stack of its calls in progress, each
# entry the active tasks a ``task=`` argument replaced (None when it replaced nothing).
_TASK_CALLS_ATTR = "_packnet_task_calls"
# Attribute set on a model whose own forward names a ``task`` parameter: the signature, so that the hooks find the
# task wherever the caller put it (by keyword or by position) and still hand it to the forward.
_OWN_TASK_ATTR = "_packnet_own_task_signature"


def _names_task_parameter(forward) -> inspect.Signature | None:
    """``forward``'s signature when it declares a parameter named ``task`` (not merely ``**kwargs``), else None.

    ``**kwargs`` says nothing about what a forward does with ``task``: every Hugging Face model takes ``**kwargs``
    and silently ignores a ``task`` in them, so a model is never trusted to handle the task because of it."""
    signature = inspect.signature(forward)
    task = signature.parameters.get("task")
    if task is None or task.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
        return None
    return signature


def _call_task(model: nn.Module, args: tuple, kwargs: dict):
    """The ``task`` of one call and the keyword arguments to forward with. A forward without its own ``task``
    parameter never sees the argument; one that names it gets it back where the caller put it."""
    signature = getattr(model, _OWN_TASK_ATTR, None)
    if signature is None:
        return kwargs.pop("task", None), kwargs
    if "task" in kwargs:
        return kwargs["task"], kwargs
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None, kwargs  # the forward itself raises the caller's mistake with its own message
    return bound.arguments.get("task"), kwargs


def _task_call_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Enter the packed forward and make the call's ``task`` the active task of every packed module of ``model``
    for this call (checked against each of them first), whether or not the model's forward takes ``task`` itself."""
    calls = getattr(model, _TASK_CALLS_ATTR)
    # Pushed and entered first: the restoring hook runs (pops and leaves) even when the check below raises.
    calls.append(None)
    _push_model_call(model, args, kwargs)
    enter_packed_forward()
    task, kwargs = _call_task(model, args, kwargs)
    if task is None:
        return args, kwargs
    modules = task_modules(model)
    for module in modules:
        module._resolve_task(task)
    calls[-1] = [(module, module.active_task) for module in modules]
    for module in modules:
        module.active_task = task
    return args, kwargs


def _task_call_hook(model: nn.Module, args: tuple, output):
    """Restore the active tasks a ``task=`` call changed and leave the packed forward (also when it raised)."""
    calls = getattr(model, _TASK_CALLS_ATTR)
    if not calls:
        return  # a hook registered ahead of ours raised before ours ran: nothing was changed
    previous = calls.pop()
    _pop_model_call()
    leave_packed_forward()
    for module, task in previous or ():
        module.active_task = task


def accept_task_argument(model: nn.Module) -> nn.Module:
    """Let ``model(x, task=t)`` run task ``t`` (an int, or a 1-D integer tensor of per-row tasks) in every packed
    module of ``model`` for that call only, whatever the model's architecture; returns ``model``.

    The task is taken out of the call's keyword arguments before ``forward`` runs (a forward hook, so ``forward``
    itself and its ``torch.fx`` tracing stay unchanged), made the active task of every packed module, and the
    previous active tasks are restored after the call, also when it raises. ``task=None`` runs the active task
    (:func:`set_task`). A forward that declares a parameter named ``task`` still receives it (by keyword or by
    position, as the caller gave it), and every packed module runs that task too; a forward that only takes
    ``**kwargs`` (every Hugging Face model) never sees it: ``**kwargs`` is never read as "the model handles the
    task itself". Checked on every call like ``module(x, task=t)``: the type, and a task tensor's dtype and shape;
    its values on the CPU only (on a GPU a packed layer writes NaN rows for a task beyond its tables; a
    :class:`TaskSwitch` reads the values anyway and raises). ``torch.compile(model, fullgraph=True)`` traces the
    hooks into its one graph; an int ``task=`` then compiles one graph per task value, so set it with
    :func:`set_task` outside the compiled call instead. Like :func:`set_task`, the active task belongs to the model,
    not to a thread: threads that run one model at once must not give different tasks (give each thread its own
    model).

    The hooks also mark each call as one packed forward, inside which the kernels may reuse what they derived from
    a mixed batch's task tensor for an earlier layer (its sort by task). Called by
    :func:`packnet.build_packed_model` (so :func:`packnet.compile_pack` and :func:`packnet.load_pack`) and
    :func:`swap_packed_`. Calling it again changes nothing.

    Raises:
        ValueError: at call time, a task outside 1..num_tasks of some module (a task tensor's values: CPU only).
        TypeError: at call time, a task that is neither an int nor a 1-D integer tensor.
    """
    if hasattr(model, _TASK_CALLS_ATTR):
        return model
    signature = _names_task_parameter(model.forward)
    if signature is not None:
        object.__setattr__(model, _OWN_TASK_ATTR, signature)
    object.__setattr__(model, _TASK_CALLS_ATTR, [])
    model.register_forward_pre_hook(_task_call_pre_hook, with_kwargs=True)
    model.register_forward_hook(_task_call_hook, always_call=True)
    return model


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def swap_packed_(
    model: nn.Module, task_ids: Mapping[str, torch.Tensor], num_tasks: int, backend: str = "auto"
) -> nn.Module:
    """Replace in place each module named in ``task_ids`` by its packed twin: ``nn.Linear``, ``nn.Conv1d``,
    ``nn.Conv2d``, ``nn.Embedding``, transformers' ``Conv1D`` or ``nn.MultiheadAttention`` (see
    :mod:`packnet.layers`).

    ``task_ids`` maps qualified module names to ``uint8`` tensors shaped like that module's packed weight (an
    attention's ``in_proj_weight``). Biases are shared by all tasks (use :func:`packnet.compile_pack` for per-task
    biases from training); every other module (BatchNorm, LayerNorm, unpacked layers) stays as it is and is saved in
    a pack as state shared by all tasks. The plain model is recorded (shapes only) so that :func:`packnet.save_pack`
    can check what it writes. Returns ``model``.

    Raises:
        KeyError: a name that is not a submodule.
        TypeError: a module of no packable kind, or an attention's ``out_proj`` named without the attention
            (``nn.MultiheadAttention`` reads it directly).
        ValueError: a module of a packable kind in a configuration that is not (e.g. ``padding_mode='reflect'``).
    """
    from .layers import kind_of, pack_layer

    _check_num_tasks(num_tasks)
    if recorded_skeleton(model) is None:
        record_skeleton(model, model)
    for name, ids in task_ids.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise KeyError(f"swap_packed_: the model has no submodule {name!r}") from error
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child_name == "out_proj" and isinstance(parent, nn.MultiheadAttention) and parent_name not in task_ids:
            raise TypeError(
                f"swap_packed_: {name!r} is the out_proj of nn.MultiheadAttention {parent_name!r}, whose forward reads"
                f" its weight directly; pack the attention too (name {parent_name!r} with its in_proj ids)"
            )
        kind = kind_of(module)
        if kind is None:
            raise TypeError(
                f"swap_packed_: {name!r} is a {type(module).__name__}, not a packable layer (nn.Linear, nn.Conv1d,"
                " nn.Conv2d, nn.Embedding, transformers' Conv1D, nn.MultiheadAttention)"
            )
        _replace_submodule(model, name, pack_layer(kind, module, ids, num_tasks, backend=backend))
    return accept_task_argument(model)
