"""The PN532 host protocol over HSU (UART) framing, as a sans-I/O codec.

Bytes go in with :meth:`Pn532Codec.feed`, events come out of :meth:`Pn532Codec.next_event`;
nothing here reads or writes a port, so the driver, the emulator and the fuzz tests share
one implementation of the framing (in the manner of h11).

Frames (PN532 User Manual, 6.2.1):

* normal information frame ``00 00 FF LEN LCS TFI PD0..PDn DCS 00`` with
  ``LEN = len(TFI..PDn)``, ``LEN + LCS == 0`` and ``TFI + PD0 + .. + PDn + DCS == 0`` (mod 256);
* extended information frame ``00 00 FF FF FF LENm LENl LCS TFI PD.. DCS 00`` for more than
  254 bytes, with ``LENm + LENl + LCS == 0``;
* ACK ``00 00 FF 00 FF 00`` and NACK ``00 00 FF FF 00 00``;
* the error frame ``00 00 FF 01 FF 7F 81 00`` (the chip did not understand a command).

Everything before a start code ``00 FF`` is skipped: the preamble and postamble, the ``55``
bytes a host sends to wake the chip, and line garbage. A frame whose checksums fail is
reported as :class:`BadFrame` and the codec resynchronises on the next start code, so one
corrupted frame never wedges the line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import TFI_CHIP, TFI_ERROR, TFI_HOST
from .errors import FrameFormatError

ACK_FRAME = bytes.fromhex("0000FF00FF00")
NACK_FRAME = bytes.fromhex("0000FFFF0000")
ERROR_FRAME = bytes.fromhex("0000FF01FF7F8100")
START_CODE = b"\x00\xff"

MAX_NORMAL_LEN = 255  # LEN counts TFI + data; longer frames use the extended form
MAX_FRAME_LEN = 265  # TFI + command + 263 data bytes: the PN532's own buffer limit
MAX_BUFFERED = 4096  # garbage before the first start code is dropped past this
HARD_MAX_BUFFERED = 65536  # a caller that never drains events cannot grow our memory


@dataclass(frozen=True, slots=True)
class Ack:
    """The peer received our last frame."""


@dataclass(frozen=True, slots=True)
class Nack:
    """The peer asks for our last frame again (its checksum failed there)."""


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The PN532's application-level error frame: it could not execute the command."""


