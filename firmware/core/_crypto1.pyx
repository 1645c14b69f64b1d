# cython: language_level=3
"""Crypto1, the Cython implementation of :mod:`firmware.core.crypto1_ref`.

Same API, same conventions; the reference is the specification and the test suite checks the
two against each other on random inputs. The speed comes from keeping the 48-bit register as
two 24-bit halves: the filter reads only the odd-indexed bits x9..x47, so with the odd half in
one machine word each first-layer filter input is a plain nibble and a clock is a shift and a
swap. The taps and filter tables are taken from the reference at import, so there is one
place that states them.
"""

from libc.stdint cimport uint32_t, uint64_t

from firmware.core import crypto1_ref as _ref

cdef extern from *:
    int __builtin_parity(unsigned int) nogil

cdef uint32_t FA = _ref._FA
cdef uint32_t FB = _ref._FB
cdef uint32_t FC = _ref._FC
cdef uint32_t POLY_ODD = 0
cdef uint32_t POLY_EVEN = 0
cdef unsigned char ODD_PARITY[256]


def _init_tables():
    """Split the LFSR taps into the odd-half and even-half masks.

    x_p sits in the odd half at bit (47 - p) / 2 when p is odd, in the even half at bit
    (46 - p) / 2 when p is even.
    """
    global POLY_ODD, POLY_EVEN
    for p in _ref._TAPS:
        if p & 1:
            POLY_ODD |= 1 << ((47 - p) >> 1)
        else:
            POLY_EVEN |= 1 << ((46 - p) >> 1)
    for b in range(256):
        ODD_PARITY[b] = (bin(b).count("1") + 1) & 1


_init_tables()


cdef inline uint32_t _filter(uint32_t odd) noexcept nogil:
    # nibble 0 of the odd half is (x41, x43, x45, x47) with x41 as its most significant bit,
    # nibble 4 is (x9 .. x15); the first-layer outputs index FC with x9..x15's as bit 0.
    cdef uint32_t idx
    idx = ((FB >> (odd & 0xF)) & 1) << 4
    idx |= ((FA >> ((odd >> 4) & 0xF)) & 1) << 3
    idx |= ((FB >> ((odd >> 8) & 0xF)) & 1) << 2
    idx |= ((FB >> ((odd >> 12) & 0xF)) & 1) << 1
    idx |= (FA >> ((odd >> 16) & 0xF)) & 1
    return (FC >> idx) & 1


