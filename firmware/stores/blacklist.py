"""The blacklist (hotlist): cards refused at the door, by card number and optionally by UID.

Two layers behind the ``blacklist`` view: a *base* list (the last full list) and a small
*delta overlay* (``blacklist_delta``: cards added or removed by deltas since). A delta only
writes the overlay, so applying one costs pages in proportion to the delta, not to the
million-entry list (a delta written into the base table would dirty nearly every leaf page:
~25 MB of WAL per delta, and flash wear to match). The next full list resets the overlay.

A full list is built in the other base table in short transactions (so the validator's
journal writes never wait long for the write lock) and made current by one small
transaction that points the view at it, empties the overlay and sets the version: readers
see the old list or the new one, never half of either. A failure while building (the
iterator raises, the disk fills) leaves the list in force untouched.

Lookups are one prepared statement: primary-key seeks on ``WITHOUT ROWID`` tables (the UID
through partial indexes), in autocommit mode: no lock held, no network.
"""

from __future__ import annotations

import json
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
from .schema import BLACKLIST_TABLES, blacklist_view_sql

__all__ = ["Blacklist", "BlacklistEntry"]

log = logging.getLogger("afc.stores.blacklist")

_UID_SIZES = (4, 7, 10)
_LOOKUP = "SELECT uid, reason, version FROM blacklist WHERE card_number = ?"
_LOOKUP_UID = (
    "SELECT card_number, uid, reason, version FROM blacklist WHERE uid = ? "
    "ORDER BY card_number LIMIT 1"
)
#: Rows per transaction while a full list is built: the longest the validator's journal
#: writes wait for the lock during a load (about 0.1 s here), against one fsync per chunk.
DEFAULT_CHUNK = 50_000
#: Page cache (KiB) of the loading connection while it builds a full list: a chunk's new
#: pages stay in memory until its commit instead of spilling to the WAL mid-transaction.
_LOAD_CACHE_KIB = 16 * 1024
#: Rows per INSERT statement while a full list is built.
_ROWS_PER_INSERT = 100
#: Sum of the overlay's effect on the count for the given keys: +1 for a card the overlay
#: adds that the base lacks, -1 for a base card the overlay removes.
_OVERLAY_EFFECT = (
    "SELECT coalesce(sum(CASE WHEN removed = 0 AND in_base = 0 THEN 1 "
    "WHEN removed = 1 AND in_base = 1 THEN -1 ELSE 0 END), 0) "
    "FROM blacklist_delta WHERE card_number IN (SELECT value FROM json_each(?))"
)


class BlacklistEntry(NamedTuple):
    """A blacklisted card: its number (u64), reason code, UID if known, list version."""

    card_number: int
    reason: int = 0
    uid: bytes | None = None
    version: int = 0


def _check_entries(chunk: list[Any]) -> list[int | bytes | None]:
    """Validate entries one by one: the slow path, which names the first bad entry."""
    out: list[int | bytes | None] = []
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
        out.extend((number - U64 if number >= U63 else number, uid, reason))
    return out


