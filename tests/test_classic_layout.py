"""MIFARE Classic memory codecs checked against the NXP MF1S50yyX / MF1S70yyX data sheets."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.core import classic_layout as cl
from firmware.core.classic_layout import (
    AccessConditions,
    BlockRole,
    CardType,
    KeyType,
    Operation,
    SectorTrailer,
    TrailerField,
)
from firmware.core.errors import AccessBitsError, CodecError, CoreError, ValueBlockError

K1, K4 = CardType.CLASSIC_1K, CardType.CLASSIC_4K
A, B = KeyType.A, KeyType.B
READ, WRITE = Operation.READ, Operation.WRITE
INC, DEC = Operation.INCREMENT, Operation.DECREMENT
TRANSFER, RESTORE = Operation.TRANSFER, Operation.RESTORE
ALL_CONDS = range(8)

int32 = st.integers(-(1 << 31), (1 << 31) - 1)
addrs = st.integers(0, 255)
conds = st.integers(0, 7)
keys = st.binary(min_size=6, max_size=6)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def test_card_type_sizes() -> None:
    assert (K1.sectors, K1.blocks, K1.size_bytes) == (16, 64, 1024)
    assert (K4.sectors, K4.blocks, K4.size_bytes) == (40, 256, 4096)


@pytest.mark.parametrize("card", [K1, K4])
def test_every_block_round_trips_through_its_sector(card: CardType) -> None:
    for block in range(card.blocks):
        sector = cl.sector_of(block, card)
        blocks = cl.sector_blocks(sector, card)
        assert block in blocks
        assert cl.first_block(sector, card) == blocks[0] <= block <= blocks[-1]
        assert cl.trailer_block(sector, card) == blocks[-1]
        assert cl.is_trailer(block, card) == (block == blocks[-1])
        assert cl.is_manufacturer_block(block, card) == (block == 0)


@pytest.mark.parametrize("card", [K1, K4])
def test_sectors_tile_the_memory_in_order(card: CardType) -> None:
    tiled = [b for s in range(card.sectors) for b in cl.sector_blocks(s, card)]
    assert tiled == list(range(card.blocks))
    assert sum(cl.is_trailer(b, card) for b in range(card.blocks)) == card.sectors


def test_sector_sizes_from_the_data_sheets() -> None:
    assert [cl.blocks_in_sector(s, K1) for s in range(16)] == [4] * 16
    assert [cl.blocks_in_sector(s, K4) for s in range(40)] == [4] * 32 + [16] * 8
    assert (cl.first_block(15, K1), cl.trailer_block(15, K1)) == (60, 63)
    assert (cl.first_block(31, K4), cl.trailer_block(31, K4)) == (124, 127)
    assert (cl.first_block(32, K4), cl.trailer_block(32, K4)) == (128, 143)
    assert (cl.first_block(39, K4), cl.trailer_block(39, K4)) == (240, 255)
    assert cl.sector_of(3, K1) == 0 and cl.sector_of(4, K1) == 1
    assert cl.sector_of(143, K4) == 32 and cl.sector_of(144, K4) == 33
    # The low 2K of a 4K is laid out exactly like a 1K.
    for block in range(64):
        assert cl.sector_of(block, K1) == cl.sector_of(block, K4)


def test_access_groups_small_and_large_sectors() -> None:
    for card in (K1, K4):
        assert [cl.access_group(b, card) for b in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    groups = [cl.access_group(b, K4) for b in range(240, 256)]
    assert groups == [0] * 5 + [1] * 5 + [2] * 5 + [3]


def test_card_type_from_size_and_identification() -> None:
    assert CardType.from_size(1024) is K1 and CardType.from_size(4096) is K4
    for bad in (0, 64, 2048, "1024"):
        with pytest.raises(CodecError):
            CardType.from_size(bad)
    assert (K1.sak, K1.atqa(4), K1.atqa(7)) == (0x08, 0x0004, 0x0044)
    assert (K4.sak, K4.atqa(4), K4.atqa(7)) == (0x18, 0x0002, 0x0042)
    with pytest.raises(CodecError):
        K1.atqa(10)


@pytest.mark.parametrize(
    ("card", "uid", "block0"),
    [
        # 4-byte NUID, BCC (9C^59^9B^32 = 6C), SAK, ATQA least significant byte first
        (K1, "9C599B32", "9C599B32 6C 08 0400"),
        (K4, "9C599B32", "9C599B32 6C 18 0200"),
        (K1, "045F217A3C5880", "045F217A3C5880 08 4400"),
        (K4, "045F217A3C5880", "045F217A3C5880 18 4200"),
    ],
)
def test_factory_memory(card: CardType, uid: str, block0: str) -> None:
    memory = cl.factory_memory(bytes.fromhex(uid), card)
    assert isinstance(memory, bytearray) and len(memory) == card.size_bytes
    expected0 = bytes.fromhex(block0).ljust(16, b"\0")
    assert memory[:16] == expected0
    for block in range(1, card.blocks):
        raw = bytes(memory[16 * block : 16 * block + 16])
        if cl.is_trailer(block, card):
            assert SectorTrailer.from_bytes(raw) == cl.TRANSPORT_TRAILER
        else:
            assert raw == bytes(16)


@pytest.mark.parametrize("uid", [b"", bytes(5), bytes(10), "9C599B32"])
def test_factory_memory_rejects_bad_uids(uid) -> None:
    with pytest.raises(CodecError):
        cl.factory_memory(uid, K1)


@pytest.mark.parametrize(
    ("func", "arg", "card"),
    [
        (cl.sector_of, 64, K1),
        (cl.sector_of, 256, K4),
        (cl.sector_of, -1, K4),
        (cl.sector_of, True, K4),
        (cl.sector_of, 1.0, K4),
        (cl.sector_of, "1", K4),
        (cl.first_block, 16, K1),
        (cl.first_block, 40, K4),
        (cl.trailer_block, -1, K1),
        (cl.blocks_in_sector, 40, K4),
        (cl.sector_blocks, 16, K1),
        (cl.is_trailer, 64, K1),
        (cl.is_manufacturer_block, 256, K4),
        (cl.access_group, 64, K1),
        (cl.sector_of, 0, "1k"),
    ],
)
def test_out_of_range_geometry_raises_codec_error(func, arg, card) -> None:
    with pytest.raises(CodecError):
        func(arg, card)


# --------------------------------------------------------------------------------------------
# Value blocks
# --------------------------------------------------------------------------------------------

# The data sheets' Table "Value block format example": 1234567 at address 17.
DATASHEET_VALUE_BLOCK = bytes.fromhex("87D61200 7829EDFF 87D61200 11EE11EE")


def test_value_block_datasheet_example() -> None:
    assert cl.encode_value_block(1234567, 17) == DATASHEET_VALUE_BLOCK
    assert cl.decode_value_block(DATASHEET_VALUE_BLOCK) == (1234567, 17)
    assert cl.is_value_block(DATASHEET_VALUE_BLOCK)


@pytest.mark.parametrize(
    ("value", "addr", "hexed"),
    [
        (100, 0, "64000000 9BFFFFFF 64000000 00FF00FF"),  # reader manuals' example
        (100, 5, "64000000 9BFFFFFF 64000000 05FA05FA"),
        (0, 0, "00000000 FFFFFFFF 00000000 00FF00FF"),
        (-1, 255, "FFFFFFFF 00000000 FFFFFFFF FF00FF00"),
        (-(1 << 31), 1, "00000080 FFFFFF7F 00000080 01FE01FE"),
        ((1 << 31) - 1, 2, "FFFFFF7F 00000080 FFFFFF7F 02FD02FD"),
    ],
)
def test_value_block_vectors(value: int, addr: int, hexed: str) -> None:
    raw = bytes.fromhex(hexed)
    assert cl.encode_value_block(value, addr) == raw
    assert cl.decode_value_block(raw) == cl.ValueBlock(value, addr)


@given(int32, addrs)
def test_value_block_round_trip(value: int, addr: int) -> None:
    raw = cl.encode_value_block(value, addr)
    assert len(raw) == 16
    decoded = cl.decode_value_block(bytearray(raw))
    assert decoded.value == value and decoded.addr == addr
    assert cl.is_value_block(memoryview(raw))


@pytest.mark.parametrize(
    ("value", "addr"), [(1 << 31, 0), (-(1 << 31) - 1, 0), (0, 256), (0, -1), (1.5, 0), (0, None)]
)
def test_value_block_encode_rejects_out_of_range(value, addr) -> None:
    with pytest.raises(CodecError):
        cl.encode_value_block(value, addr)


# (name in the error message, byte slice of the copy)
VALUE_COPIES = [
    ("bytes 0..3", slice(0, 4)),
    ("bytes 4..7 (inverted)", slice(4, 8)),
    ("bytes 8..11", slice(8, 12)),
    ("byte 12", slice(12, 13)),
    ("byte 13 (inverted)", slice(13, 14)),
    ("byte 14", slice(14, 15)),
    ("byte 15 (inverted)", slice(15, 16)),
]


@given(int32, addrs, st.sampled_from(VALUE_COPIES), st.integers(1, (1 << 32) - 1))
def test_any_single_copy_corruption_is_detected_and_named(value, addr, copy, mask) -> None:
    name, where = copy
    raw = bytearray(cl.encode_value_block(value, addr))
    width = where.stop - where.start
    mask &= (1 << (8 * width)) - 1
    if mask == 0:
        mask = 1
    corrupted = int.from_bytes(raw[where], "little") ^ mask
    raw[where] = corrupted.to_bytes(width, "little")
    with pytest.raises(ValueBlockError) as info:
        cl.decode_value_block(raw)
    assert f"copy in {name} disagrees" in str(info.value)
    assert not cl.is_value_block(raw)


def test_every_single_bit_flip_is_detected() -> None:
    for value, addr in [(0, 0), (1234567, 17), (-1, 255)]:
        good = cl.encode_value_block(value, addr)
        for bit in range(128):
            raw = bytearray(good)
            raw[bit // 8] ^= 1 << (bit % 8)
            assert not cl.is_value_block(raw), (value, addr, bit)


def test_never_a_value_block_is_reported_as_such() -> None:
    with pytest.raises(ValueBlockError, match="copies disagree with each other"):
        cl.decode_value_block(bytes.fromhex("01000000 02000000 03000000 00FF00FF"))
    with pytest.raises(ValueBlockError, match="address copies disagree"):
        cl.decode_value_block(bytes.fromhex("00000000 FFFFFFFF 00000000 00000000"))
    assert not cl.is_value_block(bytes(16))
    assert not cl.is_value_block(b"\xff" * 16)


@pytest.mark.parametrize("bad", [b"", bytes(15), bytes(17), "x" * 16, None, list(range(16))])
def test_value_block_decode_rejects_wrong_shape(bad) -> None:
    with pytest.raises(ValueBlockError):
        cl.decode_value_block(bad)
    assert not cl.is_value_block(bad)


@given(st.binary(max_size=40))
def test_value_block_decoder_on_random_bytes(raw: bytes) -> None:
    try:
        value, addr = cl.decode_value_block(raw)
    except ValueBlockError:
        assert not cl.is_value_block(raw)
    else:
        assert cl.encode_value_block(value, addr) == raw
        assert cl.is_value_block(raw)


# --------------------------------------------------------------------------------------------
# Access bits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hexed", "expected"),
    [
        ("FF0780", (0b000, 0b000, 0b000, 0b001)),  # transport configuration
        ("787788", (0b100, 0b100, 0b100, 0b011)),  # read A|B, write B; trailer by B
        ("7F0788", (0b000, 0b000, 0b000, 0b011)),
        ("08778F", (0b110, 0b110, 0b110, 0b011)),  # value blocks, recharge with B
    ],
)
def test_known_access_bit_vectors(hexed: str, expected: tuple[int, ...]) -> None:
    raw = bytes.fromhex(hexed)
    assert cl.decode_access_bits(raw) == expected
    assert cl.encode_access_bits(expected) == raw


def test_transport_access_bytes_match_the_data_sheet() -> None:
    assert cl.encode_access_bits(cl.TRANSPORT_ACCESS) == cl.TRANSPORT_ACCESS_BYTES
    assert bytes.fromhex("FF0780") == cl.TRANSPORT_ACCESS_BYTES


def test_bit_positions_follow_the_data_sheet_figure() -> None:
    # Byte 7 high nibble is C1_3..C1_0, byte 8 high nibble C3_3..C3_0, low nibble C2_3..C2_0.
    for group in range(4):
        for bit, (byte, pos) in enumerate([(7, 4), (8, 0), (8, 4)]):  # C1, C2, C3
            conds = [0, 0, 0, 0]
            conds[group] = 0b100 >> bit
            raw = cl.encode_access_bits(conds)
            zero = cl.encode_access_bits([0, 0, 0, 0])
            diff = [a ^ b for a, b in zip(raw, zero, strict=True)]
            assert diff[byte - 6] == 1 << (pos + group)
            assert sum(bin(d).count("1") for d in diff) == 2  # plain bit and inverted copy


def test_access_bits_round_trip_all_combinations() -> None:
    for combo in itertools.product(ALL_CONDS, repeat=4):
        raw = cl.encode_access_bits(combo)
        assert cl.decode_access_bits(raw) == combo
        triples = [cl.condition_bits(c) for c in combo]
        assert cl.encode_access_bits(triples) == raw


VALID_ACCESS_BYTES = frozenset(
    cl.encode_access_bits(c) for c in itertools.product(ALL_CONDS, repeat=4)
)


def _flips(raw: bytes) -> list[bytes]:
    value = int.from_bytes(raw, "big")
    return [(value ^ (1 << bit)).to_bytes(3, "big") for bit in range(24)]


def test_no_single_bit_flip_turns_valid_access_bits_into_valid_ones() -> None:
    assert len(VALID_ACCESS_BYTES) == 8**4
    for raw in VALID_ACCESS_BYTES:
        assert VALID_ACCESS_BYTES.isdisjoint(_flips(raw))


def test_single_bit_flips_of_access_bits_are_refused() -> None:
    # Every condition in every slot, plus the known vectors; the exhaustive sweep is slow.
    combos = [tuple((i + k) % 8 for k in range(4)) for i in range(8)]
    samples = [cl.encode_access_bits(c) for c in combos]
    samples += [bytes.fromhex(h) for h in ("FF0780", "787788", "7F0788", "08778F")]
    for raw in samples:
        for flipped in _flips(raw):
            with pytest.raises(AccessBitsError):
                cl.decode_access_bits(flipped)


@pytest.mark.slow
def test_every_single_bit_flip_of_access_bits_is_refused() -> None:
    for raw in VALID_ACCESS_BYTES:
        for flipped in _flips(raw):
            with pytest.raises(AccessBitsError):
                cl.decode_access_bits(flipped)


def test_access_bits_error_names_the_bit() -> None:
    with pytest.raises(AccessBitsError, match=r"C2 of block 0 \(byte 8 bit 0\)"):
        cl.decode_access_bits(bytes.fromhex("FF0781"))
    with pytest.raises(AccessBitsError, match=r"C1 of the trailer \(byte 7 bit 7\)"):
        cl.decode_access_bits(bytes.fromhex("FF8780"))


@given(st.binary(max_size=6))
def test_access_bits_decoder_on_random_bytes(raw: bytes) -> None:
    try:
        decoded = cl.decode_access_bits(raw)
    except AccessBitsError:
        return
    assert cl.encode_access_bits(decoded) == raw


@pytest.mark.parametrize(
    "bad",
    [
        [0, 0, 0],
        [0, 0, 0, 0, 0],
        [8, 0, 0, 0],
        [-1, 0, 0, 0],
        [(0, 1, 2), 0, 0, 0],
        [(0, 1), 0, 0, 0],
        ["abc", 0, 0, 0],
        [True, 0, 0, 0],
    ],
)
def test_access_bits_encode_rejects_bad_conditions(bad) -> None:
    with pytest.raises(CodecError):
        cl.encode_access_bits(bad)


@pytest.mark.parametrize("bad", [b"", b"\xff\x07", b"\xff\x07\x80\x69", None, "FF0780"])
def test_access_bits_decode_rejects_wrong_shape(bad) -> None:
    with pytest.raises(AccessBitsError):
        cl.decode_access_bits(bad)


def test_condition_bits_round_trip() -> None:
    for cond in ALL_CONDS:
        assert cl.condition_from_bits(*cl.condition_bits(cond)) == cond
    assert cl.condition_bits(0b001) == (0, 0, 1)
    assert cl.condition_bits(0b110) == (1, 1, 0)


# --------------------------------------------------------------------------------------------
# Permission tables (transcribed independently from the data sheet's text tables)
# --------------------------------------------------------------------------------------------

# Table "Access conditions for data blocks": C1 C2 C3 | read | write | increment |
# decrement, transfer, restore. "A|B" = key A or key B.
DATA_TABLE = """
0 0 0 | A|B   | A|B   | A|B   | A|B
0 1 0 | A|B   | never | never | never
1 0 0 | A|B   | B     | never | never
1 1 0 | A|B   | B     | B     | A|B
0 0 1 | A|B   | never | never | A|B
0 1 1 | B     | B     | never | never
1 0 1 | B     | never | never | never
1 1 1 | never | never | never | never
"""

# Table "Access conditions for the sector trailer": C1 C2 C3 | key A read, write |
# access bits read, write | key B read, write.
TRAILER_TABLE = """
0 0 0 | never | A     | A   | never | A     | A
0 1 0 | never | never | A   | never | A     | never
1 0 0 | never | B     | A|B | never | never | B
1 1 0 | never | never | A|B | never | never | never
0 0 1 | never | A     | A   | A     | A     | A
0 1 1 | never | B     | A|B | B     | never | B
1 0 1 | never | never | A|B | B     | never | never
1 1 1 | never | never | A|B | never | never | never
"""


def _keys(allowed: cl.AllowedKeys) -> set[str]:
    return {k for k, flag in (("A", cl.AllowedKeys.A), ("B", cl.AllowedKeys.B)) if flag in allowed}


def _table_rows(table: str) -> dict[int, list[set[str]]]:
    """Condition -> one set of allowed key names per column."""
    rows = {}
    for line in table.strip().splitlines():
        tokens = line.replace("A|B", "AB").split("|")
        bits, cells = tokens[0].strip(), [t.strip() for t in tokens[1:]]
        rows[int(bits.replace(" ", ""), 2)] = [set() if c == "never" else set(c) for c in cells]
    return rows


def test_data_block_table_matches_the_data_sheet() -> None:
    expected = _table_rows(DATA_TABLE)
    assert set(expected) == set(cl.DATA_BLOCK_ACCESS) == set(ALL_CONDS)
    for cond, row in cl.DATA_BLOCK_ACCESS.items():
        assert [_keys(k) for k in row[:4]] == expected[cond], format(cond, "03b")


def test_trailer_table_matches_the_data_sheet() -> None:
    expected = _table_rows(TRAILER_TABLE)
    assert set(expected) == set(cl.TRAILER_ACCESS) == set(ALL_CONDS)
    for cond, row in cl.TRAILER_ACCESS.items():
        assert [_keys(k) for k in row] == expected[cond], format(cond, "03b")


def test_data_block_permits_agrees_with_the_table_for_key_a() -> None:
    ops = {READ: 0, WRITE: 1, INC: 2, DEC: 3, TRANSFER: 3, RESTORE: 3}
    expected = _table_rows(DATA_TABLE)
    for cond, op, key in itertools.product(ALL_CONDS, Operation, KeyType):
        got = cl.data_block_permits(cond, op, key)
        assert got == (key.value in expected[cond][ops[op]]), (cond, op, key)


def test_trailer_permits_agrees_with_the_table() -> None:
    cols = {
        (TrailerField.KEY_A, READ): 0,
        (TrailerField.KEY_A, WRITE): 1,
        (TrailerField.ACCESS_BITS, READ): 2,
        (TrailerField.ACCESS_BITS, WRITE): 3,
        (TrailerField.KEY_B, READ): 4,
        (TrailerField.KEY_B, WRITE): 5,
    }
    expected = _table_rows(TRAILER_TABLE)
    for cond, (field, op), key in itertools.product(ALL_CONDS, cols, KeyType):
        got = cl.trailer_permits(cond, field, op, key)
        assert got == (key.value in expected[cond][cols[field, op]]), (cond, field, op, key)
    for cond, field, key in itertools.product(ALL_CONDS, TrailerField, KeyType):
        for op in (INC, DEC, TRANSFER, RESTORE):
            assert not cl.trailer_permits(cond, field, op, key)


def test_key_b_readable_conditions() -> None:
    assert {c for c in ALL_CONDS if cl.key_b_readable(c)} == {0b000, 0b010, 0b001}


def test_transport_configuration_rights() -> None:
    # Data blocks 000: key A may do everything.
    for op in Operation:
        assert cl.data_block_permits(0b000, op, "A")
    # Trailer 001: key A writes key A, access bits and key B, reads access bits and key B.
    assert cl.trailer_permits(0b001, "key_a", "write", "A")
    assert cl.trailer_permits(0b001, "access_bits", "write", "A")
    assert cl.trailer_permits(0b001, "access_bits", "read", "A")
    assert cl.trailer_permits(0b001, "key_b", "read", "A")
    assert cl.trailer_permits(0b001, "key_b", "write", "A")
    assert not cl.trailer_permits(0b001, "key_a", "read", "A")  # key A is never readable
    # Key B is readable here, so it cannot be used at all.
    for field, op in itertools.product(TrailerField, (READ, WRITE)):
        assert not cl.trailer_permits(0b001, field, op, "B")
    for op in Operation:
        assert not cl.data_block_permits(0b000, op, "B", trailer_cond=0b001)
        assert cl.data_block_permits(0b000, op, "B", trailer_cond=0b011)


def test_key_b_is_refused_whenever_it_is_readable() -> None:
    for data_cond, trailer_cond, op in itertools.product(ALL_CONDS, ALL_CONDS, Operation):
        got = cl.data_block_permits(data_cond, op, B, trailer_cond=trailer_cond)
        if cl.key_b_readable(trailer_cond):
            assert not got
        else:
            assert got == cl.data_block_permits(data_cond, op, B)
        # Key A is never affected by the note.
        assert cl.data_block_permits(data_cond, op, A, trailer_cond=trailer_cond) == (
            cl.data_block_permits(data_cond, op, A)
        )


def test_value_block_conditions() -> None:
    # 001: non-rechargeable purse, read and decrement only.
    assert cl.data_block_permits(0b001, READ, A) and cl.data_block_permits(0b001, DEC, A)
    assert not cl.data_block_permits(0b001, INC, B)
    assert not cl.data_block_permits(0b001, WRITE, B)
    # 110: recharge (increment) only with key B, spend with either key.
    assert cl.data_block_permits(0b110, INC, B) and not cl.data_block_permits(0b110, INC, A)
    assert cl.data_block_permits(0b110, DEC, A) and cl.data_block_permits(0b110, TRANSFER, A)
    assert cl.data_block_permits(0b110, RESTORE, B)
    assert cl.DATA_BLOCK_ACCESS[0b110].application == "value block"


def test_permission_functions_reject_bad_arguments() -> None:
    with pytest.raises(CodecError):
        cl.data_block_permits(8, READ, A)
    with pytest.raises(CodecError):
        cl.data_block_permits(0, "erase", A)
    with pytest.raises(CodecError):
        cl.data_block_permits(0, READ, "C")
    with pytest.raises(CodecError):
        cl.trailer_permits(0, "gpb", READ, A)
    with pytest.raises(CodecError):
        cl.key_b_readable(-1)


def test_block_permits_manufacturer_block_is_read_only() -> None:
    for card in (K1, K4):
        assert cl.block_permits(cl.TRANSPORT_ACCESS, 0, READ, A, card)
        for op in (WRITE, INC, DEC, TRANSFER, RESTORE):
            assert not cl.block_permits(cl.TRANSPORT_ACCESS, 0, op, A, card)
        assert cl.block_permits(cl.TRANSPORT_ACCESS, 1, WRITE, A, card)
        assert cl.block_permits(cl.TRANSPORT_ACCESS, 4, WRITE, A, card)


def test_block_permits_uses_five_block_groups_in_large_sectors() -> None:
    conditions = AccessConditions(0b111, 0b000, 0b010, 0b011)
    reads = [cl.block_permits(conditions, b, READ, A, K4) for b in range(128, 143)]
    writes = [cl.block_permits(conditions, b, WRITE, B, K4) for b in range(128, 143)]
    assert reads == [False] * 5 + [True] * 10
    assert writes == [False] * 5 + [True] * 5 + [False] * 5


def test_block_permits_on_trailers() -> None:
    for card, block in ((K1, 3), (K4, 143)):
        assert cl.block_permits(cl.TRANSPORT_ACCESS, block, READ, A, card)
        assert cl.block_permits(cl.TRANSPORT_ACCESS, block, WRITE, A, card)
        assert not cl.block_permits(cl.TRANSPORT_ACCESS, block, READ, B, card)
        assert not cl.block_permits(cl.TRANSPORT_ACCESS, block, INC, A, card)
        transit = cl.transit_trailer(bytes(6), bytes(6)).access
        assert cl.block_permits(transit, block, READ, A, card)
        assert not cl.block_permits(transit, block, WRITE, A, card)
        assert cl.block_permits(transit, block, WRITE, B, card)


# --------------------------------------------------------------------------------------------
# Sector trailers
# --------------------------------------------------------------------------------------------


def test_transport_trailer_bytes() -> None:
    raw = bytes.fromhex("FFFFFFFFFFFF FF078069 FFFFFFFFFFFF")
    assert cl.TRANSPORT_TRAILER.to_bytes() == raw
    assert SectorTrailer.from_bytes(raw) == cl.TRANSPORT_TRAILER
    assert cl.TRANSPORT_TRAILER.access == (0, 0, 0, 0b001)


@given(keys, st.tuples(conds, conds, conds, conds), st.integers(0, 255), keys)
def test_sector_trailer_round_trip(key_a: bytes, access, gpb: int, key_b: bytes) -> None:
    trailer = SectorTrailer(key_a, AccessConditions(*access), gpb, key_b)
    raw = trailer.to_bytes()
    assert len(raw) == 16
    assert raw[0:6] == key_a and raw[9] == gpb and raw[10:16] == key_b
    assert SectorTrailer.from_bytes(raw) == trailer


@given(st.binary(min_size=16, max_size=16))
def test_sector_trailer_decoder_on_random_bytes(raw: bytes) -> None:
    try:
        trailer = SectorTrailer.from_bytes(raw)
    except AccessBitsError:
        return
    assert trailer.to_bytes() == raw


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key_a": bytes(5)},
        {"key_b": bytes(7)},
        {"key_a": "FFFFFF"},
        {"gpb": 256},
        {"gpb": -1},
        {"access": (0, 0, 0)},
        {"access": (0, 0, 0, 8)},
    ],
)
def test_sector_trailer_rejects_bad_fields(kwargs) -> None:
    fields = {"key_a": bytes(6), "access": cl.TRANSPORT_ACCESS, "gpb": 0, "key_b": bytes(6)}
    fields.update(kwargs)
    with pytest.raises(CodecError):
        SectorTrailer(**fields)


def test_sector_trailer_accepts_plain_tuples() -> None:
    trailer = SectorTrailer(bytearray(6), (0, 0, 0, 1), 0x69, bytes(6))
    assert trailer.access == cl.TRANSPORT_ACCESS and trailer.key_a == bytes(6)


def test_transit_trailer_layout() -> None:
    key_a, key_b = bytes.fromhex("A0A1A2A3A4A5"), bytes.fromhex("B0B1B2B3B4B5")
    purse = cl.transit_trailer(key_a, key_b)
    assert purse.access == (0b110, 0b110, 0b100, 0b011)  # purse, backup purse, data
    data = cl.transit_trailer(key_a, key_b, (BlockRole.DATA,) * 3)
    assert data.to_bytes() == key_a + bytes.fromhex("78778869") + key_b
    value = cl.transit_trailer(key_a, key_b, (BlockRole.VALUE,) * 3, gpb=0)
    assert value.to_bytes() == key_a + bytes.fromhex("08778F00") + key_b
    mixed = cl.transit_trailer(key_a, key_b, (BlockRole.DATA, BlockRole.VALUE, BlockRole.READ_ONLY))
    assert mixed.access == (0b100, 0b110, 0b010, 0b011)
    trailer_cond = mixed.access.trailer
    assert not cl.key_b_readable(trailer_cond)  # key B can authenticate
    # Data blocks: read with either key, write only with key B.
    assert cl.data_block_permits(BlockRole.DATA.value, READ, A, trailer_cond=trailer_cond)
    assert not cl.data_block_permits(BlockRole.DATA.value, WRITE, A, trailer_cond=trailer_cond)
    assert cl.data_block_permits(BlockRole.DATA.value, WRITE, B, trailer_cond=trailer_cond)
    # Value blocks: decrement with either key, increment only with key B.
    for key in KeyType:
        assert cl.data_block_permits(BlockRole.VALUE.value, DEC, key, trailer_cond=trailer_cond)
    assert not cl.data_block_permits(BlockRole.VALUE.value, INC, A, trailer_cond=trailer_cond)
    assert cl.data_block_permits(BlockRole.VALUE.value, INC, B, trailer_cond=trailer_cond)
    # Trailer: every field written only with key B; nothing secret readable.
    for field in TrailerField:
        assert cl.trailer_permits(trailer_cond, field, WRITE, B)
        assert not cl.trailer_permits(trailer_cond, field, WRITE, A)
    assert not cl.trailer_permits(trailer_cond, TrailerField.KEY_B, READ, A)


def test_transit_trailer_rejects_bad_roles() -> None:
    with pytest.raises(CodecError):
        cl.transit_trailer(bytes(6), bytes(6), (BlockRole.DATA,) * 2)
    with pytest.raises(CodecError):
        cl.transit_trailer(bytes(6), bytes(6), (0b100, 0b100, 0b100))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Every decoder: a value or the package's own exception, nothing else
# --------------------------------------------------------------------------------------------


@given(st.binary(max_size=32))
def test_decoders_raise_only_core_errors(raw: bytes) -> None:
    decoders = (
        cl.decode_value_block,
        cl.is_value_block,
        cl.decode_access_bits,
        SectorTrailer.from_bytes,
    )
    for decode in decoders:
        with contextlib.suppress(CoreError):
            decode(raw)
