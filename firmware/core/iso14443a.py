"""ISO/IEC 14443-3 type A framing: CRC_A, odd parity, bit frames.

On the air a standard frame is, per byte, 8 data bits least significant first followed by one
odd-parity bit; a short frame (REQA, WUPA) is 7 bits with no parity. MIFARE Classic encrypts
the parity bits too, so the framing is kept explicit here instead of being hidden in a reader
chip: :class:`BitFrame` is exactly the sequence of bits on the air, which is what the host
hands to a PN532 in transparent mode (CRC and parity generation switched off) and what a
virtual card receives.

The hot functions (:func:`crc_a`, :func:`with_crc`, :func:`strip_crc`, :func:`encode`,
:func:`split`, :func:`decode`) are the Cython versions from :mod:`._framing`; the pure-Python
functions of the same name with a ``_ref`` suffix below are their specification, and the tests
check the two against each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import CrcError, FrameError, ParityError

# Commands of ISO/IEC 14443-3 type A (short frames carry 7 bits).
REQA = 0x26
WUPA = 0x52
HLTA = 0x50
SEL_CL1 = 0x93
SEL_CL2 = 0x95
SEL_CL3 = 0x97
CASCADE_TAG = 0x88

CRC_A_INIT = 0x6363

_PARITY = bytes((bin(b).count("1") + 1) & 1 for b in range(256))


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc_a_ref(data: bytes) -> bytes:
    """CRC_A of ``data`` (ITU-V.41 polynomial, preset 0x6363), 2 bytes, low byte first."""
    crc = CRC_A_INIT
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return bytes((crc & 0xFF, crc >> 8))


def with_crc_ref(data: bytes) -> bytes:
    """``data`` followed by its CRC_A, as a card or reader sends it."""
    return bytes(data) + crc_a_ref(data)


def strip_crc_ref(frame: bytes) -> bytes:
    """Check the CRC_A at the end of ``frame`` and return the payload before it."""
    if len(frame) < 3:
        raise CrcError(f"frame of {len(frame)} bytes is too short to carry a CRC_A")
    payload, crc = frame[:-2], frame[-2:]
    if crc_a_ref(payload) != crc:
        raise CrcError(
            f"CRC_A mismatch: frame ends in {crc.hex()}, contents give {crc_a_ref(payload).hex()}"
        )
    return bytes(payload)


def odd_parity(byte: int) -> int:
    """The parity bit that makes ``byte`` plus the bit hold an odd number of ones."""
    return _PARITY[byte & 0xFF]


@dataclass(frozen=True, slots=True)
class BitFrame:
    """A sequence of bits on the air, first bit in the least significant position of ``bits``.

    ``length`` counts the bits (data and parity). A frame of length 0 stands for silence: the
    other side did not answer. ``collision`` is the index of the first bit where two cards
    answered differently (as a reader's collision register reports it), or -1.
    """

    bits: int
    length: int
    collision: int = -1

    def __post_init__(self) -> None:
        if self.length < 0 or self.bits < 0 or self.bits >> self.length:
            raise FrameError(f"bit frame value does not fit in {self.length} bits")

    def __bool__(self) -> bool:
        return self.length > 0

    def to_packed(self) -> tuple[bytes, int]:
        """Pack into bytes, first bit in bit 0 of byte 0; also the number of valid bits in
        the last byte (1..8), which is what a PN532's BitFramingReg wants in transparent mode."""
        if self.length == 0:
            return b"", 0
        nbytes = (self.length + 7) // 8
        last = self.length - 8 * (nbytes - 1)
        return self.bits.to_bytes(nbytes, "little"), last

    @classmethod
    def from_packed(cls, data: bytes, last_bits: int = 8) -> BitFrame:
        """Inverse of :meth:`to_packed`; ``last_bits`` counts the valid bits in the last byte."""
        if not data:
            return SILENCE
        if not 1 <= last_bits <= 8:
            raise FrameError(f"last byte must carry 1..8 valid bits, not {last_bits}")
        length = 8 * (len(data) - 1) + last_bits
        value = int.from_bytes(data, "little") & ((1 << length) - 1)
        return cls(value, length)

    def bit(self, index: int) -> int:
        """The bit at position ``index`` (0 = first on the air)."""
        return (self.bits >> index) & 1

    def __repr__(self) -> str:
        bits = "".join(str(self.bit(i)) for i in range(self.length))
        extra = f", collision={self.collision}" if self.collision >= 0 else ""
        return f"BitFrame({bits!r}{extra})"


SILENCE = BitFrame(0, 0)
_SHORT_FRAMES = tuple(BitFrame(command, 7) for command in range(0x80))


def short_frame(command: int) -> BitFrame:
    """A 7-bit short frame (REQA 0x26, WUPA 0x52), no parity."""
    if type(command) is int and 0 <= command <= 0x7F:
        return _SHORT_FRAMES[command]  # frames are immutable: one of each serves all
    if not 0 <= command <= 0x7F:
        raise FrameError(f"short frame command 0x{command:02x} does not fit in 7 bits")
    return BitFrame(command, 7)


def encode_ref(data: bytes, parity: Sequence[int] | None = None) -> BitFrame:
    """A standard frame: each byte's 8 bits, LSB first, then its parity bit.

    ``parity`` overrides the computed odd parity per byte (MIFARE Classic sends encrypted
    parity bits); without it the standard odd parity is used.
    """
    value = 0
    shift = 0
    if parity is None:
        for b in data:
            value |= (b | (_PARITY[b] << 8)) << shift
            shift += 9
    else:
        if len(parity) != len(data):
            raise FrameError(f"{len(parity)} parity bits given for {len(data)} bytes")
        for b, p in zip(data, parity, strict=True):
            value |= (b | ((p & 1) << 8)) << shift
            shift += 9
    return BitFrame(value, shift)


def split_ref(frame: BitFrame) -> tuple[bytes, list[int]]:
    """Split a standard frame into its bytes and its parity bits, checking nothing."""
    if frame.length % 9:
        raise FrameError(
            f"frame of {frame.length} bits is not a whole number of bytes with parity"
        )
    n = frame.length // 9
    value = frame.bits
    data = bytearray(n)
    parity = [0] * n
    for i in range(n):
        chunk = value & 0x1FF
        data[i] = chunk & 0xFF
        parity[i] = chunk >> 8
        value >>= 9
    return bytes(data), parity


def decode_ref(frame: BitFrame) -> bytes:
    """The bytes of a standard frame whose parity bits must be the plain odd parity."""
    data, parity = split_ref(frame)
    for i, (b, p) in enumerate(zip(data, parity, strict=True)):
        if _PARITY[b] != p:
            raise ParityError(f"parity error in byte {i} of {len(data)} (0x{b:02x})")
    return data


def encode_bits(value: int, nbits: int) -> BitFrame:
    """A frame of ``nbits`` raw bits (e.g. a 4-bit ACK/NACK), no parity."""
    if nbits < 0 or value >> nbits:
        raise FrameError(f"value 0x{value:x} does not fit in {nbits} bits")
    return BitFrame(value, nbits)


def concat(frames: Iterable[BitFrame]) -> BitFrame:
    """Bits of several frames one after the other (used for split anticollision frames)."""
    value = 0
    shift = 0
    for f in frames:
        value |= f.bits << shift
        shift += f.length
    return BitFrame(value, shift)


# The fast paths: same names, signatures, results and exceptions as the ``_ref`` functions above
# (imported last: they take BitFrame, the tables and the references from this module).
try:
    from ._framing import crc_a, decode, encode, split, strip_crc, with_crc
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped the build
    raise ImportError(
        "the compiled framing core (firmware.core._framing) is missing: run `scripts/dev setup` "
        "(or `pip install -e .`) to build it"
    ) from exc

__all__ = [
    "CASCADE_TAG",
    "CRC_A_INIT",
    "HLTA",
    "REQA",
    "SEL_CL1",
    "SEL_CL2",
    "SEL_CL3",
    "SILENCE",
    "WUPA",
    "BitFrame",
    "concat",
    "crc_a",
    "crc_a_ref",
    "decode",
    "decode_ref",
    "encode",
    "encode_bits",
    "encode_ref",
    "odd_parity",
    "short_frame",
    "split",
    "split_ref",
    "strip_crc",
    "strip_crc_ref",
    "with_crc",
    "with_crc_ref",
]
