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

The cipher work is one C call per frame into :class:`~._crypto1.Crypto1` (``crypt``, declared
in ``_crypto1.pxd``), and the frames built here are BitFrame instances made without running
its ``__init__`` (their values fit by construction), which is most of a frame's cost in a
tap.

The last sections are the hot paths of :mod:`.mifare` itself, the frames of an open session
on both sides (a card's READ and WRITE, the reader's READ, command frames and ACKs) and the
whole authentication (the card's nonce for a plain or nested AUTH, its {at}, and the reader's
side of the exchange): each does what the Python method it stands in for does, hands
everything else back to that method, and ``tests/test_mifare.py`` runs whole sessions with and
without them and compares every answer, every state and every byte of card memory.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from firmware.core._crypto1 cimport Crypto1, prng_suc
from firmware.core.errors import CoreError, CrcError, FrameError, ParityError

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
    /* A new instance of the BitFrame dataclass with its three slots set through their member
       descriptors: what its __init__ does with object.__setattr__, minus the Python frame
       and the __post_init__ check, for values built here that fit by construction. */
    static PyObject *afc_new_frame(PyObject *cls, PyObject *d_bits, PyObject *d_length,
                                   PyObject *d_collision, PyObject *bits, PyObject *length,
                                   PyObject *collision) {
        PyTypeObject *t = (PyTypeObject *)cls;
        PyObject *f = t->tp_alloc(t, 0);
        if (f == NULL) return NULL;
        if (Py_TYPE(d_bits)->tp_descr_set(d_bits, f, bits) < 0
                || Py_TYPE(d_length)->tp_descr_set(d_length, f, length) < 0
                || Py_TYPE(d_collision)->tp_descr_set(d_collision, f, collision) < 0) {
            Py_DECREF(f);
            return NULL;
        }
        return f;
    }
    """
    object afc_new_frame(object cls, object d_bits, object d_length, object d_collision,
                         object bits, object length, object collision)
    object afc_long_from_le(const unsigned char *buf, size_t n)
    int afc_long_to_le(object v, unsigned char *buf, size_t n) except -1
    long PyLong_AsLongAndOverflow(object v, int *overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLongMask(object v) except? <unsigned long long>-1
    object PyLong_FromUnsignedLongLong(unsigned long long v)

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
# BitFrame's slot descriptors, for building frames without a trip through its __init__; None
# when BitFrame is not the slots dataclass this expects (then its constructor is called)
cdef object _D_BITS = None
cdef object _D_LENGTH = None
cdef object _D_COLLISION = None
cdef object _NO_COLLISION = -1
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
    _bind_slots(m.BitFrame)
    _BitFrame = m.BitFrame
    return 0


cdef int _bind_slots(object cls) except -1:
    global _D_BITS, _D_LENGTH, _D_COLLISION
    member = type(cls.__dict__.get("bits"))
    if (
        getattr(cls, "__slots__", None) != ("bits", "length", "collision")
        or any(type(cls.__dict__.get(n)) is not member for n in ("length", "collision"))
        or member.__name__ != "member_descriptor"
        or cls.__new__ is not object.__new__
        or cls.__dataclass_fields__["collision"].default != -1
    ):
        return 0
    _D_BITS = cls.__dict__["bits"]
    _D_LENGTH = cls.__dict__["length"]
    _D_COLLISION = cls.__dict__["collision"]
    return 0


cdef inline object _frame(object bits, object length):
    """``BitFrame(bits, length)`` for values that fit (checked by whoever built them)."""
    if _D_BITS is None:
        return _BitFrame(bits, length)
    return afc_new_frame(_BitFrame, _D_BITS, _D_LENGTH, _D_COLLISION, bits, length,
                         _NO_COLLISION)


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
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    if nbytes <= 8:
        # a frame of up to 7 bytes with parity (commands, nonces, {at}): one machine word
        for i in range(nbytes):
            v |= (<uint64_t>buf[i]) << (8 * i)
        return _frame(PyLong_FromUnsignedLongLong(v), length)
    return _frame(afc_long_from_le(buf, <size_t>nbytes), length)


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
    cdef Py_ssize_t n, nbytes, i
    cdef unsigned char *buf
    cdef uint64_t v
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
        if nbytes <= 8:
            # up to 7 bytes with parity: one machine word, no byte-array conversion
            try:
                v = py_bits  # Cython's conversion reads the int's digits in place
            except OverflowError:
                v = 0
                overflow = 1
            if overflow or (nbytes < 8 and v >> (8 * nbytes)):
                if buf != small:  # pragma: no cover - every caller's ``small`` holds 8
                    PyMem_Free(buf)
                return 0
            for i in range(nbytes):
                buf[i] = (v >> (8 * i)) & 0xFF
        else:
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
    cdef unsigned char dsmall[SMALL]
    cdef unsigned char *par = psmall
    cdef unsigned char *enc = dsmall
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef bint fed
    if type(cipher) is not Crypto1:
        return _crypto1_refs().encrypt_frame_ref(cipher, plain, feed)
    if _BitFrame is None:
        _bind()
    if not _as_buf(plain, &p, &n):
        # any other buffer: through encrypt_bytes, which takes whatever a memoryview takes
        return _encrypt_frame_via_bytes(<Crypto1>cipher, plain, feed)
    fed = feed
    if n > SMALL:
        par = <unsigned char *>PyMem_Malloc(n)
        enc = <unsigned char *>PyMem_Malloc(n)
        if par == NULL or enc == NULL:
            PyMem_Free(par)
            PyMem_Free(enc)
            raise MemoryError()
    try:
        # ``crypt`` runs no Python code, so ``p`` (even into a bytearray) stays valid
        (<Crypto1>cipher).crypt(p, enc, par, n, fed, False)
        return _encode(enc, par, n)
    finally:
        if par != psmall:
            PyMem_Free(par)
            PyMem_Free(enc)


cdef object _encrypt_frame_via_bytes(Crypto1 cipher, object plain, object feed):
    cdef unsigned char psmall[SMALL]
    cdef unsigned char *par = psmall
    cdef const unsigned char *p
    cdef Py_ssize_t n
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
    cdef unsigned char dsmall[SMALL]
    cdef unsigned char *par = psmall
    cdef unsigned char *ks = ksmall
    cdef unsigned char *enc = dsmall
    cdef unsigned char *q
    cdef Py_ssize_t n, i
    cdef bytes plain
    cdef bint fed
    if type(cipher) is not Crypto1:
        return _crypto1_refs().decrypt_frame_ref(cipher, frame, feed)
    if _BitFrame is None:
        _bind()
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _crypto1_refs().decrypt_frame_ref(cipher, frame, feed)
    try:
        fed = feed
        if n > SMALL:
            par = <unsigned char *>PyMem_Malloc(n)
            ks = <unsigned char *>PyMem_Malloc(n)
            enc = <unsigned char *>PyMem_Malloc(n)
            if par == NULL or ks == NULL or enc == NULL:
                raise MemoryError()
        _unpack(bits, n, enc, par)
        plain = PyBytes_FromStringAndSize(NULL, n)
        q = <unsigned char *>PyBytes_AS_STRING(plain)
        # the whole frame goes through the cipher before the parity is judged, as the
        # reference does: the cipher state afterwards does not depend on where it fails
        (<Crypto1>cipher).crypt(enc, q, ks, n, fed, True)
        for i in range(n):
            if par[i] ^ ks[i] != PARITY[q[i]]:
                raise ParityError(f"encrypted parity error in byte {i} of {n}")
        return plain
    finally:
        if bits != small:
            PyMem_Free(bits)
        if par != psmall:
            PyMem_Free(par)
        if ks != ksmall:
            PyMem_Free(ks)
        if enc != dsmall:
            PyMem_Free(enc)


def encrypt_bits(cipher, value, nbits):
    """A short encrypted frame of ``nbits`` raw bits (the 4-bit ACK/NACK), LSB first."""
    cdef int overflow = 0
    cdef long count
    cdef uint64_t v, out
    if type(cipher) is not Crypto1 or type(value) is not int or type(nbits) is not int:
        return _crypto1_refs().encrypt_bits_ref(cipher, value, nbits)
    count = PyLong_AsLongAndOverflow(nbits, &overflow)
    if overflow or count < 0 or count > 64:
        return _crypto1_refs().encrypt_bits_ref(cipher, value, nbits)
    if _BitFrame is None:
        _bind()
    v = PyLong_AsUnsignedLongLongMask(value)   # the low 64 bits, two's complement if < 0
    out = v ^ (<Crypto1>cipher).keystream_bits(<int>count)
    if count < 64:
        out &= (<uint64_t>1 << count) - 1
    return _frame(out, nbits)


def decrypt_bits(cipher, frame):
    """The plain value of a short encrypted frame (see :func:`encrypt_bits`)."""
    cdef int overflow = 0
    cdef long length
    cdef uint64_t v, out
    if _BitFrame is None:
        _bind()
    if type(cipher) is not Crypto1 or type(frame) is not _BitFrame:
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
    if length <= 0:
        return 0
    v = PyLong_AsUnsignedLongLongMask(py_bits)
    out = (v ^ (<Crypto1>cipher).keystream_bits(<int>length)) & ((<uint64_t>1 << length) - 1)
    return out


def encrypt_reader_answer(cipher, nr, ar):
    """The reader's {nr}{ar} frame of the authentication: ``nr`` encrypted while it is fed
    into the register, ``ar`` encrypted without feeding, each parity bit encrypted with the
    keystream bit after its byte."""
    cdef unsigned char psmall[SMALL]
    cdef unsigned char dsmall[SMALL]
    cdef const unsigned char *p1
    cdef const unsigned char *p2
    cdef Py_ssize_t n1, n2
    if (
        type(cipher) is not Crypto1
        or not _as_buf(nr, &p1, &n1)
        or not _as_buf(ar, &p2, &n2)
        or n1 + n2 > SMALL
    ):
        return _crypto1_refs().encrypt_reader_answer_ref(cipher, nr, ar)
    if _BitFrame is None:
        _bind()
    (<Crypto1>cipher).crypt(p1, dsmall, psmall, n1, True, False)
    (<Crypto1>cipher).crypt(p2, dsmall + n1, psmall + n1, n2, False, False)
    return _encode(dsmall, psmall, n1 + n2)


def decrypt_reader_answer(cipher, frame):
    """The card's side of :func:`encrypt_reader_answer`: the plain ``nr || ar`` (8 bytes) of
    an {nr}{ar} frame, ``nr`` decrypted into the register.

    :class:`FrameError` for a frame that is not 8 bytes with parity (the cipher untouched),
    :class:`ParityError` when a decrypted parity bit is wrong (after all 8 bytes went through
    the cipher): the reader does not hold the key.
    """
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char par[8]
    cdef unsigned char ks[8]
    cdef unsigned char enc[8]
    cdef unsigned char *q
    cdef Py_ssize_t n, i
    cdef bytes plain
    if type(cipher) is not Crypto1:
        return _crypto1_refs().decrypt_reader_answer_ref(cipher, frame)
    if _BitFrame is None:
        _bind()
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _crypto1_refs().decrypt_reader_answer_ref(cipher, frame)
    try:
        if n != 8:
            raise FrameError(
                f"the reader's answer {{nr}}{{ar}} must be 8 bytes with parity, got {n}"
            )
        _unpack(bits, 8, enc, par)
        plain = PyBytes_FromStringAndSize(NULL, 8)
        q = <unsigned char *>PyBytes_AS_STRING(plain)
        (<Crypto1>cipher).crypt(enc, q, ks, 4, True, True)
        (<Crypto1>cipher).crypt(enc + 4, q + 4, ks + 4, 4, False, True)
        for i in range(8):
            if par[i] ^ ks[i] != PARITY[q[i]]:
                raise ParityError(f"encrypted parity error in byte {i} of 8")
        return plain
    finally:
        if bits != small:
            PyMem_Free(bits)


# ---------------------------------------------------------------------------------------------
# MIFARE Classic card: a frame in an open session
# ---------------------------------------------------------------------------------------------

cdef object _ClassicCard = None    # firmware.core.mifare.ClassicCard, bound on first use
cdef object _ClassicReader = None
cdef object _ClassicTag = None
cdef object _PICC_ACTIVE = None
cdef object _HLTA_BITS = None
cdef object _ST_HALTED = None
cdef object _ST_ABORTED = None
cdef object _ST_ACTIVE = None
cdef object _KT_A = None           # classic_layout.KeyType.A / .B
cdef object _KT_B = None
cdef int _CMD_AUTH_A = 0, _CMD_AUTH_B = 0
cdef object _ST_AUTHENTICATED = None
cdef object _ST_AUTH_NONCE_SENT = None
cdef object _ST_WRITE_PENDING = None
cdef object _ST_VALUE_PENDING = None
cdef int _CMD_READ = 0, _CMD_WRITE = 0, _ACK = 0, _NACK_CRC = 0, _NACK_INVALID_OP = 0
cdef int _CMD_TRANSFER = 0, _CMD_INCREMENT = 0, _CMD_DECREMENT = 0, _CMD_RESTORE = 0
cdef object _VALUE_OPS = None      # mifare._VALUE_OPS: command -> operation name
cdef object _SILENCE = None


cdef int _bind_card() except -1:
    global _ClassicCard, _ClassicReader, _ST_AUTHENTICATED, _ST_WRITE_PENDING
    global _ST_VALUE_PENDING, _ST_AUTH_NONCE_SENT
    global _CMD_READ, _CMD_WRITE, _ACK, _NACK_CRC, _NACK_INVALID_OP
    from firmware.core import mifare as m
    _ST_AUTHENTICATED = m.CardState.AUTHENTICATED
    _ST_AUTH_NONCE_SENT = m.CardState.AUTH_NONCE_SENT
    _ST_WRITE_PENDING = m.CardState.WRITE_PENDING
    _ST_VALUE_PENDING = m.CardState.VALUE_PENDING
    global _CMD_TRANSFER, _CMD_INCREMENT, _CMD_DECREMENT, _CMD_RESTORE, _VALUE_OPS, _SILENCE
    _CMD_READ, _CMD_WRITE, _ACK = m.READ, m.WRITE, m.ACK
    _CMD_TRANSFER, _CMD_INCREMENT = m.TRANSFER, m.INCREMENT
    _CMD_DECREMENT, _CMD_RESTORE = m.DECREMENT, m.RESTORE
    _VALUE_OPS = m._VALUE_OPS
    _SILENCE = m.SILENCE
    _NACK_CRC, _NACK_INVALID_OP = m.NACK_CRC, m.NACK_INVALID_OP
    global _ST_ACTIVE, _KT_A, _KT_B, _CMD_AUTH_A, _CMD_AUTH_B
    _ST_ACTIVE = m.CardState.ACTIVE
    _KT_A, _KT_B = m.KeyType.A, m.KeyType.B
    _CMD_AUTH_A, _CMD_AUTH_B = m.AUTH_A, m.AUTH_B
    from firmware.core import anticollision as a
    global _ClassicTag, _PICC_ACTIVE, _HLTA_BITS, _ST_HALTED, _ST_ABORTED
    if a.HLTA_FRAME.length != 36:  # pragma: no cover - ISO 14443-3 fixes it
        raise AssertionError("HLTA is 4 bytes with parity")
    _PICC_ACTIVE = a.PiccState.ACTIVE
    _HLTA_BITS = a.HLTA_FRAME.bits
    _ST_HALTED = m.CardState.HALTED
    _ST_ABORTED = m.CardState.ABORTED
    _ClassicTag = m.ClassicTag
    _ClassicReader = m.ClassicReader
    _ClassicCard = m.ClassicCard
    return 0


def classic_card_frame(card, frame):
    """What :meth:`ClassicCard.handle <firmware.core.mifare.ClassicCard.handle>` answers to a
    standard frame in an open session or to a plain AUTH outside one, or None (then nothing
    happened) when the frame or the card is not one this handles: another state, another
    cipher, another card class.

    The session's frames are the bulk of a tap, and most of them are READs: the frame is
    decrypted and its parity and CRC_A checked here in one pass, a READ of a permitted data
    block, a permitted WRITE command and an AUTH (nested: the nonce encrypted) are answered
    here, and everything else goes to the card's own methods (``_abort``, ``_nack``,
    ``_command``, ``_write_data``, ``_value_operand``, ``_permits``, ``_send_nonce``) with
    the decrypted payload, exactly where ``handle`` would have sent it. The reader's
    {nr}{ar} is answered here too, and in the ACTIVE state (no session) a plain AUTH-A/AUTH-B
    with good parity and CRC_A; any other frame there is left to ``handle``.
    ``tests/test_mifare.py`` runs cards with and without this path side by side.
    """
    return _card_frame(card, frame)


def classic_tag_frame(tag, frame):
    """What :meth:`ClassicTag.handle <firmware.core.mifare.ClassicTag.handle>` answers to a
    frame in an open session or a plain AUTH (:func:`classic_card_frame` behind a selected
    activation layer), or None (then nothing happened).

    A frame the activation layer could claim in ACTIVE (7 bits, an exact HLTA, a SELECT's 81
    bits) is left to ``handle``; after the card's answer, a card that halted or aborted takes
    its activation layer along, as ``handle`` does.
    """
    cdef int overflow = 0
    cdef long length
    if _ClassicCard is None:
        _bind_card()
    if _BitFrame is None:
        _bind()
    if type(tag) is not _ClassicTag or type(frame) is not _BitFrame:
        return None
    selector = tag.selector
    if selector.state is not _PICC_ACTIVE:
        return None
    py_length = frame.length
    if type(py_length) is not int:
        return None
    length = PyLong_AsLongAndOverflow(py_length, &overflow)
    if overflow or length == 7 or length == 81 or (length == 36 and frame.bits == _HLTA_BITS):
        return None
    card = tag.card
    answer = _card_frame(card, frame)
    if answer is None:
        return None
    state = card.state
    if state is _ST_HALTED:
        selector.halt()
        card.reset()
    elif state is _ST_ABORTED:
        selector.abort()
        card.reset()
    return answer


cdef object _card_frame(object card, object frame):
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char enc[SMALL]
    cdef unsigned char par[SMALL]
    cdef unsigned char ks[SMALL]
    cdef unsigned char plain[SMALL]
    cdef Py_ssize_t n, i
    cdef unsigned int crc
    cdef int overflow = 0
    cdef long length
    cdef Crypto1 cipher
    if _ClassicCard is None:
        _bind_card()
    if _BitFrame is None:
        _bind()
    if type(card) is not _ClassicCard or type(frame) is not _BitFrame:
        return None
    state = card.state
    if state is _ST_AUTH_NONCE_SENT:
        return _card_finish_auth(card, frame)
    if state is _ST_ACTIVE:
        return _card_plain_auth(card, frame)
    if (
        state is not _ST_AUTHENTICATED
        and state is not _ST_WRITE_PENDING
        and state is not _ST_VALUE_PENDING
    ):
        return None
    c = card.cipher
    if type(c) is not Crypto1:
        return None
    py_length = frame.length
    if type(py_length) is not int:
        return None
    length = PyLong_AsLongAndOverflow(py_length, &overflow)
    if overflow or length <= 0 or length % 9 or length > 9 * SMALL:
        return None
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return None
    # from here on this is handle(): decrypt_frame, strip_crc, then the dispatch
    _unpack(bits, n, enc, par)
    if bits != small:  # pragma: no cover - n <= SMALL fits ``small``
        PyMem_Free(bits)
    cipher = <Crypto1>c
    cipher.crypt(enc, plain, ks, n, False, True)
    for i in range(n):
        if par[i] ^ ks[i] != PARITY[plain[i]]:
            return card._abort()  # a frame the chip cannot read: the session ends
    if n < 3:
        return card._nack(_NACK_CRC)
    crc = _crc(plain, n - 2)
    if crc != (plain[n - 2] | (<unsigned int>plain[n - 1] << 8)):
        return card._nack(_NACK_CRC)
    try:
        answer = None
        if state is _ST_AUTHENTICATED:
            if n == 4:
                if plain[0] == _CMD_READ:
                    answer = _card_read(card, cipher, plain[1])
                elif plain[0] == _CMD_WRITE:
                    answer = _card_write(card, cipher, plain[1])
                elif plain[0] == _CMD_TRANSFER:
                    answer = _card_transfer(card, cipher, plain[1])
                elif plain[0] == _CMD_AUTH_A or plain[0] == _CMD_AUTH_B:
                    answer = _card_start_auth(card, plain[0], plain[1])  # nested
                elif (
                    plain[0] == _CMD_DECREMENT
                    or plain[0] == _CMD_INCREMENT
                    or plain[0] == _CMD_RESTORE
                ):
                    answer = _card_value_command(card, cipher, plain[0], plain[1])
        elif state is _ST_WRITE_PENDING:
            if n == 18:
                answer = _card_write_data(card, cipher, plain)
        elif n == 6:  # VALUE_PENDING
            answer = _card_value_operand(card, plain)
        if answer is not None:
            return answer
        payload = PyBytes_FromStringAndSize(<char *>plain, n - 2)
        if state is _ST_WRITE_PENDING:
            return card._write_data(payload)
        if state is _ST_VALUE_PENDING:
            return card._value_operand(payload)
        return card._command(payload)
    except CoreError:
        # memory that no longer decodes (a torn value block, broken access bits)
        return card._nack(_NACK_INVALID_OP)


cdef object _card_plain_auth(object card, object frame):
    """``handle`` for a plain AUTH-A/AUTH-B outside a session (state ACTIVE): ``decode``,
    ``strip_crc`` and ``_command``'s dispatch, then :func:`_card_start_auth`. None, with
    nothing done, for any other frame (then ``handle`` runs: a bad frame aborts, other
    commands are refused or halt the card) or a block not on the card."""
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char data[4]
    cdef unsigned char par[4]
    cdef Py_ssize_t n
    cdef int overflow = 0
    cdef int i
    py_length = frame.length
    if type(py_length) is not int or PyLong_AsLongAndOverflow(py_length, &overflow) != 36:
        return None
    if overflow or card.cipher is not None:
        return None
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return None
    _unpack(bits, 4, data, par)
    if bits != small:  # pragma: no cover - 4 bytes fit ``small``
        PyMem_Free(bits)
    for i in range(4):
        if par[i] != PARITY[data[i]]:
            return None
    if _crc(data, 2) != (data[2] | (<unsigned int>data[3] << 8)):
        return None
    if data[0] != _CMD_AUTH_A and data[0] != _CMD_AUTH_B:
        return None
    try:
        return _card_start_auth(card, data[0], data[1])
    except CoreError:
        # as handle() answers a CoreError out of _command
        return card._nack(_NACK_INVALID_OP)


cdef object _card_start_auth(object card, int cmd, int block):
    """``_start_auth`` with the Cython cipher: the key from the sector trailer in memory, the
    nonce from the card's ``_nonces()``, the new cipher from its ``_new_cipher``, and the
    nonce frame, plain or (nested) encrypted under the new cipher; every state attribute set
    as ``_start_auth`` sets it. None, with nothing done, for a block not on the card or a
    card this does not handle (then ``_command`` answers). A nonce that is not an ``int``
    goes to ``_send_nonce``, where ``_start_auth`` would have taken it."""
    cdef unsigned char key[6]
    cdef unsigned char data[4]
    cdef unsigned char par[4]
    cdef const unsigned char *mem
    cdef int overflow = 0
    cdef long t
    cdef uint64_t k = 0, u, nt, ks
    cdef Crypto1 cipher
    cdef int i
    if block >= card._blocks or card._new_cipher is not Crypto1:
        return None
    py_cuid = card._cuid
    if type(py_cuid) is not int or not 0 <= py_cuid <= 0xFFFFFFFF:
        return None
    sector = card._sector_of[block]
    py_t = card._trailer_of[sector]
    if type(py_t) is not int:
        return None
    t = PyLong_AsLongAndOverflow(py_t, &overflow)
    memory = card.memory
    if (
        overflow
        or t < 0
        or type(memory) is not bytearray
        or PyByteArray_GET_SIZE(memory) < 16 * t + 16
    ):
        return None
    # key A is bytes 0..5 of the trailer, key B bytes 10..15
    mem = <const unsigned char *>PyByteArray_AS_STRING(memory) + 16 * t
    if cmd != _CMD_AUTH_A:
        mem += 10
    for i in range(6):
        key[i] = mem[i]
        k = (k << 8) | key[i]
    key_type = _KT_A if cmd == _CMD_AUTH_A else _KT_B
    nested = card.cipher is not None
    nonce = card._nonces()
    if type(nonce) is not int:
        return card._send_nonce(
            key_type, sector, PyBytes_FromStringAndSize(<char *>key, 6), nested, nonce
        )
    nt = PyLong_AsUnsignedLongLongMask(nonce) & 0xFFFFFFFF  # ``& 0xFFFFFFFF``, negatives too
    cipher = <Crypto1?>card._new_cipher(k)
    u = py_cuid
    ks = cipher.word(<uint32_t>(u ^ nt), False)
    if nested:
        # encrypt_nested_nonce
        _nonce_bytes(nt, ks, cipher.peek(), data, par)
        answer = _encode(data, par, 4)
    else:
        for i in range(4):
            data[i] = (nt >> (24 - 8 * i)) & 0xFF
        answer = _encode(data, NULL, 4)
    card.cipher = cipher
    card._nt = nt
    card.auth_sector = sector
    card.auth_key_type = key_type
    card._transfer_buffer = None
    card.state = _ST_AUTH_NONCE_SENT
    return answer


cdef object _card_finish_auth(object card, object frame):
    """``_finish_auth``: the reader's {nr}{ar} in, the card's {at} out (or the session
    aborted); None, with nothing done, for anything but an 8-byte frame with the Cython
    cipher."""
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char enc[8]
    cdef unsigned char par[8]
    cdef unsigned char ks[8]
    cdef unsigned char plain[8]
    cdef unsigned char at[4]
    cdef unsigned char apar[4]
    cdef Py_ssize_t n
    cdef int overflow = 0
    cdef uint32_t nt, ar, suc
    cdef int i
    c = card.cipher
    py_nt = card._nt
    if type(c) is not Crypto1 or type(py_nt) is not int or not 0 <= py_nt <= 0xFFFFFFFF:
        return None
    py_length = frame.length
    if type(py_length) is not int or PyLong_AsLongAndOverflow(py_length, &overflow) != 72:
        return None
    if overflow or not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return None
    _unpack(bits, 8, enc, par)
    if bits != small:  # pragma: no cover - 8 bytes fit ``small``
        PyMem_Free(bits)
    nt = py_nt
    # decrypt_reader_answer: {nr} decrypted into the register, {ar} after it
    (<Crypto1>c).crypt(enc, plain, ks, 4, True, True)
    (<Crypto1>c).crypt(enc + 4, plain + 4, ks + 4, 4, False, True)
    for i in range(8):
        if par[i] ^ ks[i] != PARITY[plain[i]]:
            return card._abort()
    ar = ((<uint32_t>plain[4] << 24) | (<uint32_t>plain[5] << 16)
          | (<uint32_t>plain[6] << 8) | plain[7])
    if ar != _suc(nt, 64):
        return card._abort()
    suc = _suc(nt, 96)
    card.state = _ST_AUTHENTICATED
    for i in range(4):
        at[i] = (suc >> (24 - 8 * i)) & 0xFF
    (<Crypto1>c).crypt(at, at, apar, 4, False, False)
    return _encode(at, apar, 4)


cdef object _card_read(object card, Crypto1 cipher, int block):
    """The answer to READ ``block`` when it is a permitted data block (else None: the card's
    ``_command`` answers, a NACK or a masked trailer)."""
    cdef unsigned char out[18]
    cdef unsigned char opar[18]
    cdef const unsigned char *mem
    cdef unsigned int crc
    if block >= card._blocks or card._is_trailer[block] or not card._permits(block, "read"):
        return None
    memory = card.memory
    if type(memory) is not bytearray or PyByteArray_GET_SIZE(memory) < 16 * block + 16:
        return None
    mem = <const unsigned char *>PyByteArray_AS_STRING(memory)
    memcpy(out, mem + 16 * block, 16)
    crc = _crc(out, 16)
    out[16] = crc & 0xFF
    out[17] = crc >> 8
    cipher.crypt(out, out, opar, 18, False, False)
    return _encode(out, opar, 18)


cdef inline object _card_ack(Crypto1 cipher):
    """The encrypted 4-bit ACK (``_ack()`` in a session)."""
    return _frame((_ACK ^ cipher.keystream_bits(4)) & 0xF, 4)


cdef unsigned char *_card_block(object card, object block, Py_ssize_t *index) except? NULL:
    """The card memory of ``block`` (a data block of the card, not a trailer) when memory is a
    bytearray that holds it, else NULL (the caller then leaves the frame to the card's
    methods); ``*index`` gets the block number.

    Only valid until Python code runs (a call into the card's methods may let another thread
    resize the bytearray): callers take it again after such a call."""
    cdef int overflow = 0
    cdef long b
    if type(block) is not int:
        return NULL
    b = PyLong_AsLongAndOverflow(block, &overflow)
    if overflow or b < 0 or b >= card._blocks or card._is_trailer[b]:
        return NULL
    memory = card.memory
    if type(memory) is not bytearray or PyByteArray_GET_SIZE(memory) < 16 * b + 16:
        return NULL
    index[0] = b
    return <unsigned char *>PyByteArray_AS_STRING(memory) + 16 * b


cdef inline uint32_t _le32(const unsigned char *d) noexcept nogil:
    return d[0] | (<uint32_t>d[1] << 8) | (<uint32_t>d[2] << 16) | (<uint32_t>d[3] << 24)


cdef bint _value_block(const unsigned char *d, long *value, int *addr) noexcept:
    """``layout.decode_value_block``'s check of a value block: every copy agrees."""
    cdef uint32_t v0 = _le32(d)
    cdef unsigned int a = d[12]
    if _le32(d + 4) != (v0 ^ 0xFFFFFFFF) or _le32(d + 8) != v0:
        return False
    if d[14] != a or (d[13] ^ a) != 0xFF or (d[15] ^ a) != 0xFF:
        return False
    value[0] = <long>(<int32_t>v0)
    addr[0] = a
    return True


