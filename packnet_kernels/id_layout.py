"""The run-time layout of task ids: ``b`` bits per weight instead of a byte, in the order the kernels read them.

A pack stores one ``uint8`` id per weight (the format). A packed layer that will run on a GPU derives from those ids
a compact copy of ``b = bits_for(num_tasks)`` bits per weight (2 bits up to 3 tasks, 4 up to 15, else the bytes as
they are) and the kernels read that one: a fp16 weight then costs ``2 + b / 8`` bytes per call instead of 3.

Two layouts (:class:`CompactTaskIds`), both int32 words ``[rows, row_words]``; a row's words are padded with free
ids to a multiple of :func:`row_align_words`, so that the kernels read whole steps without a bound. Nothing here is
saved: it is derived again whenever the ids change.

*Fields* (a linear layer, ``[out, in]`` ids): the row is cut into chunks of 128 columns, each packed into ``16 * b``
bytes: a chunk is ``8 / b`` spans of ``S = 16 * b`` columns (64 for 4-bit ids, 32 for 2-bit), and byte ``j`` of chunk
``c`` holds, in field ``q`` (bits ``b * q`` and up), column ``128 c + S q + j``. A field stores ``(id - 1) mod
2**b``: an owner ``k`` as ``k - 1`` and a free weight as ``2**b - 1``, so task ``t`` (clamped to ``2**b - 1``) owns a
weight exactly when its field is below ``t``: one compare. Every field of a byte belongs to the same row and the same
position ``j`` of a span, so the ids of ``S`` consecutive columns are a ``[rows, S]`` byte tile, the same shape as the
weight tile they mask: the single-task linear kernel masks the weight in the registers wgmma reads it from
(``linear._field_sums``), with no shared-memory round trip, which packed words (a different shape) cannot give.

*Words* (a conv, ``[out, in/g, kh, kw]`` ids): the ids as the kernels' ``[rows, K]`` GEMM operand (:func:`~
packnet_kernels.reference.gemm_matrix`), cut into groups of ``group`` consecutive columns (one per tap, its ``in/g``
channels). Each group is packed on its own into little-endian int32 words of ``32 / b`` ids: column ``j`` of a group
sits in word ``j // (32 / b)`` of the group, at bits ``b * (j % (32 / b))`` and up, so that a kernel tile of
``BLOCK_K`` columns starting at a multiple of ``32 / b`` inside a group reads whole words. Columns past a group's end
are 0 (free).

The word-parallel decode the conv kernel runs (:func:`owned_pair_masks`, the spec of ``_predicate.owned_pair_masks``)
turns one word into masks for pairs of 16-bit weights: for pair ``p`` (columns ``2p`` and ``2p + 1`` of the word),
``0xFFFF`` in the low half when the first is owned by a task in ``1..task`` and in the high half for the second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "CompactTaskIds",
    "bits_for",
    "compact_task_ids",
    "field_positions",
    "owned_fields",
    "owned_pair_masks",
    "unpack_task_ids",
]

# Bits per id by the largest task a layer holds: every id in 0..max_task must fit.
_BITS = ((3, 2), (15, 4))
# Row strides are padded to whole kernel steps of this many columns (16 words of 2-bit ids, 32 of 4-bit ones): every
# row starts aligned for 16-byte vector loads, and no step (BLOCK_K <= 256) reads past its row, so steps need no
# bound along K.
ROW_ALIGN_COLUMNS = 256
# Columns of one chunk of the fields layout, whatever the bits: a chunk is ``8 / bits`` spans of ``16 * bits`` columns.
CHUNK_COLUMNS = 128


def field_span(bits: int) -> int:
    """Columns between the fields of one byte in the fields layout (64 for 4-bit ids, 32 for 2-bit): the widest dot
    of the single-task linear loop on them."""
    return 16 * bits


def field_positions(columns: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(byte, shift)`` of each column in a row of the fields layout: the byte of the row that holds it and its
    field's lowest bit there."""
    span = field_span(bits)
    return (columns // CHUNK_COLUMNS) * span + columns % span, (columns % CHUNK_COLUMNS) // span * bits


def row_align_words(bits: int) -> int:
    """Words a row of ``bits``-bit ids is padded to a multiple of."""
    return ROW_ALIGN_COLUMNS * bits // 32


def bits_for(max_task: int) -> int:
    """Bits per id for a layer whose ids go up to ``max_task``: 2 (up to 3 tasks), 4 (up to 15) or 8 (bytes)."""
    for limit, bits in _BITS:
        if max_task <= limit:
            return bits
    return 8


@dataclass(frozen=True)
class CompactTaskIds:
    """Task ids in the kernels' run-time layout (module docstring).

    Attributes:
        words: int32 ``[rows, row_words]`` (contiguous; ``row_words`` a multiple of :func:`row_align_words`).
        bits: 2 or 4, bits per id.
        shape: the weight's shape (``[out, in]``: the fields layout, or ``[out, in/groups, kh, kw]``: words).
        group: columns of the GEMM operand packed as one run (``in`` for a linear layer, ``in/groups`` for a conv).
        max_task: the largest task the ids may name (their layer's ``num_tasks``): a task above it sees every owner.
    """

    words: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    group: int
    max_task: int

    @property
    def fields(self) -> bool:
        """Whether the layout is the fields one (a linear layer's ids), else packed words (a conv's)."""
        return len(self.shape) == 2

    @property
    def ids_per_word(self) -> int:
        return 32 // self.bits

    @property
    def group_words(self) -> int:
        """Words per group of one row (fields: the whole chunks of a row, 16 words each)."""
        if self.fields:
            return -(-self.group // CHUNK_COLUMNS) * field_span(self.bits) // 4
        return -(-self.group // self.ids_per_word)

    @property
    def device(self) -> torch.device:
        return self.words.device

    def nbytes(self) -> int:
        """Bytes the words take on their device."""
        return self.words.numel() * self.words.element_size()

    def to(self, device: torch.device | str) -> CompactTaskIds:
        return CompactTaskIds(self.words.to(device), self.bits, self.shape, self.group, self.max_task)


def _gemm_ids(task_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(ids [rows, K], group)``: the GEMM operand of ``task_ids`` and its group length."""
    if task_ids.dim() == 2:
        return task_ids, task_ids.shape[1]
    if task_ids.dim() == 4:
        return task_ids.permute(0, 2, 3, 1).reshape(task_ids.shape[0], -1), task_ids.shape[1]
    raise ValueError(f"expected 2-D linear or 4-D conv task ids, got shape {tuple(task_ids.shape)}")


def compact_task_ids(task_ids: torch.Tensor, max_task: int, bits: int | None = None) -> CompactTaskIds:
    """Pack uint8 ``task_ids`` (a linear ``[out, in]`` or conv ``[out, in/g, kh, kw]`` weight's) into the run-time
    layout on their device; ``bits`` defaults to :func:`bits_for` of ``max_task``.

    Raises:
        TypeError: ``task_ids`` not uint8.
        ValueError: ``bits`` not 2 or 4, ``max_task`` too large for ``bits``, or an id above ``max_task``.
    """
    if task_ids.dtype != torch.uint8:
        raise TypeError(f"compact_task_ids: task_ids must be torch.uint8, got {task_ids.dtype}")
    bits = bits_for(max_task) if bits is None else bits
    if bits not in (2, 4):
        raise ValueError(f"compact_task_ids: bits must be 2 or 4 (ids up to 3 or 15), got {bits}")
    if not 1 <= max_task < 1 << bits:
        raise ValueError(f"compact_task_ids: max_task {max_task} does not fit {bits}-bit ids (1..{(1 << bits) - 1})")
    ids, group = _gemm_ids(task_ids)
    if ids.numel() and int(ids.max()) > max_task:
        raise ValueError(f"compact_task_ids: an id is {int(ids.max())}, above max_task={max_task}")
    if task_ids.dim() == 2:
        return _fields(ids, bits, max_task)
    rows, columns = ids.shape
    groups = columns // group if group else 0
    per_word = 32 // bits
    group_words = -(-group // per_word)
    padded = ids.new_zeros(rows, groups, group_words * per_word)
    padded[:, :, :group] = ids.reshape(rows, groups, group)
    fields = padded.reshape(rows, groups * group_words, per_word).to(torch.int64)
    shifts = torch.arange(per_word, device=ids.device, dtype=torch.int64) * bits
    packed = (fields << shifts).sum(dim=-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    align = row_align_words(bits)
    # A conv's step reads whole words from its tap's first word on and may run past the tap's end into the next
    # tap's words (they meet weights loaded as 0): one whole step more keeps the last tap's within the row.
    spare = align if groups > 1 else 0
    row_words = -(-(max(groups * group_words, 1) + spare) // align) * align
    words = packed.new_zeros(rows, row_words)
    words[:, : groups * group_words] = packed
    return CompactTaskIds(words.contiguous(), bits, tuple(task_ids.shape), group, max_task)


def _fields(ids: torch.Tensor, bits: int, max_task: int) -> CompactTaskIds:
    """The fields layout (module docstring) of a linear layer's uint8 ids ``[out, in]``."""
    rows, columns = ids.shape
    field, per_byte = (1 << bits) - 1, 8 // bits
    row_columns = -(-max(columns, 1) // ROW_ALIGN_COLUMNS) * ROW_ALIGN_COLUMNS
    # (id - 1) mod 2**bits; the columns past the row's end are free (all ones).
    stored = torch.full((rows, row_columns), field, dtype=torch.int64, device=ids.device)
    stored[:, :columns] = (ids.to(torch.int64) + field) & field
    by_field = stored.reshape(rows, row_columns // CHUNK_COLUMNS, per_byte, field_span(bits))
    shifts = (torch.arange(per_byte, device=ids.device) * bits)[None, None, :, None]
    packed = (by_field << shifts).sum(dim=2).reshape(rows, -1).to(torch.uint8)
    return CompactTaskIds(packed.view(torch.int32).contiguous(), bits, tuple(ids.shape), columns, max_task)


def _unpack_fields(compact: CompactTaskIds) -> torch.Tensor:
    rows, columns = compact.shape
    field = (1 << compact.bits) - 1
    byte, shift = field_positions(torch.arange(columns, device=compact.device), compact.bits)
    stored = (compact.words.view(torch.uint8)[:, byte].to(torch.int64) >> shift) & field
    return ((stored + 1) & field).to(torch.uint8)


def owned_fields(fields: torch.Tensor, bits: int, task: int) -> torch.Tensor:
    """The fields layout's predicate (its spec): bool, True where a stored field ``(id - 1) mod 2**bits`` marks a
    weight owned by a task in ``1..task`` (a task above ``2**bits - 1`` sees every owner: it is clamped)."""
    return fields < min(task, (1 << bits) - 1)


def unpack_task_ids(compact: CompactTaskIds) -> torch.Tensor:
    """The uint8 ids of ``compact`` in their weight's shape: the inverse of :func:`compact_task_ids`."""
    if compact.fields:
        return _unpack_fields(compact)
    shape, group, per_word = compact.shape, compact.group, compact.ids_per_word
    rows = shape[0]
    columns = math.prod(shape[1:])
    groups = columns // group if group else 0
    words = compact.words[:, : groups * compact.group_words].to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * compact.bits
    fields = (words[:, :, None] >> shifts) & ((1 << compact.bits) - 1)
    ids = fields.reshape(rows, groups, -1)[:, :, :group].reshape(rows, columns).to(torch.uint8)
    if len(shape) == 2:
        return ids
    out, channels, kh, kw = shape
    return ids.reshape(out, kh, kw, channels).permute(0, 3, 1, 2).contiguous()


def owned_pair_masks(words: torch.Tensor, bits: int, task: int) -> torch.Tensor:
    """The decode's spec: int64 ``[..., 16 / bits]`` pair masks of int32 words ``[...]`` (see the module docstring),
    for ``task`` in ``1..2**bits - 1`` (a larger task sees every owner: clamp it first)."""
    per_word = 32 // bits
    values = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    ids = (values[..., None] >> shifts) & ((1 << bits) - 1)
    owned = (ids != 0) & (ids <= task)
    pairs = owned.reshape(*owned.shape[:-1], per_word // 2, 2).to(torch.int64)
    return pairs[..., 0] * 0xFFFF + pairs[..., 1] * 0xFFFF0000
