"""Start and stop rig processes the way a test engineer would: as real ``afc`` processes.

The hardware-in-the-loop tests, the benchmarks and the fleet simulator all need "a PN532
emulator with these cards on a pty"; this module is the one place that knows how to start
one, wait until its port is there, and stop it (saving its cards) within bounded time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware.core.errors import CoreError


class RigError(CoreError):
    """A rig process did not start or stop as expected."""


class ReaderEmulatorProcess:
    """``afc sim reader --port PATH --card SPEC...`` in a child process."""

    def __init__(
        self,
        port: str | os.PathLike,
        cards: list[str],
        *,
        control: str | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.port = Path(port)
        self.cards = list(cards)
        self.control_path = control
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return str(self.port)

    def start(self) -> ReaderEmulatorProcess:
        cmd = [sys.executable, "-m", "tools.cli", "sim", "reader", "--port", str(self.port)]
        for card in self.cards:
            cmd += ["--card", card]
        if self.control_path:
            cmd += ["--control", self.control_path]
        cmd += self.extra_args
        # stderr goes to a file: a pipe nobody reads could fill up and stall the emulator
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        deadline = time.monotonic() + self.start_timeout
        while not self.port.exists():
            if self.proc.poll() is not None:
                err = self.stderr_text().strip()
                raise RigError(f"reader emulator exited at start: {err or 'no message'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RigError(f"reader emulator did not create {self.port} in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the emulator saves its card files), then SIGKILL if it hangs."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def control(self, line: str, timeout: float = 5.0) -> list[str]:
        """Send one control command over the Unix socket given as ``control`` and return the
        reply lines; :class:`RigError` on an ``error:`` reply."""
        if not self.control_path:
            raise RigError("this emulator was started without a control socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            while True:  # the socket may appear a moment after the port
                try:
                    sock.connect(self.control_path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise RigError(f"no control socket at {self.control_path}") from None
                    time.sleep(0.02)
            sock.sendall(line.encode() + b"\n")
            buf = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    raise RigError(f"control channel closed while answering {line!r}")
                buf += chunk
                lines = buf.decode(errors="replace").splitlines()
                if buf.endswith(b"\n") and lines and lines[-1].startswith(("ok", "error")):
                    break
        if lines[-1].startswith("error"):
            raise RigError(f"control command {line!r} failed: {lines[-1]}")
        return lines

    def stderr_text(self) -> str:
        """What the emulator logged (for a failing test's message)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def __enter__(self) -> ReaderEmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