cdef object _card_value_command(object card, Crypto1 cipher, int cmd, int block):
    """INCREMENT/DECREMENT/RESTORE of a permitted value block: the card waits for the
    operand (``_command``'s value branch); None for anything else."""
    cdef Py_ssize_t b
    cdef long value
    cdef int addr
    cdef unsigned char *d = _card_block(card, block, &b)
    if d == NULL or not card._permits(block, _VALUE_OPS[cmd]):
        return None
    d = _card_block(card, block, &b)  # again, after _permits' Python code
    if d == NULL or not _value_block(d, &value, &addr):
        return None
    card._pending_block = block
    card._pending_op = cmd
    card.state = _ST_VALUE_PENDING
    return _card_ack(cipher)


cdef object _card_value_operand(object card, const unsigned char *plain):
    """The 4-byte operand of a pending value command: the result goes to the transfer
    buffer and the card stays silent (``_value_operand``); None for anything unusual."""
    cdef Py_ssize_t b
    cdef long value, result
    cdef int addr
    cdef int32_t operand
    op = card._pending_op
    if type(op) is not int:
        return None
    cdef unsigned char *d = _card_block(card, card._pending_block, &b)
    if d == NULL or not _value_block(d, &value, &addr):
        return None
    operand = <int32_t>_le32(plain)
    result = value
    if op == _CMD_INCREMENT:
        result = value + operand
    elif op == _CMD_DECREMENT:
        result = value - operand
    if not -2147483648 <= result <= 2147483647:
        return None  # the card's own method NACKs and drops the transfer buffer
    card.state = _ST_AUTHENTICATED
    card._transfer_buffer = (result, addr)
    return _SILENCE


