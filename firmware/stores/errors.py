"""The stores package's one exception hierarchy.

Every failure of the device database surfaces as a :class:`StoreError`, which derives from the
core's :class:`~firmware.core.errors.CoreError` so that a validator loop catches one type for
"this tap failed cleanly". The subclasses say what the caller should do next: go out of
service and retry (:class:`StoreUnavailable`), ask the center for a full list
(:class:`DeltaChainBroken`), ignore an old bundle (:class:`StaleVersion`), raise an alarm
(:class:`StoreCorrupt`, :class:`JournalTampered`) or reject bad input (:class:`InvalidRecord`).

Raw :mod:`sqlite3` exceptions never leave the package: :func:`wrap_sqlite_error` maps them by
SQLite's result code, so a test can provoke a condition (a full disk through
``PRAGMA max_page_count``, a lock held by another connection) and expect the class here.
"""

from __future__ import annotations

import sqlite3

from firmware.core.errors import CoreError

__all__ = [
    "ActionAlreadyApplied",
    "DeltaChainBroken",
    "DeviceMismatch",
    "InvalidRecord",
    "JournalTampered",
    "NotFound",
    "StaleVersion",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "wrap_sqlite_error",
]


class StoreError(CoreError):
    """Base of every error raised by :mod:`firmware.stores`."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now: disk full, read-only, I/O error, locked too long.

    The validator goes out of service and retries later; nothing was written (the failed
    transaction was rolled back). ``code`` is SQLite's result-code name when one caused it.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreCorrupt(StoreError):
    """The database file is damaged or is not a database: a technician has to look at it."""


class StaleVersion(StoreError):
    """A configuration version not newer than the one in force was offered; it is ignored."""

    def __init__(self, message: str, current: int, offered: int) -> None:
        super().__init__(message)
        self.current = current
        self.offered = offered


class DeltaChainBroken(StoreError):
    """A delta does not start from the version in force: the agent must request a full list."""

    def __init__(self, message: str, current: int, from_version: int) -> None:
        super().__init__(message)
        self.current = current
        self.from_version = from_version


class InvalidRecord(StoreError):
    """Input that cannot be stored: a wrong type, a value out of range, a malformed field."""


class NotFound(StoreError):
    """The record named does not exist (an unknown action, an intent that is not open)."""


class ActionAlreadyApplied(StoreError):
    """An action was already applied to its card: applying it again would load it twice."""


class JournalTampered(StoreError):
    """Journal records whose MAC does not verify: changed outside this API, or a wrong key.

    ``seqs`` lists the sequence numbers of the bad records.
    """

    def __init__(self, message: str, seqs: list[int]) -> None:
        super().__init__(message)
        self.seqs = seqs


class DeviceMismatch(StoreError):
    """The database file belongs to another device id than the one it was opened for."""


# SQLite primary result codes (https://sqlite.org/rescode.html).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_NOMEM = 7
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_PROTOCOL = 15
_SQLITE_TOOBIG = 18
_SQLITE_CONSTRAINT = 19
_SQLITE_MISMATCH = 20
_SQLITE_RANGE = 25
_SQLITE_NOTADB = 26

_UNAVAILABLE = {
    _SQLITE_BUSY,
    _SQLITE_LOCKED,
    _SQLITE_NOMEM,
    _SQLITE_READONLY,
    _SQLITE_IOERR,
    _SQLITE_FULL,
    _SQLITE_CANTOPEN,
    _SQLITE_PROTOCOL,
}
_CORRUPT = {_SQLITE_CORRUPT, _SQLITE_NOTADB}
_INVALID = {_SQLITE_TOOBIG, _SQLITE_CONSTRAINT, _SQLITE_MISMATCH, _SQLITE_RANGE}


def wrap_sqlite_error(exc: BaseException, what: str) -> StoreError:
    """The :class:`StoreError` that stands for ``exc`` (a sqlite3 error or a binding error).

    ``what`` says which operation failed. SQLite's messages never contain bound values, so
    the result is safe to log: no card data or key material ends up in it.
    """
    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = f"{what}: {exc}" + (f" ({name})" if name else "")
    if primary in _UNAVAILABLE:
        return StoreUnavailable(detail, name)
    if primary in _CORRUPT:
        return StoreCorrupt(detail)
    if primary in _INVALID or isinstance(
        exc, (sqlite3.IntegrityError, sqlite3.InterfaceError, OverflowError)
    ):
        return InvalidRecord(detail)
    return StoreError(detail)
