"""The camera emulator's control protocol: one text command per line.

The same line protocol as the PN532 emulator's control channel (``simulators.pn532.control``):
every command gets zero or more information lines and then one status line, ``ok`` or
``error: <why>``::

    help                          the command list
    list                          one "camera ID rtsp=PORT onvif=PORT fault=F" line each
    fault ID MODE [N]             MODE: ok, down, slow (N = delay in ms), clock (N = offset
                                  in seconds), silent, garbage
    cabinet NAME=VALUE ...        temp_c=52.5 humidity_pct=60 door_open=true mains=false
                                  ups_pct=20 bus_hang_ms=0
    readings                      the cabinet readings, as JSON
    quit                          close this control connection
    shutdown                      stop the emulator
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from firmware.core.errors import CoreError

from .cabinet import CabinetSensors
from .camera import FAULTS, CameraFarm

MAX_LINE = 4096
HELP = ("help | list | fault ID MODE [N] | cabinet NAME=VALUE ... | readings | quit | "
        "shutdown   (MODE: " + ", ".join(FAULTS) + ")")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass
class Reply:
    lines: list[str] = field(default_factory=list)
    close: bool = False
    shutdown: bool = False

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _value(text: str) -> object:
    low = text.lower()
    if low in _BOOLS:
        return _BOOLS[low]
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


class ControlHandler:
    """Runs control commands against a camera farm and (optionally) cabinet sensors."""

    def __init__(self, farm: CameraFarm, cabinet: CabinetSensors | None = None) -> None:
        self.farm = farm
        self.cabinet = cabinet

    def handle(self, line: str) -> Reply:
        reply = Reply()
        words = line.split()
        try:
            self._dispatch(words, reply)
        except CoreError as exc:
            reply.lines.append(f"error: {exc}")
            return reply
        reply.lines.append("ok")
        return reply

    def _dispatch(self, words: list[str], reply: Reply) -> None:
        from .errors import CameraSimError

        if not words:
            return
        cmd, args = words[0].lower(), words[1:]
        if cmd == "help":
            reply.lines.append(HELP)
        elif cmd == "list":
            for cam in self.farm.cameras.values():
                reply.lines.append(
                    f"camera {cam.cam_id} rtsp={cam.rtsp_port} onvif={cam.onvif_port} "
                    f"fault={cam.fault} delay_ms={cam.delay_ms} "
                    f"clock_offset_s={cam.clock_offset_s}")
        elif cmd == "fault":
            if len(args) not in (2, 3):
                raise CameraSimError("usage: fault ID MODE [N]")
            cam_id, mode = args[0], args[1].lower()
            n = 0
            if len(args) == 3:
                try:
                    n = int(args[2])
                except ValueError:
                    raise CameraSimError(f"{args[2]!r} is not a whole number") from None
            elif mode in ("slow", "clock"):
                raise CameraSimError(f"fault {mode} needs N (slow: delay ms, clock: seconds)")
            kw = {"delay_ms": n} if mode == "slow" else {"clock_offset_s": n}
            self.farm.set_fault(cam_id, mode, **kw)
        elif cmd in ("cabinet", "readings"):
            if self.cabinet is None:
                raise CameraSimError("no cabinet sensors here (start with --cabinet PATH)")
            if cmd == "cabinet":
                if not args:
                    raise CameraSimError("usage: cabinet NAME=VALUE ...")
                readings = {}
                for arg in args:
                    name, eq, text = arg.partition("=")
                    if not eq:
                        raise CameraSimError(f"{arg!r}: write NAME=VALUE")
                    readings[name] = _value(text)
                self.cabinet.set(**readings)
            reply.lines.append(json.dumps(self.cabinet.values, sort_keys=True))
        elif cmd == "quit":
            reply.close = True
        elif cmd == "shutdown":
            reply.close = reply.shutdown = True
        else:
            raise CameraSimError(f"unknown command {cmd!r} (try 'help')")


def serve_stream(handler: ControlHandler, read_line: Callable[[], str],
                 write: Callable[[str], None]) -> bool:
    """Run commands from ``read_line`` until EOF, ``quit`` or ``shutdown``; True on shutdown."""
    while True:
        line = read_line()
        if not line:
            return False
        if len(line) > MAX_LINE:
            write("error: line too long\n")
            return False
        reply = handler.handle(line.strip())
        write(reply.text())
        if reply.close:
            return reply.shutdown


class UnixControlServer:
    """The control protocol on a Unix socket, one connection at a time, in a thread."""

    def __init__(self, path: str | Path, handler: ControlHandler,
                 on_shutdown: Callable[[], None]) -> None:
        self.path = Path(path)
        if self.path.exists():
            self.path.unlink()

        class _Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                def read_line() -> str:
                    return self.rfile.readline(MAX_LINE + 1).decode("utf-8", "replace")

                def write(text: str) -> None:
                    self.wfile.write(text.encode())

                if serve_stream(handler, read_line, write):
                    on_shutdown()

        self._server = socketserver.UnixStreamServer(str(self.path), _Conn)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="camera-control")

    def start(self) -> UnixControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.path.exists():
            self.path.unlink()


def send_commands(path: str | Path, lines: list[str], timeout: float = 10.0) -> list[str]:
    """A tiny client: send commands over the Unix socket, return every reply line."""
    out: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        f = s.makefile("rw")
        for line in lines:
            f.write(line + "\n")
            f.flush()
            while True:
                got = f.readline()
                if not got:
                    return out
                got = got.rstrip("\n")
                out.append(got)
                if got == "ok" or got.startswith("error:"):
                    break
    return out
