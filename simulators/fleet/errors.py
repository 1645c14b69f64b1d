"""The fleet simulator's exceptions: one hierarchy, messages an operator can act on.

They derive from :class:`simulators.errors.SimulatorError` (and so from ``CoreError``), which
``afc`` already prints as one line, ``afc: error: ...``, with exit status 1.
"""

from __future__ import annotations

from ..errors import SimulatorError

__all__ = ["FleetError", "InvariantFailed", "ProcessFailed", "ScenarioError"]


class FleetError(SimulatorError):
    """Base of every fleet simulator error."""


class ScenarioError(FleetError):
    """A scenario file is missing, not TOML, or names a setting that does not exist or is
    out of range (the message names the file and the setting)."""


class ProcessFailed(FleetError):
    """A process of the fleet (validator, agent, center, emulator, broker, camera site) did
    not start, or died and could not be brought back within bounded time."""


class InvariantFailed(FleetError):
    """The final reconciliation found a broken invariant; ``reasons`` lists every one, the
    message is the first (the one-line reason ``afc`` prints)."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        super().__init__(f"reconciliation failed: {reasons[0]}{more}")