cdef class Crypto1:
    """One Crypto1 cipher state (Cython). See :class:`firmware.core.crypto1_ref.Crypto1Ref`."""

    cdef uint32_t odd
    cdef uint32_t even

    def __init__(self, key):
        cdef uint64_t k
        cdef int p, src
        if not isinstance(key, int):
            raise TypeError(f"a key is an int, not {type(key).__name__}")
        if not 0 <= key <= 0xFFFFFFFFFFFF:
            raise ValueError(f"a MIFARE Classic key has 48 bits, got 0x{key:x}")
        k = key
        self.odd = 0
        self.even = 0
        for p in range(48):
            # x_p is bit (p mod 8) of key byte (p div 8), byte 0 being the most significant
            src = 8 * (5 - (p >> 3)) + (p & 7)
            if p & 1:
                self.odd |= <uint32_t>((k >> src) & 1) << ((47 - p) >> 1)
            else:
                self.even |= <uint32_t>((k >> src) & 1) << ((46 - p) >> 1)

    @property
    def lfsr(self):
        """The register as the reference holds it (x_p at bit p), for cross-checking."""
        cdef uint64_t v = 0
        cdef int p
        for p in range(48):
            if p & 1:
                v |= <uint64_t>((self.odd >> ((47 - p) >> 1)) & 1) << p
            else:
                v |= <uint64_t>((self.even >> ((46 - p) >> 1)) & 1) << p
        return v

    cdef inline uint32_t _clock(self, uint32_t in1, bint encrypted) noexcept nogil:
        cdef uint32_t ks = _filter(self.odd)
        cdef uint32_t fb = in1 ^ (ks & encrypted)
        fb ^= __builtin_parity((self.odd & POLY_ODD) ^ (self.even & POLY_EVEN))
        cdef uint32_t t = self.odd
        self.odd = ((self.even << 1) | fb) & 0xFFFFFF
        self.even = t
        return ks

    cpdef int peek(self):
        """The keystream bit the next clock produces (it encrypts the parity bit before it)."""
        return _filter(self.odd)

    cpdef int bit(self, int in1, bint encrypted=False):
        return self._clock(in1 & 1, encrypted)

    cpdef int byte(self, int in8, bint encrypted=False):
        cdef uint32_t out = 0
        cdef int i
        for i in range(8):
            out |= self._clock((in8 >> i) & 1, encrypted) << i
        return out

    cpdef uint32_t word(self, uint32_t in32, bint encrypted=False):
        cdef uint32_t out = 0
        cdef int i, pos
        for i in range(32):
            pos = i ^ 24   # on-air bit i: bit (i mod 8) of byte (i div 8), byte 0 most significant
            out |= self._clock((in32 >> pos) & 1, encrypted) << pos
        return out

    def keystream(self, Py_ssize_t nbytes):
        """``nbytes`` of keystream with zero input (the benchmark's unit of work)."""
        cdef bytearray out = bytearray(nbytes)
        cdef Py_ssize_t j
        cdef int i
        cdef uint32_t b
        for j in range(nbytes):
            b = 0
            for i in range(8):
                b |= self._clock(0, 0) << i
            out[j] = b
        return bytes(out)

    def encrypt_bytes(self, const unsigned char[:] plain, bint feed=False):
        """Encrypt ``plain``; return the ciphertext and its encrypted parity bits (bit i for
        byte i). With ``feed`` the plaintext is shifted into the register (the reader nonce)."""
        cdef Py_ssize_t n = plain.shape[0], j
        cdef bytearray out = bytearray(n)
        cdef object parity = 0
        cdef uint64_t par64 = 0
        cdef uint32_t b, ks, i
        for j in range(n):
            b = plain[j]
            ks = 0
            for i in range(8):
                ks |= self._clock(((b >> i) & 1) if feed else 0, 0) << i
            out[j] = b ^ ks
            if j < 64:
                par64 |= <uint64_t>(ODD_PARITY[b] ^ _filter(self.odd)) << j
            else:
                parity |= (<object>(ODD_PARITY[b] ^ _filter(self.odd))) << j
        return bytes(out), parity | par64

    def decrypt_bytes(self, const unsigned char[:] data, bint feed=False):
        """Decrypt ``data``; return the plaintext and the keystream bits that encrypted each
        byte's parity bit (bit i for byte i). With ``feed`` the ciphertext is decrypted into
        the register (the card absorbing {nr})."""
        cdef Py_ssize_t n = data.shape[0], j
        cdef bytearray out = bytearray(n)
        cdef object parity = 0
        cdef uint64_t par64 = 0
        cdef uint32_t c, ks, i
        for j in range(n):
            c = data[j]
            ks = 0
            for i in range(8):
                ks |= self._clock(((c >> i) & 1) if feed else 0, feed) << i
            out[j] = c ^ ks
            if j < 64:
                par64 |= <uint64_t>_filter(self.odd) << j
            else:
                parity |= (<object>_filter(self.odd)) << j
        return bytes(out), parity | par64


def prng_successor(uint32_t x, long n):
    """The card's nonce generator advanced ``n`` steps; see the reference for the convention."""
    if n < 0:
        raise ValueError("the PRNG only runs forwards")
    cdef uint32_t v = ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)
    cdef long k
    for k in range(n):
        v = (v >> 1) | ((((v >> 16) ^ (v >> 18) ^ (v >> 19) ^ (v >> 21)) & 1) << 31)
    return ((v & 0xFF) << 24) | ((v & 0xFF00) << 8) | ((v >> 8) & 0xFF00) | (v >> 24)
