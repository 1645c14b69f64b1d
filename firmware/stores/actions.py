"""The action list: loads bought online (a top-up, a pass) waiting for their card to tap.

An action is applied to its card exactly once. The row of an applied action is kept, with the
journal sequence number of the record that applied it, until the center has been told
(:meth:`ActionList.mark_reported`) *and* no longer lists it: a list from the center that
still carries an action this device applied (the report has not reached the center yet)
must not make it pending again. Actions whose intent is open (a tap in doubt) are not
offered by :meth:`ActionList.pending_for` until the doubt is resolved.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._sql import Conn, check_int, check_u64, from_sql_u64, to_sql_u64
from .errors import DeltaChainBroken, InvalidRecord, StaleVersion
from .journal import KIND_ACTION_APPLIED, check_text, mark_action_applied

__all__ = ["ACTION_KINDS", "Action", "ActionList"]

KIND_TOPUP = "topup"
KIND_PASS = "pass"
ACTION_KINDS = (KIND_TOPUP, KIND_PASS)


@dataclass(frozen=True, slots=True)
class Action:
    """A pending load from the center.

    ``kind`` is ``"topup"`` (``amount`` in kuruş) or ``"pass"`` (``product_id``);
    ``valid_until`` is Unix milliseconds, the clock of journal ``time``. ``version``,
    ``applied_seq`` and ``reported`` are the device's bookkeeping, set on read.
    """

    action_id: str
    card_number: int
    kind: str
    valid_until: int
    amount: int | None = None
    product_id: int | None = None
    card_seq: int | None = None  # the center's per-card action number (1, 2, ...)
    version: int = 0
    applied_seq: int | None = None
    reported: bool = False


_COLUMNS = (
    "action_id",
    "card_number",
    "kind",
    "valid_until",
    "amount",
    "product_id",
    "card_seq",
    "version",
    "applied_seq",
    "reported",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM actions"
_INPUT_FIELDS = (
    "action_id", "card_number", "kind", "valid_until", "amount", "product_id", "card_seq",
)
# Insert a listed action; one the device already has keeps its applied state (and, once
# applied, its fields: they describe what was loaded).
_UPSERT = (
    "INSERT INTO actions (action_id, card_number, kind, valid_until, amount, product_id, "
    "card_seq, version, listed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) "
    "ON CONFLICT (action_id) DO UPDATE SET listed = 1, version = excluded.version, "
    "card_number = iif(applied_seq IS NULL, excluded.card_number, card_number), "
    "kind = iif(applied_seq IS NULL, excluded.kind, kind), "
    "valid_until = iif(applied_seq IS NULL, excluded.valid_until, valid_until), "
    "amount = iif(applied_seq IS NULL, excluded.amount, amount), "
    "product_id = iif(applied_seq IS NULL, excluded.product_id, product_id), "
    "card_seq = iif(applied_seq IS NULL, excluded.card_seq, card_seq)"
)
# Applied, reported and no longer listed: the center knows, the row can go.
_FORGET = "DELETE FROM actions WHERE listed = 0 AND reported = 1"


def _row(action: Action | Mapping[str, Any], version: int) -> tuple[Any, ...]:
    """Validate one action from the center and turn it into the upsert's parameters."""
    if isinstance(action, Mapping):
        unknown = set(action) - set(_INPUT_FIELDS)
        if unknown:
            raise InvalidRecord(f"unknown action fields: {', '.join(sorted(unknown))}")
        try:
            action = Action(**action)
        except TypeError as exc:
            raise InvalidRecord(f"incomplete action: {exc}") from None
    if not isinstance(action, Action):
        raise InvalidRecord(f"an action must be an Action or a mapping, not {action!r}")
    check_text(action.action_id, "action_id")
    check_u64(action.card_number, "card_number")
    check_int(action.valid_until, "valid_until")
    if action.kind == KIND_TOPUP:
        check_int(action.amount, "amount", 1)
        if action.product_id is not None:
            raise InvalidRecord(f"top-up action {action.action_id!r} must not name a product")
    elif action.kind == KIND_PASS:
        check_int(action.product_id, "product_id", 0)
        if action.amount is not None:
            raise InvalidRecord(f"pass action {action.action_id!r} must not carry an amount")
    else:
        raise InvalidRecord(f"action kind must be one of {ACTION_KINDS}, got {action.kind!r}")
    if action.card_seq is not None:
        check_int(action.card_seq, "card_seq", 1, 0xFFFF)
    return (
        action.action_id,
        to_sql_u64(action.card_number),
        action.kind,
        action.valid_until,
        action.amount,
        action.product_id,
        action.card_seq,
        version,
    )


def _action(row: tuple[Any, ...]) -> Action:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["card_number"] = from_sql_u64(values["card_number"])
    values["reported"] = bool(values["reported"])
    return Action(**values)