cdef object _card_transfer(object card, Crypto1 cipher, int block):
    """TRANSFER of the transfer buffer to a permitted value block (``_command``'s TRANSFER
    branch); None for anything else."""
    cdef Py_ssize_t b, i
    cdef long value
    cdef int addr, overflow = 0
    cdef uint32_t v
    tb = card._transfer_buffer
    if type(tb) is not tuple or len(tb) != 2 or type(tb[0]) is not int or type(tb[1]) is not int:
        return None
    value = PyLong_AsLongAndOverflow(tb[0], &overflow)
    if overflow or not -2147483648 <= value <= 2147483647 or not 0 <= tb[1] <= 0xFF:
        return None
    addr = tb[1]
    cdef unsigned char *d = _card_block(card, block, &b)
    if d == NULL or not card._permits(block, "transfer"):
        return None
    d = _card_block(card, block, &b)  # again, after _permits' Python code
    if d == NULL:
        return None
    # layout.encode_value_block(value, addr)
    v = <uint32_t>value
    for i in range(4):
        d[i] = (v >> (8 * i)) & 0xFF
        d[4 + i] = ((~v) >> (8 * i)) & 0xFF
        d[8 + i] = (v >> (8 * i)) & 0xFF
    d[12] = addr
    d[13] = addr ^ 0xFF
    d[14] = addr
    d[15] = addr ^ 0xFF
    return _card_ack(cipher)


