"""atheris harness: bytes -> a configuration bundle re-signed with a fixed test center key ->
``ConfigSync.decode`` + ``apply`` on a real throw-away device database, as the agent does.

Why re-signed: the signature keeps strangers out, so the threat left is a compromised or
buggy center (or a bug in our own encoder) signing something odd. The bytes are read by a
small structured decoder (:class:`Draw`): they choose the kind, the version relative to
the one in force, ``base``, ``target``, ``expires``, the topic, and a body built around
each kind's real schema (blacklist entries at the u64 edges, actions of both kinds with
the wrong fields, mutations of the shipped fare table, credit allowances, agent settings),
then sometimes break one header or body field. Two raw modes put the bytes themselves on
the wire (the whole payload; or the body, deflated or not, under a valid signature).

Only what the agent allows may come out (``Agent._config_worker``): a documented
:class:`SyncResult` outcome, or a :class:`StoreError` (which the worker catches). After
every message the database must be consistent (:func:`check_database`) and a message that
was not applied must have changed no store (:meth:`BundleRig.deliver`).

Findings so far: none (see tests/test_fuzz_bundles.py for the regression tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import _common  # first: puts the repository on sys.path
import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol
from edge_agent.config_sync import (
    APPLIED,
    DUPLICATE,
    REJECTED,
    RELOAD,
    SAME,
    STALE,
    SUPERSEDED,
    UNAVAILABLE,
    ConfigSync,
    Incoming,
    SyncResult,
    current_version,
)
from edge_agent.errors import ProtocolError
from edge_agent.settings import AgentSettings, DeviceSettings
from firmware.stores import DeviceDatabase, StoreError

DEVICE_ID = "FUZZ-BUS-1"
OTHER_ID = "FUZZ-BUS-2"
#: The fixed test center key: every structured bundle is signed with it, so the fuzzer gets
#: past the signature. Never a real key.
CENTER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"afc fuzz center").digest())
OUTCOMES = frozenset((APPLIED, SAME, STALE, REJECTED, RELOAD, DUPLICATE, UNAVAILABLE,
                      SUPERSEDED))
KINDS = protocol.BUNDLE_KINDS
#: now_ms given to decode (a fixed clock: expiry is chosen relative to it).
NOW_MS = 1_767_258_000_000
U64 = 1 << 64
_TARIFF = (_common.ROOT / "firmware/core/tariffs/konya-2025.toml").read_text("utf-8")
_TARIFF_LINES = _TARIFF.splitlines()


# -- the structured decoder ----------------------------------------------------------------------


class Draw:
    """Reads choices from fuzzer bytes; past the end every read gives zeros (the smallest
    choice), so any input, the empty one included, makes a complete bundle."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(nbytes)), "little")

    def below(self, n: int) -> int:
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 8) % n

    def chance(self, in_256: int) -> bool:
        """True about ``in_256`` times in 256; never for a zero byte (nor past the end)."""
        return self.byte() >= 256 - in_256

    def pick(self, items: Sequence[Any]) -> Any:
        return items[self.below(len(items))]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def text(self, limit: int = 24) -> str:
        return self.take(self.below(limit + 1)).decode("utf-8", "replace")

    def interesting_int(self) -> int:
        return self.pick((0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**32, 2**53 + 1,
                          2**63 - 1, 2**63, -(2**63), -(2**63) - 1, U64 - 1, U64, 10**30,
                          self.uint(8), -self.uint(4)))

    def value(self, depth: int = 0) -> Any:
        """Any plain CBOR value (what a compromised center could sign)."""
        choice = self.below(12 if depth < 3 else 8)
        if choice == 0:
            return None
        if choice == 1:
            return self.chance(128)
        if choice in (2, 3):
            return self.interesting_int()
        if choice == 4:
            return self.pick((0.0, -0.0, 1.5, 1e300, float("inf"), float("-inf"),
                              float("nan"), 2.0**64))
        if choice == 5:
            return self.text()
        if choice == 6:
            return self.take(self.pick((0, 1, 4, 7, 8, 10, 16)))
        if choice == 7:
            return self.pick(("", "topup", "pass", "blacklist", "batch", "telemetry", "mqtt",
                              DEVICE_ID, "x" * 300))
        if choice in (8, 9):
            return [self.value(depth + 1) for _ in range(self.below(5))]
        return {self.pick(("a", "entries", "add", "remove", "cd", "rs", "ul", "ub", "toml",
                           "name", "allowance", "settings", "actions", self.text(6))):
                self.value(depth + 1) for _ in range(self.below(5))}


