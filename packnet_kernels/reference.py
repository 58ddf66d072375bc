"""Pure-PyTorch reference semantics of the masked ops: the spec every kernel is tested against.

The effective weight of task ``t`` is ``where((task_ids != 0) & (task_ids <= t), weight, 0)``: a select, not a
multiply, so an Inf or NaN stored in a weight that task ``t`` does not own never reaches task ``t``'s output.
Everything here runs in any floating dtype, float64 included, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_mask(task_ids: torch.Tensor, task: int) -> torch.Tensor:
    """Boolean mask of the elements task ``task`` may use: ``(task_ids != 0) & (task_ids <= task)``."""
    return (task_ids != 0) & (task_ids <= task)


def effective_weight(weight: torch.Tensor, task_ids: torch.Tensor, task: int) -> torch.Tensor:
    """``where(task_mask(task_ids, task), weight, 0)``, same shape and dtype as ``weight``."""
    return torch.where(task_mask(task_ids, task), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def apply_epilogue(
    y: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    channel_dim: int,
) -> torch.Tensor:
    """``y * scale[c] + shift[c]`` (each optional, per output channel ``c`` along ``channel_dim``), then ReLU."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    if scale is not None:
        y = y * scale.reshape(shape)
    if shift is not None:
        y = y + shift.reshape(shape)
    if relu:
        y = torch.relu(y)
    return y


def masked_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``relu?((x @ W_t^T + bias) * scale + shift)`` with ``W_t = effective_weight(weight, task_ids, task)``.

    Shapes: ``x [..., in]``, ``weight``/``task_ids`` ``[out, in]``, ``bias``/``scale``/``shift`` ``[out]``;
    returns ``[..., out]`` in ``x``'s dtype.
    """
    y = F.linear(x, effective_weight(weight, task_ids, task), bias)
    return apply_epilogue(y, scale, shift, relu, channel_dim=-1)


def masked_conv2d_ref(
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
) -> torch.Tensor:
    """``relu?((conv2d(x, W_t) + bias) * scale + shift)`` with ``W_t = effective_weight(weight, task_ids, task)``.

    Shapes: ``x [N, C, H, W]``, ``weight``/``task_ids`` ``[out, C/groups, kh, kw]``, ``bias``/``scale``/``shift``
    ``[out]``; returns ``[N, out, H_out, W_out]``. ``stride``/``padding``/``dilation`` as in ``F.conv2d``.
    """
    y = F.conv2d(x, effective_weight(weight, task_ids, task), bias, stride, padding, dilation, groups)
    return apply_epilogue(y, scale, shift, relu, channel_dim=1)
