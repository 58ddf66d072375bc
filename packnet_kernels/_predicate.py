"""The task predicate shared by every kernel: which weights a task may use, element by element and tile by tile."""

from __future__ import annotations

import triton
import triton.language as tl

from ._decode_asm import DECODE_ASM, FIELD_KEEP_ASM, FIELD_SELECT_ASM


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


# ---------------------------------------------------------------------------------------------------------------- #
# Compact ids in words (packnet_kernels.id_layout; convs): 2 or 4 bits per weight, decoded a word at a time.

_NIBBLE_ASM = tl.constexpr(DECODE_ASM[4])
_CRUMB_ASM = tl.constexpr(DECODE_ASM[2])


@triton.jit
def _pair_mask(words, task, FIRST: tl.constexpr, ID_BITS: tl.constexpr):
    """The pair mask of fields ``FIRST`` and ``FIRST + 1`` of every word, field by field (the decode's Triton form,
    which the interpreter runs: it cannot run PTX)."""
    FIELD: tl.constexpr = (1 << ID_BITS) - 1
    low = (words >> (FIRST * ID_BITS)) & FIELD
    high = (words >> ((FIRST + 1) * ID_BITS)) & FIELD
    return tl.where((low != 0) & (low <= task), 0xFFFF, 0) | tl.where((high != 0) & (high <= task), -65536, 0)


@triton.jit
def _interleave4(m0, m1, m2, m3):
    """``[..., 2, 2]`` whose flattened last two axes hold ``m0..m3`` in order (``join`` appends an axis)."""
    return tl.join(tl.join(m0, m2), tl.join(m1, m3))


