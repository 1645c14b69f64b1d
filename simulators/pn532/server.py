"""Serve a :class:`~simulators.pn532.emulator.Pn532Emulator` where a driver can open it.

Two kinds of line, both opened by the driver with ``serial.serial_for_url``:

* a pseudo-terminal: the emulator holds the master side, the driver opens the slave (its
  path, or a stable symlink to it given as ``port``) exactly as it would open
  ``/dev/ttyUSB0``;
* a TCP port (``listen=(host, port)``), one client at a time, for ``socket://host:port``
  URLs (a test on a machine without ptys, or a reader "across the network").

The loop is one thread with a :mod:`selectors` selector: host bytes, control connections,
a wake-up pipe for :meth:`Pn532Server.stop` and :meth:`Pn532Server.call`, and a short timer
while an InListPassiveTarget waits for a card. Everything that touches the emulator or the
cards runs on that thread, so neither needs locks; other threads (a test, a signal handler)
go through :meth:`Pn532Server.call` and :meth:`Pn532Server.stop`.

With ``baud_timing`` the chip's answers leave no faster than a 115200-baud UART would send
them (10 bits per byte: start, 8 data, stop), so a driver's timeouts meet realistic delays.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import sys
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from firmware.core.anticollision import Card
from firmware.core.errors import CoreError

from .control import MAX_LINE, ControlHandler
from .emulator import Pn532Emulator

logger = logging.getLogger(__name__)

T = TypeVar("T")

BAUD = 115200
BITS_PER_BYTE = 10  # start bit, 8 data bits, stop bit
POLL_INTERVAL = 0.02  # how often a pending InListPassiveTarget looks for a card again
IDLE_TIMEOUT = 0.5  # the loop wakes at least this often (bounded shutdown latency)
READ_SIZE = 4096
MAX_OUTPUT = 1 << 20  # chip output queued for a host that does not read: dropped beyond
MAX_CONTROL_CLIENTS = 8
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class ServerError(CoreError):
    """The emulator cannot be served as asked (port path taken, address in use...)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or just ``PORT``, meaning 127.0.0.1) as a TCP address."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ServerError(f"bad TCP address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4532")
    return host, int(port)


