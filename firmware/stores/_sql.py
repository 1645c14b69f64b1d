"""Plumbing shared by the stores: one connection, explicit transactions, mapped errors.

The connection runs in SQLite's autocommit mode (``isolation_level=None``) and every write
goes through :meth:`Conn.write` (or :meth:`Conn.write_lazy`), which takes the write lock up
front (``BEGIN IMMEDIATE``).
Taking it up front matters in WAL mode: a deferred transaction that reads first and writes
later can fail with ``SQLITE_BUSY`` on the upgrade without the busy handler ever waiting,
whereas ``BEGIN IMMEDIATE`` waits up to the busy timeout and then fails cleanly, before
anything was done.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .errors import InvalidRecord, StoreError, StoreUnavailable, wrap_sqlite_error

U63 = 1 << 63
U64 = 1 << 64


def to_sql_u64(value: int) -> int:
    """A u64 (card number) as SQLite's signed 64-bit INTEGER: two's complement.

    Only equality lookups use these keys, so the changed order of values >= 2**63 does not
    matter; :func:`from_sql_u64` undoes it.
    """
    return value - U64 if value >= U63 else value


def from_sql_u64(value: int) -> int:
    """Undo :func:`to_sql_u64`."""
    return value + U64 if value < 0 else value


def check_u64(value: object, what: str) -> int:
    """``value`` as a u64 or :class:`~firmware.stores.errors.InvalidRecord`."""
    if type(value) is not int or not 0 <= value < U64:
        raise InvalidRecord(f"{what} must be an integer in 0..2**64-1, got {value!r}")
    return value


def check_int(value: object, what: str, lo: int = -U63, hi: int = U63 - 1) -> int:
    """``value`` as an int in ``lo..hi`` or :class:`~firmware.stores.errors.InvalidRecord`."""
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidRecord(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class Conn:
    """The database connection as the stores use it: closed-checks and error mapping."""

    def __init__(
        self, raw: sqlite3.Connection, wal_path: str | os.PathLike[str] | None = None
    ) -> None:
        self.raw = raw
        self.closed = False
        #: The WAL file :meth:`write` syncs; None for a database that is not a WAL file on disk.
        self.wal_path = None if wal_path is None else os.fspath(wal_path)
        self._wal_fd = -1  # opened at the first sync, kept while the connection is open

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_wal_fd()
            self.raw.close()

    def _drop_wal_fd(self) -> None:
        fd, self._wal_fd = self._wal_fd, -1
        if fd >= 0:
            os.close(fd)

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError("the device database is closed")

    def execute(self, sql: str, params: Any = (), what: str = "query") -> sqlite3.Cursor:
        """Run one statement outside an explicit transaction, errors mapped."""
        self._check_open()
        try:
            return self.raw.execute(sql, params)
        except (sqlite3.Error, OverflowError) as exc:
            raise wrap_sqlite_error(exc, what) from exc

    def one(self, sql: str, params: Any = (), what: str = "query") -> Any:
        """The first column of the first row, or None."""
        row = self.execute(sql, params, what).fetchone()
        return None if row is None else row[0]

    @contextmanager
    def write_lazy(self, what: str) -> Iterator[sqlite3.Connection]:
        """A write transaction whose commit is not fsynced on return: it becomes durable with
        the next :meth:`write`, whose fsync of the WAL covers every frame before it, or at
        the next checkpoint. Only for records whose loss in a power cut is recovered from
        elsewhere (a journal *done*: the open intent is settled from the card's counter)."""
        with self._transaction(what) as raw:
            yield raw

    @contextmanager
    def write(self, what: str) -> Iterator[sqlite3.Connection]:
        """A durable write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, then the WAL
        fsynced (``fdatasync``), rolled back on any error.

        Durable on return. The connection runs ``synchronous=NORMAL`` and this method syncs
        the WAL itself after ``COMMIT``: the same guarantee as ``synchronous=FULL`` for these
        commits (``docs/stores.md``, durability argument), without FULL's cost on the commits
        that do not need it (:meth:`write_lazy`). sqlite3 errors (inside the block or at
        commit) come out as :class:`StoreError` subclasses, a failed fsync as
        :class:`StoreUnavailable`; other exceptions (a caller's iterator failing, a
        :class:`StoreError` raised on purpose) pass through unchanged, after the rollback.
        """
        with self._transaction(what) as raw:
            yield raw
        self.sync_wal(what)

    def sync_wal(self, what: str = "sync") -> None:
        """fdatasync the WAL file: every transaction committed so far is on stable storage.

        A sync of any descriptor of a file flushes that file's written pages, so a read-only
        descriptor is enough. It is opened at the first sync and kept: SQLite deletes the
        WAL only when the last connection closes, and this connection is open, so the file
        stays the same one. (Should it ever have been unlinked after all, its link count is
        0 and a fresh descriptor is opened; ``fstat`` costs no path lookup.) No WAL file
        after a commit in WAL mode means the commit cannot be vouched for:
        :class:`StoreUnavailable`.
        """
        if self.wal_path is None:
            return
        try:
            fd = self._wal_fd
            if fd < 0 or os.fstat(fd).st_nlink == 0:
                self._drop_wal_fd()
                fd = self._wal_fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
            os.fdatasync(fd)
        except OSError as exc:
            self._drop_wal_fd()  # the next sync starts from the path again
            raise StoreUnavailable(
                f"{what}: the write-ahead log could not be synced to storage ({exc.strerror}); "
                "check the storage medium"
            ) from exc

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        self._check_open()
        raw = self.raw
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, what) from exc
        try:
            yield raw
            raw.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, (sqlite3.Error, OverflowError)):
                raise wrap_sqlite_error(exc, what) from exc
            raise

    @contextmanager
    def snapshot(self, what: str) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one consistent state of the database."""
        self._check_open()
        raw = self.raw
        try:
            raw.execute("BEGIN")
            yield raw
        except (sqlite3.Error, OverflowError) as exc:
            self._rollback()
            raise wrap_sqlite_error(exc, what) from exc
        except BaseException:
            self._rollback()
            raise
        else:
            self._rollback()  # nothing was written; ending a read transaction

    def _rollback(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL can end the whole transaction);
        # a failing ROLLBACK must not hide the error that brought us here.
        if self.raw.in_transaction:
            with suppress(sqlite3.Error):
                self.raw.execute("ROLLBACK")