@dataclass(frozen=True, slots=True)
class Frame:
    """An information frame: ``tfi`` (D4 host to chip, D5 chip to host) and its data,
    whose first byte is the command (or response) code."""

    tfi: int
    data: bytes

    @property
    def command(self) -> int:
        return self.data[0]

    @property
    def params(self) -> bytes:
        return self.data[1:]


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Something that began like a frame but failed its length or data checksum."""

    reason: str


@dataclass(frozen=True, slots=True)
class Garbage:
    """Bytes skipped while looking for a start code that were not preamble, postamble or
    wake-up bytes (worth a log line: a noisy line or a baud-rate mismatch)."""

    data: bytes


Event = Ack | Nack | ErrorFrame | Frame | BadFrame | Garbage

_QUIET_BYTES = frozenset((0x00, 0x55))  # preamble/postamble and HSU wake-up


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def encode_frame(tfi: int, data: bytes) -> bytes:
    """An information frame carrying ``tfi`` and ``data`` (normal or extended by size)."""
    body = bytes((tfi,)) + bytes(data)
    n = len(body)
    if n > MAX_FRAME_LEN:
        raise FrameFormatError(f"PN532 frames carry at most {MAX_FRAME_LEN} bytes, not {n}")
    if n <= MAX_NORMAL_LEN:
        head = bytes((0x00, 0x00, 0xFF, n, (-n) & 0xFF))
    else:
        hi, lo = n >> 8, n & 0xFF
        head = bytes((0x00, 0x00, 0xFF, 0xFF, 0xFF, hi, lo, (-(hi + lo)) & 0xFF))
    return head + body + bytes((_checksum(body), 0x00))


def encode_command(command: int, params: bytes = b"") -> bytes:
    """A host-to-PN532 command frame."""
    return encode_frame(TFI_HOST, bytes((command,)) + bytes(params))


def encode_response(command: int, data: bytes = b"") -> bytes:
    """A PN532-to-host response frame for ``command`` (the code + 1 is put in for you)."""
    return encode_frame(TFI_CHIP, bytes(((command + 1) & 0xFF,)) + bytes(data))


class Pn532Codec:
    """Incremental decoder of a PN532 byte stream into :data:`Event` values.

    ``expect_tfi`` is the TFI this side receives (D5 on the host, D4 in the emulator); an
    information frame with another TFI is a :class:`BadFrame` (a host hearing its own echo,
    or two hosts on one line).
    """

    def __init__(self, expect_tfi: int) -> None:
        if expect_tfi not in (TFI_HOST, TFI_CHIP):
            raise ValueError(f"expect_tfi must be 0xD4 or 0xD5, not 0x{expect_tfi:02X}")
        self.expect_tfi = expect_tfi
        self._buf = bytearray()
        self._dropped = bytearray()  # cut to bound memory; reported (its head) as Garbage

    @classmethod
    def for_host(cls) -> Pn532Codec:
        return cls(TFI_CHIP)

    @classmethod
    def for_chip(cls) -> Pn532Codec:
        return cls(TFI_HOST)

    def feed(self, data: bytes) -> None:
        """Append received bytes; events become available from :meth:`next_event`.

        Memory stays bounded without losing frames: past :data:`MAX_BUFFERED` only the bytes
        before the first start code are dropped (they can never be part of a frame); only a
        caller that lets :data:`HARD_MAX_BUFFERED` bytes of real frames pile up undrained
        loses the oldest of them. Dropped bytes are reported (the first 64) as :class:`Garbage`.
        """
        buf = self._buf
        buf += data
        if len(buf) > MAX_BUFFERED:
            start = buf.find(START_CODE)
            cut = start if start >= 0 else len(buf) - (1 if buf.endswith(b"\x00") else 0)
            if len(buf) - cut > HARD_MAX_BUFFERED:
                cut = len(buf) - HARD_MAX_BUFFERED
            if cut > 0:
                noisy = bytes(b for b in buf[:cut] if b not in _QUIET_BYTES)
                self._dropped += noisy[: max(0, 64 - len(self._dropped))]
                del buf[:cut]

    def clear(self) -> None:
        """Drop everything buffered (after a timeout, before a fresh command)."""
        self._buf.clear()
        self._dropped.clear()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started but not completed (after :meth:`next_event` returned
        None): a peer that then goes quiet lost the frame's tail on the line."""
        return len(self._buf) >= 3 and self._buf.startswith(START_CODE)

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed."""
        if self._dropped:
            dropped = bytes(self._dropped)
            self._dropped.clear()
            return Garbage(dropped)
        buf = self._buf
        start = buf.find(START_CODE)
        if start < 0:
            # keep a trailing 00 that may begin a start code
            keep = 1 if buf.endswith(b"\x00") else 0
            skipped = bytes(buf[: len(buf) - keep])
            del buf[: len(buf) - keep]
            return self._garbage(skipped)
        if start:
            skipped = bytes(buf[:start])
            del buf[:start]
            garbage = self._garbage(skipped)
            if garbage is not None:
                return garbage
        # buf now begins with 00 FF
        if len(buf) < 4:
            return None
        a, b = buf[2], buf[3]
        if (a, b) == (0x00, 0xFF):
            del buf[:4]
            return Ack()
        if (a, b) == (0xFF, 0x00):
            del buf[:4]
            return Nack()
        if (a, b) == (0xFF, 0xFF):
            if len(buf) < 7:
                return None
            hi, lo, lcs = buf[4], buf[5], buf[6]
            if (hi + lo + lcs) & 0xFF:
                return self._bad("extended frame length checksum mismatch")
            length, header = (hi << 8) | lo, 7
            if not 1 <= length <= MAX_FRAME_LEN:
                return self._bad(f"extended frame length {length} out of range")
        else:
            length, lcs, header = a, b, 4
            if (length + lcs) & 0xFF:
                return self._bad("frame length checksum (LCS) mismatch")
            if length == 0:
                return self._bad("frame of length 0 that is not an ACK")
        if len(buf) < header + length + 1:
            return None
        body = bytes(buf[header : header + length])
        dcs = buf[header + length]
        if (sum(body) + dcs) & 0xFF:
            return self._bad("frame data checksum (DCS) mismatch")
        del buf[: header + length + 1]
        tfi = body[0]
        if tfi == TFI_ERROR and length == 1:
            return ErrorFrame()
        if tfi != self.expect_tfi:
            return BadFrame(f"frame with TFI 0x{tfi:02X}, expected 0x{self.expect_tfi:02X}")
        if length < 2:
            return BadFrame("information frame without a command code")
        return Frame(tfi, body[1:])

    def events(self) -> list[Event]:
        """Every complete event buffered now."""
        out = []
        while (event := self.next_event()) is not None:
            out.append(event)
        return out

    def _garbage(self, skipped: bytes) -> Garbage | None:
        if skipped and any(b not in _QUIET_BYTES for b in skipped):
            return Garbage(skipped)
        return None

    def _bad(self, reason: str) -> BadFrame:
        # skip this start code only; the real frame may start inside what we rejected
        del self._buf[:2]
        return BadFrame(reason)
