"""The device database's schema and its migrations, keyed by ``PRAGMA user_version``.

``MIGRATIONS[i]`` takes a database at schema version ``i`` to ``i + 1``. :func:`migrate` runs
the missing ones in one ``BEGIN IMMEDIATE`` transaction together with the new
``user_version``, so a power cut mid-migration leaves the old schema, and two processes
opening a new file at once migrate it once (the second sees the new version under the
lock). A file from newer software is refused rather than guessed at.

Migrations are written against sqlite-utils (table creation, indexes, and ``transform`` for
later column changes); statements it cannot express (``WITHOUT ROWID``, partial indexes,
views) go through its ``execute``. sqlite-utils is imported only when a migration runs, so
the validator's start-up and hot paths use the standard library alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StoreError, wrap_sqlite_error

if TYPE_CHECKING:
    import sqlite_utils

__all__ = [
    "BLACKLIST_TABLES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "blacklist_table_sql",
    "blacklist_view_sql",
    "migrate",
]

#: The two physical tables of full blacklists: one is the base list in force (behind the
#: ``blacklist`` view, with the ``blacklist_delta`` overlay), the other is where the next
#: full list is built.
BLACKLIST_TABLES = ("blacklist_a", "blacklist_b")


def blacklist_table_sql(name: str) -> str:
    """DDL of one physical blacklist table and its UID index."""
    return f"""
        CREATE TABLE {name} (
            card_number INTEGER PRIMARY KEY,
            uid BLOB CHECK (uid IS NULL OR length(uid) IN (4, 7, 10)),
            reason INTEGER NOT NULL CHECK (reason BETWEEN 0 AND 65535),
            version INTEGER NOT NULL
        ) WITHOUT ROWID, STRICT;
        CREATE INDEX {name}_uid ON {name} (uid) WHERE uid IS NOT NULL;
    """


def blacklist_view_sql(base: str) -> str:
    """The ``blacklist`` view: the delta overlay first, then the base list it does not hide.

    A lookup through it is two primary-key seeks (three when the card is in the base list);
    SQLite pushes ``card_number = ?`` and ``uid = ?`` into both arms of the ``UNION ALL``.
    """
    return (
        "CREATE VIEW blacklist AS "
        "SELECT card_number, uid, reason, version FROM blacklist_delta WHERE removed = 0 "
        "UNION ALL "
        f"SELECT card_number, uid, reason, version FROM {base} AS b WHERE NOT EXISTS "
        "(SELECT 1 FROM blacklist_delta AS d WHERE d.card_number = b.card_number)"
    )


def _v1(db: sqlite_utils.Database) -> None:
    """The first schema: meta, blacklist, action list, journal, open intents, counters."""
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID, STRICT")
    for name in BLACKLIST_TABLES:
        for statement in blacklist_table_sql(name).split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute(
        "CREATE VIEW blacklist AS "
        f"SELECT card_number, uid, reason, version FROM {BLACKLIST_TABLES[0]}"
    )
    db.execute(
        """
        CREATE TABLE actions (
            action_id TEXT PRIMARY KEY,
            card_number INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('topup', 'pass')),
            amount INTEGER,
            product_id INTEGER,
            valid_until INTEGER NOT NULL,
            version INTEGER NOT NULL,
            listed INTEGER NOT NULL DEFAULT 1,
            applied_seq INTEGER,
            reported INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID, STRICT
        """
    )
    db.execute("CREATE INDEX actions_pending ON actions (card_number) WHERE applied_seq IS NULL")
    db.execute(
        "CREATE INDEX actions_unreported ON actions (applied_seq) "
        "WHERE applied_seq IS NOT NULL AND reported = 0"
    )
    db.create_table(
        "journal",
        {
            "seq": int,
            "phase": str,
            "kind": str,
            "link": int,
            "time": int,
            "card_number": int,
            "uid": bytes,
            "counter_before": int,
            "counter_after": int,
            "balance_before": int,
            "balance_after": int,
            "fare": int,
            "product": int,
            "line": str,
            "vehicle": str,
            "validator_id": str,
            "outcome": str,
            "reason": int,
            "action_id": str,
            "mac": bytes,
        },
        pk="seq",
        not_null=["phase", "kind", "time", "mac"],
        strict=True,
    )
    db.create_table(
        "open_intent",
        {"seq": int},
        pk="seq",
        foreign_keys=[("seq", "journal", "seq")],
        strict=True,
    )
    db.execute(
        """
        CREATE TABLE card_counters (
            card_number INTEGER PRIMARY KEY,
            counter INTEGER NOT NULL,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID, STRICT
        """
    )
    db["meta"].insert_all(
        [
            {"key": "blacklist_version", "value": 0},
            {"key": "blacklist_count", "value": 0},
            {"key": "blacklist_active", "value": BLACKLIST_TABLES[0]},
            {"key": "actions_version", "value": 0},
            {"key": "journal_acked", "value": 0},
            {"key": "journal_floor", "value": 0},
        ]
    )


def _v2(db: sqlite_utils.Database) -> None:
    """The blacklist delta overlay: deltas stop rewriting the million-entry base table.

    The view is rebuilt over whichever base table is in force; the base keeps every entry
    applied so far (deltas of schema 1 went into it directly), the overlay starts empty.
    """
    db.execute(
        """
        CREATE TABLE blacklist_delta (
            card_number INTEGER PRIMARY KEY,
            uid BLOB CHECK (uid IS NULL OR length(uid) IN (4, 7, 10)),
            reason INTEGER NOT NULL CHECK (reason BETWEEN 0 AND 65535),
            version INTEGER NOT NULL,
            removed INTEGER NOT NULL CHECK (removed IN (0, 1)),
            in_base INTEGER NOT NULL CHECK (in_base IN (0, 1))
        ) WITHOUT ROWID, STRICT
        """
    )
    db.execute(
        "CREATE INDEX blacklist_delta_uid ON blacklist_delta (uid) "
        "WHERE uid IS NOT NULL AND removed = 0"
    )
    active = db.execute("SELECT value FROM meta WHERE key = 'blacklist_active'").fetchone()[0]
    if active not in BLACKLIST_TABLES:
        raise StoreError(f"meta names an unknown blacklist table {active!r}")
    db.execute("DROP VIEW blacklist")
    db.execute(blacklist_view_sql(active))


def _v3(db: sqlite_utils.Database) -> None:
    """Actions carry the center's per-card action number, which the card records when it
    receives a load: a load listed on several devices reaches the card once."""
    db.execute(
        "ALTER TABLE actions ADD COLUMN card_seq INTEGER "
        "CHECK (card_seq IS NULL OR card_seq BETWEEN 1 AND 65535)"
    )


def _v4(db: sqlite_utils.Database) -> None:
    """Running totals kept in the journal's transactions (a dealer's credit used, loads per
    day), so pruning acknowledged records does not reset them."""
    db.execute(
        "CREATE TABLE tallies (name TEXT PRIMARY KEY, total INTEGER NOT NULL) "
        "WITHOUT ROWID, STRICT"
    )


def _v5(db: sqlite_utils.Database) -> None:
    """What the edge agent keeps on the device, beside the journal it forwards.

    ``config``: the applied signed bundles that have no store of their own (fare table,
    dealer credit, agent settings), one row per kind, replaced whole. ``events``: alarms
    and events the applications raise and the agent forwards then deletes; ``seq`` is the
    per-device event number the center uses to see gaps (``meta.event_seq`` keeps it
    growing when every row was forwarded). ``device_status``: small facts the
    applications report for telemetry (reader state). ``agent_state``: the agent's durable
    counters (the last command nonce accepted: replay protection survives a restart).
    """
    db.execute(
        """
        CREATE TABLE config (
            kind TEXT PRIMARY KEY,
            version INTEGER NOT NULL CHECK (version >= 1),
            body BLOB NOT NULL,
            applied INTEGER NOT NULL
        ) WITHOUT ROWID, STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            time INTEGER NOT NULL,
            event TEXT NOT NULL,
            severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'alarm')),
            detail TEXT NOT NULL
        ) STRICT
        """
    )
    db.execute("CREATE INDEX events_severity ON events (severity, seq)")
    db.execute(
        "CREATE TABLE device_status (name TEXT PRIMARY KEY, value ANY, time INTEGER NOT NULL) "
        "WITHOUT ROWID, STRICT"
    )
    db.execute(
        "CREATE TABLE agent_state (key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID, STRICT"
    )
    db.execute("INSERT INTO meta (key, value) VALUES ('event_seq', 0)")


Migration = Callable[["sqlite_utils.Database"], None]

#: ``MIGRATIONS[i]`` migrates schema version ``i`` to ``i + 1``. Append, never edit.
MIGRATIONS: list[Migration] = [_v1, _v2, _v3, _v4, _v5]
SCHEMA_VERSION = len(MIGRATIONS)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the latest schema (:data:`SCHEMA_VERSION`); returns the version
    it was at before.

    ``conn`` must be in autocommit mode (``isolation_level=None``) with no open transaction.
    """
    target = len(MIGRATIONS)
    try:
        before = _user_version(conn)
        if before == target:
            return before
        _refuse_newer(before, target)
        import sqlite_utils

        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = _user_version(conn)  # another process may have migrated meanwhile
            _refuse_newer(before, target)
            for version in range(before, target):
                MIGRATIONS[version](db)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return before
    except sqlite3.Error as exc:
        raise wrap_sqlite_error(exc, "schema migration") from exc


def _refuse_newer(version: int, target: int) -> None:
    if version > target:
        raise StoreError(
            f"the database has schema version {version}, newer than this software's "
            f"{target}: refusing to use it"
        )
