"""Probing cameras the way cameras are spoken to: RTSP ``OPTIONS`` and ONVIF
``GetSystemDateAndTime`` (SOAP 1.2 over HTTP, which ONVIF answers without credentials).

A few workers (``probe_parallel``) share the camera list, so a cycle over ten cameras takes a
few probe timeouts, not ten, and each worker owns one preallocated receive buffer: the heap a
cycle needs does not grow with the number of cameras or with the size of a camera's answer
(an ONVIF answer is scanned through a sliding window for its ``UTCDateTime`` element).

A probe result is ``(ok, reason, rtt_ms, clock_offset_ms)``; reasons are short tokens that
end up in events (``refused``, ``unreachable``, ``no-answer``, ``closed``, ``bad-reply``,
``http-500``, ``no-time``, ``too-large``).
"""

import asyncio
import errno
import socket
import time

from afcsite.health import classify

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff

BUF_SIZE = 768
_TAG = b"UTCDateTime"
_SOAP = (b'<?xml version="1.0" encoding="UTF-8"?>'
         b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
         b'<GetSystemDateAndTime xmlns="http://www.onvif.org/ver10/device/wsdl"/>'
         b"</s:Body></s:Envelope>")


class _Fail(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def days_from_civil(y, m, d):
    """Days since 1970-01-01 of a proleptic Gregorian date (no ``time.mktime``: it works in
    local time on some ports and from 2000 on others)."""
    y -= 1 if m <= 2 else 0
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _num(buf, tag, end):
    i = buf.find(tag, 0, end)
    if i < 0:
        return None
    i += len(tag)
    v = 0
    digits = 0
    while i < end and 0x30 <= buf[i] <= 0x39 and digits < 5:
        v = v * 10 + buf[i] - 0x30
        i += 1
        digits += 1
    return v if digits else None


def parse_utc(buf, end):
    """Unix seconds of the ``UTCDateTime`` whose text is in ``buf[:end]``, or None."""
    y = _num(buf, b"Year>", end)
    mo = _num(buf, b"Month>", end)
    d = _num(buf, b"Day>", end)
    h = _num(buf, b"Hour>", end)
    mi = _num(buf, b"Minute>", end)
    s = _num(buf, b"Second>", end)
    if None in (y, mo, d, h, mi, s):
        return None
    if not (1970 <= y <= 2200 and 1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59
            and s <= 60):
        return None
    return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s


class Prober:
    """Probes a list of :class:`afcsite.health.Camera` with ``parallel`` workers."""

    def __init__(self, hal, timeout_ms, parallel):
        self.hal = hal
        self.timeout_ms = timeout_ms
        self.bufs = [bytearray(BUF_SIZE) for _ in range(parallel)]
        self.cseq = 0
        self._next = 0
        self._cams = None
        self._th = None

    async def cycle(self, cams, th):
        """Probe every camera once; sets ``cam.raw``/``cam.reason`` (see ``classify``)."""
        self._cams = cams
        self._th = th
        self._next = 0
        n = min(len(self.bufs), len(cams))
        if n <= 1:
            await self._worker(0)
        else:
            await asyncio.gather(*[self._worker(i) for i in range(n)])
        self._cams = None

    async def _worker(self, w):
        buf = self.bufs[w]
        cams = self._cams
        while self._next < len(cams):
            cam = cams[self._next]
            self._next += 1
            rtsp = await self.rtsp(cam, buf)
            if rtsp[0]:
                onvif = await self.onvif(cam, buf)
            else:
                onvif = (False, "skipped", -1, None)
            cam.raw, cam.reason = classify(cam, rtsp, onvif, self._th)

    # -- transport ----------------------------------------------------------------------

    @staticmethod
    def _addr(cam, port):
        """The camera's socket address, resolved once (cameras have fixed IPv4 addresses)."""
        key = "rtsp" if port == cam.rtsp_port else "onvif"
        if cam.addr is None:
            cam.addr = {}
        a = cam.addr.get(key)
        if a is None:
            ai = socket.getaddrinfo(cam.host, port, 0, socket.SOCK_STREAM)[0]
            a = cam.addr[key] = (ai[0], ai[-1])
        return a

    async def _exchange(self, cam, port, request, buf, phase, scan):
        """Connect, send ``request``, read into ``buf`` until ``scan(n)`` says done; the
        number of bytes ``scan`` left in ``buf``. One timeout covers the whole exchange (one
        ``wait_for`` per probe, not per read: each costs a task on the heap); ``phase[0]``
        tells the caller where a timeout struck."""
        family, addr = self._addr(cam, port)
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            phase[0] = "unreachable"
            try:
                s.connect(addr)
            except OSError as e:
                if e.errno != errno.EINPROGRESS:
                    raise _Fail("refused" if e.errno == errno.ECONNREFUSED else "unreachable")
            st = asyncio.StreamReader(s)
            try:
                st.write(request)  # may write at once, and so fail at once
                await st.drain()
            except OSError as e:
                raise _Fail("refused" if e.errno == errno.ECONNREFUSED else "unreachable")
            phase[0] = "no-answer"
            mv = memoryview(buf)
            n = 0
            while True:
                try:
                    got = await st.readinto(mv[n:])
                except OSError:
                    raise _Fail("closed")
                if not got:
                    n = scan(n, True)
                    return -n - 1 if n < 0 else n
                n = scan(n + got, False)
                if n < 0:
                    return -n - 1
        finally:
            s.close()

    async def _probe(self, cam, port, request, buf, scan, finish, extra=None):
        t0 = ticks_ms()
        phase = ["unreachable"]
        try:
            n = await asyncio.wait_for_ms(
                self._exchange(cam, port, request, buf, phase, scan), self.timeout_ms)
            return finish(buf, n, ticks_diff(ticks_ms(), t0), extra)
        except _Fail as f:
            return (False, f.reason, ticks_diff(ticks_ms(), t0), None)
        except asyncio.TimeoutError:
            return (False, phase[0], ticks_diff(ticks_ms(), t0), None)
        except OSError as e:  # anything else the network stack says: the camera is unreachable
            return (False, "oserror-%d" % (e.errno or 0), ticks_diff(ticks_ms(), t0), None)

    # -- RTSP ---------------------------------------------------------------------------

    async def rtsp(self, cam, buf):
        """``OPTIONS rtsp://host:port/``: the stream server answers ``RTSP/1.0 200`` (or 401,
        which also proves it alive) echoing our ``CSeq``."""
        self.cseq = self.cseq % 999999 + 1
        req = ("OPTIONS rtsp://%s:%d/ RTSP/1.0\r\nCSeq: %d\r\nUser-Agent: afcsite\r\n\r\n"
               % (cam.host, cam.rtsp_port, self.cseq)).encode()

        def scan(n, eof):
            if eof or n == len(buf) or buf.find(b"\r\n\r\n", 0, n) >= 0:
                return -n - 1
            return n

        return await self._probe(cam, cam.rtsp_port, req, buf, scan, _rtsp_verdict, self.cseq)

    # -- ONVIF --------------------------------------------------------------------------

    async def onvif(self, cam, buf):
        """``GetSystemDateAndTime``: the camera's UTC clock against ours (to the second).

        The answer is scanned through ``buf`` as a sliding window: the status line is checked
        in the first bytes, then everything before ``<..:UTCDateTime>`` is dropped, and the
        read stops at its closing tag, however long the answer around it is.
        """
        head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
                "Content-Type: application/soap+xml; charset=utf-8\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (cam.onvif_path, cam.host, cam.onvif_port, len(_SOAP))).encode()
        state = [False, False]  # status line checked, UTCDateTime found
        size = len(buf)

        def scan(n, eof):
            if eof:
                if not state[0]:
                    raise _Fail("closed" if n == 0 else "bad-reply")
                raise _Fail("no-time")
            if not state[0]:
                if n < 12:
                    return n
                if buf[:7] != b"HTTP/1.":
                    raise _Fail("bad-reply")
                if buf[9:12] != b"200":
                    raise _Fail("http-" + str(bytes(buf[9:12]), "ascii"))
                state[0] = True
            if not state[1]:
                i = buf.find(_TAG, 0, n)
                if i < 0:
                    if n < size:
                        return n
                    # keep a tail long enough to hold a tag cut in two, drop the rest
                    buf[0:16] = bytes(memoryview(buf)[n - 16:n])
                    return 16
                if i:
                    buf[0:n - i] = bytes(memoryview(buf)[i:n])
                    n -= i
                state[1] = True
            if buf.find(_TAG, len(_TAG), n) >= 0:
                return -n - 1
            if n == size:
                raise _Fail("too-large")
            return n

        sent_ms = self.hal.unix_ms()
        return await self._probe(cam, cam.onvif_port, head + _SOAP, buf, scan,
                                 self._onvif_verdict, sent_ms)

    def _onvif_verdict(self, buf, n, rtt, sent_ms):
        end = buf.find(_TAG, len(_TAG), n)
        cam_s = parse_utc(buf, end) if end >= 0 else None
        if cam_s is None:
            return (False, "no-time", rtt, None)
        offset = None
        if self.hal.clock_ok():
            offset = cam_s * 1000 - (sent_ms + self.hal.unix_ms()) // 2
        return (True, "ok", rtt, offset)


def _rtsp_verdict(buf, n, rtt, cseq):
    if n == 0:
        return (False, "closed", rtt, None)
    if n < 12 or buf[:9] != b"RTSP/1.0 " or buf.find(b"\r\n", 0, n) < 0:
        return (False, "bad-reply", rtt, None)
    code = bytes(buf[9:12])
    if not (code[0] == 0x32 or code == b"401"):
        return (False, "status-" + str(code, "ascii"), rtt, None)
    i = buf.find(b"CSeq:", 0, n)
    if i >= 0:
        j = i + 5
        while j < n and buf[j] == 0x20:
            j += 1
        k = j
        v = 0
        while k < n and 0x30 <= buf[k] <= 0x39 and k - j < 7:
            v = v * 10 + buf[k] - 0x30
            k += 1
        if k == j or v != cseq:
            return (False, "bad-reply", rtt, None)
    return (True, "ok", rtt, None)
