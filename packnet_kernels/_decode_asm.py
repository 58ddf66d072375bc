"""PTX of the word-parallel id decode (no Triton import: the tests run this very text through a small emulator).

Each block reads one int32 word of packed ids (``packnet_kernels.id_layout``) and two per-task constants and writes
one int32 mask per pair of 16-bit weights: ``0xFFFF`` in a half whose weight is owned by a task in ``1..task``.

Operands: the outputs ``$0..$(P-1)`` (``P`` pairs per word), then the word, ``c_low`` and ``c``, where ``c`` is
``(2**bits - 1 - task)`` in every field and ``c_low`` is ``c`` with each field's top bit cleared. With ``x`` the word
and ``l`` its fields' low bits, ``s = l + c_low`` puts the carry into each field's top bit there (no field
overflows), so ``maj(x, c, s)`` is the carry out of ``x + c``: set exactly where ``id > task``. ``l + low`` sets a
field's top bit where its low bits are not all zero, so ``(l + low) | x`` marks ``id != 0``. Both land on each
field's top bit; shifting copies puts every field's flag on bit 7 of its byte, where ``prmt`` in sign mode
replicates it over the bytes of a 16-bit half: 5 logic/add, a few shifts and one ``prmt`` per pair.
"""

from __future__ import annotations

# bits -> (pattern with every field = 1, the fields' low bits, pairs per word)
FIELDS = {4: (0x11111111, 0x77777777, 4), 2: (0x55555555, 0x55555555, 8)}

_PREDICATE = """and.b32 l, {word}, {low};
add.u32 s, l, {c_low};
add.u32 z, l, {low};
lop3.b32 g, {word}, {c}, s, 0xE8;
lop3.b32 o, z, {word}, g, 0x54;
"""

# 4-bit: field 2p (even) has its flag on bit 3 of byte p, field 2p + 1 on bit 7; e = o << 4 moves the even ones up.
NIBBLE_ASM = (
    "{\n.reg .b32 l, s, z, g, o, e;\n"
    + _PREDICATE.format(word="$4", low="0x77777777", c_low="$5", c="$6")
    + "shl.b32 e, o, 4;\n"
    + "".join(f"prmt.b32 ${pair}, e, o, 0x{0xCC88 + 0x1111 * pair:X};\n" for pair in range(4))
    + "}"
)

# 2-bit: field 4B + r has its flag on bit 2r + 1 of byte B; o << (6 - 2r) moves it to bit 7.
CRUMB_ASM = (
    "{\n.reg .b32 l, s, z, g, o, e6, e4, e2;\n"
    + _PREDICATE.format(word="$8", low="0x55555555", c_low="$9", c="$10")
    + "shl.b32 e6, o, 6;\nshl.b32 e4, o, 4;\nshl.b32 e2, o, 2;\n"
    + "".join(
        f"prmt.b32 ${pair}, {'e6, e4' if pair % 2 == 0 else 'e2, o'}, 0x{0xCC88 + 0x1111 * (pair // 2):X};\n"
        for pair in range(8)
    )
    + "}"
)

DECODE_ASM = {4: NIBBLE_ASM, 2: CRUMB_ASM}


def decode_constants(bits: int, task: int) -> tuple[int, int]:
    """``(c_low, c)`` of the asm for ``task`` (clamped to ``2**bits - 1``), as unsigned 32-bit values."""
    ones, low, _ = FIELDS[bits]
    field = (1 << bits) - 1
    c = ((field - min(task, field)) * ones) & 0xFFFFFFFF
    return c & low, c


# ---------------------------------------------------------------------------------------------------------------- #
# The fields layout (``id_layout``, linear layers): one byte holds field ``q`` of ``8 / bits`` columns ``16 * bits``
# apart.


def field_select_asm(bits: int, field: int, task: int) -> str:
    """PTX of the fields layout's predicate and select for one pair of 16-bit weights, with ``task`` (1..``2**bits -
    1``) built in: ``$0`` is the pair ``$1`` with the weights ``task`` does not own set to +0.0, from field ``field``
    of the two bytes in ``$2`` (the stored field is ``(id - 1) mod 2**bits``: owned where it is below ``task``).

    ``prmt`` puts each byte ``b`` under ``0x64`` in its 16-bit lane: the fp16 number ``1024 + b``, exact. Clearing
    the fields above ``field`` leaves ``1024 + f * 2**(bits * field) + (the bits below)``, which is below ``1024 +
    task * 2**(bits * field)`` exactly where ``f < task``; ``set.lt.u32.f16x2`` writes ``0xFFFF`` in those lanes
    and ``0`` in the others, and an ``and`` keeps the owned weights' bits (a NaN/Inf elsewhere is dropped). The
    ``prmt`` is the same text for every field of the bytes, so ptxas computes it once per pair of bytes: per pair of
    weights one ``and`` where a field lies below the top one, one ``set`` (the FMA pipe's ``HSET2``, not the integer
    ALU's) and one ``and``.
    """
    top = field == 8 // bits - 1
    below = (1 << (bits * (field + 1))) - 1
    bound = 0x6400 | (task << (bits * field))
    lines = ["{", ".reg .b32 x, v, m, k;", "cvt.u32.u16 x, $2;", "prmt.b32 v, x, 0x64646464, 0x4140;"]
    if not top:
        lines.append(f"and.b32 v, v, 0x{0xFF00 | below:04X}{0xFF00 | below:04X};")
    lines += [f"mov.b32 k, 0x{bound:04X}{bound:04X};", "set.lt.u32.f16x2 m, v, k;", "and.b32 $0, $1, m;", "}"]
    return "\n".join(lines)


# FIELD_SELECT_ASM[bits][field][task]: task 0 (no task) is never used.
FIELD_SELECT_ASM = {
    bits: tuple(
        tuple(field_select_asm(bits, field, max(task, 1)) for task in range(1 << bits)) for field in range(8 // bits)
    )
    for bits in (2, 4)
}


def field_keep_asm(bits: int) -> str:
    """PTX of the fields layout's predicate for a word of 4 ids of one field and a task given at run time (the
    mixed-task kernels, whose tasks are not constants): pair masks ``$0`` (the word's bytes 0 and 1) and ``$1``
    (bytes 2 and 3), ``0xFFFF`` in a 16-bit lane whose weight is owned.

    Operands: ``$2`` the word, ``$3`` the field's shift (``bits * q``), ``$4`` ``127 - (2**bits - 1) + task`` in
    every byte (the task clamped to ``2**bits - 1``). With ``f`` a byte's field, ``lop3`` gives ``2**bits - 1 - f``
    and the add ``127 - f + task`` (113..142: no carry out of the byte), whose top bit is set exactly where ``f <
    task``; ``prmt`` in sign mode copies it over the byte's lane: 5 instructions per 4 weights.
    """
    field_mask = ((1 << bits) - 1) * 0x01010101
    return "\n".join([
        "{", ".reg .b32 x;", "shr.b32 x, $2, $3;", f"lop3.b32 x, x, 0x{field_mask:08X}, 0, 0x0C;", "add.u32 x, x, $4;",
        "prmt.b32 $0, x, 0, 0x9988;", "prmt.b32 $1, x, 0, 0xBBAA;", "}",
    ])  # fmt: skip


FIELD_KEEP_ASM = {bits: field_keep_asm(bits) for bits in (2, 4)}