# -- bodies, per kind ----------------------------------------------------------------------------


def _card(d: Draw, known: Sequence[int]) -> Any:
    c = d.below(16)
    if c == 0:
        return d.value()
    if c < 5 and known:
        return d.pick(known)
    if c < 9:
        return d.pick((0, 1, 2**63 - 1, 2**63, U64 - 1, U64, -1))
    return d.uint(d.pick((1, 2, 4, 8)))


def _entry(d: Draw, known: Sequence[int]) -> Any:
    card = _card(d, known)
    reason = d.pick((0, 1, 7, 0xFFFF, 0x10000, -1, None, "1")) if d.chance(40) else d.uint(2)
    uid = None if d.chance(128) else d.take(d.pick((4, 7, 10, 4, 7, 10, 0, 5, 11)))
    if d.chance(8):
        return d.pick(([card, reason], [card, reason, uid, 0], card, {"cd": card}))
    return [card, reason, uid]


def _entries(d: Draw, known: Sequence[int]) -> list[Any]:
    return [_entry(d, known) for _ in range(d.below(9))]


def _action(d: Draw) -> Any:
    kind = d.pick(("topup", "pass", "topup", "pass", "refund", None))
    action: dict[str, Any] = {
        "action_id": d.pick(("A1", "A2", "A3", "", "x" * 65, None, d.text(8))),
        "card_number": _card(d, (12345, 2**63)),
        "kind": kind,
        "valid_until": d.pick((NOW_MS + 86_400_000, 0, -1, 2**63 - 1, 2**63, None)),
    }
    if kind == "topup" or d.chance(30):
        action["amount"] = d.pick((2250, 1, 0, -5, 2**63, None))
    if kind == "pass" or d.chance(30):
        action["product_id"] = d.pick((0, 3, -1, 2**63, None))
    if d.chance(80):
        action["card_seq"] = d.pick((1, 2, 0, 0xFFFF, 0x10000, None))
    if d.chance(20):
        action[d.pick(("extra", "version", "applied_seq"))] = d.value()
    return action


def _fares_toml(d: Draw) -> str:
    if d.chance(20):
        return d.text(200)
    lines = list(_TARIFF_LINES)
    for _ in range(d.below(4)):
        i = d.below(len(lines))
        op = d.below(4)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[d.below(len(lines))])
        else:
            key, sep, _ = lines[i].partition("=")
            if sep:
                lines[i] = key + "= " + d.pick((
                    "-1", "0", "1", "1e400", "1.5", "nan", '"x"', "[]", "{}", "true",
                    "9223372036854775808", "-9223372036854775809", "[1, 2]", '""',
                    '"Europe/Nowhere"', "2025-01-01", "10" * 40))
    return "\n".join(lines) + "\n"


def _allowance(d: Draw) -> dict[str, Any]:
    fields = {"dealer_id": "D1", "allowance_id": "AL1", "amount": 100_000,
              "valid_from": NOW_MS - 1000, "valid_until": NOW_MS + 86_400_000,
              "signature": "ed25519:" + "00" * 64}
    for _ in range(d.below(3)):
        fields[d.pick((*fields, "daily_limit", "x"))] = d.value()
    return fields


_SETTING_KEYS = {"batch": ("max_records", "max_bytes", "max_age_s", "window", "ack_timeout_s"),
                 "telemetry": ("interval_s", "buffer_bytes")}


def _settings(d: Draw) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(d.below(3)):
        section = d.pick(("batch", "telemetry", "batch", "telemetry", "mqtt", "identity"))
        keys = _SETTING_KEYS.get(section, ("host", "key"))
        table = {}
        for _ in range(d.below(4)):
            value = d.pick((1, 8, 1000, 0, -1, 0.5, 2.0, 1e400, 10**400,
                            None, "5", True)) if d.chance(200) else d.value()
            table[d.pick(keys) if d.chance(220) else d.text(6)] = value
        out[section] = table if d.chance(240) else d.value()
    return out


