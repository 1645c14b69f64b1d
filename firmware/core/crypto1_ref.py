"""Crypto1, the MIFARE Classic stream cipher: the pure-Python reference.

This module is the specification the Cython implementation (:mod:`firmware.core._crypto1`) is
checked against, so it models the cipher the way the published cryptanalysis describes it
(Garcia et al., "Dismantling MIFARE Classic", 2008) rather than the way fast code does:

* a 48-bit LFSR ``x0 .. x47``, held in an int with ``x_p`` at bit ``p``; ``x0`` is the oldest
  bit. Each clock drops ``x0`` and appends the feedback bit as ``x47``;
* the feedback is the XOR of taps 0, 5, 9, 10, 12, 14, 15, 17, 19, 24, 25, 27, 29, 35, 39,
  41, 42, 43, plus the input bit (and the keystream bit when the input is encrypted);
* the keystream bit is a two-layer filter of the 20 odd bits ``x9, x11, .. x47``: five 4-input
  functions (``fa`` on x9..x15 and x33..x39, ``fb`` on the other three groups) feeding one
  5-input function ``fc``.

Conventions (the ones of the published literature and tools, so traces check directly): the
key's first byte goes into the register first, each byte least significant bit first; a
32-bit word is the big-endian reading of its 4 on-air bytes, each byte sent LSB first.
"""

from __future__ import annotations

_TAPS = (0, 5, 9, 10, 12, 14, 15, 17, 19, 24, 25, 27, 29, 35, 39, 41, 42, 43)
_TAP_MASK = sum(1 << t for t in _TAPS)

# 4-input filter functions, indexed by (y0 y1 y2 y3) read as a binary number with y0 the most
# significant, where (y0, y1, y2, y3) = (x_a, x_a+2, x_a+4, x_a+6).
_FA = 0xD938
_FB = 0xF22C
# The 5-input output function, indexed by the five first-layer outputs with the group of
# x9..x15 as the least significant bit and the group of x41..x47 as the most significant.
_FC = 0xEC57E80A
_GROUPS = ((9, _FA), (17, _FB), (25, _FB), (33, _FA), (41, _FB))

_MASK48 = (1 << 48) - 1


def _filter(x: int) -> int:
    index = 0
    for n, (start, table) in enumerate(_GROUPS):
        y = (
            ((x >> start) & 1) << 3
            | ((x >> (start + 2)) & 1) << 2
            | ((x >> (start + 4)) & 1) << 1
            | ((x >> (start + 6)) & 1)
        )
        index |= ((table >> y) & 1) << n
    return (_FC >> index) & 1


def _parity(v: int) -> int:
    return v.bit_count() & 1


def key_to_lfsr(key: int) -> int:
    """The initial register for a 48-bit key (first key byte in the most significant byte)."""
    if not 0 <= key <= _MASK48:
        raise ValueError(f"a MIFARE Classic key has 48 bits, got 0x{key:x}")
    state = 0
    for p in range(48):
        byte_index, bit_in_byte = divmod(p, 8)
        state |= ((key >> (8 * (5 - byte_index) + bit_in_byte)) & 1) << p
    return state


class Crypto1Ref:
    """One Crypto1 cipher state, as held by a reader or a card during a session.

    ``bit``, ``byte`` and ``word`` shift input bits in and return the keystream bits produced
    on the way. With ``encrypted`` true the input is ciphertext: it is decrypted with the
    keystream bit before it is fed back, which is how the card absorbs the reader nonce.
    """

    __slots__ = ("lfsr",)

    def __init__(self, key: int) -> None:
        self.lfsr = key_to_lfsr(key)

    def peek(self) -> int:
        """The keystream bit the next clock will produce, without clocking.

        MIFARE Classic encrypts each parity bit with this bit: the one that will also
        encrypt the first bit of the next byte.
        """
        return _filter(self.lfsr)

    def bit(self, in1: int, encrypted: bool = False) -> int:
        x = self.lfsr
        ks = _filter(x)
        feedback = _parity(x & _TAP_MASK) ^ (in1 & 1) ^ (ks if encrypted else 0)
        self.lfsr = (x >> 1) | (feedback << 47)
        return ks

    def byte(self, in8: int, encrypted: bool = False) -> int:
        out = 0
        for i in range(8):
            out |= self.bit((in8 >> i) & 1, encrypted) << i
        return out

    def word(self, in32: int, encrypted: bool = False) -> int:
        out = 0
        for i in range(32):
            # on-air bit i is bit (i mod 8) of byte (i div 8), byte 0 being the most significant
            pos = 8 * (3 - (i >> 3)) + (i & 7)
            out |= self.bit((in32 >> pos) & 1, encrypted) << pos
        return out

    def encrypt_bytes(self, plain: bytes, feed: bool = False) -> tuple[bytes, int]:
        """Encrypt ``plain``; return the ciphertext and its encrypted parity bits (bit i for
        byte i). With ``feed`` the plaintext is shifted into the register (the reader nonce)."""
        out = bytearray(len(plain))
        parity = 0
        for i, b in enumerate(plain):
            out[i] = b ^ self.byte(b if feed else 0, False)
            parity |= (((b.bit_count() + 1) & 1) ^ self.peek()) << i
        return bytes(out), parity

    def decrypt_bytes(self, data: bytes, feed: bool = False) -> tuple[bytes, int]:
        """Decrypt ``data``; return the plaintext and the keystream bits that encrypted each
        byte's parity bit (bit i for byte i), so the caller can check the parity. With
        ``feed`` the ciphertext is decrypted into the register (the card absorbing {nr})."""
        out = bytearray(len(data))
        parity_ks = 0
        for i, c in enumerate(data):
            out[i] = c ^ self.byte(c if feed else 0, feed)
            parity_ks |= self.peek() << i
        return bytes(out), parity_ks


def prng_successor(x: int, n: int) -> int:
    """The card's 16-bit-LFSR nonce generator advanced ``n`` steps (``suc^n``).

    ``x`` is a 32-bit nonce in the word convention above. The generator is the LFSR of
    x^16 + x^14 + x^13 + x^11 + 1 over the nonce read in on-air order; ``ar = suc^64(nt)`` and
    ``at = suc^96(nt)`` in the authentication.
    """
    if n < 0:
        raise ValueError("the PRNG only runs forwards")
    v = int.from_bytes((x & 0xFFFFFFFF).to_bytes(4, "big"), "little")
    for _ in range(n):
        v = (v >> 1) | ((((v >> 16) ^ (v >> 18) ^ (v >> 19) ^ (v >> 21)) & 1) << 31)
    return int.from_bytes(v.to_bytes(4, "little"), "big")

