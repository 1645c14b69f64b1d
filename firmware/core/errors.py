"""The one exception hierarchy of the validator core.

Callers catch :class:`CoreError` to turn any rejection of bad input (a garbled frame, a card
that answers wrongly, a malformed block) into a logged, clean refusal; the subclasses say
*which* kind of failure it was so a field technician knows where to look.
"""

from __future__ import annotations


class CoreError(Exception):
    """Base of every error raised by :mod:`firmware.core`."""


class FrameError(CoreError):
    """A frame on the air interface could not be understood (length, CRC or parity)."""


class CrcError(FrameError):
    """The CRC_A of a received frame does not match its contents."""


class ParityError(FrameError):
    """A parity bit of a received frame is wrong (noise, or the wrong key stream)."""


class NoResponseError(CoreError):
    """The card did not answer: it left the field, or it refused silently."""


class CollisionError(CoreError):
    """Two or more cards answered at once and the anticollision loop could not separate them."""


class ProtocolError(CoreError):
    """The card (or the reader) broke the command/response sequence of the protocol."""


class AuthenticationError(ProtocolError):
    """MIFARE Classic authentication failed: wrong key, wrong sector or a forged answer."""


class NackError(ProtocolError):
    """The card answered a command with a 4-bit NACK.

    ``code`` is the 4-bit value from the card (see :data:`firmware.core.mifare.NACK_MEANINGS`).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CodecError(CoreError):
    """Bytes that should hold a structure (value block, sector trailer, key) do not."""


class ValueBlockError(CodecError):
    """A value block's redundant copies disagree: it was torn, tampered with, or never a value."""


class AccessBitsError(CodecError):
    """A sector trailer's access bits and their inverted copies disagree."""


class KeyStoreError(CoreError):
    """The key store cannot be used (missing, unsafe permissions, unknown key name)."""
