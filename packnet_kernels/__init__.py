"""Masked linear and conv2d for PackNet packs: ``op(x, where(task_ids in 1..task, weight, 0))``.

``task`` is an int (every row runs that task) or an integer tensor of per-row tasks (a mixed batch: one task per row
of a linear input's flattened leading dimensions, per image of a conv input), with per-task epilogue tables; see
:mod:`packnet_kernels.reference` for the semantics.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the pure-PyTorch reference elsewhere;
``"triton"`` forces the kernels (on the CPU only under ``TRITON_INTERPRET=1``); ``"reference"`` forces the reference.
``masked_embedding`` (a lookup of rows masked by their ids) has the reference only, on every device: it reads just the
rows looked up and their ids, so a kernel would save no pass over the table.
Importing this package imports neither Triton nor CUDA: the kernels load on first use.
"""

from __future__ import annotations

import torch

from ._checks import (
    MAX_TASKS,
    check_backend,
    check_conv2d,
    check_embedding,
    check_linear,
    check_task_values,
    check_tile_map,
    interpreter_enabled,
    resolve_backend,
    task_limit,
)
from .id_layout import CompactTaskIds, bits_for, compact_task_ids, unpack_task_ids
from .reference import (
    effective_weight,
    masked_conv2d_ref,
    masked_embedding_ref,
    masked_linear_ref,
    task_mask,
    tile_map,
)

__all__ = [
    "MAX_TASKS",
    "CompactTaskIds",
    "bits_for",
    "compact_task_ids",
    "unpack_task_ids",
    "effective_weight",
    "interpreter_enabled",
    "masked_conv2d",
    "masked_conv2d_ref",
    "masked_embedding",
    "masked_embedding_ref",
    "masked_linear",
    "masked_linear_ref",
    "task_mask",
    "tile_map",
    "triton_available",
]


