"""Crypto1 as the rest of the system uses it: the fast implementation plus frame helpers.

:class:`Crypto1` is the Cython implementation; :class:`Crypto1Ref` is the pure-Python
reference it is checked against. The frame helpers work with either, because both share one
API (``bit``/``byte``/``word``/``peek``/``encrypt_bytes``/``decrypt_bytes``).

The frame helpers (:func:`encrypt_frame`, :func:`decrypt_frame`, :func:`encrypt_bits`,
:func:`decrypt_bits`) are the Cython versions from :mod:`._framing`, which do the parity and
packing in C around :class:`Crypto1`'s ``encrypt_bytes``/``decrypt_bytes``; for any other cipher
(the reference :class:`Crypto1Ref`) they run the pure-Python functions of the same name with a
``_ref`` suffix below, which are their specification.
"""

from __future__ import annotations

from typing import Protocol

from .crypto1_ref import Crypto1Ref
from .crypto1_ref import prng_successor as prng_successor_ref
from .errors import FrameError, ParityError
from .iso14443a import BitFrame, encode_ref, split_ref

try:
    from ._crypto1 import Crypto1, prng_successor
    from ._framing import decrypt_bits, decrypt_frame, encrypt_bits, encrypt_frame
except ImportError as exc:  # pragma: no cover - only on a checkout that skipped the build
    raise ImportError(
        f"the compiled Crypto1 core ({exc.name or 'firmware.core._crypto1'}) is missing: run "
        "`scripts/dev setup` (or `pip install -e .`) to build it"
    ) from exc

__all__ = [
    "Cipher",
    "Crypto1",
    "Crypto1Ref",
    "decrypt_bits",
    "decrypt_bits_ref",
    "decrypt_frame",
    "decrypt_frame_ref",
    "encrypt_bits",
    "encrypt_bits_ref",
    "encrypt_frame",
    "encrypt_frame_ref",
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


def encrypt_frame_ref(cipher: Cipher, plain: bytes, feed: bool = False) -> BitFrame:
    """A whole encrypted frame: data bytes and parity bits, each parity bit encrypted with the
    keystream bit that will encrypt the next data bit."""
    data, parity = cipher.encrypt_bytes(plain, feed)
    return encode_ref(data, _parity_list(parity, len(data)))


def decrypt_frame_ref(cipher: Cipher, frame: BitFrame, feed: bool = False) -> bytes:
    """Decrypt a whole frame and check its decrypted parity bits.

    A parity mismatch means the other side does not hold the same key stream (wrong key, a
    forged frame or a bit error): it raises :class:`ParityError`.
    """
    data, parity = split_ref(frame)
    plain, ks_parity = cipher.decrypt_bytes(data, feed)
    for i, b in enumerate(plain):
        if parity[i] ^ ((ks_parity >> i) & 1) != (b.bit_count() + 1) & 1:
            raise ParityError(f"encrypted parity error in byte {i} of {len(plain)}")
    return plain


def encrypt_bits_ref(cipher: Cipher, value: int, nbits: int) -> BitFrame:
    """A short encrypted frame of ``nbits`` raw bits (the 4-bit ACK/NACK), LSB first."""
    out = 0
    for i in range(nbits):
        out |= (((value >> i) & 1) ^ cipher.bit(0)) << i
    return BitFrame(out, nbits)


def decrypt_bits_ref(cipher: Cipher, frame: BitFrame) -> int:
    """The plain value of a short encrypted frame (see :func:`encrypt_bits_ref`)."""
    if frame.length > 8:
        raise FrameError(f"a short encrypted frame has at most 8 bits, got {frame.length}")
    out = 0
    for i in range(frame.length):
        out |= (frame.bit(i) ^ cipher.bit(0)) << i
    return out
