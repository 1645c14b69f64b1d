"""Applied configuration bundles without a store of their own, and the agent's durable state.

The edge agent receives signed bundles from the center (``docs/protocol.md``). The blacklist
and the action list have their own versioned stores; the others (the fare table, a dealer's
credit allowance, the agent's own settings) are kept here whole, one row per kind: the
version in force, the body as applied and when it was applied. A bundle replaces its row in
one transaction and only with a newer version (:class:`StaleVersion` otherwise), so a
rolled-back or replayed bundle never takes effect, and a reader sees the old body or the new
one.

The applications read what they need from here (:meth:`ConfigStore.fare_table`,
:meth:`ConfigStore.get` for ``credit``). The agent also keeps small durable counters here
(:meth:`ConfigStore.advance`): the last command nonce it accepted must survive a restart, or
a recorded command could be replayed after a reboot.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, NamedTuple

from ._sql import Conn, check_int
from .errors import InvalidRecord, StaleVersion, StoreCorrupt

if TYPE_CHECKING:
    from firmware.core.fares import FareTable

__all__ = ["KIND_AGENT", "KIND_CREDIT", "KIND_FARES", "ConfigEntry", "ConfigStore"]

log = logging.getLogger("afc.stores.config")

KIND_FARES = "fares"
KIND_CREDIT = "credit"
KIND_AGENT = "agent"

_KIND_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_KEY_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
#: A body larger than this is not a configuration bundle (the blacklist has its own store).
MAX_BODY_BYTES = 16 << 20


class ConfigEntry(NamedTuple):
    """One applied bundle: its kind, version, body as applied and when (Unix ms)."""

    kind: str
    version: int
    body: bytes
    applied: int


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise InvalidRecord(
            f"a configuration kind must be a token of 1 to 32 characters a-z, 0-9, '-', "
            f"got {kind!r}"
        )
    return kind


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidRecord(f"an agent state key must be a short lowercase name, got {key!r}")
    return key


def _parse_fares(body: bytes) -> FareTable:
    from firmware.core.fares import FareTable, FareTableError

    try:
        return FareTable.from_toml(body)
    except FareTableError as exc:
        raise InvalidRecord(f"the fare table does not load: {exc}") from None


class ConfigStore:
    """The applied bundles of one device database; reached as ``DeviceDatabase.config``."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    # -- bundles ----------------------------------------------------------------------------

    def put(self, kind: str, version: int, body: bytes, *, applied: int | None = None) -> None:
        """Make ``body`` the ``kind`` configuration in force, as ``version``; atomic.

        Refuses (:class:`StaleVersion`) a version not newer than the one in force, so a
        rollback or a replayed bundle changes nothing. A ``fares`` body must be a tariff
        that loads (checked before the write): the validator must never find a table in
        force that it cannot parse. ``applied`` defaults to the wall clock (Unix ms).
        """
        _check_kind(kind)
        check_int(version, "version", 1)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise InvalidRecord(f"a {kind} configuration body must be bytes")
        body = bytes(body)
        if len(body) > MAX_BODY_BYTES:
            raise InvalidRecord(
                f"a {kind} configuration body of {len(body)} bytes exceeds {MAX_BODY_BYTES}"
            )
        if kind == KIND_FARES:
            _parse_fares(body)
        when = int(time.time() * 1000) if applied is None else check_int(applied, "applied")
        with self._conn.write(f"config {kind}") as raw:
            row = raw.execute("SELECT version FROM config WHERE kind = ?", (kind,)).fetchone()
            current = 0 if row is None else int(row[0])
            if version <= current:
                raise StaleVersion(
                    f"{kind} configuration version {version} is not newer than {current}",
                    current,
                    version,
                )
            raw.execute(
                "INSERT OR REPLACE INTO config (kind, version, body, applied) VALUES (?, ?, ?, ?)",
                (kind, version, body, when),
            )
        log.info("%s configuration version %d applied (%d bytes)", kind, version, len(body))

    def get(self, kind: str) -> ConfigEntry | None:
        """The ``kind`` configuration in force, or None if none was ever applied."""
        _check_kind(kind)
        row = self._conn.execute(
            "SELECT kind, version, body, applied FROM config WHERE kind = ?", (kind,), "config get"
        ).fetchone()
        return None if row is None else ConfigEntry(row[0], int(row[1]), bytes(row[2]), row[3])

    def version(self, kind: str) -> int:
        """The version of the ``kind`` configuration in force; 0 before the first one."""
        _check_kind(kind)
        value = self._conn.one(
            "SELECT version FROM config WHERE kind = ?", (kind,), "config version"
        )
        return 0 if value is None else int(value)

    def versions(self) -> dict[str, int]:
        """Every kind held here and its version (for telemetry and the agent's log)."""
        rows = self._conn.execute(
            "SELECT kind, version FROM config ORDER BY kind", what="config versions"
        ).fetchall()
        return {k: int(v) for k, v in rows}

    def fare_table(self) -> FareTable | None:
        """The fare table in force, parsed, or None if the center has not sent one yet.

        A stored table that no longer parses (changed behind this API, or by software that
        validated differently) is :class:`StoreCorrupt`: the validator must go out of
        service rather than guess fares.
        """
        entry = self.get(KIND_FARES)
        if entry is None:
            return None
        try:
            return _parse_fares(entry.body)
        except InvalidRecord as exc:
            raise StoreCorrupt(
                f"the stored fare table version {entry.version} does not load: {exc}"
            ) from None

    # -- the agent's durable counters ---------------------------------------------------------

    def state(self, key: str) -> int | str | bytes | float | None:
        """A value the agent keeps across restarts, or None."""
        _check_key(key)
        return self._conn.one(
            "SELECT value FROM agent_state WHERE key = ?", (key,), "agent state"
        )

    def set_state(self, key: str, value: int | str | bytes | float | None) -> None:
        """Store a value the agent keeps across restarts (durable on return)."""
        _check_key(key)
        if value is not None and not isinstance(value, int | str | bytes | float):
            raise InvalidRecord(f"agent state {key!r} must be a number, text or bytes")
        with self._conn.write("agent state") as raw:
            raw.execute(
                "INSERT OR REPLACE INTO agent_state (key, value) VALUES (?, ?)", (key, value)
            )

    def advance(self, key: str, value: int) -> bool:
        """Set counter ``key`` to ``value`` if that is greater than the stored one.

        Returns whether it advanced: the compare and the write are one transaction, so
        two commands with the same nonce, even from two processes, pass at most once.
        Durable on return.
        """
        _check_key(key)
        check_int(value, key, 0)
        with self._conn.write("agent counter") as raw:
            row = raw.execute("SELECT value FROM agent_state WHERE key = ?", (key,)).fetchone()
            current = row[0] if row is not None else None
            if isinstance(current, int) and value <= current:
                return False
            raw.execute(
                "INSERT OR REPLACE INTO agent_state (key, value) VALUES (?, ?)", (key, value)
            )
            return True
