# cython: language_level=3
"""Crypto1, the Cython implementation of :mod:`firmware.core.crypto1_ref`.

Same API, same conventions; the reference is the specification and the test suite checks the
two against each other on random inputs. The speed comes from keeping the 48-bit register as
two 24-bit halves: the filter reads only the odd-indexed bits x9..x47, so with the odd half in
one machine word each first-layer filter input is a plain nibble and a clock is a shift and a
swap. The taps and filter tables are taken from the reference at import, so there is one
place that states them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
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
# The filter's first layer, two nibbles of the odd half per table: byte 0 (x41..x47 and
# x33..x39) gives bits 4 and 3 of FC's index, byte 1 bits 2 and 1, nibble 4 bit 0.
cdef unsigned char FILTER_LO[256]
cdef unsigned char FILTER_MID[256]
cdef unsigned char FILTER_HI[16]


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
        FILTER_LO[b] = ((FB >> (b & 0xF)) & 1) << 4 | ((FA >> (b >> 4)) & 1) << 3
        FILTER_MID[b] = ((FB >> (b & 0xF)) & 1) << 2 | ((FB >> (b >> 4)) & 1) << 1
    for b in range(16):
        FILTER_HI[b] = (FA >> b) & 1


_init_tables()


cdef inline uint32_t _filter(uint32_t odd) noexcept nogil:
    # nibble 0 of the odd half is (x41, x43, x45, x47) with x41 as its most significant bit,
    # nibble 4 is (x9 .. x15); the first-layer outputs index FC with x9..x15's as bit 0.
    # FB(nibble 0) << 4 | FA(nibble 1) << 3 | FB(nibble 2) << 2 | FB(nibble 3) << 1 | FA(nibble 4)
    cdef uint32_t idx = (
        FILTER_LO[odd & 0xFF] | FILTER_MID[(odd >> 8) & 0xFF] | FILTER_HI[(odd >> 16) & 0xF]
    )
    return (FC >> idx) & 1


cdef inline uint32_t _clock(Crypto1 c, uint32_t in1, bint encrypted) noexcept nogil:
    cdef uint32_t ks = _filter(c.odd)
    cdef uint32_t fb = in1 ^ (ks & encrypted)
    fb ^= __builtin_parity((c.odd & POLY_ODD) ^ (c.even & POLY_EVEN))
    cdef uint32_t t = c.odd
    c.odd = ((c.even << 1) | fb) & 0xFFFFFF
    c.even = t
    return ks


cdef class Crypto1:
    """One Crypto1 cipher state (Cython). See :class:`firmware.core.crypto1_ref.Crypto1Ref`.

    The register halves and the C-level methods are declared in ``_crypto1.pxd``.
    """

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

    cpdef int peek(self):
        """The keystream bit the next clock produces (it encrypts the parity bit before it)."""
        return _filter(self.odd)

    cpdef int bit(self, int in1, bint encrypted=False):
        return _clock(self, in1 & 1, encrypted)

    cpdef int byte(self, int in8, bint encrypted=False):
        cdef uint32_t out = 0
        cdef int i
        for i in range(8):
            out |= _clock(self, (in8 >> i) & 1, encrypted) << i
        return out

    cpdef uint32_t word(self, uint32_t in32, bint encrypted=False):
        cdef uint32_t out = 0
        cdef int i, pos
        for i in range(32):
            pos = i ^ 24   # on-air bit i: bit (i mod 8) of byte (i div 8), byte 0 most significant
            out |= _clock(self, (in32 >> pos) & 1, encrypted) << pos
        return out

    cdef void crypt(self, const unsigned char *src, unsigned char *dst, unsigned char *par,
                    Py_ssize_t n, bint feed, bint decrypt) noexcept nogil:
        cdef Py_ssize_t j
        cdef uint32_t b, ks, i, odd, even, fb, t
        feed = feed != 0
        decrypt = decrypt != 0
        # the register in locals: the compiler keeps it in registers across the loop
        odd = self.odd
        even = self.even
        for j in range(n):
            b = src[j]
            ks = 0
            for i in range(8):
                t = _filter(odd)
                ks |= t << i
                fb = ((b >> i) & 1) & feed
                fb ^= t & decrypt & feed
                fb ^= __builtin_parity((odd & POLY_ODD) ^ (even & POLY_EVEN))
                t = odd
                odd = ((even << 1) | fb) & 0xFFFFFF
                even = t
            dst[j] = b ^ ks
            if decrypt:
                par[j] = _filter(odd)
            else:
                par[j] = ODD_PARITY[b] ^ _filter(odd)
        self.odd = odd
        self.even = even

    cdef unsigned long long keystream_bits(self, int nbits) noexcept nogil:
        cdef unsigned long long out = 0
        cdef int i
        for i in range(nbits):
            out |= (<unsigned long long>_clock(self, 0, 0)) << i
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
                b |= _clock(self, 0, 0) << i
            out[j] = b
        return bytes(out)

    def encrypt_bytes(self, plain, bint feed=False):
        """Encrypt ``plain``; return the ciphertext and its encrypted parity bits (bit i for
        byte i). With ``feed`` the plaintext is shifted into the register (the reader nonce)."""
        if type(plain) is bytes:
            return _crypt_bytes(self, plain, feed, False)
        return _crypt_view(self, plain, feed, False)

    def decrypt_bytes(self, data, bint feed=False):
        """Decrypt ``data``; return the plaintext and the keystream bits that encrypted each
        byte's parity bit (bit i for byte i). With ``feed`` the ciphertext is decrypted into
        the register (the card absorbing {nr})."""
        if type(data) is bytes:
            return _crypt_bytes(self, data, feed, True)
        return _crypt_view(self, data, feed, True)


cdef object _result(Crypto1 c, const unsigned char *src, Py_ssize_t n, bint feed, bint decrypt):
    """(output bytes, parity bits as an int) of :meth:`Crypto1.crypt` over ``src``."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char small[64]
    cdef unsigned char *par = small
    cdef uint64_t par64 = 0
    cdef object parity
    cdef Py_ssize_t j
    if n > 64:
        par = <unsigned char *>PyMem_Malloc(n)
        if par == NULL:
            raise MemoryError()
    try:
        c.crypt(src, <unsigned char *>PyBytes_AS_STRING(out), par, n, feed, decrypt)
        for j in range(min(n, 64)):
            par64 |= (<uint64_t>par[j]) << j
        parity = par64
        for j in range(64, n):
            if par[j]:
                parity |= (<object>1) << j
        return out, parity
    finally:
        if par != small:
            PyMem_Free(par)


cdef object _crypt_bytes(Crypto1 c, bytes data, bint feed, bint decrypt):
    # bytes are immutable and ``crypt`` runs no Python code: the pointer stays valid
    return _result(c, <const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                   feed, decrypt)


cdef object _crypt_view(Crypto1 c, const unsigned char[:] data, bint feed, bint decrypt):
    # any other buffer (bytearray, memoryview, array('B'), strided or not), through a typed
    # memoryview as before, copied out element by element
    cdef Py_ssize_t n = data.shape[0], j
    cdef unsigned char small[64]
    cdef unsigned char *buf = small
    small[0] = 0  # (read by nobody when n == 0; keeps the compiler from guessing)
    if n > 64:
        buf = <unsigned char *>PyMem_Malloc(n)
        if buf == NULL:
            raise MemoryError()
    try:
        for j in range(n):
            buf[j] = data[j]
        return _result(c, buf, n, feed, decrypt)
    finally:
        if buf != small:
            PyMem_Free(buf)


def prng_successor(uint32_t x, long n):
    """The card's nonce generator advanced ``n`` steps; see the reference for the convention."""
    if n < 0:
        raise ValueError("the PRNG only runs forwards")
    return prng_suc(x, n)