def logical_body(d: Draw, kind: str, known: Sequence[int]) -> Any:
    """A body as the center's encoder takes it (before the wire form)."""
    if kind == "blacklist":
        return {"entries": _entries(d, known)}
    if kind == "blacklist-delta":
        return {"add": _entries(d, known), "remove": [_card(d, known) for _ in range(d.below(5))]}
    if kind == "actions":
        return {"actions": [_action(d) for _ in range(d.below(5))]}
    if kind == "fares":
        return {"name": d.pick(("Konya", "", "x" * 300)), "toml": _fares_toml(d)}
    if kind == "credit":
        return {"allowance": _allowance(d)}
    return {"settings": _settings(d)}


def _cards_column(cards: list[int]) -> bytes:
    prev, out = 0, bytearray()
    for card in cards:
        out += ((card - prev) % U64).to_bytes(8, "little")
        prev = card
    return bytes(out)


def _u16(x: Any) -> int:
    return x if type(x) is int and 0 <= x <= 0xFFFF else 0xFFFF


def wire_body(d: Draw, kind: str, body: Any) -> Any:
    """The body as it travels: the real encoder's form when the body is valid, else built
    by hand (columns of any length) so invalid content still reaches the device."""
    try:
        wire = protocol._body_to_wire(kind, body)
    except ProtocolError:
        if kind not in ("blacklist", "blacklist-delta"):
            wire = dict(body)
        else:
            entries = body.get("entries", body.get("add", []))
            ok = [e for e in entries if isinstance(e, list) and len(e) == 3
                  and type(e[0]) is int and 0 <= e[0] < U64]
            cols = {"cd": _cards_column([e[0] for e in ok]),
                    "rs": b"".join(_u16(e[1]).to_bytes(2, "little") for e in ok),
                    "ul": bytes(len(e[2]) if isinstance(e[2], bytes) else 0 for e in ok),
                    "ub": b"".join(e[2] for e in ok if isinstance(e[2], bytes))}
            if kind == "blacklist":
                wire = {"entries": cols}
            else:
                removes = [c for c in body.get("remove", []) if type(c) is int and 0 <= c < U64]
                wire = {"add": cols, "remove": _cards_column(removes)}
    for _ in range(d.below(3) if d.chance(60) else 0):  # break a field or a column
        target = wire
        if isinstance(wire.get("entries"), dict) and d.chance(128):
            target = wire["entries"]
        elif isinstance(wire.get("add"), dict) and d.chance(128):
            target = wire["add"]
        key = d.pick((*target, "x")) if target else "x"
        target[key] = d.value() if d.chance(128) else d.take(d.below(20))
    return wire


# -- the message --------------------------------------------------------------------------------


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def sign(fields: dict[str, Any]) -> bytes:
    """Sign ``fields`` (a bundle message without ``v`` and ``sig``) with the test key."""
    return protocol.sign_message({"t": "bundle", **fields}, CENTER_KEY)


def topic_for(d: Draw, kind: str) -> str:
    c = d.below(16)
    if c < 9:
        return protocol.cfg_topic(kind)
    if c < 12:
        return protocol.cfg_topic(kind, DEVICE_ID)
    if c == 12:
        return protocol.cfg_topic(d.pick(KINDS))
    if c == 13:
        return protocol.cfg_topic(kind, OTHER_ID)
    return d.pick(("afc/v1/cfg/", "afc/v1/cfg/nothing", f"afc/v1/cfg/{kind}/{DEVICE_ID}/x",
                   "afc/v1/cfg/camera-site/" + DEVICE_ID, "afc/v1/dev/X/cmd", "", "#"))


