"""The task predicate shared by every kernel: which weights a task may use, element by element and tile by tile."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def task_owns(ids, active_task):
    """``(ids != 0) & (ids <= active_task)`` for a uint8 ``ids`` tile and an int ``active_task`` in 1..255.

    One unsigned byte compare per element instead of a widening and two compares: ``ids - 1`` wraps the free id 0
    to 255, which no task exceeds, and maps an owner k to k - 1, which is below ``active_task`` exactly when
    k <= active_task.
    """
    return (ids - 1) < active_task.to(tl.uint8)


@triton.jit
def tile_use(smallest, largest, active_task):
    """``(used, all_visible)`` of one kernel tile, from the tile-map cells it covers: ``smallest``/``largest`` are
    ``[rows, cols]`` uint8 tiles of the cells' smallest and largest nonzero task ids (0 and 0 for an all-free cell).

    ``used``: some weight of the tile belongs to a task in 1..active_task; otherwise the task's weight is zero on the
    whole tile and nothing of it needs reading. ``all_visible``: every nonzero id is <= active_task, so the only
    weights of the tile the task does not own are free ones (exactly zero in a validated pack).
    """
    largest = largest.to(tl.int32)
    # A free cell has no owner: 256 is above every task.
    smallest = tl.where(largest == 0, 256, smallest.to(tl.int32))
    owner_min = tl.min(tl.min(smallest, axis=1), axis=0)
    owner_max = tl.max(tl.max(largest, axis=1), axis=0)
    return owner_min <= active_task, owner_max <= active_task