@triton.jit
def owned_pair_masks(words, task, ID_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Pair masks of compact ids: int32 ``[rows, W * 16 / ID_BITS]`` from int32 ``words`` ``[rows, W]`` for an int
    ``task`` >= 1: mask ``i`` covers the weights ``2i`` and ``2i + 1`` of the words' span, ``0xFFFF`` in the low
    half where the first is owned by a task in ``1..task``, in the high half for the second (``id_layout.
    owned_pair_masks`` is the spec). ``USE_ASM``: the PTX of ``_decode_asm`` (one pass over each word, about 1.5
    instructions per weight); else the same masks field by field."""
    FIELD: tl.constexpr = (1 << ID_BITS) - 1
    task = tl.minimum(task, FIELD)
    if USE_ASM:
        ONES: tl.constexpr = 0x11111111 if ID_BITS == 4 else 0x55555555
        LOW: tl.constexpr = 0x77777777 if ID_BITS == 4 else 0x55555555
        c = (FIELD - task).to(tl.uint32) * ONES
        c_low = c & LOW
        if ID_BITS == 4:
            m0, m1, m2, m3 = tl.inline_asm_elementwise(
                _NIBBLE_ASM, "=r,=r,=r,=r,r,r,r", [words, c_low, c], dtype=(tl.int32,) * 4, is_pure=True, pack=1
            )
            masks = _interleave4(m0, m1, m2, m3)
        else:
            m0, m1, m2, m3, m4, m5, m6, m7 = tl.inline_asm_elementwise(
                _CRUMB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [words, c_low, c], dtype=(tl.int32,) * 8, is_pure=True,
                pack=1,
            )  # fmt: skip
            masks = tl.join(_interleave4(m0, m2, m4, m6), _interleave4(m1, m3, m5, m7))
    else:
        if ID_BITS == 4:
            masks = _interleave4(
                _pair_mask(words, task, 0, 4),
                _pair_mask(words, task, 2, 4),
                _pair_mask(words, task, 4, 4),
                _pair_mask(words, task, 6, 4),
            )
        else:
            even = _interleave4(
                _pair_mask(words, task, 0, 2),
                _pair_mask(words, task, 4, 2),
                _pair_mask(words, task, 8, 2),
                _pair_mask(words, task, 12, 2),
            )
            odd = _interleave4(
                _pair_mask(words, task, 2, 2),
                _pair_mask(words, task, 6, 2),
                _pair_mask(words, task, 10, 2),
                _pair_mask(words, task, 14, 2),
            )
            masks = tl.join(even, odd)
    ROWS: tl.constexpr = words.shape[0]
    PAIRS: tl.constexpr = words.shape[1] * (16 // ID_BITS)
    return tl.reshape(masks, (ROWS, PAIRS))


@triton.jit
def element_masks(pair_masks, WIDE: tl.constexpr):
    """Per-weight masks ``[rows, 2 * pairs]`` of pair masks ``[rows, pairs]``: int16 halves (0 or -1), or with
    ``WIDE`` (32-bit weights) int32 ones."""
    if WIDE:
        low = (pair_masks << 16) >> 16
        high = pair_masks >> 16
    else:
        low = pair_masks.to(tl.int16)
        high = (pair_masks >> 16).to(tl.int16)
    ROWS: tl.constexpr = pair_masks.shape[0]
    COLUMNS: tl.constexpr = 2 * pair_masks.shape[1]
    return tl.reshape(tl.join(low, high), (ROWS, COLUMNS))


@triton.jit
def keep_owned(w, masks):
    """``w`` with the weights whose mask is 0 replaced by +0.0: an integer AND on the bits, so a NaN/Inf there is
    dropped like the select drops it. ``masks`` as :func:`element_masks` gives for ``w``'s width."""
    INT: tl.constexpr = tl.int16 if w.dtype.primitive_bitwidth == 16 else tl.int32
    return (w.to(INT, bitcast=True) & masks).to(w.dtype, bitcast=True)


# ---------------------------------------------------------------------------------------------------------------- #
# The fields layout (packnet_kernels.id_layout; linear layers): field ``FIELD`` of each byte masks a weight tile of
# the same shape, element for element.

_NIBBLE_SELECT = tl.constexpr(FIELD_SELECT_ASM[4])
_CRUMB_SELECT = tl.constexpr(FIELD_SELECT_ASM[2])


@triton.jit
def keep_field_owners(w, ids, FIELD: tl.constexpr, TASK: tl.constexpr, ID_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """``w`` (16-bit) with the weights task ``TASK`` (1..``2**ID_BITS - 1``) does not own set to +0.0, from field
    ``FIELD`` of the uint8 ``ids`` (same shape as ``w``; the stored field is ``(id - 1) mod 2**ID_BITS``: owned where
    it is below ``TASK``). ``USE_ASM``: ``_decode_asm.field_select_asm`` per pair of weights, an fp16 compare of
    the bytes and an AND of the weights' bits (a NaN/Inf in a weight the task does not own is dropped) in one pure
    block, elementwise with the task a constant: what lets Triton (3.6, 3.9) keep the whole chain in the registers
    of wgmma's operand; else a select."""
    if USE_ASM:
        if ID_BITS == 4:
            ASM: tl.constexpr = _NIBBLE_SELECT.value[FIELD][TASK]
        else:
            ASM: tl.constexpr = _CRUMB_SELECT.value[FIELD][TASK]
        w = tl.inline_asm_elementwise(ASM, "=r,r,h", [w, ids], dtype=w.dtype, is_pure=True, pack=2)
    else:
        MASK: tl.constexpr = (1 << ID_BITS) - 1
        w = tl.where(((ids >> (FIELD * ID_BITS)) & MASK) < TASK, w, 0.0)
    return w


_NIBBLE_KEEP = tl.constexpr(FIELD_KEEP_ASM[4])
_CRUMB_KEEP = tl.constexpr(FIELD_KEEP_ASM[2])


@triton.jit
def field_pair_masks(words, shift, task, ID_BITS: tl.constexpr):
    """Pair masks int32 ``[rows, 2 W]`` (as :func:`owned_pair_masks` gives them) of int32 ``words`` ``[rows, W]``
    holding one field each of the fields layout, 4 ids a word, for a run-time ``task`` >= 1: field ``shift /
    ID_BITS`` of every byte, owned where it is below the task (``_decode_asm.field_keep_asm``)."""
    FIELD: tl.constexpr = (1 << ID_BITS) - 1
    c = (127 - FIELD + tl.minimum(task, FIELD)).to(tl.int32) * 0x01010101
    if ID_BITS == 4:
        ASM: tl.constexpr = _NIBBLE_KEEP
    else:
        ASM: tl.constexpr = _CRUMB_KEEP
    m01, m23 = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r", [words, shift, c], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)  # fmt: skip
    ROWS: tl.constexpr = words.shape[0]
    PAIRS: tl.constexpr = 2 * words.shape[1]
    return tl.reshape(tl.join(m01, m23), (ROWS, PAIRS))
