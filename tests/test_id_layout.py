"""The run-time id layout (packnet_kernels.id_layout) and the PTX that decodes it, checked on the CPU.

The decode's PTX runs here through a small emulator of the few instructions it uses, exhaustively: every id in
every field position against every task, so the text the GPU assembles is the text this file checks."""

from __future__ import annotations

import itertools
import re
import struct

import pytest
import torch

from packnet_kernels import _decode_asm
from packnet_kernels.id_layout import (
    bits_for,
    compact_task_ids,
    field_positions,
    owned_fields,
    owned_pair_masks,
    row_align_words,
    unpack_task_ids,
)
from packnet_kernels.reference import task_mask

MASK32 = 0xFFFFFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte ``selector[4i+2:4i]`` of ``{b, a}``, or with
    ``selector`` bit ``4i+3`` set that byte's top bit replicated."""
    source = (b << 32) | a
    result = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        result |= byte << (8 * i)
    return result


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    result = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        # LOP3's table: a = 0xF0, b = 0xCC, c = 0xAA, i.e. bit (4a + 2b + c) of lut.
        result |= ((lut >> index) & 1) << bit
    return result


def _set_lt_f16x2(a: int, b: int) -> int:
    """PTX set.lt.u32.f16x2: per 16-bit lane, ``0xFFFF`` where the fp16 number in ``a`` is below the one in ``b``
    (NaN compares false), else ``0``."""
    result = 0
    for lane in range(2):
        x, y = (struct.unpack("<e", ((value >> (16 * lane)) & 0xFFFF).to_bytes(2, "little"))[0] for value in (a, b))
        result |= (0xFFFF if x < y else 0) << (16 * lane)
    return result


def run_ptx(asm: str, operands: list[int], outputs: int) -> list[int]:
    """Execute the decode's PTX block on 32-bit values; ``operands`` are ``$outputs..``; returns ``$0..``."""
    registers = {f"${outputs + i}": value & MASK32 for i, value in enumerate(operands)}

    def value(token: str) -> int:
        token = token.strip()
        return int(token, 0) & MASK32 if token[0].isdigit() else registers[token]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, args = line.split(None, 1)
        dest, *sources = [arg.strip() for arg in args.split(",")]
        values = [value(source) for source in sources]
        if opcode == "and.b32":
            result = values[0] & values[1]
        elif opcode == "add.u32":
            result = (values[0] + values[1]) & MASK32
        elif opcode == "shl.b32":
            result = (values[0] << values[1]) & MASK32
        elif opcode == "shr.b32":
            result = values[0] >> values[1]
        elif opcode == "cvt.u32.u16":
            result = values[0] & 0xFFFF
        elif opcode == "lop3.b32":
            result = _lop3(*values)
        elif opcode == "prmt.b32":
            result = _prmt(*values)
        elif opcode == "mov.b32":
            result = values[0]
        elif opcode == "set.lt.u32.f16x2":
            result = _set_lt_f16x2(*values)
        else:
            raise AssertionError(f"the emulator does not know {opcode!r}")
        registers[dest] = result
    return [registers[f"${i}"] for i in range(outputs)]


