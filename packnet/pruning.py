"""Magnitude pruning on task-id tensors: which weights a task keeps and which it releases."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packnet_kernels import MAX_TASKS


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


def magnitude_task_ids(weight: torch.Tensor, num_tasks: int, prune_ratio: float) -> torch.Tensor:
    """Task ids from nested magnitude pruning of a fixed weight, as PackNet would assign them.

    Task 1 owns every weight, releases the ``prune_ratio`` smallest; task 2 takes the released ones and releases the
    ``prune_ratio`` smallest of those; and so on. After ``num_tasks`` tasks a ``prune_ratio ** num_tasks`` fraction
    is free (id 0). Returns a ``uint8`` tensor shaped like ``weight``; used for benchmarks and tests.
    """
    if not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(f"num_tasks must be in 1..{MAX_TASKS}, got {num_tasks}")
    task_ids = torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
    for task in range(1, num_tasks + 1):
        task_ids[task_ids == 0] = task
        task_ids[release_smallest(weight, task_ids, task, prune_ratio)] = 0
    return task_ids
