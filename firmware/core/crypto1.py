"""Crypto1 as the rest of the system uses it: the fast implementation plus frame helpers.

:class:`Crypto1` is the Cython implementation; :class:`Crypto1Ref` is the pure-Python
reference it is checked against. The frame helpers work with either, because both share one
API (``bit``/``byte``/``word``/``peek``/``encrypt_bytes``/``decrypt_bytes``).

The frame helpers (:func:`encrypt_frame`, :func:`decrypt_frame`, :func:`encrypt_bits`,
:func:`decrypt_bits`, and for the authentication :func:`encrypt_nested_nonce`,
:func:`decrypt_nested_nonce`, :func:`encrypt_reader_answer` and
:func:`decrypt_reader_answer`) are the Cython versions from :mod:`._framing`, which run
:class:`Crypto1` over the whole frame and do the parity and packing in one C call; for any
other cipher (the reference :class:`Crypto1Ref`) they run the pure-Python functions of the
same name with a ``_ref`` suffix below, which are their specification.
"""

from __future__ import annotations

from typing import Protocol

from .crypto1_ref import Crypto1Ref
from .crypto1_ref import prng_successor as prng_successor_ref
from .errors import FrameError, ParityError
from .iso14443a import BitFrame, encode_ref, split_ref

try:
    from ._crypto1 import Crypto1, prng_successor
    from ._framing import (
        decrypt_bits,
        decrypt_frame,
        decrypt_nested_nonce,
        decrypt_reader_answer,
        encrypt_bits,
        encrypt_frame,
        encrypt_nested_nonce,
        encrypt_reader_answer,
    )
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
    "decrypt_nested_nonce",
    "decrypt_nested_nonce_ref",
    "decrypt_reader_answer",
    "decrypt_reader_answer_ref",
    "encrypt_bits",
    "encrypt_bits_ref",
    "encrypt_frame",
    "encrypt_frame_ref",
    "encrypt_nested_nonce",
    "encrypt_nested_nonce_ref",
    "encrypt_reader_answer",
    "encrypt_reader_answer_ref",
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


def encrypt_reader_answer_ref(cipher: Cipher, nr: bytes, ar: bytes) -> BitFrame:
    """The reader's {nr}{ar} frame of the authentication: ``nr`` encrypted while it is fed
    into the register, ``ar`` encrypted without feeding, each parity bit encrypted with the
    keystream bit after its byte."""
    nr_enc, nr_par = cipher.encrypt_bytes(nr, True)
    ar_enc, ar_par = cipher.encrypt_bytes(ar, False)
    n = len(nr_enc)
    return encode_ref(nr_enc + ar_enc, _parity_list(nr_par | (ar_par << n), n + len(ar_enc)))


def decrypt_reader_answer_ref(cipher: Cipher, frame: BitFrame) -> bytes:
    """The card's side of :func:`encrypt_reader_answer_ref`: the plain ``nr || ar`` (8 bytes)
    of an {nr}{ar} frame, ``nr`` decrypted into the register.

    :class:`FrameError` for a frame that is not 8 bytes with parity (the cipher untouched),
    :class:`ParityError` when a decrypted parity bit is wrong (after all 8 bytes went through
    the cipher): the reader does not hold the key.
    """
    data, parity = split_ref(frame)
    if len(data) != 8:
        raise FrameError(
            f"the reader's answer {{nr}}{{ar}} must be 8 bytes with parity, got {len(data)}"
        )
    nr, nr_par = cipher.decrypt_bytes(data[:4], True)
    ar, ar_par = cipher.decrypt_bytes(data[4:], False)
    plain = nr + ar
    ks_par = nr_par | (ar_par << 4)
    for i, b in enumerate(plain):
        if parity[i] ^ ((ks_par >> i) & 1) != (b.bit_count() + 1) & 1:
            raise ParityError(f"encrypted parity error in byte {i} of 8")
    return plain


def _nested_nonce_parity(nt: int, ks: int, next_ks_bit: int) -> list[int]:
    """Parity bits of an encrypted nonce: byte i's parity is encrypted with the keystream bit
    that encrypts the first bit of byte i+1 (for the last byte, the next clock's bit)."""
    nt_bytes = nt.to_bytes(4, "big")
    ks_bytes = ks.to_bytes(4, "big")
    out = []
    for i in range(4):
        nxt = ks_bytes[i + 1] & 1 if i < 3 else next_ks_bit
        out.append(((nt_bytes[i].bit_count() + 1) & 1) ^ nxt)
    return out


def encrypt_nested_nonce_ref(cipher: Cipher, cuid: int, nt: int) -> BitFrame:
    """The card's encrypted nonce {nt} of a nested authentication, under a fresh ``cipher``
    of the sector key: ``cuid ^ nt`` is fed in while the keystream encrypts ``nt``; the
    parity bits are encrypted with the keystream bit after each byte."""
    ks = cipher.word(cuid ^ nt, False)
    parity = _nested_nonce_parity(nt, ks, cipher.peek())
    return encode_ref((nt ^ ks).to_bytes(4, "big"), parity)


def decrypt_nested_nonce_ref(cipher: Cipher, cuid: int, frame: BitFrame) -> int | None:
    """The reader's side of :func:`encrypt_nested_nonce_ref`: the plain ``nt`` of an {nt}
    frame (4 bytes with parity), ``cuid ^ nt`` fed into ``cipher`` as it is decrypted; None
    when the decrypted parity bits are wrong (the card does not hold this key).

    :class:`FrameError` for a frame that is not 4 bytes with parity (the cipher untouched).
    """
    enc, parity = split_ref(frame)
    if len(enc) != 4:
        raise FrameError(f"an encrypted nonce must be 4 bytes with parity, got {len(enc)}")
    enc_nt = int.from_bytes(enc, "big")
    ks = cipher.word(cuid ^ enc_nt, True)
    nt = enc_nt ^ ks
    if _nested_nonce_parity(nt, ks, cipher.peek()) != parity:
        return None
    return nt
