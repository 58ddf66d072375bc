"""Magnitude pruning on task-id tensors: which weights a task keeps and which it releases."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packnet_kernels import MAX_TASKS
from packnet_kernels.reference import gemm_matrix


def prune_ratio_for(prune_ratio: float | Sequence[float], task: int) -> float:
    """The fraction task ``task`` (1-based) releases: ``prune_ratio`` itself or its ``task-1``-th entry.

    Raises:
        ValueError: a ratio outside [0, 1) or a schedule too short for ``task``.
    """
    if isinstance(prune_ratio, (int, float)):
        ratio = float(prune_ratio)
    else:
        schedule = list(prune_ratio)
        if task > len(schedule):
            raise ValueError(f"prune_ratio schedule has {len(schedule)} entries but task {task} is being trained")
        ratio = float(schedule[task - 1])
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1) (the fraction of a task's weights released), got {ratio}")
    return ratio


def release_smallest(weight: torch.Tensor, task_ids: torch.Tensor, task: int, prune_ratio: float) -> torch.Tensor:
    """Boolean mask of the ``round(prune_ratio * n)`` smallest-magnitude weights among the ``n`` owned by ``task``.

    Ties are broken by position (a stable sort), so the choice is the same on every run and every rank.
    """
    owned = (task_ids == task).flatten()
    owned_index = owned.nonzero().squeeze(1)
    n_release = int(round(prune_ratio * owned_index.numel()))
    release = torch.zeros_like(owned)
    if n_release:
        magnitudes = weight.detach().flatten()[owned_index].abs().float()
        order = torch.sort(magnitudes, stable=True).indices
        release[owned_index[order[:n_release]]] = True
    return release.view_as(task_ids)


def check_granularity(prune_granularity) -> str | tuple[int, int]:
    """``"element"`` or a ``(rows, cols)`` pair of positive ints, returned as given (the pair as a tuple).

    Raises:
        ValueError: anything else.
    """
    if prune_granularity == "element":
        return "element"
    if (
        isinstance(prune_granularity, (tuple, list))
        and len(prune_granularity) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in prune_granularity)
    ):
        return tuple(prune_granularity)
    raise ValueError(
        f"prune_granularity must be 'element' or a (rows, cols) pair of positive ints, got {prune_granularity!r}"
    )


def release_smallest_blocks(
    weight: torch.Tensor, task_ids: torch.Tensor, task: int, prune_ratio: float, block: tuple[int, int]
) -> torch.Tensor:
    """Boolean mask releasing whole blocks: the ``round(prune_ratio * n)`` blocks of smallest L2 norm among the
    ``n`` blocks holding weights of ``task``.

    Blocks tile the weight as the kernels read it (:func:`packnet_kernels.reference.gemm_matrix`: a Linear's
    ``[out, in]``, a Conv2d's ``[out, kh * kw * in/groups]`` with channels fastest), ``block = (rows, cols)``, the
    last row and column of blocks possibly partial. A block's norm counts the task's weights in it only, and only
    those are released, so when every task prunes by blocks from the start each block ends with one owner or none
    (32 x 32 blocks match the kernels' tile-map cells). Ties are broken by block position.
    """
    matrix_ids = gemm_matrix(task_ids)
    owned = matrix_ids == task
    magnitudes = torch.where(owned, gemm_matrix(weight.detach()).float(), 0.0)
    rows, cols = matrix_ids.shape
    block_rows, block_cols = block
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    padded_rows, padded_cols = grid[0] * block_rows, grid[1] * block_cols

    def blocks(tensor):
        padded = tensor.new_zeros(padded_rows, padded_cols)
        padded[:rows, :cols] = tensor
        return padded.reshape(grid[0], block_rows, grid[1], block_cols)

    squares = blocks(magnitudes.square()).sum(dim=(1, 3)).flatten()
    holds_task = blocks(owned).any(dim=3).any(dim=1).flatten()
    candidates = holds_task.nonzero().squeeze(1)
    n_release = int(round(prune_ratio * candidates.numel()))
    chosen = torch.zeros(grid[0] * grid[1], dtype=torch.bool, device=weight.device)
    if n_release:
        order = torch.sort(squares[candidates], stable=True).indices
        chosen[candidates[order[:n_release]]] = True
    per_element = chosen.view(grid[0], 1, grid[1], 1).expand(grid[0], block_rows, grid[1], block_cols)
    release = per_element.reshape(padded_rows, padded_cols)[:rows, :cols] & owned
    if task_ids.dim() == 4:
        out, channels, kernel_h, kernel_w = task_ids.shape
        release = release.reshape(out, kernel_h, kernel_w, channels).permute(0, 3, 1, 2)
    return release.contiguous()


def magnitude_task_ids(
    weight: torch.Tensor,
    num_tasks: int,
    prune_ratio: float | Sequence[float],
    granularity: str | tuple[int, int] = "element",
) -> torch.Tensor:
    """Task ids from nested magnitude pruning of a fixed weight, as PackNet would assign them.

    Task 1 owns every weight, releases the ``prune_ratio`` smallest; task 2 takes the released ones and releases the
    ``prune_ratio`` smallest of those; and so on (``prune_ratio`` may also give one ratio per task). With a float
    ratio, after ``num_tasks`` tasks a ``prune_ratio ** num_tasks`` fraction is free (id 0). ``granularity``
    ``(rows, cols)`` releases whole blocks (:func:`release_smallest_blocks`). Returns a ``uint8`` tensor shaped like
    ``weight``; used for benchmarks and tests.
    """
    if not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"num_tasks must be in 1..{MAX_TASKS}, got {num_tasks}")
    granularity = check_granularity(granularity)
    task_ids = torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
    for task in range(1, num_tasks + 1):
        task_ids[task_ids == 0] = task
        ratio = prune_ratio_for(prune_ratio, task)
        if granularity == "element":
            release = release_smallest(weight, task_ids, task, ratio)
        else:
            release = release_smallest_blocks(weight, task_ids, task, ratio, granularity)
        task_ids[release] = 0
    return task_ids
