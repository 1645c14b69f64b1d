"""The agent's offline buffer for JSON uplink messages: an SQLite file with a disk budget.

Telemetry produced while the broker is unreachable waits here and is sent, oldest first,
when the link comes back. The file lives next to the device database and belongs to the
agent alone. Its size is bounded by ``budget_bytes`` (payload + topic + a fixed per-row
overhead); the drop policy, documented in docs/agent.md, is:

1. when a new message does not fit, the **oldest telemetry** is dropped until it does;
2. **events are never dropped** here: an event is accepted even over the budget (events are
   bounded upstream, by the device database's event log, which keeps alarms);
3. a telemetry message that does not fit once every older telemetry message is gone (the
   budget is full of events) is itself dropped.

Dropped telemetry is counted (:attr:`UplinkQueue.dropped`, persisted) and the count travels
in the next telemetry report, so the center knows a gap is a drop and not a fault.

Transactions never pass through here: they stay in the device journal until the center
acknowledges them. Commits are not fsynced (``synchronous=NORMAL``): a power cut may lose
the last few telemetry samples, which the policy allows; the file stays consistent. A file
that is not a database any more is set aside and a new one started, with a warning: losing
buffered telemetry is better than an agent that cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from .errors import AgentError

__all__ = ["CLASS_EVENT", "CLASS_TELEMETRY", "QueuedMessage", "UplinkQueue", "UplinkQueueError"]

log = logging.getLogger("afc.agent.queue")

CLASS_TELEMETRY = "telemetry"
CLASS_EVENT = "event"
_CLASSES = (CLASS_TELEMETRY, CLASS_EVENT)
#: Bytes charged per row on top of payload and topic (row header, index entry).
ROW_OVERHEAD = 48

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cls TEXT NOT NULL CHECK (cls IN ('telemetry', 'event')),
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_cls ON queue (cls, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
"""


class UplinkQueueError(AgentError):
    """The offline buffer cannot be used (disk full, permissions): telemetry is not kept."""


class QueuedMessage(NamedTuple):
    """A buffered message: its queue id, class, topic, payload, QoS and creation time (ms)."""

    id: int
    cls: str
    topic: str
    payload: bytes
    qos: int
    created: int


def _size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic.encode()) + ROW_OVERHEAD


class UplinkQueue:
    """A bounded FIFO of uplink messages on disk; one owner process. Use :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, budget_bytes: int) -> None:
        self._conn = conn
        self.path = path
        self.budget_bytes = budget_bytes
        self._used = self._scan_used()

    @classmethod
    def open(cls, path: str | os.PathLike[str], budget_bytes: int) -> UplinkQueue:
        """Open (creating if needed) the buffer at ``path`` with a budget of ``budget_bytes``."""
        if budget_bytes < 1024:
            raise UplinkQueueError(f"uplink buffer budget {budget_bytes} bytes is too small")
        path = Path(path)
        try:
            return cls(cls._connect(path), path, budget_bytes)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise UplinkQueueError(f"uplink buffer {path} is in use: {exc}") from None
            aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
            log.warning("uplink buffer %s is unreadable (%s): moved to %s, starting empty",
                        path, exc, aside)
            try:
                os.replace(path, aside)
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                return cls(cls._connect(path), path, budget_bytes)
            except (OSError, sqlite3.Error) as exc2:
                raise UplinkQueueError(f"cannot recreate uplink buffer {path}: {exc2}") from None
        except OSError as exc:
            raise UplinkQueueError(f"cannot open uplink buffer {path}: {exc}") from None

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=2.0, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _scan_used(self) -> int:
        row = self._conn.execute(
            "SELECT coalesce(sum(length(payload) + length(CAST(topic AS BLOB))), 0), count(*) "
            "FROM queue"
        ).fetchone()
        return int(row[0]) + ROW_OVERHEAD * int(row[1])

    # -- writing --------------------------------------------------------------------------------

    def put(
        self, cls: str, topic: str, payload: bytes, qos: int = 1, *, created: int | None = None
    ) -> int | None:
        """Buffer a message; returns its id, or None if it was dropped by the policy."""
        if cls not in _CLASSES:
            raise UplinkQueueError(f"unknown uplink message class {cls!r}")
        size = _size(topic, payload)
        when = int(time.time() * 1000) if created is None else created
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                dropped = 0
                while self._used + size > self.budget_bytes:
                    row = self._conn.execute(
                        "SELECT id, length(payload) + length(CAST(topic AS BLOB)) FROM queue "
                        "WHERE cls = 'telemetry' ORDER BY id LIMIT 1"
                    ).fetchone()
                    if row is None:
                        break
                    self._conn.execute("DELETE FROM queue WHERE id = ?", (row[0],))
                    self._used -= int(row[1]) + ROW_OVERHEAD
                    dropped += 1
                fits = self._used + size <= self.budget_bytes
                new_id: int | None = None
                if fits or cls == CLASS_EVENT:
                    cur = self._conn.execute(
                        "INSERT INTO queue (cls, topic, payload, qos, created) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (cls, topic, bytes(payload), qos, when),
                    )
                    new_id = cur.lastrowid
                    self._used += size
                else:
                    dropped += 1
                if dropped:
                    self._conn.execute(
                        "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (dropped,)
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._used = self._scan_used()
                raise
        except sqlite3.Error as exc:
            raise UplinkQueueError(f"uplink buffer write failed: {exc}") from None
        if dropped:
            log.warning(
                "uplink buffer full (%d bytes): %d telemetry message(s) dropped",
                self.budget_bytes,
                dropped,
            )
        if new_id is not None and not fits:
            log.warning("uplink buffer over budget with events only (%d bytes)", self._used)
        return new_id

    # -- reading and forgetting -----------------------------------------------------------------

    def peek(self, limit: int = 50) -> list[QueuedMessage]:
        """Up to ``limit`` messages, oldest first (events and telemetry in arrival order)."""
        try:
            rows = self._conn.execute(
                "SELECT id, cls, topic, payload, qos, created FROM queue ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise UplinkQueueError(f"uplink buffer read failed: {exc}") from None
        return [QueuedMessage(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def delete(self, ids: Iterable[int]) -> int:
        """Forget messages the broker acknowledged; returns how many went."""
        keys = [(int(i),) for i in ids]
        if not keys:
            return 0
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                n = self._conn.executemany("DELETE FROM queue WHERE id = ?", keys).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise UplinkQueueError(f"uplink buffer delete failed: {exc}") from None
        finally:
            self._used = self._scan_used()
        return max(n, 0)

    def take_dropped(self) -> int:
        """The count of telemetry dropped since the last call (reset to 0)."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            value = self._conn.execute(
                "SELECT value FROM counters WHERE name = 'dropped'"
            ).fetchone()[0]
            self._conn.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise UplinkQueueError(f"uplink buffer counter failed: {exc}") from None
        return int(value)

    # -- state ------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Telemetry messages dropped by the budget and not yet reported."""
        return int(
            self._conn.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0]
        )

    @property
    def bytes_used(self) -> int:
        """Bytes charged against the budget right now."""
        return self._used

    def count(self, cls: str | None = None) -> int:
        """Messages buffered (of one class, or all)."""
        if cls is None:
            return int(self._conn.execute("SELECT count(*) FROM queue").fetchone()[0])
        return int(
            self._conn.execute("SELECT count(*) FROM queue WHERE cls = ?", (cls,)).fetchone()[0]
        )

    def close(self) -> None:
        """Close the file (idempotent)."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def __enter__(self) -> UplinkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
