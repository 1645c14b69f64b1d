"""The transaction uplink: the device journal read as an outbox, cut into signed batches.

The journal is the only truth. The agent keeps in memory just where it is in the current
connection (what it has sent and not yet seen acknowledged); after a crash, a restart or a
reconnection it starts again from the journal's acknowledged mark, so nothing the agent
forgets can lose a record, and anything it repeats is dropped by the center as a duplicate
of ``(device_id, seq)``.

- :class:`BatchReader` (database thread) reads up to ``max_records`` records after a given
  sequence number and signs them as one ``txn`` message of at most ``max_bytes``. A partial
  batch waits until its oldest record is ``max_age_s`` old (by the record's time, or by how
  long the agent has seen it waiting, whichever comes first: a wrong device clock cannot
  hold records back for long).
- :class:`Window` (event loop) tracks the batches in flight: at most ``window`` batches are
  unacknowledged at once; the center's cumulative ack frees them; if the oldest has waited
  ``ack_timeout_s`` the window goes back to the acknowledged mark and everything after it
  is sent again (go-back-N: simple, and the center drops the duplicates).

Records are deleted (``prune_acked``) only after the center's signed, cumulative ack names
them, never on MQTT's PUBACK (which only says the broker has the message).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.stores import KIND_TAP, DeviceDatabase

from . import protocol
from .settings import BatchSettings
from .telemetry import STATE_LAST_TAP

__all__ = ["BatchReader", "InFlight", "OutgoingBatch", "Waiting", "Window", "read_outbox"]

log = logging.getLogger("afc.agent.outbox")

#: How often the newest tap time is written to the agent's durable state (seconds).
_LAST_TAP_PERSIST_S = 10.0


def read_outbox(db: DeviceDatabase, since_seq: int, limit: int) -> dict[str, list[Any]]:
    """Up to ``limit`` journal records after ``since_seq``, oldest first, as columns (one
    list per field, :func:`edge_agent.protocol.encode_batch_columns`'s input).

    Read unverified: records are forwarded as they are and the center checks the batch
    signature. Read as columns straight from the journal because
    building one frozen record per row only to take it apart again was most of the agent's
    CPU in a backlog drain.
    """
    return db.journal.record_columns(since_seq, limit)


@dataclass(frozen=True)
class OutgoingBatch:
    """A signed batch ready to publish."""

    first: int
    last: int
    count: int
    payload: bytes
    oldest_time: int


@dataclass(frozen=True)
class Waiting:
    """Records are waiting but too few and too young for a batch yet."""

    head_seq: int
    count: int
    oldest_time: int


class BatchReader:
    """Reads the outbox and builds signed batches (runs in the database thread)."""

    def __init__(self, device_id: str, key: Ed25519PrivateKey, batch: BatchSettings) -> None:
        self.device_id = device_id
        self._key = key
        self.settings = batch
        self.last_tap: int | None = None
        self._last_tap_saved: int | None = None
        self._last_tap_saved_at = 0.0

    def next_batch(
        self, db: DeviceDatabase, since_seq: int, now_ms: int, force: bool = False
    ) -> OutgoingBatch | Waiting | None:
        """The next batch after ``since_seq``, :class:`Waiting`, or None if nothing is there.

        ``force`` sends a partial batch regardless of age (``--once``, or a batch that the
        event loop has seen waiting for ``max_age_s``).
        """
        s = self.settings
        columns = read_outbox(db, since_seq, s.max_records)
        seqs = columns["seq"]
        if not seqs:
            return None
        count = len(seqs)
        oldest = columns["time"][0]
        if count < s.max_records and not force and now_ms - oldest < s.max_age_s * 1000:
            return Waiting(seqs[0], count, oldest)
        payload = protocol.encode_batch_columns(self.device_id, columns, self._key, ts=now_ms)
        # Too big (long texts, many optional fields): halve until it fits. Bounded: at most
        # log2(max_records) rounds, and one record always goes alone.
        while len(payload) > s.max_bytes and count > 1:
            count //= 2
            columns = {name: column[:count] for name, column in columns.items()}
            payload = protocol.encode_batch_columns(self.device_id, columns, self._key,
                                                    ts=now_ms)
        seqs = columns["seq"]
        self._note_taps(db, columns)
        return OutgoingBatch(seqs[0], seqs[-1], count, payload, oldest)

    def _note_taps(self, db: DeviceDatabase, columns: dict[str, list[Any]]) -> None:
        """Remember the newest tap forwarded, for telemetry's ``last_tap_ts``; written to
        the device database at most every few seconds (it is a report, not a record)."""
        taps = [t for t, kind in zip(columns["time"], columns["kind"], strict=True)
                if kind == KIND_TAP]
        if not taps:
            return
        newest = max(taps)
        if self.last_tap is None or newest > self.last_tap:
            self.last_tap = newest
        now = time.monotonic()
        if self.last_tap != self._last_tap_saved and now - self._last_tap_saved_at >= (
            _LAST_TAP_PERSIST_S
        ):
            db.config.set_state(STATE_LAST_TAP, self.last_tap)
            self._last_tap_saved = self.last_tap
            self._last_tap_saved_at = now

    def flush_last_tap(self, db: DeviceDatabase) -> None:
        """Write the newest tap time now (at shutdown)."""
        if self.last_tap is not None and self.last_tap != self._last_tap_saved:
            db.config.set_state(STATE_LAST_TAP, self.last_tap)
            self._last_tap_saved = self.last_tap


@dataclass
class InFlight:
    """A batch published and not yet acknowledged."""

    first: int
    last: int
    sent_at: float


class Window:
    """Where the uplink stands in this connection: acked mark, send cursor, batches in flight.

    Pure bookkeeping (no I/O), driven by the agent's event loop.
    """

    def __init__(self, batch: BatchSettings, acked: int = 0) -> None:
        self.settings = batch
        self.acked = acked
        self.sent_upto = acked
        self.inflight: deque[InFlight] = deque()
        self.retransmissions = 0
        self._waiting: tuple[int, float] | None = None  # (since_seq, first seen, monotonic)

    def reset(self, acked: int) -> None:
        """A new connection: resend everything after the acknowledged mark."""
        self.acked = max(self.acked, acked)
        self.sent_upto = self.acked
        self.inflight.clear()
        self._waiting = None

    def can_send(self) -> bool:
        return len(self.inflight) < self.settings.window

    def sent(self, first: int, last: int, now: float) -> None:
        self.inflight.append(InFlight(first, last, now))
        self.sent_upto = last
        self._waiting = None

    def acknowledged(self, upto: int) -> None:
        """The center stored everything up to ``upto`` (already checked against the journal)."""
        if upto <= self.acked:
            return
        self.acked = upto
        while self.inflight and self.inflight[0].last <= upto:
            self.inflight.popleft()
        if self.sent_upto < upto:  # acked beyond what this connection sent (an older send)
            self.sent_upto = upto
            self.inflight.clear()

    def timed_out(self, now: float) -> bool:
        """Whether the oldest batch in flight has waited ``ack_timeout_s``."""
        return bool(self.inflight) and now - self.inflight[0].sent_at >= self.settings.ack_timeout_s

    def go_back(self) -> int:
        """Go-back-N after a timeout: resend from the acked mark; returns the batches dropped."""
        dropped = len(self.inflight)
        self.inflight.clear()
        self.sent_upto = self.acked
        self.retransmissions += 1
        self._waiting = None
        return dropped

    def next_deadline(self, now: float) -> float | None:
        """Seconds until the oldest batch in flight times out, or None."""
        if not self.inflight:
            return None
        return max(0.0, self.inflight[0].sent_at + self.settings.ack_timeout_s - now)

    def waited_enough(self, now: float) -> bool:
        """Whether the partial batch after ``sent_upto`` has been seen waiting ``max_age_s``."""
        if self._waiting is None or self._waiting[0] != self.sent_upto:
            return False
        return now - self._waiting[1] >= self.settings.max_age_s

    def note_waiting(self, now: float) -> float:
        """Record that a partial batch waits after ``sent_upto``; returns seconds left."""
        if self._waiting is None or self._waiting[0] != self.sent_upto:
            self._waiting = (self.sent_upto, now)
        return max(0.0, self._waiting[1] + self.settings.max_age_s - now)
