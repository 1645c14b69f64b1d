"""Start and stop rig processes the way a test engineer would: as real ``afc`` processes.

The hardware-in-the-loop tests, the benchmarks and the fleet simulator all need "a PN532
emulator with these cards on a pty"; this module is the one place that knows how to start
one, wait until its port is there, and stop it (saving its cards) within bounded time.
"""

from __future__ import annotations

import os
import signal
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
        self.control = control
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
        if self.control:
            cmd += ["--control", self.control]
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

    def stderr_text(self) -> str:
        """What the emulator logged (for a failing test's message)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def __enter__(self) -> ReaderEmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
