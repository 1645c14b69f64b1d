"""The reader package's one exception hierarchy.

Each failure a field technician can meet on a validator's reader has its own class, and each
message says what to check: the cable, the card, the configuration.
"""

from __future__ import annotations

from firmware.core.errors import CoreError


class ReaderError(CoreError):
    """Base of every error raised by :mod:`firmware.reader`.

    It derives from the core's base so a validator loop can catch one type for "this tap
    failed cleanly, log it and carry on".
    """


class FrameFormatError(ReaderError):
    """Bytes on the serial line do not form a valid PN532 frame (length or checksum)."""


class ReaderTimeout(ReaderError):
    """The PN532 did not answer (ACK or response) in time: cable, power or baud rate."""


class ReaderUnavailable(ReaderError):
    """The serial port cannot be opened or went away (reader unplugged)."""


class ReaderNacked(ReaderError):
    """The PN532 kept answering NACK: the line corrupts the host's frames."""


class ApplicationError(ReaderError):
    """The PN532 answered with its error frame: it did not understand the command."""


class CommandFailed(ReaderError):
    """A PN532 command completed with a non-zero status byte.

    ``status`` is the error code (the low 6 bits of the status byte, see
    :class:`firmware.reader.constants.Status`).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NoCard(ReaderError):
    """No card answered in the field."""
