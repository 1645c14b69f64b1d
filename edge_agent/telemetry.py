"""Device health for the telemetry report (docs/protocol.md, JSON ``telemetry``).

Two halves, because they run in different places: :func:`device_facts` reads the device
database (outbox depth and age, reader state, last tap) in the agent's database thread, and
:class:`HealthSampler` reads the operating system (uptime, CPU, memory, disk, temperature)
through :mod:`psutil` and ``/sys``. :func:`telemetry_fields` joins them into the message.
Nothing here blocks for long or raises on a missing sensor: a field that cannot be read is
left out (``temp_c`` on a machine without thermal zones), never guessed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil

from firmware.stores import STATUS_READER, DeviceDatabase

__all__ = [
    "STATE_LAST_TAP",
    "HealthSampler",
    "device_facts",
    "read_temperature_c",
    "software_version",
    "telemetry_fields",
]

log = logging.getLogger("afc.agent.telemetry")

#: The agent's durable note of the newest tap it has forwarded (``agent_state`` key).
STATE_LAST_TAP = "last_tap_ts"
_THERMAL = Path("/sys/class/thermal")
_MB = 1024 * 1024


@lru_cache(maxsize=1)
def software_version() -> str:
    """The installed afc-edge version (``0+unknown`` from a bare checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("afc-edge")
    except (ImportError, PackageNotFoundError):
        return "0+unknown"


def read_temperature_c(root: Path = _THERMAL) -> float | None:
    """The hottest thermal zone in °C, or None when none is readable (containers, VMs)."""
    best: float | None = None
    try:
        zones = sorted(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for zone in zones[:16]:
        try:
            milli = int(zone.read_text().strip())
        except (OSError, ValueError):
            continue
        value = milli / 1000.0
        if -60.0 < value < 200.0 and (best is None or value > best):
            best = value
    return None if best is None else round(best, 1)


def device_facts(db: DeviceDatabase, now_ms: int) -> dict[str, Any]:
    """What the device database says: outbox depth/age, reader state, last tap, events.

    Runs in the agent's database thread. ``outbox_depth`` counts records not yet
    acknowledged by the center; ``outbox_age_s`` is how old the oldest of them is.
    """
    journal = db.journal
    acked = journal.acked_seq
    depth = max(journal.last_seq - acked, 0)
    facts: dict[str, Any] = {"outbox_depth": depth, "outbox_age_s": 0}
    if depth:
        oldest = journal.records(acked, 1, verify=False)
        if oldest:
            facts["outbox_age_s"] = max(0, (now_ms - oldest[0].time) // 1000)
    status = db.events.status()
    reader = status.get(STATUS_READER)
    facts["reader"] = reader[0] if reader is not None and reader[0] else "none"
    last_tap = db.config.state(STATE_LAST_TAP)
    app_tap = status.get(STATE_LAST_TAP)
    candidates = [v for v in (last_tap, app_tap and app_tap[0]) if isinstance(v, int)]
    if candidates:
        facts["last_tap_ts"] = max(candidates)
    facts["events_pending"] = db.events.count
    return facts


class HealthSampler:
    """Operating-system health, sampled once per report.

    CPU percent is measured between two calls (psutil's non-blocking form), so the first
    report after start shows the load since the sampler was made.
    """

    def __init__(self, disk_path: str | os.PathLike[str]) -> None:
        self._disk_path = str(disk_path)
        self._process = psutil.Process()
        self._started = time.monotonic()
        try:
            psutil.cpu_percent(interval=None)
            self._process.cpu_percent(interval=None)
        except (psutil.Error, OSError):  # pragma: no cover - /proc unreadable
            pass

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with contextlib.suppress(psutil.Error, OSError):
            out["uptime_s"] = int(max(0.0, time.time() - psutil.boot_time()))
        out["agent_uptime_s"] = int(time.monotonic() - self._started)
        try:
            out["cpu_pct"] = round(psutil.cpu_percent(interval=None), 1)
            out["agent_cpu_pct"] = round(self._process.cpu_percent(interval=None), 1)
        except (psutil.Error, OSError):
            pass
        try:
            mem = psutil.virtual_memory()
            out["mem_used_mb"] = round((mem.total - mem.available) / _MB, 1)
            out["agent_rss_mb"] = round(self._process.memory_info().rss / _MB, 1)
        except (psutil.Error, OSError):
            pass
        with contextlib.suppress(psutil.Error, OSError):
            out["disk_free_mb"] = round(psutil.disk_usage(self._disk_path).free / _MB, 1)
        temp = read_temperature_c()
        if temp is not None:
            out["temp_c"] = temp
        return out


def telemetry_fields(
    *,
    device_id: str,
    kind: str,
    now_ms: int,
    health: Mapping[str, Any],
    facts: Mapping[str, Any],
    clock_offset_ms: int | None,
    dropped: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The telemetry message's fields (``v`` and ``sig`` are added by the encoder)."""
    fields: dict[str, Any] = {"dev": device_id, "ts": now_ms, "kind": kind,
                              "sw": software_version()}
    fields.update(health)
    fields.update(facts)
    if clock_offset_ms is not None:
        fields["clock_offset_ms"] = int(clock_offset_ms)
    if dropped:
        fields["telemetry_dropped"] = int(dropped)
    if extra:
        fields.update(extra)
    return fields
