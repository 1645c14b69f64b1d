"""The blacklist (hotlist): cards refused at the door, by card number and optionally by UID.

The list in force lives in one of two physical tables behind the ``blacklist`` view. A full
list is built in the other table in short transactions (so the validator's journal writes
never wait long for the write lock) and made current by one small transaction that points
the view at it and sets the version: readers see the old list or the new one, never half of
either. A failure while building (the entries iterator raises, the disk fills) leaves the
list in force untouched. Deltas change the table in force in one transaction.

Lookups are one prepared statement on a ``WITHOUT ROWID`` primary key (the UID through a
partial index), run in autocommit mode: no lock, no network, microseconds.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, NamedTuple

from ._sql import U63, U64, Conn, check_int, check_u64, from_sql_u64, to_sql_u64
from .errors import (
    DeltaChainBroken,
    InvalidRecord,
    StaleVersion,
    StoreError,
    wrap_sqlite_error,
)
from .schema import BLACKLIST_TABLES

__all__ = ["Blacklist", "BlacklistEntry"]

log = logging.getLogger("afc.stores.blacklist")

_UID_SIZES = (4, 7, 10)
_LOOKUP = "SELECT uid, reason, version FROM blacklist WHERE card_number = ?"
_LOOKUP_UID = (
    "SELECT card_number, uid, reason, version FROM blacklist WHERE uid = ? "
    "ORDER BY card_number LIMIT 1"
)
#: Rows per transaction while a full list is built: about 50 ms of write lock each here.
DEFAULT_CHUNK = 20_000


class BlacklistEntry(NamedTuple):
    """A blacklisted card: its number (u64), reason code, UID if known, list version."""

    card_number: int
    reason: int = 0
    uid: bytes | None = None
    version: int = 0


def _rows(chunk: list[Any], version: int) -> list[tuple[int, bytes | None, int, int]]:
    """Validate entries and turn them into table rows (key mapped to signed 64 bits).

    Kept to one tight loop: it runs a million times per full list.
    """
    out = []
    append = out.append
    for entry in chunk:
        try:
            number, reason, uid = entry[0], entry[1], entry[2]
        except (TypeError, IndexError, KeyError):
            raise InvalidRecord(
                f"a blacklist entry must be (card_number, reason, uid), got {entry!r}"
            ) from None
        if type(number) is not int or not 0 <= number < U64:
            raise InvalidRecord(f"blacklist card number out of range: {number!r}")
        if type(reason) is not int or not 0 <= reason <= 0xFFFF:
            raise InvalidRecord(f"blacklist reason code must be 0..65535, got {reason!r}")
        if uid is not None and (type(uid) is not bytes or len(uid) not in _UID_SIZES):
            raise InvalidRecord("a blacklist UID must be 4, 7 or 10 bytes")
        append((number - U64 if number >= U63 else number, uid, reason, version))
    return out


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class Blacklist:
    """The blacklist of one device database; reached as ``DeviceDatabase.blacklist``."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    # -- hot path -------------------------------------------------------------------------

    def lookup(self, card_number: int) -> BlacklistEntry | None:
        """The entry for ``card_number``, or None if the card is not blacklisted."""
        if type(card_number) is not int or not 0 <= card_number < U64:
            check_u64(card_number, "card_number")
        key = card_number - U64 if card_number >= U63 else card_number
        try:
            row = self._conn.raw.execute(_LOOKUP, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, "blacklist lookup") from exc
        if row is None:
            return None
        return BlacklistEntry(card_number, row[1], row[0], row[2])

    def lookup_uid(self, uid: bytes) -> BlacklistEntry | None:
        """An entry listing ``uid`` (the lowest card number if several do), or None."""
        if not isinstance(uid, bytes) or len(uid) not in _UID_SIZES:
            raise InvalidRecord("a UID must be 4, 7 or 10 bytes")
        try:
            row = self._conn.raw.execute(_LOOKUP_UID, (uid,)).fetchone()
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, "blacklist UID lookup") from exc
        if row is None:
            return None
        return BlacklistEntry(from_sql_u64(row[0]), row[2], row[1], row[3])

    # -- state ----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The version of the list in force; 0 before the first full list."""
        return int(self._meta("blacklist_version"))

    @property
    def count(self) -> int:
        """How many cards the list in force holds (kept in ``meta``: no table scan)."""
        return int(self._meta("blacklist_count"))

    def _meta(self, key: str) -> Any:
        return self._conn.one("SELECT value FROM meta WHERE key = ?", (key,), "blacklist state")

    # -- configuration ----------------------------------------------------------------------

    def load_full(
        self,
        version: int,
        entries: Iterable[BlacklistEntry | tuple[int, int, bytes | None]],
        *,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> int:
        """Replace the whole list with ``entries`` as ``version``; returns the new count.

        Atomic for readers; refuses (:class:`StaleVersion`) a version not newer than the one
        in force, before reading any entry. ``entries`` are ``BlacklistEntry`` or
        ``(card_number, reason, uid)`` tuples, streamed: memory stays at one chunk. A card
        listed twice keeps its last entry. Fastest when sorted by card number, as the center
        sends full lists. If the iterator raises, its exception propagates and the list in
        force is untouched.
        """
        check_int(version, "version", 1)
        check_int(chunk_size, "chunk_size", 1)
        token = secrets.token_hex(8)
        with self._conn.write("blacklist full load") as raw:
            current, active = self._state(raw)
            if version <= current:
                raise StaleVersion(
                    f"blacklist version {version} is not newer than {current}", current, version
                )
            staging = self._other(active)
            raw.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('blacklist_staging', ?)",
                (token,),
            )
            raw.execute(f"DROP INDEX IF EXISTS {staging}_uid")
            raw.execute(f"DELETE FROM {staging}")
        insert = f"INSERT OR REPLACE INTO {staging} VALUES (?, ?, ?, ?)"
        try:
            for batch in _batches(entries, chunk_size):
                rows = _rows(batch, version)  # outside the lock
                with self._conn.write("blacklist full load") as raw:
                    self._check_token(raw, token)
                    raw.executemany(insert, rows)
            with self._conn.write("blacklist full load (index)") as raw:
                self._check_token(raw, token)
                raw.execute(
                    f"CREATE INDEX {staging}_uid ON {staging} (uid) WHERE uid IS NOT NULL"
                )
                count = raw.execute(f"SELECT count(*) FROM {staging}").fetchone()[0]
            with self._conn.write("blacklist full load (swap)") as raw:
                self._check_token(raw, token)
                current, active_now = self._state(raw)
                if version <= current:
                    raise StaleVersion(
                        f"blacklist version {version} is not newer than {current}",
                        current,
                        version,
                    )
                if active_now != active:
                    raise StoreError("another blacklist load swapped tables meanwhile")
                raw.execute("DROP VIEW blacklist")
                raw.execute(
                    "CREATE VIEW blacklist AS "
                    f"SELECT card_number, uid, reason, version FROM {staging}"
                )
                self._set(raw, blacklist_version=version, blacklist_count=count,
                          blacklist_active=staging)
                raw.execute("DELETE FROM meta WHERE key = 'blacklist_staging'")
        except BaseException:
            self._discard_staging(staging, token)
            raise
        # The old list is no longer reachable; free its pages for the next load.
        try:
            with self._conn.write("blacklist cleanup") as raw:
                if self._state(raw)[1] != active:
                    raw.execute(f"DELETE FROM {active}")
        except StoreError as exc:  # harmless: the next full load clears it first
            log.warning("could not clear the previous blacklist table: %s", exc)
        log.info("blacklist version %d loaded: %d cards", version, count)
        return int(count)

    def apply_delta(
        self,
        from_version: int,
        to_version: int,
        add: Iterable[BlacklistEntry | tuple[int, int, bytes | None]] = (),
        remove: Iterable[int] = (),
    ) -> None:
        """Apply a delta atomically: ``remove`` card numbers, then ``add`` entries.

        ``from_version`` must be the version in force (else :class:`DeltaChainBroken`: the
        agent requests a full list); ``to_version`` must be newer (else
        :class:`StaleVersion`). An added card already listed gets the new reason and UID.
        """
        check_int(from_version, "from_version", 0)
        check_int(to_version, "to_version", 1)
        rows = _rows(list(add), to_version)
        keys = [(to_sql_u64(check_u64(n, "removed card number")),) for n in remove]
        with self._conn.write("blacklist delta") as raw:
            current, active = self._state(raw)
            if to_version <= current:
                raise StaleVersion(
                    f"blacklist delta to {to_version} is not newer than {current}",
                    current,
                    to_version,
                )
            if from_version != current:
                raise DeltaChainBroken(
                    f"blacklist delta starts at {from_version}, but {current} is in force",
                    current,
                    from_version,
                )
            removed = raw.executemany(f"DELETE FROM {active} WHERE card_number = ?", keys).rowcount
            added = raw.executemany(
                f"INSERT OR IGNORE INTO {active} VALUES (?, ?, ?, ?)", rows
            ).rowcount
            if added < len(rows):  # some were listed already: give them the new values
                raw.executemany(
                    f"UPDATE {active} SET uid = ?2, reason = ?3, version = ?4 "
                    "WHERE card_number = ?1",
                    rows,
                )
            count = raw.execute(
                "SELECT value FROM meta WHERE key = 'blacklist_count'"
            ).fetchone()[0]
            self._set(raw, blacklist_version=to_version,
                      blacklist_count=count + max(added, 0) - max(removed, 0))
        log.info(
            "blacklist delta %d -> %d: %d added, %d removed", from_version, to_version,
            len(rows), len(keys),
        )

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _state(raw: sqlite3.Connection) -> tuple[int, str]:
        rows = dict(
            raw.execute(
                "SELECT key, value FROM meta WHERE key IN ('blacklist_version', 'blacklist_active')"
            ).fetchall()
        )
        active = rows["blacklist_active"]
        if active not in BLACKLIST_TABLES:
            raise StoreError(f"meta names an unknown blacklist table {active!r}")
        return int(rows["blacklist_version"]), active

    @staticmethod
    def _other(active: str) -> str:
        return BLACKLIST_TABLES[1] if active == BLACKLIST_TABLES[0] else BLACKLIST_TABLES[0]

    @staticmethod
    def _set(raw: sqlite3.Connection, **values: Any) -> None:
        raw.executemany(
            "UPDATE meta SET value = ? WHERE key = ?", [(v, k) for k, v in values.items()]
        )

    @staticmethod
    def _check_token(raw: sqlite3.Connection, token: str) -> None:
        row = raw.execute("SELECT value FROM meta WHERE key = 'blacklist_staging'").fetchone()
        if row is None or row[0] != token:
            raise StoreError("another blacklist full load took over the staging table")

    def _discard_staging(self, staging: str, token: str) -> None:
        """Best effort after a failed load: empty the staging table to give the space back."""
        try:
            with self._conn.write("blacklist discard staging") as raw:
                row = raw.execute(
                    "SELECT value FROM meta WHERE key = 'blacklist_staging'"
                ).fetchone()
                if row is not None and row[0] == token:
                    raw.execute(f"DELETE FROM {staging}")
                    raw.execute("DELETE FROM meta WHERE key = 'blacklist_staging'")
        except StoreError as exc:  # the next load clears it anyway
            log.warning("could not discard the partial blacklist: %s", exc)