cdef object _card_write_data(object card, Crypto1 cipher, const unsigned char *plain):
    """The 16 data bytes of a WRITE to a data block (``_write_data``; a trailer is left to
    it, for its field-by-field rules); None for anything else."""
    cdef Py_ssize_t b
    cdef unsigned char *d = _card_block(card, card._pending_block, &b)
    if d == NULL:
        return None
    memcpy(d, plain, 16)
    card.state = _ST_AUTHENTICATED
    return _card_ack(cipher)


cdef object _card_write(object card, Crypto1 cipher, int block):
    """The ACK to a permitted WRITE command (the card then waits for the data), else None."""
    if block >= card._blocks or not card._permits(block, "write"):
        return None
    card._pending_block = block
    card.state = _ST_WRITE_PENDING
    return _card_ack(cipher)


# ---------------------------------------------------------------------------------------------
# MIFARE Classic reader: READ in an open session
# ---------------------------------------------------------------------------------------------


def classic_reader_read(reader, block):
    """What :meth:`ClassicReader.read <firmware.core.mifare.ClassicReader.read>` returns for
    ``block`` in an open session with the Cython cipher and no tracer, or None (then nothing
    was sent) when it does not apply.

    The command frame is built and encrypted here, sent through the reader's ``transceive``,
    and an answer of the expected size (16 bytes and CRC_A with parity) is decrypted and
    checked here; any other answer goes to the reader's ``_encrypted_answer``, as ``read``
    does. A garbled answer drops the session and raises, as ``read`` does.
    """
    cdef unsigned char cmd[4]
    cdef unsigned char cpar[4]
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char enc[18]
    cdef unsigned char par[18]
    cdef unsigned char ks[18]
    cdef unsigned char plain[18]
    cdef Py_ssize_t n, i
    cdef unsigned int crc, sent
    cdef int overflow = 0
    cdef long b
    if _ClassicCard is None:
        _bind_card()
    if _BitFrame is None:
        _bind()
    if type(reader) is not _ClassicReader or type(block) is not int:
        return None
    c = reader.cipher
    if type(c) is not Crypto1 or reader._tracer:
        return None
    b = PyLong_AsLongAndOverflow(block, &overflow)
    if overflow or not 0 <= b <= 0xFF:
        return None
    cmd[0] = _CMD_READ
    cmd[1] = <unsigned char>b
    crc = _crc(cmd, 2)
    cmd[2] = crc & 0xFF
    cmd[3] = crc >> 8
    (<Crypto1>c).crypt(cmd, cmd, cpar, 4, False, False)
    answer = reader._transceive(_encode(cmd, cpar, 4))
    c = reader.cipher  # as read() does: the session as it is after the exchange
    if (
        type(c) is not Crypto1
        or type(answer) is not _BitFrame
        or answer.length != 162
        or not _frame_bits(answer, small, sizeof(small), &bits, &n)
    ):
        return reader._encrypted_answer(answer, f"READ block {block}", 16)
    _unpack(bits, 18, enc, par)
    if bits != small:  # pragma: no cover - 18 bytes fit ``small``
        PyMem_Free(bits)
    (<Crypto1>c).crypt(enc, plain, ks, 18, False, True)
    for i in range(18):
        if par[i] ^ ks[i] != PARITY[plain[i]]:
            reader.cipher = None
            raise ParityError(f"encrypted parity error in byte {i} of 18")
    crc = _crc(plain, 16)
    sent = plain[16] | (<unsigned int>plain[17] << 8)
    if crc != sent:
        reader.cipher = None
        raise CrcError(
            f"CRC_A mismatch: frame ends in {sent & 0xFF:02x}{sent >> 8:02x}, "
            f"contents give {crc & 0xFF:02x}{crc >> 8:02x}"
        )
    return PyBytes_FromStringAndSize(<char *>plain, 16)



