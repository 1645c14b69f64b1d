"""The transaction journal: the device's outbox of MAC'd, sequence-numbered records.

A tap writes two records: an *intent*, durable before the card is written, and a *done*
after it (linked to its intent); things that write no card (a rejection) are single *event*
records. Each record carries what the center needs to reconcile, a per-device sequence
number and an AES-CMAC over a canonical encoding (:func:`canonical_bytes`, specified in
``docs/stores.md``), so a record changed behind the API or moved to another device fails
verification here and at the center.

Records are never updated. Two small tables are kept in the same transactions as the
records: ``open_intent`` (intents without a done: the taps in doubt after a power cut) and
``card_counters`` (the highest card transaction counter seen per card, for rollback and
clone detection without scanning the journal).
"""

from __future__ import annotations

import hmac
import logging
import operator
import re
import sqlite3
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._sql import U63, U64, Conn, check_int, check_u64, from_sql_u64, to_sql_u64
from .errors import (
    ActionAlreadyApplied,
    InvalidRecord,
    JournalTampered,
    NotFound,
    StoreError,
)

__all__ = [
    "KIND_ACTION_APPLIED",
    "KIND_REJECTION",
    "KIND_REPAIR",
    "KIND_TAP",
    "KIND_TOPUP",
    "OPTIONAL_INT_FIELDS",
    "OPTIONAL_TEXT_FIELDS",
    "PHASE_DONE",
    "PHASE_EVENT",
    "PHASE_INTENT",
    "Journal",
    "JournalRecord",
    "canonical_bytes",
]

log = logging.getLogger("afc.stores.journal")

KIND_TAP = "tap"
KIND_TOPUP = "topup"
KIND_REPAIR = "repair"
KIND_ACTION_APPLIED = "action-applied"
KIND_REJECTION = "rejection"

PHASE_INTENT = "intent"
PHASE_DONE = "done"
PHASE_EVENT = "event"
_PHASES = (PHASE_INTENT, PHASE_DONE, PHASE_EVENT)

#: Opens every canonical encoding: ASCII "AFCJ" and the format number.
CANONICAL_MAGIC = b"AFCJ"
CANONICAL_FORMAT = 1

