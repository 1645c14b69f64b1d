"""The signed JSON form of docs/protocol.md, and HMAC-SHA256, in MicroPython.

A JSON message is signed over its *canonical* form: the object without ``sig``, keys sorted,
separators ``,`` and ``:``, non-ASCII written as UTF-8 (CPython's ``json.dumps(obj,
sort_keys=True, separators=(",", ":"), ensure_ascii=False)``). MicroPython's own
``json.dumps`` does not sort keys and MicroPython has no ``hmac`` module, hence this file.

Floats are refused: they print differently in different JSON libraries (and an ESP32's are
single precision), so a signed message holds text, integers, booleans and null only.

Memory: the encoder writes into one preallocated buffer and, for a signature, feeds the
same bytes into SHA-256 as it goes, so verifying a config message needs no second copy.
"""

import hashlib
from binascii import hexlify, unhexlify

from afcsite.errors import EncodeError

SIG_PREFIX = "hmac-sha256:"
MAX_DEPTH = 8

_SHORT = {0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n",
          0x0D: b"\\r", 0x09: b"\\t"}
_HEX = b"0123456789abcdef"


class Hmac:
    """HMAC-SHA256 (RFC 2104) with a per-device key; the padded keys are computed once."""

    def __init__(self, key):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = bytes(key) + bytes(64 - len(key))
        self._ipad = bytes(b ^ 0x36 for b in key)
        self._opad = bytes(b ^ 0x5C for b in key)

    def start(self):
        """A SHA-256 state already fed with the inner padded key: update it with the data."""
        h = hashlib.sha256()
        h.update(self._ipad)
        return h

    def finish(self, inner):
        """The MAC from a state returned by :meth:`start` and fed with the data."""
        h = hashlib.sha256()
        h.update(self._opad)
        h.update(inner.digest())
        return h.digest()

    def mac(self, data):
        h = self.start()
        h.update(data)
        return self.finish(h)


def equal(a, b):
    """Compare two MACs in time independent of where they differ."""
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


class Encoder:
    """Canonical JSON into a preallocated buffer of ``size`` bytes.

    :meth:`signed` returns a memoryview into the buffer, valid until the next call: publish
    or copy it before encoding anything else.
    """

    def __init__(self, size, hmac=None):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.n = 0
        self.hmac = hmac
        self._h = None
        self._store = True

    # -- output -------------------------------------------------------------------------

    def _w(self, b):
        if self._h is not None:
            self._h.update(b)
        if self._store:
            n = self.n
            m = n + len(b)
            if m > len(self.buf):
                raise EncodeError("message longer than the %d-byte buffer" % len(self.buf))
            self.buf[n:m] = b
            self.n = m

    def _str(self, s):
        raw = s.encode()
        start = 0
        self._w(b'"')
        for i in range(len(raw)):
            c = raw[i]
            if c >= 0x20 and c != 0x22 and c != 0x5C:
                continue
            if i > start:
                self._w(raw[start:i])
            esc = _SHORT.get(c)
            if esc is None:
                esc = bytes((0x5C, 0x75, 0x30, 0x30, _HEX[c >> 4], _HEX[c & 15]))
            self._w(esc)
            start = i + 1
        if start < len(raw):
            self._w(raw[start:] if start else raw)
        self._w(b'"')

    def _value(self, v, depth, skip_sig):
        if depth > MAX_DEPTH:
            raise EncodeError("nested deeper than %d" % MAX_DEPTH)
        if v is None:
            self._w(b"null")
        elif v is True:
            self._w(b"true")
        elif v is False:
            self._w(b"false")
        elif isinstance(v, int):
            self._w(str(v).encode())
        elif isinstance(v, str):
            self._str(v)
        elif isinstance(v, dict):
            self._w(b"{")
            first = True
            for k in sorted(v):
                if not isinstance(k, str):
                    raise EncodeError("object key %r is not text" % (k,))
                if skip_sig and k == "sig":
                    continue
                if not first:
                    self._w(b",")
                first = False
                self._str(k)
                self._w(b":")
                self._value(v[k], depth + 1, False)
            self._w(b"}")
        elif isinstance(v, (list, tuple)):
            self._w(b"[")
            for i in range(len(v)):
                if i:
                    self._w(b",")
                self._value(v[i], depth + 1, False)
            self._w(b"]")
        elif isinstance(v, float):
            raise EncodeError("floats are not signed (use an integer)")
        else:
            raise EncodeError("cannot encode a %s" % type(v).__name__)

    # -- public -------------------------------------------------------------------------

    def plain(self, obj):
        """The canonical JSON of ``obj`` (unsigned), as a memoryview into the buffer."""
        self.n = 0
        self._h = None
        self._store = True
        self._value(obj, 0, True)
        return self.mv[: self.n]

    def signed(self, obj):
        """``obj`` as JSON with ``"sig":"hmac-sha256:<hex>"`` over its canonical form.

        The signature is appended as the last member (a receiver re-sorts to verify), so
        the object is encoded once.
        """
        if not isinstance(obj, dict) or not obj:
            raise EncodeError("only a non-empty object can be signed")
        self.n = 0
        self._store = True
        self._h = self.hmac.start()
        try:
            self._value(obj, 0, True)
            mac = self.hmac.finish(self._h)
        finally:
            self._h = None
        self.n -= 1  # reopen the object: drop its closing brace
        self._w(b',"sig":"' + SIG_PREFIX.encode())
        self._w(hexlify(mac))
        self._w(b'"}')
        return self.mv[: self.n]

    def verify(self, obj, hmac=None):
        """True if ``obj['sig']`` is a valid HMAC-SHA256 of ``obj``'s canonical form.

        Nothing is stored: the canonical bytes go straight into the hash, so an object larger
        than the buffer (a config with many cameras) verifies too. An object that has no
        canonical form (a float in it) raises EncodeError: it cannot have been signed right.
        """
        hmac = hmac or self.hmac
        sig = obj.get("sig") if isinstance(obj, dict) else None
        if not isinstance(sig, str) or not sig.startswith(SIG_PREFIX):
            return False
        hexsig = sig[len(SIG_PREFIX):]
        if len(hexsig) != 64:
            return False
        try:
            want = unhexlify(hexsig)
        except ValueError:
            return False
        saved = self.n
        self._store = False
        self._h = hmac.start()
        try:
            self._value(obj, 0, True)
            got = hmac.finish(self._h)
        finally:
            self._h = None
            self._store = True
            self.n = saved
        return equal(got, want)