def _flat_rows(chunk: list[Any]) -> list[int | bytes | None]:
    """Validate entries and flatten them to ``[key, uid, reason, key, uid, reason, ...]``.

    Keys are mapped to signed 64 bits. This loop runs a million times per full list, so it
    is kept tight for the common case, a 3-tuple with a card number below 2**63; anything
    else goes to :func:`_check_entries`, which also names the first bad entry. The flat
    form feeds multi-row INSERTs (a third less time per row than one statement per row).
    """
    out: list[int | bytes | None] = []
    extend = out.extend
    try:
        for number, reason, uid in chunk:
            if (
                type(number) is not int
                or type(reason) is not int
                or not 0 <= number < U63
                or not 0 <= reason <= 0xFFFF
                or (uid is not None and (type(uid) is not bytes or len(uid) not in _UID_SIZES))
            ):
                return _check_entries(chunk)
            extend((number, uid, reason))
    except (TypeError, ValueError):  # not a 3-item entry
        return _check_entries(chunk)
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
    def base_version(self) -> int | None:
        """The version of the last full list loaded, which the deltas since build on; None
        when not known (no full list yet, or loaded before this was recorded)."""
        value = self._meta("blacklist_base")
        return None if value is None else int(value)

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
        cache = self._conn.one("PRAGMA cache_size", what="blacklist full load")
        self._conn.execute(f"PRAGMA cache_size = -{_LOAD_CACHE_KIB}", what="blacklist full load")
        try:
            return self._load_full(version, entries, chunk_size)
        finally:
            if not self._conn.closed:
                self._conn.execute(f"PRAGMA cache_size = {int(cache)}", what="blacklist")

    def _load_full(self, version: int, entries: Iterable[Any], chunk_size: int) -> int:
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
        one_row = f"(?, ?, ?, {version})"  # version: a checked int, safe to inline
        insert_many = f"INSERT OR REPLACE INTO {staging} VALUES " + ", ".join(
            [one_row] * _ROWS_PER_INSERT
        )
        insert_one = f"INSERT OR REPLACE INTO {staging} VALUES {one_row}"
        width = 3 * _ROWS_PER_INSERT
        try:
            for batch in _batches(entries, chunk_size):
                flat = _flat_rows(batch)  # validated outside the lock
                whole = len(flat) - len(flat) % width
                with self._conn.write("blacklist full load") as raw:
                    self._check_token(raw, token)
                    raw.executemany(
                        insert_many, [flat[i : i + width] for i in range(0, whole, width)]
                    )
                    raw.executemany(
                        insert_one, [flat[i : i + 3] for i in range(whole, len(flat), 3)]
                    )
            with self._conn.write("blacklist full load (index)") as raw:
                self._check_token(raw, token)
                raw.execute(f"CREATE INDEX {staging}_uid ON {staging} (uid) WHERE uid IS NOT NULL")
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
                raw.execute(blacklist_view_sql(staging))
                raw.execute("DELETE FROM blacklist_delta")
                self._set(
                    raw,
                    blacklist_version=version,
                    blacklist_count=count,
                    blacklist_active=staging,
                )
                raw.execute("DELETE FROM meta WHERE key = 'blacklist_staging'")
                raw.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('blacklist_base', ?)",
                    (version,),
                )
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
        Writes the overlay only (see the module doc).
        """
        check_int(from_version, "from_version", 0)
        check_int(to_version, "to_version", 1)
        flat = _flat_rows(list(add))
        adds = [(*flat[i : i + 3], to_version) for i in range(0, len(flat), 3)]
        removes = [(to_sql_u64(check_u64(n, "removed card number")), to_version) for n in remove]
        touched = json.dumps([r[0] for r in removes] + [r[0] for r in adds])
        with self._conn.write("blacklist delta") as raw:
            current, base = self._state(raw)
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
            before = raw.execute(_OVERLAY_EFFECT, (touched,)).fetchone()[0]
            in_base = f"EXISTS (SELECT 1 FROM {base} WHERE card_number = ?1)"
            # A removed card the base lacks needs no tombstone: dropping its overlay row is
            # enough. One the base has gets a tombstone.
            raw.executemany(
                "DELETE FROM blacklist_delta WHERE card_number = ?1", [r[:1] for r in removes]
            )
            raw.executemany(
                f"INSERT INTO blacklist_delta SELECT ?1, NULL, 0, ?2, 1, 1 WHERE {in_base}",
                removes,
            )
            raw.executemany(
                f"INSERT OR REPLACE INTO blacklist_delta VALUES (?1, ?2, ?3, ?4, 0, {in_base})",
                adds,
            )
            after = raw.execute(_OVERLAY_EFFECT, (touched,)).fetchone()[0]
            count = raw.execute("SELECT value FROM meta WHERE key = 'blacklist_count'").fetchone()[
                0
            ]
            self._set(raw, blacklist_version=to_version, blacklist_count=count + after - before)
        log.info(
            "blacklist delta %d -> %d: %d added, %d removed",
            from_version,
            to_version,
            len(adds),
            len(removes),
        )

    @property
    def overlay_size(self) -> int:
        """Entries in the delta overlay (adds and tombstones since the last full list).

        Lookups stay fast however large it grows; the agent may ask the center for a full
        list when it gets large, to give the space back.
        """
        return int(self._conn.one("SELECT count(*) FROM blacklist_delta", what="blacklist"))

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