_TOKEN_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_TEXT_MAX = 64
_UID_SIZES = (4, 7, 10)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One journal record, as written and as read back.

    The caller fills the facts of the transaction; the journal sets ``device_id``, ``seq``,
    ``phase``, ``link`` and ``mac``. Money is in kuruş, ``time`` is the device's wall clock
    in Unix milliseconds as the caller's monotonic guard gives it (the journal does not read
    a clock), ``card_number`` is a u64, ``uid`` 4, 7 or 10 bytes. ``outcome`` is a short
    token (``ok``, ``declined``, ``card-removed``...), ``reason`` a numeric reason code.
    """

    kind: str
    time: int
    card_number: int | None = None
    uid: bytes | None = None
    counter_before: int | None = None
    counter_after: int | None = None
    balance_before: int | None = None
    balance_after: int | None = None
    fare: int | None = None
    product: int | None = None
    line: str | None = None
    vehicle: str | None = None
    validator_id: str | None = None
    outcome: str | None = None
    reason: int | None = None
    action_id: str | None = None
    # Set by the journal:
    seq: int = 0
    phase: str = PHASE_EVENT
    link: int | None = None
    device_id: str = ""
    mac: bytes = b""


#: Fields the caller may give (everything but what the journal sets).
CALLER_FIELDS = tuple(
    f.name
    for f in fields(JournalRecord)
    if f.name not in {"seq", "phase", "link", "device_id", "mac"}
)
_CALLER_SET = frozenset(CALLER_FIELDS)

# The canonical encoding's field order and types: "s" text, "i" i64, "u" u64, "b" bytes.
_CANONICAL_FIELDS: tuple[tuple[str, str], ...] = (
    ("device_id", "s"),
    ("seq", "i"),
    ("phase", "s"),
    ("kind", "s"),
    ("link", "i"),
    ("time", "i"),
    ("card_number", "u"),
    ("uid", "b"),
    ("counter_before", "i"),
    ("counter_after", "i"),
    ("balance_before", "i"),
    ("balance_after", "i"),
    ("fare", "i"),
    ("product", "i"),
    ("line", "s"),
    ("vehicle", "s"),
    ("validator_id", "s"),
    ("outcome", "s"),
    ("reason", "i"),
    ("action_id", "s"),
)
_I64 = struct.Struct(">q").pack
_U64 = struct.Struct(">Q").pack
_U16 = struct.Struct(">H").pack
# the same encodings with the 0x01 "present" byte in front, in one call
_PRESENT_I64 = struct.Struct(">Bq").pack
_PRESENT_U64 = struct.Struct(">BQ").pack
_PRESENT_LEN = struct.Struct(">BH").pack
_ABSENT = b"\x00"
_HEAD = CANONICAL_MAGIC + bytes((CANONICAL_FORMAT,))

#: The caller's fields of a record in canonical order (device_id, seq, phase and link, which
#: the journal sets, go in between; see :func:`_canonical`), in one C call.
_RECORD_FIELDS = operator.attrgetter(*CALLER_FIELDS)

# Encoded text fields by value: a device writes the same few strings (its id, phases, kinds,
# line, vehicle, outcomes) into every record. Bounded, since text fields can be anything.
_TEXT_CACHE: dict[str, bytes] = {}
_TEXT_CACHE_MAX = 256


def _text(value: object) -> bytes:
    """A text field of the canonical encoding (absent, or UTF-8 behind its length)."""
    if value is None:
        return _ABSENT
    if type(value) is str:
        encoded = _TEXT_CACHE.get(value)
        if encoded is not None:
            return encoded
    data = value.encode("utf-8")  # type: ignore[attr-defined]
    encoded = _PRESENT_LEN(1, len(data)) + data
    if type(value) is str:
        if len(_TEXT_CACHE) >= _TEXT_CACHE_MAX:
            _TEXT_CACHE.clear()
        _TEXT_CACHE[value] = encoded
    return encoded


def canonical_bytes(record: JournalRecord) -> bytes:
    """The bytes the record's MAC is computed over (format 1, see ``docs/stores.md``).

    ``"AFCJ" 0x01`` then every field of :data:`_CANONICAL_FIELDS` in that fixed order, each
    as ``0x00`` when absent or ``0x01`` and its value: integers as 8 bytes big-endian (two's
    complement, the card number unsigned), text as UTF-8 and bytes each behind a 2-byte
    big-endian length. Fixed order and self-delimiting fields make it injective, and a
    center in any language rebuilds it from a record's fields alone.
    """
    return _canonical(record.device_id, record.seq, record.phase, record.link, record)


def _canonical(
    device_id: str, seq: int, phase: str, link: int | None, record: JournalRecord
) -> bytes:
    """:func:`canonical_bytes` with the journal-assigned fields given apart from the record,
    so writing a record needs no copy of it.

    The fields of :data:`_CANONICAL_FIELDS`, written out in that order (``tests/test_stores.py``
    checks this against a loop over the table).
    """
    (kind, time, card, uid, c_before, c_after, b_before, b_after, fare, product, line,
     vehicle, validator_id, outcome, reason, action_id) = _RECORD_FIELDS(record)
    a = _ABSENT
    i64 = _PRESENT_I64
    return b"".join((
        _HEAD,
        _text(device_id),
        a if seq is None else i64(1, seq),
        _text(phase),
        _text(kind),
        a if link is None else i64(1, link),
        a if time is None else i64(1, time),
        a if card is None else _PRESENT_U64(1, card),
        a if uid is None else _PRESENT_LEN(1, len(uid)) + uid,
        a if c_before is None else i64(1, c_before),
        a if c_after is None else i64(1, c_after),
        a if b_before is None else i64(1, b_before),
        a if b_after is None else i64(1, b_after),
        a if fare is None else i64(1, fare),
        a if product is None else i64(1, product),
        _text(line),
        _text(vehicle),
        _text(validator_id),
        _text(outcome),
        a if reason is None else i64(1, reason),
        _text(action_id),
    ))


#: The optional integer fields of a record (i64 or absent), and the optional text ones: the
#: journal's validation and the wire codec's (edge_agent.protocol) take them from here.
OPTIONAL_INT_FIELDS = (
    "counter_before",
    "counter_after",
    "balance_before",
    "balance_after",
    "fare",
    "product",
    "reason",
)
OPTIONAL_TEXT_FIELDS = ("line", "vehicle", "validator_id", "action_id")


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise InvalidRecord(
            f"{what} must be a token of 1 to 32 characters a-z, 0-9, '-', got {value!r}"
        )
    return value


def check_text(value: object, what: str) -> str:
    """Short printable text (line, vehicle, ids): refuse anything a log or UI would choke on."""
    if not isinstance(value, str) or not 0 < len(value) <= _TEXT_MAX or not value.isprintable():
        raise InvalidRecord(f"{what} must be printable text of 1 to {_TEXT_MAX} characters")
    return value


def _validate(record: JournalRecord) -> None:
    """Refuse a record whose fields would not store or encode: checked before any write.

    The checks of ``check_int``/``check_u64``/``check_text``/``_check_token`` in the order of
    the fields; a value that passes the inline test needs no call, one that fails gets the
    call, which raises the message.
    """
    (kind, time, card, uid, c_before, c_after, b_before, b_after, fare, product, line,
     vehicle, validator_id, outcome, reason, action_id) = _RECORD_FIELDS(record)
    if type(kind) is not str or kind not in _GOOD_TOKENS:
        _remember_token(_check_token(kind, "kind"))
    if type(time) is not int or not -U63 <= time < U63:
        check_int(time, "time")
    if card is not None and (type(card) is not int or not 0 <= card < U64):
        check_u64(card, "card_number")
    if uid is not None and (not isinstance(uid, bytes) or len(uid) not in _UID_SIZES):
        raise InvalidRecord("uid must be 4, 7 or 10 bytes")
    ints = (c_before, c_after, b_before, b_after, fare, product, reason)
    for name, value in zip(OPTIONAL_INT_FIELDS, ints, strict=True):
        if value is not None and (type(value) is not int or not -U63 <= value < U63):
            check_int(value, name)
    texts = (line, vehicle, validator_id, action_id)
    for name, value in zip(OPTIONAL_TEXT_FIELDS, texts, strict=True):
        if value is not None and not (
            type(value) is str and 0 < len(value) <= _TEXT_MAX and value.isprintable()
        ):
            check_text(value, name)
    if outcome is not None and (type(outcome) is not str or outcome not in _GOOD_TOKENS):
        _remember_token(_check_token(outcome, "outcome"))


# Tokens (kinds, outcomes) a device writes again and again: each passes the regular
# expression once. Exact str only; bounded, since a caller can pass any text.
_GOOD_TOKENS: set[str] = set()


def _remember_token(value: str) -> None:
    if len(_GOOD_TOKENS) >= 64:
        _GOOD_TOKENS.clear()
    _GOOD_TOKENS.add(value)


def _as_record(record: JournalRecord | Mapping[str, Any]) -> JournalRecord:
    """The caller's record as a JournalRecord; fields the journal sets are ignored later."""
    if isinstance(record, JournalRecord):
        return record
    if type(record) is dict and _CALLER_SET.issuperset(record):
        try:
            return JournalRecord(**record)
        except TypeError as exc:  # a required field is missing
            raise InvalidRecord(f"incomplete journal record: {exc}") from None
    if isinstance(record, Mapping):
        unknown = set(record) - set(CALLER_FIELDS)
        if unknown:
            raise InvalidRecord(f"unknown journal record fields: {', '.join(sorted(unknown))}")
        try:
            return JournalRecord(**record)
        except TypeError as exc:  # a required field is missing
            raise InvalidRecord(f"incomplete journal record: {exc}") from None
    raise InvalidRecord(f"a journal record must be a JournalRecord or a mapping, not {record!r}")


