"""The PN532 reader emulator: the chip as a sans-I/O model, served on a pty or TCP.

* :class:`Pn532Emulator` — bytes from the host in, the chip's bytes out; cards in an RF
  field; chip-crypto (InDataExchange) and transparent (InCommunicateThru) modes;
* :class:`Pn532Server` — the emulator on a pseudo-terminal (or a TCP port) that a driver
  opens with ``serial.serial_for_url``, with a line-based control channel
  (:mod:`.control`) to place, remove and fault cards while it runs.

``afc sim reader`` (:mod:`tools.sim_cmd`) is the command-line front end; the choices made
where the PN532 manual is silent are in ``docs/pn532-emulator.md``.
"""

from __future__ import annotations

from .control import ControlHandler, Reply
from .emulator import Pn532Emulator, Target
from .server import Pn532Server, ServerError, parse_listen

__all__ = [
    "ControlHandler",
    "Pn532Emulator",
    "Pn532Server",
    "Reply",
    "ServerError",
    "Target",
    "parse_listen",
]
