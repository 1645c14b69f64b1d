"""Emulated cabinet sensors: a JSON file the firmware's unix-port HAL reads every cycle.

A file rather than a socket because that is what sensors are to the firmware: a value read
now, with no conversation. The file is replaced atomically (write, fsync, rename), so the
firmware never reads half of it. Fields::

    temp_c        cabinet temperature (°C, number)
    humidity_pct  relative humidity (%, number)
    door_open     door contact (true = open)
    mains         mains present (false = running on the UPS)
    ups_pct       UPS battery charge (%, number)
    bus_hang_ms   > 0: the sensor read blocks this long (a stuck I2C bus): used to stall the
                  firmware's loop and see its watchdog reset it
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CameraSimError

_LIMITS: dict[str, tuple[type, float, float]] = {
    "temp_c": (float, -60.0, 150.0),
    "humidity_pct": (float, 0.0, 100.0),
    "ups_pct": (float, 0.0, 100.0),
    "bus_hang_ms": (int, 0, 3_600_000),
}
_BOOLS = ("door_open", "mains")


class CabinetSensors:
    """The cabinet's readings, kept in memory and mirrored to ``path``."""

    def __init__(self, path: str | os.PathLike[str], **readings: Any) -> None:
        self.path = Path(path)
        self.values: dict[str, Any] = {"temp_c": 24.0, "humidity_pct": 40.0,
                                       "door_open": False, "mains": True, "ups_pct": 100.0,
                                       "bus_hang_ms": 0}
        self.set(**readings)

    def set(self, **readings: Any) -> dict[str, Any]:
        """Change some readings (validated) and rewrite the file; returns all readings."""
        new = dict(self.values)
        for name, value in readings.items():
            if name in _BOOLS:
                if not isinstance(value, bool):
                    raise CameraSimError(f"{name} must be true or false")
            elif name in _LIMITS:
                kind, lo, hi = _LIMITS[name]
                if value is None and name != "bus_hang_ms":
                    pass  # an unreadable sensor
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise CameraSimError(f"{name} must be a number")
                elif not lo <= value <= hi:
                    raise CameraSimError(f"{name} = {value} is outside {lo:g}..{hi:g}")
                elif kind is int:
                    value = int(value)
            else:
                known = ", ".join([*_LIMITS, *_BOOLS])
                raise CameraSimError(f"unknown cabinet reading {name!r} (known: {known})")
            new[name] = value
        self.values = new
        self._write()
        return dict(new)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.values, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