# Column order of the journal table as read and written here.
_COLUMNS = (
    "seq",
    "phase",
    "kind",
    "link",
    "time",
    "card_number",
    "uid",
    "counter_before",
    "counter_after",
    "balance_before",
    "balance_after",
    "fare",
    "product",
    "line",
    "vehicle",
    "validator_id",
    "outcome",
    "reason",
    "action_id",
    "mac",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM journal"
_INSERT = f"INSERT INTO journal ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# _INSERT with NULL literals where a value is None, by which columns those are
_INSERTS: dict[tuple[bool, ...], str] = {}
_NONE_ROW = (None,) * len(_COLUMNS)


def _insert_statement(values: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """:data:`_INSERT` and its parameters for one row of :data:`_COLUMNS`, NULL written into
    the statement instead of binding None.

    For a None parameter (and a ``bytes`` one: the caller passes those as ``bytearray``,
    stored alike as a BLOB) sqlite3 looks for an adapter first, and the failing attribute
    lookups of that search cost more than the rest of the binding together. A record has a
    handful of None patterns, so the statements (and SQLite's prepared copies) are few.
    """
    absent = tuple(map(operator.is_, values, _NONE_ROW))
    sql = _INSERTS.get(absent)
    if sql is None:
        placeholders = ", ".join("NULL" if none else "?" for none in absent)
        sql = f"INSERT INTO journal ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
        if len(_INSERTS) < 256:
            _INSERTS[absent] = sql
    return sql, [value for value in values if value is not None]


_NEXT_SEQ = (
    "SELECT max(coalesce((SELECT max(seq) FROM journal), 0), "
    "(SELECT value FROM meta WHERE key = 'journal_floor')) + 1"
)
_COUNTER_UPSERT = (
    "INSERT INTO card_counters (card_number, counter, seq) VALUES (?, ?, ?) "
    "ON CONFLICT (card_number) DO UPDATE SET counter = excluded.counter, seq = excluded.seq "
    "WHERE excluded.counter > card_counters.counter"
)

MacFunction = Callable[[bytes], bytes]

_INTENT_CACHE_MAX = 64


class Journal:
    """The journal of one device database; reached as ``DeviceDatabase.journal``.

    Writes are durable on return (one fsynced transaction each); reads verify MACs unless
    told not to.
    """

    def __init__(self, conn: Conn, device_id: str, mac: MacFunction | None) -> None:
        self._conn = conn
        self._device_id = device_id
        self._mac = mac
        # seq -> (kind, time, card_number, uid, action_id) of the intents this handle wrote,
        # until their done: what done() copies from the intent, without reading the row back
        # (records are never updated). done() still deletes the open_intent row first, so
        # whether the intent is open is always the database's answer.
        self._intents: dict[int, tuple[Any, ...]] = {}

    # -- writing ------------------------------------------------------------------------

    def intent(
        self,
        record: JournalRecord | Mapping[str, Any],
        *,
        tallies: Mapping[str, int] | None = None,
    ) -> int:
        """Record that a card write is about to happen; returns its sequence number.

        Durable on return: only then may the card be written. The intent stays open (see
        :meth:`open_intents`) until :meth:`done` closes it.
        """
        rec = _as_record(record)
        _validate(rec)
        with self._conn.write("journal intent") as raw:
            _add_tallies(raw, tallies)
            seq = self._insert(raw, rec, PHASE_INTENT, None)
            raw.execute("INSERT INTO open_intent (seq) VALUES (?)", (seq,))
            # Only what was read from the card counts as seen: the intended counter_after
            # may never reach the card.
            self._note_counter(raw, rec.card_number, rec.counter_before, None, seq)
        # committed: remember what done() takes over (a few at most: each done removes one)
        intents = self._intents
        if len(intents) >= _INTENT_CACHE_MAX:
            intents.clear()
        uid = rec.uid
        intents[seq] = (
            rec.kind,
            rec.time,
            rec.card_number,
            uid if uid is None or type(uid) is bytes else bytes(uid),
            rec.action_id,
        )
        return seq

    def done(
        self,
        seq: int,
        outcome: str,
        *,
        apply_action: bool = False,
        tallies: Mapping[str, int] | None = None,
        **fields: Any,
    ) -> int:
        """Close intent ``seq`` with ``outcome``; returns the done record's sequence number.

        ``fields`` are record fields of the done record (``counter_after``,
        ``balance_after``, ``time``...); ``kind``, ``card_number``, ``uid``, ``time`` and
        ``action_id`` default to the intent's. With ``apply_action=True`` the intent's action
        is marked applied in the same transaction, so a power cut cannot leave a card loaded
        with an action that still looks pending (:class:`ActionAlreadyApplied` if it was
        applied already; then nothing is written). Durable on return.
        """
        check_int(seq, "seq", 1)
        _check_token(outcome, "outcome")
        unknown = set(fields) - set(CALLER_FIELDS) | ({"outcome"} & set(fields))
        if unknown:
            raise InvalidRecord(f"done(): unexpected fields {', '.join(sorted(unknown))}")
        # The done record is committed without its own fsync: the next intent's commit (or
        # a checkpoint) makes it durable. Lost in a power cut, its intent stays open and the
        # device settles it from the card's counter and trip log at the card's next tap, so
        # the guarantee of DESIGN.md holds with one fsync per tap instead of two.
        with self._conn.write_lazy("journal done") as raw:
            _add_tallies(raw, tallies)
            if raw.execute("DELETE FROM open_intent WHERE seq = ?", (seq,)).rowcount != 1:
                raise NotFound(f"journal record {seq} is not an open intent")
            known = self._intents.get(seq)
            if known is not None:
                kind, time, card_number, uid, action_id = known
            else:  # written by another handle, or before a restart
                kind, time, card, uid, action_id = raw.execute(
                    "SELECT kind, time, card_number, uid, action_id FROM journal WHERE seq = ?",
                    (seq,),
                ).fetchone()
                card_number = None if card is None else from_sql_u64(card)
            base = {
                "kind": kind,
                "time": time,
                "card_number": card_number,
                "uid": uid,
                "action_id": action_id,
            }
            base.update(fields)
            base["outcome"] = outcome
            rec = _as_record(base)
            _validate(rec)
            done_seq = self._insert(raw, rec, PHASE_DONE, seq)
            self._note_counter(
                raw, rec.card_number, rec.counter_before, rec.counter_after, done_seq
            )
            if apply_action:
                if rec.action_id is None:
                    raise InvalidRecord(f"done({seq}, apply_action=True): the record has no action")
                mark_action_applied(raw, rec.action_id, done_seq)
        self._intents.pop(seq, None)
        return done_seq

    def event(self, record: JournalRecord | Mapping[str, Any]) -> int:
        """Append a stand-alone record (a rejection, an alarm): no card write follows it."""
        rec = _as_record(record)
        _validate(rec)
        with self._conn.write("journal event") as raw:
            seq = self._insert(raw, rec, PHASE_EVENT, None)
            self._note_counter(raw, rec.card_number, rec.counter_before, rec.counter_after, seq)
        return seq

    def _insert(
        self, raw: sqlite3.Connection, rec: JournalRecord, phase: str, link: int | None
    ) -> int:
        """Append ``rec`` with the next sequence number and its MAC; returns the number."""
        if self._mac is None:
            raise StoreError("the journal cannot be written: the database was opened without a key")
        seq = raw.execute(_NEXT_SEQ).fetchone()[0]
        mac = bytes(self._mac(_canonical(self._device_id, seq, phase, link, rec)))
        uid = rec.uid
        raw.execute(
            *_insert_statement((
                seq,
                phase,
                rec.kind,
                link,
                rec.time,
                None if rec.card_number is None else to_sql_u64(rec.card_number),
                bytearray(uid) if type(uid) is bytes else uid,  # (see _insert_statement)
                rec.counter_before,
                rec.counter_after,
                rec.balance_before,
                rec.balance_after,
                rec.fare,
                rec.product,
                rec.line,
                rec.vehicle,
                rec.validator_id,
                rec.outcome,
                rec.reason,
                rec.action_id,
                bytearray(mac),
            ))
        )
        return seq

    @staticmethod
    def _note_counter(
        raw: sqlite3.Connection,
        card_number: int | None,
        before: int | None,
        after: int | None,
        seq: int,
    ) -> None:
        seen = [c for c in (before, after) if c is not None]
        if card_number is not None and seen:
            raw.execute(_COUNTER_UPSERT, (to_sql_u64(card_number), max(seen), seq))

    # -- reading ------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest sequence number ever issued (0 before the first record)."""
        return int(self._conn.one(_NEXT_SEQ, what="journal last_seq")) - 1

    @property
    def acked_seq(self) -> int:
        """The center has acknowledged every record up to this sequence number."""
        return int(
            self._conn.one("SELECT value FROM meta WHERE key = 'journal_acked'", what="journal")
        )

    def get(self, seq: int, *, verify: bool = True) -> JournalRecord | None:
        """Record ``seq``, or None if it does not exist (never written, or pruned)."""
        row = self._conn.execute(f"{_SELECT} WHERE seq = ?", (seq,), "journal get").fetchone()
        if row is None:
            return None
        return self._checked([self._row_to_record(row)], verify)[0]

    def records(
        self, since_seq: int = 0, limit: int = 1000, *, verify: bool = True
    ) -> list[JournalRecord]:
        """Up to ``limit`` records with ``seq > since_seq``, oldest first: the outbox read.

        With ``verify`` (the default) a record whose MAC fails raises
        :class:`JournalTampered`; the agent may read with ``verify=False`` to forward
        records as they are (the center verifies them too).
        """
        check_int(since_seq, "since_seq", 0)
        check_int(limit, "limit", 1, 1_000_000)
        rows = self._conn.execute(
            f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, limit), "journal read"
        ).fetchall()
        return self._checked([self._row_to_record(r) for r in rows], verify)

    def record_columns(self, since_seq: int = 0, limit: int = 1000) -> dict[str, list[Any]]:
        """:meth:`records` with ``verify=False``, as columns: one list per journal column
        (the :class:`JournalRecord` field names, ``mac`` included, ``device_id`` left out:
        every record here is this device's), oldest first.

        The agent's outbox read: its batch encoder works a column at a time, and building
        one frozen record per row only to take it apart again was most of the agent's CPU
        in a backlog drain (issue 5).
        """
        check_int(since_seq, "since_seq", 0)
        check_int(limit, "limit", 1, 1_000_000)
        rows = self._conn.execute(
            f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, limit), "journal read"
        ).fetchall()
        if not rows:
            return {name: [] for name in _COLUMNS}
        columns = dict(zip(_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
        cards = columns["card_number"]
        if min(filter(None, cards), default=0) < 0:  # u64 above 2**63, stored as i64
            columns["card_number"] = [None if c is None else from_sql_u64(c) for c in cards]
        return columns

    def open_intents(
        self, *, card_number: int | None = None, verify: bool = True
    ) -> list[JournalRecord]:
        """Intents without a done record, oldest first: the taps in doubt after a power cut;
        with ``card_number``, that card's only (what a tap settles: the ones the center must
        settle stay open, and are not read and verified again at every tap).

        Each is resolved from the card's own counter and trip log on its next tap, then
        closed with :meth:`done`. MACs are verified: the resolution trusts these contents.
        """
        if card_number is None:
            sql, params = f"{_SELECT} WHERE seq IN (SELECT seq FROM open_intent) ORDER BY seq", ()
        else:
            check_u64(card_number, "card_number")
            sql = (f"{_SELECT} WHERE seq IN (SELECT seq FROM open_intent) AND card_number = ? "
                   "ORDER BY seq")
            params = (to_sql_u64(card_number),)
        rows = self._conn.execute(sql, params, what="journal open intents").fetchall()
        return self._checked([self._row_to_record(r) for r in rows], verify)

    def tally(self, name: str) -> int:
        """A running total kept with the records (e.g. a dealer's credit used): it survives
        :meth:`prune_acked`, unlike a sum over the records."""
        value = self._conn.one("SELECT total FROM tallies WHERE name = ?", (name,), "tally")
        return 0 if value is None else int(value)

    def last_counter(self, card_number: int) -> int | None:
        """The highest card transaction counter this device has seen for the card, or None.

        A card presenting a lower counter was rolled back or cloned. Counts the counters
        read from cards (intents' ``counter_before``) and the ones written (done and event
        records), not an intent's planned ``counter_after``.
        """
        check_u64(card_number, "card_number")
        value = self._conn.one(
            "SELECT counter FROM card_counters WHERE card_number = ?",
            (to_sql_u64(card_number),),
            "journal last_counter",
        )
        return None if value is None else int(value)

    def verify(self) -> list[int]:
        """Check every record's MAC; returns the sequence numbers that fail (empty if none)."""
        if self._mac is None:
            raise StoreError("the journal cannot be verified: opened without a key")
        bad: list[int] = []
        with self._conn.snapshot("journal verify") as raw:
            for row in raw.execute(f"{_SELECT} ORDER BY seq"):
                try:
                    rec = self._row_to_record(row)
                    ok = self._mac_ok(rec)
                except (ValueError, TypeError, AttributeError, struct.error):
                    ok = False  # a value of the wrong type, put there behind the API
                if not ok:
                    bad.append(row[0])
        if bad:
            log.warning("journal MAC verification failed for %d record(s): %s", len(bad), bad[:20])
        return bad

    # -- the agent's side ---------------------------------------------------------------

    def mark_acked(self, up_to_seq: int) -> int:
        """The center has stored every record up to ``up_to_seq``; returns the acked mark.

        Cumulative and monotonic: an older ack changes nothing. Acking a sequence number
        that was never issued is refused.
        """
        check_int(up_to_seq, "up_to_seq", 0)
        with self._conn.write("journal ack") as raw:
            last = raw.execute(_NEXT_SEQ).fetchone()[0] - 1
            if up_to_seq > last:
                raise InvalidRecord(f"ack for seq {up_to_seq}, but the last record is {last}")
            raw.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key = 'journal_acked'", (up_to_seq,)
            )
            return int(
                raw.execute("SELECT value FROM meta WHERE key = 'journal_acked'").fetchone()[0]
            )

    def prune_acked(self) -> int:
        """Delete acknowledged records, except open intents; returns how many went.

        The sequence floor is kept in ``meta`` so numbers are never reused even when every
        record was pruned.
        """
        with self._conn.write("journal prune") as raw:
            acked = raw.execute("SELECT value FROM meta WHERE key = 'journal_acked'").fetchone()[0]
            cur = raw.execute(
                "DELETE FROM journal WHERE seq <= ? AND seq NOT IN (SELECT seq FROM open_intent)",
                (acked,),
            )
            raw.execute(
                "UPDATE meta SET value = max(value, ?) WHERE key = 'journal_floor'", (acked,)
            )
            return cur.rowcount

    # -- conversions ----------------------------------------------------------------------

    def _checked(self, records: list[JournalRecord], verify: bool) -> list[JournalRecord]:
        if verify:
            if self._mac is None:
                raise StoreError(
                    "journal records cannot be verified: the database was opened without a key"
                )
            bad = [r.seq for r in records if not self._mac_ok(r)]
            if bad:
                log.warning("journal MAC verification failed for records %s", bad[:20])
                raise JournalTampered(f"journal records fail MAC verification: {bad[:20]}", bad)
        return records

    def _mac_ok(self, rec: JournalRecord) -> bool:
        """Whether ``rec`` carries the MAC this device's journal key gives it: the current
        version (one MAC, the common case), else an older version the key store still holds
        (a record written before ``afc keys rotate journal-mac``). Which versions, and in
        which order, is the MAC function's to say (``database.JournalMac.older_version_of``);
        a plain MAC function knows one key only."""
        assert self._mac is not None
        try:
            data = canonical_bytes(rec)
            expected = bytes(self._mac(data))
        except (ValueError, TypeError, AttributeError, struct.error):
            return False
        mac = rec.mac
        if not isinstance(mac, bytes):
            return False
        if hmac.compare_digest(expected, mac):
            return True
        older = getattr(self._mac, "older_version_of", None)
        return older is not None and older(data, mac) is not None

    def _row_to_record(self, row: tuple[Any, ...]) -> JournalRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        card = values["card_number"]
        if isinstance(card, int):
            values["card_number"] = from_sql_u64(card)
        return JournalRecord(device_id=self._device_id, **values)


def _add_tallies(raw: sqlite3.Connection, tallies: Mapping[str, int] | None) -> None:
    """Add to running totals in the caller's transaction: they move with the record that
    justifies them, or not at all."""
    for name, delta in (tallies or {}).items():
        check_text(name, "tally name")
        check_int(delta, "tally delta")
        raw.execute(
            "INSERT INTO tallies (name, total) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET total = total + excluded.total",
            (name, delta),
        )


def mark_action_applied(raw: sqlite3.Connection, action_id: str, journal_seq: int) -> None:
    """Mark ``action_id`` applied by journal record ``journal_seq``, inside the caller's
    write transaction; refuses a second application (the exactly-once rule)."""
    cur = raw.execute(
        "UPDATE actions SET applied_seq = ? WHERE action_id = ? AND applied_seq IS NULL",
        (journal_seq, action_id),
    )
    if cur.rowcount == 1:
        return
    row = raw.execute(
        "SELECT applied_seq FROM actions WHERE action_id = ?", (action_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"action {action_id!r} is not in the action list")
    raise ActionAlreadyApplied(f"action {action_id!r} was already applied (journal seq {row[0]})")
