"""The device database: one SQLite file per device, in WAL mode, holding every store.

The validator writes the journal and reads the blacklist and action list; the edge agent
reads the journal as its outbox and writes configuration. Each process opens its own
:class:`DeviceDatabase` on the same file: WAL lets readers run beside the one writer, and
every write transaction takes the write lock up front and holds it briefly.

Durability: ``journal_mode=WAL``; a durable write (a journal intent, configuration) commits
and then fdatasyncs the WAL before it returns, the guarantee of ``synchronous=FULL``; a journal
*done* commits without a sync of its own and rides on the next one (``synchronous=NORMAL`` for
the connection). ``docs/stores.md`` gives the whole argument.
"""

from __future__ import annotations

import hmac
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firmware.core.keys import JOURNAL_MAC_KEY_NAME, KeyStore
from firmware.durable import fsync_dir

from ._sql import Conn, check_int
from .actions import ActionList
from .blacklist import Blacklist
from .config import ConfigStore
from .errors import DeviceMismatch, InvalidRecord, StoreError, StoreUnavailable, wrap_sqlite_error
from .events import EventLog
from .journal import Journal, MacFunction
from .schema import migrate

__all__ = ["JOURNAL_MAC_KEY_NAME", "DeviceDatabase", "JournalKey", "JournalMac"]


#: What ``journal_key`` accepts: a MAC function, a key store (its ``journal-mac`` key) or a
#: key store and a key name.
JournalKey = MacFunction | KeyStore | tuple[KeyStore, str]

