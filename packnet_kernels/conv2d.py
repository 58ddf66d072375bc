"""Masked conv2d in Triton: ``relu?((conv2d(x, W_t) + bias) * scale + shift)``, ``W_t = where(ids in 1..t, W, 0)``.

Two kernels share one launcher:

- ``_masked_conv2d_gemm_kernel``: implicit GEMM. Output pixels are the GEMM rows (``M = N * H_out * W_out``), the
  output channels of one group the columns, ``C/groups * kh * kw`` the reduction. Each step gathers an input tile
  straight from ``x`` (no im2col buffer), loads the matching weight and task-id tiles, selects the weights the task
  owns in registers (no masked weight copy) and feeds ``tl.dot`` with fp32 accumulation.
- ``_masked_conv2d_direct_kernel``: for depthwise and other small groups, where a per-group GEMM would fill a
  16-wide MMA tile with a handful of channels. A tile spans output channels of many groups and accumulates
  ``x * w`` products on the CUDA cores, one (input channel, tap) at a time.

A mixed-task batch (one task per image) runs the GEMM kernel on the images sorted by task, over pixel tiles of one
task each that ``_pixel_tiles_kernel`` lays out on the device first.

Offsets that grow with the batch are int64; offsets inside one image or one weight are int32, and the launcher
refuses a single image or weight of 2**31 elements or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    KERNEL_DTYPES,
    TAPS_OUTER_MIN_CHANNELS,
    TILE_CELL,
    as_is,
    autotune_bench,
    ceil_div,
    check_conv2d,
    check_task_values,
    check_tile_map,
    conv_reads_compact_ids,
    device_properties,
    direct_launch_allowed,
    on_device,
    require_kernel_device,
    task_limit,
    uses_direct_conv_kernel,
)
from ._launcher import KernelLaunch
from ._predicate import (
    element_masks,
    keep_owned,
    owned_pair_masks,
    span_owners,
    task_owns,
    tile_bounds,
)
from .id_layout import CompactTaskIds, unpack_task_ids
from .linear import _grouped_rows, _kept_with_grouping
from .reference import per_task_rows

__all__ = ["masked_conv2d_triton"]

_INT32_LIMIT = 2**31
# Convs with at least this many input channels per group reduce tap by tap over channel blocks (vector loads);
# thinner ones (an RGB stem) over all of (c, r, s) at once, which wastes less of each tile.
_TAPS_OUTER_MIN_CHANNELS = TAPS_OUTER_MIN_CHANNELS

# On a GPU, autotune the tiles (the default). When False, the first config of ``_configs`` runs untuned: tests set
# this so that a CUDA test session compiles one config per kernel variant instead of tuning every shape.
AUTOTUNE = True


@triton.jit
def _tap_ids(ids_cols, tap_row, tap_col, first_c, offs_c, ids_limit, n_valid, stride_ic, stride_ih, stride_iw,
             ID_BITS: tl.constexpr):  # fmt: skip
    """One step's ids: uint8 ``[BLOCK_K, BLOCK_N]`` (channels by output channels), or (``ID_BITS`` 2 or 4) the int32
    words ``[BLOCK_N, BLOCK_K * ID_BITS / 32]`` of compact ids (``stride_ih``/``stride_iw`` count words per tap row
    and per tap: a tap's channels are packed on their own). Rows from ``ids_limit`` on are not read (0)."""
    if ID_BITS < 8:
        PER_WORD: tl.constexpr = 32 // ID_BITS
        WORDS: tl.constexpr = offs_c.shape[0] // PER_WORD
        # A step's words need no bound along the channels: a row's words are padded past its last tap (id_layout),
        # and words past a tap's channels meet weights that load as 0.
        offs_word = tap_row * stride_ih + tap_col * stride_iw + first_c // PER_WORD + tl.arange(0, WORDS)
        words_read = tl.full((WORDS,), 0, tl.int32) < ids_limit
        ids = tl.load(ids_cols[:, None] + offs_word[None, :], mask=n_valid[:, None] & words_read[None, :], other=0)
    else:
        ids = tl.load(
            (ids_cols + tap_row * stride_ih + tap_col * stride_iw)[None, :] + (offs_c * stride_ic)[:, None],
            mask=(offs_c < ids_limit)[:, None] & n_valid[None, :],
            other=0,
        )
    return ids


@triton.jit
def _keep_tap(w_tile, ids, offs_c, ids_limit, task, TILE_MAP: tl.constexpr, ID_BITS: tl.constexpr,
              USE_ASM: tl.constexpr):  # fmt: skip
    """``w_tile`` ``[BLOCK_K, BLOCK_N]`` with the weights task ``task`` does not own set to +0.0 (a select, or for
    compact ids an AND of the bits; a NaN/Inf there is dropped either way); with ``TILE_MAP`` the rows from
    ``ids_limit`` on (ids not read: raw tiles) are kept."""
    if ID_BITS < 8:
        masks = element_masks(owned_pair_masks(ids, task, ID_BITS, USE_ASM), w_tile.dtype.primitive_bitwidth == 32)
        masks = tl.trans(masks)
        if TILE_MAP:
            masks = masks | tl.where(offs_c >= ids_limit, -1, 0).to(masks.dtype)[:, None]
        w_tile = keep_owned(w_tile, masks)
    else:
        owned = task_owns(ids, task)
        if TILE_MAP:
            owned = owned | (offs_c >= ids_limit)[:, None]
        w_tile = tl.where(owned, w_tile, 0.0)
    return w_tile


@triton.jit
def _epilogue(acc, bias_ptr, scale_ptr, shift_ptr, out_channel, n_valid, HAS_BIAS: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, APPLY_RELU: tl.constexpr):  # fmt: skip
    """``relu?((acc + bias[o]) * scale[o] + shift[o])`` in fp32 on a ``[BLOCK_M, BLOCK_N]`` tile (o = columns, the
    output channels ``out_channel``); absent vectors are not read."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_channel, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + out_channel, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + out_channel, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return acc


@triton.jit
def _task_taps(
    acc,
    x_rows,
    w_cols,
    ids_cols,
    map_rows,
    cell_row_mask,
    offs_cell_k,
    active_task,
    in_row0,
    in_col0,
    m_valid,
    n_valid,
    in_h,
    in_w,
    cin_per_group,
    channel_blocks,
    stride_map_plane,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_ic,
    stride_ih,
    stride_iw,
    dilation_h,
    dilation_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One task's tap-by-tap reduction of a ``[BLOCK_M, BLOCK_N]`` tile: ``acc + x_tile @ w_masked`` step by step over
    (tap, channel block). With ``TILE_MAP`` each step first reads its tile's cells: a tile with no weight of tasks
    1..active_task reads nothing, and (``RAW_TILES``) a tile whose owners are all visible reads no ids."""
    for step in range(0, KH * KW * channel_blocks):
        tap = step // channel_blocks
        first_c = (step % channel_blocks) * BLOCK_K
        offs_c = first_c + tl.arange(0, BLOCK_K)
        # Masks compare offsets with scalar bounds (what keeps the loads vectorised); the tile map narrows the
        # bounds to 0 for what this step need not read.
        c_limit = cin_per_group
        ids_limit = cin_per_group
        if TILE_MAP:
            cell_cols = (tap * cin_per_group + first_c) // CELL_K + offs_cell_k
            cell_mask = cell_row_mask[:, None] & (cell_cols < tl.cdiv(KH * KW * cin_per_group, CELL_K))[None, :]
            c_limit, ids_limit = tile_bounds(
                map_rows + cell_cols[None, :],
                cell_mask,
                stride_map_plane,
                c_limit,
                active_task,
                active_task,
                RAW_TILES,
            )
        c_valid = offs_c < c_limit
        tap_row = tap // KW
        tap_col = tap % KW
        in_row = in_row0 + tap_row * dilation_h
        in_col = in_col0 + tap_col * dilation_w
        pixel_valid = m_valid & (in_row >= 0) & (in_row < in_h) & (in_col >= 0) & (in_col < in_w)
        x_pixels = x_rows + in_row * stride_xh + in_col * stride_xw
        x_tile = tl.load(
            x_pixels[:, None] + (offs_c * stride_xc)[None, :],
            mask=pixel_valid[:, None] & c_valid[None, :],
            other=0.0,
        )
        wk_mask = c_valid[:, None] & n_valid[None, :]
        w_tile = tl.load(
            (w_cols + tap_row * stride_wh + tap_col * stride_ww)[None, :] + (offs_c * stride_wc)[:, None],
            mask=wk_mask,
            other=0.0,
        )
        if USE_MASK:
            # Rows whose ids are not read: raw-tile weights (kept) or zeros (skipped tiles, the tail).
            ids = _tap_ids(ids_cols, tap_row, tap_col, first_c, offs_c, ids_limit, n_valid, stride_ic, stride_ih,
                           stride_iw, ID_BITS)  # fmt: skip
            w_tile = _keep_tap(w_tile, ids, offs_c, ids_limit, active_task, TILE_MAP, ID_BITS, USE_ASM)
        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["active_task", "m_bucket", "max_task"])