# ---------------------------------------------------------------------------------------------
# Nested authentication: the encrypted card nonce
# ---------------------------------------------------------------------------------------------


cdef inline void _nonce_bytes(uint64_t nt, uint64_t ks, unsigned int next_bit,
                              unsigned char *data, unsigned char *par) noexcept nogil:
    # byte i of the words is their bits 31 - 8 i .. 24 - 8 i; byte i's parity bit is
    # encrypted with bit 0 of keystream byte i + 1 (the next clock's bit for the last one)
    cdef int i
    for i in range(4):
        data[i] = ((nt ^ ks) >> (24 - 8 * i)) & 0xFF
        par[i] = PARITY[(nt >> (24 - 8 * i)) & 0xFF] ^ (
            ((ks >> (16 - 8 * i)) & 1) if i < 3 else next_bit
        )


def encrypt_nested_nonce(cipher, cuid, nt):
    """The card's encrypted nonce {nt} of a nested authentication, under a fresh ``cipher``
    of the sector key: ``cuid ^ nt`` is fed in while the keystream encrypts ``nt``; the
    parity bits are encrypted with the keystream bit after each byte."""
    cdef unsigned char data[4]
    cdef unsigned char par[4]
    cdef uint64_t u, t, ks
    if (
        type(cipher) is not Crypto1
        or type(cuid) is not int
        or type(nt) is not int
        or not 0 <= cuid <= 0xFFFFFFFF
        or not 0 <= nt <= 0xFFFFFFFF
    ):
        return _crypto1_refs().encrypt_nested_nonce_ref(cipher, cuid, nt)
    if _BitFrame is None:
        _bind()
    u = cuid
    t = nt
    ks = (<Crypto1>cipher).word(<uint32_t>(u ^ t), False)
    _nonce_bytes(t, ks, (<Crypto1>cipher).peek(), data, par)
    return _encode(data, par, 4)