@pytest.mark.parametrize("bits", [2, 4])
def test_the_decode_ptx_marks_exactly_the_owned_weights_for_every_id_and_task(bits):
    """Every id (0..2**bits - 1) at every field position, with random neighbours, for every task of the layout
    and tasks past it (clamped): the pair masks equal the reference predicate's."""
    ones, _, pairs = _decode_asm.FIELDS[bits]
    per_word = 32 // bits
    generator = torch.Generator().manual_seed(bits)
    words = []
    for position, id_value in itertools.product(range(per_word), range(1 << bits)):
        for _ in range(3):
            fields = torch.randint(0, 1 << bits, (per_word,), generator=generator).tolist()
            fields[position] = id_value
            words.append(sum(field << (bits * index) for index, field in enumerate(fields)))
    words.append(0)
    words.append(MASK32)
    word_tensor = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
    for task in range(1, (1 << bits) + 3):
        c_low, c = _decode_asm.decode_constants(bits, task)
        got = [run_ptx(_decode_asm.DECODE_ASM[bits], [word, c_low, c], pairs) for word in words]
        expected = owned_pair_masks(word_tensor, bits, min(task, (1 << bits) - 1))
        assert torch.equal(torch.tensor(got, dtype=torch.int64), expected), f"task {task}"
    # The spec itself against the reference predicate, field by field.
    ids = (word_tensor.to(torch.int64)[:, None] & MASK32) >> (torch.arange(per_word) * bits) & ((1 << bits) - 1)
    for task in range(1, 1 << bits):
        owned = task_mask(ids, task).reshape(len(words), pairs, 2).to(torch.int64)
        expected = owned[..., 0] * 0xFFFF + owned[..., 1] * 0xFFFF0000
        assert torch.equal(owned_pair_masks(word_tensor, bits, task), expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_fields_ptx_for_a_run_time_task_keeps_exactly_the_owned_weights(bits):
    """The mixed kernels' decode (``field_keep_asm``, the task and the field's shift given at run time): for every
    byte value at each of a word's 4 positions (the others random), every field, every task of the layout and one past
    it (clamped), the pair masks are 0xFFFF exactly in the lanes whose field is owned (``owned_fields``)."""
    generator = torch.Generator().manual_seed(10 + bits)
    field_max = (1 << bits) - 1
    words = []
    for position, value in itertools.product(range(4), range(256)):
        others = torch.randint(0, 256, (4,), generator=generator).tolist()
        others[position] = value
        words.append(sum(byte << (8 * index) for index, byte in enumerate(others)))
    for field in range(8 // bits):
        for task in range(1, field_max + 2):
            constant = (127 - field_max + min(task, field_max)) * 0x01010101
            for word in words:
                masks = run_ptx(_decode_asm.FIELD_KEEP_ASM[bits], [word, bits * field, constant], 2)
                for byte in range(4):
                    stored = (word >> (8 * byte + bits * field)) & field_max
                    owned = bool(owned_fields(torch.tensor(stored), bits, task))
                    lane = (masks[byte // 2] >> (16 * (byte % 2))) & 0xFFFF
                    assert lane == (0xFFFF if owned else 0), (field, task, hex(word), byte)


def test_bits_follow_the_largest_task():
    assert [bits_for(t) for t in (1, 3, 4, 15, 16, 255)] == [2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 64), (2, 65), (4, 3, 3, 3), (2, 24, 1, 1), (3, 5, 2, 2)])
@pytest.mark.parametrize("max_task", [1, 3, 5, 15])
def test_compact_ids_round_trip_and_align_their_rows(shape, max_task):
    ids = torch.randint(0, max_task + 1, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    compact = compact_task_ids(ids, max_task)
    assert compact.bits == bits_for(max_task) and compact.words.dtype == torch.int32
    assert compact.words.shape[1] % row_align_words(compact.bits) == 0 and compact.words.is_contiguous()
    assert torch.equal(unpack_task_ids(compact), ids)
    rows = ids if ids.dim() == 2 else ids.permute(0, 2, 3, 1).reshape(shape[0], -1)
    bits, group, per_word = compact.bits, compact.group, 32 // compact.bits
    field = (1 << bits) - 1
    for row, column in [(0, 0), (shape[0] - 1, rows.shape[1] - 1), (0, rows.shape[1] // 2)]:
        if compact.fields:
            # Column 128 c + S q + j (S = 16 bits): byte S c + j, field q, stored as (id - 1) mod 2**bits.
            span = 16 * bits
            chunk, rest = divmod(column, 128)
            byte = int(compact.words.view(torch.uint8)[row, chunk * span + rest % span])
            assert (byte >> (bits * (rest // span))) & field == (int(rows[row, column]) - 1) % (1 << bits)
        else:
            # Column j of a group sits in word j // (32 / bits) of its group, at bits b * (j % (32 / bits)).
            tap, j = divmod(column, group)
            word = int(compact.words[row, tap * compact.group_words + j // per_word]) & MASK32
            assert (word >> (bits * (j % per_word))) & field == rows[row, column]
    if compact.fields:
        # Every column past the row's end is free in every byte of the padding.
        stored = compact.words.view(torch.uint8).to(torch.int64)
        _, columns = shape
        byte, shift = field_positions(torch.arange(columns), bits)
        covered = torch.zeros(stored.shape[1], dtype=torch.int64)
        for at, bit in zip(byte.tolist(), shift.tolist(), strict=True):
            covered[at] |= field << bit
        assert torch.equal(stored | covered, torch.full_like(stored, 0xFF))


def test_the_fields_predicate_is_the_reference_one_for_every_id_and_task():
    for bits in (2, 4):
        ids = torch.arange(1 << bits)
        stored = (ids + (1 << bits) - 1) % (1 << bits)
        for task in range(1, (1 << bits) + 3):
            assert torch.equal(owned_fields(stored, bits, task), task_mask(ids, task)), (bits, task)


@pytest.mark.parametrize("bits", [2, 4])
def test_the_fields_ptx_keeps_exactly_the_weights_the_task_owns(bits):
    """Every byte value in either byte of the pair (the other random), every field and task of the layout, weight
    pairs that hold NaN, Inf and random bits: each 16-bit lane comes out as its weight's bits where the field is
    owned (``owned_fields``) and as +0.0 (all zeros) where it is not."""
    generator = torch.Generator().manual_seed(bits)
    pairs = [(byte, int(other)) for byte in range(256) for other in torch.randint(0, 256, (2,), generator=generator)]
    pairs += [(other, byte) for byte, other in pairs]
    # NaN beside -Inf, a NaN with every bit set beside +Inf, then random bits.
    weights = [0x7E00FC00, 0xFFFF7C00]
    weights += [int(w) & MASK32 for w in torch.randint(-(2**31), 2**31, (6,), generator=generator)]
    for field in range(8 // bits):
        for task in range(1, 1 << bits):
            asm = _decode_asm.FIELD_SELECT_ASM[bits][field][task]
            for index, (low, high) in enumerate(pairs):
                weight = weights[index % len(weights)]
                (kept,) = run_ptx(asm, [weight, low | high << 8], 1)
                for lane, byte in enumerate((low, high)):
                    stored = (byte >> (bits * field)) & ((1 << bits) - 1)
                    owned = bool(owned_fields(torch.tensor(stored), bits, task))
                    expected = (weight >> (16 * lane)) & 0xFFFF if owned else 0
                    assert (kept >> (16 * lane)) & 0xFFFF == expected, (field, task, low, high, lane)


def test_compact_ids_refuse_what_does_not_fit():
    ids = torch.tensor([[0, 4]], dtype=torch.uint8)
    with pytest.raises(ValueError, match="an id is 4, above max_task=3"):
        compact_task_ids(ids, 3)
    with pytest.raises(ValueError, match="max_task 16 does not fit 4-bit ids"):
        compact_task_ids(ids, 16, bits=4)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        compact_task_ids(ids, 3, bits=8)
    with pytest.raises(TypeError, match="must be torch.uint8"):
        compact_task_ids(ids.to(torch.int32), 3)


def test_the_asm_text_uses_only_what_the_emulator_knows():
    texts = [*_decode_asm.DECODE_ASM.values()]
    texts += [asm for table in _decode_asm.FIELD_SELECT_ASM.values() for asm in itertools.chain.from_iterable(table)]
    texts += list(_decode_asm.FIELD_KEEP_ASM.values())
    for asm in texts:
        opcodes = {line.split()[0] for line in asm.splitlines() if re.match(r"\s*[a-z]", line) and ".reg" not in line}
        known = {"and.b32", "add.u32", "shl.b32", "shr.b32", "cvt.u32.u16", "lop3.b32", "prmt.b32", "mov.b32",
                 "set.lt.u32.f16x2"}  # fmt: skip
        assert opcodes <= known, opcodes - known


# ---------------------------------------------------------------------------------------------------------------- #
# The kernels on compact ids: bit for bit what they give on the uint8 ids (same tiles, same accumulation order).

linear_kernel = pytest.importorskip("packnet_kernels.linear")

# (M, N, K, tasks): both regimes, tails, a split-K with a ragged last split, an odd K (no pairs: per-weight masks).
KERNEL_CASES = [(1, 31, 200, 3), (7, 33, 129, 15), (16, 32, 64, 2), (17, 31, 96, 5), (40, 64, 130, 3), (3, 5, 6, 1)]


def _layer(m, n, k, tasks, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype=dtype, device=device)
    ids = torch.randint(0, tasks + 1, (n, k), generator=generator, dtype=torch.uint8).to(device)
    weight = torch.randn(n, k, generator=generator).to(dtype=dtype, device=device)
    return x, torch.where(ids == 0, torch.zeros((), dtype=dtype, device=device), weight), ids


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_the_linear_kernel_on_compact_ids_equals_it_on_bytes(case, dtype, kernel_device):
    m, n, k, tasks = case
    x, weight, ids = _layer(m, n, k, tasks, dtype, kernel_device)
    compact = compact_task_ids(ids, tasks)
    bias = torch.randn(n).to(dtype=dtype, device=kernel_device)
    for task in sorted({1, tasks // 2 + 1, tasks, min(tasks + 1, 255)}):
        expected = linear_kernel.masked_linear_triton(x, weight, ids, task, bias, relu=True)
        assert torch.equal(linear_kernel.masked_linear_triton(x, weight, compact, task, bias, relu=True), expected)
    rows = torch.randint(1, tasks + 1, (m,), generator=torch.Generator().manual_seed(1)).to(kernel_device)
    table = torch.randn(tasks, n).to(dtype=dtype, device=kernel_device)
    expected = linear_kernel.masked_linear_triton(x, weight, ids, rows, table)
    assert torch.equal(linear_kernel.masked_linear_triton(x, weight, compact, rows, table), expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("bits", [2, 4])
def test_a_weight_the_task_does_not_own_never_reaches_it_on_compact_ids(bits, kernel_device):
    """The single-task loop on compact ids (the task compiled in) drops a NaN or Inf stored in a weight of a later
    task or a free one, as the reference does: every output of task 1 is finite."""
    tasks = 3 if bits == 2 else 15
    x, weight, ids = _layer(5, 33, 200, tasks, torch.float16, kernel_device, seed=3)
    weight = torch.where(ids > 1, torch.full_like(weight, float("nan")), weight)
    weight[0, 0], ids[0, 0] = float("inf"), 0
    compact = compact_task_ids(ids, tasks)
    plan = linear_kernel.linear_plan(x, weight, compact.words, None, None, None, False, True, None, False, None, bits)
    assert plan.compiled_task(1) == 1  # the loop that takes the task as a constant
    y = linear_kernel.masked_linear_triton(x, weight, compact, 1)
    assert torch.isfinite(y).all()
    assert torch.equal(y, linear_kernel.masked_linear_triton(x, weight, ids, 1))


def test_the_plan_compiles_the_task_in_only_where_the_fields_loop_applies():
    """One task on compact ids, 16-bit operands, splits on whole chunks: the task (clamped to the largest field) is a
    constant of the kernel and the configs are the fields family's; uint8 ids, fp32, mixed batches and a split of K
    off the chunks take the task at run time."""
    x = torch.empty(3, 256, dtype=torch.float16)
    weight = torch.empty(40, 256, dtype=torch.float16)
    ids = torch.zeros(40, 256, dtype=torch.uint8)
    words = compact_task_ids(ids, 5).words

    def plan(x=x, weight=weight, ids=words, bits=4, tasks=None):
        return linear_kernel.linear_plan(x, weight, ids, None, None, None, False, True, None, False, tasks, bits)

    fields = plan()
    assert (fields.field_task, fields.compiled_task(3), fields.compiled_task(40)) == (15, 3, 15)
    assert fields.family.endswith("-fields4")
    assert plan(bits=2).compiled_task(7) == 3
    assert plan(ids=ids, bits=8).compiled_task(3) == 0
    assert plan(x=x.float(), weight=weight.float()).compiled_task(3) == 0
    assert plan(tasks=torch.ones(3, dtype=torch.int64)).compiled_task(0) == 0
    # The interpreter splits K = 200 at 32-column multiples (here 96): not on the 128-column chunks.
    odd = torch.empty(1, 200, dtype=torch.float16), torch.empty(31, 200, dtype=torch.float16)
    split = plan(*odd, ids=compact_task_ids(torch.zeros(31, 200, dtype=torch.uint8), 5).words)
    assert split.split_k > 1 and split.compiled_task(3) == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("free_weights_zero", [False, True])
def test_compact_ids_follow_the_tile_map(free_weights_zero, kernel_device):
    """Block-structured ownership (whole 32 x 32 cells per task): skipped tiles, raw tiles and checked tiles on compact
    ids give the uint8 path's results, and NaN stored in weights task 1 does not own never reaches it."""
    from packnet_kernels import tile_map

    n, k = 64, 128
    ids = torch.zeros(n, k, dtype=torch.uint8)
    for row, column in itertools.product(range(2), range(4)):
        ids[32 * row : 32 * row + 32, 32 * column : 32 * column + 32] = (row + column) % 4
    ids[5, 70] = 2  # one checked cell
    ids = ids.to(kernel_device)
    generator = torch.Generator().manual_seed(3)
    weight = torch.where(ids == 0, 0.0, torch.randn(n, k, generator=generator).to(kernel_device)).half()
    weight = torch.where(ids > 1, torch.tensor(float("nan"), device=kernel_device).half(), weight)
    x = torch.randn(4, k, generator=generator).to(kernel_device).half()
    cells = tile_map(ids).contiguous()
    compact = compact_task_ids(ids, 3)
    args = {"tile_map": cells, "free_weights_zero": free_weights_zero}
    y = linear_kernel.masked_linear_triton(x, weight, compact, 1, **args)
    assert not y.isnan().any()
    assert torch.equal(y, linear_kernel.masked_linear_triton(x, weight, ids, 1, **args))


@pytest.mark.interpreter
def test_a_packed_linear_reads_compact_ids_where_it_holds_them(monkeypatch, kernel_device):
    """A PackedLinear that holds compact ids (on a GPU; forced here on the CPU) keeps its uint8 ids on the host,
    gives the kernel's outputs on those uint8 ids bit for bit, and derives its compact ids again after an in-place
    write to them."""
    import packnet

    x, weight, ids = _layer(9, 33, 256, 3, torch.float16, kernel_device)
    monkeypatch.setattr(packnet.PackedLinear, "uses_compact_ids", lambda self: True)
    layer = packnet.PackedLinear(256, 33, 3, bias=False, backend="triton", device=kernel_device, dtype=torch.float16)
    layer.load_packed(weight, ids)
    assert layer.task_ids.device.type == "cpu"
    # 2 bits per weight on the device (256 columns: 16 words a row), the bytes on the host.
    assert layer.device_id_bytes() == layer.kernel_ids(x).nbytes() == 33 * 256 // 4

    def expected(task):
        return linear_kernel.masked_linear_triton(x, layer.weight, layer.task_ids.to(kernel_device), task)

    tasks = torch.tensor([1, 3, 2, 2, 1, 3, 1, 2, 3], device=kernel_device)
    for task in (1, 2, 3, tasks):
        assert torch.equal(layer(x, task=task), expected(task))
    with torch.no_grad():
        layer.task_ids[:, :128] = 3
    assert torch.equal(layer(x, task=2), expected(2))
    layer.use_tile_map = False  # the map alone would skip the written columns: check the ids themselves
    with torch.no_grad():
        layer.task_ids[:, :128] = 1
    assert torch.equal(layer(x, task=2), expected(2))


conv_kernel = pytest.importorskip("packnet_kernels.conv2d")

# (images, in, out, kernel, size, groups, tasks): the tap-by-tap GEMM loop on compact ids (16, 48, 64 channels per
# group; 64 also with the tile map), and convs whose kernels read bytes (8 channels; depthwise), given compact ids.
CONV_CASES = [(2, 16, 24, 3, 5, 1, 3), (1, 48, 16, 1, 4, 1, 15), (3, 32, 32, 3, 4, 2, 5), (2, 64, 32, 3, 3, 1, 3)]
CONV_FALLBACK_CASES = [(2, 8, 8, 3, 4, 1, 3), (2, 16, 16, 3, 4, 16, 3)]


def _conv_layer(images, cin, cout, kernel, size, groups, tasks, dtype, device):
    generator = torch.Generator().manual_seed(cin + kernel)
    layout = torch.channels_last
    x = torch.randn(images, cin, size, size, generator=generator).to(dtype=dtype, device=device)
    ids = torch.randint(0, tasks + 1, (cout, cin // groups, kernel, kernel), generator=generator, dtype=torch.uint8)
    weight = torch.where(ids == 0, 0.0, torch.randn(ids.shape, generator=generator)).to(dtype)
    return (
        x.contiguous(memory_format=layout),
        weight.to(device).contiguous(memory_format=layout),
        ids.to(device).contiguous(memory_format=layout),
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES + CONV_FALLBACK_CASES)
def test_the_conv_kernel_on_compact_ids_equals_it_on_bytes(case, dtype, kernel_device):
    from packnet_kernels import tile_map

    images, cin, cout, kernel, size, groups, tasks = case
    x, weight, ids = _conv_layer(*case, dtype, kernel_device)
    compact = compact_task_ids(ids, tasks)
    geometry = (1, kernel // 2, 1, groups)
    for task in (1, tasks):
        expected = conv_kernel.masked_conv2d_triton(x, weight, ids, task, None, *geometry)
        assert torch.equal(conv_kernel.masked_conv2d_triton(x, weight, compact, task, None, *geometry), expected)
    if cin // groups % 32 == 0:
        cells = {"tile_map": tile_map(ids).contiguous(), "free_weights_zero": True}
        expected = conv_kernel.masked_conv2d_triton(x, weight, ids, 2, None, *geometry, **cells)
        assert torch.equal(conv_kernel.masked_conv2d_triton(x, weight, compact, 2, None, *geometry, **cells), expected)
    image_tasks = torch.randint(1, tasks + 1, (images,), generator=torch.Generator().manual_seed(2)).to(kernel_device)
    expected = conv_kernel.masked_conv2d_triton(x, weight, ids, image_tasks, None, *geometry)
    assert torch.equal(conv_kernel.masked_conv2d_triton(x, weight, compact, image_tasks, None, *geometry), expected)


def test_convs_hold_compact_ids_where_their_kernel_reads_them():
    import packnet

    assert packnet.PackedConv2d.COMPACT_IDS and packnet.PackedLinear.COMPACT_IDS
    for cin, cout, groups, reads in ((16, 24, 1, True), (8, 8, 1, False), (16, 16, 16, False), (32, 32, 2, True)):
        assert conv_kernel.compact_ids_apply(cin // groups, cout // groups, groups) == reads


def test_the_reference_backend_takes_compact_ids_too():
    """The ops' contract: compact ids are the same ids in another layout, whatever the backend."""
    from packnet_kernels import masked_conv2d, masked_linear

    x, weight, ids = _layer(3, 7, 40, 5, torch.float32, "cpu")
    compact = compact_task_ids(ids, 5)
    assert torch.equal(masked_linear(x, weight, compact, 3, backend="reference"), masked_linear(x, weight, ids, 3))
    x, weight, ids = _conv_layer(2, 16, 8, 3, 4, 1, 3, torch.float32, "cpu")
    compact = compact_task_ids(ids, 3)
    expected = masked_conv2d(x, weight, ids, 2, None, 1, 1, backend="reference")
    assert torch.equal(masked_conv2d(x, weight, compact, 2, None, 1, 1, backend="reference"), expected)


@pytest.mark.interpreter
def test_the_registered_ops_take_compact_ids(kernel_device):
    """torch.compile and CUDA graphs go through the registered ops: their schema, fake kernels and results with compact
    ids (``id_bits`` 2 or 4, ``task_ids`` the words)."""
    x, weight, ids = _layer(5, 33, 64, 3, torch.float16, kernel_device)
    compact = compact_task_ids(ids, 3)
    args = (x, weight, compact.words, 2, None, None, None, False, True, None, False, None, compact.bits)
    assert set(torch.library.opcheck(torch.ops.packnet.masked_linear.default, args).values()) == {"SUCCESS"}
    assert torch.equal(torch.ops.packnet.masked_linear(*args), linear_kernel.masked_linear_triton(x, weight, ids, 2))
    x, weight, ids = _conv_layer(2, 16, 8, 3, 4, 1, 3, torch.float16, kernel_device)
    compact = compact_task_ids(ids, 3)
    args = (x, weight, compact.words, 2, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, True, None, False)
    args += (None, compact.bits)
    assert set(torch.library.opcheck(torch.ops.packnet.masked_conv2d.default, args).values()) == {"SUCCESS"}
    expected = conv_kernel.masked_conv2d_triton(x, weight, ids, 2, None, 1, 1)
    assert torch.equal(torch.ops.packnet.masked_conv2d(*args), expected)
