"""Fleet status: which devices and camera sites are online, their last health report, and
which alarms are still open.

A device is *online* when its retained status says so and the center heard from it within
``stale_s`` (a device whose broker connection died without a last will, or a camera site
that lost power, otherwise looks online forever). An alarm is *open* from its event until
the matching clearing event (``door-open`` until ``door-closed``, ``camera-down`` of camera
X until ``camera-up`` of camera X, ...); an alarm without a clearing pair stays listed for
``alarm_window_s``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .store import CenterStore, now_ms

__all__ = ["CLEARED_BY", "FleetEntry", "fleet_status", "format_status", "open_alarms",
           "status_json"]

#: alarm event -> the event that clears it
CLEARED_BY = {
    "reader-lost": "reader-back",
    "out-of-service": "in-service",
    "door-open": "door-closed",
    "camera-down": "camera-up",
    "mains-lost": "mains-back",
    "disk-low": "disk-ok",
    "over-temperature": "temperature-ok",
    "ups-battery-low": "ups-battery-ok",
    "camera-degraded": "camera-up",
}
#: clearing event -> the alarms it ends. A camera that comes back degraded (answers, but slow
#: or with a wrong clock) is no longer down: its `camera-degraded` ends `camera-down`.
_CLEARS: dict[str, tuple[str, ...]] = {}
for _alarm, _clear in CLEARED_BY.items():
    _CLEARS[_clear] = (*_CLEARS.get(_clear, ()), _alarm)
_CLEARS_TOO = {"camera-degraded": ("camera-down",)}


@dataclass(frozen=True)
class FleetEntry:
    device_id: str
    kind: str | None
    online: bool
    state: str | None
    sw: str | None
    last_seen_ms: int | None
    telemetry: dict[str, Any] | None
    open_alarms: list[dict[str, Any]]


def _alarm_key(event: dict[str, Any], name: str) -> tuple[str, str]:
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return name, ""
    return name, str(detail.get("camera") or detail.get("id") or "")


def open_alarms(events_newest_first: list[dict[str, Any]], now: int,
                alarm_window_s: int) -> list[dict[str, Any]]:
    cleared: set[tuple[str, str]] = set()
    out = []
    for event in events_newest_first:
        name = event.get("event")
        if not isinstance(name, str):
            continue
        if name in _CLEARS:
            for alarm in _CLEARS[name]:
                cleared.add(_alarm_key(event, alarm))
            continue
        for alarm in _CLEARS_TOO.get(name, ()):
            cleared.add(_alarm_key(event, alarm))
        if event.get("severity") not in ("warning", "alarm"):
            continue
        key = _alarm_key(event, name)
        if key in cleared:
            continue
        if name not in CLEARED_BY and now - event.get("ts", 0) > alarm_window_s * 1000:
            continue
        cleared.add(key)  # only the newest of a kind is listed
        out.append({k: event[k] for k in ("event", "severity", "ts", "seq", "detail")})
    return out


def fleet_status(store: CenterStore, *, stale_s: int = 300, alarm_window_s: int = 86_400,
                 now: int | None = None) -> list[FleetEntry]:
    now = now_ms() if now is None else now
    out = []
    for st in store.device_states():
        recent = st.last_seen_ms is not None and now - st.last_seen_ms <= stale_s * 1000
        out.append(FleetEntry(
            st.device_id, st.kind, st.state == "online" and recent, st.state, st.sw,
            st.last_seen_ms, st.telemetry,
            open_alarms(store.events(st.device_id, limit=500), now, alarm_window_s),
        ))
    return out


def status_json(entries: list[FleetEntry]) -> list[dict[str, Any]]:
    return [asdict(e) for e in entries]


def format_status(entries: list[FleetEntry], now: int | None = None) -> str:
    now = now_ms() if now is None else now
    if not entries:
        return "No devices registered or heard from yet."
    lines = []
    for e in entries:
        seen = ("never" if e.last_seen_ms is None
                else f"{max(0, now - e.last_seen_ms) / 1000:.0f} s ago")
        state = "online" if e.online else "OFFLINE"
        lines.append(f"{e.device_id} ({e.kind or '?'}): {state}, last heard {seen}"
                     + (f", sw {e.sw}" if e.sw else ""))
        t = e.telemetry or {}
        keys = ("outbox_depth", "outbox_age_s", "reader", "cpu_pct", "mem_used_mb",
                "disk_free_mb", "temp_c", "clock_offset_ms")
        health = ", ".join(f"{k}={t[k]}" for k in keys if k in t)
        if isinstance(t.get("cameras"), dict):
            health += (", " if health else "") + "cameras " + " ".join(
                f"{cam}:{state}" for cam, state in sorted(t["cameras"].items()))
        if health:
            lines.append(f"  {health}")
        for alarm in e.open_alarms:
            detail = alarm.get("detail") or {}
            extra = f" {detail}" if detail else ""
            lines.append(f"  ALARM {alarm['event']} ({alarm['severity']}){extra}")
    return "\n".join(lines)