def decrypt_nested_nonce(cipher, cuid, frame):
    """The reader's side of :func:`encrypt_nested_nonce`: the plain ``nt`` of an {nt} frame
    (4 bytes with parity), ``cuid ^ nt`` fed into ``cipher`` as it is decrypted; None when
    the decrypted parity bits are wrong (the card does not hold this key).

    :class:`FrameError` for a frame that is not 4 bytes with parity (the cipher untouched).
    """
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char enc[4]
    cdef unsigned char par[4]
    cdef unsigned char data[4]
    cdef unsigned char want[4]
    cdef Py_ssize_t n
    cdef uint64_t u, enc_nt, ks, nt
    cdef int i
    if _BitFrame is None:
        _bind()
    if type(cipher) is not Crypto1 or type(cuid) is not int or not 0 <= cuid <= 0xFFFFFFFF:
        return _crypto1_refs().decrypt_nested_nonce_ref(cipher, cuid, frame)
    if not _frame_bits(frame, small, sizeof(small), &bits, &n):
        return _crypto1_refs().decrypt_nested_nonce_ref(cipher, cuid, frame)
    try:
        if n != 4:
            raise FrameError(f"an encrypted nonce must be 4 bytes with parity, got {n}")
        _unpack(bits, 4, enc, par)
    finally:
        if bits != small:
            PyMem_Free(bits)
    u = cuid
    enc_nt = (<uint64_t>enc[0] << 24) | (<uint64_t>enc[1] << 16) | (<uint64_t>enc[2] << 8) | enc[3]
    ks = (<Crypto1>cipher).word(<uint32_t>(u ^ enc_nt), True)
    nt = enc_nt ^ ks
    _nonce_bytes(nt, ks, (<Crypto1>cipher).peek(), data, want)
    for i in range(4):
        if want[i] != par[i]:
            return None
    return nt


