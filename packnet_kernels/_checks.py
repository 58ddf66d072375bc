"""Argument checks shared by the dispatchers and the Triton launchers: one message per kind of bad input."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from .id_layout import CompactTaskIds

MAX_TASKS = 255
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)
BACKENDS = ("auto", "triton", "reference")


def check_task(task) -> int:
    """Return ``task`` as an int in 1..255; raise ``TypeError``/``ValueError`` otherwise."""
    if isinstance(task, torch.Tensor):
        raise TypeError(
            f"task must be a Python int in 1..{MAX_TASKS} or a 1-D integer tensor [batch] of per-row tasks, got a"
            f" {task.dim()}-D tensor {task!r}"
        )
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task must be an int in 1..{MAX_TASKS}, got {type(task).__name__} {task!r}")
    if not 1 <= task <= MAX_TASKS:
        raise ValueError(f"task must be in 1..{MAX_TASKS} (task 0 means 'free' in task_ids), got {task}")
    return task


TASK_TENSOR_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_task_tensor(op: str, tasks: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """Check a mixed-batch task tensor without reading its values (no host sync): 1-D, ``rows`` long, an integer
    dtype of :data:`TASK_TENSOR_DTYPES`, on ``device``. Returns it. Values are checked by
    :func:`check_task_values` where that is cheap (CPU tensors, the reference).

    Raises:
        TypeError: not an integer tensor (``bool`` and floats included). ValueError: wrong shape or device.
    """
    if tasks.dtype not in TASK_TENSOR_DTYPES:
        raise TypeError(
            f"{op}: a task tensor must have an integer dtype ({', '.join(map(str, TASK_TENSOR_DTYPES))}), got"
            f" {tasks.dtype}"
        )
    if tasks.dim() != 1:
        if tasks.dim() == 0:
            check_task(tasks)  # the int-or-1-D message
        raise ValueError(f"{op}: a task tensor must be 1-D [batch] (one task per row), got shape {tuple(tasks.shape)}")
    if tasks.shape[0] != rows:
        raise ValueError(f"{op}: the task tensor has {tasks.shape[0]} entries but the input has {rows} rows")
    if tasks.device != device:
        raise ValueError(f"{op}: the task tensor is on {tasks.device} but the input is on {device}")
    return tasks


def check_task_values(op: str, tasks: torch.Tensor, limit: int = MAX_TASKS) -> None:
    """Raise ``ValueError`` unless every entry of ``tasks`` is in 1..``limit``. Reads the values: a host sync on a
    GPU, so the Triton launchers call it for CPU tensors only."""
    if tasks.numel() == 0:
        return
    low, high = int(tasks.min()), int(tasks.max())
    if low < 1 or high > limit:
        bad = low if low < 1 else high
        raise ValueError(f"{op}: every task must be in 1..{limit}, got {bad} (task 0 means 'free' in task_ids)")


def task_limit(*tables: torch.Tensor | None) -> int:
    """The largest task a mixed batch may hold: 255, or fewer when a per-task epilogue table has fewer rows."""
    return min([MAX_TASKS] + [table.shape[0] for table in tables if table is not None and table.dim() == 2])


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, x: torch.Tensor, op: str = "input") -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors, ``"reference"`` otherwise; check ``"triton"`` can run here.
    Raises ``TypeError`` when ``x`` is not a tensor (``op`` names the op in the message)."""
    check_backend(backend)
    if not isinstance(x, torch.Tensor):
        kind = type(x)
        name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        fix = "; convert it with torch.from_numpy(x)" if kind.__module__ == "numpy" else ""
        raise TypeError(f"{op}: x must be a torch.Tensor, got {name}{fix}")
    if backend == "auto":
        return "triton" if x.is_cuda else "reference"
    if backend == "triton":
        require_kernel_device("backend='triton'", x)
    return backend


def require_kernel_device(what: str, x: torch.Tensor) -> None:
    """Raise ``RuntimeError`` unless the Triton kernels can run on ``x``: a CUDA tensor, or the interpreter on."""
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{what} needs CUDA tensors (got a tensor on {x.device}); on the CPU the Triton kernels run "
            "only under the interpreter: set TRITON_INTERPRET=1 before importing packnet_kernels, "
            "or use backend='reference'"
        )


def direct_launch_allowed(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """True when a launcher may run straight away instead of through its registered op, whose dispatch costs tens of
    microseconds of host time per call: plain CUDA tensors (or CPU tensors under the interpreter, so that the CPU
    tests run the path a GPU runs), outside ``torch.compile`` and any tracing or dispatch mode (which need the op to
    see the kernel), and no input that autograd would have to track (the op then reports that it has no backward; a
    direct launch would silently return a constant)."""
    return (
        (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled()))
        and type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)))
    )


