# cython: language_level=3
"""Bit framing and Crypto1 frame helpers, the Cython fast paths of :mod:`.iso14443a` and
:mod:`.crypto1`.

The pure-Python functions beside them (``crc_a_ref``, ``encode_ref``, ``split_ref``, ...,
``encrypt_frame_ref``) are the specification; ``tests/test_framing_fast.py`` checks the two
against each other on random inputs, exceptions and their messages included.

A fast path is taken only for the inputs the system really passes: ``bytes``/``bytearray``
data, ``list``/``tuple`` parity of ints, :class:`~.iso14443a.BitFrame` itself (not a subclass)
and the Cython :class:`~._crypto1.Crypto1` (not a subclass). Anything else — a memoryview, a
list of ints, the reference ``Crypto1Ref``, a frame of absurd length — is handed to the
reference, so every odd input behaves exactly as the specification says. BitFrame, the CRC
and parity tables and the references are looked up from :mod:`.iso14443a` and :mod:`.crypto1`
on first use (not at import), so the tables are stated in one place and either module may be
imported first.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint16_t, uint64_t
from libc.string cimport memcpy

from firmware.core._crypto1 import Crypto1 as _Crypto1
from firmware.core.errors import CrcError, FrameError, ParityError

cdef extern from *:
    """
    /* Little-endian unsigned bytes <-> Python int, through the public API where it exists. */
    static PyObject *afc_long_from_le(const unsigned char *buf, size_t n) {
    #if PY_VERSION_HEX >= 0x030D0000
        return PyLong_FromUnsignedNativeBytes(buf, (Py_ssize_t)n, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
    #else
        return _PyLong_FromByteArray(buf, n, 1, 0);
    #endif
    }

    /* 0 when the non-negative int v fits in n bytes (written to buf), else -1 with an
       exception set (negative, too large, or not an int). */
    static int afc_long_to_le(PyObject *v, unsigned char *buf, size_t n) {
    #if PY_VERSION_HEX >= 0x030D0000
        Py_ssize_t need = PyLong_AsNativeBytes(v, buf, (Py_ssize_t)n,
            Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
            | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
        if (need < 0) return -1;
        if ((size_t)need > n) {
            PyErr_SetString(PyExc_OverflowError, "int too big to convert");
            return -1;
        }
        return 0;
    #else
        if (!PyLong_Check(v)) {
            PyErr_SetString(PyExc_TypeError, "an int is required");
            return -1;
        }
        return _PyLong_AsByteArray((PyLongObject *)v, buf, n, 1, 0);
    #endif
    }
    """
    object afc_long_from_le(const unsigned char *buf, size_t n)
    int afc_long_to_le(object v, unsigned char *buf, size_t n) except -1
    long PyLong_AsLongAndOverflow(object v, int *overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLongMask(object v) except? <unsigned long long>-1

cdef enum:
    # frames up to this many data bytes are handled in stack buffers, longer ones on the heap
    SMALL = 72
    SMALL_PACKED = 81   # SMALL * 9 bits in bytes
    SMALL_BITS = 9      # SMALL bits in bytes
    # a BitFrame may claim any length: longer frames than this (bits) go to the reference
    MAX_FAST_BITS = 1 << 24

cdef uint16_t CRC_TABLE[256]
cdef unsigned int CRC_INIT = 0
cdef unsigned char PARITY[256]
cdef object _BitFrame = None   # also the "bound" flag: None until _bind() ran
cdef object _iso = None        # firmware.core.iso14443a, for its references
cdef object _c1 = None         # firmware.core.crypto1, for its references


cdef int _bind() except -1:
    """Take BitFrame, the tables and the references from iso14443a (first call only)."""
    global _BitFrame, _iso, CRC_INIT
    from firmware.core import iso14443a as m
    cdef int i
    table = m._CRC_TABLE
    parity = m._PARITY
    for i in range(256):
        CRC_TABLE[i] = table[i]
        PARITY[i] = parity[i]
    CRC_INIT = m.CRC_A_INIT
    _iso = m
    _BitFrame = m.BitFrame
    return 0


cdef object _crypto1_refs():
    global _c1
    if _c1 is None:
        from firmware.core import crypto1 as m
        _c1 = m
    return _c1


cdef inline bint _as_buf(object data, const unsigned char **p, Py_ssize_t *n) noexcept:
    """The contents of exact ``bytes`` or ``bytearray``; False for anything else."""
    if type(data) is bytes:
        p[0] = <const unsigned char *>PyBytes_AS_STRING(data)
        n[0] = PyBytes_GET_SIZE(data)
        return True
    if type(data) is bytearray:
        p[0] = <const unsigned char *>PyByteArray_AS_STRING(data)
        n[0] = PyByteArray_GET_SIZE(data)
        return True
    return False


cdef inline unsigned int _crc(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef unsigned int crc = CRC_INIT
    cdef Py_ssize_t i
    for i in range(n):
        crc = (crc >> 8) ^ CRC_TABLE[(crc ^ p[i]) & 0xFF]
    return crc


cdef inline Py_ssize_t _pack(const unsigned char *p, const unsigned char *par, Py_ssize_t n,
                             unsigned char *out) noexcept nogil:
    """9 bits per byte (8 data bits LSB first, then the parity bit: ``par[i]``, or the odd
    parity when ``par`` is NULL) into ``out``, little endian; returns the bytes written."""
    cdef uint64_t acc = 0
    cdef unsigned int accbits = 0
    cdef Py_ssize_t i, k = 0
    cdef unsigned int b, pb
    for i in range(n):
        b = p[i]
        pb = PARITY[b] if par == NULL else par[i]
        acc |= (<uint64_t>(b | (pb << 8))) << accbits
        accbits += 9
        while accbits >= 8:
            out[k] = <unsigned char>(acc & 0xFF)
            k += 1
            acc >>= 8
            accbits -= 8
    if accbits:
        out[k] = <unsigned char>acc
        k += 1
    return k


cdef inline void _unpack(const unsigned char *bits, Py_ssize_t n, unsigned char *data,
                         unsigned char *par) noexcept nogil:
    """Inverse of :func:`_pack`: ``n`` 9-bit groups into bytes and parity bits."""
    cdef Py_ssize_t i, pos, k
    cdef unsigned int chunk
    for i in range(n):
        pos = 9 * i
        k = pos >> 3
        # a 9-bit group always reaches into the next byte, which exists (pos + 8 < 9 n)
        chunk = ((bits[k] | (<unsigned int>bits[k + 1] << 8)) >> (pos & 7)) & 0x1FF
        data[i] = chunk & 0xFF
        par[i] = chunk >> 8


cdef object _make_frame(const unsigned char *buf, Py_ssize_t nbytes, Py_ssize_t length):
    return _BitFrame(afc_long_from_le(buf, <size_t>nbytes), length)


cdef object _encode(const unsigned char *p, const unsigned char *par, Py_ssize_t n):
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *out = small
    cdef Py_ssize_t nbytes = (9 * n + 7) // 8
    if n > SMALL:
        out = <unsigned char *>PyMem_Malloc(nbytes)
        if out == NULL:
            raise MemoryError()
    try:
        _pack(p, par, n, out)
        return _make_frame(out, nbytes, 9 * n)
    finally:
        if out != small:
            PyMem_Free(out)


cdef int _frame_bits(object frame, unsigned char *small, Py_ssize_t smallsize,
                     unsigned char **bits, Py_ssize_t *n_out) except -2:
    """The bits of a standard frame as little-endian bytes in ``small`` or a heap buffer
    (``*bits``; the caller frees it when it is not ``small``), ``*n_out`` data bytes.

    Returns 1 on success, 0 when the frame is not one the fast path handles (the caller then
    uses the reference); raises the reference's FrameError for a length that is not a whole
    number of 9-bit bytes.
    """
    cdef int overflow = 0
    cdef long length
    cdef Py_ssize_t n, nbytes
    cdef unsigned char *buf
    if type(frame) is not _BitFrame:
        return 0
    py_length = frame.length
    py_bits = frame.bits
    if type(py_length) is not int or type(py_bits) is not int:
        return 0
    length = PyLong_AsLongAndOverflow(py_length, &overflow)
    if overflow or length < 0 or length > MAX_FAST_BITS:
        return 0
    if length % 9:
        raise FrameError(f"frame of {length} bits is not a whole number of bytes with parity")
    n = length // 9
    nbytes = (length + 7) // 8
    buf = small
    if nbytes > smallsize:
        buf = <unsigned char *>PyMem_Malloc(nbytes)
        if buf == NULL:
            raise MemoryError()
    if nbytes:
        # negative bits, or more than the length (a frame built around the constructor's
        # check): the reference's arithmetic decides what that means
        if py_bits < 0:
            if buf != small:
                PyMem_Free(buf)
            return 0
        try:
            afc_long_to_le(py_bits, buf, <size_t>nbytes)
        except OverflowError:
            if buf != small:
                PyMem_Free(buf)
            return 0
    bits[0] = buf
    n_out[0] = n
    return 1


cdef inline void _bits_to_array(uint64_t v, Py_ssize_t n, unsigned char *out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = (v >> i) & 1


cdef int _int_bits_to_array(object v, Py_ssize_t n, unsigned char *out) except -1:
    """Bits 0..n-1 of the non-negative int ``v`` (which fits in n bits), one per byte."""
    cdef unsigned char small[SMALL_BITS]
    cdef unsigned char *buf = small
    cdef Py_ssize_t nb = (n + 7) // 8, i
    if n <= 64:
        _bits_to_array(PyLong_AsUnsignedLongLongMask(v), n, out)
        return 0
    if nb > <Py_ssize_t>sizeof(small):
        buf = <unsigned char *>PyMem_Malloc(nb)
        if buf == NULL:
            raise MemoryError()
    try:
        afc_long_to_le(v, buf, <size_t>nb)
        for i in range(n):
            out[i] = (buf[i >> 3] >> (i & 7)) & 1
    finally:
        if buf != small:
            PyMem_Free(buf)
    return 0


# ---------------------------------------------------------------------------------------------
# iso14443a
# ---------------------------------------------------------------------------------------------


def crc_a(data):
    """CRC_A of ``data`` (ITU-V.41 polynomial, preset 0x6363), 2 bytes, low byte first."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef unsigned int crc
    cdef unsigned char out[2]
    if _BitFrame is None:
        _bind()
    if not _as_buf(data, &p, &n):
        return _iso.crc_a_ref(data)
    crc = _crc(p, n)
    out[0] = crc & 0xFF
    out[1] = crc >> 8
    return PyBytes_FromStringAndSize(<char *>out, 2)


def with_crc(data):
    """``data`` followed by its CRC_A, as a card or reader sends it."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef unsigned int crc
    cdef bytes result
    cdef unsigned char *out
    if _BitFrame is None:
        _bind()
    if not _as_buf(data, &p, &n):
        return _iso.with_crc_ref(data)
    crc = _crc(p, n)
    # a bytes allocation runs no Python code, so p stays valid across it
    result = PyBytes_FromStringAndSize(NULL, n + 2)
    out = <unsigned char *>PyBytes_AS_STRING(result)
    memcpy(out, p, n)
    out[n] = crc & 0xFF
    out[n + 1] = crc >> 8
    return result


def strip_crc(frame):
    """Check the CRC_A at the end of ``frame`` and return the payload before it."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef unsigned int crc, sent
    if _BitFrame is None:
        _bind()
    if not _as_buf(frame, &p, &n):
        return _iso.strip_crc_ref(frame)
    if n < 3:
        raise CrcError(f"frame of {n} bytes is too short to carry a CRC_A")
    crc = _crc(p, n - 2)
    sent = p[n - 2] | (<unsigned int>p[n - 1] << 8)
    if crc != sent:
        raise CrcError(
            f"CRC_A mismatch: frame ends in {sent & 0xFF:02x}{sent >> 8:02x}, "
            f"contents give {crc & 0xFF:02x}{crc >> 8:02x}"
        )
    return PyBytes_FromStringAndSize(<const char *>p, n - 2)


def encode(data, parity=None):
    """A standard frame: each byte's 8 bits, LSB first, then its parity bit.

    ``parity`` overrides the computed odd parity per byte (MIFARE Classic sends encrypted
    parity bits); without it the standard odd parity is used.
    """
    cdef const unsigned char *p
    cdef Py_ssize_t n, np, i
    cdef unsigned char small[SMALL]
    cdef unsigned char *par
    cdef int overflow
    cdef long v
    cdef object item
    if _BitFrame is None:
        _bind()
    if not _as_buf(data, &p, &n):
        return _iso.encode_ref(data, parity)
    if parity is None:
        return _encode(p, NULL, n)
    if type(parity) is list:
        np = PyList_GET_SIZE(parity)
    elif type(parity) is tuple:
        np = PyTuple_GET_SIZE(parity)
    else:
        return _iso.encode_ref(data, parity)
    if np != n:
        raise FrameError(f"{np} parity bits given for {n} bytes")
    par = small
    if n > SMALL:
        par = <unsigned char *>PyMem_Malloc(n)
        if par == NULL:
            raise MemoryError()
    try:
        for i in range(n):
            if type(parity) is list:
                item = <object>PyList_GET_ITEM(parity, i)
            else:
                item = <object>PyTuple_GET_ITEM(parity, i)
            if type(item) is not int and type(item) is not bool:
                # anything else gets the reference's ``p & 1``, whatever that does
                return _iso.encode_ref(data, parity)
            overflow = 0
            v = PyLong_AsLongAndOverflow(item, &overflow)
            if overflow:
                # beyond a C long: the lowest bit of the two's complement, as ``p & 1``
                v = item & 1
            par[i] = v & 1
        return _encode(p, par, n)
    finally:
        if par != small:
            PyMem_Free(par)


def split(frame):
    """Split a standard frame into its bytes and its parity bits, checking nothing."""
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits
    cdef unsigned char *out
    cdef unsigned char psmall[SMALL]
    cdef unsigned char *par = psmall
    cdef Py_ssize_t n, i
    cdef bytes data
    cdef list parity
    if _BitFrame is None:
        _bind()
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _iso.split_ref(frame)
    try:
        if n > SMALL:
            par = <unsigned char *>PyMem_Malloc(n)
            if par == NULL:
                raise MemoryError()
        data = PyBytes_FromStringAndSize(NULL, n)
        out = <unsigned char *>PyBytes_AS_STRING(data)
        _unpack(bits, n, out, par)
        parity = [0] * n
        for i in range(n):
            if par[i]:
                parity[i] = 1
        return data, parity
    finally:
        if bits != small:
            PyMem_Free(bits)
        if par != psmall:
            PyMem_Free(par)


def decode(frame):
    """The bytes of a standard frame whose parity bits must be the plain odd parity."""
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits
    cdef unsigned char *out
    cdef unsigned char psmall[SMALL]
    cdef unsigned char *par = psmall
    cdef Py_ssize_t n, i
    cdef bytes data
    if _BitFrame is None:
        _bind()
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _iso.decode_ref(frame)
    try:
        if n > SMALL:
            par = <unsigned char *>PyMem_Malloc(n)
            if par == NULL:
                raise MemoryError()
        data = PyBytes_FromStringAndSize(NULL, n)
        out = <unsigned char *>PyBytes_AS_STRING(data)
        _unpack(bits, n, out, par)
        for i in range(n):
            if PARITY[out[i]] != par[i]:
                raise ParityError(f"parity error in byte {i} of {n} (0x{out[i]:02x})")
        return data
    finally:
        if bits != small:
            PyMem_Free(bits)
        if par != psmall:
            PyMem_Free(par)


# ---------------------------------------------------------------------------------------------
# crypto1 frame helpers
# ---------------------------------------------------------------------------------------------


def encrypt_frame(cipher, plain, feed=False):
    """A whole encrypted frame: data bytes and parity bits, each parity bit encrypted with the
    keystream bit that will encrypt the next data bit."""
    cdef unsigned char psmall[SMALL]
    cdef unsigned char *par = psmall
    cdef const unsigned char *p
    cdef Py_ssize_t n
    if type(cipher) is not _Crypto1:
        return _crypto1_refs().encrypt_frame_ref(cipher, plain, feed)
    if _BitFrame is None:
        _bind()
    data, parity = cipher.encrypt_bytes(plain, feed)
    if not _as_buf(data, &p, &n):   # Crypto1.encrypt_bytes returns bytes
        raise TypeError(f"Crypto1.encrypt_bytes returned {type(data).__name__}, not bytes")
    if n > SMALL:
        par = <unsigned char *>PyMem_Malloc(n)
        if par == NULL:
            raise MemoryError()
    try:
        _int_bits_to_array(parity, n, par)
        return _encode(p, par, n)
    finally:
        if par != psmall:
            PyMem_Free(par)


def decrypt_frame(cipher, frame, feed=False):
    """Decrypt a whole frame and check its decrypted parity bits.

    A parity mismatch means the other side does not hold the same key stream (wrong key, a
    forged frame or a bit error): it raises :class:`ParityError`.
    """
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char psmall[SMALL]
    cdef unsigned char ksmall[SMALL]
    cdef unsigned char *par = psmall
    cdef unsigned char *ks = ksmall
    cdef const unsigned char *q
    cdef Py_ssize_t n, i, m
    cdef bytes data
    if type(cipher) is not _Crypto1:
        return _crypto1_refs().decrypt_frame_ref(cipher, frame, feed)
    if _BitFrame is None:
        _bind()
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _crypto1_refs().decrypt_frame_ref(cipher, frame, feed)
    try:
        if n > SMALL:
            par = <unsigned char *>PyMem_Malloc(n)
            ks = <unsigned char *>PyMem_Malloc(n)
            if par == NULL or ks == NULL:
                raise MemoryError()
        data = PyBytes_FromStringAndSize(NULL, n)
        _unpack(bits, n, <unsigned char *>PyBytes_AS_STRING(data), par)
        plain, ks_parity = cipher.decrypt_bytes(data, feed)
        # Crypto1.decrypt_bytes returns bytes of the same length
        if not _as_buf(plain, &q, &m) or m != n:
            raise TypeError("Crypto1.decrypt_bytes did not return bytes of the frame's length")
        _int_bits_to_array(ks_parity, m, ks)
        for i in range(m):
            if par[i] ^ ks[i] != PARITY[q[i]]:
                raise ParityError(f"encrypted parity error in byte {i} of {m}")
        return plain
    finally:
        if bits != small:
            PyMem_Free(bits)
        if par != psmall:
            PyMem_Free(par)
        if ks != ksmall:
            PyMem_Free(ks)


def encrypt_bits(cipher, value, nbits):
    """A short encrypted frame of ``nbits`` raw bits (the 4-bit ACK/NACK), LSB first."""
    cdef int overflow = 0
    cdef long count, i
    cdef uint64_t v, out = 0
    if type(cipher) is not _Crypto1 or type(value) is not int or type(nbits) is not int:
        return _crypto1_refs().encrypt_bits_ref(cipher, value, nbits)
    count = PyLong_AsLongAndOverflow(nbits, &overflow)
    if overflow or count < 0 or count > 64:
        return _crypto1_refs().encrypt_bits_ref(cipher, value, nbits)
    if _BitFrame is None:
        _bind()
    v = PyLong_AsUnsignedLongLongMask(value)   # the low 64 bits, two's complement if < 0
    clock = cipher.bit
    for i in range(count):
        out |= (((v >> i) & 1) ^ (<uint64_t>(<int>clock(0) & 1))) << i
    return _BitFrame(out, nbits)


def decrypt_bits(cipher, frame):
    """The plain value of a short encrypted frame (see :func:`encrypt_bits`)."""
    cdef int overflow = 0
    cdef long length, i
    cdef uint64_t v, out = 0
    if _BitFrame is None:
        _bind()
    if type(cipher) is not _Crypto1 or type(frame) is not _BitFrame:
        return _crypto1_refs().decrypt_bits_ref(cipher, frame)
    py_length = frame.length
    py_bits = frame.bits
    if type(py_length) is not int or type(py_bits) is not int:
        return _crypto1_refs().decrypt_bits_ref(cipher, frame)
    length = PyLong_AsLongAndOverflow(py_length, &overflow)
    if overflow:
        return _crypto1_refs().decrypt_bits_ref(cipher, frame)
    if length > 8:
        raise FrameError(f"a short encrypted frame has at most 8 bits, got {length}")
    v = PyLong_AsUnsignedLongLongMask(py_bits)
    clock = cipher.bit
    for i in range(length):
        out |= (((v >> i) & 1) ^ (<uint64_t>(<int>clock(0) & 1))) << i
    return out
