"""MIFARE Classic 1K/4K memory: geometry, value blocks, access bits, permissions, trailers.

Everything a validator, a top-up terminal or a virtual card needs to agree on about *where*
things live on a MIFARE Classic card and *what the bytes mean*, as pure functions. The facts
come from the NXP product data sheets MF1S50yyX (MIFARE Classic EV1 1K) and MF1S70yyX
(MIFARE Classic EV1 4K), sections 8.6 "Memory organization" and 8.7 "Memory access":

* 1K: 16 sectors of 4 blocks. 4K: 32 sectors of 4 blocks (blocks 0..127) followed by 8 large
  sectors of 16 blocks (blocks 128..255). Blocks are 16 bytes; the last block of every sector
  is its *sector trailer*; block 0 is the read-only *manufacturer block*.
* A value block holds a signed 32-bit value three times (plain, inverted, plain; least
  significant byte first) and a 1-byte address four times (plain, inverted, plain, inverted).
* A sector trailer holds key A (bytes 0..5), the access bits (bytes 6..8), a general purpose
  byte (byte 9) and key B (bytes 10..15). The access bits give each block group three bits
  C1 C2 C3, each stored once plain and once inverted; a card that finds a bit equal to its
  inverted copy blocks the whole sector irreversibly, which is why writers must never emit
  such a pattern and readers must refuse it loudly.

An access condition is written here as the integer ``C1 C2 C3`` read as a binary number, so
the datasheet's row "0 0 1" is ``0b001`` and "1 1 0" is ``0b110``.

Errors: bad bytes raise :class:`~firmware.core.errors.ValueBlockError` or
:class:`~firmware.core.errors.AccessBitsError`; out-of-range numbers and otherwise malformed
arguments raise :class:`~firmware.core.errors.CodecError`. Nothing else escapes, so a caller
that catches :class:`~firmware.core.errors.CoreError` turns any bad card into a clean refusal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, Flag, StrEnum
from types import MappingProxyType
from typing import NamedTuple

from .errors import AccessBitsError, CodecError, ValueBlockError

__all__ = [
    "BLOCK_SIZE",
    "DATA_BLOCK_ACCESS",
    "MANUFACTURER_BLOCK",
    "TRAILER_ACCESS",
    "TRANSIT_TRAILER_CONDITION",
    "TRANSPORT_ACCESS",
    "TRANSPORT_ACCESS_BYTES",
    "TRANSPORT_TRAILER",
    "AccessConditions",
    "AllowedKeys",
    "BlockRole",
    "CardType",
    "DataBlockRights",
    "KeyType",
    "Operation",
    "SectorTrailer",
    "TrailerField",
    "TrailerRights",
    "ValueBlock",
    "access_group",
    "block_permits",
    "blocks_in_sector",
    "condition_bits",
    "condition_for_block",
    "condition_from_bits",
    "data_block_permits",
    "decode_access_bits",
    "decode_value_block",
    "encode_access_bits",
    "encode_value_block",
    "factory_memory",
    "first_block",
    "is_manufacturer_block",
    "is_trailer",
    "is_value_block",
    "key_b_readable",
    "sector_blocks",
    "sector_of",
    "trailer_block",
    "trailer_permits",
    "transit_trailer",
]

BytesLike = bytes | bytearray | memoryview

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

BLOCK_SIZE = 16
"""Bytes per block, on both card sizes."""

MANUFACTURER_BLOCK = 0
"""Block 0 (sector 0): UID and manufacturer data, read-only whatever the access bits say."""

_SMALL_SECTOR_BLOCKS = 4
_LARGE_SECTOR_BLOCKS = 16
_SMALL_SECTORS_4K = 32
_LARGE_SECTORS_FIRST_BLOCK = _SMALL_SECTORS_4K * _SMALL_SECTOR_BLOCKS  # 128
_LARGE_SECTOR_GROUP_BLOCKS = 5  # access bits of a large sector govern groups of 5 blocks


class CardType(Enum):
    """The two MIFARE Classic memory sizes this system issues and accepts."""

    CLASSIC_1K = "classic-1k"
    CLASSIC_4K = "classic-4k"

    @property
    def sectors(self) -> int:
        """Number of sectors: 16 on a 1K, 40 (32 small + 8 large) on a 4K."""
        return 16 if self is CardType.CLASSIC_1K else 40

    @property
    def blocks(self) -> int:
        """Number of 16-byte blocks: 64 on a 1K, 256 on a 4K."""
        return 64 if self is CardType.CLASSIC_1K else 256

    @property
    def size_bytes(self) -> int:
        """Total EEPROM size in bytes (trailers and manufacturer block included)."""
        return self.blocks * BLOCK_SIZE

    @property
    def sak(self) -> int:
        """The SAK the card answers to its last SELECT: 08h for a 1K, 18h for a 4K."""
        return 0x08 if self is CardType.CLASSIC_1K else 0x18

    def atqa(self, uid_size: int) -> int:
        """The ATQA (as a 16-bit number) for a 4-byte NUID or a 7-byte UID.

        Bits 7..8 carry the UID size (ISO/IEC 14443-3): 0004h/0044h on a 1K, 0002h/0042h on
        a 4K.
        """
        if uid_size not in (4, 7):
            raise CodecError(f"a MIFARE Classic UID has 4 or 7 bytes, not {uid_size!r}")
        base = 0x0004 if self is CardType.CLASSIC_1K else 0x0002
        return base | (0x40 if uid_size == 7 else 0)

    @classmethod
    def from_size(cls, size_bytes: int) -> CardType:
        """The card type whose EEPROM is ``size_bytes`` long (1024 or 4096), e.g. of a dump."""
        for card_type in cls:
            if card_type.size_bytes == size_bytes:
                return card_type
        raise CodecError(f"no MIFARE Classic card has {size_bytes!r} bytes of memory")


def _is_int(x: object) -> bool:
    # bool is an int subclass, but True as a block number is always a caller's mistake.
    return isinstance(x, int) and not isinstance(x, bool)


def _check_card_type(card_type: object) -> CardType:
    if not isinstance(card_type, CardType):
        raise CodecError(f"card type must be a CardType, not {card_type!r}")
    return card_type


def _check_index(x: object, card_type: object, what: str) -> int:
    card_type = _check_card_type(card_type)
    limit = card_type.sectors if what == "sector" else card_type.blocks
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < limit:
        raise CodecError(f"{what} {x!r} is out of range for {card_type.value} (0..{limit - 1})")
    return x


def _check_sector(sector: object, card_type: CardType) -> int:
    return _check_index(sector, card_type, "sector")


def _check_block(block: object, card_type: CardType) -> int:
    return _check_index(block, card_type, "block")


def blocks_in_sector(sector: int, card_type: CardType) -> int:
    """How many blocks ``sector`` has: 4, or 16 for sectors 32..39 of a 4K."""
    sector = _check_sector(sector, card_type)
    return _LARGE_SECTOR_BLOCKS if sector >= _SMALL_SECTORS_4K else _SMALL_SECTOR_BLOCKS


def first_block(sector: int, card_type: CardType) -> int:
    """Absolute number of the first block of ``sector`` (the block to authenticate for it)."""
    sector = _check_sector(sector, card_type)
    if sector < _SMALL_SECTORS_4K:
        return sector * _SMALL_SECTOR_BLOCKS
    return _LARGE_SECTORS_FIRST_BLOCK + (sector - _SMALL_SECTORS_4K) * _LARGE_SECTOR_BLOCKS


def trailer_block(sector: int, card_type: CardType) -> int:
    """Absolute number of the sector trailer of ``sector`` (its last block)."""
    return first_block(sector, card_type) + blocks_in_sector(sector, card_type) - 1


def sector_blocks(sector: int, card_type: CardType) -> range:
    """All absolute block numbers of ``sector``, trailer included, in order."""
    start = first_block(sector, card_type)
    return range(start, start + blocks_in_sector(sector, card_type))


def sector_of(block: int, card_type: CardType) -> int:
    """The sector holding ``block``: the sector whose keys must authenticate an access to it."""
    block = _check_block(block, card_type)
    if block < _LARGE_SECTORS_FIRST_BLOCK:
        return block // _SMALL_SECTOR_BLOCKS
    return _SMALL_SECTORS_4K + (block - _LARGE_SECTORS_FIRST_BLOCK) // _LARGE_SECTOR_BLOCKS


def is_trailer(block: int, card_type: CardType) -> bool:
    """Whether ``block`` is a sector trailer (keys and access bits, never application data)."""
    return block == trailer_block(sector_of(block, card_type), card_type)


def is_manufacturer_block(block: int, card_type: CardType) -> bool:
    """Whether ``block`` is block 0, which no access condition can make writable."""
    return _check_block(block, card_type) == MANUFACTURER_BLOCK


def access_group(block: int, card_type: CardType) -> int:
    """Which access-condition slot (0, 1, 2 or 3 = trailer) of its sector governs ``block``.

    In a 4-block sector this is the block's position in the sector. In a 16-block sector of a
    4K the three data slots each cover five blocks (0..4, 5..9, 10..14) and slot 3 the trailer
    (block 15), as the MF1S70yyX data sheet lays out.
    """
    sector = sector_of(block, card_type)
    offset = block - first_block(sector, card_type)
    if blocks_in_sector(sector, card_type) == _SMALL_SECTOR_BLOCKS:
        return offset
    if offset == _LARGE_SECTOR_BLOCKS - 1:
        return 3
    return offset // _LARGE_SECTOR_GROUP_BLOCKS


# --------------------------------------------------------------------------------------------
# Value blocks
# --------------------------------------------------------------------------------------------

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_MASK32 = 0xFFFFFFFF


class ValueBlock(NamedTuple):
    """A decoded value block: the signed 32-bit ``value`` and the 1-byte ``addr``."""

    value: int
    addr: int


_new_value_block = tuple.__new__


def _as_bytes(data: object, length: int, error: type[CodecError], what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != length:
        raise error(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def encode_value_block(value: int, addr: int) -> bytes:
    """The 16 bytes of a value block holding ``value`` (signed 32-bit) and ``addr`` (0..255).

    Layout (data sheet section 8.6.2.1): value, inverted value, value (each 4 bytes, least
    significant byte first, negative values in two's complement), then addr, ~addr, addr,
    ~addr. The card checks this redundancy before every increment, decrement or restore.
    """
    if not _is_int(value) or not _INT32_MIN <= value <= _INT32_MAX:
        raise CodecError(f"value {value!r} does not fit a signed 32-bit value block")
    if not _is_int(addr) or not 0 <= addr <= 0xFF:
        raise CodecError(f"value block address {addr!r} is not a byte (0..255)")
    raw = (value & _MASK32).to_bytes(4, "little")
    inverted = (~value & _MASK32).to_bytes(4, "little")
    return raw + inverted + raw + bytes((addr, addr ^ 0xFF, addr, addr ^ 0xFF))


def _disagreement(kind: str, copies: Sequence[tuple[str, int]], width: int) -> str | None:
    """Describe which of the redundant ``copies`` (already un-inverted) is the odd one out.

    Naming the copy matters to the field technician: one bad copy beside agreeing ones points
    at a torn write or a single flipped cell, while copies that all differ point at a block
    that was never a value block (or at tampering).
    """
    values = [v for _, v in copies]
    if len(set(values)) == 1:
        return None
    majority = max(set(values), key=values.count)
    if values.count(majority) * 2 > len(values):
        bad = [name for name, v in copies if v != majority]
        good = [name for name, v in copies if v == majority]
        return (
            f"{kind} copy in {' and '.join(bad)} disagrees with {', '.join(good)}, "
            f"which agree on {majority:#0{width + 2}x}"
        )
    shown = ", ".join(f"{name} = {v:#0{width + 2}x}" for name, v in copies)
    return f"{kind} copies disagree with each other ({shown})"


def decode_value_block(block: BytesLike) -> ValueBlock:
    """Check every redundant copy of a value block and return its value and address.

    Raises :class:`ValueBlockError` naming the copy that disagrees: a purse that does not
    decode cleanly must never be charged or topped up, only reported.
    """
    if type(block) is bytes and len(block) == BLOCK_SIZE:
        data = block  # what _as_bytes would return, without the call
    else:
        data = _as_bytes(block, BLOCK_SIZE, ValueBlockError, "value block")
    v0 = int.from_bytes(data[0:4], "little")
    v1 = int.from_bytes(data[4:8], "little") ^ _MASK32
    v2 = int.from_bytes(data[8:12], "little")
    addr = data[12]
    if v0 == v1 == v2 and addr == data[14] == data[13] ^ 0xFF == data[15] ^ 0xFF:
        # every copy agrees (the block a card and a reader see nearly always): no report;
        # the ValueBlock built by tuple.__new__, as its own __new__ does, minus a Python frame
        return _new_value_block(ValueBlock, (v0 - (1 << 32) if v0 & 0x80000000 else v0, addr))
    problems = [
        p
        for p in (
            _disagreement(
                "value",
                (("bytes 0..3", v0), ("bytes 4..7 (inverted)", v1), ("bytes 8..11", v2)),
                8,
            ),
            _disagreement(
                "address",
                (
                    ("byte 12", data[12]),
                    ("byte 13 (inverted)", data[13] ^ 0xFF),
                    ("byte 14", data[14]),
                    ("byte 15 (inverted)", data[15] ^ 0xFF),
                ),
                2,
            ),
        )
        if p is not None
    ]
    if problems:
        raise ValueBlockError("not a valid value block: " + "; ".join(problems))
    value = v0 - (1 << 32) if v0 & 0x80000000 else v0
    return ValueBlock(value, data[12])


def is_value_block(block: BytesLike) -> bool:
    """Whether ``block`` is a well-formed value block (what the card checks before INC/DEC)."""
    try:
        decode_value_block(block)
    except ValueBlockError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Access bits
# --------------------------------------------------------------------------------------------

Condition = int | Sequence[int]
"""An access condition: ``0b000..0b111`` (C1 C2 C3) or a ``(c1, c2, c3)`` triple of bits."""


class AccessConditions(NamedTuple):
    """The four access conditions of a sector, each ``C1 C2 C3`` as an integer 0..7.

    ``block0``..``block2`` govern the data blocks 0, 1, 2 of a 4-block sector, or the groups
    of blocks 0..4, 5..9, 10..14 of a 16-block sector; ``trailer`` governs the sector trailer.
    """

    block0: int
    block1: int
    block2: int
    trailer: int


def condition_bits(cond: int) -> tuple[int, int, int]:
    """The ``(C1, C2, C3)`` bits of access condition ``cond`` (0..7)."""
    cond = _condition_value(cond)
    return (cond >> 2) & 1, (cond >> 1) & 1, cond & 1


def condition_from_bits(c1: int, c2: int, c3: int) -> int:
    """The access condition with bits ``C1 C2 C3``, as the integer used everywhere here."""
    return _condition_value((c1, c2, c3))


def _condition_value(cond: object) -> int:
    if isinstance(cond, int) and not isinstance(cond, bool):
        if 0 <= cond <= 0b111:
            return cond
    elif isinstance(cond, Sequence) and not isinstance(cond, str | bytes) and len(cond) == 3:
        bits = list(cond)
        if all(_is_int(b) and b in (0, 1) for b in bits):
            return (bits[0] << 2) | (bits[1] << 1) | bits[2]
    raise CodecError(f"access condition {cond!r} is neither 0..7 nor a (c1, c2, c3) bit triple")


def encode_access_bits(conds: Iterable[Condition]) -> bytes:
    """Bytes 6..8 of a sector trailer for four access conditions (blocks 0, 1, 2, trailer).

    Each condition is an integer 0..7 (``C1 C2 C3``) or a ``(c1, c2, c3)`` triple. Layout per
    the data sheet's figure "Access conditions": byte 6 = ~C2 (high nibble) | ~C1 (low),
    byte 7 = C1 | ~C3, byte 8 = C3 | C2, bit *n* of each nibble belonging to block *n*.
    The output always carries consistent inverted copies, so it can never block a sector.
    """
    values = [_condition_value(c) for c in conds]
    if len(values) != 4:
        raise CodecError(f"a sector has 4 access conditions, got {len(values)}")
    c1 = c2 = c3 = 0
    for i, v in enumerate(values):
        c1 |= ((v >> 2) & 1) << i
        c2 |= ((v >> 1) & 1) << i
        c3 |= (v & 1) << i
    return bytes(
        (
            ((c2 ^ 0xF) << 4) | (c1 ^ 0xF),
            (c1 << 4) | (c3 ^ 0xF),
            (c3 << 4) | c2,
        )
    )


def decode_access_bits(data: BytesLike) -> AccessConditions:
    """The four access conditions stored in trailer bytes 6..8 (exactly 3 bytes).

    Raises :class:`AccessBitsError` listing every bit whose inverted copy does not match: a
    real card treats such a trailer as a format violation and blocks the sector for good, so
    software must refuse it rather than guess.
    """
    raw = _as_bytes(data, 3, AccessBitsError, "access bits")
    b6, b7, b8 = raw
    # (name, plain nibble, its byte, inverted nibble, its byte, bit offsets in those bytes)
    fields = (
        ("C1", b7 >> 4, 7, b6 & 0xF, 6, 4, 0),
        ("C2", b8 & 0xF, 8, b6 >> 4, 6, 0, 4),
        ("C3", b8 >> 4, 8, b7 & 0xF, 7, 4, 0),
    )
    problems = []
    for name, plain, plain_byte, inverted, inv_byte, plain_shift, inv_shift in fields:
        bad = plain ^ inverted ^ 0xF
        for block in range(4):
            if bad >> block & 1:
                problems.append(
                    f"{name} of {'the trailer' if block == 3 else f'block {block}'} "
                    f"(byte {plain_byte} bit {plain_shift + block}) equals its inverted copy "
                    f"(byte {inv_byte} bit {inv_shift + block})"
                )
    if problems:
        raise AccessBitsError(
            f"access bits {raw.hex(' ').upper()} are not consistent (a card would block the "
            "sector): " + "; ".join(problems)
        )
    c1, c2, c3 = b7 >> 4, b8 & 0xF, b8 >> 4
    return AccessConditions(
        *(((c1 >> i & 1) << 2) | ((c2 >> i & 1) << 1) | (c3 >> i & 1) for i in range(4))
    )


def _access_conditions(conditions: object) -> AccessConditions:
    if (
        not isinstance(conditions, Sequence)
        or isinstance(conditions, str | bytes)
        or len(conditions) != 4
    ):
        raise CodecError(f"a sector has 4 access conditions, got {conditions!r}")
    return AccessConditions(*(_condition_value(c) for c in conditions))


def condition_for_block(conditions: AccessConditions, block: int, card_type: CardType) -> int:
    """The access condition of ``conditions`` (its sector's) that applies to ``block``."""
    return _access_conditions(conditions)[access_group(block, card_type)]


# --------------------------------------------------------------------------------------------
# Permission tables
# --------------------------------------------------------------------------------------------


class KeyType(StrEnum):
    """The key a session authenticated with (command 60h = key A, 61h = key B)."""

    A = "A"
    B = "B"


class AllowedKeys(Flag):
    """A cell of the data sheet's tables: 'never', 'key A', 'key B' or 'key A|B'."""

    NEVER = 0
    A = 1
    B = 2
    AB = A | B


class Operation(StrEnum):
    """Memory operations of the data sheet's table "Memory operations"."""

    READ = "read"
    WRITE = "write"
    INCREMENT = "increment"
    DECREMENT = "decrement"
    TRANSFER = "transfer"
    RESTORE = "restore"


class TrailerField(StrEnum):
    """The independently protected parts of a sector trailer.

    ``ACCESS_BITS`` covers bytes 6..8 *and* the general purpose byte 9, which the data sheet
    gives "the same access rights as for byte 6, 7 and 8".
    """

    KEY_A = "key_a"
    ACCESS_BITS = "access_bits"
    KEY_B = "key_b"


class DataBlockRights(NamedTuple):
    """One row of the data sheet's "Access conditions for data blocks" table."""

    read: AllowedKeys
    write: AllowedKeys
    increment: AllowedKeys
    decrement_transfer_restore: AllowedKeys
    application: str


class TrailerRights(NamedTuple):
    """One row of the data sheet's "Access conditions for the sector trailer" table."""

    key_a_read: AllowedKeys
    key_a_write: AllowedKeys
    access_bits_read: AllowedKeys
    access_bits_write: AllowedKeys
    key_b_read: AllowedKeys
    key_b_write: AllowedKeys


_N, _A, _B, _AB = AllowedKeys.NEVER, AllowedKeys.A, AllowedKeys.B, AllowedKeys.AB

DATA_BLOCK_ACCESS: Mapping[int, DataBlockRights] = MappingProxyType(
    {
        # C1C2C3   read  write  incr  decr/transfer/restore
        0b000: DataBlockRights(_AB, _AB, _AB, _AB, "transport configuration"),
        0b010: DataBlockRights(_AB, _N, _N, _N, "read/write block"),
        0b100: DataBlockRights(_AB, _B, _N, _N, "read/write block"),
        0b110: DataBlockRights(_AB, _B, _B, _AB, "value block"),
        0b001: DataBlockRights(_AB, _N, _N, _AB, "value block"),
        0b011: DataBlockRights(_B, _B, _N, _N, "read/write block"),
        0b101: DataBlockRights(_B, _N, _N, _N, "read/write block"),
        0b111: DataBlockRights(_N, _N, _N, _N, "read/write block"),
    }
)
"""The data sheet's Table "Access conditions for data blocks", by condition ``C1 C2 C3``.

The table alone: every cell naming key B is subject to the note that key B cannot serve
while the trailer makes key B readable; :func:`data_block_permits` applies that note.
"""

TRAILER_ACCESS: Mapping[int, TrailerRights] = MappingProxyType(
    {
        # C1C2C3   key A r/w    access bits r/w   key B r/w
        0b000: TrailerRights(_N, _A, _A, _N, _A, _A),
        0b010: TrailerRights(_N, _N, _A, _N, _A, _N),
        0b100: TrailerRights(_N, _B, _AB, _N, _N, _B),
        0b110: TrailerRights(_N, _N, _AB, _N, _N, _N),
        0b001: TrailerRights(_N, _A, _A, _A, _A, _A),
        0b011: TrailerRights(_N, _B, _AB, _B, _N, _B),
        0b101: TrailerRights(_N, _N, _AB, _B, _N, _N),
        0b111: TrailerRights(_N, _N, _AB, _N, _N, _N),
    }
)
"""The data sheet's Table "Access conditions for the sector trailer", by ``C1 C2 C3``."""

_KEY_FLAG = {KeyType.A: AllowedKeys.A, KeyType.B: AllowedKeys.B}


_KEY_TYPES = {"A": KeyType.A, "B": KeyType.B}


def parse_key_type(key_type: object) -> KeyType:
    """``"A"``/``"B"`` (any case) or a :class:`KeyType` as a :class:`KeyType`."""
    if type(key_type) is str:
        # the common case, without an Enum call (the dict only takes exact str keys)
        found = _KEY_TYPES.get(key_type)
        if found is not None:
            return found
    elif key_type is KeyType.A or key_type is KeyType.B:
        return key_type
    try:
        return KeyType(key_type)
    except ValueError:
        raise CodecError(f"key type must be 'A' or 'B', not {key_type!r}") from None


def _operation(operation: object) -> Operation:
    try:
        return Operation(operation)
    except ValueError:
        raise CodecError(f"unknown memory operation {operation!r}") from None


def _trailer_field(field: object) -> TrailerField:
    try:
        return TrailerField(field)
    except ValueError:
        raise CodecError(f"unknown sector trailer field {field!r}") from None


def key_b_readable(trailer_cond: int) -> bool:
    """Whether trailer condition ``trailer_cond`` lets key B be read (000, 010 and 001).

    Then key B is plain data, and the data sheet's note applies: authenticating with key B
    in such a sector succeeds but the card refuses every memory access that follows.
    """
    return TRAILER_ACCESS[_condition_value(trailer_cond)].key_b_read is not AllowedKeys.NEVER


def data_block_permits(
    cond: int,
    operation: Operation | str,
    key_type: KeyType | str,
    *,
    trailer_cond: int | None = None,
) -> bool:
    """Whether a session authenticated with ``key_type`` may do ``operation`` on a data block.

    ``cond`` is the block's access condition. Pass the sector's ``trailer_cond`` to get what
    a card actually does: with a trailer condition that makes key B readable, key B grants
    nothing (the data sheet's note to both tables). Without it the answer is the bare table
    row, which is only right for key A or when the caller has checked
    :func:`key_b_readable` itself. The manufacturer block is not special-cased here; see
    :func:`block_permits`.
    """
    rights = DATA_BLOCK_ACCESS[_condition_value(cond)]
    op = _operation(operation)
    key = parse_key_type(key_type)
    if key is KeyType.B and trailer_cond is not None and key_b_readable(trailer_cond):
        return False
    if op is Operation.READ:
        allowed = rights.read
    elif op is Operation.WRITE:
        allowed = rights.write
    elif op is Operation.INCREMENT:
        allowed = rights.increment
    else:
        allowed = rights.decrement_transfer_restore
    return _KEY_FLAG[key] in allowed


def trailer_permits(
    cond: int,
    field: TrailerField | str,
    operation: Operation | str,
    key_type: KeyType | str,
) -> bool:
    """Whether ``key_type`` may ``operation`` (read or write) ``field`` of a sector trailer.

    ``cond`` is the trailer's own access condition. Value operations never apply to a
    trailer and are refused. Key B gets nothing while it is readable (conditions 000, 010,
    001); the table already says so, and the rule is enforced here as well.
    """
    rights = TRAILER_ACCESS[_condition_value(cond)]
    fld = _trailer_field(field)
    op = _operation(operation)
    key = parse_key_type(key_type)
    if op not in (Operation.READ, Operation.WRITE):
        return False
    if key is KeyType.B and key_b_readable(cond):
        return False
    allowed = {
        (TrailerField.KEY_A, Operation.READ): rights.key_a_read,
        (TrailerField.KEY_A, Operation.WRITE): rights.key_a_write,
        (TrailerField.ACCESS_BITS, Operation.READ): rights.access_bits_read,
        (TrailerField.ACCESS_BITS, Operation.WRITE): rights.access_bits_write,
        (TrailerField.KEY_B, Operation.READ): rights.key_b_read,
        (TrailerField.KEY_B, Operation.WRITE): rights.key_b_write,
    }[fld, op]
    return _KEY_FLAG[key] in allowed


def block_permits(
    conditions: AccessConditions,
    block: int,
    operation: Operation | str,
    key_type: KeyType | str,
    card_type: CardType,
) -> bool:
    """Whether ``operation`` on absolute ``block`` is allowed: the check a card makes.

    ``conditions`` are the access conditions of the block's sector. This picks the block's
    condition slot (five-block groups in large 4K sectors), applies the key B note and keeps
    the manufacturer block read-only. For a sector trailer, READ is allowed when the access
    bits are readable (the keys then read as zeros unless key B is readable) and WRITE when
    *any* trailer field is writable; which fields a write may actually change is for
    :func:`trailer_permits` to say, field by field.
    """
    op = _operation(operation)
    key = parse_key_type(key_type)
    conditions = _access_conditions(conditions)
    trailer_cond = conditions.trailer
    if is_trailer(block, card_type):
        if op is Operation.READ:
            return trailer_permits(trailer_cond, TrailerField.ACCESS_BITS, op, key)
        if op is Operation.WRITE:
            return any(trailer_permits(trailer_cond, f, op, key) for f in TrailerField)
        return False
    if is_manufacturer_block(block, card_type) and op is not Operation.READ:
        return False
    cond = condition_for_block(conditions, block, card_type)
    return data_block_permits(cond, op, key, trailer_cond=trailer_cond)


# --------------------------------------------------------------------------------------------
# Sector trailers
# --------------------------------------------------------------------------------------------

_KEY_SIZE = 6


@dataclass(frozen=True, slots=True)
class SectorTrailer:
    """A sector trailer: key A, access conditions, general purpose byte (byte 9), key B.

    Keys read back from a card are zeros (and key B too unless readable); this type does not
    care, it only maps the 16 bytes to fields and back, refusing inconsistent access bits.
    """

    key_a: bytes
    access: AccessConditions
    gpb: int
    key_b: bytes

    def __post_init__(self) -> None:
        for name in ("key_a", "key_b"):
            key = getattr(self, name)
            if not isinstance(key, bytes | bytearray | memoryview) or len(key) != _KEY_SIZE:
                raise CodecError(f"{name} must be {_KEY_SIZE} bytes, got {key!r}")
            object.__setattr__(self, name, bytes(key))
        object.__setattr__(self, "access", _access_conditions(self.access))
        if not _is_int(self.gpb) or not 0 <= self.gpb <= 0xFF:
            raise CodecError(f"general purpose byte {self.gpb!r} is not a byte (0..255)")

    def to_bytes(self) -> bytes:
        """The 16 bytes to write to the trailer block."""
        return self.key_a + encode_access_bits(self.access) + bytes((self.gpb,)) + self.key_b

    @classmethod
    def from_bytes(cls, data: BytesLike) -> SectorTrailer:
        """Parse a 16-byte trailer; :class:`AccessBitsError` if its access bits are broken."""
        raw = _as_bytes(data, BLOCK_SIZE, CodecError, "sector trailer")
        return cls(raw[0:6], decode_access_bits(raw[6:9]), raw[9], raw[10:16])


TRANSPORT_ACCESS = AccessConditions(0b000, 0b000, 0b000, 0b001)
"""Conditions at chip delivery: data blocks 000, trailer 001 (key A does everything)."""

TRANSPORT_ACCESS_BYTES = bytes.fromhex("FF0780")
"""Bytes 6..8 of a trailer at chip delivery, per the data sheet."""

TRANSPORT_TRAILER = SectorTrailer(b"\xff" * 6, TRANSPORT_ACCESS, 0x69, b"\xff" * 6)
"""A factory-fresh trailer: FFFFFFFFFFFF FF078069 FFFFFFFFFFFF."""

TRANSIT_TRAILER_CONDITION = 0b011
"""Trailer condition of an operator's sector: only key B changes keys and access bits."""


class BlockRole(Enum):
    """What a data block (group) of an operator-secured sector is for; value = condition."""

    DATA = 0b100  # read: key A|B; write: key B
    VALUE = 0b110  # read: A|B; write, increment: key B; decrement/transfer/restore: A|B
    READ_ONLY = 0b010  # read: key A|B; nothing else (until key B rewrites the trailer)


def transit_trailer(
    key_a: bytes,
    key_b: bytes,
    roles: Sequence[BlockRole] = (BlockRole.VALUE, BlockRole.VALUE, BlockRole.DATA),
    gpb: int = 0x69,
) -> SectorTrailer:
    """A trailer for the usual transit split: key A (validators, the more exposed key) reads
    and spends, key B (issuing and top-up) writes and recharges.

    ``roles`` gives the three data block groups; the default suits a purse sector (purse,
    backup purse for tear recovery via RESTORE + TRANSFER, one data block). A block that
    holds no value should be DATA rather than VALUE: with VALUE, key A may TRANSFER into it.
    The trailer gets condition 011: both keys writable only with key B, access bits readable
    with A or B and writable only with key B, key B unreadable and therefore usable. With
    all-DATA roles the access bytes are 78 77 88; with all-VALUE roles 08 77 8F.
    """
    if len(roles) != 3 or not all(isinstance(r, BlockRole) for r in roles):
        raise CodecError(f"roles must be three BlockRole values, got {roles!r}")
    access = AccessConditions(*(r.value for r in roles), TRANSIT_TRAILER_CONDITION)
    return SectorTrailer(key_a, access, gpb, key_b)


def factory_memory(uid: bytes, card_type: CardType) -> bytearray:
    """The whole EEPROM of a card as delivered: UID in block 0, transport trailers, zeros.

    Block 0 holds the UID; after a 4-byte NUID comes its BCC (XOR of the four bytes), then
    SAK and ATQA (least significant byte first) as NXP cards commonly show them, the rest
    zero. Nothing in this system reads those manufacturer bytes; they are there so a virtual
    card's dump looks like a real one. Every trailer is :data:`TRANSPORT_TRAILER`.
    """
    card_type = _check_card_type(card_type)
    if not isinstance(uid, bytes | bytearray | memoryview) or len(uid) not in (4, 7):
        raise CodecError(f"a MIFARE Classic UID has 4 or 7 bytes, got {uid!r}")
    uid = bytes(uid)
    memory = bytearray(card_type.size_bytes)
    block0 = uid
    if len(uid) == 4:
        block0 += bytes((uid[0] ^ uid[1] ^ uid[2] ^ uid[3],))
    block0 += bytes((card_type.sak,)) + card_type.atqa(len(uid)).to_bytes(2, "little")
    memory[0 : len(block0)] = block0
    trailer = TRANSPORT_TRAILER.to_bytes()
    for sector in range(card_type.sectors):
        start = trailer_block(sector, card_type) * BLOCK_SIZE
        memory[start : start + BLOCK_SIZE] = trailer
    return memory
