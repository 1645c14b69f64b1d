"""Byte transports to a PN532, opened by URL with pyserial's ``serial_for_url``.

``/dev/ttyUSB0`` (a real reader on a USB-UART), ``/dev/pts/7`` or a symlink to it (the
emulator on a pseudo-terminal), ``socket://127.0.0.1:7000`` (the emulator over TCP),
``loop://`` (tests of the framing alone): a rig swaps a device for an emulator by changing
one string, and nothing above this module knows which it got.
"""

from __future__ import annotations

import contextlib
import termios
import time

import serial

from .errors import ReaderUnavailable

DEFAULT_BAUDRATE = 115200
# a vanished pty or USB-UART surfaces as any of these, depending on the call
_PORT_ERRORS = (serial.SerialException, OSError, termios.error)


class SerialTransport:
    """A byte pipe to the reader with deadline-based reads."""

    def __init__(self, url: str, *, baudrate: int = DEFAULT_BAUDRATE) -> None:
        self.url = url
        self.bytes_written = 0  # counters for the serial-line budget of a tap
        self.bytes_read = 0
        try:
            self._port = serial.serial_for_url(url, baudrate=baudrate, timeout=0.05)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ReaderUnavailable(
                f"cannot open reader port {url}: {exc} (check the cable, the device path "
                "and that no other program holds the port)"
            ) from exc

    def write(self, data: bytes) -> None:
        try:
            self._port.write(data)
            self._port.flush()
            self.bytes_written += len(data)
        except _PORT_ERRORS as exc:
            raise ReaderUnavailable(f"reader port {self.url} failed on write: {exc}") from exc

    def read(self, deadline: float) -> bytes:
        """Whatever bytes arrive before ``deadline`` (a ``time.monotonic()`` value); returns
        as soon as at least one byte is there, or ``b""`` at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        try:
            self._port.timeout = min(remaining, 0.5)
            waiting = self._port.in_waiting
            data = self._port.read(waiting or 1)
            self.bytes_read += len(data)
            return data
        except _PORT_ERRORS as exc:
            raise ReaderUnavailable(
                f"reader port {self.url} failed on read: {exc} (reader unplugged?)"
            ) from exc

    def discard_input(self) -> None:
        """Drop stale bytes (a late answer to a timed-out command)."""
        try:
            self._port.reset_input_buffer()
        except _PORT_ERRORS as exc:
            raise ReaderUnavailable(f"reader port {self.url} failed: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(*_PORT_ERRORS):
            self._port.close()
