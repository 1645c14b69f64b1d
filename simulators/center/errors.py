"""The reference center's errors: one base, derived from the simulators' own."""

from __future__ import annotations

from ..errors import SimulatorError

__all__ = ["CenterError", "CenterStoreError"]


class CenterError(SimulatorError):
    """Base of every error raised by :mod:`simulators.center`."""


class CenterStoreError(CenterError):
    """The center database cannot be used (locked too long, damaged, disk full, wrong file)."""