def message(d: Draw, db: DeviceDatabase) -> tuple[str, bytes]:
    """``(topic, payload)`` built from the fuzzer bytes against the state of ``db``."""
    mode = d.below(16)  # 0-12 structured (zeros past the end too), 13-15 raw bytes
    kind = d.pick(KINDS)
    topic = topic_for(d, kind)
    if mode == 13:  # the bytes are the payload: no signature gets through
        return topic, d.rest()
    current = current_version(db, kind)
    c = d.below(32)  # mostly the next version, so chains of versions get applied
    version = (current + 1 if c < 20 else current + 2 if c < 24 else current if c < 26
               else d.pick((max(current - 1, 1), 1, 2**63 - 1, 0, -1, 2**63, None, "2")))
    fields: dict[str, Any] = {"kind": kind, "version": version, "ts": NOW_MS, "z": "deflate"}
    if kind == "blacklist-delta" or d.chance(8):
        base = db.blacklist.version
        c = d.below(16)
        fields["base"] = base if c < 10 else d.pick(
            (base - 1, base + 1, 0, db.blacklist.base_version, version, -1))
    if d.chance(50):
        fields["target"] = d.pick((DEVICE_ID, DEVICE_ID, OTHER_ID, "", "bad id!", 5))
    if d.chance(40):
        fields["expires"] = d.pick((NOW_MS + 1, NOW_MS, NOW_MS - 1, 0, "soon", 2**63))
    if mode == 14:  # the bytes are the body, deflated: the body's CBOR decoder sees them
        fields["body"] = deflate(d.rest())
    elif mode == 15:  # or raw: the DEFLATE decoder sees them
        fields["body"] = d.rest()
    else:
        known = [row[0] % U64 for row in db.connection.execute(
            "SELECT card_number FROM blacklist LIMIT 8")]
        body = logical_body(d, kind, known)
        fields["body"] = deflate(cbor2.dumps(wire_body(d, kind, body), canonical=True))
    if d.chance(12):  # a broken header field
        fields[d.pick(("z", "ts", "kind", "version", "body", "extra"))] = d.value()
    try:
        return topic, sign(fields)
    except ProtocolError:  # a header value sign_message cannot carry: unsigned, then
        return topic, cbor2.dumps(fields)


