"""Crypto1 as the rest of the system uses it: the fast implementation plus frame helpers.

:class:`Crypto1` is the Cython implementation; :class:`Crypto1Ref` is the pure-Python
reference it is checked against. The frame helpers work with either, because both share one
API (``bit``/``byte``/``word``/``peek``/``encrypt_bytes``/``decrypt_bytes``).
"""

from __future__ import annotations

from typing import Protocol

from .crypto1_ref import Crypto1Ref
from .crypto1_ref import prng_successor as prng_successor_ref
from .errors import FrameError, ParityError
from .iso14443a import BitFrame, encode, split

try:
    from ._crypto1 import Crypto1, prng_successor
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped the build
    raise ImportError(
        "the compiled Crypto1 core (firmware.core._crypto1) is missing: run `scripts/dev setup` "
        "(or `pip install -e .`) to build it"
    ) from exc

__all__ = [
    "Cipher",
    "Crypto1",
    "Crypto1Ref",
    "decrypt_bits",
    "decrypt_frame",
    "encrypt_bits",
    "encrypt_frame",
    "prng_successor",
    "prng_successor_ref",
]


class Cipher(Protocol):
    """What the protocol code needs of a Crypto1 state (both implementations provide it)."""

    def peek(self) -> int: ...
    def bit(self, in1: int, encrypted: bool = False) -> int: ...
    def byte(self, in8: int, encrypted: bool = False) -> int: ...
    def word(self, in32: int, encrypted: bool = False) -> int: ...
    def encrypt_bytes(self, plain: bytes, feed: bool = False) -> tuple[bytes, int]: ...
    def decrypt_bytes(self, data: bytes, feed: bool = False) -> tuple[bytes, int]: ...


def _parity_list(bits: int, n: int) -> list[int]:
    return [(bits >> i) & 1 for i in range(n)]


def encrypt_frame(cipher: Cipher, plain: bytes, feed: bool = False) -> BitFrame:
    """A whole encrypted frame: data bytes and parity bits, each parity bit encrypted with the
    keystream bit that will encrypt the next data bit."""
    data, parity = cipher.encrypt_bytes(plain, feed)
    return encode(data, _parity_list(parity, len(data)))


def decrypt_frame(cipher: Cipher, frame: BitFrame, feed: bool = False) -> bytes:
    """Decrypt a whole frame and check its decrypted parity bits.

    A parity mismatch means the other side does not hold the same key stream (wrong key, a
    forged frame or a bit error): it raises :class:`ParityError`.
    """
    data, parity = split(frame)
    plain, ks_parity = cipher.decrypt_bytes(data, feed)
    for i, b in enumerate(plain):
        if parity[i] ^ ((ks_parity >> i) & 1) != (b.bit_count() + 1) & 1:
            raise ParityError(f"encrypted parity error in byte {i} of {len(plain)}")
    return plain


def encrypt_bits(cipher: Cipher, value: int, nbits: int) -> BitFrame:
    """A short encrypted frame of ``nbits`` raw bits (the 4-bit ACK/NACK), LSB first."""
    out = 0
    for i in range(nbits):
        out |= (((value >> i) & 1) ^ cipher.bit(0)) << i
    return BitFrame(out, nbits)


def decrypt_bits(cipher: Cipher, frame: BitFrame) -> int:
    """The plain value of a short encrypted frame (see :func:`encrypt_bits`)."""
    if frame.length > 8:
        raise FrameError(f"a short encrypted frame has at most 8 bits, got {frame.length}")
    out = 0
    for i in range(frame.length):
        out |= (frame.bit(i) ^ cipher.bit(0)) << i
    return out
