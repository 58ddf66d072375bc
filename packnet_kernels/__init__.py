"""Masked linear and conv2d for PackNet packs: ``op(x, where(task_ids in 1..task, weight, 0))``.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the pure-PyTorch reference elsewhere;
``"triton"`` forces the kernels (on the CPU only under ``TRITON_INTERPRET=1``); ``"reference"`` forces the reference.
Importing this package imports neither Triton nor CUDA: the kernels load on first use.
"""

from __future__ import annotations

import torch

from ._checks import MAX_TASKS, check_conv2d, check_linear, check_tile_map, interpreter_enabled, resolve_backend
from .reference import effective_weight, masked_conv2d_ref, masked_linear_ref, task_mask, tile_map

__all__ = [
    "MAX_TASKS",
    "effective_weight",
    "interpreter_enabled",
    "masked_conv2d",
    "masked_conv2d_ref",
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
    task_ids: torch.Tensor,
    task: int,
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
        task_ids: ``[out, in]`` uint8; 0 = free, k = owned by task k.
        task: int in 1..255; the weights of tasks 1..task are used.
        bias, scale, shift: optional ``[out]`` vectors in ``x``'s dtype (the per-task epilogue).
        relu: apply ReLU last.
        tile_map: optional :func:`~packnet_kernels.reference.tile_map` of ``task_ids`` (what the packed layers
            pass): the Triton kernels then skip the tiles task ``task`` does not use. It only changes what is read.
        free_weights_zero: with ``tile_map``, the caller guarantees free weights are exactly zero, so tiles whose
            owners are all visible to ``task`` read no ids (see :func:`packnet_kernels.linear.masked_linear_triton`).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., out]`` in ``x``'s dtype.

    Raises:
        TypeError: wrong dtypes (``task_ids`` not uint8, mixed float dtypes, ``task`` not an int).
        ValueError: ``task`` outside 1..255, mismatched shapes or devices, unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    backend = resolve_backend(backend, x)
    if backend == "reference":
        task = check_linear(x, weight, task_ids, task, bias, scale, shift)
        check_tile_map("masked_linear", tile_map, weight, free_weights_zero)
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
    task_ids: torch.Tensor,
    task: int,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
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
        task: int in 1..255.
        bias, scale, shift: optional ``[out]`` vectors (the per-task epilogue, e.g. a folded BatchNorm).
        stride, dilation: int or pair; padding: int, pair, ``"same"`` or ``"valid"``; groups: int.
        tile_map, free_weights_zero: as for :func:`masked_linear`, the map of ``reference.gemm_matrix(task_ids)``;
            the kernel uses it where its tiles line up with the cells (``C/groups`` a multiple of 32).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, out, H_out, W_out]`` in ``x``'s dtype.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`masked_linear`, plus bad conv geometry.
    """
    backend = resolve_backend(backend, x)
    if backend == "reference":
        task, stride, padding, dilation = check_conv2d(
            x, weight, task_ids, task, bias, stride, padding, dilation, groups, scale, shift
        )
        check_tile_map("masked_conv2d", tile_map, weight, free_weights_zero)
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
