"""The center's durable state behind one interface: registry, records, status, bundles, nonces.

:class:`CenterStore` is the interface the ingest workers, the publisher, the command sender
and the report use; :class:`SqliteCenterStore` is the embedded default. A country-size fleet
puts the same interface in front of PostgreSQL (DESIGN.md, "Scale"); nothing above the store
knows which one it talks to.

Exactly-once storage across N ingest processes comes from the database, not from the broker:
records are keyed ``(device_id, seq)``, a batch is inserted with ``INSERT OR IGNORE`` in one
``BEGIN IMMEDIATE`` transaction, and the device's contiguous high-water mark (``upto``, what
the ack says) is advanced in that same transaction. Two workers storing overlapping batches of
one device serialize on the write lock; whichever comes second sees the rows as duplicates.
SQLite runs in WAL mode with ``synchronous=FULL``: a stored batch survives a power cut, which
is what an ack promises the device before it deletes its copy.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.protocol import Batch, Command, Reply
from firmware.stores.journal import JournalRecord

from .errors import CenterStoreError

__all__ = [
    "AllowanceInfo",
    "BundleInfo",
    "CenterStore",
    "DeviceInfo",
    "DeviceState",
    "SqliteCenterStore",
    "StoredResult",
    "now_ms",
]

_U63 = 1 << 63
_U64 = 1 << 64
DEVICE_KINDS = ("validator", "topup", "camera-site", "gateway")


def now_ms() -> int:
    """Wall-clock Unix milliseconds (the protocol's ``ts``)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class StoredResult:
    """What :meth:`CenterStore.store_batch` did: rows added, rows already there, and the
    device's contiguous high-water mark after it (every seq <= upto is stored)."""

    new: int
    duplicates: int
    upto: int


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    kind: str
    public_key_hex: str | None
    registered_ms: int
    upto: int


@dataclass(frozen=True)
class DeviceState:
    """The last known status, telemetry and event of a device or camera site."""

    device_id: str
    kind: str | None
    state: str | None
    sw: str | None
    status_ts: int | None
    telemetry: dict[str, Any] | None
    telemetry_ts: int | None
    last_seen_ms: int | None
    last_event: dict[str, Any] | None


@dataclass(frozen=True)
class BundleInfo:
    kind: str
    target: str | None
    version: int
    base: int | None
    ts: int
    full: bool
    payload: bytes
    published_ms: int | None


@dataclass(frozen=True)
class AllowanceInfo:
    """A dealer credit allowance the center issued (``docs/protocol.md``, bundle ``credit``).

    ``valid_from``/``valid_until`` are Unix seconds as in the allowance itself; ``daily_limit``
    (kuruş, optional) is the center's record of the dealer's per-day limit, which the
    allowance format does not carry (the terminal has it in its own configuration).
    ``bundle_version`` and ``target`` say which ``credit`` bundle carried it (None for one
    registered from an allowance file); ``source`` is ``publisher`` or ``file``.
    """

    allowance_id: str
    dealer_id: str
    amount: int
    valid_from: int
    valid_until: int
    signature_hex: str
    daily_limit: int | None = None
    bundle_version: int | None = None
    target: str | None = None
    source: str = "publisher"
    issued_ms: int = 0


class CenterStore(ABC):
    """What the center keeps. Every method is safe to call from several processes at once
    on the same store; each call is one transaction."""

    _key_cache: dict[str, Ed25519PublicKey | None]

    # -- identity ----------
    @abstractmethod
    def center_id(self) -> str:
        """A random id made once per center database and kept in it: the monitor's fixed
        MQTT client id is built from it, so the same center gets its persistent session
        back after a restart while two centers (two databases) never share one."""

    # -- registry ----------
    @abstractmethod
    def register_device(self, device_id: str, kind: str, public_key_hex: str | None) -> None:
        """Add a device or replace its kind and key (key rotation)."""

    @abstractmethod
    def device(self, device_id: str) -> DeviceInfo | None: ...

    @abstractmethod
    def devices(self) -> list[DeviceInfo]: ...

    def public_key(self, device_id: str) -> Ed25519PublicKey | None:
        """The device's registered Ed25519 key, or None (unknown device, or a camera site)."""
        cache = self.__dict__.setdefault("_key_cache", {})
        if device_id not in cache:
            info = self.device(device_id)
            key = None
            if info is not None and info.public_key_hex:
                key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(info.public_key_hex))
            if key is None:
                return None  # not cached: it may be registered later
            cache[device_id] = key
        return cache[device_id]

    def forget_key_cache(self) -> None:
        self.__dict__["_key_cache"] = {}

    # -- transactions ----------
    def store_batch(
        self, batch: Batch, *, received_ms: int | None = None, worker: str | None = None
    ) -> StoredResult:
        """Store a verified batch exactly once; atomic. ``worker`` names the ingest worker
        (kept with each new record, for load and incident analysis)."""
        return self.store_batches([batch], received_ms=received_ms, worker=worker)[0]

    @abstractmethod
    def store_batches(
        self, batches: list[Batch], *, received_ms: int | None = None, worker: str | None = None
    ) -> list[StoredResult]:
        """Store several verified batches in one transaction (one fsync: group commit);
        each result's ``upto`` is its device's mark after all of them."""

    @abstractmethod
    def upto(self, device_id: str) -> int: ...

    @abstractmethod
    def note_bad_batch(self, device_id: str, first: int, last: int, reason: str) -> None:
        """Remember a refused batch of a known device, to report in its next ack."""

    @abstractmethod
    def take_bad_ranges(self, device_id: str) -> list[tuple[int, int]]:
        """The refused ranges not yet reported to the device; marks them reported."""

    @abstractmethod
    def records(self, device_id: str | None = None) -> Iterator[JournalRecord]:
        """Stored records, by device then seq."""

    @abstractmethod
    def records_by_card(self) -> Iterator[JournalRecord]:
        """Stored records that name a card, by card number then time."""

    @abstractmethod
    def record_count(self, device_id: str | None = None) -> int: ...

    @abstractmethod
    def seqs(self, device_id: str) -> list[int]: ...

    # -- status, telemetry, events ----------
    @abstractmethod
    def record_json(self, leaf: str, msg: Mapping[str, Any], *, signed: bool) -> bool:
        """Store a status/telemetry/event message; False when it changed nothing: a duplicate
        event (same seq, or for an event without seq the same time, name and detail) or a
        telemetry report not newer than the one kept. Replays are harmless."""

    @abstractmethod
    def device_states(self) -> list[DeviceState]: ...

    @abstractmethod
    def events(self, device_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Events, newest first."""

    # -- bundles ----------
    @abstractmethod
    def add_bundle(self, info: BundleInfo) -> None: ...

    @abstractmethod
    def mark_published(self, kind: str, target: str | None, version: int, when_ms: int) -> None:
        ...

    @abstractmethod
    def bundles(self, kind: str, target: str | None = None) -> list[BundleInfo]:
        """Version history of ``kind`` for ``target`` (None: the fleet), oldest first."""

    # -- dealer credit ----------
    @abstractmethod
    def add_allowance(self, info: AllowanceInfo) -> bool:
        """Record an issued allowance; False if the same allowance was recorded before.
        The same id with other contents is refused (:class:`CenterStoreError`): an allowance
        id names one grant, whatever bundle carries it."""

    @abstractmethod
    def allowances(self, dealer_id: str | None = None) -> list[AllowanceInfo]:
        """Issued allowances (of one dealer, or all), in the order they were issued."""

    # -- commands ----------
    @abstractmethod
    def next_nonce(self, device_id: str, now: int) -> int:
        """A command nonce greater than any issued to the device before (and than ``now``,
        so a re-created center database still issues nonces the device accepts)."""

    @abstractmethod
    def add_command(self, cmd: Command) -> None: ...

    @abstractmethod
    def record_reply(self, reply: Reply) -> None: ...

    @abstractmethod
    def reply(self, device_id: str, cmd_id: str) -> Reply | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> CenterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_sql_u64(value: int | None) -> int | None:
    return None if value is None else (value - _U64 if value >= _U63 else value)


def _from_sql_u64(value: int | None) -> int | None:
    return None if value is None else (value + _U64 if value < 0 else value)


_RECORD_COLUMNS = (
    "seq", "phase", "kind", "link", "time", "card_number", "uid", "counter_before",
    "counter_after", "balance_before", "balance_after", "fare", "product", "line", "vehicle",
    "validator_id", "outcome", "reason", "action_id",
)
_INSERT_RECORD = (
    f"INSERT OR IGNORE INTO records (device_id, {', '.join(_RECORD_COLUMNS)}, batch_ts, "
    f"received_ms, worker) VALUES ({', '.join('?' * (len(_RECORD_COLUMNS) + 4))})"
)
_CARD_INDEX = _RECORD_COLUMNS.index("card_number")
_SELECT_RECORD = f"SELECT device_id, {', '.join(_RECORD_COLUMNS)} FROM records"


def _bind_none_and_bytes_directly() -> None:
    """Let :mod:`sqlite3` bind None and bytes without its adaptation protocol.

    sqlite3 binds int, float and str directly but sends every None and bytes parameter
    through ``microprotocols_adapt``, which (finding no adapter) raises and clears an
    AttributeError for each one: with eight NULLs and a UID in a typical record row, that
    is a quarter of the CPU of storing a batch. An identity adapter for exactly these two
    types (``{}.get`` returns None for None, ``bytes`` returns the same bytes object)
    short-cuts it; what is bound is unchanged (NULL, BLOB). Process-wide, like every
    sqlite3 adapter, and only registered where no other adapter is set for the type.
    """
    for kind, identity in ((type(None), {}.get), (bytes, bytes)):
        if (kind, sqlite3.PrepareProtocol) not in sqlite3.adapters:
            sqlite3.register_adapter(kind, identity)


def _batch_rows(batch: Batch, received: int, worker: str | None) -> Iterator[tuple[Any, ...]]:
    """The rows of ``_INSERT_RECORD`` for a batch, zipped from its columns: a decoded batch
    never builds a record object (at 100,000 records that would cost more than storing)."""
    columns = [batch.column(name) for name in _RECORD_COLUMNS]
    cards = columns[_CARD_INDEX]
    if max(filter(None, cards), default=0) >= _U63:  # u64 above i64: stored as two's complement
        columns[_CARD_INDEX] = [_to_sql_u64(c) for c in cards]
    n = batch.count
    return zip(repeat(batch.device_id, n), *columns, repeat(batch.ts, n), repeat(received, n),
               repeat(worker, n), strict=True)


def _row_record(row: tuple[Any, ...]) -> JournalRecord:
    values = dict(zip(("device_id", *_RECORD_COLUMNS), row, strict=True))
    values["card_number"] = _from_sql_u64(values["card_number"])
    return JournalRecord(**values)


class SqliteCenterStore(CenterStore):
    """The embedded store: one SQLite file shared by every center process.

    ``busy_timeout_s`` bounds how long a call waits for another process's write lock before
    failing with :class:`CenterStoreError` (the ingest worker then leaves the batch unacked,
    and the device retransmits it).
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        _bind_none_and_bytes_directly()
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
            )
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise CenterStoreError(f"{self.path}: cannot switch the database to WAL mode")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise CenterStoreError(f"cannot open center database {self.path}: {exc}") from None
        self._lock = threading.RLock()
        with self._write("schema"):
            self._create_schema()

    # -- plumbing ----------

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the lock up front (no upgrade deadlock in WAL)."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise CenterStoreError(
                    f"center database busy or unusable ({what}): {exc}"
                ) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error | OverflowError):  # (an int beyond 64 bits)
                    raise CenterStoreError(f"center database error ({what}): {exc}") from None
                raise

    def _read(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise CenterStoreError(f"center database read failed: {exc}") from None

    def _create_schema(self) -> None:
        db = sqlite_utils.Database(self._conn)
        db["devices"].create(
            {"device_id": str, "kind": str, "public_key": str, "registered_ms": int, "upto": int},
            pk="device_id", not_null=["kind", "registered_ms", "upto"], if_not_exists=True,
        )
        db["records"].create(
            {
                "device_id": str, "seq": int, "phase": str, "kind": str, "link": int,
                "time": int, "card_number": int, "uid": bytes, "counter_before": int,
                "counter_after": int, "balance_before": int, "balance_after": int, "fare": int,
                "product": int, "line": str, "vehicle": str, "validator_id": str,
                "outcome": str, "reason": int, "action_id": str, "batch_ts": int,
                "received_ms": int, "worker": str,
            },
            pk=("device_id", "seq"), not_null=["phase", "kind", "time"], if_not_exists=True,
        )
        # No index on card_number: it would cost ingest ~40 % per record; the report, which
        # reads records by card, sorts once instead (ingest is the hot path, not the report).
        db["bad_batches"].create(
            {"id": int, "device_id": str, "first": int, "last": int, "reason": str,
             "received_ms": int, "reported": int},
            pk="id", if_not_exists=True,
        )
        db["device_state"].create(
            {"device_id": str, "kind": str, "state": str, "sw": str, "status_ts": int,
             "status_json": str, "telemetry_ts": int, "telemetry_json": str,
             "last_seen_ms": int, "last_event_json": str},
            pk="device_id", if_not_exists=True,
        )
        db["events"].create(
            {"id": int, "device_id": str, "seq": int, "ts": int, "event": str,
             "severity": str, "detail_json": str, "signed": int, "received_ms": int},
            pk="id", if_not_exists=True,
        )
        db["events"].create_index(["device_id", "seq"], unique=True, if_not_exists=True)
        db["bundles"].create(
            {"kind": str, "target": str, "version": int, "base": int, "ts": int, "full": int,
             "payload": bytes, "published_ms": int},
            pk=("kind", "target", "version"), if_not_exists=True,
        )
        db["nonces"].create({"device_id": str, "last_nonce": int}, pk="device_id",
                            if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        conn = self._conn
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('center_id', ?)",
                     (secrets.token_hex(6),))
        db["allowances"].create(
            {"allowance_id": str, "dealer_id": str, "amount": int, "valid_from": int,
             "valid_until": int, "signature": str, "daily_limit": int, "bundle_version": int,
             "target": str, "source": str, "issued_ms": int},
            pk="allowance_id",
            not_null=["dealer_id", "amount", "valid_from", "valid_until", "signature"],
            if_not_exists=True,
        )
        db["commands"].create(
            {"device_id": str, "cmd_id": str, "name": str, "args_json": str, "nonce": int,
             "ts": int, "expires": int},
            pk=("device_id", "cmd_id"), if_not_exists=True,
        )
        db["replies"].create(
            {"device_id": str, "cmd_id": str, "ok": int, "result_json": str, "error": str,
             "ts": int, "received_ms": int},
            pk=("device_id", "cmd_id"), if_not_exists=True,
        )

    # -- identity ----------

    def center_id(self) -> str:
        return str(self._read("SELECT value FROM meta WHERE key = 'center_id'")[0][0])

    # -- registry ----------

    def register_device(self, device_id: str, kind: str, public_key_hex: str | None) -> None:
        if public_key_hex is not None:
            try:
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
            except ValueError:
                raise CenterStoreError(
                    f"device {device_id}: public key must be 64 hex digits (32 bytes)"
                ) from None
            public_key_hex = public_key_hex.lower()
        with self._write("register") as conn:
            conn.execute(
                "INSERT INTO devices (device_id, kind, public_key, registered_ms, upto) "
                "VALUES (?, ?, ?, ?, 0) ON CONFLICT (device_id) DO UPDATE SET "
                "kind = excluded.kind, public_key = excluded.public_key",
                (device_id, kind, public_key_hex, now_ms()),
            )
        self.forget_key_cache()

    def device(self, device_id: str) -> DeviceInfo | None:
        rows = self._read(
            "SELECT device_id, kind, public_key, registered_ms, upto FROM devices "
            "WHERE device_id = ?", (device_id,),
        )
        return DeviceInfo(*rows[0]) if rows else None

    def devices(self) -> list[DeviceInfo]:
        rows = self._read(
            "SELECT device_id, kind, public_key, registered_ms, upto FROM devices "
            "ORDER BY device_id"
        )
        return [DeviceInfo(*row) for row in rows]

    # -- transactions ----------

    def store_batches(
        self, batches: list[Batch], *, received_ms: int | None = None, worker: str | None = None
    ) -> list[StoredResult]:
        received = now_ms() if received_ms is None else received_ms
        counts: list[tuple[str, int, int]] = []
        marks: dict[str, int] = {}
        with self._write("store batch") as conn:
            for batch in batches:
                dev = batch.device_id
                if dev not in marks:
                    row = conn.execute("SELECT upto FROM devices WHERE device_id = ?",
                                       (dev,)).fetchone()
                    if row is None:
                        raise CenterStoreError(f"device {dev} is not registered")
                    marks[dev] = row[0]
                before = conn.total_changes
                conn.executemany(_INSERT_RECORD, _batch_rows(batch, received, worker))
                new = conn.total_changes - before
                counts.append((dev, new, batch.count - new))
            for dev, old in list(marks.items()):
                # advance the contiguous high-water mark over whatever is stored now
                upto = old
                cursor = conn.execute(
                    "SELECT seq FROM records WHERE device_id = ? AND seq > ? ORDER BY seq",
                    (dev, upto),
                )
                for (seq,) in cursor:
                    if seq != upto + 1:
                        break
                    upto = seq
                cursor.close()
                if upto != old:
                    conn.execute("UPDATE devices SET upto = ? WHERE device_id = ?", (upto, dev))
                marks[dev] = upto
        return [StoredResult(new, dup, marks[dev]) for dev, new, dup in counts]

    def upto(self, device_id: str) -> int:
        rows = self._read("SELECT upto FROM devices WHERE device_id = ?", (device_id,))
        return int(rows[0][0]) if rows else 0

    def note_bad_batch(self, device_id: str, first: int, last: int, reason: str) -> None:
        with self._write("note bad batch") as conn:
            conn.execute(
                "INSERT INTO bad_batches (device_id, first, last, reason, received_ms, reported) "
                "VALUES (?, ?, ?, ?, ?, 0)", (device_id, first, last, reason[:200], now_ms()),
            )

    def take_bad_ranges(self, device_id: str) -> list[tuple[int, int]]:
        if not self._read("SELECT 1 FROM bad_batches WHERE device_id = ? AND reported = 0 "
                          "LIMIT 1", (device_id,)):
            return []  # the common case, without a write transaction (and its fsync)
        with self._write("bad ranges") as conn:
            rows = conn.execute(
                "SELECT id, first, last FROM bad_batches WHERE device_id = ? AND reported = 0 "
                "ORDER BY id LIMIT 100", (device_id,),
            ).fetchall()
            conn.executemany("UPDATE bad_batches SET reported = 1 WHERE id = ?",
                             [(r[0],) for r in rows])
        return [(r[1], r[2]) for r in rows]

    def bad_batches(self, device_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT device_id, first, last, reason, received_ms FROM bad_batches"
        params: tuple[Any, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            params = (device_id,)
        keys = ("device_id", "first", "last", "reason", "received_ms")
        return [dict(zip(keys, row, strict=True)) for row in self._read(sql + " ORDER BY id",
                                                                          params)]

    def records(self, device_id: str | None = None) -> Iterator[JournalRecord]:
        if device_id is None:
            rows = self._read(f"{_SELECT_RECORD} ORDER BY device_id, seq")
        else:
            rows = self._read(f"{_SELECT_RECORD} WHERE device_id = ? ORDER BY seq", (device_id,))
        return (_row_record(row) for row in rows)

    def records_by_card(self) -> Iterator[JournalRecord]:
        rows = self._read(
            f"{_SELECT_RECORD} WHERE card_number IS NOT NULL "
            "ORDER BY card_number, time, device_id, seq"
        )
        return (_row_record(row) for row in rows)

    def record_count(self, device_id: str | None = None) -> int:
        if device_id is None:
            return int(self._read("SELECT count(*) FROM records")[0][0])
        return int(self._read("SELECT count(*) FROM records WHERE device_id = ?",
                              (device_id,))[0][0])

    def seqs(self, device_id: str) -> list[int]:
        return [r[0] for r in self._read(
            "SELECT seq FROM records WHERE device_id = ? ORDER BY seq", (device_id,))]

    def records_per_worker(self) -> dict[str, int]:
        """How many records each ingest worker stored (new ones only)."""
        return {str(w): n for w, n in self._read(
            "SELECT worker, count(*) FROM records GROUP BY worker")}

    def topup_device_ids(self) -> list[str]:
        """Devices that journaled top-ups (dealer terminals, and anything posing as one)."""
        return [r[0] for r in self._read(
            "SELECT DISTINCT device_id FROM records WHERE kind = 'topup' ORDER BY 1")]

    def record_device_ids(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT device_id FROM records ORDER BY 1")]

    # -- status, telemetry, events ----------

    def record_json(self, leaf: str, msg: Mapping[str, Any], *, signed: bool) -> bool:
        dev = msg["dev"]
        received = now_ms()
        text = json.dumps(dict(msg), separators=(",", ":"), ensure_ascii=False)
        kind = msg.get("kind") if isinstance(msg.get("kind"), str) else None
        with self._write(f"record {leaf}") as conn:
            conn.execute(
                "INSERT INTO device_state (device_id, kind, last_seen_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, "
                "kind = coalesce(excluded.kind, device_state.kind)",
                (dev, kind, received),
            )
            if leaf == "status":
                state = msg.get("state") if isinstance(msg.get("state"), str) else None
                sw = msg.get("sw") if isinstance(msg.get("sw"), str) else None
                conn.execute(
                    "UPDATE device_state SET state = ?, sw = coalesce(?, sw), status_ts = ?, "
                    "status_json = ? WHERE device_id = ?",
                    (state, sw, msg["ts"], text, dev),
                )
            elif leaf == "telemetry":
                # newest wins: a replayed or late (older) report changes nothing
                cur = conn.execute(
                    "UPDATE device_state SET telemetry_ts = ?, telemetry_json = ? "
                    "WHERE device_id = ? AND coalesce(telemetry_ts, -1) < ?",
                    (msg["ts"], text, dev, msg["ts"]),
                )
                if cur.rowcount == 0:
                    return False
            elif leaf == "event":
                seq = msg.get("seq") if type(msg.get("seq")) is int else None
                detail = msg.get("detail")
                detail_json = json.dumps(detail if isinstance(detail, dict) else {},
                                         ensure_ascii=False)
                event_name = str(msg.get("event"))[:64]
                if seq is None and conn.execute(
                    "SELECT 1 FROM events WHERE device_id = ? AND seq IS NULL AND ts = ? "
                    "AND event = ? AND detail_json = ? LIMIT 1",
                    (dev, msg["ts"], event_name, detail_json),
                ).fetchone():
                    return False  # an event without seq delivered again (a replayed session)
                cur = conn.execute(
                    "INSERT OR IGNORE INTO events (device_id, seq, ts, event, severity, "
                    "detail_json, signed, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (dev, seq, msg["ts"], event_name, str(msg.get("severity", "info"))[:16],
                     detail_json, int(signed), received),
                )
                if cur.rowcount == 0:
                    return False
                conn.execute("UPDATE device_state SET last_event_json = ? WHERE device_id = ?",
                             (text, dev))
        return True

    def device_states(self) -> list[DeviceState]:
        rows = self._read(
            "SELECT s.device_id, coalesce(s.kind, d.kind), s.state, s.sw, s.status_ts, "
            "s.telemetry_json, s.telemetry_ts, s.last_seen_ms, s.last_event_json "
            "FROM device_state s LEFT JOIN devices d USING (device_id) "
            "UNION ALL SELECT d.device_id, d.kind, NULL, NULL, NULL, NULL, NULL, NULL, NULL "
            "FROM devices d WHERE d.device_id NOT IN (SELECT device_id FROM device_state) "
            "ORDER BY 1"
        )
        return [
            DeviceState(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None, r[6],
                        r[7], json.loads(r[8]) if r[8] else None)
            for r in rows
        ]

    def events(self, device_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql = ("SELECT device_id, seq, ts, event, severity, detail_json, signed, received_ms "
               "FROM events")
        params: tuple[Any, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            params = (device_id,)
        rows = self._read(sql + " ORDER BY ts DESC, id DESC LIMIT ?", (*params, limit))
        keys = ("device_id", "seq", "ts", "event", "severity", "detail", "signed", "received_ms")
        out = []
        for row in rows:
            item = dict(zip(keys, row, strict=True))
            item["detail"] = json.loads(item["detail"])
            item["signed"] = bool(item["signed"])
            out.append(item)
        return out

    # -- bundles ----------

    def add_bundle(self, info: BundleInfo) -> None:
        with self._write("add bundle") as conn:
            conn.execute(
                "INSERT INTO bundles (kind, target, version, base, ts, full, payload, "
                "published_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "base = excluded.base, ts = excluded.ts, full = excluded.full, "
                "payload = excluded.payload, published_ms = excluded.published_ms",
                (info.kind, info.target or "", info.version, info.base, info.ts, int(info.full),
                 info.payload, info.published_ms),
            )

    def mark_published(self, kind: str, target: str | None, version: int, when_ms: int) -> None:
        with self._write("mark published") as conn:
            conn.execute(
                "UPDATE bundles SET published_ms = ? WHERE kind = ? AND target = ? "
                "AND version = ?", (when_ms, kind, target or "", version),
            )

    def bundles(self, kind: str, target: str | None = None) -> list[BundleInfo]:
        rows = self._read(
            "SELECT kind, target, version, base, ts, full, payload, published_ms FROM bundles "
            "WHERE kind = ? AND target = ? ORDER BY version", (kind, target or ""),
        )
        return [BundleInfo(r[0], r[1] or None, r[2], r[3], r[4], bool(r[5]), r[6], r[7])
                for r in rows]

    # -- dealer credit ----------

    _ALLOWANCE_COLUMNS = ("allowance_id", "dealer_id", "amount", "valid_from", "valid_until",
                          "signature", "daily_limit", "bundle_version", "target", "source",
                          "issued_ms")

    def add_allowance(self, info: AllowanceInfo) -> bool:
        grant = (info.dealer_id, info.amount, info.valid_from, info.valid_until,
                 info.signature_hex.lower())
        with self._write("add allowance") as conn:
            row = conn.execute(
                "SELECT dealer_id, amount, valid_from, valid_until, signature, daily_limit "
                "FROM allowances WHERE allowance_id = ?", (info.allowance_id,),
            ).fetchone()
            if row is not None:
                if tuple(row[:5]) != grant:
                    raise CenterStoreError(
                        f"allowance {info.allowance_id} was already issued to dealer {row[0]} "
                        f"for {row[1]} kuruş, {row[2]}..{row[3]}: give a new grant a new "
                        "allowance id"
                    )
                if info.daily_limit is not None and info.daily_limit != row[5]:
                    conn.execute("UPDATE allowances SET daily_limit = ? WHERE allowance_id = ?",
                                 (info.daily_limit, info.allowance_id))
                return False
            conn.execute(
                f"INSERT INTO allowances ({', '.join(self._ALLOWANCE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(self._ALLOWANCE_COLUMNS))})",
                (info.allowance_id, *grant, info.daily_limit, info.bundle_version,
                 info.target, info.source, info.issued_ms or now_ms()),
            )
        return True

    def allowances(self, dealer_id: str | None = None) -> list[AllowanceInfo]:
        sql = f"SELECT {', '.join(self._ALLOWANCE_COLUMNS)} FROM allowances"
        params: tuple[Any, ...] = ()
        if dealer_id is not None:
            sql += " WHERE dealer_id = ?"
            params = (dealer_id,)
        rows = self._read(sql + " ORDER BY issued_ms, rowid", params)
        return [AllowanceInfo(*row) for row in rows]

    # -- commands ----------

    def next_nonce(self, device_id: str, now: int) -> int:
        with self._write("next nonce") as conn:
            row = conn.execute("SELECT last_nonce FROM nonces WHERE device_id = ?",
                               (device_id,)).fetchone()
            nonce = max((row[0] if row else 0) + 1, now)
            conn.execute(
                "INSERT INTO nonces (device_id, last_nonce) VALUES (?, ?) ON CONFLICT "
                "(device_id) DO UPDATE SET last_nonce = excluded.last_nonce", (device_id, nonce),
            )
        return nonce

    def add_command(self, cmd: Command) -> None:
        with self._write("add command") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO commands (device_id, cmd_id, name, args_json, nonce, ts, "
                "expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cmd.device_id, cmd.id, cmd.name, json.dumps(dict(cmd.args), default=repr),
                 cmd.nonce, cmd.ts, cmd.expires),
            )

    def record_reply(self, reply: Reply) -> None:
        with self._write("record reply") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO replies (device_id, cmd_id, ok, result_json, error, ts, "
                "received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (reply.device_id, reply.id, int(reply.ok),
                 None if reply.result is None else json.dumps(dict(reply.result), default=repr),
                 reply.error, reply.ts, now_ms()),
            )

    def reply(self, device_id: str, cmd_id: str) -> Reply | None:
        rows = self._read(
            "SELECT ok, result_json, error, ts FROM replies WHERE device_id = ? AND cmd_id = ?",
            (device_id, cmd_id),
        )
        if not rows:
            return None
        ok, result, error, ts = rows[0]
        return Reply(device_id, cmd_id, bool(ok), ts,
                     None if result is None else json.loads(result), error)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