def triton_available() -> bool:
    """True when Triton can be imported (it is optional: the reference backend needs only PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require_triton(op: str) -> None:
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the 'triton' package, which is not installed")


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor | CompactTaskIds,
    task: int | torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    tile_map: torch.Tensor | None = None,
    free_weights_zero: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu?((x @ W_t^T + bias) * scale + shift)`` where ``W_t = where(task_ids in 1..task, weight, 0)``.

    Args:
        x: ``[..., in]``, same dtype and device as ``weight``.
        weight: ``[out, in]``, float32/float16/bfloat16 (float64 on the reference backend).
        task_ids: ``[out, in]`` uint8; 0 = free, k = owned by task k. Or the same ids in the kernels' run-time
            layout (:class:`~packnet_kernels.id_layout.CompactTaskIds`, 2 or 4 bits per weight, what a packed layer
            on a GPU passes).
        task: int in 1..255; the weights of tasks 1..task are used. Or a mixed batch: an integer tensor (uint8,
            int8/16/32/64) of shape ``[rows]``, ``rows = x.numel() // in``, on ``x``'s device: row ``i`` of
            ``x.reshape(-1, in)`` runs task ``task[i]``. Its length, dtype and device are checked here; its values
            (1..255, and at most the rows of every epilogue table) on the reference backend and for CPU tensors, not
            for CUDA tensors on the Triton backend (that would cost a device sync per call): there a row whose task
            is out of range comes out all NaN.
        bias: optional ``[out]`` vector in ``x``'s dtype, added first (the per-task epilogue). With a task tensor it
            may also be a ``[num_tasks, out]`` table: row ``i`` uses its row ``task[i] - 1``.
        scale: optional ``[out]`` vector (or, with a task tensor, table) multiplying the result, like ``bias``.
        shift: optional ``[out]`` vector (or, with a task tensor, table) added after ``scale``, like ``bias``.
        relu: apply ReLU last.
        tile_map: optional :func:`~packnet_kernels.reference.tile_map` of ``task_ids`` (what the packed layers
            pass): the Triton kernels then skip the tiles task ``task`` does not use (for a mixed batch, the tiles
            no task of a kernel tile's rows uses). It only changes what is read.
        free_weights_zero: with ``tile_map``, the caller guarantees free weights are exactly zero, so tiles whose
            owners are all visible to ``task`` read no ids (see :func:`packnet_kernels.linear.masked_linear_triton`).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., out]`` in ``x``'s dtype.

    Raises:
        TypeError: wrong dtypes (``task_ids`` not uint8, mixed float dtypes, ``task`` neither an int nor an
            integer tensor).
        ValueError: ``task`` outside 1..255 (see ``task`` for tensors), a task tensor of the wrong length or shape,
            mismatched shapes or devices, unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    backend = resolve_backend(backend, x, "masked_linear")
    if backend == "reference":
        task = check_linear(x, weight, task_ids, task, bias, scale, shift)
        check_tile_map("masked_linear", tile_map, weight, free_weights_zero)
        if isinstance(task, torch.Tensor):
            check_task_values("masked_linear", task, task_limit(bias, scale, shift))
        if isinstance(task_ids, CompactTaskIds):
            task_ids = unpack_task_ids(task_ids)
        return masked_linear_ref(x, weight, task_ids, task, bias, scale=scale, shift=shift, relu=relu)
    _require_triton("masked_linear")
    from .linear import masked_linear_triton

    return masked_linear_triton(
        x,
        weight,
        task_ids,
        task,
        bias,
        scale=scale,
        shift=shift,
        relu=relu,
        tile_map=tile_map,
        free_weights_zero=free_weights_zero,
    )


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor | CompactTaskIds,
    task: int | torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    tile_map: torch.Tensor | None = None,
    free_weights_zero: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``relu?((conv2d(x, W_t) + bias) * scale + shift)`` where ``W_t = where(task_ids in 1..task, weight, 0)``.

    Args:
        x: ``[N, C, H, W]`` (contiguous or channels_last), same dtype and device as ``weight``.
        weight: ``[out, C/groups, kh, kw]``; ``task_ids`` the same shape, uint8.
        task: int in 1..255, or a mixed batch: an integer tensor ``[N]``, one task per image, with ``bias``/``scale``/
            ``shift`` each ``[out]`` or ``[num_tasks, out]`` (as in :func:`masked_linear`). The Triton backend runs
            a mixed batch in one launch where the GEMM kernel's tap-by-tap loop runs (16 or more channels per
            group), else one launch per task present (reading the task values on the host, one device sync).
        bias: optional ``[out]`` vector, or ``[num_tasks, out]`` with a task tensor (as in :func:`masked_linear`).
        stride: int or pair.
        padding: int, pair, ``"same"`` or ``"valid"``.
        dilation: int or pair.
        groups: int.
        scale: optional per-task epilogue factor (e.g. a folded BatchNorm), as in :func:`masked_linear`.
        shift: optional per-task epilogue term, as in :func:`masked_linear`.
        relu: apply ReLU last.
        tile_map: as for :func:`masked_linear`, the map of ``reference.gemm_matrix(task_ids)``; the kernel uses it
            where its tiles line up with the cells (``C/groups`` a multiple of 32).
        free_weights_zero: as for :func:`masked_linear`.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, out, H_out, W_out]`` in ``x``'s dtype.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`masked_linear`, plus bad conv geometry.
    """
    backend = resolve_backend(backend, x, "masked_conv2d")
    if backend == "reference":
        task, stride, padding, dilation = check_conv2d(
            x, weight, task_ids, task, bias, stride, padding, dilation, groups, scale, shift
        )
        check_tile_map("masked_conv2d", tile_map, weight, free_weights_zero)
        if isinstance(task, torch.Tensor):
            check_task_values("masked_conv2d", task, task_limit(bias, scale, shift))
        if isinstance(task_ids, CompactTaskIds):
            task_ids = unpack_task_ids(task_ids)
        return masked_conv2d_ref(
            x, weight, task_ids, task, bias, stride, padding, dilation, groups, scale=scale, shift=shift, relu=relu
        )
    _require_triton("masked_conv2d")
    from .conv2d import masked_conv2d_triton

    return masked_conv2d_triton(
        x,
        weight,
        task_ids,
        task,
        bias,
        stride,
        padding,
        dilation,
        groups,
        scale=scale,
        shift=shift,
        relu=relu,
        tile_map=tile_map,
        free_weights_zero=free_weights_zero,
    )


def masked_embedding(
    indices: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.embedding(indices, W_t)`` where ``W_t = where(task_ids in 1..task, weight, 0)``, without a masked table.

    Args:
        indices: ``[...]`` int64 or int32, each in ``0..num_embeddings-1``, on ``weight``'s device.
        weight: ``[num_embeddings, dim]`` float32/float16/bfloat16/float64; ``task_ids`` the same shape, uint8.
        task: int in 1..255, or a mixed batch: an integer tensor with one task per element of ``indices.reshape(-1)``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``: all run the reference lookup (a gather of the rows
            looked up and their ids, then a select), which reads nothing a kernel would skip.

    Returns:
        ``[..., dim]`` in ``weight``'s dtype.

    Raises:
        TypeError, ValueError: see :func:`packnet_kernels._checks.check_embedding`; an unknown backend.
    """
    check_backend(backend)
    task = check_embedding(indices, weight, task_ids, task)
    return masked_embedding_ref(indices, weight, task_ids, task)