class _Line:
    """The serial line's far end as the loop sees it: a pty master or a TCP client."""

    def fileno(self) -> int | None:
        raise NotImplementedError

    def read(self) -> bytes | None:
        """Bytes from the host; b"" when none right now; None when the peer went away."""
        raise NotImplementedError

    def write(self, data: bytes) -> int:
        """Bytes accepted (0 when the line is full or nobody listens)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _PtyLine(_Line):
    """A pseudo-terminal in raw mode. The server keeps the slave open too, so the master
    never reads EOF/EIO while no driver has the port open (the driver may come and go)."""

    def __init__(self, link: Path | None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.link = link
        if link is not None:
            try:
                _replace_symlink(link, self.path)
            except BaseException:
                self.close()
                raise

    def fileno(self) -> int | None:
        return self.master

    def read(self) -> bytes | None:
        try:
            return os.read(self.master, READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open: cannot happen while we hold one
                return b""
            raise

    def write(self, data: bytes) -> int:
        try:
            return os.write(self.master, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.link is not None:
            with contextlib.suppress(OSError):
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            self.link = None
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1


class _TcpLine(_Line):
    """One TCP client at a time; the listening socket is handled by the server."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return None
        return data or None

    def write(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically; refuse to replace anything but a symlink
    (an old link from a killed emulator is fine to replace, a real file is not ours)."""
    if link.exists() and not link.is_symlink():
        raise ServerError(f"{link} exists and is not a symlink: refusing to replace it")
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


class _ControlConn:
    """One control client: a socket, or stdin/stdout (``sock`` None)."""

    def __init__(self, sock: socket.socket | None, name: str) -> None:
        self.sock = sock
        self.name = name
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False
        if sock is not None:
            sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else sys.stdin.fileno()


class Pn532Server:
    """A PN532 emulator on a pty (default) or a TCP port, with an optional control channel.

    ``cards`` are the cards the control channel knows (numbered from 1); without an
    ``emulator`` one is made with all of them on the reader. ``port`` is the symlink to
    create for the pty; ``listen`` serves TCP instead. ``control`` is a Unix socket path, a
    TCP port (``PORT`` or ``HOST:PORT``, on 127.0.0.1 by default) or ``-`` for
    stdin/stdout. ``card_factory`` lets the control channel ``add`` cards.

    Resources are opened here, so :attr:`url` is valid (and the symlink exists) before the
    loop runs; :meth:`close` (also run when :meth:`serve_forever` ends) releases them.
    """

    def __init__(
        self,
        emulator: Pn532Emulator | None = None,
        *,
        cards: Sequence[Card] = (),
        port: str | os.PathLike[str] | None = None,
        listen: tuple[str, int] | None = None,
        control: str | None = None,
        baud_timing: bool = False,
        card_factory: Callable[[str], Card] | None = None,
    ) -> None:
        if port is not None and listen is not None:
            raise ServerError("serve a pty (port) or TCP (listen), not both")
        self.cards: list[Card] = list(cards)
        if emulator is None:
            emulator = Pn532Emulator(self.cards)
        elif not self.cards:
            self.cards = emulator.cards
        self.emulator = emulator
        self.control_handler = ControlHandler(emulator, self.cards, card_factory=card_factory)
        self.baud_timing = baud_timing

        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[[], object], Future[object]]] = deque()
        self._stopping = False
        self._running = False
        self._closed = False
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._outq: deque[list[object]] = deque()  # [due time, bytes]
        self._queued = 0
        self._line_free_at = 0.0
        self._next_poll = 0.0
        self._write_blocked = False

        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, EVENT_READ, self._on_wake)

        self._pty: _PtyLine | None = None
        self._listener: socket.socket | None = None
        self._client: _TcpLine | None = None
        self._control_listener: socket.socket | None = None
        self._control_path: Path | None = None
        self._controls: list[_ControlConn] = []
        self.control_address: str | None = None
        try:
            if listen is not None:
                self._open_tcp(listen)
            else:
                self._pty = _PtyLine(Path(port) if port is not None else None)
                self._sel.register(self._pty.master, EVENT_READ, self._on_line)
            if control is not None:
                self._open_control(control)
        except BaseException:
            self.close()
            raise

    # -- where the driver connects ----------------------------------------------------------

    @property
    def pty_path(self) -> str | None:
        """The pty slave device (``/dev/pts/N``), when serving a pty."""
        return self._pty.path if self._pty else None

    @property
    def address(self) -> tuple[str, int] | None:
        """The TCP address actually bound (port 0 asks the OS for a free one)."""
        if self._listener is None:
            return None
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        """What to give ``serial.serial_for_url``: the symlink, the pty, or socket://."""
        if self._pty is not None:
            return str(self._pty.link) if self._pty.link is not None else self._pty.path
        host, port = self.address or ("127.0.0.1", 0)
        return f"socket://{host}:{port}"

    # -- running ------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the loop until :meth:`stop`; then release everything (:meth:`close`)."""
        self._running = True
        self._loop_thread = threading.get_ident()
        try:
            while not self._stopping:
                timeout = self._timeout()
                for key, mask in self._sel.select(timeout):
                    key.data(key, mask)
                self._run_calls()
                self._tick()
        finally:
            self._running = False
            self._loop_thread = None
            self._fail_calls()
            self.close()
            self._finished.set()

    def start(self) -> Pn532Server:
        """Run the loop in a daemon thread (tests); returns self."""
        if self._thread is not None:
            raise ServerError("server already started")
        self._running = True
        self._thread = threading.Thread(target=self.serve_forever, name="pn532-emulator")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to end (any thread, or a signal handler). Returns at once."""
        self._stopping = True
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; whether it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Pn532Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join(5.0)
        self.close()

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``fn`` on the loop's thread and return its result (from any thread).

        Anything that changes the emulator or its cards while the loop runs goes through
        here; a pending InListPassiveTarget is polled right after, so placing a card
        answers a waiting host at once.
        """
        if not self._running or self._loop_thread == threading.get_ident():
            result = fn()
            self._after_change()
            return result
        future: Future[object] = Future()
        with self._lock:
            self._calls.append((fn, future))
        self._wake()
        return future.result(timeout)  # type: ignore[return-value]

    def place(self, card: Card) -> None:
        """Put ``card`` on the reader (it joins :attr:`cards` if new)."""

        def run() -> None:
            if not any(c is card for c in self.cards):
                self.cards.append(card)
            self.emulator.place_card(card)

        self.call(run)

    def remove(self, card: Card) -> None:
        """Take ``card`` off the reader."""
        self.call(lambda: self.emulator.remove_card(card))

    def control(self, line: str) -> list[str]:
        """Run one control-protocol line on the loop's thread; the reply lines."""
        reply = self.call(lambda: self.control_handler.handle(line))
        if reply.shutdown:
            self.stop()
        return reply.lines

    def close(self) -> None:
        """Release the line, the listeners, the symlink and the control socket file."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._controls):
            self._close_control(conn)
        if self._client is not None:
            self._drop_client()
        for sock in (self._listener, self._control_listener):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        if self._control_path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self._control_path).st_mode):
                    os.unlink(self._control_path)
        if self._pty is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._pty.master)
            self._pty.close()
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._wake_r)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sel.close()

    # -- the loop's parts -------------------------------------------------------------------

    def _timeout(self) -> float:
        now = time.monotonic()
        timeout = IDLE_TIMEOUT
        if self.emulator.pending:
            timeout = min(timeout, max(0.0, self._next_poll - now))
        if self._outq and not self._write_blocked:
            timeout = min(timeout, max(0.0, float(self._outq[0][0]) - now))  # type: ignore[arg-type]
        return timeout

    def _tick(self) -> None:
        now = time.monotonic()
        if self.emulator.pending and now >= self._next_poll:
            self._next_poll = now + POLL_INTERVAL
            self._emit(self.emulator.poll())
        self._flush()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def _on_wake(self, key: object, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)
            self._after_change()

    def _fail_calls(self) -> None:
        with self._lock:
            calls, self._calls = list(self._calls), deque()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(ServerError("the reader emulator stopped"))

    def _after_change(self) -> None:
        """A card may have come: finish a waiting InListPassiveTarget now."""
        if self.emulator.pending:
            self._emit(self.emulator.poll())
            self._flush()

    # -- the serial line --------------------------------------------------------------------

    def _line(self) -> _Line | None:
        return self._pty if self._pty is not None else self._client

    def _on_line(self, key: object, mask: int) -> None:
        line = self._line()
        if line is None:
            return
        if mask & EVENT_READ:
            data = line.read()
            if data is None:
                self._drop_client()
                return
            if data:
                # the bytes themselves are not logged: a chip-mode authentication carries a
                # sector key (the emulator traces each command with it blanked out)
                logger.debug("host > chip: %d bytes", len(data))
                self._emit(self.emulator.receive(data))
        if mask & EVENT_WRITE:
            self._write_blocked = False
            self._flush()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        now = time.monotonic()
        due = now
        if self.baud_timing:
            due = max(now, self._line_free_at) + len(data) * BITS_PER_BYTE / BAUD
            self._line_free_at = due
        if self._queued + len(data) > MAX_OUTPUT:
            logger.warning("the host is not reading: %d queued bytes dropped", self._queued)
            self._outq.clear()
            self._queued = 0
        self._outq.append([due, bytes(data)])
        self._queued += len(data)

    def _flush(self) -> None:
        line = self._line()
        now = time.monotonic()
        while self._outq and float(self._outq[0][0]) <= now:  # type: ignore[arg-type]
            item = self._outq[0]
            data: bytes = item[1]  # type: ignore[assignment]
            if line is None:  # TCP with no client: nobody to hear the chip
                self._outq.popleft()
                self._queued -= len(data)
                continue
            sent = line.write(data)
            if sent:
                logger.debug("chip > host: %d bytes", sent)
            self._queued -= sent
            if sent < len(data):
                item[1] = data[sent:]
                self._want_write(True)
                return
            self._outq.popleft()
        self._want_write(False)

    def _want_write(self, blocked: bool) -> None:
        line = self._line()
        fd = line.fileno() if line is not None else None
        if fd is None or blocked == self._write_blocked:
            return
        self._write_blocked = blocked
        events = EVENT_READ | (EVENT_WRITE if blocked else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(fd, events, self._on_line)

    # -- TCP ------------------------------------------------------------------------------------

    def _open_tcp(self, address: tuple[str, int]) -> None:
        sock = socket.create_server(address, reuse_port=False)
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, EVENT_READ, self._on_accept)

    def _on_accept(self, key: object, mask: int) -> None:
        assert self._listener is not None
        try:
            sock, peer = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._client is not None:
            logger.warning("second host %s refused: the reader has one line", peer)
            sock.close()
            return
        logger.info("host connected from %s", peer)
        self._client = _TcpLine(sock)
        self._write_blocked = False
        self._sel.register(sock, EVENT_READ, self._on_line)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        logger.info("host disconnected")
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.close()
        self._outq.clear()
        self._queued = 0
        self._write_blocked = False

    # -- the control channel ----------------------------------------------------------------

    def _open_control(self, where: str) -> None:
        if where == "-":
            conn = _ControlConn(None, "stdin")
            try:
                self._sel.register(sys.stdin.fileno(), EVENT_READ, self._control_event(conn))
            except (OSError, ValueError) as exc:
                raise ServerError(f"cannot take control commands on stdin: {exc}") from exc
            self._controls.append(conn)
            self.control_address = "-"
            return
        if where.isdigit() or (":" in where and where.rpartition(":")[2].isdigit()):
            host, port = parse_listen(where)
            sock = socket.create_server((host, port))
            bound_host, bound_port = sock.getsockname()[:2]
            self.control_address = f"{bound_host}:{bound_port}"
        else:
            path = Path(where)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise ServerError(f"{path} exists and is not a socket: refusing to replace")
                path.unlink()  # a socket left by an emulator that was killed
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                sock.listen(MAX_CONTROL_CLIENTS)
            except OSError:
                sock.close()
                raise
            self._control_path = path
            self.control_address = str(path)
        sock.setblocking(False)
        self._control_listener = sock
        self._sel.register(sock, EVENT_READ, self._on_control_accept)

    def _on_control_accept(self, key: object, mask: int) -> None:
        assert self._control_listener is not None
        try:
            sock, _ = self._control_listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if sum(c.sock is not None for c in self._controls) >= MAX_CONTROL_CLIENTS:
            with contextlib.suppress(OSError):
                sock.sendall(b"error: too many control connections\n")
            sock.close()
            return
        conn = _ControlConn(sock, f"control#{sock.fileno()}")
        self._controls.append(conn)
        self._sel.register(sock, EVENT_READ, self._control_event(conn))

    def _control_event(self, conn: _ControlConn) -> Callable[[object, int], None]:
        def handler(key: object, mask: int) -> None:
            if mask & EVENT_READ:
                self._control_read(conn)
            if mask & EVENT_WRITE:
                self._control_write(conn)

        return handler

    def _control_read(self, conn: _ControlConn) -> None:
        try:
            if conn.sock is None:
                data = os.read(conn.fileno(), READ_SIZE)
            else:
                data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # EOF: a control client left (stdin at EOF just stops being read)
            self._close_control(conn)
            return
        conn.inbuf += data
        while (nl := conn.inbuf.find(b"\n")) >= 0 and not conn.closing:
            raw = bytes(conn.inbuf[:nl])
            del conn.inbuf[: nl + 1]
            self._control_line(conn, raw.decode("utf-8", "replace").strip())
        if len(conn.inbuf) > MAX_LINE:
            conn.outbuf += b"error: control line too long\n"
            conn.closing = True
        self._control_write(conn)

    def _control_line(self, conn: _ControlConn, line: str) -> None:
        if not line or line.startswith("#"):
            return
        logger.info("control %s: %s", conn.name, line)
        reply = self.control_handler.handle(line)
        conn.outbuf += reply.text().encode()
        if reply.close:
            conn.closing = True
        if reply.shutdown:
            self.stop()
        self._after_change()

    def _control_write(self, conn: _ControlConn) -> None:
        if conn.outbuf:
            try:
                if conn.sock is None:
                    sent = os.write(sys.stdout.fileno(), conn.outbuf)
                else:
                    sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_control(conn)
                return
            del conn.outbuf[:sent]
        if conn.sock is not None:
            events = EVENT_READ | (EVENT_WRITE if conn.outbuf else 0)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(conn.sock, events, self._control_event(conn))
        if conn.closing and not conn.outbuf:
            self._close_control(conn)

    def _close_control(self, conn: _ControlConn) -> None:
        if conn not in self._controls:
            return
        self._controls.remove(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.fileno() if conn.sock is None else conn.sock)
        if conn.sock is not None:
            conn.sock.close()
