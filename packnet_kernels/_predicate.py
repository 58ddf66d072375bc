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
def tile_bounds(map_ptrs, cell_mask, stride_map_plane, bound, used_by, visible_to, RAW_TILES: tl.constexpr):
    """``(bound, ids_bound)``: the load bounds of one kernel tile, narrowed by the tile-map cells it covers.

    ``map_ptrs`` points at the cells' smallest nonzero task ids (``[rows, cols]`` uint8; the largest lie
    ``stride_map_plane`` further; 0 and 0 for an all-free cell), ``cell_mask`` marks the cells that exist. ``bound``
    (the tile's extent along its reduction) becomes 0 when no weight of the tile belongs to a task in 1..``used_by``:
    the tile is zero for every such task and nothing of it needs reading. ``ids_bound`` is ``bound``, or 0 with
    ``RAW_TILES`` when every owner is <= ``visible_to``, so that the only weights the task does not own are free ones
    (exactly zero in a validated pack) and its ids need no reading. Loads masked against these bounds stay vector
    loads: the masks still compare offsets with scalars.
    """
    smallest = tl.load(map_ptrs, mask=cell_mask, other=0, eviction_policy="evict_last")
    largest = tl.load(map_ptrs + stride_map_plane, mask=cell_mask, other=0, eviction_policy="evict_last").to(tl.int32)
    # A free cell has no owner: 256 is above every task.
    smallest = tl.where(largest == 0, 256, smallest.to(tl.int32))
    owner_min = tl.min(tl.min(smallest, axis=1), axis=0)
    owner_max = tl.max(tl.max(largest, axis=1), axis=0)
    bound = tl.where(owner_min <= used_by, bound, 0)
    ids_bound = bound
    if RAW_TILES:
        ids_bound = tl.where(owner_max <= visible_to, 0, bound)
    return bound, ids_bound


@triton.jit
def span_owners(
    row_map_ptrs, cell_row_mask, k_start, k_end, stride_map_plane, CELL_K: tl.constexpr, CHUNK: tl.constexpr
):
    """``(owner_min, owner_max)``, int32 scalars: the smallest and the largest owner among the tile-map cells of a
    program's span, rows ``cell_row_mask`` by reduction offsets ``[k_start, k_end)``; 256 and 0 when every cell is
    free. ``row_map_ptrs`` ``[rows, 1]`` points at each cell row's first cell of smallest owners (the largest lie
    ``stride_map_plane`` further); ``CHUNK`` cells per row are read per step, so a split's span takes one step."""
    offs_cell = tl.arange(0, CHUNK)
    first_cell = k_start // CELL_K
    end_cell = tl.cdiv(k_end, CELL_K)
    owner_min = tl.full((), 256, tl.int32)
    owner_max = tl.full((), 0, tl.int32)
    for cell in range(first_cell, end_cell, CHUNK):
        cell_mask = cell_row_mask[:, None] & (cell + offs_cell < end_cell)[None, :]
        ptrs = row_map_ptrs + (cell + offs_cell)[None, :]
        smallest = tl.load(ptrs, mask=cell_mask, other=0, eviction_policy="evict_last").to(tl.int32)
        largest = tl.load(ptrs + stride_map_plane, mask=cell_mask, other=0, eviction_policy="evict_last")
        largest = largest.to(tl.int32)
        # A free cell has no owner: 256 is above every task.
        smallest = tl.where(largest == 0, 256, smallest)
        owner_min = tl.minimum(owner_min, tl.min(tl.min(smallest, axis=1), axis=0))
        owner_max = tl.maximum(owner_max, tl.max(tl.max(largest, axis=1), axis=0))
    return owner_min, owner_max


@triton.jit
def next_task(tasks, after):
    """The smallest of ``tasks`` (an int32 vector; 0 marks rows that take no part) above ``after``; 256 (no task)
    when there is none: how mixed-task tiles walk the tasks present among their rows."""
    return tl.min(tl.where(tasks > after, tasks, 256), axis=0)


@triton.jit
def next_pass(tasks, done_task, SEGMENTS: tl.constexpr):
    """``(count, last)``: how many tasks of ``tasks`` (as in :func:`next_task`) lie above ``done_task`` among the next
    ``SEGMENTS`` a mixed tile's pass takes, and the last of them (256 when fewer than ``SEGMENTS`` remain): the pass
    sums every task in ``(done_task, last]``."""
    count = 0
    last = done_task
    for _ in tl.static_range(SEGMENTS):
        last = next_task(tasks, last)
        count += (last < 256).to(tl.int32)
    return count, last
