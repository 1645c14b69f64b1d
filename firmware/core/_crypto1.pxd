# cython: language_level=3
"""The C-level interface of :class:`Crypto1`, for :mod:`._framing` to ``cimport``.

The frame helpers encrypt or decrypt a whole frame, parity bits included, with one C call
(:meth:`Crypto1.crypt`) instead of a Python call per byte or bit and the conversions around
it. The register halves are declared here so the layout is stated once.
"""

from libc.stdint cimport uint32_t


cdef class Crypto1:
    cdef uint32_t odd
    cdef uint32_t even

    cpdef int peek(self)
    cpdef int bit(self, int in1, bint encrypted=*)
    cpdef int byte(self, int in8, bint encrypted=*)
    cpdef uint32_t word(self, uint32_t in32, bint encrypted=*)

    # ``n`` bytes of ``src`` through the cipher into ``dst``, exactly as encrypt_bytes
    # (``decrypt`` false) or decrypt_bytes (``decrypt`` true) do, and per byte its parity
    # keystream bit in ``par``: for encryption the encrypted parity bit of the plain byte, for
    # decryption the keystream bit that encrypted the byte's parity bit.
    cdef void crypt(self, const unsigned char *src, unsigned char *dst, unsigned char *par,
                    Py_ssize_t n, bint feed, bint decrypt) noexcept nogil

    # ``nbits`` keystream bits (zero input, not encrypted), first bit in bit 0: what
    # encrypt_bits/decrypt_bits XOR onto a 4-bit ACK/NACK.
    cdef unsigned long long keystream_bits(self, int nbits) noexcept nogil


cdef inline uint32_t prng_suc(uint32_t x, long n) noexcept nogil:
    """The card's nonce generator advanced ``n >= 0`` steps (see ``prng_successor``)."""
    cdef uint32_t v = ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)
    cdef uint32_t fb
    # Step i's feedback reads bits 16+i, 18+i, 19+i and 21+i of the starting word, which
    # the shifts have not replaced yet while 21 + i <= 31: 11 steps at once, as 11 bits.
    while n >= 11:
        fb = ((v >> 16) ^ (v >> 18) ^ (v >> 19) ^ (v >> 21)) & 0x7FF
        v = (v >> 11) | (fb << 21)
        n -= 11
    while n > 0:
        v = (v >> 1) | ((((v >> 16) ^ (v >> 18) ^ (v >> 19) ^ (v >> 21)) & 1) << 31)
        n -= 1
    return ((v & 0xFF) << 24) | ((v & 0xFF00) << 8) | ((v >> 8) & 0xFF00) | (v >> 24)