@functools.cache
def _properties_of(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def device_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device`` (the current one when it has no index), queried once
    per device and never at import."""
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device for a Triton launch; nothing to do (no context switch)
    when it already is."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# How long the autotuners time each candidate config, in ms. Triton's default (25 warm-up, 100 measured) spends
# seconds per shape on a config list and minutes on a model's layers from a cold cache; 20 ms is still hundreds of
# runs of a batch-1 layer and tens of the largest GEMMs.
AUTOTUNE_WARMUP_MS = 5
AUTOTUNE_REP_MS = 20


def autotune_bench(kernel_call, quantiles):
    """The autotuners' timer (``triton.autotune(do_bench=...)``): ``triton.testing.do_bench`` with the short times
    above. Imports Triton when called, never at import."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def ceil_div(numerator: int, denominator: int) -> int:
    """``ceil(numerator / denominator)`` for host-side grid and split arithmetic: ``triton.cdiv`` also works on the
    host, but through Triton's JIT wrapper, at several microseconds a call."""
    return -(-numerator // denominator)


def as_is(kernel):
    """A Triton kernel launched as it is: the ``wrap`` of a direct eager launch (where the registered op would use
    ``torch.library.wrap_triton``)."""
    return kernel


def _check_vector(
    name: str, vector: torch.Tensor | None, length: int, like: torch.Tensor, per_task: bool = False
) -> None:
    """``vector`` is ``[length]``; with ``per_task`` (a mixed batch) it may also be a ``[tasks, length]`` table."""
    if vector is None:
        return
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(vector).__name__}")
    if per_task and vector.dim() == 2:
        if vector.shape[1] != length or vector.shape[0] < 1:
            raise ValueError(
                f"{name} table must have shape (tasks, {length}) (row t-1 for task t), got {tuple(vector.shape)}"
            )
    elif vector.shape != (length,):
        tables = f" or a per-task table (tasks, {length})" if per_task else ""
        raise ValueError(
            f"{name} must have shape ({length},) (one per output channel){tables}, got {tuple(vector.shape)}"
        )
    if vector.dtype != like.dtype:
        raise TypeError(f"{name} dtype {vector.dtype} does not match the input dtype {like.dtype}")
    if vector.device != like.device:
        raise ValueError(f"{name} is on {vector.device} but the input is on {like.device}")


def check_common(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    dtypes=REFERENCE_DTYPES,
    rows: int | None = None,
) -> int | torch.Tensor:
    """Checks shared by every masked op; returns the validated task. ``op`` names the op in messages.

    ``task`` is an int, or (a mixed batch) a 1-D integer tensor of ``rows`` entries, checked by
    :func:`check_task_tensor` without reading its values; the epilogue vectors may then be per-task tables."""
    compact = isinstance(task_ids, CompactTaskIds)
    for name, tensor in (("x", x), ("weight", weight), ("task_ids", task_ids.words if compact else task_ids)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    mixed = isinstance(task, torch.Tensor)
    task = check_task_tensor(op, task, rows, x.device) if mixed else check_task(task)
    if compact:
        check_compact_ids(op, task_ids, weight)
    elif task_ids.dtype != torch.uint8:
        raise TypeError(f"{op}: task_ids must be torch.uint8 (0 = free, k = owned by task k), got {task_ids.dtype}")
    elif task_ids.shape != weight.shape:
        raise ValueError(
            f"{op}: task_ids must have the weight's shape {tuple(weight.shape)}, got {tuple(task_ids.shape)}"
        )
    if weight.dtype not in dtypes:
        raise TypeError(f"{op}: weight dtype {weight.dtype} is not supported; allowed: {', '.join(map(str, dtypes))}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} does not match weight dtype {weight.dtype}")
    device = x.device  # a new object per access: read once
    for name, tensor in (("weight", weight), ("task_ids", task_ids.words if compact else task_ids)):
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but the input is on {device}")
    out_features = weight.shape[0]
    _check_vector(f"{op}: bias", bias, out_features, x, mixed)
    _check_vector(f"{op}: scale", scale, out_features, x, mixed)
    _check_vector(f"{op}: shift", shift, out_features, x, mixed)
    return task


# Convs with at least this many channels per group run the GEMM kernel's tap-by-tap loop (16-byte channel loads).
TAPS_OUTER_MIN_CHANNELS = 16


def uses_direct_conv_kernel(groups: int, cin_per_group: int, cout_per_group: int) -> bool:
    """Grouped convs whose per-group GEMM is thinner than one 16-wide MMA tile go to the direct kernel."""
    return groups > 1 and min(cin_per_group, cout_per_group) < 16


def conv_reads_compact_ids(cin_per_group: int, cout_per_group: int, groups: int) -> bool:
    """Whether the conv kernel of such a layer reads compact ids: the GEMM kernel's tap-by-tap loop (16 or more
    channels per group); the direct (depthwise) kernel and the gathered loop of few channels read uint8 ids."""
    return cin_per_group >= TAPS_OUTER_MIN_CHANNELS and not uses_direct_conv_kernel(
        groups, cin_per_group, cout_per_group
    )


def check_compact_ids(op: str, compact: CompactTaskIds, weight: torch.Tensor) -> None:
    """Compact ids (:class:`~packnet_kernels.id_layout.CompactTaskIds`) must describe ``weight``: its shape, the
    group of its layer kind, int32 contiguous words holding every group."""
    if tuple(compact.shape) != tuple(weight.shape):
        raise ValueError(
            f"{op}: compact task ids are for shape {tuple(compact.shape)}, the weight is {tuple(weight.shape)}"
        )
    if compact.bits not in (2, 4) or compact.group != weight.shape[1]:
        raise ValueError(
            f"{op}: compact task ids must have 2 or 4 bits and groups of {weight.shape[1]} columns, got"
            f" {compact.bits} bits and groups of {compact.group} (build them with id_layout.compact_task_ids)"
        )
    words = compact.words
    groups = math.prod(weight.shape[1:]) // max(compact.group, 1)
    if (
        words.dtype != torch.int32
        or words.dim() != 2
        or not words.is_contiguous()
        or words.shape[0] != weight.shape[0]
        or words.shape[1] < groups * compact.group_words
    ):
        raise ValueError(
            f"{op}: compact task ids need contiguous int32 words [{weight.shape[0]},"
            f" >= {groups * compact.group_words}], got {words.dtype} {tuple(words.shape)} (build them with"
            " id_layout.compact_task_ids)"
        )


# Rows x columns of weight elements per tile-map cell, over the weight as a GEMM operand ``[out, K]`` in the kernels'
# K-contiguous order (``packnet_kernels.reference.tile_map``); every autotuned kernel tile covers whole cells.
TILE_CELL = (32, 32)


class _PackedForward:
    """Packed-model forwards in progress (``depth``; nested ones count once) and a serial number per outermost one.
    Entered and left by the hooks :func:`packnet.accept_task_argument` installs; see :func:`packed_forward`."""

    depth = 0
    serial = 0


def enter_packed_forward() -> None:
    """A packed model's forward begins (called by its pre-hook). Nothing is counted while torch.compile traces: a
    compiled forward calls the registered ops, which never reuse a grouping, and torch 2.11's dynamo cannot trace the
    class attribute's update (a graph break under ``fullgraph=True``)."""
    if torch.compiler.is_compiling():
        return
    _PackedForward.depth += 1
    if _PackedForward.depth == 1:
        _PackedForward.serial += 1


def leave_packed_forward() -> None:
    """A packed model's forward ends, also when it raised (called by its always-called hook)."""
    if torch.compiler.is_compiling():
        return
    _PackedForward.depth = max(_PackedForward.depth - 1, 0)


def packed_forward() -> int | None:
    """The serial number of the packed-model forward in progress, or None outside one. Within one forward a
    launcher may reuse what it derived from a task tensor for an earlier layer: between a model's layers nobody
    writes the task tensor, while between calls it may be rewritten in ways no version counter sees (``.data``,
    NumPy, DLPack, a CUDA graph refilling a static buffer)."""
    return _PackedForward.serial if _PackedForward.depth else None


def check_tile_map(op: str, tile_map: torch.Tensor | None, weight: torch.Tensor, free_weights_zero) -> None:
    """A tile map must be the ``[2, ceil(out / 32), ceil(K / 32)]`` contiguous uint8 of
    :func:`packnet_kernels.reference.tile_map` on the weight's device; ``free_weights_zero`` a bool (and meaningless
    without a map). What the map says is trusted: it must describe these very ids."""
    if not isinstance(free_weights_zero, bool):
        raise TypeError(f"{op}: free_weights_zero must be a bool, got {type(free_weights_zero).__name__}")
    if tile_map is None:
        if free_weights_zero:
            raise ValueError(f"{op}: free_weights_zero=True needs a tile_map (it tells which tiles to read raw)")
        return
    if not isinstance(tile_map, torch.Tensor):
        raise TypeError(f"{op}: tile_map must be a tensor or None, got {type(tile_map).__name__}")
    expected = (2, -(-weight.shape[0] // TILE_CELL[0]), -(-math.prod(weight.shape[1:]) // TILE_CELL[1]))
    if tile_map.dtype != torch.uint8 or tuple(tile_map.shape) != expected or not tile_map.is_contiguous():
        raise ValueError(
            f"{op}: tile_map must be a contiguous uint8 tensor of shape {expected} (packnet_kernels.reference."
            f"tile_map of the task ids), got {tile_map.dtype} {tuple(tile_map.shape)}"
        )
    if tile_map.device != weight.device:
        raise ValueError(f"{op}: tile_map is on {tile_map.device} but the weight is on {weight.device}")


def linear_rows(x: torch.Tensor) -> int:
    """Rows of a linear input ``[..., in]`` once its leading dimensions are flattened."""
    return math.prod(x.shape[:-1]) if x.dim() else 0


def check_linear(x, weight, task_ids, task, bias=None, scale=None, shift=None, dtypes=REFERENCE_DTYPES):
    """Validate a masked linear call; returns the task (an int, or the mixed batch's task tensor)."""
    rows = linear_rows(x) if isinstance(x, torch.Tensor) else None
    task = check_common("masked_linear", x, weight, task_ids, task, bias, scale, shift, dtypes, rows)
    if weight.dim() != 2:
        raise ValueError(f"masked_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"masked_linear: input's last dimension must equal in_features={weight.shape[1]},"
            f" got shape {tuple(x.shape)}"
        )
    return task


def _check_int_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return pair


def check_conv2d(
    x,
    weight,
    task_ids,
    task,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    scale=None,
    shift=None,
    dtypes=REFERENCE_DTYPES,
):
    """Validate a masked conv2d call; returns ``(task, stride, padding, dilation)`` with pairs of ints, except a
    ``padding`` of ``"same"`` or ``"valid"`` which is returned as given."""
    op = "masked_conv2d"
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None
    task = check_common(op, x, weight, task_ids, task, bias, scale, shift, dtypes, rows)
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: out_channels={weight.shape[0]} is not divisible by groups={groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"{op}: input has {x.shape[1]} channels but weight expects in/groups={weight.shape[1]} x groups={groups}"
            f" = {weight.shape[1] * groups}"
        )
    stride = _check_int_pair(op, "stride", stride, 1)
    dilation = _check_int_pair(op, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{op}: padding string must be 'same' or 'valid', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"{op}: padding='same' needs stride 1 (as in torch.nn.functional.conv2d), got {stride}")
    else:
        padding = _check_int_pair(op, "padding", padding, 0)
    kh, kw = weight.shape[2:]
    pad_h, pad_w = (0, 0) if padding == "valid" else ((0, 0) if padding == "same" else padding)
    if padding != "same" and (
        x.shape[2] + 2 * pad_h < dilation[0] * (kh - 1) + 1 or x.shape[3] + 2 * pad_w < dilation[1] * (kw - 1) + 1
    ):
        raise ValueError(
            f"{op}: padded input {x.shape[2] + 2 * pad_h}x{x.shape[3] + 2 * pad_w} is smaller than the dilated kernel"
            f" {dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1}"
        )
    return task, stride, padding, dilation


INDEX_DTYPES = (torch.int64, torch.int32)


def check_embedding(indices, weight, task_ids, task) -> int | torch.Tensor:
    """Validate a masked embedding lookup; returns the task (an int, or the mixed batch's task tensor, one task per
    element of ``indices``). Index values and a task tensor's values are checked for CPU tensors only (on a GPU that
    would be a device sync per lookup; there an index out of range fails in the gather, as in ``F.embedding``).

    Raises:
        TypeError: non-tensors, indices that are not int64/int32, task_ids not uint8, a weight dtype outside
            :data:`REFERENCE_DTYPES`. ValueError: shapes, devices, tasks or an index outside ``0..num_embeddings-1``.
    """
    op = "masked_embedding"
    for name, tensor in (("indices", indices), ("weight", weight), ("task_ids", task_ids)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: indices must be torch.int64 or torch.int32, got {indices.dtype}")
    if isinstance(task, torch.Tensor):
        task = check_task_tensor(op, task, indices.numel(), indices.device)
    else:
        task = check_task(task)
    if task_ids.dtype != torch.uint8:
        raise TypeError(f"{op}: task_ids must be torch.uint8 (0 = free, k = owned by task k), got {task_ids.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [num_embeddings, dim], got shape {tuple(weight.shape)}")
    if task_ids.shape != weight.shape:
        raise ValueError(
            f"{op}: task_ids must have the weight's shape {tuple(weight.shape)}, got {tuple(task_ids.shape)}"
        )
    if weight.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{op}: weight dtype {weight.dtype} is not supported; allowed: {', '.join(map(str, REFERENCE_DTYPES))}"
        )
    for name, tensor in (("weight", weight), ("task_ids", task_ids)):
        if tensor.device != indices.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but the indices are on {indices.device}")
    if indices.numel() and not indices.is_cuda:
        if isinstance(task, torch.Tensor):
            check_task_values(op, task)
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= weight.shape[0]:
            bad = low if low < 0 else high
            raise ValueError(
                f"{op}: index {bad} is outside 0..{weight.shape[0] - 1} (num_embeddings={weight.shape[0]})"
            )
    return task
