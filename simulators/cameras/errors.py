"""Errors of the camera-site simulators (they are :class:`SimulatorError`, hence core errors
that ``afc`` prints as one line)."""

from __future__ import annotations

from simulators.errors import SimulatorError


class CameraSimError(SimulatorError):
    """An emulated camera or the cabinet sensors were asked for something impossible (an
    unknown camera, an unknown fault, a reading out of range)."""


class FirmwareError(SimulatorError):
    """The MicroPython firmware cannot be run here: the unix port or umqtt is missing, the
    flash directory cannot be written, or the process did not do what was awaited."""
