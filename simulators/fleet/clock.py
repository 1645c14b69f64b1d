"""The fleet's simulated wall clock, shared by every validator and bayi process through a file.

The orchestrator writes one small JSON file per device::

    {"real0": 1795000000.0, "sim0": 1794990600.0, "speed": 240.0, "offset_s": 0}

and the device reads its wall time as ``sim0 + (time.time() - real0) * speed + offset_s``.
The file is re-read when its modification time changes, so the orchestrator can start the
day, or set one device's clock back (``offset_s`` < 0: a bad RTC, a wrong manual setting),
while the device runs. The device's :class:`~firmware.apps.clock.GuardedClock` sits on top
exactly as in the field: a clock set back never makes its time run backwards.

Every other part (agents, center, broker, camera sites) stays on real time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FleetError

__all__ = ["ClockSetting", "FileClock", "write_clock"]


@dataclass(frozen=True)
class ClockSetting:
    real0: float
    sim0: float
    speed: float = 1.0
    offset_s: float = 0.0

    def at(self, real: float) -> float:
        """The simulated time at real time ``real``."""
        return self.sim0 + (real - self.real0) * self.speed + self.offset_s

    def real_at(self, sim: float) -> float:
        """The real time at which the (unshifted) simulated clock reads ``sim``."""
        return self.real0 + (sim - self.sim0) / self.speed


def write_clock(path: str | os.PathLike[str], setting: ClockSetting) -> None:
    """Replace the clock file atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(setting)))
    os.replace(tmp, path)


class FileClock:
    """A device's wall clock read from its clock file (a ``wall`` for GuardedClock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime: int | None = None
        self._setting: ClockSetting | None = None
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            if stat.st_mtime_ns == self._mtime and self._setting is not None:
                return
            data = json.loads(self.path.read_text())
            self._setting = ClockSetting(float(data["real0"]), float(data["sim0"]),
                                         float(data.get("speed", 1.0)),
                                         float(data.get("offset_s", 0.0)))
            self._mtime = stat.st_mtime_ns
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if self._setting is None:
                raise FleetError(f"clock file {self.path} is unreadable: {exc}") from None
            # a file being replaced right now: keep the last good setting

    def __call__(self) -> float:
        self._load()
        assert self._setting is not None
        return self._setting.at(time.time())