#: Page size of a new device database (an existing one keeps its own: SQLite changes it only
#: by a VACUUM outside WAL mode). Each of a tap's two commits writes its changed pages whole
#: to the WAL (the journal's last leaf, the open intents, the card's counter): with 1 KiB
#: pages a tap writes ~6 KB instead of ~22 KB with 4 KiB ones, a quarter of the flash wear
#: and a shorter fdatasync on the tap path. The cost is a deeper blacklist B-tree: a full
#: load of 1M cards ~15% slower, lookups unchanged (docs/stores.md, docs/benchmarks.md).
PAGE_SIZE = 1024

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: After a checkpoint the WAL file is cut back to this size (a full blacklist load can grow
#: it to tens of megabytes).
WAL_SIZE_LIMIT = 4 * 1024 * 1024


class JournalMac:
    """The journal's MAC key in a key store: records are MACed with its current version, and
    a record verifies under any version the store holds.

    A device keeps its journal across ``afc keys rotate journal-mac``: the records written
    before the rotation (unacknowledged ones, open intents a tap in doubt settles from) carry
    MACs of an older version, and must not read as tampered. Verification tries the current
    version first, so a record of the current key costs what it always did; the older ones,
    newest first, only when that fails. This is the one place that says which version
    verifies a record: ``afc journal`` asks :meth:`version_of`, the device's journal
    (:class:`~firmware.stores.journal.Journal`, which has compared the current MAC already)
    :meth:`older_version_of`.
    """

    __slots__ = ("_older", "_store", "current", "name")

    def __init__(self, store: KeyStore, name: str = JOURNAL_MAC_KEY_NAME) -> None:
        self._store = store
        self.name = name
        self.current = store.current_version(name)  # unknown key name: fail at open
        self._older = tuple(sorted((v for v in store.versions(name) if v != self.current),
                                   reverse=True))

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions tried, in order: the current one, then the older ones newest first."""
        return (self.current, *self._older)

    def __call__(self, data: bytes) -> bytes:
        """The MAC of a new record: the current version."""
        return self._store.cmac(self.name, data)

    def version_of(self, data: bytes, mac: object) -> int | None:
        """The version whose MAC over ``data`` is ``mac``; None if no version held gives it."""
        if not isinstance(mac, bytes):
            return None
        if hmac.compare_digest(self._store.cmac(self.name, data), mac):
            return self.current
        return self.older_version_of(data, mac)

    def older_version_of(self, data: bytes, mac: bytes) -> int | None:
        """:meth:`version_of` for a ``mac`` already known not to be the current version's
        (what a caller that MACed with :meth:`__call__` first asks: nothing computed twice)."""
        for version in self._older:
            expected = self._store.cmac(self.name, data, key_version=version)
            if hmac.compare_digest(expected, mac):
                return version
        return None

    def __repr__(self) -> str:
        return f"<JournalMac {self.name} v{self.current}, older {list(self._older)}>"


def _mac_function(journal_key: JournalKey | None) -> MacFunction | None:
    if journal_key is None:
        return None
    if isinstance(journal_key, KeyStore):
        return JournalMac(journal_key)
    if isinstance(journal_key, tuple):
        store, name = journal_key
        if not isinstance(store, KeyStore):
            raise StoreError("journal_key tuple must be (KeyStore, key name)")
        return JournalMac(store, name)
    if callable(journal_key):
        return journal_key  # one key, whatever computes it (a SAM): verifies under it alone
    raise StoreError("journal_key must be a MAC function, a KeyStore or (KeyStore, name)")


class DeviceDatabase:
    """One device's SQLite database: ``blacklist``, ``actions``, ``journal``, ``config`` and
    ``events`` stores.

    Use :meth:`open`. One handle belongs to one thread (sqlite3's rule); open one per
    process or thread. Closing is idempotent; the handle is a context manager.
    """

    def __init__(self, conn: Conn, path: Path, device_id: str, mac: MacFunction | None) -> None:
        self._conn = conn
        self.path = path
        self.device_id = device_id
        self.blacklist = Blacklist(conn)
        self.actions = ActionList(conn)
        self.journal = Journal(conn, device_id, mac)
        self.config = ConfigStore(conn)
        self.events = EventLog(conn)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        device_id: str,
        journal_key: JournalKey | None = None,
        busy_timeout_ms: int = 2000,
        wal_autocheckpoint: int = 1000,
    ) -> DeviceDatabase:
        """Open (creating and migrating if needed) the database at ``path`` for ``device_id``.

        ``journal_key`` MACs journal records (a function ``bytes -> bytes`` such as a SAM's
        CMAC, a :class:`KeyStore` holding ``journal-mac``, or ``(KeyStore, name)``); without
        one the journal can be read unverified but not written. ``busy_timeout_ms`` is how
        long a write waits for another process's transaction before
        :class:`StoreUnavailable`. ``wal_autocheckpoint`` (pages; 0 disables) lets a
        validator move checkpoints off the tap path and call :meth:`checkpoint` when idle.
        A file created for another device id is refused (:class:`DeviceMismatch`).
        """
        if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
            raise InvalidRecord("device_id must be 1 to 64 characters A-Z, a-z, 0-9, '.', '_', '-'")
        check_int(busy_timeout_ms, "busy_timeout_ms", 0, 600_000)
        check_int(wal_autocheckpoint, "wal_autocheckpoint", 0, 1 << 30)
        mac = _mac_function(journal_key)
        path = Path(path)
        created = not path.exists()
        try:
            raw = sqlite3.connect(
                path, isolation_level=None, timeout=busy_timeout_ms / 1000, cached_statements=256
            )
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, f"open {path}") from exc
        conn = Conn(raw, f"{path}-wal")
        try:
            cls._configure(raw, busy_timeout_ms, wal_autocheckpoint)
            migrate(raw)
            device_id = cls._bind_device(conn, device_id)
        except BaseException:
            conn.close()
            raise
        if created:
            fsync_dir(path.parent)
        return cls(conn, path, device_id, mac)

    @staticmethod
    def _configure(raw: sqlite3.Connection, busy_timeout_ms: int, wal_autocheckpoint: int) -> None:
        try:
            raw.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            raw.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # before WAL; new databases only
            mode = raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"the database cannot use WAL mode (got {mode!r})")
            # NORMAL: commits are not synced by SQLite; Conn.write syncs the WAL itself after
            # the commits that must be durable (docs/stores.md, durability argument).
            raw.execute("PRAGMA synchronous = NORMAL")
            raw.execute("PRAGMA foreign_keys = ON")
            # Deleted journal rows (card numbers, trips) are zeroed where that costs no extra
            # I/O; freed pages of an old blacklist are not rewritten.
            raw.execute("PRAGMA secure_delete = FAST")
            raw.execute(f"PRAGMA wal_autocheckpoint = {wal_autocheckpoint}")
            raw.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            raw.execute("PRAGMA trusted_schema = OFF")
        except sqlite3.Error as exc:
            raise wrap_sqlite_error(exc, "configure database") from exc

    @staticmethod
    def _bind_device(conn: Conn, device_id: str) -> str:
        owner = conn.one("SELECT value FROM meta WHERE key = 'device_id'", what="device id")
        if owner is None:
            with conn.write("bind device id") as raw:
                raw.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('device_id', ?)", (device_id,)
                )
                owner = raw.execute("SELECT value FROM meta WHERE key = 'device_id'").fetchone()[0]
        if owner != device_id:
            raise DeviceMismatch(f"this database belongs to device {owner!r}, not {device_id!r}")
        return device_id

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent). The WAL is checkpointed if no one else has it open."""
        self._conn.close()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def __enter__(self) -> DeviceDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<DeviceDatabase {str(self.path)!r} device {self.device_id!r} {state}>"

    @contextmanager
    def deferred_sync(self) -> Iterator[DeviceDatabase]:
        """Durable writes inside the block are synced once, at its end, not one by one.

        For bulk loads (test rigs, benchmarks, imports of a journal) where nothing outside
        acts on a single record before the whole load is done: a power cut inside the block
        may lose any of its records, never one written before it. Never on the tap path:
        a card must not be written on the strength of an intent that is not yet synced.
        """
        conn = self._conn
        saved, conn.wal_path = conn.wal_path, None
        try:
            yield self
        finally:
            conn.wal_path = saved
            if not conn.closed:
                conn.sync_wal("deferred sync")

    # -- inspection and upkeep --------------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """The raw connection, for inspection (sqlite-utils, the CLI) and fault injection in
        tests. Writing through it bypasses the MACs and invariants of the stores."""
        return self._conn.raw

    @property
    def schema_version(self) -> int:
        return int(self._conn.one("PRAGMA user_version"))

    def pragmas(self) -> dict[str, Any]:
        """The settings durability depends on, as SQLite reports them."""
        names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "secure_delete")
        return {n: self._conn.one(f"PRAGMA {n}", what="pragmas") for n in names}

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Run a WAL checkpoint (``PASSIVE``, ``FULL``, ``RESTART`` or ``TRUNCATE``).

        Returns SQLite's (busy, WAL frames, frames checkpointed). A validator that turned
        automatic checkpoints off calls this between taps.
        """
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise InvalidRecord(f"unknown checkpoint mode {mode!r}")
        row = self._conn.execute(f"PRAGMA wal_checkpoint({mode})", what="checkpoint").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def storage_stats(self) -> dict[str, int]:
        """Sizes for wear and space accounting: pages of the main file and the WAL's bytes.

        Bytes written per tap are measured as the growth of ``wal_bytes`` over many taps
        with automatic checkpoints off (see ``docs/stores.md``).
        """
        stats = {
            n: int(self._conn.one(f"PRAGMA {n}", what="storage stats"))
            for n in ("page_size", "page_count", "freelist_count")
        }
        wal = Path(f"{self.path}-wal")
        stats["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
        return stats
