# cython: language_level=3
"""Crypto1, the Cython implementation of :mod:`firmware.core.crypto1_ref`.

Same API, same conventions; the reference is the specification and the test suite checks the
two against each other on random inputs. The speed comes from keeping the 48-bit register as
two 24-bit halves: the filter reads only the odd-indexed bits x9..x47, so with the odd half in
one machine word each first-layer filter input is a plain nibble and a clock is a shift and a
swap. The taps and filter tables are taken from the reference at import, so there is one
place that states them.

Whole frames (:meth:`Crypto1.crypt`, every encrypted frame of a tap) go a byte at a time
rather than a bit at a time, because both parts of a clock, feedback and filter, are cheaper
in bulk:

* the feedback is linear in the register (and in the input bits) as long as the keystream is
  not fed back, so the 8 feedback bits of a byte are XORs of byte-indexed tables, built at
  import by clocking single-bit registers (:func:`_init_tables`), instead of 8 parities;
* after the byte, the odd half shifted right by 4, 3, 2, 1 and the even half shifted right by
  3, 2, 1, 0 are the odd halves the 8 clocks filtered. With both halves in one 64-bit word,
  the filter's Boolean formulas evaluated bitwise (bitsliced) give all of those keystream
  bits, and the next one (the parity bit's), in one pass of about 30 operations instead of 9
  table filters.

Only decryption that feeds the register (the card absorbing {nr}, 4 bytes per
authentication) feeds keystream back and must stay serial; it still takes its feedback from
the tables, plus one correction for the bits it decrypts.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from firmware.core import crypto1_ref as _ref
from firmware.core.errors import CoreError

cdef extern from *:
    int __builtin_parity(unsigned int) nogil

cdef uint32_t FA = _ref._FA
cdef uint32_t FB = _ref._FB
cdef uint32_t FC = _ref._FC

# The LFSR taps split into the two halves (x_p sits in the odd half at bit (47 - p) / 2 when p
# is odd, in the even half at bit (46 - p) / 2 when p is even). Compile-time constants so the
# per-bit clock ANDs with an immediate; _init_tables checks them against the reference's taps.
cdef enum:
    POLY_ODD = 0x29CE5C
    POLY_EVEN = 0x870804

cdef unsigned char ODD_PARITY[256]
# The filter as two lookups: FILTER_LO maps the low 12 bits of the odd half (nibbles 0..2:
# x41..x47, x33..x39, x25..x31) to the 4 bits of FC their first-layer outputs select (they are
# bits 4..2 of FC's index), FILTER_HI maps the next 8 bits (x17..x23, x9..x15) to the
# remaining two index bits, i.e. which of those 4 bits is the output.
cdef uint8_t FILTER_LO[4096]
cdef uint8_t FILTER_HI[256]
# The next 8 feedback bits (bit k for clock k, logical order) of a byte of zero input, as the
# XOR of one entry per register byte: LIN_ODD[i][v] for byte i of the odd half, LIN_EVEN for
# the even half. FEED_MIX[v] is what 8 input bits add (each input bit also reaches later
# feedback bits of the same byte through taps 41..43).
cdef uint8_t LIN_ODD[3][256]
cdef uint8_t LIN_EVEN[3][256]
cdef uint8_t FEED_MIX[256]
# FEED_MIX[v] == v ^ FEED_CARRY[v & 7]: what input bits 0..2 add to feedback bits 5..7.
cdef uint8_t FEED_CARRY[8]
# 8 feedback bits (logical order) as the 4 new bits of each half, placed for the 64-bit word
# (odd half in bits 0..31, even half in bits 32..63): fb1 fb3 fb5 fb7 to the odd half
# (fb7 lowest, being the newest x47), fb0 fb2 fb4 fb6 to the even half.
cdef uint64_t SPREAD[256]
# The 8 keystream bits of a byte from the bitsliced filter's bits 1..4 (odd half shifted
# right by 4 - m filters clock 2m) and 32..35 (even half shifted right by 3 - m: clock 2m + 1).
cdef uint8_t KS_ORDER[256]

# After a byte each half holds 28 useful bits: its 24 and the 4 it shifted out (still read by
# the filters of the byte's earlier clocks). Shifting by 4 again, these mask off what would
# cross into the other half or out of the 28.
cdef uint64_t KEEP = 0x0FFFFFF00FFFFFF0


cdef inline uint64_t _fa(uint64_t y0, uint64_t y1, uint64_t y2, uint64_t y3) noexcept nogil:
    # fa(y0..y3), y0 the most significant input bit (Garcia et al. 2008); each argument is a
    # word of independent bit positions, so one call evaluates fa at every position
    return ((y0 | y1) ^ (y0 & y3)) ^ (y2 & ((y0 ^ y1) | y3))


cdef inline uint64_t _fb(uint64_t y0, uint64_t y1, uint64_t y2, uint64_t y3) noexcept nogil:
    return ((y0 & y1) | y2) ^ ((y0 ^ y1) & (y2 | y3))


cdef inline uint64_t _fc(uint64_t z0, uint64_t z1, uint64_t z2, uint64_t z3,
                         uint64_t z4) noexcept nogil:
    # z0 is the first-layer output of x9..x15 (bit 0 of FC's index), z4 that of x41..x47
    return (z0 | ((z1 | z4) & (z3 ^ z4))) ^ ((z0 ^ (z1 & z3)) & ((z2 ^ z3) | (z1 & z4)))


cdef inline uint64_t _filter_sliced(uint64_t x) noexcept nogil:
    """Bit s of the result is the filter of ``x >> s`` (as an odd half), for every s whose
    20 input bits lie inside x's half: nibble i of an odd half starts at bit 4 i, and its
    most significant bit is fa's/fb's first input."""
    cdef uint64_t y0 = x >> 3, y1 = x >> 2, y2 = x >> 1
    cdef uint64_t a = _fa(y0, y1, y2, x)
    cdef uint64_t b = _fb(y0, y1, y2, x)
    return _fc(a >> 16, b >> 12, b >> 8, a >> 4, b)


cdef uint8_t _byte_feedback(uint32_t odd, uint32_t even, uint32_t inputs):
    """The 8 feedback bits (bit k for clock k) of 8 clocks with these inputs, not encrypted."""
    cdef Crypto1 probe = Crypto1.__new__(Crypto1)
    probe.odd = odd
    probe.even = even
    probe.byte(inputs, False)
    return probe.lfsr >> 40   # the register is now x8..x55: x48 + k, the k-th feedback, at 40 + k


def _init_tables():
    """Build the tables from the reference's taps and filter functions (and the per-bit clock
    built on them), and check the constants and formulas written out above against them: a
    mismatch is a broken build, so the module refuses to load rather than encrypt wrongly."""
    cdef int poly_odd = 0, poly_even = 0
    for p in _ref._TAPS:
        if p & 1:
            poly_odd |= 1 << ((47 - p) >> 1)
        else:
            poly_even |= 1 << ((46 - p) >> 1)
    if (poly_odd, poly_even) != (POLY_ODD, POLY_EVEN):
        raise CoreError("Crypto1 core: POLY_ODD/POLY_EVEN in _crypto1.pyx do not match "
                        "crypto1_ref._TAPS; fix the constants and rebuild")
    # a Boolean formula evaluated on the columns of a truth table gives its truth table
    if (_fa(0xFF00, 0xF0F0, 0xCCCC, 0xAAAA) != FA or _fb(0xFF00, 0xF0F0, 0xCCCC, 0xAAAA) != FB
            or _fc(0xAAAAAAAA, 0xCCCCCCCC, 0xF0F0F0F0, 0xFF00FF00, 0xFFFF0000) != FC):
        raise CoreError("Crypto1 core: the bitsliced filter formulas in _crypto1.pyx do not "
                        "match crypto1_ref._FA/_FB/_FC; fix them and rebuild")

    cdef uint32_t b, hi
    for b in range(256):
        ODD_PARITY[b] = (bin(b).count("1") + 1) & 1
        FILTER_HI[b] = ((FB >> (b & 0xF)) & 1) << 1 | ((FA >> (b >> 4)) & 1)
    for b in range(4096):
        hi = ((FB >> (b & 0xF)) & 1) << 2 | ((FA >> ((b >> 4) & 0xF)) & 1) << 1 | (
            (FB >> (b >> 8)) & 1)
        FILTER_LO[b] = (FC >> (4 * hi)) & 0xF

    # linear maps: the feedback of a byte from each register bit alone (and each input bit
    # alone), from this module's own per-bit clock (which the tests hold to the reference
    # bit for bit); the tables are XORs of those
    cdef uint8_t basis_odd[24]
    cdef uint8_t basis_even[24]
    cdef uint8_t basis_in[8]
    cdef int q, v, i, k, t
    cdef uint8_t mix, lo, ev, order
    for q in range(24):
        basis_odd[q] = _byte_feedback(<uint32_t>1 << q, 0, 0)
        basis_even[q] = _byte_feedback(0, <uint32_t>1 << q, 0)
    for k in range(8):
        basis_in[k] = _byte_feedback(0, 0, <uint32_t>1 << k)
    for v in range(256):
        mix = 0
        for k in range(8):
            if v >> k & 1:
                mix ^= basis_in[k]
        FEED_MIX[v] = mix
        for i in range(3):
            lo = ev = 0
            for k in range(8):
                if v >> k & 1:
                    lo ^= basis_odd[8 * i + k]
                    ev ^= basis_even[8 * i + k]
            LIN_ODD[i][v] = lo
            LIN_EVEN[i][v] = ev
        SPREAD[v] = (
            <uint64_t>((v >> 1 & 1) << 3 | (v >> 3 & 1) << 2 | (v >> 5 & 1) << 1 | (v >> 7 & 1))
            | <uint64_t>((v & 1) << 3 | (v >> 2 & 1) << 2 | (v >> 4 & 1) << 1 | (v >> 6 & 1)) << 32
        )
        order = 0
        for t in range(4):
            order |= (v >> t & 1) << (6 - 2 * t) | (v >> (4 + t) & 1) << (7 - 2 * t)
        KS_ORDER[v] = order
    for v in range(8):
        FEED_CARRY[v] = FEED_MIX[v] ^ v
    # the serial path applies FEED_CARRY after clock 2 and before clock 5: valid only if input
    # bits 3..7 reach no feedback bit of their byte but their own, and bits 0..2 only 5..7
    if any(FEED_MIX[v] != v ^ FEED_CARRY[v & 7] for v in range(256)) or any(
            FEED_CARRY[v] & 0x1F for v in range(8)):
        raise CoreError("Crypto1 core: crypto1_ref's taps let an input bit reach feedback "
                        "bits _decrypt_feed does not correct; rewrite it for those taps")


_init_tables()


cdef inline uint32_t _filter(uint32_t odd) noexcept nogil:
    # one keystream bit from the odd half (bits above 19 are ignored)
    return (FILTER_LO[odd & 0xFFF] >> FILTER_HI[(odd >> 12) & 0xFF]) & 1


cdef inline uint32_t _clock(Crypto1 c, uint32_t in1, bint encrypted) noexcept nogil:
    cdef uint32_t ks = _filter(c.odd)
    cdef uint32_t fb = in1 ^ (ks & encrypted)
    fb ^= __builtin_parity((c.odd & POLY_ODD) ^ (c.even & POLY_EVEN))
    cdef uint32_t t = c.odd
    c.odd = ((c.even << 1) | fb) & 0xFFFFFF
    c.even = t
    return ks


cdef inline uint32_t _feedback8(uint32_t odd, uint32_t even) noexcept nogil:
    """The next 8 feedback bits with zero input (bit k for clock k); only bits 0..23 read."""
    return (LIN_ODD[0][odd & 0xFF] ^ LIN_ODD[1][(odd >> 8) & 0xFF]
            ^ LIN_ODD[2][(odd >> 16) & 0xFF] ^ LIN_EVEN[0][even & 0xFF]
            ^ LIN_EVEN[1][(even >> 8) & 0xFF] ^ LIN_EVEN[2][(even >> 16) & 0xFF])


cdef void _crypt_linear(Crypto1 c, const unsigned char *src, unsigned char *dst,
                        unsigned char *par, Py_ssize_t n, bint feed, bint decrypt) noexcept nogil:
    """``crypt`` when no keystream is fed back: every mode but decryption with ``feed``."""
    # the odd half in bits 0..31, the even half in bits 32..63
    cdef uint64_t s = c.odd | (<uint64_t>c.even << 32)
    cdef uint64_t r, keep = KEEP
    cdef uint32_t b, fb, ks
    cdef uint32_t plain_parity = 0 if decrypt else 1   # encrypted parity needs the plain's
    cdef Py_ssize_t j
    for j in range(n):
        b = src[j]
        fb = _feedback8(<uint32_t>s, <uint32_t>(s >> 32))
        if feed:
            fb ^= FEED_MIX[b]
        s = ((s << 4) & keep) | SPREAD[fb]
        r = _filter_sliced(s)
        ks = KS_ORDER[((r >> 1) & 0xF) | ((r >> 28) & 0xF0)]
        dst[j] = b ^ ks
        # bit 0: the filter of the register after the byte, the parity bit's keystream
        par[j] = (r & 1) ^ (ODD_PARITY[b] & plain_parity)
    c.odd = s & 0xFFFFFF
    c.even = (s >> 32) & 0xFFFFFF


cdef void _decrypt_feed(Crypto1 c, const unsigned char *src, unsigned char *dst,
                        unsigned char *par, Py_ssize_t n) noexcept nogil:
    """``crypt`` decrypting into the register: each plaintext bit (ciphertext bit XOR keystream
    bit) is an input bit, so each clock waits for the previous keystream bit."""
    cdef uint32_t odd = c.odd, even = c.even
    cdef uint32_t b, fb, ks
    cdef Py_ssize_t j
    for j in range(n):
        b = src[j]
        # the feedback with the ciphertext as input; XOR in FEED_MIX[ks] bit by bit and it
        # has the plaintext as input: bit k of ks itself at clock k, bits 0..2 also into 5..7
        fb = _feedback8(odd, even) ^ FEED_MIX[b]
        # the halves trade roles every clock (see _clock), so clock k fills ``even`` when k is
        # even and ``odd`` when k is odd; the bits above 23 are left for the final mask
        ks = _filter(odd)
        even = (even << 1) | ((fb ^ ks) & 1)
        ks |= _filter(even) << 1
        odd = (odd << 1) | (((fb ^ ks) >> 1) & 1)
        ks |= _filter(odd) << 2
        even = (even << 1) | (((fb ^ ks) >> 2) & 1)
        fb ^= FEED_CARRY[ks]
        ks |= _filter(even) << 3
        odd = (odd << 1) | (((fb ^ ks) >> 3) & 1)
        ks |= _filter(odd) << 4
        even = (even << 1) | (((fb ^ ks) >> 4) & 1)
        ks |= _filter(even) << 5
        odd = (odd << 1) | (((fb ^ ks) >> 5) & 1)
        ks |= _filter(odd) << 6
        even = (even << 1) | (((fb ^ ks) >> 6) & 1)
        ks |= _filter(even) << 7
        odd = (odd << 1) | (((fb ^ ks) >> 7) & 1)
        dst[j] = b ^ ks
        par[j] = _filter(odd)
    c.odd = odd & 0xFFFFFF
    c.even = even & 0xFFFFFF


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
        if feed and decrypt:
            _decrypt_feed(self, src, dst, par, n)
        else:
            _crypt_linear(self, src, dst, par, n, feed, decrypt)

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
    cdef bytearray packed
    cdef unsigned char small[64]
    cdef unsigned char *par = small
    cdef unsigned char *bits
    cdef uint64_t par64 = 0
    cdef Py_ssize_t j
    if n > 64:
        par = <unsigned char *>PyMem_Malloc(n)
        if par == NULL:
            raise MemoryError()
    try:
        c.crypt(src, <unsigned char *>PyBytes_AS_STRING(out), par, n, feed, decrypt)
        if n <= 64:
            for j in range(n):
                par64 |= (<uint64_t>par[j]) << j
            return out, par64
        # a long frame: pack the bits and convert once (OR-ing bit j into a Python int copies
        # the int each time, quadratic in the frame length)
        packed = bytearray((n + 7) >> 3)
        bits = <unsigned char *>PyByteArray_AS_STRING(packed)
        for j in range(n):
            bits[j >> 3] |= par[j] << (j & 7)
        return out, int.from_bytes(packed, "little")
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
