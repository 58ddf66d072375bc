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
# The fields layout (``id_layout``, linear layers): one byte holds field ``q`` of ``8 / bits`` columns 64 apart.


def field_drop_asm(bits: int, field: int, task: int) -> str:
    """PTX of the fields layout's predicate for one pair of 16-bit weights, with ``task`` (1..``2**bits - 1``) built
    in.

    Operand ``$1`` holds two bytes of the layout, the ids of the pair's two weights; the output ``$0`` their drop
    masks, two 16-bit lanes, all ones where field ``field`` of the lane's byte is ``>= task`` (a weight ``task`` does
    not own: the stored field is ``(id - 1) mod 2**bits``). After the shift and mask each byte holds its field ``f <=
    15``, and ``f + 128 - task`` (no carry out of the byte) has its top bit set exactly where ``f >= task``; ``prmt``
    in sign mode copies that bit over the byte's lane: 4 or 5 instructions per pair, the weights' AND-NOT one more.
    """
    field_mask = ((1 << bits) - 1) * 0x0101
    lines = ["{", ".reg .b32 x;", "cvt.u32.u16 x, $1;"]
    if field:
        lines.append(f"shr.b32 x, x, {bits * field};")
    lines += [f"and.b32 x, x, 0x{field_mask:04X};", f"add.u32 x, x, 0x{(128 - task) * 0x0101:04X};"]
    lines += ["prmt.b32 $0, x, 0, 0x9988;", "}"]
    return "\n".join(lines)


# FIELD_DROP_ASM[bits][field][task]: task 0 (no task) is never used.
FIELD_DROP_ASM = {
    bits: tuple(
        tuple(field_drop_asm(bits, field, max(task, 1)) for task in range(1 << bits)) for field in range(8 // bits)
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
