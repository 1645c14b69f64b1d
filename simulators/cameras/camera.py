"""Emulated IP cameras on loopback: an RTSP responder and an ONVIF device service each.

What a camera-site monitor asks a real KGYS/EDS/PTS camera is small: an RTSP ``OPTIONS``
(is the stream server alive?) and an ONVIF ``GetSystemDateAndTime`` (SOAP 1.2 over HTTP:
is the device service alive, and is its clock right?). :class:`EmulatedCamera` answers both
the way cameras do, and breaks on demand the way cameras break:

``ok``       answers promptly;
``down``     nothing listens (connection refused), as a camera without power;
``slow``     answers after ``delay_ms``, as a camera with a saturated CPU or link;
``clock``    answers, with its clock ``clock_offset_s`` seconds off (lost NTP);
``silent``   accepts TCP and never answers (a hung firmware with a live IP stack);
``garbage``  answers with random bytes (a wrong service on the port, a crashed encoder).

:class:`CameraFarm` runs any number of them on one asyncio loop in a background thread, so a
test or ``afc sim camera serve`` can change faults while a monitor probes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .errors import CameraSimError

logger = logging.getLogger("afc.sim.camera")

LOOPBACK = "127.0.0.1"
FAULTS = ("ok", "down", "slow", "clock", "silent", "garbage")
MAX_REQUEST = 64 * 1024
ONVIF_PATH = "/onvif/device_service"
SILENT_HOLD_S = 300.0  # a silent camera keeps a connection at most this long


@dataclass
class CameraStats:
    """What a camera was asked (a test checks the monitor really probed it)."""

    rtsp_requests: int = 0
    onvif_requests: int = 0
    connections: int = 0


@dataclass
class EmulatedCamera:
    """One camera's identity, ports and fault; the servers are run by :class:`CameraFarm`."""

    cam_id: str
    rtsp_port: int = 0
    onvif_port: int = 0
    fault: str = "ok"
    delay_ms: int = 0
    clock_offset_s: int = 0
    model: str = "KGYS-PTZ-2MP"
    stats: CameraStats = field(default_factory=CameraStats)
    _servers: list[asyncio.base_events.Server] = field(default_factory=list, repr=False)
    _conns: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)

    def describe(self) -> dict[str, object]:
        return {"id": self.cam_id, "host": LOOPBACK, "rtsp_port": self.rtsp_port,
                "onvif_port": self.onvif_port, "fault": self.fault, "delay_ms": self.delay_ms,
                "clock_offset_s": self.clock_offset_s}

    def config_entry(self) -> dict[str, object]:
        """This camera as a camera-site config lists it."""
        return {"id": self.cam_id, "host": LOOPBACK, "rtsp_port": self.rtsp_port,
                "onvif_port": self.onvif_port, "onvif_path": ONVIF_PATH}

    # -- servers --------------------------------------------------------------------------

    async def _start(self) -> None:
        rtsp = await asyncio.start_server(self._rtsp_conn, LOOPBACK, self.rtsp_port,
                                          reuse_address=True)
        onvif = await asyncio.start_server(self._onvif_conn, LOOPBACK, self.onvif_port,
                                           reuse_address=True)
        self.rtsp_port = rtsp.sockets[0].getsockname()[1]
        self.onvif_port = onvif.sockets[0].getsockname()[1]
        self._servers = [rtsp, onvif]

    async def _stop(self) -> None:
        servers, self._servers = self._servers, []
        for srv in servers:
            srv.close()
        for w in list(self._conns):
            w.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)

    async def _set_fault(self, fault: str, delay_ms: int, clock_offset_s: int) -> None:
        was_down = self.fault == "down"
        self.fault, self.delay_ms, self.clock_offset_s = fault, delay_ms, clock_offset_s
        if fault == "down" and not was_down:
            await self._stop()
        elif fault != "down" and was_down:
            await self._start()

    # -- behaviour common to both services ------------------------------------------------

    async def _misbehave(self, writer: asyncio.StreamWriter) -> bool:
        """Apply the fault before an answer; True if the answer must not be sent."""
        if self.fault == "slow" and self.delay_ms > 0:
            await asyncio.sleep(self.delay_ms / 1000)
        elif self.fault == "silent":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_until_closed(writer), SILENT_HOLD_S)
            return True
        elif self.fault == "garbage":
            writer.write(os.urandom(96))
            await writer.drain()
            return True
        return False

    def _track(self, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self._conns.add(writer)

    # -- RTSP -------------------------------------------------------------------------------

    async def _rtsp_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._track(writer)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                self.stats.rtsp_requests += 1
                if await self._misbehave(writer):
                    return
                writer.write(rtsp_answer(head, self.model))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()

    # -- ONVIF ------------------------------------------------------------------------------

    async def _onvif_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._track(writer)
        try:
            head = await _read_head(reader)
            if head is None:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            if not 0 <= length <= MAX_REQUEST:
                return
            body = await reader.readexactly(length) if length else b""
            self.stats.onvif_requests += 1
            if await self._misbehave(writer):
                return
            writer.write(onvif_answer(head, body, time.time() + self.clock_offset_s))
            await writer.drain()
        except (ConnectionError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()


async def _until_closed(writer: asyncio.StreamWriter) -> None:
    await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A request's start line and headers (up to the blank line), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > MAX_REQUEST:
        return None
    return head


def rtsp_answer(head: bytes, model: str = "KGYS-PTZ-2MP") -> bytes:
    """The answer of a healthy camera to an RTSP request (OPTIONS and DESCRIBE; others 501)."""
    first = head.split(b"\r\n", 1)[0].split()
    method = first[0] if first else b""
    cseq = b"0"
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"cseq":
            cseq = value.strip()
    if method == b"OPTIONS":
        return (b"RTSP/1.0 200 OK\r\nCSeq: " + cseq + b"\r\nServer: " + model.encode()
                + b"\r\nPublic: OPTIONS, DESCRIBE, SETUP, TEARDOWN, PLAY, PAUSE, "
                b"GET_PARAMETER\r\n\r\n")
    if method == b"DESCRIBE":
        sdp = (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=" + model.encode()
               + b"\r\nt=0 0\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
        return (b"RTSP/1.0 200 OK\r\nCSeq: " + cseq + b"\r\nContent-Type: application/sdp"
                + b"\r\nContent-Length: " + str(len(sdp)).encode() + b"\r\n\r\n" + sdp)
    return b"RTSP/1.0 501 Not Implemented\r\nCSeq: " + cseq + b"\r\n\r\n"


_SOAP_HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:SOAP-ENC="http://www.w3.org/2003/05/soap-encoding" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
    'xmlns:wsa="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
    'xmlns:wsdd="http://schemas.xmlsoap.org/ws/2005/04/discovery" '
    'xmlns:tt="http://www.onvif.org/ver10/schema" '
    'xmlns:tds="http://www.onvif.org/ver10/device/wsdl" '
    'xmlns:ter="http://www.onvif.org/ver10/error">\n<SOAP-ENV:Body>\n'
)


def _date_time(tag: str, t: time.struct_time) -> str:
    return (f"<tt:{tag}><tt:Time><tt:Hour>{t.tm_hour}</tt:Hour><tt:Minute>{t.tm_min}"
            f"</tt:Minute><tt:Second>{t.tm_sec}</tt:Second></tt:Time><tt:Date><tt:Year>"
            f"{t.tm_year}</tt:Year><tt:Month>{t.tm_mon}</tt:Month><tt:Day>{t.tm_mday}"
            f"</tt:Day></tt:Date></tt:{tag}>\n")


def onvif_answer(head: bytes, body: bytes, now: float) -> bytes:
    """The HTTP answer of a healthy camera's device service to one SOAP request.

    GetSystemDateAndTime gets the camera's UTC and local (Europe/Istanbul, UTC+3) time,
    shaped and namespaced as real cameras send it (about 1.6 KB: larger than the monitor's
    receive buffer, on purpose); any other action gets a SOAP fault, a wrong path 404.
    """
    first = head.split(b"\r\n", 1)[0].split()
    path = first[1].decode("latin-1") if len(first) > 1 else ""
    if len(first) < 2 or first[0] != b"POST" or path != ONVIF_PATH:
        return _http(404, "Not Found", "text/plain", b"not found\n")
    if b"GetSystemDateAndTime" not in body:
        fault = (_SOAP_HEAD + "<SOAP-ENV:Fault><SOAP-ENV:Code><SOAP-ENV:Value>SOAP-ENV:Sender"
                 "</SOAP-ENV:Value><SOAP-ENV:Subcode><SOAP-ENV:Value>ter:ActionNotSupported"
                 "</SOAP-ENV:Value></SOAP-ENV:Subcode></SOAP-ENV:Code><SOAP-ENV:Reason>"
                 '<SOAP-ENV:Text xml:lang="en">Action not supported</SOAP-ENV:Text>'
                 "</SOAP-ENV:Reason></SOAP-ENV:Fault>\n</SOAP-ENV:Body>\n</SOAP-ENV:Envelope>\n")
        return _http(400, "Bad Request", "application/soap+xml; charset=utf-8",
                     fault.encode())
    utc = time.gmtime(now)
    local = time.gmtime(now + 3 * 3600)
    xml = (_SOAP_HEAD + "<tds:GetSystemDateAndTimeResponse>\n<tds:SystemDateAndTime>\n"
           "<tt:DateTimeType>NTP</tt:DateTimeType>\n"
           "<tt:DaylightSavings>false</tt:DaylightSavings>\n"
           "<tt:TimeZone><tt:TZ>&lt;+03&gt;-3</tt:TZ></tt:TimeZone>\n"
           + _date_time("UTCDateTime", utc) + _date_time("LocalDateTime", local)
           + "</tds:SystemDateAndTime>\n</tds:GetSystemDateAndTimeResponse>\n"
           "</SOAP-ENV:Body>\n</SOAP-ENV:Envelope>\n")
    return _http(200, "OK", "application/soap+xml; charset=utf-8", xml.encode())


def _http(code: int, reason: str, ctype: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {code} {reason}\r\nServer: gSOAP/2.8\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class CameraFarm:
    """Cameras on 127.0.0.1, served by one asyncio loop in a daemon thread.

    A context manager: ``with CameraFarm(10) as farm: farm.set_fault("cam-03", "down")``.
    Ports default to free ones chosen by the OS; ``set_fault`` keeps them (a camera brought
    back from ``down`` listens on the same ports again).
    """

    def __init__(self, count: int = 0, *, prefix: str = "cam-", model: str = "KGYS-PTZ-2MP"):
        if not 0 <= count <= 256:
            raise CameraSimError(f"{count} cameras: choose 0..256")
        self.cameras: dict[str, EmulatedCamera] = {}
        self._pending = [EmulatedCamera(f"{prefix}{i:02d}", model=model)
                         for i in range(1, count + 1)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> CameraFarm:
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="camera-farm", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise CameraSimError("the camera emulator loop did not start within 10 s")
        self._loop = loop
        pending, self._pending = self._pending, []
        for cam in pending:
            self.add(cam)
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def close_all() -> None:
            for cam in self.cameras.values():
                await cam._stop()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()

    def __enter__(self) -> CameraFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro, timeout: float = 10.0):
        if self._loop is None:
            coro.close()
            raise CameraSimError("the camera farm is not running: call start() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- cameras --------------------------------------------------------------------------

    def add(self, cam: EmulatedCamera | str) -> EmulatedCamera:
        """Start serving one more camera (an id, or a camera with chosen ports)."""
        if isinstance(cam, str):
            cam = EmulatedCamera(cam)
        if cam.cam_id in self.cameras:
            raise CameraSimError(f"camera {cam.cam_id!r} exists already")
        if self._loop is None:
            self._pending.append(cam)
            return cam
        if cam.fault != "down":
            self._call(cam._start())
        self.cameras[cam.cam_id] = cam
        logger.info("camera %s rtsp=%d onvif=%d", cam.cam_id, cam.rtsp_port, cam.onvif_port)
        return cam

    def get(self, cam_id: str) -> EmulatedCamera:
        try:
            return self.cameras[cam_id]
        except KeyError:
            known = ", ".join(self.cameras) or "none"
            raise CameraSimError(f"no camera {cam_id!r} (cameras: {known})") from None

    def set_fault(self, cam_id: str, fault: str, *, delay_ms: int = 0,
                  clock_offset_s: int = 0) -> EmulatedCamera:
        """Break (or mend, with ``"ok"``) one camera; see the module doc for the faults."""
        if fault not in FAULTS:
            raise CameraSimError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
        if fault == "slow" and not 0 < delay_ms <= 600_000:
            raise CameraSimError("a slow camera needs delay_ms between 1 and 600000")
        if not -10**9 <= clock_offset_s <= 10**9:
            raise CameraSimError("clock_offset_s out of range")
        cam = self.get(cam_id)
        self._call(cam._set_fault(fault, delay_ms, clock_offset_s))
        logger.info("camera %s fault=%s delay_ms=%d clock_offset_s=%d", cam_id, fault,
                    delay_ms, clock_offset_s)
        return cam

    def config_entries(self) -> list[dict[str, object]]:
        return [cam.config_entry() for cam in self.cameras.values()]
