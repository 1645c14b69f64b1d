"""Device events and alarms, waiting for the edge agent to forward them; and device status.

The applications raise events (``reader-lost``, ``out-of-service``, ``disk-low``, ``door-open``
...) with :meth:`EventLog.raise_event`: one short durable write, no network. The agent reads
them oldest first (:meth:`EventLog.pending`), publishes each with QoS 1 on
``afc/v1/dev/{id}/event`` and deletes it once the broker has acknowledged it
(:meth:`EventLog.delete`). Every event gets the next per-device event number (``seq``); the
number keeps growing after every row was forwarded (``meta.event_seq``), so the center sees
gaps (dropped events) and duplicates (a redelivery after a crash between PUBACK and delete).

The log is bounded (``cap`` rows): beyond it the oldest ``info`` events go first, then the
oldest ``warning`` ones; ``alarm`` events are never dropped here. A device offline for weeks
keeps its alarms and its most recent events.

:class:`EventLog` also holds *device status*: a few named facts the applications set when
they change (the reader's state) and the agent reports in its telemetry.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ._sql import Conn, check_int
from .errors import InvalidRecord

__all__ = [
    "DEFAULT_EVENT_CAP",
    "SEVERITIES",
    "STATUS_READER",
    "EventLog",
    "EventRecord",
]

log = logging.getLogger("afc.stores.events")

SEVERITY_INFO = "info"
SEVERITY_WARNING = "warning"
SEVERITY_ALARM = "alarm"
SEVERITIES = (SEVERITY_INFO, SEVERITY_WARNING, SEVERITY_ALARM)

#: Status name of the card reader's state: ``ok``, ``lost`` or ``none`` (docs/protocol.md).
STATUS_READER = "reader"

#: Rows kept before old info/warning events are dropped.
DEFAULT_EVENT_CAP = 10_000
#: The JSON of one event's detail may not exceed this (it travels in one small message).
MAX_DETAIL_BYTES = 4096

_TOKEN_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


class EventRecord(NamedTuple):
    """One event: its per-device number, time (Unix ms), token, severity and detail."""

    seq: int
    time: int
    event: str
    severity: str
    detail: dict[str, Any]


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise InvalidRecord(
            f"{what} must be a token of 1 to 32 characters a-z, 0-9, '-', got {value!r}"
        )
    return value


def _detail_json(detail: Mapping[str, Any] | None) -> str:
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise InvalidRecord("an event detail must be a mapping")
    try:
        text = json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"an event detail must be JSON-serialisable: {exc}") from None
    if len(text.encode()) > MAX_DETAIL_BYTES:
        raise InvalidRecord(f"an event detail may not exceed {MAX_DETAIL_BYTES} bytes of JSON")
    return text


def _now_ms() -> int:
    return int(time.time() * 1000)


class EventLog:
    """The event log and device status of one database; reached as ``DeviceDatabase.events``."""

    def __init__(self, conn: Conn, cap: int = DEFAULT_EVENT_CAP) -> None:
        self._conn = conn
        self.cap = check_int(cap, "cap", 1)

    # -- the applications' side -----------------------------------------------------------------

    def raise_event(
        self,
        event: str,
        severity: str = SEVERITY_INFO,
        detail: Mapping[str, Any] | None = None,
        *,
        time: int | None = None,
    ) -> int:
        """Record an event for the center; returns its per-device event number.

        ``event`` is a token (``reader-lost``...), ``severity`` one of :data:`SEVERITIES`,
        ``detail`` a small JSON-serialisable mapping. Durable on return. If the log is over
        its cap the oldest info (then warning) events are dropped in the same transaction.
        """
        _check_token(event, "event")
        if severity not in SEVERITIES:
            raise InvalidRecord(f"event severity must be one of {SEVERITIES}, got {severity!r}")
        text = _detail_json(detail)
        when = _now_ms() if time is None else check_int(time, "time")
        with self._conn.write("raise event") as raw:
            raw.execute("UPDATE meta SET value = value + 1 WHERE key = 'event_seq'")
            seq = int(raw.execute("SELECT value FROM meta WHERE key = 'event_seq'").fetchone()[0])
            raw.execute(
                "INSERT INTO events (seq, time, event, severity, detail) VALUES (?, ?, ?, ?, ?)",
                (seq, when, event, severity, text),
            )
            dropped = self._enforce_cap(raw)
        if dropped:
            log.warning("event log over its cap of %d: %d old event(s) dropped", self.cap, dropped)
        return seq

    def _enforce_cap(self, raw: Any) -> int:
        excess = int(raw.execute("SELECT count(*) FROM events").fetchone()[0]) - self.cap
        dropped = 0
        for severity in (SEVERITY_INFO, SEVERITY_WARNING):
            if excess <= 0:
                break
            cur = raw.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE severity = ? "
                "ORDER BY seq LIMIT ?)",
                (severity, excess),
            )
            excess -= cur.rowcount
            dropped += cur.rowcount
        return dropped

    def set_status(self, name: str, value: int | str | float | None, *, time: int | None = None
                   ) -> None:
        """Set a device status fact (e.g. ``reader`` = ``lost``); call it when it changes."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidRecord(f"a status name must be a short lowercase name, got {name!r}")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | str | float)
        ):
            raise InvalidRecord(f"status {name!r} must be a number or text")
        if isinstance(value, str) and len(value) > 64:
            raise InvalidRecord(f"status {name!r} may not exceed 64 characters")
        when = _now_ms() if time is None else check_int(time, "time")
        with self._conn.write("set status") as raw:
            raw.execute(
                "INSERT OR REPLACE INTO device_status (name, value, time) VALUES (?, ?, ?)",
                (name, value, when),
            )

    def status(self) -> dict[str, tuple[int | str | float | None, int]]:
        """Every status fact: name -> (value, time it was set, Unix ms)."""
        rows = self._conn.execute(
            "SELECT name, value, time FROM device_status ORDER BY name", what="device status"
        ).fetchall()
        return {name: (value, when) for name, value, when in rows}

    # -- the agent's side -------------------------------------------------------------------

    def pending(self, limit: int = 100, *, after: int = 0) -> list[EventRecord]:
        """Up to ``limit`` events with ``seq > after``, oldest first: what to forward next."""
        check_int(limit, "limit", 1, 100_000)
        check_int(after, "after", 0)
        rows = self._conn.execute(
            "SELECT seq, time, event, severity, detail FROM events WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after, limit),
            "events pending",
        ).fetchall()
        out = []
        for seq, when, event, severity, text in rows:
            try:
                detail = json.loads(text)
            except ValueError:
                detail = {"unreadable": True}
            if not isinstance(detail, dict):
                detail = {"value": detail}
            out.append(EventRecord(seq, when, event, severity, detail))
        return out

    def delete(self, seqs: Iterable[int]) -> int:
        """Forget forwarded events (the broker acknowledged them); returns how many went."""
        keys = [(check_int(s, "event seq", 1),) for s in seqs]
        if not keys:
            return 0
        with self._conn.write("delete events") as raw:
            return max(raw.executemany("DELETE FROM events WHERE seq = ?", keys).rowcount, 0)

    @property
    def count(self) -> int:
        """Events waiting to be forwarded."""
        return int(self._conn.one("SELECT count(*) FROM events", what="events count"))

    @property
    def last_seq(self) -> int:
        """The number of the last event raised (0 before the first)."""
        return int(
            self._conn.one("SELECT value FROM meta WHERE key = 'event_seq'", what="events")
        )