# ---------------------------------------------------------------------------------------------
# MIFARE Classic reader: a command frame and its ACK, without a tracer
# ---------------------------------------------------------------------------------------------


def classic_reader_command(reader, payload):
    """What :meth:`ClassicReader._command <firmware.core.mifare.ClassicReader._command>` does
    without a tracer: ``payload`` with its CRC_A, encrypted in an open session, sent through
    the reader's ``transceive``; returns the answer."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef unsigned char buf[SMALL]
    cdef unsigned char par[SMALL]
    cdef unsigned int crc
    if _BitFrame is None:
        _bind()
    c = reader.cipher
    if not _as_buf(payload, &p, &n) or n + 2 > SMALL or (c is not None and type(c) is not Crypto1):
        data = with_crc(payload)
        return reader._transceive(encrypt_frame(c, data) if c else encode(data))
    memcpy(buf, p, n)
    crc = _crc(buf, n)
    buf[n] = crc & 0xFF
    buf[n + 1] = crc >> 8
    if c is None:
        return reader._transceive(_encode(buf, NULL, n + 2))
    (<Crypto1>c).crypt(buf, buf, par, n + 2, False, False)
    return reader._transceive(_encode(buf, par, n + 2))


def classic_reader_ack(reader, answer, what):
    """:meth:`ClassicReader._expect_ack <firmware.core.mifare.ClassicReader._expect_ack>`
    for a 4-bit answer without a tracer: True for the ACK; any other code raises (through the
    reader's ``_raise_nack``, which drops the session). False, with nothing done, for any
    other case (then ``_expect_ack`` runs)."""
    cdef int overflow = 0
    cdef long length
    if _BitFrame is None:
        _bind()
    if _ClassicCard is None:
        _bind_card()
    if reader._tracer or type(answer) is not _BitFrame:
        return False
    py_length = answer.length
    py_bits = answer.bits
    if type(py_length) is not int or type(py_bits) is not int:
        return False
    length = PyLong_AsLongAndOverflow(py_length, &overflow)
    if overflow or length != 4:
        return False
    c = reader.cipher
    if c is None:
        code = py_bits
    elif type(c) is Crypto1:
        code = (PyLong_AsUnsignedLongLongMask(py_bits) ^ (<Crypto1>c).keystream_bits(4)) & 0xF
    else:
        return False
    if code == _ACK:
        return True
    reader._raise_nack(code, what)
    raise AssertionError("_raise_nack returned")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# MIFARE Classic reader: a whole authentication, without a tracer
# ---------------------------------------------------------------------------------------------


def classic_reader_authenticate(reader, block, key, key_type):
    """:meth:`ClassicReader.authenticate <firmware.core.mifare.ClassicReader.authenticate>`
    without a tracer, for the inputs the system passes: a ``ClassicReader`` with the Cython
    cipher (or none), a block number 0..255, a key of 6 ``bytes``/``bytearray`` or a 48-bit
    ``int``, a key type ``"A"``/``"B"`` (either case) or a ``KeyType``. Returns True when the
    exchange ran (the session is open; failures raise), False, with nothing sent, for
    anything else (then ``authenticate`` runs).

    The AUTH command, the card's nonce (plain or nested), {nr}{ar} and the check of {at}
    run here. An answer that is not the one expected goes to the method that handles it in
    Python (``_auth_nonce``, ``_auth_check``), with the new cipher as it was when the answer
    arrived, so every failure is raised by the specification itself, with its message; an
    unusual reader nonce goes to ``_auth_reply``.
    """
    cdef unsigned char cmd[4]
    cdef unsigned char cpar[4]
    cdef unsigned char small[SMALL_PACKED]
    cdef unsigned char *bits = NULL
    cdef unsigned char enc[8]
    cdef unsigned char par[8]
    cdef unsigned char ks8[8]
    cdef unsigned char data[8]
    cdef unsigned char want[4]
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef int overflow = 0
    cdef long b
    cdef unsigned int crc
    cdef uint64_t k = 0, u, nt = 0, enc_nt, ks
    cdef uint32_t saved_odd, saved_even, at
    cdef bint ok
    cdef Crypto1 cipher
    cdef int i
    if _ClassicCard is None:
        _bind_card()
    if _BitFrame is None:
        _bind()
    if type(reader) is not _ClassicReader or reader._tracer:
        return False
    if key_type is _KT_A or (type(key_type) is str and (key_type == "A" or key_type == "a")):
        cmd[0] = _CMD_AUTH_A
        name = "A"
    elif key_type is _KT_B or (type(key_type) is str and (key_type == "B" or key_type == "b")):
        cmd[0] = _CMD_AUTH_B
        name = "B"
    else:
        return False
    if type(key) is int:
        if not 0 <= key <= 0xFFFFFFFFFFFF:
            return False
        k = PyLong_AsUnsignedLongLongMask(key)
    elif _as_buf(key, &p, &n) and n == 6:
        for i in range(6):
            k = (k << 8) | p[i]
    else:
        return False
    if type(block) is not int:
        return False
    b = PyLong_AsLongAndOverflow(block, &overflow)
    if overflow or not 0 <= b <= 0xFF:
        return False
    py_cuid = reader._cuid
    if type(py_cuid) is not int or not 0 <= py_cuid <= 0xFFFFFFFF:
        return False
    session = reader.cipher
    if (session is not None and type(session) is not Crypto1) or reader._new_cipher is not Crypto1:
        return False
    nested = session is not None
    u = py_cuid

    # AUTH-A/B: _command (classic_reader_command), encrypted in an open session
    cmd[1] = <unsigned char>b
    crc = _crc(cmd, 2)
    cmd[2] = crc & 0xFF
    cmd[3] = crc >> 8
    if nested:
        (<Crypto1>session).crypt(cmd, cmd, cpar, 4, False, False)
        frame = _encode(cmd, cpar, 4)
    else:
        frame = _encode(cmd, NULL, 4)
    answer = reader._transceive(frame)
    cipher = <Crypto1?>reader._new_cipher(k)

    # the card nonce: _auth_nonce for 4 bytes with parity
    ok = False
    if type(answer) is _BitFrame and answer.length == 36 and _frame_bits(
        answer, small, sizeof(small), &bits, &n
    ):
        _unpack(bits, 4, enc, par)
        if bits != small:  # pragma: no cover - 4 bytes fit ``small``
            PyMem_Free(bits)
        if nested:
            # decrypt_nested_nonce; on bad parity the cipher is put back for _auth_nonce
            saved_odd, saved_even = cipher.odd, cipher.even
            enc_nt = (
                (<uint64_t>enc[0] << 24) | (<uint64_t>enc[1] << 16)
                | (<uint64_t>enc[2] << 8) | enc[3]
            )
            ks = cipher.word(<uint32_t>(u ^ enc_nt), True)
            nt = enc_nt ^ ks
            _nonce_bytes(nt, ks, cipher.peek(), data, want)
            ok = True
            for i in range(4):
                if want[i] != par[i]:
                    ok = False
            if not ok:
                cipher.odd, cipher.even = saved_odd, saved_even
        else:
            # decode: plain odd parity
            ok = True
            for i in range(4):
                if par[i] != PARITY[enc[i]]:
                    ok = False
            if ok:
                nt = (
                    (<uint64_t>enc[0] << 24) | (<uint64_t>enc[1] << 16)
                    | (<uint64_t>enc[2] << 8) | enc[3]
                )
                cipher.word(<uint32_t>(u ^ nt), False)
    if ok:
        py_nt = nt
    else:
        # silence, a NACK, a frame of another length, bad parity: raised there
        py_nt = reader._auth_nonce(answer, cipher, nested, name, block)
        if type(py_nt) is not int or not 0 <= py_nt <= 0xFFFFFFFF:  # pragma: no cover
            reader._auth_reply(cipher, py_nt, reader._nonce(), name, block)
            return True
        nt = py_nt

    # {nr}{ar}: _auth_reply
    nonce = reader._nonce()
    if type(nonce) is not int:
        reader._auth_reply(cipher, py_nt, nonce, name, block)
        return True
    enc_nt = PyLong_AsUnsignedLongLongMask(nonce) & 0xFFFFFFFF  # ``& 0xFFFFFFFF``
    at = _suc(<uint32_t>nt, 64)
    for i in range(4):
        data[i] = (enc_nt >> (24 - 8 * i)) & 0xFF
        data[4 + i] = (at >> (24 - 8 * i)) & 0xFF
    # encrypt_reader_answer: nr fed into the register, ar after it
    cipher.crypt(data, enc, par, 4, True, False)
    cipher.crypt(data + 4, enc + 4, par + 4, 4, False, False)
    frame = _encode(enc, par, 8)
    reader.cipher = None
    answer = reader._transceive(frame)

    # {at}: _auth_check for 4 bytes with parity; anything else (silence, a NACK, a garbled
    # or a wrong answer) goes there with the cipher as it was
    if type(answer) is _BitFrame and answer.length == 36 and _frame_bits(
        answer, small, sizeof(small), &bits, &n
    ):
        _unpack(bits, 4, enc, par)
        if bits != small:  # pragma: no cover - 4 bytes fit ``small``
            PyMem_Free(bits)
        saved_odd, saved_even = cipher.odd, cipher.even
        cipher.crypt(enc, data, ks8, 4, False, True)
        ok = True
        for i in range(4):
            if par[i] ^ ks8[i] != PARITY[data[i]]:
                ok = False
        at = (
            (<uint32_t>data[0] << 24) | (<uint32_t>data[1] << 16)
            | (<uint32_t>data[2] << 8) | data[3]
        )
        if ok and at == _suc(<uint32_t>nt, 96):
            reader.cipher = cipher
            reader.sector_block = block
            return True
        cipher.odd, cipher.even = saved_odd, saved_even
    reader._auth_check(answer, cipher, py_nt, name, block)
    return True


# ---------------------------------------------------------------------------------------------
# The card's nonce generator: suc^n by jump tables
# ---------------------------------------------------------------------------------------------

cdef enum:
    # tables for suc^(2^k), k < JUMP_BITS: jumps of up to 2^13 - 1 steps, what a virtual card's
    # free-running generator (:class:`~.mifare.TagNonces`) makes between two nonces
    JUMP_BITS = 13

cdef uint32_t JUMP[JUMP_BITS][4][256]
cdef bint _jump_ready = False


cdef void _jump_init() noexcept nogil:
    """suc is linear over GF(2) on the 32-bit word (shifts and XORs, no constant), so
    suc^(2^k) of a word is the XOR of its images of the word's set bits: per byte of the word
    a table of the 256 XORs of those images."""
    global _jump_ready
    cdef uint32_t col[32]
    cdef uint32_t v
    cdef int k, j, b, i
    for k in range(JUMP_BITS):
        for i in range(32):
            col[i] = prng_suc(<uint32_t>1 << i, 1 << k)
        for j in range(4):
            for b in range(256):
                v = 0
                for i in range(8):
                    if (b >> i) & 1:
                        v ^= col[8 * j + i]
                JUMP[k][j][b] = v
    _jump_ready = True


cdef inline uint32_t _suc(uint32_t x, unsigned int n) noexcept:
    """``prng_suc(x, n)`` for ``n < 2^13`` (suc^64 and suc^96 of the authentication: one and
    two table lookups of 4 bytes)."""
    cdef int k
    if not _jump_ready:
        _jump_init()
    for k in range(JUMP_BITS):
        if (n >> k) & 1:
            x = (JUMP[k][0][x & 0xFF] ^ JUMP[k][1][(x >> 8) & 0xFF]
                 ^ JUMP[k][2][(x >> 16) & 0xFF] ^ JUMP[k][3][x >> 24])
    return x


def prng_jump(x, n):
    """``prng_successor(x, n)``, the card's nonce generator advanced ``n`` steps, with at most
    13 table lookups of 4 bytes for an ``int`` ``0 <= n < 8192`` instead of ``n`` steps of
    the register (a virtual card's nonces are 17..4111 steps apart: some 3,000 instructions a
    nonce stepped, about 100 looked up). Any other argument goes to ``prng_successor``,
    which says what it means."""
    cdef uint32_t v
    cdef long steps
    cdef int overflow = 0
    if type(x) is not int or type(n) is not int or not 0 <= x <= 0xFFFFFFFF:
        return _crypto1_refs().prng_successor(x, n)
    steps = PyLong_AsLongAndOverflow(n, &overflow)
    if overflow or not 0 <= steps < (1 << JUMP_BITS):
        return _crypto1_refs().prng_successor(x, n)
    v = x
    return _suc(v, <unsigned int>steps)