def _masked_conv2d_gemm_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    tile_map_ptr,
    image_order_ptr,
    pixel_tiles_ptr,
    active_task,
    max_task,
    total_pixels,
    m_bucket,
    stride_map_plane,
    stride_map_row,
    stride_bias_task,
    stride_scale_task,
    stride_shift_task,
    in_h,
    in_w,
    out_h,
    out_w,
    cin_per_group,
    cout_per_group,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_io,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    conv_stride_h,
    conv_stride_w,
    pad_top,
    pad_left,
    dilation_h,
    dilation_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TAPS_OUTER: tl.constexpr,
    CHANNELS_INNER: tl.constexpr,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_N: tl.constexpr,
    CELL_K: tl.constexpr,
    MIXED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[n, o, p, q] = epilogue(sum_{c,r,s} x[n, g*Cg + c, p*sh - pt + r*dh, q*sw - pl + s*dw] * W_t[o, c, r, s])``

    with ``g = o // (out/groups)``, ``Cg = C/groups``, ``W_t = where((ids != 0) & (ids <= active_task), W, 0)``
    (or ``W`` when ``USE_MASK`` is off), out-of-image taps reading 0, and
    ``epilogue(v) = relu?((v + bias[o]) * scale[o] + shift[o])`` computed in fp32.

    Pointers: ``x_ptr [N, C, H, W]``, ``w_ptr``/``ids_ptr [out, Cg, KH, KW]`` (uint8 ids),
    ``bias_ptr``/``scale_ptr``/``shift_ptr [out]``, ``out_ptr [N, out, H_out, W_out]``; any strides.
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(out/groups, BLOCK_N), groups)`` (``MIXED``: the pixel tiles' count times the
    channel blocks). ``m_bucket`` only keys the autotuner.
    With ``TAPS_OUTER`` the reduction runs tap by tap over blocks of ``BLOCK_K`` channels (fast with a channels_last
    input and a K-contiguous weight, whose channels are neighbouring addresses); else over all of ``(c, r, s)`` at
    once, with ``c`` fastest when ``CHANNELS_INNER`` (channels_last input), for convs with few channels per group.

    ``TILE_MAP`` (``TAPS_OUTER`` only; the launcher ensures ``Cg`` and, with groups, ``out/groups`` are multiples
    of 32): ``tile_map_ptr`` uint8 ``[2, out / CELL_N, KH * KW * Cg / CELL_K]`` (strides ``stride_map_plane``,
    ``stride_map_row``, 1; :func:`packnet_kernels.reference.tile_map`) says which tasks own weights where. First the
    program reads the cells of its output channels' whole reduction: with no weight of tasks 1..active_task there it
    runs no loop, and with ``RAW_TILES`` (free weights guaranteed zero) and every owner visible it runs the loop
    without ids or map. Else each step reads the cells of its ``[BLOCK_K, BLOCK_N]`` weight tile (the cells covering
    it, or the one cell holding a smaller tile): a tile no weight of tasks 1..active_task lives in reads no weight,
    id or input bytes, and with ``RAW_TILES`` a tile whose owners are all visible reads no ids. Sums are those of the
    predicate path.

    ``MIXED`` (a batch of images of several tasks; ``TAPS_OUTER`` only; ``active_task`` unused): the images are
    sorted by task, ``image_order_ptr`` ``[N]`` int64 the caller's image at each sorted position, and the sorted
    images' pixels laid out in tiles of one task each (:func:`_pixel_tiles`): ``pixel_tiles_ptr`` int64
    ``[programs along axis 0 / channel blocks, 3]`` holds each tile's first sorted pixel, its rows (at most
    ``BLOCK_M``: a task's last tile is padded; tiles past the last task have none, and task 0) and its task. Each
    program runs the single-task loop for its tile's task (one masked dot per step, on its rows) and writes its rows
    to the caller's images. A tile whose task is outside 1..``max_task`` runs no loop and is written NaN.
    ``bias_ptr``/``scale_ptr``/``shift_ptr`` may be per-task tables ``[num_tasks, out]`` (row stride
    ``stride_*_task``; 0 for a vector shared by every task): the tile reads its task's row.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_n = tl.cdiv(cout_per_group, BLOCK_N)
    # Neighbouring programs share one row block, so its gathered input tiles stay in L2 across channel blocks.
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    pixels_per_image = out_h * out_w
    task_valid = True
    if MIXED:
        # A tile of one task's pixels in the images sorted by task; the rows map back to the caller's images.
        tile = pixel_tiles_ptr + pid_m * 3
        sorted_pixel = tl.load(tile) + tl.arange(0, BLOCK_M)
        m_valid = tl.arange(0, BLOCK_M) < tl.load(tile + 1)
        active_task = tl.load(tile + 2).to(tl.int32)
        task_valid = (active_task >= 1) & (active_task <= max_task)
        active_task = tl.where(task_valid, active_task, 0)
        image = tl.load(image_order_ptr + sorted_pixel // pixels_per_image, mask=m_valid, other=0)
        pixel = (sorted_pixel % pixels_per_image).to(tl.int32)
    else:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < total_pixels
        image = offs_m // pixels_per_image
        pixel = (offs_m % pixels_per_image).to(tl.int32)
    out_row = pixel // out_w
    out_col = pixel % out_w
    in_row0 = out_row * conv_stride_h - pad_top
    in_col0 = out_col * conv_stride_w - pad_left
    x_rows = x_ptr + image * stride_xn + (group * cin_per_group) * stride_xc

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < cout_per_group
    out_channel = group * cout_per_group + offs_n
    w_cols = w_ptr + out_channel * stride_wo
    ids_cols = ids_ptr + out_channel * stride_io

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TAPS_OUTER:
        # k runs over (r, s, c) with c fastest, in one flat loop of (tap, channel block) steps so that the load
        # pipeline spans the whole reduction. A step's BLOCK_K channels are neighbouring addresses in a channels_last
        # input and in a K-contiguous ([out, KH, KW, Cg] in memory) weight and id tensor: 16-byte loads.
        channel_blocks = tl.cdiv(cin_per_group, BLOCK_K)
        if TILE_MAP:
            # The cells covering this program's output channels (one cell when BLOCK_N < CELL_N: it holds the tile).
            CELLS_N: tl.constexpr = BLOCK_N // CELL_N if BLOCK_N >= CELL_N else 1
            CELLS_K: tl.constexpr = BLOCK_K // CELL_K if BLOCK_K >= CELL_K else 1
            first_channel = group * cout_per_group + pid_n * BLOCK_N
            cell_rows = first_channel // CELL_N + tl.arange(0, CELLS_N)
            cell_row_mask = cell_rows < tl.cdiv(cout_per_group * tl.num_programs(1), CELL_N)
            offs_cell_k = tl.arange(0, CELLS_K)
            map_rows = tile_map_ptr + cell_rows[:, None] * stride_map_row
            # Decided once for the program's whole reduction, before any loop (see the linear kernel): a span with
            # no weight of tasks 1..active_task runs no loop, and with RAW_TILES one whose owners are all visible
            # runs the loop without ids or map.
            owner_min, owner_max = span_owners(
                map_rows, cell_row_mask, 0, KH * KW * cin_per_group, stride_map_plane, CELL_K, 128
            )
            if owner_min <= active_task:
                raw_span = False
                if RAW_TILES:
                    raw_span = owner_max <= active_task
                if raw_span:
                    acc = _task_taps(acc, x_rows, w_cols, ids_cols, None, None, None, active_task, in_row0, in_col0,
                                     m_valid, n_valid, in_h, in_w, cin_per_group, channel_blocks, 0, stride_xc,
                                     stride_xh, stride_xw, stride_wc, stride_wh, stride_ww, stride_ic, stride_ih,
                                     stride_iw, dilation_h, dilation_w, KH, KW, False, False, False, CELL_K,
                                     UPCAST_DOT, INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
                else:
                    acc = _task_taps(acc, x_rows, w_cols, ids_cols, map_rows, cell_row_mask, offs_cell_k,
                                     active_task, in_row0, in_col0, m_valid, n_valid, in_h, in_w, cin_per_group,
                                     channel_blocks, stride_map_plane, stride_xc, stride_xh, stride_xw, stride_wc,
                                     stride_wh, stride_ww, stride_ic, stride_ih, stride_iw, dilation_h,
                                     dilation_w, KH, KW, USE_MASK, True, RAW_TILES, CELL_K, UPCAST_DOT,
                                     INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
        elif task_valid:  # a mixed tile of an invalid task (tiles past the last task have task 0) runs no loop
            acc = _task_taps(acc, x_rows, w_cols, ids_cols, None, None, None, active_task, in_row0, in_col0,
                             m_valid, n_valid, in_h, in_w, cin_per_group, channel_blocks, 0, stride_xc, stride_xh,
                             stride_xw, stride_wc, stride_wh, stride_ww, stride_ic, stride_ih, stride_iw,
                             dilation_h, dilation_w, KH, KW, USE_MASK, False, False, CELL_K, UPCAST_DOT,
                             INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
    else:
        # Few channels per group (an RGB stem): k runs over all (c, r, s) at once so that a tile is not mostly
        # padding; loads are gathers, like an im2col's.
        k_total = cin_per_group * KH * KW
        for k_start in range(0, k_total, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_valid = offs_k < k_total
            if CHANNELS_INNER:
                channel = offs_k % cin_per_group
                tap = offs_k // cin_per_group
            else:
                channel = offs_k // (KH * KW)
                tap = offs_k % (KH * KW)
            tap_row = tap // KW
            tap_col = tap % KW

            in_row = in_row0[:, None] + (tap_row * dilation_h)[None, :]
            in_col = in_col0[:, None] + (tap_col * dilation_w)[None, :]
            x_mask = (
                m_valid[:, None] & k_valid[None, :] & (in_row >= 0) & (in_row < in_h) & (in_col >= 0) & (in_col < in_w)
            )
            x_offs = (channel * stride_xc)[None, :] + in_row * stride_xh + in_col * stride_xw
            x_tile = tl.load(x_rows[:, None] + x_offs, mask=x_mask, other=0.0)

            wk_mask = k_valid[:, None] & n_valid[None, :]
            w_offs = channel * stride_wc + tap_row * stride_wh + tap_col * stride_ww
            w_tile = tl.load(w_cols[None, :] + w_offs[:, None], mask=wk_mask, other=0.0)
            if USE_MASK:
                ids_offs = channel * stride_ic + tap_row * stride_ih + tap_col * stride_iw
                ids = tl.load(ids_cols[None, :] + ids_offs[:, None], mask=wk_mask, other=0)
                # A select, not a multiply: an Inf/NaN in a weight this task does not own must not reach the sum.
                w_tile = tl.where(task_owns(ids, active_task), w_tile, 0.0)
            if UPCAST_DOT:
                x_tile = x_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)

    if MIXED:
        # The tile's task's row of each per-task table (row 0 for an invalid task, written NaN below).
        table_row = tl.maximum(active_task - 1, 0).to(tl.int64)
        if HAS_BIAS:
            bias_ptr += table_row * stride_bias_task
        if HAS_SCALE:
            scale_ptr += table_row * stride_scale_task
        if HAS_SHIFT:
            shift_ptr += table_row * stride_shift_task
    acc = _epilogue(acc, bias_ptr, scale_ptr, shift_ptr, out_channel, n_valid, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
                    APPLY_RELU)  # fmt: skip
    if MIXED:
        acc = tl.where(task_valid, acc, float("nan"))

    out_rows = out_ptr + image * stride_on + out_row * stride_oh + out_col * stride_ow
    out_ptrs = out_rows[:, None] + (out_channel * stride_oc)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _pixel_tiles_kernel(
    tasks_ptr,
    tiles_ptr,
    images,
    pixels,
    max_task,
    num_tiles,
    BLOCK_M: tl.constexpr,
    TASK_BINS: tl.constexpr,
    IMAGES_BLOCK: tl.constexpr,
    TILES_BLOCK: tl.constexpr,
):
    """``tiles[t] = (first sorted pixel, rows, task)`` of a mixed launch's pixel tiles (:func:`_pixel_tiles`).

    Pointers: ``tasks_ptr [images]`` the images' tasks sorted increasingly (any integer dtype), ``tiles_ptr
    [num_tiles, 3]`` int64. Grid: ``(cdiv(num_tiles, TILES_BLOCK),)``. Each program counts the images of each task
    (tasks clamped to 0..max_task + 1, ``TASK_BINS`` > max_task + 1 bins): a task's images are a run of the sorted
    order and fill ``cdiv(count * pixels, BLOCK_M)`` tiles after the runs of the smaller tasks; then it writes its
    ``TILES_BLOCK`` tiles, each taking its run's entries by a select over the bins."""
    counts = tl.zeros((TASK_BINS,), dtype=tl.int32)
    for start in range(0, images, IMAGES_BLOCK):
        offs = start + tl.arange(0, IMAGES_BLOCK)
        task = tl.load(tasks_ptr + offs, mask=offs < images, other=0).to(tl.int64)
        key = tl.minimum(tl.maximum(task, 0), max_task + 1).to(tl.int32)
        counts += tl.histogram(key, TASK_BINS, mask=offs < images)
    bins = tl.arange(0, TASK_BINS)
    run_tiles = ((counts.to(tl.int64) * pixels + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    tile_end = tl.cumsum(run_tiles, axis=0)
    first_image = tl.cumsum(counts, axis=0) - counts
    tile = tl.program_id(0) * TILES_BLOCK + tl.arange(0, TILES_BLOCK)
    # The run holding each tile (none past the last run): its first tile, first image, images and task.
    inside = ((tile_end - run_tiles)[None, :] <= tile[:, None]) & (tile[:, None] < tile_end[None, :])
    run_first_tile = tl.sum(tl.where(inside, (tile_end - run_tiles)[None, :], 0), axis=1)
    run_first_image = tl.sum(tl.where(inside, first_image[None, :], 0), axis=1).to(tl.int64)
    run_images = tl.sum(tl.where(inside, counts[None, :], 0), axis=1).to(tl.int64)
    valid_task = (bins >= 1) & (bins <= max_task)
    task = tl.sum(tl.where(inside & valid_task[None, :], bins[None, :], 0), axis=1)
    first = run_first_image * pixels + (tile - run_first_tile).to(tl.int64) * BLOCK_M
    rows = tl.minimum((run_first_image + run_images) * pixels - first, BLOCK_M)
    rows = tl.where(run_images > 0, rows, 0)
    entry = tiles_ptr + tile.to(tl.int64) * 3
    in_bound = tile < num_tiles
    tl.store(entry, tl.where(run_images > 0, first, 0), mask=in_bound)
    tl.store(entry + 1, rows, mask=in_bound)
    tl.store(entry + 2, task.to(tl.int64), mask=in_bound)


@triton.jit(do_not_specialize=["active_task", "m_bucket"])
def _masked_conv2d_direct_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    active_task,
    total_pixels,
    m_bucket,
    in_h,
    in_w,
    out_h,
    out_w,
    out_channels,
    cin_per_group,
    cout_per_group,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    stride_io,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    conv_stride_h,
    conv_stride_w,
    pad_top,
    pad_left,
    dilation_h,
    dilation_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    USE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Same formula, pointers and epilogue as ``_masked_conv2d_gemm_kernel``, for small groups (depthwise).

    Grid: ``(cdiv(M, BLOCK_M), cdiv(out, BLOCK_N))``; a tile's output channels may belong to different groups, so
    each column gathers its own input channel ``(o // (out/groups)) * Cg + c`` and no lane idles on a group border.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < total_pixels
    pixels_per_image = out_h * out_w
    image = offs_m // pixels_per_image
    pixel = (offs_m % pixels_per_image).to(tl.int32)
    out_row = pixel // out_w
    out_col = pixel % out_w
    in_row0 = out_row * conv_stride_h - pad_top
    in_col0 = out_col * conv_stride_w - pad_left
    x_rows = x_ptr + image * stride_xn

    out_channel = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = out_channel < out_channels
    first_in_channel = (out_channel // cout_per_group) * cin_per_group
    w_cols = w_ptr + out_channel * stride_wo
    ids_cols = ids_ptr + out_channel * stride_io

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for channel in range(0, cin_per_group):
        x_channels = x_rows[:, None] + ((first_in_channel + channel) * stride_xc)[None, :]
        # A run-time loop over the taps, not an unrolled one: unrolled, all KH * KW input tiles were live at once and
        # the larger tiles spilled registers (tests/test_codegen.py).
        for tap in range(0, KH * KW):
            tap_row = tap // KW
            tap_col = tap % KW
            in_row = in_row0 + tap_row * dilation_h
            in_col = in_col0 + tap_col * dilation_w
            pixel_valid = m_valid & (in_row >= 0) & (in_row < in_h) & (in_col >= 0) & (in_col < in_w)
            x_tile = tl.load(
                x_channels + (in_row * stride_xh + in_col * stride_xw)[:, None],
                mask=pixel_valid[:, None] & n_valid[None, :],
                other=0.0,
            )
            w_vec = tl.load(
                w_cols + (channel * stride_wc + tap_row * stride_wh + tap_col * stride_ww),
                mask=n_valid,
                other=0.0,
            )
            if USE_MASK:
                ids = tl.load(
                    ids_cols + (channel * stride_ic + tap_row * stride_ih + tap_col * stride_iw),
                    mask=n_valid,
                    other=0,
                )
                # A select, not a multiply: an Inf/NaN in a weight this task does not own must not reach the sum.
                w_vec = tl.where(task_owns(ids, active_task), w_vec, 0.0)
            acc += x_tile.to(tl.float32) * w_vec.to(tl.float32)[None, :]

    acc = _epilogue(acc, bias_ptr, scale_ptr, shift_ptr, out_channel, n_valid, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
                    APPLY_RELU)  # fmt: skip

    out_rows = out_ptr + image * stride_on + out_row * stride_oh + out_col * stride_ow
    out_ptrs = out_rows[:, None] + (out_channel * stride_oc)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def _configs(kernel: str) -> list[triton.Config]:
    """Autotuning candidates for Ampere/Hopper: ``kernel`` is ``"gemm"`` or ``"direct"``."""
    if kernel == "gemm":
        shapes = [
            # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (64, 32, 64, 4, 3),
            (32, 64, 64, 4, 3),
            (32, 32, 64, 2, 4),
            (16, 64, 64, 4, 3),
            (32, 32, 32, 2, 4),
        ]
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes
        ]
    if kernel == "direct":
        shapes = [
            # BLOCK_M, BLOCK_N, warps
            (64, 64, 4),
            (128, 32, 4),
            (32, 128, 4),
            (256, 16, 4),
            (128, 64, 8),
            (16, 128, 4),
        ]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2) for m, n, w in shapes]
    raise ValueError(f"unknown kernel {kernel!r}")


# The pixel tile height of mixed-task launches on a GPU (the interpreter's is its config's): the host lays the tiles out
# before the launch (:func:`_pixel_tiles`), so the autotuner only tries configs of this height. 64 rows: wgmma's
# smallest left operand, and at most 63 padded rows per task present.
MIXED_BLOCK_M = 64

# Under TRITON_INTERPRET=1 autotuning cannot run: one small fixed tile per kernel (tests still cross tile borders).
_INTERPRETER_CONFIGS = {"gemm": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, "direct": {"BLOCK_M": 32, "BLOCK_N": 16}}

# The row count enters the key only bucketed (``m_bucket``), so a new batch size does not re-tune.
_AUTOTUNE_KEYS = {
    "gemm": [
        "m_bucket",
        "cin_per_group",
        "cout_per_group",
        "KH",
        "KW",
        "TAPS_OUTER",
        "CHANNELS_INNER",
        "TILE_MAP",
        "RAW_TILES",
        "MIXED",
        "ID_BITS",
    ],
    "direct": ["m_bucket", "out_channels", "cin_per_group", "cout_per_group", "KH", "KW"],
}
_KERNELS = {"gemm": _masked_conv2d_gemm_kernel, "direct": _masked_conv2d_direct_kernel}
_autotuned_kernels: dict = {}


def config_fits(
    config: triton.Config, dtype: torch.dtype, shared_memory_bytes: int, taps_outer: bool = True, mixed: bool = False
) -> bool:
    """Whether ``config`` suits a GEMM launch for ``dtype`` on a GPU with ``shared_memory_bytes`` per block (opt-in).

    Its pipelined tiles must fit (an upper bound: ``num_stages`` buffers of the input, weight and id tiles), and its
    operand tiles must not spill registers. Measured with triton 3.6 and 3.9 (``tests/test_codegen.py``), in operand
    elements per thread per K step: in 16-bit dtypes at most 40 on the gather loop (``taps_outer`` False); in fp32
    under 48 with taps outer and 4 warps or more, and at most 32 with at most 16 accumulators per thread on the gather
    loop; a mixed-task batch (``mixed``) runs the single-task loop on pixel tiles of :data:`MIXED_BLOCK_M` rows laid
    out before the launch, so only configs of that tile height. The direct kernel stages nothing: any config fits."""
    tile = config.kwargs
    if "BLOCK_K" not in tile:
        return True
    if mixed and tile["BLOCK_M"] != MIXED_BLOCK_M:
        return False
    # Operand elements per thread per K step, past which registers spill (tests/test_codegen.py): fp32 operands
    # are split for the tensor cores, and the gather loop also holds every element's address.
    threads = 32 * config.num_warps
    operands = (tile["BLOCK_M"] + tile["BLOCK_N"]) * tile["BLOCK_K"] / threads
    accumulators = tile["BLOCK_M"] * tile["BLOCK_N"] / threads
    if dtype == torch.float32:
        fits = operands < 48 and config.num_warps >= 4 if taps_outer else operands <= 32 and accumulators <= 16
    else:
        fits = taps_outer or operands <= 40
    if not fits:
        return False
    element = torch.empty((), dtype=dtype).element_size()
    per_stage = tile["BLOCK_M"] * tile["BLOCK_K"] * element + tile["BLOCK_K"] * tile["BLOCK_N"] * (element + 1)
    return config.num_stages * per_stage <= shared_memory_bytes


def default_config(
    kernel: str, dtype: torch.dtype, shared_memory_bytes: int, taps_outer: bool = True, mixed: bool = False
) -> triton.Config:
    """The untuned config (``AUTOTUNE = False``): the first of :func:`_configs` that fits."""
    configs = _configs(kernel)
    fitting = (config for config in configs if config_fits(config, dtype, shared_memory_bytes, taps_outer, mixed))
    allowed = (config for config in configs if not mixed or config.kwargs["BLOCK_M"] == MIXED_BLOCK_M)
    return next(fitting, next(allowed))


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles do not fit this GPU's shared memory for this dtype."""
    x = named_args["x_ptr"]
    limit = device_properties(x.device).shared_memory_per_block_optin
    taps_outer, mixed = kwargs.get("TAPS_OUTER", True), kwargs.get("MIXED", False)
    fitting = [config for config in configs if config_fits(config, x.dtype, limit, taps_outer, mixed)]
    return fitting or [config for config in configs if not mixed or config.kwargs["BLOCK_M"] == MIXED_BLOCK_M][:1]


def _gpu_kernel(kernel: str):
    """The autotuned wrapper of a kernel, built on first GPU use (never under the interpreter)."""
    if kernel not in _autotuned_kernels:
        _autotuned_kernels[kernel] = triton.autotune(
            configs=_configs(kernel),
            key=_AUTOTUNE_KEYS[kernel],
            prune_configs_by={"early_config_prune": _prune_configs},
            do_bench=autotune_bench,
        )(_KERNELS[kernel])
    return _autotuned_kernels[kernel]


def _row_bucket(rows: int) -> int:
    """The next power of two >= ``rows`` (autotuning key)."""
    return 1 << max(int(rows) - 1, 0).bit_length()


_uses_direct_kernel = uses_direct_conv_kernel
compact_ids_apply = conv_reads_compact_ids


def mixed_kernel_applies(cin_per_group: int, cout_per_group: int, groups: int) -> bool:
    """Whether a mixed-task batch runs in one launch: the GEMM kernel's tap-by-tap loop (16 or more channels per
    group). Other convs run one launch per task present."""
    return cin_per_group >= _TAPS_OUTER_MIN_CHANNELS and not _uses_direct_kernel(groups, cin_per_group, cout_per_group)


def _task_runs(images: int, max_task: int) -> int:
    """The most runs of one task a mixed batch of ``images`` sorted by task holds: its tasks clamped to
    0..``max_task + 1`` (the invalid ones at either end) are that many values at most."""
    return max(min(images, max_task + 2), 1)


def _pixel_tiles(
    sorted_tasks: torch.Tensor, pixels: int, block_m: int, max_task: int, tiles: int, wrap=as_is
) -> torch.Tensor:
    """The pixel tiles of a mixed launch, int64 ``[tiles, 3]``: first sorted pixel, rows, task; built on the device in
    one launch of :func:`_pixel_tiles_kernel` (no host sync). Sorted pixel ``q`` is pixel ``q % pixels`` of the image
    at sorted position ``q // pixels``. The images of one task (a run) fill ``cdiv(images * pixels, block_m)`` tiles,
    its last one padded (MoE kernels align each expert's tokens to the block the same way); tiles past the last run
    (``tiles`` is the launch's bound) have no rows and task 0, and tiles of an invalid task (outside 1..max_task) task
    0 (the kernel writes them NaN). ``wrap``: as for :func:`_launch`."""
    table = torch.empty((tiles, 3), dtype=torch.int64, device=sorted_tasks.device)
    constants = dict(
        images=sorted_tasks.shape[0],
        pixels=pixels,
        max_task=max_task,
        num_tiles=tiles,
        BLOCK_M=block_m,
        TASK_BINS=_row_bucket(max_task + 2),
        IMAGES_BLOCK=256,
        TILES_BLOCK=_TILES_BLOCK,
    )
    grid = (ceil_div(tiles, _TILES_BLOCK),)
    if wrap is as_is:
        key = (tuple(sorted(constants.items())), sorted_tasks.dtype, sorted_tasks.device)
        launch = _TILE_LAUNCHES.get(key)
        if launch is None:
            if len(_TILE_LAUNCHES) >= _MAX_PLANS:
                _TILE_LAUNCHES.clear()
            launch = _TILE_LAUNCHES[key] = KernelLaunch(_pixel_tiles_kernel, lambda meta: grid, constants)
        stream = torch._C._cuda_getCurrentRawStream(table.device.index) if table.is_cuda else 0
        launch((sorted_tasks, table), (), stream)
    else:
        wrap(_pixel_tiles_kernel)[grid](sorted_tasks, table, **constants)
    return table


# Tiles per program of :func:`_pixel_tiles_kernel`, and its direct launches by constants and task dtype.
_TILES_BLOCK = 16
_TILE_LAUNCHES: dict = {}


def _mixed_tiles(tasks: torch.Tensor, constants: dict, reuse: bool, wrap=as_is) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_order, pixel_tiles)`` of a mixed launch: the images sorted by task, with the linear kernel's grouping
    (:func:`packnet_kernels.linear._grouped_rows`: one sort per forward with ``reuse``), and their pixel tiles
    (:func:`_pixel_tiles`), kept with the grouping they came from (:func:`~packnet_kernels.linear._kept_with_grouping`):
    the convs of one forward at one resolution share them, as they share the sort."""
    grouping = _grouped_rows(tasks, reuse)
    kept = _kept_with_grouping(grouping)
    pixels, max_task = constants["out_h"] * constants["out_w"], constants["max_task"]
    block_m = _INTERPRETER_CONFIGS["gemm"]["BLOCK_M"] if _INTERPRETED else MIXED_BLOCK_M
    tiles = ceil_div(constants["total_pixels"], block_m) + _task_runs(tasks.shape[0], max_task) - 1
    key = ("pixel_tiles", pixels, block_m, max_task, tiles)
    pixel_tiles = kept.get(key) if kept is not None else None
    if pixel_tiles is None:
        pixel_tiles = _pixel_tiles(grouping[0], pixels, block_m, max_task, tiles, wrap)
        if kept is not None:
            kept[key] = pixel_tiles
    return grouping[1], pixel_tiles


def _task_stride(vector: torch.Tensor | None) -> int:
    """Row stride of a per-task table ``[num_tasks, out]``; 0 for a vector shared by every task (or none)."""
    return vector.stride(0) if vector is not None and vector.dim() == 2 else 0


def tile_map_applies(cin_per_group: int, cout_per_group: int, groups: int) -> bool:
    """Whether the GEMM kernel's tiles line up with tile-map cells: a tap's channel blocks start on a cell column
    (``Cg`` a multiple of 32, which also means the tap-by-tap loop runs) and, with groups, each group's output channels
    start on a cell row. Other convs (an RGB stem, odd channel counts, depthwise) run without the map."""
    return (
        cin_per_group % TILE_CELL[1] == 0
        and cin_per_group >= _TAPS_OUTER_MIN_CHANNELS
        and (groups == 1 or cout_per_group % TILE_CELL[0] == 0)
        and not _uses_direct_kernel(groups, cin_per_group, cout_per_group)
    )


def _resolve_padding(padding, kernel_size, dilation) -> list[int]:
    """``[top, bottom, left, right]``; ``"same"`` puts the odd extra row/column at the bottom/right like F.conv2d."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        sides = []
        for size, dil in zip(kernel_size, dilation, strict=True):
            total = dil * (size - 1)
            sides += [total // 2, total - total // 2]
        return sides
    return [padding[0], padding[0], padding[1], padding[1]]


def _strides_like_channels_last(tensor: torch.Tensor) -> bool:
    """PyTorch's own test (``suggest_memory_format``) for a 4-D tensor laid out as NHWC; ambiguous cases are NCHW."""
    sizes, strides = tensor.shape, tensor.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for dim in (1, 3, 2, 0):
        if sizes[dim] == 0 or strides[dim] < smallest:
            return False
        if dim == 0 and smallest == strides[1]:
            return False
        smallest = strides[dim] * max(sizes[dim], 1)
    return True


def _output_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.conv2d`` returns a channels_last output: when the input or the weight is laid out as NHWC."""
    return x.shape[0] > 0 and (_strides_like_channels_last(x) or _strides_like_channels_last(weight))


def kernel_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s strides as the kernel gets them: 0 along dimensions of size 1, whose stride PyTorch leaves
    arbitrary (a 1x1 weight made channels_last keeps ``stride(2) == stride(3) == 1``). A stride that is not a multiple
    of 16 hides the tap offsets' alignment from Triton and turns every weight and id load into a 1- or 2-byte one;
    0 multiplies an index that is always 0 anyway."""
    return tuple(0 if size == 1 else step for size, step in zip(tensor.shape, tensor.stride(), strict=True))


def _max_offset(shape, strides, first_dim: int) -> int:
    """The largest element offset of a tensor of ``shape``/``strides`` from dimension ``first_dim`` on."""
    pairs = zip(shape[first_dim:], strides[first_dim:], strict=True)
    return sum((size - 1) * abs(step) for size, step in pairs if size > 0)


# Under TRITON_INTERPRET=1, ``triton.jit`` returns an interpreted function instead of a ``JITFunction``.
_INTERPRETED = not isinstance(_masked_conv2d_gemm_kernel, triton.JITFunction)


def _empty_output(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """The uninitialised ``[N, out, H_out, W_out]`` output, channels_last when ``F.conv2d``'s would be."""
    batch, _, in_h, in_w = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (in_h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (in_w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    memory_format = torch.channels_last if _output_channels_last(x, weight) else torch.contiguous_format
    return torch.empty((batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=memory_format)


# Launch plans of calls on real tensors (direct launches, the interpreter's op), by everything a plan is computed
# from (:func:`_plan_key`); cleared whenever it reaches this size, so that shapes that keep changing cannot grow it.
_PLANS: dict = {}
_MAX_PLANS = 1024


def _vector_key(vector: torch.Tensor | None):
    return None if vector is None else (vector.shape, vector.stride())


def _plan_key(
    x,
    weight,
    task_ids,
    bias,
    scale,
    shift,
    stride,
    padding,
    dilation,
    groups,
    relu,
    use_mask,
    tile_map,
    raw,
    tasks,
    id_bits=8,
) -> tuple:
    """Everything :func:`_plan` reads: the tensors' shapes, strides, dtype and device (never their values), the
    convolution's geometry and flags, and PyTorch's TF32 setting for convs."""
    return (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        weight.shape,
        weight.stride(),
        task_ids.stride(),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        relu,
        use_mask,
        _vector_key(bias),
        _vector_key(scale),
        _vector_key(shift),
        None if tile_map is None else tile_map.stride(),
        raw,
        tasks is not None,  # a mixed batch: its kernel reads the sorted images and pixel tiles (int64), any dtype
        torch.backends.cudnn.allow_tf32,
        id_bits,
    )


def _plan(
    x,
    weight,
    task_ids,
    bias,
    scale,
    shift,
    stride,
    padding,
    dilation,
    groups,
    relu,
    use_mask,
    tile_map,
    raw,
    tasks,
    id_bits=8,
) -> tuple:
    """``(out_shape, memory_format, kernel_name, constants, grid)``: all a launch of such arguments needs besides the
    tensors themselves and the task, computed from what :func:`_plan_key` holds only. ``constants`` are the kernel's
    keyword arguments but ``active_task``, ``image_order_ptr``, ``pixel_tiles_ptr`` and ``tile_map_ptr``; ``grid``
    maps a config to the launch grid.

    Raises:
        ValueError: an input image, an output image, the weight or the ids span 2**31 elements or more.
    """
    batch, _, in_h, in_w = x.shape
    out_channels, cin_per_group, kh, kw = weight.shape
    cout_per_group = out_channels // groups
    out_h = (in_h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (in_w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out_shape = (batch, out_channels, out_h, out_w)
    memory_format = torch.channels_last if _output_channels_last(x, weight) else torch.contiguous_format
    out = torch.empty(out_shape, device="meta", memory_format=memory_format)

    sx, sw, so = (kernel_strides(tensor) for tensor in (x, weight, out))
    if id_bits < 8:
        # Compact ids (``task_ids`` their int32 words): a row per output channel, each tap's channels packed on their
        # own (id_layout), so a tap row and a tap are whole numbers of words apart.
        group_words = -(-cin_per_group // (32 // id_bits))
        si = (task_ids.stride(0), 0, kw * group_words, group_words)
        ids_extent = (task_ids.shape, task_ids.stride(), 0)
    else:
        si = kernel_strides(task_ids)
        ids_extent = (task_ids.shape, si, 0)
    for name, shape, strides, first_dim in (
        ("one input image", x.shape, sx, 1),
        ("one output image", out.shape, so, 1),
        ("weight", weight.shape, sw, 0),
        ("task_ids", *ids_extent),
    ):
        if _max_offset(shape, strides, first_dim) >= _INT32_LIMIT:
            raise ValueError(f"masked_conv2d: {name} spans 2**31 elements or more, which the kernel does not index")

    total_pixels = batch * out_h * out_w
    constants = dict(
        total_pixels=total_pixels,
        m_bucket=_row_bucket(total_pixels),
        in_h=in_h,
        in_w=in_w,
        out_h=out_h,
        out_w=out_w,
        cin_per_group=cin_per_group,
        cout_per_group=cout_per_group,
        stride_xn=sx[0],
        stride_xc=sx[1],
        stride_xh=sx[2],
        stride_xw=sx[3],
        stride_wo=sw[0],
        stride_wc=sw[1],
        stride_wh=sw[2],
        stride_ww=sw[3],
        stride_io=si[0],
        stride_ic=si[1],
        stride_ih=si[2],
        stride_iw=si[3],
        stride_on=so[0],
        stride_oc=so[1],
        stride_oh=so[2],
        stride_ow=so[3],
        conv_stride_h=stride[0],
        conv_stride_w=stride[1],
        pad_top=padding[0],
        pad_left=padding[2],
        dilation_h=dilation[0],
        dilation_w=dilation[1],
        KH=kh,
        KW=kw,
        USE_MASK=use_mask,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        APPLY_RELU=relu,
    )

    if _uses_direct_kernel(groups, cin_per_group, cout_per_group):
        kernel_name = "direct"
        constants["out_channels"] = out_channels

        def grid(meta):
            return (ceil_div(total_pixels, meta["BLOCK_M"]), ceil_div(out_channels, meta["BLOCK_N"]))

    else:
        kernel_name = "gemm"
        # fp32 dots follow PyTorch's own conv setting: TF32 on tensor cores, unless cudnn.allow_tf32 is off; then
        # 3xTF32 (each operand split in two TF32 parts, fp32-level accuracy), because Triton's exact fp32 dot runs
        # on FMAs and spilled registers in every conv tile (triton 3.9, sm_90 and sm_80: tests/test_codegen.py).
        tf32 = x.dtype != torch.float32 or torch.backends.cudnn.allow_tf32
        mapped = use_mask and tile_map is not None and tile_map_applies(cin_per_group, cout_per_group, groups)
        vectors = (bias, scale, shift)
        constants.update(
            max_task=task_limit(*vectors) if tasks is not None else 0,
            stride_bias_task=_task_stride(bias),
            stride_scale_task=_task_stride(scale),
            stride_shift_task=_task_stride(shift),
            MIXED=tasks is not None,
            stride_map_plane=tile_map.stride(0) if mapped else 0,
            stride_map_row=tile_map.stride(1) if mapped else 0,
            TILE_MAP=mapped,
            RAW_TILES=mapped and raw,
            CELL_N=TILE_CELL[0],
            CELL_K=TILE_CELL[1],
            TAPS_OUTER=cin_per_group >= _TAPS_OUTER_MIN_CHANNELS,
            CHANNELS_INNER=_strides_like_channels_last(x),
            # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast the tiles there.
            UPCAST_DOT=_INTERPRETED and x.dtype == torch.bfloat16,
            INPUT_PRECISION="tf32" if tf32 else "tf32x3",
            ID_BITS=id_bits,
            USE_ASM=not _INTERPRETED,
        )

        # A mixed batch's pixel tiles: each task present pads its last tile (:func:`_pixel_tiles`).
        padded_tiles = _task_runs(batch, constants["max_task"]) - 1 if tasks is not None else 0

        def grid(meta):
            row_blocks = ceil_div(total_pixels, meta["BLOCK_M"]) + padded_tiles
            return (row_blocks * ceil_div(cout_per_group, meta["BLOCK_N"]), groups)

    return out_shape, memory_format, kernel_name, constants, grid


# Direct launches of cached plans (packnet_kernels._launcher.KernelLaunch), by plan key and kernel choice; cleared
# with the plans.
_KERNEL_LAUNCHES: dict = {}
# The keyword arguments given anew on every call, per kernel (the rest are the plan's constants).
_VARYING = {"gemm": ("active_task", "image_order_ptr", "pixel_tiles_ptr", "tile_map_ptr"), "direct": ("active_task",)}


def _kernel_launch(key, kernel_name: str, constants: dict, grid, x: torch.Tensor) -> KernelLaunch:
    """The direct launch of the plan ``key`` for the current kernel choice (interpreted, autotuned or the untuned
    default config for ``x``'s dtype and device): the kernel, its grid and the plan's constants with the config."""
    launch_key = (key, AUTOTUNE)
    launch = _KERNEL_LAUNCHES.get(launch_key)
    if launch is None:
        if _INTERPRETED:
            kernel, config = _KERNELS[kernel_name], _INTERPRETER_CONFIGS[kernel_name]
        elif AUTOTUNE:
            kernel, config = _gpu_kernel(kernel_name), {}
        else:
            default = default_config(
                kernel_name,
                x.dtype,
                device_properties(x.device).shared_memory_per_block_optin,
                constants.get("TAPS_OUTER", True),
                constants.get("MIXED", False),
            )
            kernel = _KERNELS[kernel_name]
            config = {**default.kwargs, "num_warps": default.num_warps, "num_stages": default.num_stages}
        launch = _KERNEL_LAUNCHES[launch_key] = KernelLaunch(
            kernel, grid, {**constants, **config}, _VARYING[kernel_name]
        )
    return launch


def _launch(
    x,
    weight,
    task_ids,
    task,
    bias,
    scale,
    shift,
    stride,
    padding,
    dilation,
    groups,
    relu,
    use_mask,
    tile_map=None,
    free_weights_zero=False,
    tasks=None,
    wrap=None,
    cache_plan=False,
    id_bits=8,
    plan_key=None,
):
    """Launch on validated arguments; ``padding`` is ``[top, bottom, left, right]``. ``wrap`` turns a kernel into its
    launchable form: ``wrap_triton`` (the default) inside the registered op, :func:`~packnet_kernels._checks.as_is`
    for a direct eager launch (see ``packnet_kernels.linear._launch`` for why). ``tile_map`` is used where the
    kernel's tiles line up with its cells (:func:`tile_map_applies`) and ignored elsewhere. ``tasks`` (an integer
    tensor ``[N]``, one task per image; ``task`` is then unused) runs a mixed batch in this one launch: only where
    :func:`mixed_kernel_applies`, and the epilogue vectors may be ``[num_tasks, out]`` tables. ``cache_plan`` (real
    tensors only: direct launches and the interpreter's op, never a traced call) keeps the launch plan of these
    shapes, strides and flags for the next such call (:func:`_plan`): most of the host time of a small conv. With
    ``wrap=as_is`` as well, the plan's kernel is launched directly after its first call (:func:`_kernel_launch`).
    ``plan_key``: :func:`_plan_key` of these arguments when the caller keeps it (a packed layer, per input shape)."""
    wrap = torch.library.wrap_triton if wrap is None else wrap
    args = (x, weight, task_ids, bias, scale, shift, stride, padding, dilation, groups, relu, use_mask, tile_map)
    args += (free_weights_zero, tasks, id_bits)
    if cache_plan:
        key = _plan_key(*args) if plan_key is None else plan_key
        plan = _PLANS.get(key)
        if plan is None:
            plan = _plan(*args)
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
                _KERNEL_LAUNCHES.clear()
            _PLANS[key] = plan
    else:
        plan = _plan(*args)
    # After the plan, which refuses shapes the kernel cannot index whatever the device (meta tensors included).
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"masked_conv2d: the Triton kernel needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1 set before "
            "Triton is imported"
        )
    out_shape, memory_format, kernel_name, constants, grid = plan
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    # Absent epilogue vectors are never read (constexpr-guarded); any tensor can stand in for their pointers.
    pointers = (x, weight, task_ids, x if bias is None else bias, x if scale is None else scale)
    pointers += (x if shift is None else shift, out)
    direct = cache_plan and wrap is as_is
    image_order = pixel_tiles = None
    if tasks is not None:
        image_order, pixel_tiles = _mixed_tiles(tasks, constants, reuse=direct, wrap=wrap)
    if direct:
        stream = torch._C._cuda_getCurrentRawStream(x.device.index) if x.is_cuda else 0
        if kernel_name == "gemm":
            varying = (task, image_order, pixel_tiles, tile_map if constants["TILE_MAP"] else None)
        else:
            varying = (task,)
        _kernel_launch(key, kernel_name, constants, grid, x)(pointers, varying, stream)
        return out
    common = dict(constants, active_task=task)
    if kernel_name == "gemm":
        common.update(image_order_ptr=image_order, pixel_tiles_ptr=pixel_tiles)
        common.update(tile_map_ptr=tile_map if constants["TILE_MAP"] else None)

    if _INTERPRETED:
        wrap(_KERNELS[kernel_name])[grid](*pointers, **common, **_INTERPRETER_CONFIGS[kernel_name])
    elif AUTOTUNE:
        wrap(_gpu_kernel(kernel_name))[grid](*pointers, **common)
    else:
        default = default_config(
            kernel_name,
            x.dtype,
            device_properties(x.device).shared_memory_per_block_optin,
            common.get("TAPS_OUTER", True),
            common.get("MIXED", False),
        )
        wrap(_KERNELS[kernel_name])[grid](
            *pointers, **common, **default.kwargs, num_warps=default.num_warps, num_stages=default.num_stages
        )
    return out


_OP_ARGS = (
    "Tensor x, Tensor weight, Tensor task_ids, int task, Tensor? bias, Tensor? scale, Tensor? shift, int[] stride, "
    "int[] padding, int[] dilation, int groups, bool relu, bool use_mask, Tensor? tile_map, bool free_weights_zero, "
    "Tensor? tasks, int id_bits=8"
)


@torch.library.custom_op("packnet::masked_conv2d_interpreted", mutates_args=(), schema=f"({_OP_ARGS}) -> Tensor")
def _masked_conv2d_interpreted(
    x,
    weight,
    task_ids,
    task,
    bias,
    scale,
    shift,
    stride,
    padding,
    dilation,
    groups,
    relu,
    use_mask,
    tile_map,
    raw,
    tasks,
    id_bits=8,
):
    """The CPU (``TRITON_INTERPRET=1``) launch, kept behind an opaque op: interpreted kernels are plain Python that
    ``wrap_triton`` cannot trace, so inside a traced graph they must run only when real tensors arrive."""
    args = (x, weight, task_ids, task, bias, scale, shift, stride, padding, dilation, groups, relu, use_mask)
    return _launch(*args, tile_map, raw, tasks, wrap=as_is, cache_plan=True, id_bits=id_bits)


@_masked_conv2d_interpreted.register_fake
def _(
    x,
    weight,
    task_ids,
    task,
    bias,
    scale,
    shift,
    stride,
    padding,
    dilation,
    groups,
    relu,
    use_mask,
    tile_map,
    raw,
    tasks,
    id_bits=8,
):
    return _empty_output(x, weight, stride, padding, dilation)


@torch.library.triton_op("packnet::masked_conv2d", mutates_args=())
def _masked_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    use_mask: bool,
    tile_map: torch.Tensor | None,
    free_weights_zero: bool,
    tasks: torch.Tensor | None,
    id_bits: int = 8,
) -> torch.Tensor:
    """The registered op (also its own fake implementation); arguments validated by :func:`masked_conv2d_triton`.
    CUDA launches go through ``wrap_triton`` so ``torch.compile`` sees the kernels. ``id_bits`` 2 or 4: ``task_ids``
    holds the int32 words of compact ids (:class:`~packnet_kernels.id_layout.CompactTaskIds`)."""
    args = (x, weight, task_ids, task, bias, scale, shift, stride, padding, dilation, groups, relu, use_mask)
    args += (tile_map, free_weights_zero, tasks)
    if not x.is_cuda:
        return _masked_conv2d_interpreted(*args, id_bits)
    # Triton launches on the current device: make it the tensors' one (they may live on another GPU).
    with torch.cuda.device(x.device):
        return _launch(*args, id_bits=id_bits)


def masked_conv2d_triton(
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
    use_mask: bool = True,
    tile_map: torch.Tensor | None = None,
    free_weights_zero: bool = False,
) -> torch.Tensor:
    """``relu?((conv2d(x, W_t) + bias) * scale + shift)`` with ``W_t = where((ids != 0) & (ids <= task), W, 0)``.

    Args:
        x: ``[N, C, H, W]``, contiguous or channels_last (other strides work too), float32/float16/bfloat16.
        weight: ``[out, C/groups, kh, kw]`` in ``x``'s dtype; ``task_ids`` the same shape, uint8, or the same ids in
            the run-time layout (:class:`~packnet_kernels.id_layout.CompactTaskIds`), which the GEMM kernel's
            tap-by-tap loop decodes a word at a time where :func:`compact_ids_apply` (other convs unpack them).
        task: int in 1..255.
        bias, scale, shift: optional ``[out]`` vectors in ``x``'s dtype; a ``Conv2d -> BatchNorm2d(eval)`` pair
            folds into ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
        stride, dilation: int or pair; padding: int, pair, ``"same"`` or ``"valid"``; groups: int.
        relu: apply ReLU last.
        use_mask: ``False`` runs the same kernel on the raw weight (ids not read); for benchmarks.
        tile_map, free_weights_zero: as for :func:`packnet_kernels.linear.masked_linear_triton`, the map over
            ``reference.gemm_matrix(task_ids)`` (uint8 ``[2, ceil(out / 32), ceil(kh * kw * C/groups / 32)]``). Used
            where the tiles line up with its cells (:func:`tile_map_applies`: ``C/groups`` a multiple of 32), else
            ignored; results never change.

    Returns:
        ``[N, out, H_out, W_out]`` in ``x``'s dtype; channels_last when ``x`` or ``weight`` is, as with ``F.conv2d``.
    """
    task, stride, padding, dilation = check_conv2d(
        x, weight, task_ids, task, bias, stride, padding, dilation, groups, scale, shift, dtypes=KERNEL_DTYPES
    )
    require_kernel_device("masked_conv2d_triton", x)
    check_tile_map("masked_conv2d", tile_map, weight, free_weights_zero)
    compact = isinstance(task_ids, CompactTaskIds)
    if compact and not compact_ids_apply(weight.shape[1], weight.shape[0] // groups, groups):
        task_ids = unpack_task_ids(task_ids)  # this conv's kernel reads bytes (see compact_ids_apply)
    if not isinstance(use_mask, bool):
        raise TypeError(f"masked_conv2d: use_mask must be a bool, got {type(use_mask).__name__}")
    if not use_mask:
        tile_map, free_weights_zero = None, False
    pads = _resolve_padding(padding, weight.shape[2:], dilation)
    tasks = None
    if isinstance(task, torch.Tensor):
        # Reading the values is a device sync on a GPU and a graph break in torch.compile: CPU eager calls only.
        if not x.is_cuda and not torch.compiler.is_compiling():
            check_task_values("masked_conv2d", task, task_limit(bias, scale, shift))
        cin_per_group, cout_per_group = weight.shape[1], weight.shape[0] // groups
        if not mixed_kernel_applies(cin_per_group, cout_per_group, groups):
            # One launch per task present (reads the tasks on the host).
            def single(images, image_task, *vectors):
                return masked_conv2d_triton(
                    images,
                    weight,
                    task_ids,
                    image_task,
                    vectors[0],
                    stride,
                    padding,
                    dilation,
                    groups,
                    scale=vectors[1],
                    shift=vectors[2],
                    relu=relu,
                    use_mask=use_mask,
                    tile_map=tile_map,
                    free_weights_zero=free_weights_zero,
                )

            return per_task_rows(single, x, task, (bias, scale, shift))
        tasks, task = task, 0
        bias, scale, shift = (None if v is None else v.contiguous() for v in (bias, scale, shift))
    id_bits = 8
    if isinstance(task_ids, CompactTaskIds):
        task_ids, id_bits = task_ids.words, task_ids.bits
    if direct_launch_allowed(x, weight, bias, scale, shift):
        # Eager calls skip the registered op's dispatch: most of a small layer's host time.
        args = (x, weight, task_ids, task, bias, scale, shift, stride, pads, dilation, groups, relu, use_mask)
        with on_device(x.device):
            return _launch(*args, tile_map, free_weights_zero, tasks, wrap=as_is, cache_plan=True, id_bits=id_bits)
    return torch.ops.packnet.masked_conv2d(
        x,
        weight,
        task_ids,
        task,
        bias,
        scale,
        shift,
        list(stride),
        pads,
        list(dilation),
        groups,
        relu,
        use_mask,
        tile_map,
        free_weights_zero,
        tasks,
        id_bits,
    )
