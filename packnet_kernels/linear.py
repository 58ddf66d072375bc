"""Triton masked linear: ``y = relu?((x @ where(task_ids in 1..task, W, 0)^T + bias) * scale + shift)``.

The kernel computes the transposed product ``y^T = W_t x^T``: each program loads a ``[BLOCK_N, BLOCK_K]`` weight tile
and its uint8 id tile, applies the task predicate in registers (a select, so an Inf/NaN in a weight the task does not
own never reaches the dot) and feeds the masked tile to ``tl.dot`` as the left operand. No masked weight copy is ever
written. The weight sits on the left because Hopper's wgmma takes only its left operand from registers, and because a
small batch then fills the dot's narrow side (``BLOCK_M = 16``) instead of wasting a 64-row tile.

Two regimes share the kernel (:func:`choose_regime`):

- small batch (``M <= SMALL_M_MAX``, memory bound): ``BLOCK_M = 16`` and split-K, so that enough programs stream the
  weight and ids (each byte read once) to fill the GPU.
- large batch (tensor-core bound): autotuned tiles, grouped tile ordering so that ``GROUP_N`` weight tiles stay in L2
  while the batch tiles stream past them; split-K only while the output tiles alone leave SMs idle.

Mixed-task batches (a task per row) take :func:`_mixed_linear_kernel` up to ``MIXED_V2_MAX_ROWS`` rows (a program
per weight tile serves every row, in groups of 16 rows of one task) and the 16-row mixed tiles of ``MIXED`` above.

Split-K runs in one launch: every split writes its fp32 partial tile to a small ``[SPLIT_K, M, N]`` workspace and
counts itself done on the tile's counter; the split that finds itself last sums the partials in increasing split
order, applies the epilogue, writes ``y`` and resets the counter to zero for the next call. Nothing is added to the
output atomically, so two runs are bitwise equal whichever split finishes last.

Accumulation is fp32. fp32 inputs use TF32 tensor-core dots when PyTorch allows TF32 for matmuls
(``torch.get_float32_matmul_precision() != "highest"``, as for cuBLAS) and exact fp32 dots otherwise. Autotuning keys
on a power-of-two bucket of the batch size, never the raw size. Under ``TRITON_INTERPRET=1`` (CPU) one small fixed
config runs and bf16 tiles are upcast to fp32 before the dot (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._checks import (
    KERNEL_DTYPES,
    TILE_CELL,
    as_is,
    autotune_bench,
    ceil_div,
    check_linear,
    check_task_values,
    check_tile_map,
    device_properties,
    direct_launch_allowed,
    packed_forward,
    require_kernel_device,
    task_limit,
)
from ._launcher import KernelLaunch
from ._predicate import (
    element_masks,
    field_pair_masks,
    keep_field_owners,
    keep_owned,
    next_pass,
    next_task,
    span_owners,
    task_owns,
    tile_bounds,
)
from .id_layout import CHUNK_COLUMNS, CompactTaskIds, field_span

__all__ = [
    "AUTOTUNE",
    "SMALL_M_MAX",
    "LinearPlan",
    "choose_regime",
    "linear_plan",
    "masked_linear_triton",
    "release_workspaces",
]

# On a GPU, autotune the tiles (the default). When False, the first config of ``_configs`` runs untuned: tests set
# this so that a CUDA test session compiles one config per kernel variant instead of tuning every shape.
AUTOTUNE = True

# Batches up to this size take the split-K (GEMV-shaped) path; larger ones the tensor-core tiled path.
SMALL_M_MAX = 16
# Autotune keys bucket the batch size to the next power of two, capped here: larger batches share one tuning.
M_BUCKET_CAP = 4096
# The small regime's K-chunk per split is a multiple of this, so every autotuned BLOCK_K (a divisor) tiles it evenly.
_SPLIT_K_ALIGN = 256
# ...and at least this long, so each split runs enough iterations for the load pipeline to pay off.
_MIN_K_PER_SPLIT = 512
# The split count aims at this many programs per SM (several waves hide the tail of the last one).
_PROGRAMS_PER_SM = 4
# The large regime splits K only into chunks at least this long (its programs are tensor-core tiles).
_MIN_K_PER_SPLIT_LARGE = 1024
# The fixed interpreter config, small so that tests with tiny shapes still cover tails, grouping and split-K.
_INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 2}
_INTERPRETER_MIN_K_PER_SPLIT = 64
_INTERPRETER_SM_COUNT = 4
# Bounds of the output tiles of every config (and the interpreter's): they size the split-K workspace.
_MIN_BLOCK_N = 32
_MIN_BLOCK_M = 16
_MAX_BLOCK_N = 256
_MAX_BLOCK_M = {"small": 16, "large": 256}
# A mixed-task tile handles up to this many distinct tasks per pass over K (the weight and ids are read once per
# pass): one unrolled select-and-dot per task, so more costs code size and compile time.
MIXED_SEGMENTS = 8
# Mixed batches up to this many rows take the grouped kernel (:func:`_mixed_linear_kernel`, v2: one program per
# weight tile serves every row); larger ones the 16-row mixed tiles of :func:`_masked_linear_kernel` (v1).
MIXED_V2_MAX_ROWS = 256
# Row groups (16 rows of one task each) a v2 program holds per pass over K: one accumulator and one dot per group,
# unrolled. 16 fit the registers of a 64-row weight tile on 8 warps for sm_90 (no spill); 24 spill.
MIXED_GROUPS = 16
# The interpreter's v2 tiles: those of the small single-task regime, so that both sum in the same order.
_INTERPRETER_V2_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32}
# The constexprs that size a v2 program's loops (mixed2_config_fits's arguments after the shared memory).
_MIXED2_SIZES = ("GROUPS", "FEW_GROUPS", "WIDE_GROUPS", "ONE_ROWS", "ONE_BLOCK_K", "SLOT_TASKS", "SLOT_ROWS")
# Shared memory of a v2 program beyond its largest loop's pipelined tiles (mixed2_config_fits), in bytes.
_MIXED2_SHARED_EXTRA = 8192
# A v2 batch on compact ids takes the slots (one per task of the layer, :func:`_slot_sums`) when its distinct tasks
# are at least this share of the slots (and each in one group): below it the groups' masks cost less.
SLOT_SHARE = (1, 2)
_SLOT_SHARE_NUM = tl.constexpr(SLOT_SHARE[0])
_SLOT_SHARE_DEN = tl.constexpr(SLOT_SHARE[1])


# Columns of a chunk of the fields layout (id_layout.CHUNK_COLUMNS), for the kernels.
_CHUNK = tl.constexpr(CHUNK_COLUMNS)


@triton.jit
def _epilogue_vector(vector_ptr, offs_n, n_mask, stride_n, table_rows, stride_task, MIXED: tl.constexpr):
    """An epilogue vector as an fp32 tile broadcast against ``[BLOCK_N, BLOCK_M]``: ``vector[n]`` as ``[BLOCK_N, 1]``;
    with ``MIXED``, ``vector[table_rows[m], n]`` as ``[BLOCK_N, BLOCK_M]`` (``stride_task`` 0 for a shared vector)."""
    # One return after a constexpr if/else: triton 3.6 rejects two returns of different shapes even when a constexpr
    # decides between them ("Inconsistent return types").
    if MIXED:
        offsets = offs_n[:, None] * stride_n + table_rows[None, :].to(tl.int64) * stride_task
        vector = tl.load(vector_ptr + offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
    else:
        vector = tl.load(vector_ptr + offs_n * stride_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    return vector


@triton.jit
def _epilogue(
    acc,
    offs_n,
    n_mask,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    stride_bias,
    stride_scale,
    stride_shift,
    table_rows,
    stride_bias_task,
    stride_scale_task,
    stride_shift_task,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RELU: tl.constexpr,
    MIXED: tl.constexpr,
):
    """``relu?((acc + bias[n]) * scale[n] + shift[n])`` in fp32 on an ``[BLOCK_N, BLOCK_M]`` tile (n = rows); with
    ``MIXED`` column ``m`` takes row ``table_rows[m]`` (its task - 1) of each per-task table."""
    if HAS_BIAS:
        acc += _epilogue_vector(bias_ptr, offs_n, n_mask, stride_bias, table_rows, stride_bias_task, MIXED)
    if HAS_SCALE:
        acc *= _epilogue_vector(scale_ptr, offs_n, n_mask, stride_scale, table_rows, stride_scale_task, MIXED)
    if HAS_SHIFT:
        acc += _epilogue_vector(shift_ptr, offs_n, n_mask, stride_shift, table_rows, stride_shift_task, MIXED)
    if RELU:
        # propagate_nan: PTX max.f32 would turn a NaN into 0, unlike torch.relu and the reference.
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return acc


@triton.jit
def _load_ids(ids_ptrs, n_mask, k, offs_k, ids_remaining, ID_BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """One step's ids for the step's columns ``k + offs_k``: the uint8 ``[BLOCK_N, BLOCK_K]`` tile (``ids_ptrs`` at
    the step's tile), or (``ID_BITS`` 2 or 4, ``ids_ptrs`` at each row's first byte of the fields layout,
    ``id_layout``) each column's stored field ``(id - 1) mod 2**ID_BITS``, uint8 ``[BLOCK_N, BLOCK_K]``; with
    ``USE_ASM`` and a step inside one span (one field for all its columns) the int32 words ``[BLOCK_N, BLOCK_K /
    4]`` of the step's bytes instead, for :func:`field_pair_masks`. Columns from ``ids_remaining`` on are not read
    (0), or with words nothing when it is 0 (a row's bytes cover whole 256-column steps, free past K)."""
    read = n_mask[:, None] & (offs_k < ids_remaining)[None, :]
    if ID_BITS < 8:
        SPAN: tl.constexpr = 16 * ID_BITS
        if USE_ASM and offs_k.shape[0] <= SPAN:
            offs_word = tl.arange(0, offs_k.shape[0] // 4)
            start = (k // _CHUNK) * SPAN + k % SPAN
            word_ptrs = (ids_ptrs + start).to(tl.pointer_type(tl.int32)) + offs_word[None, :]
            words_read = tl.full(offs_word.shape, 0, tl.int32) < ids_remaining
            ids = tl.load(word_ptrs, mask=n_mask[:, None] & words_read[None, :], other=0)
        else:
            columns = k + offs_k
            # A step's spans are whole runs of bytes (vector loads): BLOCK_K and k are powers-of-two multiples, and a
            # row's bytes cover whole 256-column steps (id_layout.ROW_ALIGN_COLUMNS).
            ids = tl.load(ids_ptrs + ((columns // _CHUNK) * SPAN + columns % SPAN)[None, :], mask=read, other=0)
            ids = (ids >> ((columns % _CHUNK) // SPAN * ID_BITS).to(tl.uint8)[None, :]) & ((1 << ID_BITS) - 1)
    else:
        ids = tl.load(ids_ptrs, mask=read, other=0)
    return ids


@triton.jit
def _keep_task(w, ids, k, offs_k, ids_remaining, task, TILE_MAP: tl.constexpr, ID_BITS: tl.constexpr):
    """``w`` with the weights task ``task`` does not own set to +0.0 (a NaN/Inf stored in a weight the task does not
    own is dropped), ``ids`` as :func:`_load_ids` gives them for the step at column ``k``: a select on bytes, or on
    words an AND of the bits with :func:`field_pair_masks`; with ``TILE_MAP`` the columns from ``ids_remaining`` on
    (whose ids were not read: raw tiles) are kept as they are."""
    if ids.dtype == tl.int32:
        SPAN: tl.constexpr = 16 * ID_BITS
        masks = element_masks(field_pair_masks(ids, (k % _CHUNK) // SPAN * ID_BITS, task, ID_BITS),
                              w.dtype.primitive_bitwidth == 32)  # fmt: skip
        if TILE_MAP:
            masks = masks | tl.where(offs_k >= ids_remaining, -1, 0).to(masks.dtype)[None, :]
        w = keep_owned(w, masks)
    else:
        if ID_BITS < 8:
            # A stored field is (id - 1) mod 2**bits: below the task (clamped to the largest field) exactly when owned.
            owned = ids < tl.minimum(task, (1 << ID_BITS) - 1).to(tl.uint8)
        else:
            owned = task_owns(ids, task)
        if TILE_MAP:
            owned = owned | (offs_k >= ids_remaining)[None, :]
        w = tl.where(owned, w, 0.0)
    return w


@triton.jit
def _load_weight(w_ptrs, n_mask, offs_k, k_remaining, EVEN_K: tl.constexpr = False):
    """One step's weight tile ``[BLOCK_N, BLOCK_K]``; columns from ``k_remaining`` on are 0. ``EVEN_K``: the step
    lies inside K (no column bound to check)."""
    if EVEN_K:
        return tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
    return tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k < k_remaining)[None, :], other=0.0)


@triton.jit
def _masked_step(w, ids_ptrs, n_mask, k, offs_k, ids_remaining, task, TILE_MAP: tl.constexpr, ID_BITS: tl.constexpr,
                 USE_ASM: tl.constexpr):  # fmt: skip
    """One step's weight tile masked for ``task``: its ids loaded (:func:`_load_ids`), then applied
    (:func:`_keep_task`)."""
    ids = _load_ids(ids_ptrs, n_mask, k, offs_k, ids_remaining, ID_BITS, USE_ASM)
    return _keep_task(w, ids, k, offs_k, ids_remaining, task, TILE_MAP, ID_BITS)


@triton.jit
def _dot_step(acc, w, xt_ptrs, k_mask, m_mask, UPCAST_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              EVEN_K: tl.constexpr = False):  # fmt: skip
    """One K step of the single-task loops: ``acc + w @ xt``, the activations ``xt`` ``[BLOCK_K, BLOCK_M]`` loaded
    from ``xt_ptrs`` (rows ``k_mask``, or all with ``EVEN_K``; columns ``m_mask``), bf16 operands upcast under the
    interpreter."""
    if EVEN_K:
        xt = tl.load(xt_ptrs, mask=m_mask[None, :], other=0.0)
    else:
        xt = tl.load(xt_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
    if UPCAST_BF16:
        w = w.to(tl.float32)
        xt = xt.to(tl.float32)
    return tl.dot(w, xt, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _field_sums(
    acc,
    w_ptrs,
    ids_ptrs,
    xt_ptrs,
    offs_k,
    n_mask,
    m_mask,
    k_start,
    k_end,
    K,
    stride_wk,
    stride_xk,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TASK: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_STAGES: tl.constexpr = None,
    EVEN_K: tl.constexpr = False,
):
    """Task ``TASK``'s sums over ``[k_start, k_end)`` on ids in the fields layout: ``acc + w_masked @ xt``, the same
    ``BLOCK_K``-column dots in the same order as :func:`_task_sums` (``BLOCK_K`` at most the layout's span ``S = 16 *
    ID_BITS``; ``k_start`` on a chunk).

    Per chunk of 128 columns the ``[BLOCK_N, S]`` id bytes are loaded once (as ``S / BLOCK_K`` tiles) and field
    ``q`` of them masks the weight tiles of columns ``S q`` on: every tile of ids has the shape of the weight tile it
    masks, and :func:`keep_field_owners` is elementwise with ``TASK`` a constant, so Triton moves the dot operand's
    layout up to the loads (``MMAV3HoistLayoutConversion``): the masked tile is built in the registers wgmma reads,
    with no shared-memory round trip (``tests/test_codegen.py``). Runs at least one chunk (see :func:`_task_sums`).
    ``CHUNK_STAGES``: the loop's pipeline depth in chunks where it is not the launch's ``num_stages`` (a kernel whose
    other loops step ``BLOCK_K`` columns at a time). ``EVEN_K``: K is a whole number of chunks, so no step checks
    its columns against K (triton 3.6, sm_90, 4-bit ids: 8 % fewer instructions per chunk)."""
    SPAN: tl.constexpr = 16 * ID_BITS
    tl.static_assert(BLOCK_K <= SPAN, "the fields layout's loop takes BLOCK_K <= 16 * ID_BITS")
    FIELDS: tl.constexpr = 8 // ID_BITS
    RUNS: tl.constexpr = SPAN // BLOCK_K
    for chunk in tl.range(0, tl.maximum(tl.cdiv(k_end - k_start, _CHUNK), 1), num_stages=CHUNK_STAGES):
        byte_ptrs = ids_ptrs + ((k_start // _CHUNK + chunk) * SPAN + offs_k)[None, :]
        runs = ()
        for run in tl.static_range(RUNS):
            runs = runs + (tl.load(byte_ptrs + run * BLOCK_K, mask=n_mask[:, None], other=0),)
        for field in tl.static_range(FIELDS):
            for run in tl.static_range(RUNS):
                k_remaining = K - (k_start + chunk * _CHUNK + field * SPAN + run * BLOCK_K)
                k_mask = offs_k < k_remaining
                w = keep_field_owners(_load_weight(w_ptrs, n_mask, offs_k, k_remaining, EVEN_K), runs[run], field,
                                      TASK, ID_BITS, USE_ASM)  # fmt: skip
                acc = _dot_step(acc, w, xt_ptrs, k_mask, m_mask, UPCAST_BF16, INPUT_PRECISION, EVEN_K)
                w_ptrs += BLOCK_K * stride_wk
                xt_ptrs += BLOCK_K * stride_xk
    return acc


@triton.jit
def _slot_sums(
    w_ptrs,
    ids_ptrs,
    x_ptr,
    rows,
    offs_k,
    n_mask,
    k_start,
    k_end,
    K,
    stride_wk,
    stride_xm,
    stride_xk,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    FIRST_TASK: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``SLOTS`` fp32 ``[BLOCK_N, rows]`` sums over ``[k_start, k_end)`` on ids in the fields layout, slot ``s``'s
    ``W_{FIRST_TASK + s} x[rows[s]]^T`` (``rows``: a tuple of ``SLOTS`` int64 ``[16]`` or ``[32]`` input rows, -1
    for none; a slot without rows sums zeros), each slot's task compiled in.

    The loop of :func:`_field_sums` with one dot per slot: per chunk the id bytes are loaded once, and every K step
    masks the weight tile once per slot with the slot's task a constant, so the masked tiles stay in the registers
    wgmma reads (no shared-memory round trip, which a task known at run time costs in :func:`_group_sums`: Triton
    3.6 sinks the operand's layout conversion below any select or asm fed by a run-time value). Every slot's mask and
    dot run whether or not the batch holds its task. The dots run in increasing K in ``BLOCK_K`` columns, as the
    single-task kernel's (``BLOCK_K`` at most the layout's span; ``k_start`` on a chunk). Two chunks in flight, as
    the one-task fields pass: the kernel's other loops step ``BLOCK_K`` columns in ``num_stages`` stages, and the
    launch's stages of whole chunks would take more shared memory than all of them (NOTES.md, v8 mixed (v2))."""
    SPAN: tl.constexpr = 16 * ID_BITS
    tl.static_assert(BLOCK_K <= SPAN, "the fields layout's loop takes BLOCK_K <= 16 * ID_BITS")
    FIELDS: tl.constexpr = 8 // ID_BITS
    RUNS: tl.constexpr = SPAN // BLOCK_K
    accs = ()
    row_masks = ()
    x_ptrs = ()
    for s in tl.static_range(SLOTS):
        accs = accs + (tl.zeros((BLOCK_N, rows[s].shape[0]), dtype=tl.float32),)
        row_masks = row_masks + ((rows[s] >= 0)[None, :],)
        x_ptrs = x_ptrs + (x_ptr + (k_start + offs_k)[:, None].to(tl.int64) * stride_xk + rows[s][None, :] * stride_xm,)
    for chunk in tl.range(0, tl.maximum(tl.cdiv(k_end - k_start, _CHUNK), 1), num_stages=2):
        byte_ptrs = ids_ptrs + ((k_start // _CHUNK + chunk) * SPAN + offs_k)[None, :]
        runs = ()
        for run in tl.static_range(RUNS):
            runs = runs + (tl.load(byte_ptrs + run * BLOCK_K, mask=n_mask[:, None], other=0),)
        for field in tl.static_range(FIELDS):
            for run in tl.static_range(RUNS):
                step = chunk * _CHUNK + field * SPAN + run * BLOCK_K
                k_remaining = K - (k_start + step)
                k_mask = (offs_k < k_remaining)[:, None]
                w = _load_weight(w_ptrs, n_mask, offs_k, k_remaining, EVEN_K)
                new_accs = ()
                for s in tl.static_range(SLOTS):
                    if EVEN_K:
                        # K a whole number of chunks: every step inside K, the rows' mask alone.
                        xt = tl.load(x_ptrs[s] + step * stride_xk, mask=row_masks[s], other=0.0)
                    else:
                        xt = tl.load(x_ptrs[s] + step * stride_xk, mask=k_mask & row_masks[s], other=0.0)
                    w_task = keep_field_owners(w, runs[run], field, FIRST_TASK + s, ID_BITS, USE_ASM)
                    if UPCAST_BF16:
                        w_task = w_task.to(tl.float32)
                        xt = xt.to(tl.float32)
                    new_accs = new_accs + (tl.dot(w_task, xt, accs[s], input_precision=INPUT_PRECISION),)
                accs = new_accs
                w_ptrs += BLOCK_K * stride_wk
    return accs


@triton.jit
def _task_sums(
    acc,
    w_ptrs,
    ids_ptrs,
    xt_ptrs,
    map_ptrs,
    cell_row_mask,
    offs_cell_k,
    offs_k,
    n_mask,
    m_mask,
    k_start,
    k_end,
    K,
    active_task,
    stride_map_plane,
    stride_wk,
    stride_idk,
    stride_xk,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_K: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One task's sums over ``[k_start, k_end)``: ``acc + w_masked @ xt`` step by step. With ``TILE_MAP`` each step
    first reads its tile's cells: a tile with no weight of tasks 1..active_task reads nothing, and (``RAW_TILES``) a
    tile whose owners are all visible reads no ids.

    The loop runs at least one step, even for an empty span (whose one step loads nothing: its masks are empty): a
    loop the compiler cannot prove runs gives the accumulator a second definition on the path around it, the zeros
    ``acc`` held before, and ptxas then serialises every wgmma of the kernel (C7515; triton 3.6 and 3.9)."""
    for step in range(0, tl.maximum(tl.cdiv(k_end - k_start, BLOCK_K), 1)):
        k = k_start + step * BLOCK_K
        # Masks compare offsets with scalar bounds only (what keeps the loads 16-byte cp.async): the tile map narrows
        # the bounds, to 0 for what this tile need not read.
        k_remaining = K - k
        ids_remaining = k_remaining
        if TILE_MAP:
            cell_mask = cell_row_mask[:, None] & (k // CELL_K + offs_cell_k < tl.cdiv(K, CELL_K))[None, :]
            k_remaining, ids_remaining = tile_bounds(
                map_ptrs, cell_mask, stride_map_plane, k_remaining, active_task, active_task, RAW_TILES
            )
            map_ptrs += BLOCK_K // CELL_K
        k_mask = offs_k < k_remaining
        w = _load_weight(w_ptrs, n_mask, offs_k, k_remaining)
        if USE_MASK:
            # Columns whose ids are not read hold either raw-tile weights (kept as stored: every owner is visible and
            # free weights are zero) or zeros (skipped tiles, the tail past K).
            w = _masked_step(w, ids_ptrs, n_mask, k, offs_k, ids_remaining, active_task, TILE_MAP, ID_BITS, USE_ASM)
            if ID_BITS == 8:
                ids_ptrs += BLOCK_K * stride_idk
        acc = _dot_step(acc, w, xt_ptrs, k_mask, m_mask, UPCAST_BF16, INPUT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        xt_ptrs += BLOCK_K * stride_xk
    return acc


@triton.jit
def _mixed_pass(
    acc,
    w_ptrs,
    ids_ptrs,
    xt_ptrs,
    map_ptrs,
    cell_row_mask,
    offs_cell_k,
    row_tasks,
    done_task,
    tile_min_task,
    tile_max_task,
    offs_k,
    n_mask,
    m_mask,
    k_start,
    k_end,
    K,
    stride_map_plane,
    stride_wk,
    stride_idk,
    stride_xk,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_K: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over K of a mixed-task tile for the next ``SEGMENTS`` tasks above ``done_task`` among its rows: each K
    step loads the weight, id and activation tiles once, then per task selects the task's weights and keeps the dot
    only in the task's columns. A segment past the tile's last task selects no weight and keeps no column."""
    for k in range(k_start, k_end, BLOCK_K):
        k_remaining = K - k
        ids_remaining = k_remaining
        if TILE_MAP:
            cell_mask = cell_row_mask[:, None] & (k // CELL_K + offs_cell_k < tl.cdiv(K, CELL_K))[None, :]
            # Skipped only when no task of the tile's rows uses the step; raw only when all of them see every owner.
            k_remaining, ids_remaining = tile_bounds(
                map_ptrs, cell_mask, stride_map_plane, k_remaining, tile_max_task, tile_min_task, RAW_TILES
            )
            map_ptrs += BLOCK_K // CELL_K
        k_mask = offs_k < k_remaining
        w = _load_weight(w_ptrs, n_mask, offs_k, k_remaining)
        if USE_MASK:
            ids = _load_ids(ids_ptrs, n_mask, k, offs_k, ids_remaining, ID_BITS, USE_ASM)
            if ID_BITS == 8:
                ids_ptrs += BLOCK_K * stride_idk
        xt = tl.load(xt_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if UPCAST_BF16:
            xt = xt.to(tl.float32)
        segment_task = done_task
        for _ in tl.static_range(SEGMENTS):
            segment_task = next_task(row_tasks, segment_task)
            w_task = w
            if USE_MASK:
                w_task = _keep_task(w, ids, k, offs_k, ids_remaining, segment_task, TILE_MAP, ID_BITS)
            if UPCAST_BF16:
                w_task = w_task.to(tl.float32)
            # The other tasks' columns keep their sums: 0 * Inf from a weight they do not own never lands.
            summed = tl.dot(w_task, xt, acc, input_precision=INPUT_PRECISION)
            acc = tl.where((row_tasks == segment_task)[None, :], summed, acc)
        w_ptrs += BLOCK_K * stride_wk
        xt_ptrs += BLOCK_K * stride_xk
    return acc


@triton.jit
def _mixed_task_sums(
    acc,
    w_ptrs,
    ids_ptrs,
    xt_ptrs,
    map_ptrs,
    cell_row_mask,
    offs_cell_k,
    row_tasks,
    tile_min_task,
    tile_max_task,
    offs_k,
    n_mask,
    m_mask,
    k_start,
    k_end,
    K,
    stride_map_plane,
    stride_wk,
    stride_idk,
    stride_xk,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_K: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The main loop of a mixed-task tile (see ``MIXED`` in :func:`_masked_linear_kernel`): ``acc[:, m] += sum_k
    W_{row_tasks[m]}[n, k] x[m, k]`` for every column whose task is in 1..255 (0 marks rows that take no part).

    Passes over K, each for the next (up to) ``SEGMENTS`` tasks present among the tile's rows, so one pass whenever
    the rows hold at most ``SEGMENTS`` distinct tasks. A pass of one or two tasks runs two masked dots per K step,
    a fuller one ``SEGMENTS``: two K loops, chosen once per pass. A run-time ``if`` around each dot inside one loop
    would stop Triton from pipelining it (no ``cp.async`` stages in the sm_90 PTX). Not more than two: each loop gets
    its own pipeline buffers in shared memory (Triton 3.6 and 3.9 do not share them between the branches), so a third
    or fourth loop would cost occupancy that a memory-bound tile needs."""
    # Sorted rows put one or two tasks in most 16-row tiles (8 rows per task for 64 rows over 8 tasks).
    FEW_SEGMENTS: tl.constexpr = 2 if SEGMENTS > 2 else 1
    done_task = 0 * tile_max_task  # every task <= done_task is summed
    while done_task < tile_max_task:
        pass_tasks, last_task = next_pass(row_tasks, done_task, SEGMENTS)
        if SEGMENTS > FEW_SEGMENTS and pass_tasks <= FEW_SEGMENTS:
            acc = _mixed_pass(acc, w_ptrs, ids_ptrs, xt_ptrs, map_ptrs, cell_row_mask, offs_cell_k, row_tasks,
                              done_task, tile_min_task, tile_max_task, offs_k, n_mask, m_mask, k_start, k_end, K,
                              stride_map_plane, stride_wk, stride_idk, stride_xk, USE_MASK, TILE_MAP, RAW_TILES,
                              CELL_K, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, FEW_SEGMENTS,
                              BLOCK_K)  # fmt: skip
        else:
            acc = _mixed_pass(acc, w_ptrs, ids_ptrs, xt_ptrs, map_ptrs, cell_row_mask, offs_cell_k, row_tasks,
                              done_task, tile_min_task, tile_max_task, offs_k, n_mask, m_mask, k_start, k_end, K,
                              stride_map_plane, stride_wk, stride_idk, stride_xk, USE_MASK, TILE_MAP, RAW_TILES,
                              CELL_K, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, SEGMENTS, BLOCK_K)  # fmt: skip
        done_task = last_task
    return acc


@triton.jit(do_not_specialize=["active_task", "m_bucket", "max_task"])
def _masked_linear_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    partials_ptr,
    counters_ptr,
    tile_map_ptr,
    row_tasks_ptr,
    row_order_ptr,
    M,
    N,
    K,
    active_task,
    k_per_split,
    m_bucket,
    max_task,
    stride_map_plane,
    stride_map_row,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_idn,
    stride_idk,
    stride_bias,
    stride_scale,
    stride_shift,
    stride_bias_task,
    stride_scale_task,
    stride_shift_task,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RELU: tl.constexpr,
    USE_MASK: tl.constexpr,
    TILE_MAP: tl.constexpr,
    RAW_TILES: tl.constexpr,
    CELL_N: tl.constexpr,
    CELL_K: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    MIXED: tl.constexpr,
    SEGMENTS: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    TASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr = False,
):
    """``y[m, n] = epilogue(sum_k x[m, k] * where((ids[n, k] != 0) & (ids[n, k] <= active_task), w[n, k], 0))``.

    Pointers: ``x_ptr`` ``[M, K]``, ``w_ptr`` ``[N, K]`` (float), ``ids_ptr`` ``[N, K]`` uint8, or with ``ID_BITS``
    2 or 4 the int32 words of compact ids read as the fields layout's bytes (``packnet_kernels.id_layout``; row
    stride ``stride_idn`` in bytes) (not read when ``USE_MASK`` is off), ``bias_ptr``/``scale_ptr``/``shift_ptr``
    ``[N]`` (read only when their ``HAS_*`` is set), ``y_ptr`` ``[M, N]``; with ``TILE_MAP`` only: ``tile_map_ptr``
    uint8 ``[2, N / CELL_N, K / CELL_K]`` (strides ``stride_map_plane``, ``stride_map_row``, 1; see
    :func:`packnet_kernels.reference.tile_map`); with ``SPLIT`` only: ``partials_ptr`` fp32 ``[SPLIT_K, tiles,
    BLOCK_N, BLOCK_M]`` (one whole tile per split and axis-0 program, in the accumulator's order) and
    ``counters_ptr`` int32 ``[tiles]``, zero on entry and left zero on exit.

    Grid: axis 0 walks the ``[N / BLOCK_N, M / BLOCK_M]`` output tiles in groups of ``GROUP_N`` weight-tile rows;
    axis 1 is the K split (``SPLIT_K`` programs): program ``s`` covers ``K`` in ``[s * k_per_split, (s + 1) *
    k_per_split)``. Without ``SPLIT`` (one split) the epilogue is applied and ``y`` written at once. With ``SPLIT``
    each program stores its raw fp32 sums to ``partials[s]`` and increments its tile's counter; the program that
    counts ``SPLIT_K`` sums ``partials[0..SPLIT_K)`` in increasing ``s``, applies the epilogue, writes ``y`` and
    zeroes the counter. ``m_bucket`` is unused in the body: it is the autotuning key.

    ``TILE_MAP``: first the program reads the cells of its whole span (its weight rows by its split's K range): a span
    holding no weight of tasks 1..active_task runs no loop (its sums are zero), and with ``RAW_TILES`` (the caller
    guarantees free weights are exactly zero) a span whose owners are all <= active_task runs the loop without ids
    or map, its weights as stored. Any other span reads each step's cells before the step: a tile no weight of tasks
    1..active_task lives in reads nothing (its weight, ids and activations load as zeros, masked, so no bytes move),
    and with ``RAW_TILES`` a tile whose owners are all <= active_task reads no ids. Either way the sums are those of
    the predicate on every element.

    ``TASK`` (compact ids, one task, splits on whole chunks of the layout): ``active_task`` clamped to ``2**ID_BITS -
    1``, compiled in; the loop is then :func:`_field_sums` (its checked spans, with ``TILE_MAP``, read no cells per
    step). 0: the task is ``active_task`` at run time. ``EVEN_K`` (:func:`whole_chunks`): K is a whole number of
    the fields layout's chunks, so that loop checks no column against K.

    ``MIXED`` (a mixed-task batch; ``active_task`` unused): ``row_tasks_ptr`` ``[M]`` (any integer dtype) holds the
    rows' tasks sorted increasingly and ``row_order_ptr`` ``[M]`` int64 the input row of each sorted position, so
    position ``m`` reads ``x[row_order[m]]`` and writes ``y[row_order[m]]`` with task ``row_tasks[m]``. Each K step
    loads the weight and id tiles once and, for each task present among the tile's rows (in increasing order, up to
    ``SEGMENTS`` of them per pass), selects that task's weights and adds their dot to that task's columns only (a
    select on the result, so a NaN/Inf weight of a later task never reaches an earlier task's rows); a tile whose
    rows hold more than ``SEGMENTS`` tasks runs further passes over K. Epilogue vectors are ``[tasks, N]`` tables
    (strides ``stride_*_task``, 0 for one vector shared by every task), row ``task - 1`` per column. Rows whose task
    is outside 1..``max_task`` come out NaN. With ``TILE_MAP`` a K step is skipped when no task among the tile's rows
    uses it, and reads no ids when every owner is visible to the tile's smallest task.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_N * num_pid_m
    group_id = pid // num_pid_in_group
    first_pid_n = group_id * GROUP_N
    group_size_n = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % num_pid_in_group) % group_size_n
    pid_m = (pid % num_pid_in_group) // group_size_n

    # int64 offsets: the weight, ids or output may exceed 2^31 elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # ``k_per_split`` is specialised (not in ``do_not_specialize``): Triton then knows it is a multiple of 16, so the
    # split's start is 16-aligned and the K mask below is constant over 16-element runs, which lets every weight, id
    # and activation load become a 16-byte ``cp.async``. The launcher makes ``k_per_split`` a multiple of every
    # BLOCK_K, so a split's tiles never cross into the next split and masking against ``K`` alone is exact (one
    # split: k_start is 0). Said with multiple_of, it also makes a step's compact-id words (BLOCK_K / 8 or / 16 of
    # them, from k_start / 8 or / 16 on) 16-byte loads instead of 8-byte ones.
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)
    k_end = min(K, k_start + k_per_split)
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = k_start.to(tl.int64) + offs_k

    if MIXED:
        # Invalid rows (task outside 1..max_task) join no task segment: their sums stay 0 and they are written NaN.
        raw_tasks = tl.load(row_tasks_ptr + offs_m, mask=m_mask, other=0)
        row_valid = (raw_tasks >= 1) & (raw_tasks <= max_task)
        row_tasks = tl.where(row_valid, raw_tasks, 0).to(tl.int32)
        x_rows = tl.load(row_order_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        tile_max_task = tl.max(row_tasks, axis=0)
        # Smallest valid task of the tile (256 when it has none): raw tiles need every owner visible to it.
        tile_min_task = tl.min(tl.where(row_tasks > 0, row_tasks, 256), axis=0)
    else:
        x_rows = offs_m

    w_ptrs, ids_ptrs = _operand_ptrs(w_ptr, ids_ptr, offs_n, k_start, stride_wn, stride_wk, stride_idn, stride_idk,
                                     ID_BITS, BLOCK_K)  # fmt: skip
    xt_ptrs = x_ptr + offs_k64[:, None] * stride_xk + x_rows[None, :] * stride_xm

    if TILE_MAP:
        cell_rows = pid_n * (BLOCK_N // CELL_N) + tl.arange(0, BLOCK_N // CELL_N)
        cell_row_mask = cell_rows < tl.cdiv(N, CELL_N)
        offs_cell_k = tl.arange(0, BLOCK_K // CELL_K)
        map_ptrs = tile_map_ptr + cell_rows[:, None] * stride_map_row + (k_start // CELL_K + offs_cell_k)[None, :]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if MIXED:
        acc = _mixed_task_sums(
            acc,
            w_ptrs,
            ids_ptrs,
            xt_ptrs,
            map_ptrs if TILE_MAP else None,
            cell_row_mask if TILE_MAP else None,
            offs_cell_k if TILE_MAP else None,
            row_tasks,
            tile_min_task,
            tile_max_task,
            offs_k,
            n_mask,
            m_mask,
            k_start,
            k_end,
            K,
            stride_map_plane,
            stride_wk,
            stride_idk,
            stride_xk,
            USE_MASK,
            TILE_MAP,
            RAW_TILES,
            CELL_K,
            UPCAST_BF16,
            INPUT_PRECISION,
            ID_BITS,
            USE_ASM,
            SEGMENTS,
            BLOCK_K,
        )
        table_rows = tl.maximum(row_tasks - 1, 0)
    else:
        table_rows = offs_m  # unused: one task's vectors
        if TILE_MAP:
            # Decided once for the program's whole span, before any loop: per-step skips alone left the loop as long
            # as ever, and a loop bound by its steps ran no faster for the bytes it skipped (NOTES.md, run 4).
            owner_min, owner_max = span_owners(
                tile_map_ptr + cell_rows[:, None] * stride_map_row,
                cell_row_mask,
                k_start,
                k_end,
                stride_map_plane,
                CELL_K,
                128,
            )
            if owner_min <= active_task:  # else no weight of the span is the task's: the sums stay zero
                raw_span = False
                if RAW_TILES:
                    raw_span = owner_max <= active_task
                if raw_span:
                    # Every owner visible and free weights zero: the weights as stored, no ids, no map.
                    acc = _task_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, None, None, None, offs_k, n_mask, m_mask, k_start,
                                     k_end, K, active_task, 0, stride_wk, stride_idk, stride_xk, False, False, False,
                                     CELL_K, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
                elif TASK > 0:
                    # The fields layout's loop reads no map per step (run 4: per-step skips saved nothing).
                    acc = _field_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, offs_k, n_mask, m_mask, k_start, k_end, K,
                                      stride_wk, stride_xk, UPCAST_BF16, INPUT_PRECISION, TASK, ID_BITS, USE_ASM,
                                      BLOCK_K, None, EVEN_K)  # fmt: skip
                else:
                    acc = _task_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, map_ptrs, cell_row_mask, offs_cell_k, offs_k,
                                     n_mask, m_mask, k_start, k_end, K, active_task, stride_map_plane, stride_wk,
                                     stride_idk, stride_xk, USE_MASK, True, RAW_TILES, CELL_K, UPCAST_BF16,
                                     INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
        elif TASK > 0:
            acc = _field_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, offs_k, n_mask, m_mask, k_start, k_end, K, stride_wk,
                              stride_xk, UPCAST_BF16, INPUT_PRECISION, TASK, ID_BITS, USE_ASM, BLOCK_K, None,
                              EVEN_K)  # fmt: skip
        else:
            acc = _task_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, None, None, None, offs_k, n_mask, m_mask, k_start, k_end,
                             K, active_task, 0, stride_wk, stride_idk, stride_xk, USE_MASK, False, False, CELL_K,
                             UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip

    out_mask = n_mask[:, None] & m_mask[None, :]
    y_ptrs = y_ptr + x_rows[None, :] * stride_ym + offs_n[:, None] * stride_yn
    finish = True
    if SPLIT:
        # Whole tiles at compile-time offsets from one base pointer: few registers, so the reduction below fits beside
        # a 128 x 128 accumulator. Padding rows past M are neither stored nor loaded (a batch of 1 moves 1 row).
        tile_size = BLOCK_N * BLOCK_M
        split_stride = tl.num_programs(0).to(tl.int64) * tile_size
        partial_ptrs = (
            partials_ptr
            + pid.to(tl.int64) * tile_size
            + (tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :])
        )
        row_mask = m_mask[None, :]
        tl.store(partial_ptrs + pid_k * split_stride, acc, mask=row_mask)
        # Every thread's stores are issued before one thread counts this split done; the atomic's release then covers
        # them all, and its acquire orders the last split's loads after every other split's stores (the pattern of
        # CUDA's threadfence reduction and cooperative grid sync).
        tl.debug_barrier()
        num_splits = tl.num_programs(1)
        finish = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu") == num_splits - 1
        if finish:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for _ in range(0, num_splits):
                # .cg reads L2, where the other SMs' partials are, never a stale L1 line.
                acc += tl.load(partial_ptrs, mask=row_mask, other=0.0, cache_modifier=".cg")
                partial_ptrs += split_stride
    # One split writes the output: the only one without SPLIT, else the one that summed the partials.
    if finish:
        acc = _epilogue(
            acc,
            offs_n,
            n_mask,
            bias_ptr,
            scale_ptr,
            shift_ptr,
            stride_bias,
            stride_scale,
            stride_shift,
            table_rows,
            stride_bias_task,
            stride_scale_task,
            stride_shift_task,
            HAS_BIAS,
            HAS_SCALE,
            HAS_SHIFT,
            RELU,
            MIXED,
        )
        if MIXED:
            acc = tl.where(row_valid[None, :], acc, float("nan"))
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        if SPLIT:
            # Zero again, so the next call on this stream reuses the counters without clearing them first.
            tl.store(counters_ptr + pid, 0)


# --------------------------------------------------------------------------------------------------------------- #
# Mixed-task batches v2 (up to MIXED_V2_MAX_ROWS rows): one program per weight tile and K range serves every row.


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _clamped_tasks(tasks):
    """Tasks of any integer dtype as int32 in -1..256 (widened first: an unsigned dtype has no negative values)."""
    return tl.minimum(tl.maximum(tasks.to(tl.int64), -1), 256).to(tl.int32)


@triton.jit
def _row_groups_kernel(row_tasks_ptr, row_order_ptr, group_rows_ptr, group_tasks_ptr, group_count_ptr, M,
                       BLOCK: tl.constexpr):  # fmt: skip
    """The row groups of a mixed batch (:func:`_row_groups`) in one program: ``row_tasks_ptr`` ``[M]`` the tasks
    sorted increasingly (any integer dtype), ``row_order_ptr`` ``[M]`` each sorted position's input row. Writes
    three layouts, of 16-row, 64-row and 32-row groups: ``group_rows_ptr`` int32 ``[M, 16]``, then ``[M, 64]``,
    then ``[M, 32]`` (only the groups that exist: each run's rows, then -1 up to the group's end),
    ``group_tasks_ptr`` int32 ``[M]`` three times (only the groups that exist) and ``group_count_ptr`` int32
    ``[4]``: how many groups of 16 and of 64 rows there are, how many runs of one task (distinct tasks) the batch
    holds, and how many groups of 32 rows."""
    positions = tl.arange(0, BLOCK)
    live = positions < M
    tasks = _clamped_tasks(tl.load(row_tasks_ptr + positions, mask=live, other=0))
    before = _clamped_tasks(tl.load(row_tasks_ptr + positions - 1, mask=live & (positions > 0), other=0))
    starts = (positions == 0) | (tasks != before)
    after = _clamped_tasks(tl.load(row_tasks_ptr + positions + 1, mask=positions + 1 < M, other=0))
    ends = (positions + 1 >= M) | (after != tasks)
    rank = positions - tl.associative_scan(tl.where(starts, positions, 0), 0, _larger)
    order = tl.load(row_order_ptr + positions, mask=live, other=0).to(tl.int32)
    _store_groups(group_rows_ptr, group_tasks_ptr, group_count_ptr, tasks, order, rank, live, ends, 16)
    _store_groups(group_rows_ptr + M * 16, group_tasks_ptr + M, group_count_ptr + 1, tasks, order, rank, live, ends,
                  64)  # fmt: skip
    tl.store(group_count_ptr + 2, tl.sum((live & starts).to(tl.int32), axis=0))
    _store_groups(group_rows_ptr + M * 80, group_tasks_ptr + 2 * M, group_count_ptr + 3, tasks, order, rank, live,
                  ends, 32)  # fmt: skip


@triton.jit
def _store_groups(group_rows_ptr, group_tasks_ptr, group_count_ptr, tasks, order, rank, live, ends,
                  WIDTH: tl.constexpr):  # fmt: skip
    """One layout of :func:`_row_groups_kernel`: groups of ``WIDTH`` rows, from each sorted row's task, input row,
    rank in its run of one task and whether it ends the run."""
    first = live & (rank % WIDTH == 0)
    group = tl.cumsum(first.to(tl.int32), 0) - 1
    tl.store(group_rows_ptr + group * WIDTH + rank % WIDTH, order, mask=live)
    # A run's last row pads its group: slots after it hold -1.
    slots = tl.arange(0, WIDTH)
    padding = (live & ends)[:, None] & (slots[None, :] > (rank % WIDTH)[:, None])
    tl.store(group_rows_ptr + (group * WIDTH)[:, None] + slots[None, :], -1, mask=padding)
    tl.store(group_tasks_ptr + group, tasks, mask=first)
    tl.store(group_count_ptr, tl.max(tl.where(live, group, -1), axis=0) + 1)


@triton.jit
def _group_operands(group_rows_ptr, group_tasks_ptr, group_count, first_group, max_task, GROUPS: tl.constexpr,
                    GROUP_ROWS: tl.constexpr):  # fmt: skip
    """``(tasks, valid, rows)``: tuples of ``GROUPS`` entries for the row groups ``first_group ..`` of a pass in a
    layout of ``GROUP_ROWS``-row groups (16, 32 or 64): each group's task (0 for a group past ``group_count`` or whose
    task is outside 1..``max_task``: it selects no weight), whether that task is valid, and its input rows (-1 for
    padding)."""
    slots = tl.arange(0, GROUP_ROWS)
    tasks = ()
    valid = ()
    rows = ()
    for j in tl.static_range(GROUPS):
        group = first_group + j
        live = group < group_count
        raw = tl.load(group_tasks_ptr + group, mask=live, other=0)
        ok = (raw >= 1) & (raw <= max_task)
        tasks = tasks + (tl.where(ok, raw, 0),)
        valid = valid + (ok,)
        live_slots = slots * 0 + group < group_count
        rows = rows + (tl.load(group_rows_ptr + group * GROUP_ROWS + slots, mask=live_slots, other=-1).to(tl.int64),)
    return tasks, valid, rows


@triton.jit
def _group_sums(
    w_ptrs,
    ids_ptrs,
    x_ptr,
    tasks,
    rows,
    offs_k,
    n_mask,
    k_start,
    k_end,
    K,
    stride_wk,
    stride_idk,
    stride_xm,
    stride_xk,
    USE_MASK: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``GROUPS`` fp32 ``[BLOCK_N, rows]`` sums over ``[k_start, k_end)``, group ``j``'s ``W_{tasks[j]} x[rows[j]]^T``
    (``rows``: a group's width, 16 or 64).

    Each K step loads the weight and id tiles once; the masked tile (:func:`_keep_task`) is built for group 0 and
    again only where a group's task differs from the previous group's (the groups are sorted by task, so once per
    distinct task); every group then runs one dot on its own rows. The ``if`` holds no load and no dot: a dot
    inside a run-time ``if`` would lose the loop's pipelining (no ``cp.async`` stages), a select inside one does not
    (triton 3.6 and 3.9, sm_90). Every group's dot is waited for before the next group's ``if`` (and the last
    group's before the next step's first mask: :func:`_wait_for`): the mask an ``if`` may build gives the next dot's
    operand registers a second definition, and while a dot still reads them ptxas serialises every wgmma of the
    kernel (note C7513, "non wgmma instructions defining input registers"): each HGMMA of every loop waited for
    before the next, the slots' and the one-task fields loops' too. Masking every group instead (no ``if``) costs a
    mask per padding group and per group of a task's run: 8 rows over 2 tasks 101 -> 267 us by the model
    (benchmarks/NOTES.md, "v8 mixed (v2), serialised wgmma").

    The loop runs at least one step, as :func:`_task_sums` does (a program's K range is empty only with no input
    features, whose one step loads nothing: no result changes): on a plain range, which the compiler cannot prove
    runs, the accumulators' zeros reach the epilogue on a path around the loop too, and ptxas serialises every wgmma
    of the kernel (C7515; triton 3.6: the 256-row uint8 kernel, fp32 at 128 rows, bf16 at 256 on 2-bit ids; 3.9
    beside the slots), which C7513 hid before the wait above (ptxas names one cause)."""
    accs = ()
    row_masks = ()
    x_ptrs = ()
    for j in tl.static_range(GROUPS):
        accs = accs + (tl.zeros((BLOCK_N, rows[j].shape[0]), dtype=tl.float32),)
        row_masks = row_masks + ((rows[j] >= 0)[None, :],)
        x_ptrs = x_ptrs + (x_ptr + (k_start + offs_k)[:, None].to(tl.int64) * stride_xk + rows[j][None, :] * stride_xm,)
    for step in range(0, tl.maximum(tl.cdiv(k_end - k_start, BLOCK_K), 1)):
        accs, w_ptrs, ids_ptrs = _group_step(accs, k_start + step * BLOCK_K, w_ptrs, ids_ptrs, x_ptrs, row_masks, tasks,
                                             offs_k, n_mask, k_start, K, stride_wk, stride_idk, stride_xk, USE_MASK,
                                             UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, GROUPS,
                                             BLOCK_K)  # fmt: skip
    return accs


@triton.jit
def _wait_for(acc):
    """A read of the fp32 tile ``acc`` that the compiler keeps (an impure asm that writes a register of its own and
    nothing else): Triton waits here for the dot that computed ``acc`` (``wgmma.wait_group``), as before any use
    of a dot's result outside the next dot."""
    tl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [acc], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _group_step(accs, k, w_ptrs, ids_ptrs, x_ptrs, row_masks, tasks, offs_k, n_mask, k_start, K, stride_wk,
                stride_idk, stride_xk, USE_MASK: tl.constexpr, UPCAST_BF16: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, ID_BITS: tl.constexpr, USE_ASM: tl.constexpr, GROUPS: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """One K step of :func:`_group_sums` at column ``k``: ``(accs, w_ptrs, ids_ptrs)`` after it."""
    k_remaining = K - k
    k_mask = (offs_k < k_remaining)[:, None]
    w = _load_weight(w_ptrs, n_mask, offs_k, k_remaining)
    if USE_MASK:
        ids = _load_ids(ids_ptrs, n_mask, k, offs_k, k_remaining, ID_BITS, USE_ASM)
        if ID_BITS == 8:
            ids_ptrs += BLOCK_K * stride_idk
    x_step = (k - k_start) * stride_xk
    new_accs = ()
    for j in tl.static_range(GROUPS):
        xt = tl.load(x_ptrs[j] + x_step, mask=k_mask & row_masks[j], other=0.0)
        if j == 0:
            w_task = w
            if USE_MASK:
                w_task = _keep_task(w, ids, k, offs_k, k_remaining, tasks[0], False, ID_BITS)
            if UPCAST_BF16:
                w_task = w_task.to(tl.float32)
        elif USE_MASK:
            if USE_ASM:
                # The dot before is done before a new mask may take its operand's registers (else ptxas serialises
                # every wgmma of the kernel, C7513; triton 3.6 and 3.9).
                _wait_for(new_accs[j - 1])
            if tasks[j] != tasks[j - 1]:
                w_task = _keep_task(w, ids, k, offs_k, k_remaining, tasks[j], False, ID_BITS)
                if UPCAST_BF16:
                    w_task = w_task.to(tl.float32)
        if UPCAST_BF16:
            xt = xt.to(tl.float32)
        new_accs = new_accs + (tl.dot(w_task, xt, accs[j], input_precision=INPUT_PRECISION),)
    if USE_MASK and USE_ASM and GROUPS > 1:
        # So is the last group's before the next step's first mask (LLVM may give the two masks, both feeding a
        # branch's merge, one set of registers: triton 3.6, fp32 dots).
        _wait_for(new_accs[GROUPS - 1])
    return new_accs, w_ptrs + BLOCK_K * stride_wk, ids_ptrs


@triton.jit
def _groups_pass(
    x_ptr,
    w_ptrs,
    ids_ptrs,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    partials_ptr,
    counters_ptr,
    group_rows_ptr,
    group_tasks_ptr,
    group_count,
    first_group,
    counter_index,
    offs_k,
    offs_n,
    n_mask,
    k_start,
    k_end,
    M,
    N,
    K,
    max_task,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_idk,
    stride_bias,
    stride_scale,
    stride_shift,
    stride_bias_task,
    stride_scale_task,
    stride_shift_task,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RELU: tl.constexpr,
    USE_MASK: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    ONE_TASK: tl.constexpr,
    TASK: tl.constexpr,
    SLOT_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr = False,
):
    """One pass of a v2 program over its K range for the groups ``first_group .. first_group + GROUPS``: their sums
    (:func:`_group_sums`), the split-K reduction (counter ``counter_index``) and each group's epilogue and rows.

    ``ONE_TASK`` (a batch of one task, ``M <= GROUP_ROWS``): one group of every row, summed by the single-task loop
    (:func:`_task_sums`, contiguous activation rows: the stable sort of one task keeps the input order), or with
    ``TASK`` > 0 (the batch's task, clamped as the single-task kernel clamps it) by the fields layout's loop
    (:func:`_field_sums`).

    ``SLOT_PASS`` (compact ids; every task of the batch in 1..``SLOT_TASKS`` and in one group of ``GROUP_ROWS``
    rows): ``GROUPS`` slots, slot ``s`` task ``TASK + s`` with the rows of that task's group (none if the batch does
    not hold it), summed by :func:`_slot_sums`."""
    if ONE_TASK:
        raw = tl.load(group_tasks_ptr)
        ok = (raw >= 1) & (raw <= max_task)
        task = tl.where(ok, raw, 0)
        slots = tl.arange(0, GROUP_ROWS)
        m_mask = slots < M
        tasks, valid, rows = (task,), (ok,), (tl.where(m_mask, slots, -1).to(tl.int64),)
        xt_ptrs = x_ptr + (k_start + offs_k)[:, None].to(tl.int64) * stride_xk + slots[None, :].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_N, GROUP_ROWS), dtype=tl.float32)
        if TASK > 0:
            # Two chunks in flight (256 columns; the other loops keep num_stages steps of 32): the shared memory of the
            # kernel's largest loop, not four chunks' (1 program per SM instead of 2 for the mixed loops).
            acc = _field_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, offs_k, n_mask, m_mask, k_start, k_end, K, stride_wk,
                              stride_xk, UPCAST_BF16, INPUT_PRECISION, TASK, ID_BITS, USE_ASM, BLOCK_K, 2,
                              EVEN_K)  # fmt: skip
        else:
            acc = _task_sums(acc, w_ptrs, ids_ptrs, xt_ptrs, None, n_mask, offs_k, offs_k, n_mask, m_mask, k_start,
                             k_end, K, task, 0, stride_wk, stride_idk, stride_xk, USE_MASK, False, False, BLOCK_K,
                             UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, BLOCK_K)  # fmt: skip
        accs = (acc,)
    elif SLOT_PASS:
        # Slot s is task TASK + s; the groups hold distinct tasks from 1 up in increasing order, so that task's group
        # (if the batch holds it) is among the first TASK + s.
        SCANNED: tl.constexpr = TASK - 1 + GROUPS
        group_tasks, group_valid, group_rows = _group_operands(group_rows_ptr, group_tasks_ptr, group_count, 0,
                                                               max_task, SCANNED, GROUP_ROWS)  # fmt: skip
        tasks = ()
        valid = ()
        rows = ()
        for s in tl.static_range(GROUPS):
            # The groups' tasks are distinct: at most one group is slot s's.
            slot_rows = tl.full((GROUP_ROWS,), -1, tl.int64)
            for j in tl.static_range(SCANNED):
                slot_rows = tl.where(group_tasks[j] == TASK + s, group_rows[j], slot_rows)
            slot_task = group_count * 0 + TASK + s
            tasks, valid, rows = tasks + (slot_task,), valid + (slot_task > 0,), rows + (slot_rows,)
        accs = _slot_sums(w_ptrs, ids_ptrs, x_ptr, rows, offs_k, n_mask, k_start, k_end, K, stride_wk, stride_xm,
                          stride_xk, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, TASK, GROUPS, BLOCK_N,
                          BLOCK_K, EVEN_K)  # fmt: skip
    else:
        tasks, valid, rows = _group_operands(group_rows_ptr, group_tasks_ptr, group_count, first_group, max_task,
                                             GROUPS, GROUP_ROWS)  # fmt: skip
        accs = _group_sums(w_ptrs, ids_ptrs, x_ptr, tasks, rows, offs_k, n_mask, k_start, k_end, K, stride_wk,
                           stride_idk, stride_xm, stride_xk, USE_MASK, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM,
                           GROUPS, BLOCK_N, BLOCK_K)  # fmt: skip
    finish = True
    if SPLIT:
        # Partials by input row ([SPLIT_K, M, N] fp32): each row lies in one group, padding slots store nothing.
        split_stride = M.to(tl.int64) * N
        for j in tl.static_range(GROUPS):
            ptrs = partials_ptr + tl.program_id(1) * split_stride + rows[j][None, :] * N + offs_n[:, None]
            tl.store(ptrs, accs[j], mask=n_mask[:, None] & (rows[j] >= 0)[None, :])
        # As in _masked_linear_kernel: every store issued before the acquire-release count.
        tl.debug_barrier()
        num_splits = tl.num_programs(1)
        finish = tl.atomic_add(counters_ptr + counter_index, 1, sem="acq_rel", scope="gpu") == num_splits - 1
        if finish:
            summed = ()
            for j in tl.static_range(GROUPS):
                ptrs = partials_ptr + rows[j][None, :] * N + offs_n[:, None]
                acc = tl.zeros((BLOCK_N, GROUP_ROWS), dtype=tl.float32)
                for _ in range(0, num_splits):
                    # .cg reads L2, where the other SMs' partials are.
                    acc += tl.load(ptrs, mask=n_mask[:, None] & (rows[j] >= 0)[None, :], other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
                    ptrs += split_stride
                summed = summed + (acc,)
            accs = summed
    if finish:
        for j in tl.static_range(GROUPS):
            table_rows = tl.full((GROUP_ROWS,), 0, tl.int32) + tl.maximum(tasks[j] - 1, 0)
            out = _epilogue(accs[j], offs_n, n_mask, bias_ptr, scale_ptr, shift_ptr, stride_bias, stride_scale,
                            stride_shift, table_rows, stride_bias_task, stride_scale_task, stride_shift_task, HAS_BIAS,
                            HAS_SCALE, HAS_SHIFT, RELU, True)  # fmt: skip
            out = tl.where(valid[j], out, float("nan"))
            y_ptrs = y_ptr + rows[j][None, :] * stride_ym + offs_n[:, None] * stride_yn
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & (rows[j] >= 0)[None, :])
        if SPLIT:
            tl.store(counters_ptr + counter_index, 0)


@triton.jit
def _operand_ptrs(w_ptr, ids_ptr, offs_n, k_start, stride_wn, stride_wk, stride_idn, stride_idk, ID_BITS: tl.constexpr,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """``(w_ptrs, ids_ptrs)``: a program's first weight and id tiles of ``BLOCK_K`` columns from ``k_start`` (compact
    ids, int32 words read as the fields layout's bytes: each row's first byte; the loops find a step's bytes from its
    k, :func:`_load_ids`)."""
    offs_k = k_start.to(tl.int64) + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if ID_BITS < 8:
        ids_ptrs = ids_ptr.to(tl.pointer_type(tl.uint8)) + offs_n[:, None] * stride_idn
    else:
        ids_ptrs = ids_ptr + offs_n[:, None] * stride_idn + offs_k[None, :] * stride_idk
    return w_ptrs, ids_ptrs


@triton.jit(do_not_specialize=["max_task"])
def _mixed_linear_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    partials_ptr,
    counters_ptr,
    group_rows_ptr,
    group_tasks_ptr,
    group_count_ptr,
    M,
    N,
    K,
    k_per_split,
    max_task,
    max_passes,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_idn,
    stride_idk,
    stride_bias,
    stride_scale,
    stride_shift,
    stride_bias_task,
    stride_scale_task,
    stride_shift_task,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RELU: tl.constexpr,
    USE_MASK: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ID_BITS: tl.constexpr,
    USE_ASM: tl.constexpr,
    GROUPS: tl.constexpr,
    FEW_GROUPS: tl.constexpr,
    WIDE_GROUPS: tl.constexpr,
    ONE_ROWS: tl.constexpr,
    ONE_BLOCK_K: tl.constexpr,
    FIELD_TASKS: tl.constexpr,
    SLOT_TASKS: tl.constexpr,
    SLOT_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr = False,
):
    """A mixed-task batch of up to ``MIXED_V2_MAX_ROWS`` rows: ``y[m] = epilogue_{t_m}(W_{t_m} x[m])`` with ``W_t =
    where((ids != 0) & (ids <= t), w, 0)`` and ``t_m`` row ``m``'s task.

    Pointers as in :func:`_masked_linear_kernel` (``x_ptr`` ``[M, K]``, ``w_ptr`` ``[N, K]``, ``ids_ptr`` uint8
    ``[N, K]`` or compact ids (int32 words read as the fields layout's bytes), epilogue ``[tasks, N]`` tables,
    ``y_ptr`` ``[M, N]``), and the batch's row groups (:func:`_row_groups`): ``group_rows_ptr`` int32 ``[M, 16]``
    the input rows of each group (one task per group, -1 for padding) then the same for groups of 64 and of 32
    rows, ``group_tasks_ptr`` int32 ``[groups]`` their tasks in increasing order (16-row groups, then 64-row ones,
    then 32-row ones, ``M`` entries each), ``group_count_ptr`` int32 ``[4]`` how many groups there are of 16 and 64
    rows, how many runs of one task and how many groups of 32 rows (:func:`_row_groups_kernel`). With ``SPLIT``:
    ``partials_ptr`` fp32 ``[SPLIT_K, M, N]`` and ``counters_ptr`` int32 ``[N / BLOCK_N, max_passes]``, zero on
    entry and left zero.

    Grid: axis 0 the weight tiles (``BLOCK_N`` rows each), axis 1 the K split (``k_per_split`` each). A program
    serves every row of the batch for its weight tile: per pass over its K range it holds ``GROUPS`` groups'
    accumulators; a K step loads the weight and id tiles once, masks them once per distinct task among the pass's
    groups and runs one dot per group on that group's 16 rows (:func:`_group_sums`). A batch of one task (the first
    and last group's task the same; ``ONE_ROWS`` > 0, :func:`mixed_one_task`) takes the single-task loop
    (:func:`_task_sums`): one mask and one dot of all its rows (``ONE_ROWS``, contiguous) per step of
    ``ONE_BLOCK_K`` columns, the single-task small kernel's steps; with ``FIELD_TASKS`` > 0 (compact ids, 16-bit
    operands) the fields layout's loop with the task compiled in (:func:`_field_sums`), one copy of that pass per
    task 1..``FIELD_TASKS`` (the batch's task clamped to it), the copy of the batch's task running. With
    ``SLOT_TASKS`` > 0 (compact ids) a batch whose tasks lie in 1..``SLOT_TASKS``, each in one group of ``SLOT_ROWS``
    rows (16 or 32), and are at least :data:`SLOT_SHARE` of them takes the slots (:func:`_slot_sums`: every task's
    mask compiled in, one dot per task per step, whether the batch holds it or not; 32-row slots in two passes of
    half of them, :func:`slot_passes`). A batch whose
    runs of one task fit ``WIDE_GROUPS`` groups of 64 rows (``M`` over 112: :func:`mixed_wide_groups`) takes those
    instead. A batch whose groups fit one pass (the ``FEW_GROUPS`` loop when they fit it; else ``GROUPS``, see
    :func:`mixed_groups`) reads its weight and ids once; more groups (``sum over tasks of ceil(rows / 16)`` above
    ``GROUPS``) take further passes of ``GROUPS``, each reading them again. A group whose task is outside
    1..``max_task`` selects no weight and its rows are written NaN; a NaN/Inf in a weight a task does not own never
    reaches its rows (the select drops it before the dot). No tile map: the program serves every task of the batch,
    so a tile is skippable only when no task of the batch uses it, and run 4 found per-step skips no faster in a
    loop bound by its steps (NOTES.md). Batches above ``MIXED_V2_MAX_ROWS`` rows take ``MIXED`` in
    :func:`_masked_linear_kernel` (v1), whose 16-row tiles pass over K for every 8 tasks they hold. ``EVEN_K``
    (:func:`whole_chunks`): the fields copies and the slots check no column against K."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs, ids_ptrs = _operand_ptrs(w_ptr, ids_ptr, offs_n, k_start, stride_wn, stride_wk, stride_idn, stride_idk,
                                     ID_BITS, BLOCK_K)  # fmt: skip
    group_count = tl.load(group_count_ptr)
    first_counter = pid_n * max_passes
    # Batches whose runs fit WIDE_GROUPS groups of 64 rows take them: a quarter of the dots.
    wide_count = tl.load(group_count_ptr + 1)
    # The groups are sorted by task: one task when the first and last group's are the same.
    first_task = tl.load(group_tasks_ptr)
    last_task = tl.load(group_tasks_ptr + group_count - 1)
    one_task = first_task == last_task
    # Slots: every task in 1..SLOT_TASKS and in one group of SLOT_ROWS rows (as many groups of that layout as runs of
    # one task), and enough of them.
    runs = tl.load(group_count_ptr + 2)
    if SLOT_ROWS == 32:
        slot_rows_ptr, slot_tasks_ptr = group_rows_ptr + M * 80, group_tasks_ptr + 2 * M
        slot_count = tl.load(group_count_ptr + 3)
    else:
        slot_rows_ptr, slot_tasks_ptr, slot_count = group_rows_ptr, group_tasks_ptr, group_count
    slots_fit = (runs == slot_count) & (first_task >= 1) & (last_task <= SLOT_TASKS)
    slots_fit = slots_fit & (runs * _SLOT_SHARE_DEN >= SLOT_TASKS * _SLOT_SHARE_NUM)
    if ONE_ROWS > 0 and one_task:
        offs_one = tl.arange(0, ONE_BLOCK_K)
        one_w_ptrs, one_ids_ptrs = _operand_ptrs(w_ptr, ids_ptr, offs_n, k_start, stride_wn, stride_wk, stride_idn,
                                                 stride_idk, ID_BITS, ONE_BLOCK_K)  # fmt: skip
        # With FIELD_TASKS, one copy of the pass per task, the batch's task (clamped) running its own; each copy
        # holds its own accumulator and epilogue, so no path leaves a copy's zeros to meet a dot's. Else one pass.
        one = tl.minimum(tl.load(group_tasks_ptr), FIELD_TASKS)
        for COPY in tl.static_range(1, max(FIELD_TASKS, 1) + 1):
            if FIELD_TASKS == 0 or one == COPY or (COPY == 1 and one < 1):
                _groups_pass(x_ptr, one_w_ptrs, one_ids_ptrs, bias_ptr, scale_ptr, shift_ptr, y_ptr, partials_ptr,
                             counters_ptr, group_rows_ptr, group_tasks_ptr, group_count, 0, first_counter, offs_one,
                             offs_n, n_mask, k_start, k_end, M, N, K, max_task, stride_xm, stride_xk, stride_wk,
                             stride_idk, stride_bias, stride_scale, stride_shift, stride_bias_task, stride_scale_task,
                             stride_shift_task, stride_ym, stride_yn, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, USE_MASK,
                             SPLIT, UPCAST_BF16, INPUT_PRECISION, ID_BITS, USE_ASM, 1, ONE_ROWS, True,
                             COPY * (FIELD_TASKS > 0), False, BLOCK_N, ONE_BLOCK_K, EVEN_K)  # fmt: skip
    elif SLOT_TASKS > 0 and slots_fit:
        # Slots of 32 rows run in two passes over K (each reads the weight and ids again): a pass's accumulators are
        # those of 16-row slots, whose loop fits the registers beside 16 groups (one pass of 8 x 32 rows spills).
        PASSES: tl.constexpr = SLOT_ROWS // 16  # linear.slot_passes, which the host's bounds count
        PER_PASS: tl.constexpr = (SLOT_TASKS + PASSES - 1) // PASSES
        for PASS in tl.static_range(PASSES):
            _groups_pass(x_ptr, w_ptrs, ids_ptrs, bias_ptr, scale_ptr, shift_ptr, y_ptr, partials_ptr, counters_ptr,
                         slot_rows_ptr, slot_tasks_ptr, slot_count, 0, first_counter + PASS, offs_k, offs_n, n_mask,
                         k_start, k_end, M, N, K, max_task, stride_xm, stride_xk, stride_wk, stride_idk, stride_bias,
                         stride_scale, stride_shift, stride_bias_task, stride_scale_task, stride_shift_task,
                         stride_ym, stride_yn, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, USE_MASK, SPLIT, UPCAST_BF16,
                         INPUT_PRECISION, ID_BITS, USE_ASM, min(PER_PASS, SLOT_TASKS - PASS * PER_PASS), SLOT_ROWS,
                         False, PASS * PER_PASS + 1, True, BLOCK_N, BLOCK_K, EVEN_K)  # fmt: skip
    elif WIDE_GROUPS > 0 and wide_count <= WIDE_GROUPS:
        _groups_pass(x_ptr, w_ptrs, ids_ptrs, bias_ptr, scale_ptr, shift_ptr, y_ptr, partials_ptr, counters_ptr,
                     group_rows_ptr + M * 16, group_tasks_ptr + M, wide_count, 0, first_counter, offs_k, offs_n,
                     n_mask, k_start,
                     k_end, M, N, K, max_task, stride_xm, stride_xk, stride_wk, stride_idk, stride_bias,
                     stride_scale, stride_shift, stride_bias_task, stride_scale_task, stride_shift_task, stride_ym,
                     stride_yn, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, USE_MASK, SPLIT, UPCAST_BF16, INPUT_PRECISION,
                     ID_BITS, USE_ASM, WIDE_GROUPS, 64, False, 0, False, BLOCK_N,
                     BLOCK_K)  # fmt: skip
    elif FEW_GROUPS < GROUPS and group_count <= FEW_GROUPS:
        _groups_pass(x_ptr, w_ptrs, ids_ptrs, bias_ptr, scale_ptr, shift_ptr, y_ptr, partials_ptr, counters_ptr,
                     group_rows_ptr, group_tasks_ptr, group_count, 0, first_counter, offs_k, offs_n, n_mask, k_start,
                     k_end, M, N, K, max_task, stride_xm, stride_xk, stride_wk, stride_idk, stride_bias,
                     stride_scale, stride_shift, stride_bias_task, stride_scale_task, stride_shift_task, stride_ym,
                     stride_yn, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, USE_MASK, SPLIT, UPCAST_BF16, INPUT_PRECISION,
                     ID_BITS, USE_ASM, FEW_GROUPS, 16, False, 0, False, BLOCK_N,
                     BLOCK_K)  # fmt: skip
    else:
        for first_group in range(0, group_count, GROUPS):
            _groups_pass(x_ptr, w_ptrs, ids_ptrs, bias_ptr, scale_ptr, shift_ptr, y_ptr, partials_ptr, counters_ptr,
                         group_rows_ptr, group_tasks_ptr, group_count, first_group,
                         first_counter + first_group // GROUPS, offs_k, offs_n, n_mask, k_start, k_end, M, N, K,
                         max_task, stride_xm, stride_xk, stride_wk, stride_idk, stride_bias, stride_scale,
                         stride_shift, stride_bias_task, stride_scale_task, stride_shift_task, stride_ym, stride_yn,
                         HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, USE_MASK, SPLIT, UPCAST_BF16, INPUT_PRECISION,
                         ID_BITS, USE_ASM, GROUPS, 16, False, 0, False, BLOCK_N,
                         BLOCK_K)  # fmt: skip


def _configs(regime: str, capability_major: int) -> list[triton.Config]:
    """Autotune candidates for ``regime`` ("small", "large", "mixed" or "mixed2", the grouped mixed kernel; "small-
    fields4" and the like: the regime's single-task loop on compact ids, :func:`_field_configs`) on a GPU of compute
    capability ``capability_major``.

    Mixed-task batches (any batch size): 64 x 16 x 32 tiles on 4 warps, 5 stages. Their unrolled per-task selects
    keep the weight and id tiles live across ``SEGMENTS`` dots, and a mixed tile compiles two K loops (8 and 2
    segments): for sm_90, 64 x 16 x 64 tiles then spill 40-48 bytes at 255 registers, 64 x 16 x 32 ones take about
    180 registers without spilling (2 programs per SM either way, by registers), and 5 stages keep 5 steps of weight
    and ids in flight per program. Wider weight or batch tiles spill (the result select keeps a second accumulator).
    On sm_90 each segment's dot of a 64-row weight tile is a wgmma that Triton waits for before the next (run 4: 2
    and 8 segments cost 103 and 196 us per 16-row pass of a 4096 -> 11008 layer); a 32-row weight tile runs its dots
    as ``mma.sync`` instead (4 stages: on 5, triton 3.6 spilled 16 bytes), so the autotuner gets both.

    Small batch: ``BLOCK_M`` is 16 (the narrowest dot) and ``BLOCK_K`` divides ``_SPLIT_K_ALIGN``; the candidates
    vary how many weight bytes a program keeps in flight. Large batch: the usual GEMM tiles; Hopper and datacenter
    Blackwell (9.x, 10.x) get 8-warp tiles with two warpgroups of wgmma and 64-wide K steps, Ampere-class parts
    smaller K steps. Configs that do not fit shared memory for a dtype (fp32 tiles are twice as large) fail to compile
    and the autotuner skips them. The first config of each list fits fp32 in the shared memory of every GPU of its
    class (small: 66 KB; large: 131 KB on 9.x/10.x, 74 KB else): it is the untuned default (``AUTOTUNE = False``).
    """
    if "-fields" in regime:
        base, bits = regime.split("-fields")
        return _field_configs(_configs(base, capability_major), int(bits))
    if regime == "mixed2":
        # Grouped mixed batches (v2; see mixed2_config_fits): (BLOCK_N, BLOCK_K, num_warps, num_stages). Measured for
        # sm_90 fp16 (triton 3.6 and 3.9): 64 x 32 on 8 warps holds 16 groups (about 205-254 registers, no spill); on
        # 4 warps 8 groups, for a third fewer instructions per weight per pass; 128 x 32 on 8 warps reads the
        # activations half as often. Wider K steps spill (64 x 64 on 4 warps with 8 groups, 32 x 64 with 16) or
        # serialise their wgmma (64 x 64 on 8 warps, C7515); 32-row tiles (mma.sync) cost more per weight.
        shapes = [(64, 32, 8, 4), (64, 32, 4, 4), (128, 32, 8, 3)]
        if capability_major < 9:
            # mma.sync dots (sm_80, triton 3.6): the 4-warp and 128-row tiles spill 8-24 bytes with 8 groups.
            shapes = shapes[:1]
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]
    if regime == "mixed":
        return [
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=4, num_stages=5),
            triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=4, num_stages=4),
        ]
    if regime == "small":
        # (BLOCK_N, BLOCK_K, num_warps, num_stages)
        shapes = [
            (64, 64, 4, 3),
            (64, 128, 4, 4),
            (64, 256, 4, 3),
            (128, 64, 4, 4),
            (128, 128, 4, 3),
            (128, 128, 8, 4),
        ]
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_M": 16, "BLOCK_K": k, "GROUP_N": 1}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes
        ]
    # (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages)
    # Hopper and datacenter Blackwell (228 KB of shared memory, wgmma/tcgen05); Ampere, Ada and consumer parts else.
    if capability_major in (9, 10):
        shapes = [
            (128, 128, 32, 8, 4),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 32, 64, 4, 5),
            (64, 64, 128, 4, 4),
            (64, 32, 128, 4, 5),
        ]
    else:
        shapes = [
            (128, 64, 32, 4, 3),
            (128, 256, 32, 8, 3),
            (256, 128, 32, 8, 3),
            (128, 128, 32, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 5),
            (128, 32, 64, 4, 4),
            (64, 32, 64, 4, 5),
        ]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k, "GROUP_N": 8}, num_warps=w, num_stages=s)
        for n, m, k, w, s in shapes
    ]


def _field_configs(configs: list[triton.Config], bits: int) -> list[triton.Config]:
    """The single-task loop on the fields layout (:func:`_field_sums`) for each of a regime's ``configs``:
    ``BLOCK_K`` at most the layout's span (64 for 4-bit ids, 32 for 2-bit), and stages that keep about as many
    columns in flight as the config did (a stage holds a whole 128-column chunk), at least 2."""
    derived, seen = [], set()
    for config in configs:
        tile = dict(config.kwargs, BLOCK_K=min(config.kwargs["BLOCK_K"], field_span(bits)))
        stages = max(2, ceil_div(config.num_stages * config.kwargs["BLOCK_K"], CHUNK_COLUMNS))
        key = (tuple(sorted(tile.items())), config.num_warps, stages)
        if key not in seen:
            seen.add(key)
            derived.append(triton.Config(tile, num_warps=config.num_warps, num_stages=stages))
    return derived


def config_fits(
    config: triton.Config,
    dtype: torch.dtype,
    shared_memory_bytes: int,
    tile_map: bool = False,
    mixed: bool = False,
    field_bits: int = 8,
) -> bool:
    """Whether ``config`` suits ``dtype`` on a GPU with ``shared_memory_bytes`` per block (the opt-in limit), with or
    without a tile map, for one task or a mixed-task batch (``mixed``); ``field_bits`` 2 or 4: the single-task loop
    on compact ids (:func:`_field_sums`), which takes ``BLOCK_K`` <= 64 and pipelines a whole chunk per stage.

    Its pipelined tiles must fit: an upper bound of what Triton allocates, ``num_stages`` buffers of the weight, id and
    activation tiles per K loop (a mixed tile has two: see :func:`_mixed_task_sums`; one task's tile with a map and
    raw tiles compiles two as well, but in branches of one ``if`` that share their buffers, within one loop's bound;
    ``tests/test_codegen.py`` checks the bound against the real allocation); and its tiles must not spill registers
    (:func:`_registers_fit`)."""
    element = torch.empty((), dtype=dtype).element_size()
    tile = config.kwargs
    if not _registers_fit(tile["BLOCK_N"], tile["BLOCK_M"], tile["BLOCK_K"], config.num_warps, dtype, tile_map):
        return False
    per_stage = tile["BLOCK_N"] * tile["BLOCK_K"] * (element + 1) + tile["BLOCK_K"] * tile["BLOCK_M"] * element
    if field_bits < 8:
        if tile["BLOCK_K"] > field_span(field_bits):
            return False
        threads = 32 * config.num_warps
        weights, sums = tile["BLOCK_N"] * tile["BLOCK_K"] // threads, tile["BLOCK_N"] * tile["BLOCK_M"] // threads
        if tile_map and weights >= 32 and weights + sums >= 128:
            # Beside the tile map's raw loop, 128 x 256 x 64 on 8 warps and 128 x 64 x 64 on 4 spill 16 bytes on
            # triton 3.9 (sm_90 fp16, 4-bit ids); 2-bit ids' 32-column steps, up to 144 per thread, do not.
            return False
        # A chunk's weight and activation tiles and its id bytes, every stage.
        span = field_span(field_bits)
        per_stage = tile["BLOCK_N"] * (CHUNK_COLUMNS * element + span) + CHUNK_COLUMNS * tile["BLOCK_M"] * element
    loops = 2 if mixed else 1
    return loops * config.num_stages * per_stage <= shared_memory_bytes


def _registers_fit(rows: int, cols: int, block_k: int, num_warps: int, dtype: torch.dtype, tile_map: bool) -> bool:
    """Measured by ``tests/test_codegen.py`` for sm_90 and sm_80: fp32 operand tiles of 48 or more elements per thread
    per K step spill registers (the dot splits each fp32 operand for the tensor cores, or runs on FMAs); with a tile
    map, weight tiles of more than 64 elements per thread do (128 x 128 on 4 warps spills 120 bytes)."""
    threads = 32 * num_warps
    if tile_map and rows * block_k > 64 * threads:
        return False
    return dtype != torch.float32 or (rows + cols) * block_k < 48 * threads


def default_config(
    regime: str,
    capability_major: int,
    dtype: torch.dtype,
    shared_memory_bytes: int,
    tile_map: bool = False,
    field_bits: int = 8,
) -> triton.Config:
    """The untuned config (``AUTOTUNE = False``) of ``regime`` ("small", "large" or "mixed"): the first of
    :func:`_configs` that fits (``field_bits``: see :func:`config_fits`)."""
    configs = _configs(regime, capability_major)
    mixed = regime == "mixed"
    fitting = (c for c in configs if config_fits(c, dtype, shared_memory_bytes, tile_map, mixed, field_bits))
    return next(fitting, configs[0])


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles do not fit this GPU's shared memory for this dtype, and (large regime) batch tiles
    more than twice the bucketed batch, which would compute mostly padding."""
    x = named_args["x_ptr"]
    limit = device_properties(x.device).shared_memory_per_block_optin
    tile_map, mixed = named_args["tile_map_ptr"] is not None, kwargs.get("MIXED", False)
    field_bits = kwargs["ID_BITS"] if kwargs.get("TASK", 0) else 8
    kept = [c for c in configs if config_fits(c, x.dtype, limit, tile_map, mixed, field_bits)] or configs[:1]
    return [config for config in kept if useful_batch_tile(config, named_args["M"])] or kept


def useful_batch_tile(config: triton.Config, m: int) -> bool:
    """False for a large-regime batch tile more than twice the bucketed batch: it would compute mostly padding."""
    return m <= SMALL_M_MAX or config.kwargs["BLOCK_M"] <= max(32, 2 * _m_bucket(m))


def mixed2_config_fits(config: triton.Config, dtype: torch.dtype, shared_memory_bytes: int, groups: int,
                       few: int, wide: int = 0, one_rows: int = 0, one_block_k: int = 0, slot_tasks: int = 0,
                       slot_rows: int = 16, *, ieee: bool = False) -> bool:  # fmt: skip
    """Whether a grouped (v2) config suits ``groups`` unrolled row groups (and loops of ``few`` groups, of ``wide``
    64-row groups, the one-task loop of ``one_rows`` rows and ``one_block_k`` columns and ``slot_tasks`` slots of
    ``slot_rows`` rows in :func:`slot_passes` passes beside) for ``dtype``: each
    loop's fp32 accumulators at most 64 registers per thread, 32 for fp32 inputs (measured for sm_90 with triton 3.6
    and 3.9: 16 groups of 64 x 16 on 8 warps take about 205 registers without spilling, 24 spill; 16 on 4 warps
    spill), fp32 dots at most 8 groups, the one-task loop's fp32 operands within :func:`_registers_fit`, and the
    pipelined weight, id and activation tiles of its largest loop in shared memory (``tests/test_codegen.py``
    checks the bound against the real allocation). IEEE fp32 dots (``ieee``, on FMAs) take at most 8 weight elements
    per thread per step (triton 3.6, sm_90: 64 x 32 on 4 warps or 128 x 32 on 8 spill 208-232 bytes with 2 groups)."""
    element = torch.empty((), dtype=dtype).element_size()
    tile, threads = config.kwargs, 32 * config.num_warps
    loops = [(groups, 16, tile["BLOCK_K"])] + ([(few, 16, tile["BLOCK_K"])] if few < groups else [])
    loops += ([(wide, 64, tile["BLOCK_K"])] if wide else []) + ([(1, one_rows, one_block_k)] if one_rows else [])
    slot_pass = ceil_div(slot_tasks, slot_passes(slot_rows))
    slots = [(slot_pass, slot_rows, tile["BLOCK_K"])] if slot_tasks else []
    # fp32 dots: half the budget (triton 3.6, sm_90: 8 groups of 64 x 16 on 4 warps, or of 128 x 16 on 8, use 24-32
    # bytes of stack at 255 registers; 64 x 16 on 8 warps takes 222 registers and no stack).
    budget = 64 if element < 4 else 32
    if any(count * tile["BLOCK_N"] * width > budget * threads for count, width, _ in loops + slots):
        return False
    if element == 4 and groups > 8:
        return False
    if ieee and tile["BLOCK_N"] * tile["BLOCK_K"] > 8 * threads:
        return False
    if one_rows and not _registers_fit(tile["BLOCK_N"], one_rows, one_block_k, config.num_warps, dtype, False):
        return False
    # The loops run in branches of one ``if``: Triton reuses one allocation for their buffers (triton 3.6, sm_90: the
    # largest loop's stages and 2 KB), so the bound is the largest loop's stages and 8 KB.
    per_stage = max(tile["BLOCK_N"] * k * (element + 1) + count * k * width * element for count, width, k in loops)
    # The slots' loop keeps two chunks of 128 columns in flight (so do the one-task fields copies, whose chunks of at
    # most 128 rows stay under the slots' bound and the stages above in every config: not counted here).
    chunk = CHUNK_COLUMNS * (tile["BLOCK_N"] * (element + 1) + slot_pass * slot_rows * element)
    fields = 2 * chunk if slot_tasks else 0
    return max(config.num_stages * per_stage, fields) + _MIXED2_SHARED_EXTRA <= shared_memory_bytes


def _prune_mixed2_configs(configs, named_args, **kwargs):
    """The grouped configs that fit (:func:`mixed2_config_fits`), or the first one."""
    x = named_args["x_ptr"]
    limit = device_properties(x.device).shared_memory_per_block_optin
    sizes = [kwargs[name] for name in _MIXED2_SIZES]
    ieee = kwargs["INPUT_PRECISION"] == "ieee"
    fitting = [config for config in configs if mixed2_config_fits(config, x.dtype, limit, *sizes, ieee=ieee)]
    return fitting or configs[:1]


@functools.cache
def _tuned_kernel(regime: str, capability_major: int):
    """The autotuned kernel for a regime and GPU generation, built on first use (never at import time)."""
    if regime == "mixed2":
        return triton.autotune(
            configs=_configs(regime, capability_major),
            key=["N", "K", "USE_MASK", "INPUT_PRECISION", "ID_BITS", *_MIXED2_SIZES, "SPLIT"],
            prune_configs_by={"early_config_prune": _prune_mixed2_configs},
            do_bench=autotune_bench,
        )(_mixed_linear_kernel)
    prune = {"early_config_prune": _prune_configs}
    return triton.autotune(
        configs=_configs(regime, capability_major),
        key=["m_bucket", "N", "K", "USE_MASK", "TILE_MAP", "RAW_TILES", "INPUT_PRECISION", "SEGMENTS", "ID_BITS"],
        prune_configs_by=prune,
        do_bench=autotune_bench,
    )(_masked_linear_kernel)


def choose_regime(m: int) -> str:
    """``"small"`` (split-K, memory bound) for ``m <= SMALL_M_MAX`` batch rows, ``"large"`` (tiled GEMM) above."""
    return "small" if m <= SMALL_M_MAX else "large"


def _m_bucket(m: int) -> int:
    bucket = 16
    while bucket < m and bucket < M_BUCKET_CAP:
        bucket *= 2
    return bucket


def _split_plan(m: int, n: int, k: int, interpreted: bool, device: torch.device) -> tuple[int, int]:
    """``(split_k, k_per_split)``: split K when the output tiles alone would leave the GPU under-filled.

    The small regime (GEMV-shaped, memory bound) aims at several waves of programs; the large regime splits only
    while a typical tiling (128 x 128) gives fewer programs than SMs (a 256-row batch through a 4096-wide layer gives
    64 tiles on 132 SMs), and never into chunks under 1024. Chunks are multiples of every candidate ``BLOCK_K`` and
    depend only on the shape and the device, so the same call always reduces in the same order."""
    small = choose_regime(m) == "small"
    if interpreted:
        align, programs = _INTERPRETER_CONFIG["BLOCK_K"], _INTERPRETER_SM_COUNT
        min_chunk = _INTERPRETER_MIN_K_PER_SPLIT
        tiles = ceil_div(n, _INTERPRETER_CONFIG["BLOCK_N"]) * ceil_div(m, _INTERPRETER_CONFIG["BLOCK_M"])
    else:
        sm_count = device_properties(device).multi_processor_count
        align = _SPLIT_K_ALIGN
        if small:
            # A typical small-regime BLOCK_N; the autotuner adjusts around it.
            min_chunk, programs, tiles = _MIN_K_PER_SPLIT, _PROGRAMS_PER_SM * sm_count, ceil_div(n, 64)
        else:
            min_chunk, programs = _MIN_K_PER_SPLIT_LARGE, sm_count
            tiles = ceil_div(n, 128) * ceil_div(m, 128)
    split = max(1, min(ceil_div(programs, tiles), k // min_chunk))
    if split == 1:
        return 1, max(k, 1)
    k_per_split = max(align, ceil_div(ceil_div(k, split), align) * align)
    return max(1, ceil_div(k, k_per_split)), k_per_split


def mixed_v2_applies(rows: int) -> bool:
    """Whether a mixed batch of ``rows`` rows takes the grouped kernel (v2); above :data:`MIXED_V2_MAX_ROWS` rows
    it takes the 16-row mixed tiles (v1)."""
    return 0 < rows <= MIXED_V2_MAX_ROWS


def mixed_groups(rows: int, element_size: int = 2, ieee: bool = False, major: int = 9) -> tuple[int, int]:
    """``(few, groups)``: the row groups a v2 program unrolls per pass over K for a batch of ``rows`` rows of
    ``element_size``-byte elements: ``few`` (``ceil(rows / 16)``, every group full: rows of one task, or tasks of 16k
    rows) and ``groups``: at least :data:`MIXED_SEGMENTS` (as many distinct tasks of up to 16 rows each), at most
    :data:`MIXED_GROUPS` (8 for fp32, whose dots hold twice the registers; 2 for fp32 with ``ieee`` dots, which run
    on FMAs: with triton 3.6 for sm_90, 4 groups spill 48 bytes, 8 groups 352; 8 on GPUs of compute capability
    ``major`` under 9, whose ``mma.sync`` dots take more registers: with triton 3.6 for sm_80, 16 groups spill
    160-320 bytes) and ``rows``. Not more than needed: 8
    groups fit the cheaper 4-warp and 128-row configs (:func:`mixed2_config_fits`). The batch's groups are counted on
    the device; the kernel takes the ``few`` loop when they fit it, else passes of ``groups``."""
    cap = 2 if ieee else MIXED_GROUPS if element_size < 4 and major >= 9 else MIXED_GROUPS // 2
    groups = min(max(ceil_div(rows, 16), MIXED_SEGMENTS), cap, rows)
    return min(ceil_div(rows, 16), groups), groups


def mixed_wide_groups(rows: int, element_size: int = 2, ieee: bool = False, major: int = 9) -> int:
    """64-row groups a v2 program unrolls for a batch of ``rows`` rows of one task: ``ceil(few / 4)`` of
    :func:`mixed_groups`'s ``few`` groups, or none under 8. By the model of ``benchmarks/mixed_model.py`` (sm_90,
    triton 3.6), 4 groups of 64 rows take a 256-row batch of one task from 196 to 100 us (4096 -> 11008, fp16),
    while at 64 rows one wide dot costs about what 4 narrow ones with one mask do."""
    few = mixed_groups(rows, element_size, ieee, major)[0]
    return ceil_div(few, 4) if few >= 8 else 0


def mixed_one_task(
    rows: int, element_size: int = 2, ieee: bool = False, major: int = 9, id_bits: int = 8
) -> tuple[int, int]:
    """``(one_rows, one_block_k)``: the one-task loop of a v2 program for a batch of ``rows`` rows (taken when every
    row has one task): one dot of ``one_rows`` rows (a power of two from 16), ``one_block_k`` columns per K step,
    the single-task small kernel's wide K steps up to 32 rows (16-bit: 128, 64 for more rows, 32 above 64 rows
    under compute capability ``major`` 9, whose shared memory holds 4 stages of 64 x 256 activations only; fp32: 32,
    whose operands spill wider, :func:`_registers_fit`). The activation rows are contiguous (one task keeps the
    input order), so their loads are 16-byte vectors where a group's gathered rows load 4 bytes per thread. None
    (0, 0), and such one-task batches take the groups, for fp32 above 64 rows, above 16 with ``ieee`` dots, and
    with compact ids (``id_bits`` 2 or 4) above 128 rows: beside the 16-group loop a 256-row one spills 48-72 bytes
    (triton 3.6, sm_90, 32 or 64 columns per step); with compact ids steps of at most the layout's span (64 columns
    for 4-bit ids, 32 for 2-bit)."""
    limit = 16 if ieee else 64 if element_size == 4 else 128 if id_bits < 8 else MIXED_V2_MAX_ROWS
    if rows > limit:
        return 0, 0
    one_rows = _row_block(rows)
    if element_size == 4:
        return one_rows, 32
    block_k = 128 if one_rows <= 32 else 64 if one_rows <= 64 or major >= 9 else 32
    # Compact ids: steps inside one span of the fields layout, which the word-parallel decode takes (_load_ids).
    return one_rows, min(block_k, 16 * id_bits) if id_bits < 8 else block_k


def fields_loop_applies(id_bits: int, use_mask: bool, element_size: int, split_k: int, k_per_split: int) -> bool:
    """Whether a call of one task can take the fields layout's loop (:func:`_field_sums`): compact ids, the mask on,
    16-bit operands (fp32 tiles of whole chunks per stage leave no large config that fits sm_90) and splits that
    start on whole chunks of the layout (on a GPU always: ``k_per_split`` is a multiple of 256)."""
    aligned = split_k == 1 or k_per_split % CHUNK_COLUMNS == 0
    return id_bits < 8 and use_mask and element_size == 2 and aligned


def mixed_field_tasks(
    id_bits: int, one_rows: int, use_mask: bool, element_size: int, split_k: int, k_per_split: int, max_task: int
) -> int:
    """``FIELD_TASKS`` of a v2 launch: where a batch of one task takes the fields layout's loop with its task compiled
    in (the one-task loop planned and :func:`fields_loop_applies`, as for the single-task kernel), the number of
    copies of that loop: one per task up to ``2**id_bits - 1`` (a task above it sees every
    owner) and up to ``max_task`` (a task above it is not valid); else 0."""
    if not one_rows or not fields_loop_applies(id_bits, use_mask, element_size, split_k, k_per_split):
        return 0
    return min((1 << id_bits) - 1, max_task)


def mixed_slots(
    id_bits: int,
    use_mask: bool,
    element_size: int,
    split_k: int,
    k_per_split: int,
    max_task: int,
    groups: int,
    rows: int,
    major: int = 9,
) -> tuple[int, int]:
    """``(SLOT_TASKS, SLOT_ROWS)`` of a v2 launch of ``rows`` rows whose passes unroll ``groups`` groups of 16 rows:
    where the fields layout's loop applies (:func:`fields_loop_applies`), one slot per task up to ``2**id_bits - 1``
    and ``max_task`` (:func:`_slot_sums`), each of ``SLOT_ROWS`` rows: 16 beside passes of at most
    :data:`MIXED_SEGMENTS` groups (batches up to 128 rows), else 32 (256 rows over 8 tasks of 32 rows each), in
    :func:`slot_passes` passes over K. If at least 2 slots and a pass's accumulators no more than the rows of
    ``groups`` and of :data:`MIXED_SEGMENTS` groups (triton 3.6 and 3.9, sm_90, fp16, 256 rows: 8 slots of 32 rows in
    one pass spill 192-256 bytes, in two passes of 4 none): 8 slots at 64 or 256 rows; and if a batch of ``rows``
    rows can take them (``SLOT_TASKS * SLOT_ROWS`` at least ``rows``: the slots hold every row), else the kernel
    would compile loops that never run, whose registers the kernel's other loops share; else ``(0, 16)``. None on
    GPUs of compute capability ``major`` under 9, whose ``mma.sync`` dots take their operands in more registers
    (triton 3.6 and 3.9, sm_80, 64 rows, 8 slots: 144 bytes of stack at 255 registers)."""
    slot_rows = 16 if groups <= MIXED_SEGMENTS else 32
    applies = fields_loop_applies(id_bits, use_mask, element_size, split_k, k_per_split)
    if not applies or major < 9:
        return 0, 16
    slots = min((1 << id_bits) - 1, max_task)
    per_pass = ceil_div(slots, slot_passes(slot_rows))
    fits = 2 <= slots and per_pass * slot_rows <= 16 * min(groups, MIXED_SEGMENTS) and slots * slot_rows >= rows
    return (slots, slot_rows) if fits else (0, 16)


def whole_chunks(in_features: int) -> bool:
    """``EVEN_K`` of a launch: ``in_features`` is a whole number (not 0) of the fields layout's chunks
    (``CHUNK_COLUMNS``), so no K step of the fields or slots loops reaches past K and none checks its columns (4096,
    11008, 25088: yes). Those loops run only where every split starts on a chunk (:func:`fields_loop_applies`); with
    no input features they still run one chunk, whose columns must be checked."""
    return in_features > 0 and in_features % CHUNK_COLUMNS == 0


def slot_passes(slot_rows: int) -> int:
    """Passes over K of a v2 program's slots of ``slot_rows`` rows (:func:`mixed_slots`): one for 16-row slots, two
    for 32-row ones, each pass holding half the slots (and reading the weight and ids again)."""
    return slot_rows // 16


def _mixed_split_plan(rows: int, n: int, k: int, element: int, interpreted: bool, device) -> tuple[int, int]:
    """The v2 split of K: the small single-task regime's (:func:`_split_plan` for one row: a program per weight
    tile and split), with fewer splits on a GPU where the fp32 partials (8 bytes per row and split, written and
    read) would move more than half the weight and id bytes of an output column."""
    split_k, k_per_split = _split_plan(1, n, k, interpreted, device)
    if interpreted:
        return split_k, k_per_split
    while split_k > 1 and split_k * rows * 8 > k * (element + 1) // 2:
        split_k -= 1
        k_per_split = ceil_div(ceil_div(k, split_k), _SPLIT_K_ALIGN) * _SPLIT_K_ALIGN
        split_k = ceil_div(k, k_per_split)
    return split_k, k_per_split


def mixed_segments(rows: int) -> int:
    """Distinct tasks a mixed tile handles per pass over K: a power of two up to :data:`MIXED_SEGMENTS`, no more
    than the batch can hold (a batch of 2 rows never needs 8 unrolled segments)."""
    segments = 1
    while segments < min(rows, MIXED_SEGMENTS):
        segments *= 2
    return segments


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    # TF32 for fp32 when PyTorch allows it for matmuls; ignored for fp16/bf16 (native tensor-core inputs).
    return "tf32"


# Split-K workspaces of direct launches, per (device, stream): fp32 partials and int32 tile counters, grown on demand.
# Launches on one stream run in order, so they can share one; the kernel leaves the counters zero. Like cuBLAS's
# workspace, it stays allocated until :func:`release_workspaces`.
_WORKSPACES: dict[tuple[str, int | None, int], tuple[torch.Tensor, torch.Tensor]] = {}


def release_workspaces() -> None:
    """Free the split-K workspaces and the mixed-batch grouping kept for direct launches, with the layouts kept
    beside it (the next call allocates or sorts anew)."""
    _WORKSPACES.clear()
    _LAST_GROUPING.clear()


def _split_workspace(
    device: torch.device, partial_count: int, counter_count: int, reuse: bool, stream: int | None = None
):
    """``(partials, counters)``: flat fp32 and zeroed int32 tensors of at least the given lengths on ``device``.

    ``reuse`` returns this stream's kept workspace (grown when too small): for direct eager launches and the
    interpreter, never inside the registered op (``torch.compile`` must see each allocation) nor during CUDA-graph
    capture (the graph must own its memory, and a workspace first zeroed inside a capture is not zero outside it).
    ``stream``: the current stream's raw handle when the caller has it (else it is looked up)."""
    if device.type == "cuda":
        reuse = reuse and not torch._C._cuda_isCurrentStreamCapturing()
        if reuse and stream is None:
            stream = torch._C._cuda_getCurrentRawStream(device.index)
        key = (device.type, device.index, stream if reuse else 0)
    else:
        key = (device.type, device.index, 0)
    kept = _WORKSPACES.get(key) if reuse else None
    if kept is not None and kept[0].numel() >= partial_count and kept[1].numel() >= counter_count:
        return kept
    if kept is not None:
        # Doubling bounds how often a stream that sees growing shapes reallocates.
        partial_count = max(partial_count, 2 * kept[0].numel())
        counter_count = max(counter_count, 2 * kept[1].numel())
    workspace = (
        torch.empty(partial_count, dtype=torch.float32, device=device),
        torch.zeros(counter_count, dtype=torch.int32, device=device),
    )
    if reuse:
        _WORKSPACES[key] = workspace
    return workspace


# The last mixed batch's grouping, for the next layer of the same forward given the same task tensor: (weak reference
# to the tasks, their version counter, the forward's serial number, the stream, (row_tasks, row_order)).
_LAST_GROUPING: list = []


def _grouped_rows(tasks: torch.Tensor, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_tasks, row_order)``: ``tasks`` sorted increasingly (stably) and each sorted position's input row.

    ``reuse`` (direct eager launches only, as for :func:`_split_workspace`; never during CUDA-graph capture) returns
    the grouping of the previous call when both run inside one forward of a packed model
    (:func:`~packnet_kernels._checks.packed_forward`), on this stream, for this very tensor, unchanged since (its
    version counter): every layer of a model serving one mixed batch gets the same task tensor, so the batch is
    sorted once per forward, not once per layer. Outside a packed model's forward every call sorts: between calls a
    task tensor may be rewritten without its version counter moving. Inference-mode tensors, which keep no version
    counter, are never reused."""
    forward = packed_forward()
    reuse = reuse and forward is not None and not tasks.is_inference()
    if tasks.is_cuda:
        reuse = reuse and not torch.cuda.is_current_stream_capturing()
        stream = torch._C._cuda_getCurrentRawStream(tasks.device.index) if reuse else 0
    else:
        stream = 0
    if reuse and _LAST_GROUPING:
        reference, version, last_forward, last_stream, grouping, _ = _LAST_GROUPING
        same_forward = last_forward == forward and last_stream == stream
        if same_forward and reference() is tasks and version == tasks._version:
            return grouping
    grouping = tuple(torch.sort(tasks, stable=True))
    if reuse:
        _LAST_GROUPING[:] = [weakref.ref(tasks), tasks._version, forward, stream, grouping, {}]
    return grouping


def _kept_with_grouping(grouping: tuple[torch.Tensor, torch.Tensor]) -> dict | None:
    """The layouts derived from ``grouping`` kept beside it for the rest of the forward (the linear row groups, the
    conv pixel tiles; a dict by the caller's key), or None when ``grouping`` is not the one :func:`_grouped_rows`
    keeps: derive anew then, and keep nothing."""
    if _LAST_GROUPING and _LAST_GROUPING[4] is grouping:
        return _LAST_GROUPING[5]
    return None


def _row_groups(tasks: torch.Tensor, reuse: bool, wrap=None, launch=None):
    """``(group_rows, group_tasks, group_count)``: the rows of a mixed batch laid out in groups of 16 rows of one
    task, and again in groups of 64 and of 32, on the device, with no host sync (the launch does not need the
    counts; the kernel reads them).

    The rows sorted by task (:func:`_grouped_rows`, kept across a forward as it is) split into runs of one task;
    each run fills ``ceil(rows / 16)`` groups, in order: ``group_rows`` int32 ``[rows * 16]`` holds each group's
    input rows (-1 past a run's end), ``group_tasks`` int32 ``[rows]`` their tasks (increasing; values clamped to
    -1..256, which keeps invalid tasks invalid); then ``[rows * 64]`` and ``[rows]`` the same for groups of 64
    rows, then ``[rows * 32]`` and ``[rows]`` for groups of 32 rows (the slots of batches over 128 rows);
    ``group_count`` int32 ``[4]`` the counts of 16-row and 64-row groups, the number of runs (distinct tasks) and
    the count of 32-row groups. Entries past a count are not written. At most ``rows`` groups of each. One launch
    of :func:`_row_groups_kernel`: ``launch`` (a direct launch of it, see :class:`LinearPlan`), else
    ``wrap(kernel)[grid]`` (``wrap_triton`` in the registered op), else a plain launch. When the grouping is the
    one kept for the forward, so are its groups (one layout per forward)."""
    grouping = _grouped_rows(tasks, reuse)
    kept = _kept_with_grouping(grouping)
    if kept is not None and "row_groups" in kept:
        return kept["row_groups"]
    row_tasks, row_order = grouping
    rows = row_tasks.numel()
    group_rows = torch.empty(rows * (16 + 64 + 32), dtype=torch.int32, device=row_tasks.device)
    group_tasks = torch.empty(3 * rows, dtype=torch.int32, device=row_tasks.device)
    group_count = torch.empty(4, dtype=torch.int32, device=row_tasks.device)
    args = (row_tasks, row_order, group_rows, group_tasks, group_count, rows)
    if launch is not None:
        stream = torch._C._cuda_getCurrentRawStream(row_tasks.device.index) if row_tasks.is_cuda else 0
        launch(args, (), stream)
    else:
        kernel = _row_groups_kernel if wrap is None else wrap(_row_groups_kernel)
        kernel[(1,)](*args, BLOCK=_row_block(rows))
    layout = (group_rows, group_tasks, group_count)
    if kept is not None:
        kept["row_groups"] = layout
    return layout


def _row_block(rows: int) -> int:
    """The power of two :func:`_row_groups_kernel` covers ``rows`` with."""
    block = 16
    while block < rows:
        block *= 2
    return block


class LinearPlan:
    """What a launch of one call shape needs besides its tensors and its task, computed once (:func:`linear_plan`):
    the output's shape, the split-K plan and workspace size, every integer argument (sizes, strides) and the
    constexpr flags, the grid, and per kernel choice (tuned, untuned, interpreted) the :class:`~packnet_kernels.
    _launcher.KernelLaunch` that holds the compiled kernel after the first call.

    Attributes:
        out_shape: ``(*x.shape[:-1], out)``.
        rows: the input's rows once its leading dimensions are flattened (``M``).
        flatten: whether ``x`` is reshaped to ``[rows, in]`` first (inputs of more than 2 dimensions).
        split_k: splits of K (1: none); ``partial_count``, ``counter_count``: the workspace it needs.
        field_task: the largest task of compact ids (``2**bits - 1``) when the single-task loop on the fields layout
            (:func:`_field_sums`, its task a compile-time constant) applies, else 0.
        device_index: the CUDA device (None on the CPU).
    """

    __slots__ = (
        "out_shape",
        "rows",
        "in_features",
        "flatten",
        "empty",
        "split_k",
        "partial_count",
        "counter_count",
        "field_task",
        "sizes",
        "ints",
        "flags",
        "family",
        "grid",
        "device",
        "device_index",
        "interpreted",
        "dtype",
        "launches",
        "grouped",
        "group_launch",
    )

    def kernel_launch(self, task: int = 0) -> KernelLaunch:
        """The kernel launch of the current kernel choice (``AUTOTUNE`` may be switched between calls) for ``task``
        (see :meth:`compiled_task`)."""
        choice = ("interpreter" if self.interpreted else AUTOTUNE, self.compiled_task(task))
        launch = self.launches.get(choice)
        if launch is None:
            kernel, constants = self.kernel_and_constants(task)
            launch = self.launches[choice] = KernelLaunch(kernel, self.grid, constants)
        return launch

    def compiled_task(self, task: int) -> int:
        """The kernel's ``TASK`` for a call of ``task``: with ``field_task``, ``task`` clamped to it (a task above the
        layer's largest sees every owner), compiled in; else 0 (the task is a run-time argument)."""
        return min(task, self.field_task) if self.field_task and task > 0 else 0

    def kernel_and_constants(self, task: int = 0) -> tuple:
        """``(kernel, keyword arguments)`` of a launch for ``task``: the autotuned kernel (GPU, ``AUTOTUNE``), the
        kernel with the untuned default config (GPU), or the kernel with the interpreter's fixed config."""
        kernel = _mixed_linear_kernel if self.grouped else _masked_linear_kernel
        flags = self.flags if self.grouped else {**self.flags, "TASK": self.compiled_task(task)}
        if self.interpreted:
            # The interpreter cannot autotune (it cannot time anything): one small fixed config.
            return kernel, {**flags, **(_INTERPRETER_V2_CONFIG if self.grouped else _INTERPRETER_CONFIG)}
        properties = device_properties(self.device)
        if AUTOTUNE:
            return _tuned_kernel(self.family, properties.major), flags
        limit = properties.shared_memory_per_block_optin
        if self.grouped:
            configs = _configs("mixed2", properties.major)
            sizes = [self.flags[name] for name in _MIXED2_SIZES]
            ieee = self.flags["INPUT_PRECISION"] == "ieee"
            default = next((c for c in configs if mixed2_config_fits(c, self.dtype, limit, *sizes, ieee=ieee)),
                           configs[0])  # fmt: skip
        else:
            field_bits = flags["ID_BITS"] if flags["TASK"] else 8
            default = default_config(self.family, properties.major, self.dtype, limit, flags["TILE_MAP"], field_bits)
        constants = {**flags, **default.kwargs, "num_warps": default.num_warps, "num_stages": default.num_stages}
        return kernel, constants

    def launch(self, x, weight, task_ids, bias, scale, shift, tile_map, task: int, tasks, reuse: bool, wrap=as_is):
        """Allocate the output and launch: ``task`` the int task (0 with ``tasks``, a mixed batch's task tensor),
        ``reuse`` as for :func:`_launch`. ``wrap=as_is`` launches through :meth:`kernel_launch` (direct launches);
        any other ``wrap`` (``wrap_triton`` in the registered op, a test's counter) launches ``wrap(kernel)[grid](...)``
        each time. Returns ``y``."""
        if self.device_index is not None and torch._C._cuda_getDevice() != self.device_index:
            # Triton launches on the current device, where the compiled kernel was loaded for this plan's.
            with torch.cuda.device(self.device_index):
                return self.launch(x, weight, task_ids, bias, scale, shift, tile_map, task, tasks, reuse, wrap)
        y = torch.empty(self.out_shape, dtype=x.dtype, device=x.device)
        if self.empty:
            return y
        # A view whenever the strides allow one (the kernel takes any 2-D strides); a copy only for odd N-D layouts.
        x2d = x.reshape(self.rows, self.in_features) if self.flatten else x
        direct = wrap is as_is
        stream = None
        if direct:
            stream = torch._C._cuda_getCurrentRawStream(self.device_index) if self.device_index is not None else 0
        partials = counters = None
        if self.split_k > 1:
            partials, counters = _split_workspace(x.device, self.partial_count, self.counter_count, reuse, stream)
        if self.grouped:
            if direct and not self.interpreted:
                if self.group_launch is None:
                    block = {"BLOCK": _row_block(self.rows)}
                    self.group_launch = KernelLaunch(_row_groups_kernel, lambda meta: (1,), block)
                groups = _row_groups(tasks, reuse, launch=self.group_launch)
            else:
                groups = _row_groups(tasks, reuse, None if direct else wrap)
            args = (x2d, weight, task_ids, bias, scale, shift, y, partials, counters, *groups, *self.sizes, *self.ints)
        else:
            grouping = _grouped_rows(tasks, reuse) if tasks is not None else (None, None)
            pointers = (x2d, weight, task_ids, bias, scale, shift, y, partials, counters, tile_map, *grouping)
            args = (*pointers, *self.sizes, task, *self.ints)
        if direct:
            self.kernel_launch(task)(args, (), stream)
        else:
            kernel, constants = self.kernel_and_constants(task)
            wrap(kernel)[self.grid](*args, **constants)
        return y


def linear_plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    use_mask: bool,
    tile_map: torch.Tensor | None,
    free_weights_zero: bool,
    tasks: torch.Tensor | None,
    id_bits: int,
) -> LinearPlan:
    """The :class:`LinearPlan` of a call on validated arguments, from their shapes, strides, dtypes and devices only
    (never their values: it also runs on fake tensors while ``torch.compile`` traces); ``weight`` as the caller
    holds it, ``task_ids`` the uint8 ids or compact words
    (``id_bits`` 2 or 4), ``bias``/``scale``/``shift`` as they will be passed (``[out]`` vectors or, with
    ``tasks``, tables), ``tasks`` only for its presence."""
    plan = LinearPlan()
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    rows = 1
    for size in lead:
        rows *= size
    plan.out_shape = (*lead, out_features)
    plan.rows, plan.in_features = rows, in_features
    plan.flatten = x.dim() != 2
    plan.empty = rows == 0 or out_features == 0
    plan.device = x.device
    plan.device_index = x.device.index if x.is_cuda else None
    plan.interpreted = not x.is_cuda
    plan.launches = {}
    plan.dtype = x.dtype
    plan.field_task = 0
    plan.grouped = tasks is not None and mixed_v2_applies(rows)
    plan.group_launch = None
    if plan.empty:
        return plan  # nothing to launch: the output alone
    if plan.grouped:
        return _grouped_plan(plan, x, weight, task_ids, bias, scale, shift, relu, use_mask, id_bits)
    x_strides = x.stride() if x.dim() == 2 else x.reshape(rows, in_features).stride()
    regime = choose_regime(rows)
    split_k, k_per_split = _split_plan(rows, out_features, in_features, plan.interpreted, x.device)
    plan.split_k = split_k
    # Whole tiles: at most (N + BLOCK_N) x (M + BLOCK_M) elements per split, whichever config runs.
    plan.counter_count = ceil_div(out_features, _MIN_BLOCK_N) * ceil_div(rows, _MIN_BLOCK_M)
    plan.partial_count = split_k * (out_features + _MAX_BLOCK_N) * (rows + _MAX_BLOCK_M[regime])
    vectors = (bias, scale, shift)
    # [out] vectors: (stride along out, 0 along tasks); [tasks, out] tables: (stride(1), stride(0)).
    vector_strides = [0 if v is None else v.stride(-1) for v in vectors]
    task_strides = [0 if v is None or v.dim() == 1 else v.stride(0) for v in vectors]
    if tasks is None and fields_loop_applies(id_bits, use_mask, x.element_size(), split_k, k_per_split):
        plan.field_task = (1 << id_bits) - 1
    plan.sizes = (rows, out_features, in_features)
    plan.ints = (
        k_per_split,
        _m_bucket(rows),
        task_limit(*vectors) if tasks is not None else 0,
        *(tile_map.stride()[:2] if tile_map is not None else (0, 0)),
        *x_strides,
        *weight.stride(),
        *_id_strides(task_ids, id_bits),
        *vector_strides,
        *task_strides,
        out_features,
        1,
    )
    plan.flags = {
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "RELU": relu,
        "USE_MASK": use_mask,
        "TILE_MAP": tile_map is not None,
        "RAW_TILES": free_weights_zero,
        "CELL_N": TILE_CELL[0],
        "CELL_K": TILE_CELL[1],
        "SPLIT": split_k > 1,
        "UPCAST_BF16": plan.interpreted and x.dtype == torch.bfloat16,
        "INPUT_PRECISION": _input_precision(x.dtype),
        "MIXED": tasks is not None,
        "SEGMENTS": mixed_segments(rows) if tasks is not None else 1,
        "ID_BITS": id_bits,
        "USE_ASM": not plan.interpreted,
        "TASK": 0,
        "EVEN_K": whole_chunks(in_features),
    }
    # Mixed batches have their own (narrow) tiles at every batch size, and the loop on compact ids its own stages:
    # see _configs.
    plan.family = "mixed" if tasks is not None else f"{regime}-fields{id_bits}" if plan.field_task else regime

    def grid(meta):
        return (ceil_div(out_features, meta["BLOCK_N"]) * ceil_div(rows, meta["BLOCK_M"]), split_k)

    plan.grid = grid
    return plan


def _id_strides(task_ids: torch.Tensor, id_bits: int) -> tuple[int, int]:
    """The kernels' id strides: the uint8 ids' own, or for compact ids (int32 words, read as the bytes of the fields
    layout) bytes per row and 1."""
    return task_ids.stride() if id_bits == 8 else (task_ids.stride(0) * 4, 1)


def _grouped_plan(plan, x, weight, task_ids, bias, scale, shift, relu, use_mask, id_bits) -> LinearPlan:
    """The rest of :func:`linear_plan` for a mixed batch that takes the grouped kernel (:func:`mixed_v2_applies`)."""
    rows, (out_features, in_features) = plan.rows, weight.shape
    x_strides = x.stride() if x.dim() == 2 else x.reshape(rows, in_features).stride()
    split_k, k_per_split = _mixed_split_plan(
        rows, out_features, in_features, x.element_size(), plan.interpreted, x.device
    )
    ieee = _input_precision(x.dtype) == "ieee"
    major = 9 if plan.interpreted else device_properties(x.device).major
    few, groups = mixed_groups(rows, x.element_size(), ieee, major)
    one_rows, one_block_k = mixed_one_task(rows, x.element_size(), ieee, major, id_bits)
    if plan.interpreted and one_rows:
        # The single-task kernel's interpreter tiles: a batch of one task sums as that kernel does, bit for bit.
        one_block_k = _INTERPRETER_CONFIG["BLOCK_K"]
    # Passes over K: at most one per GROUPS groups (there are at most ``rows`` groups).
    max_passes = ceil_div(rows, groups)
    plan.split_k = split_k
    plan.counter_count = ceil_div(out_features, _MIN_BLOCK_N) * max_passes
    plan.partial_count = split_k * rows * out_features
    vectors = (bias, scale, shift)
    plan.sizes = (rows, out_features, in_features)
    plan.ints = (
        k_per_split,
        task_limit(*vectors),
        max_passes,
        *x_strides,
        *weight.stride(),
        *_id_strides(task_ids, id_bits),
        *[0 if v is None else v.stride(-1) for v in vectors],
        *[0 if v is None or v.dim() == 1 else v.stride(0) for v in vectors],
        out_features,
        1,
    )
    plan.flags = {
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "RELU": relu,
        "USE_MASK": use_mask,
        "SPLIT": split_k > 1,
        "UPCAST_BF16": plan.interpreted and x.dtype == torch.bfloat16,
        "INPUT_PRECISION": _input_precision(x.dtype),
        "ID_BITS": id_bits,
        "USE_ASM": not plan.interpreted,
        "GROUPS": groups,
        "FEW_GROUPS": few,
        "WIDE_GROUPS": mixed_wide_groups(rows, x.element_size(), ieee, major),
        "ONE_ROWS": one_rows,
        "ONE_BLOCK_K": one_block_k,
        "FIELD_TASKS": mixed_field_tasks(
            id_bits, one_rows, use_mask, x.element_size(), split_k, k_per_split, task_limit(*vectors)
        ),
    }
    plan.flags["EVEN_K"] = whole_chunks(in_features)
    plan.flags["SLOT_TASKS"], plan.flags["SLOT_ROWS"] = mixed_slots(
        id_bits, use_mask, x.element_size(), split_k, k_per_split, task_limit(*vectors), groups, rows, major
    )
    plan.family = "mixed2"

    def grid(meta):
        return (ceil_div(out_features, meta["BLOCK_N"]), split_k)

    plan.grid = grid
    return plan


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    use_mask: bool,
    tile_map: torch.Tensor | None = None,
    free_weights_zero: bool = False,
    tasks: torch.Tensor | None = None,
    wrap=wrap_triton,
    reuse_workspace: bool = False,
    id_bits: int = 8,
) -> torch.Tensor:
    """Allocate the output (and the split-K workspace) and launch the kernel once; arguments already validated.

    ``wrap`` turns a kernel into its launchable form: ``wrap_triton`` inside the registered op (which traces it for
    ``torch.compile``), :func:`~packnet_kernels._checks.as_is` for a direct eager launch. Outside the op,
    ``wrap_triton`` routes every eager launch through its tracing machinery: with torch 2.11 on an H200 that cost
    about a millisecond of host time per call and broke CUDA-graph capture. A direct launch keeps its
    :class:`LinearPlan` per call shape (:func:`_plan_key`) and launches through the plan's compiled kernel after its
    first call. ``reuse_workspace``: see :func:`_split_workspace` and :func:`_grouped_rows`. ``tasks``: a mixed
    batch's per-row tasks (``task`` is then unused); the rows are grouped by task with a stable sort on the device,
    which the kernel reads through (no permuted copies). ``id_bits`` 2 or 4: ``task_ids`` is the int32 words of
    compact ids (:class:`~packnet_kernels.id_layout.CompactTaskIds`), else uint8 ids."""
    args = (x, weight, task_ids, bias, scale, shift, relu, use_mask, tile_map, free_weights_zero, tasks, id_bits)
    if wrap is as_is:
        key = _plan_key(*args)
        plan = _PLANS.get(key)
        if plan is None:
            plan = linear_plan(*args)
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    else:
        plan = linear_plan(*args)  # traced calls (fake tensors) keep nothing
    return plan.launch(x, weight, task_ids, bias, scale, shift, tile_map, task, tasks, reuse_workspace, wrap)


# Launch plans of direct launches by everything a plan is computed from (:func:`_plan_key`); cleared whenever it
# reaches this size, so that shapes that keep changing cannot grow it.
_PLANS: dict = {}
_MAX_PLANS = 1024


def _tensor_key(tensor: torch.Tensor | None):
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype)


def _plan_key(x, weight, task_ids, bias, scale, shift, relu, use_mask, tile_map, free_weights_zero, tasks, id_bits):
    """Everything :func:`linear_plan` reads: shapes, strides, dtypes and devices (never values), the flags, the
    and PyTorch's fp32 matmul precision (TF32 or not)."""
    return (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        weight.shape,
        weight.stride(),
        task_ids.stride(),
        id_bits,
        _tensor_key(bias),
        _tensor_key(scale),
        _tensor_key(shift),
        None if tile_map is None else tile_map.stride(),
        free_weights_zero,
        relu,
        use_mask,
        None if tasks is None else (tasks.shape, tasks.dtype),
        torch.get_float32_matmul_precision(),
    )


_OP_ARGS = (
    "Tensor x, Tensor weight, Tensor task_ids, int task, Tensor? bias, Tensor? scale, Tensor? shift, bool relu, "
    "bool use_mask, Tensor? tile_map, bool free_weights_zero, Tensor? tasks, int id_bits=8"
)


@torch.library.custom_op("packnet::masked_linear_interpreted", mutates_args=(), schema=f"({_OP_ARGS}) -> Tensor")
def _masked_linear_interpreted(
    x, weight, task_ids, task, bias, scale, shift, relu, use_mask, tile_map, raw_tiles, tasks, id_bits=8
):
    """The CPU (``TRITON_INTERPRET=1``) launch, kept behind an opaque op: interpreted kernels are plain Python that
    ``wrap_triton`` cannot trace, so inside a traced graph they must run only when real tensors arrive."""
    args = (x, weight, task_ids, task, bias, scale, shift, relu, use_mask, tile_map, raw_tiles, tasks)
    # Real tensors only (the fake implementation below serves tracing): launch plans may be kept.
    return _launch(*args, wrap=as_is, reuse_workspace=True, id_bits=id_bits)


@_masked_linear_interpreted.register_fake
def _(x, weight, task_ids, task, bias, scale, shift, relu, use_mask, tile_map, raw_tiles, tasks, id_bits=8):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@triton_op("packnet::masked_linear", mutates_args=())
def _masked_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor,
    task: int,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    relu: bool,
    use_mask: bool,
    tile_map: torch.Tensor | None,
    free_weights_zero: bool,
    tasks: torch.Tensor | None,
    id_bits: int = 8,
) -> torch.Tensor:
    """The registered op (also its own fake implementation); arguments already validated by
    :func:`masked_linear_triton`. CUDA launches go through ``wrap_triton`` so ``torch.compile`` sees the kernels.
    ``tasks``: a mixed batch's per-row tasks (``task`` is then 0), else None; ``id_bits``: see :func:`_launch`."""
    args = (x, weight, task_ids, task, bias, scale, shift, relu, use_mask, tile_map, free_weights_zero, tasks)
    if not x.is_cuda:
        return _masked_linear_interpreted(*args, id_bits)
    # Triton launches on the current device: make it the tensors' one (they may live on another GPU).
    with torch.cuda.device(x.device):
        return _launch(*args, id_bits=id_bits)


def masked_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    task_ids: torch.Tensor | CompactTaskIds,
    task: int | torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    use_mask: bool = True,
    tile_map: torch.Tensor | None = None,
    free_weights_zero: bool = False,
) -> torch.Tensor:
    """``relu?(((x @ W_t^T) + bias) * scale + shift)`` with ``W_t = where((task_ids != 0) & (task_ids <= task), W, 0)``.

    Args:
        x: ``[..., in]`` float32/float16/bfloat16, any strides; an empty batch gives an empty output.
        weight: ``[out, in]`` in ``x``'s dtype, any strides.
        task_ids: ``[out, in]`` uint8 (0 = free, k = owned by task k), any strides; or the same ids in the
            run-time layout (:class:`~packnet_kernels.id_layout.CompactTaskIds`, 2 or 4 bits per weight, the fields
            layout), which one task's call decodes in the registers of the dot with the task compiled in.
        task: int in 1..255, or a mixed batch's integer tensor ``[rows]`` of per-row tasks (one launch for any mix:
            :func:`_mixed_linear_kernel` up to ``MIXED_V2_MAX_ROWS`` rows, ``MIXED`` in
            :func:`_masked_linear_kernel` above). Its values are checked for CPU tensors in eager mode
            only; on CUDA and inside ``torch.compile`` a row whose task is outside 1..255 (or beyond an epilogue
            table) comes out NaN, with no device sync.
        bias, scale, shift: optional ``[out]`` vectors in ``x``'s dtype (a per-task Linear -> BatchNorm1d fold); with
            a task tensor each may also be a ``[num_tasks, out]`` table, row ``task - 1`` per row.
        relu: apply ReLU last.
        use_mask: ``False`` runs the same kernel with the predicate compiled out (``task_ids`` is not read), i.e. a
            plain ``F.linear`` on the raw weight; for benchmarks separating the mask's cost.
        tile_map: ``packnet_kernels.reference.tile_map(task_ids)`` (uint8 ``[2, ceil(out / 32), ceil(in / 32)]``,
            contiguous, on ``x``'s device), or ``None``. Tiles holding no weight of tasks 1..task are then not read.
            It must describe these very ids: a stale map gives wrong results. Ignored with ``use_mask=False``.
        free_weights_zero: with a tile map, the caller guarantees that every weight whose id is 0 is exactly zero
            (as in a validated pack): tiles whose owners are all <= task then read no ids and use the weights as
            stored. With a nonzero free weight this changes results; leave it ``False`` unless checked.

    Returns:
        ``[..., out]`` in ``x``'s dtype, contiguous; fp32 accumulation (TF32 dots for fp32 inputs when
        ``torch.get_float32_matmul_precision()`` is not ``"highest"``).

    Raises:
        TypeError, ValueError: bad inputs (see :func:`packnet_kernels._checks.check_linear`).
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    task = check_linear(x, weight, task_ids, task, bias, scale, shift, dtypes=KERNEL_DTYPES)
    require_kernel_device("masked_linear_triton", x)
    for name, flag in (("relu", relu), ("use_mask", use_mask)):
        if not isinstance(flag, bool):
            raise TypeError(f"masked_linear: {name} must be a bool, got {type(flag).__name__}")
    check_tile_map("masked_linear", tile_map, weight, free_weights_zero)
    if not use_mask:
        tile_map, free_weights_zero = None, False
    tasks = None
    if isinstance(task, torch.Tensor):
        # Reading the values is a device sync on a GPU and a graph break in torch.compile: CPU eager calls only.
        if not x.is_cuda and not torch.compiler.is_compiling():
            check_task_values("masked_linear", task, task_limit(bias, scale, shift))
        tasks, task = task, 0
    id_bits = 8
    if isinstance(task_ids, CompactTaskIds):
        task_ids, id_bits = task_ids.words, task_ids.bits
    args = (x, weight, task_ids, task, bias, scale, shift, relu, use_mask, tile_map, free_weights_zero, tasks)
    if direct_launch_allowed(x, weight, bias, scale, shift):
        # Eager calls skip the registered op's dispatch: most of a small layer's host time. (The plan makes the
        # input's device the current one where it is not.)
        return _launch(*args, wrap=as_is, reuse_workspace=True, id_bits=id_bits)
    return _masked_linear_op(*args, id_bits)