class ActionList:
    """The action list of one device database; reached as ``DeviceDatabase.actions``."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    @property
    def version(self) -> int:
        """The version of the list in force; 0 before the first list."""
        return int(
            self._conn.one("SELECT value FROM meta WHERE key = 'actions_version'", what="actions")
        )

    def pending_for(self, card_number: int, now: int | None = None) -> list[Action]:
        """Actions waiting for this card (hot path, indexed), oldest id first.

        With ``now`` (Unix ms) expired ones are left out. Actions of an open action-applied
        intent (a load in doubt) are left out until that intent is closed; other kinds of
        record use ``action_id`` for other references (a top-up names its credit
        allowance) and hide nothing.
        """
        check_u64(card_number, "card_number")
        sql = (
            f"{_SELECT} WHERE card_number = ? AND applied_seq IS NULL "
            "AND valid_until >= ? AND action_id NOT IN ("
            "SELECT j.action_id FROM open_intent o CROSS JOIN journal j ON j.seq = o.seq "
            f"WHERE j.action_id IS NOT NULL AND j.kind = '{KIND_ACTION_APPLIED}') "
            "ORDER BY action_id"
        )
        lower = -(1 << 63) if now is None else check_int(now, "now")
        rows = self._conn.execute(
            sql, (to_sql_u64(card_number), lower), "actions pending"
        ).fetchall()
        return [_action(r) for r in rows]

    def get(self, action_id: str) -> Action | None:
        """The action with this id (pending or applied), or None."""
        row = self._conn.execute(
            f"{_SELECT} WHERE action_id = ?", (action_id,), "actions get"
        ).fetchone()
        return None if row is None else _action(row)

    def mark_applied(self, action_id: str, journal_seq: int) -> None:
        """Record that journal record ``journal_seq`` applied the action to its card.

        Once only: a second call raises :class:`ActionAlreadyApplied`. Prefer
        ``journal.done(seq, ..., apply_action=True)``, which does this in the done record's
        own transaction.
        """
        check_int(journal_seq, "journal_seq", 1)
        with self._conn.write("actions mark applied") as raw:
            row = raw.execute("SELECT 1 FROM journal WHERE seq = ?", (journal_seq,)).fetchone()
            if row is None:
                raise InvalidRecord(f"journal record {journal_seq} does not exist")
            mark_action_applied(raw, action_id, journal_seq)

    def applied_unreported(self) -> list[Action]:
        """Applied actions the center has not been told about yet, in journal order."""
        rows = self._conn.execute(
            f"{_SELECT} WHERE applied_seq IS NOT NULL AND reported = 0 ORDER BY applied_seq",
            what="actions unreported",
        ).fetchall()
        return [_action(r) for r in rows]

    def mark_reported(self, action_ids: Iterable[str]) -> int:
        """The center has stored these applications; returns how many were marked."""
        ids = [(a,) for a in action_ids]
        with self._conn.write("actions mark reported") as raw:
            marked = raw.executemany(
                "UPDATE actions SET reported = 1 "
                "WHERE action_id = ? AND applied_seq IS NOT NULL AND reported = 0",
                ids,
            ).rowcount
            raw.execute(_FORGET)
        return max(marked, 0)

    def replace_all(self, version: int, actions: Iterable[Action | Mapping[str, Any]]) -> int:
        """Replace the list with ``actions`` as ``version`` atomically; returns the pending count.

        Pending actions not in the new list are dropped; applied ones are kept until
        reported (see the module doc). :class:`StaleVersion` for a version not newer.
        """
        check_int(version, "version", 1)
        rows = [_row(a, version) for a in actions]
        with self._conn.write("actions replace") as raw:
            current = self._current(raw)
            if version <= current:
                raise StaleVersion(
                    f"action list version {version} is not newer than {current}", current, version
                )
            raw.execute("DELETE FROM actions WHERE applied_seq IS NULL")
            raw.execute("UPDATE actions SET listed = 0")
            raw.executemany(_UPSERT, rows)
            raw.execute(_FORGET)
            self._set_version(raw, version)
            return self._pending_count(raw)

    def apply_delta(
        self,
        from_version: int,
        to_version: int,
        add: Iterable[Action | Mapping[str, Any]] = (),
        remove: Iterable[str] = (),
    ) -> None:
        """Apply a delta atomically, with the blacklist's version rules.

        Removing a pending action drops it; removing an applied one only marks it unlisted.
        """
        check_int(from_version, "from_version", 0)
        check_int(to_version, "to_version", 1)
        rows = [_row(a, to_version) for a in add]
        ids = [(check_text(a, "action_id"),) for a in remove]
        with self._conn.write("actions delta") as raw:
            current = self._current(raw)
            if to_version <= current:
                raise StaleVersion(
                    f"action delta to {to_version} is not newer than {current}",
                    current,
                    to_version,
                )
            if from_version != current:
                raise DeltaChainBroken(
                    f"action delta starts at {from_version}, but {current} is in force",
                    current,
                    from_version,
                )
            raw.executemany("DELETE FROM actions WHERE action_id = ? AND applied_seq IS NULL", ids)
            raw.executemany("UPDATE actions SET listed = 0 WHERE action_id = ?", ids)
            raw.executemany(_UPSERT, rows)
            raw.execute(_FORGET)
            self._set_version(raw, to_version)

    @staticmethod
    def _current(raw: sqlite3.Connection) -> int:
        return int(
            raw.execute("SELECT value FROM meta WHERE key = 'actions_version'").fetchone()[0]
        )

    @staticmethod
    def _set_version(raw: sqlite3.Connection, version: int) -> None:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'actions_version'", (version,))

    @staticmethod
    def _pending_count(raw: sqlite3.Connection) -> int:
        return int(
            raw.execute("SELECT count(*) FROM actions WHERE applied_seq IS NULL").fetchone()[0]
        )