def scratch_dir(prefix: str) -> Path:
    """A throw-away folder, in RAM when the machine has /dev/shm: every event and bundle is
    a durable write (an fdatasync), which on a disk would be most of the fuzzing time and
    proves nothing here (the SQL run is the same)."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


# -- the rig and the properties ------------------------------------------------------------------


def store_snapshot(db: DeviceDatabase) -> dict[str, Any]:
    """Everything a bundle may change, read straight from SQLite."""
    raw = db.connection
    return {
        "versions": {kind: current_version(db, kind) for kind in KINDS},
        "blacklist": sorted(raw.execute(
            "SELECT card_number, uid, reason FROM blacklist").fetchall(), key=repr),
        "count": db.blacklist.count,
        "actions": sorted(raw.execute(
            "SELECT action_id, card_number, kind, valid_until, amount, product_id, card_seq "
            "FROM actions WHERE applied_seq IS NULL").fetchall(), key=repr),
        "config": sorted(raw.execute("SELECT kind, version, body FROM config").fetchall()),
    }


def check_database(db: DeviceDatabase) -> None:
    """The invariants of the stores that hold whatever was offered."""
    raw = db.connection
    rows = raw.execute("SELECT count(*), count(DISTINCT card_number) FROM blacklist").fetchone()
    if rows[0] != db.blacklist.count:
        raise AssertionError(f"blacklist count {db.blacklist.count} but {rows[0]} rows")
    if rows[0] != rows[1]:
        raise AssertionError("a card is listed twice in the blacklist")
    base = db.blacklist.base_version
    if base is not None and base > db.blacklist.version:
        raise AssertionError(f"blacklist base {base} above the version in force")
    if db.blacklist.version == 0 and rows[0]:
        raise AssertionError("cards listed before any list was applied")
    for kind, version in db.config.versions().items():
        if version < 1:
            raise AssertionError(f"{kind} stored as version {version}")
    if raw.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
        raise AssertionError("SQLite integrity check failed")


def _to_u64(n: int) -> int:
    return n % U64


def expected_blacklist(before: list[tuple[Any, ...]], bundle: protocol.Bundle) -> list[Any]:
    """What the list must hold after ``bundle`` was applied on ``before``."""
    model = {_to_u64(card): (uid, reason) for card, uid, reason in before}
    if bundle.kind == "blacklist":
        model = {}
        adds = bundle.body["entries"]
    else:
        for card in bundle.body["remove"]:
            model.pop(card, None)
        adds = bundle.body["add"]
    for card, reason, uid in adds:
        model[card] = (uid, reason)
    return sorted(((c - U64 if c >= 1 << 63 else c, uid, reason)
                   for c, (uid, reason) in model.items()), key=repr)


class BundleRig:
    """A throw-away device database and the agent's :class:`ConfigSync` on it."""

    def __init__(self, folder: Path | None = None) -> None:
        self._own = folder is None
        self.folder = scratch_dir("afc-fuzz-bundles-") if folder is None else folder
        self.db = DeviceDatabase.open(self.folder / "device.db", device_id=DEVICE_ID)
        self.settings = AgentSettings(device=DeviceSettings(id=DEVICE_ID))
        self.remote: list[Any] = []
        self.sync = ConfigSync(DEVICE_ID, CENTER_KEY.public_key(), self.settings,
                               on_agent_settings=self.remote.append)
        self.outcomes: dict[str, int] = {}

    def close(self) -> None:
        self.db.close()
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def deliver(self, topic: str, payload: bytes) -> SyncResult | None:
        """One message through decode and apply exactly as ``Agent._config_worker`` runs
        them; checks the properties; returns the result (None: a StoreError, which the
        agent catches and logs)."""
        before = store_snapshot(self.db)
        result: SyncResult | None = None
        bundle: protocol.Bundle | None = None
        try:
            decoded = self.sync.decode(topic, payload, NOW_MS)
            if isinstance(decoded, SyncResult):
                result = decoded
                if decoded.outcome == REJECTED:
                    self.sync.report_rejection(self.db, topic, decoded)
            else:
                if not isinstance(decoded, Incoming):
                    raise AssertionError(f"decode returned {decoded!r}")
                bundle = decoded.bundle
                result = self.sync.apply(self.db, decoded)
        except StoreError:  # the worker catches it: logged, nothing else
            pass
        after = store_snapshot(self.db)
        check_database(self.db)
        outcome = "store-error" if result is None else result.outcome
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if result is not None and result.outcome not in OUTCOMES:
            raise AssertionError(f"undocumented outcome {result!r}")
        for kind in KINDS:
            if after["versions"][kind] < before["versions"][kind]:
                raise AssertionError(f"{kind} version went back: {before['versions']} -> "
                                     f"{after['versions']}")
        if result is None or result.outcome != APPLIED or bundle is None:
            if after != before:
                raise AssertionError(f"{outcome} ({result}) changed the stores")
            return result
        if result.version != bundle.version or after["versions"][bundle.kind] != bundle.version:
            raise AssertionError(f"applied {bundle.kind} {bundle.version} but "
                                 f"{after['versions']} in force")
        if bundle.version <= before["versions"][bundle.kind]:
            raise AssertionError(f"{bundle.kind} {bundle.version} applied over "
                                 f"{before['versions'][bundle.kind]} (rollback)")
        if bundle.kind in ("blacklist", "blacklist-delta"):
            if after["blacklist"] != expected_blacklist(before["blacklist"], bundle):
                raise AssertionError(f"blacklist after {bundle.kind} {bundle.version} is not "
                                     "what it listed")
        elif after["blacklist"] != before["blacklist"]:
            raise AssertionError(f"a {bundle.kind} bundle changed the blacklist")
        if bundle.kind == "actions":
            ids = {a["action_id"] for a in bundle.body["actions"]}
            if {row[0] for row in after["actions"]} != ids:
                raise AssertionError("pending actions are not the list applied")
        return result


#: Inputs per database: long enough for chains of versions, short enough to stay small.
RIGS = _common.RigPool(BundleRig, 200)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No log lines while fuzzing (a refusal logs a warning: millions of them otherwise);
    the previous logging state is restored, so tests that load this module are unaffected."""
    saved = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(saved)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    with quiet():
        _one_input(data)


def _one_input(data: bytes) -> None:
    rig = RIGS.next()
    d = Draw(data)
    for _ in range(1 + d.below(3)):
        topic, payload = message(d, rig.db)
        rig.deliver(topic, payload)
        if d.chance(40):  # the retained copy again, or after a resync-config
            if d.chance(128):
                rig.sync.forget()
            rig.deliver(topic, payload)


if __name__ == "__main__":
    _common.run(TestOneInput)
