"""Exceptions shared by the simulator packages.

They derive from :class:`firmware.core.errors.CoreError`, so a rig or a control channel that
already turns any core rejection into a clean, logged refusal handles these the same way.
"""

from __future__ import annotations

from firmware.core.errors import CodecError, CoreError


class SimulatorError(CoreError):
    """Base of every error raised by :mod:`simulators`: a simulator was asked for something
    it cannot do (a bad file, a bad specification, a fault setting out of bounds)."""


class CardFileError(SimulatorError, CodecError):
    """A virtual card's file or spec string cannot be used: unreadable, malformed, or
    describing a card that cannot exist (wrong block count, UID not in block 0, bad BCC).

    It is also a :class:`CodecError`, since it means "bytes that should hold a card do not".
    """
