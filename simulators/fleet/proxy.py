"""A TCP proxy on loopback between a bus's agents and the broker: the bus's mobile link.

Each bus's agents dial their own :class:`LinkProxy` instead of the broker, so the fleet can
cut one bus off the network while every other bus stays online, without root and without
network namespaces. Three link states:

- ``up``: bytes flow both ways;
- ``blackhole``: the link is silently dead, as in a tunnel or a cell with no backhaul:
  existing connections stay open but nothing passes (bytes are discarded), new connections
  are accepted and then hear nothing. The agents only find out through their MQTT
  keepalive and ack timeouts, which is the hard case;
- ``drop``: the link refuses: every open connection is reset, new ones are reset at once
  (the modem reports no carrier).

Going back ``up`` closes whatever the outage left half-open, so the agents reconnect on a
clean TCP connection, as they would after a real outage. The proxy binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from concurrent.futures import Future

from .errors import FleetError

__all__ = ["LINK_STATES", "LinkProxy"]

log = logging.getLogger("afc.fleet.proxy")

LINK_STATES = ("up", "blackhole", "drop")
_CHUNK = 65536


class LinkProxy:
    """``127.0.0.1:port`` → ``upstream``; a context manager; thread-safe :meth:`set_state`."""

    def __init__(self, upstream: tuple[str, int], *, name: str = "link", port: int = 0) -> None:
        self.upstream = upstream
        self.name = name
        self._want_port = port
        self.port = 0
        self.state = "up"
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._stopped = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> LinkProxy:
        self._thread = threading.Thread(target=self._main, name=f"proxy-{self.name}",
                                        daemon=True)
        self._thread.start()
        self._ready.result(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise FleetError(f"link proxy {self.name} did not stop within {timeout} s")

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread ends
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self._want_port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set_result(None)
        log.info("link %s: 127.0.0.1:%d -> %s:%d", self.name, self.port, *self.upstream)
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            self._reset_all()
            await self._server.wait_closed()

    # -- the link state -------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        """Switch the link (``up``, ``blackhole``, ``drop``) from any thread; returns once
        the proxy has applied it."""
        if state not in LINK_STATES:
            raise FleetError(f"link state must be one of {', '.join(LINK_STATES)}, not {state!r}")
        if self._loop is None:
            raise FleetError(f"link proxy {self.name} is not running")
        done: Future[None] = Future()

        def apply() -> None:
            previous, self.state = self.state, state
            if state == "drop" or (state == "up" and previous != "up"):
                self._reset_all()
            log.info("link %s: %s -> %s", self.name, previous, state)
            done.set_result(None)

        self._loop.call_soon_threadsafe(apply)
        done.result(10)

    def _reset_all(self) -> None:
        for client, upstream in list(self._pairs):
            _reset(client)
            if upstream is not None:
                _reset(upstream)
        self._pairs.clear()

    # -- connections ----------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.state == "drop":
            _reset(writer)
            return
        up_writer: asyncio.StreamWriter | None = None
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._pairs.add(pair)
        try:
            if self.state == "blackhole":
                # accepted, never forwarded: the client waits for a CONNACK that never comes
                while await reader.read(_CHUNK):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), 5.0)
            except (OSError, TimeoutError):
                _reset(writer)
                return
            self._pairs.discard(pair)
            pair = (writer, up_writer)
            self._pairs.add(pair)
            await asyncio.gather(self._pump(reader, up_writer, True),
                                 self._pump(up_reader, writer, False))
        finally:
            self._pairs.discard(pair)
            for w in (writer, up_writer):
                if w is not None:
                    with contextlib.suppress(OSError, RuntimeError):
                        w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upward: bool) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.state != "up":
                    continue  # blackholed: the bytes vanish
                if upward:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped mobile link looks to the far end."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if isinstance(sock, socket.socket) or sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError, RuntimeError):
        writer.transport.abort()
