"""The device database: schema, blacklist, action list, journal, failures, durability.

Durability is tested two ways: SQLite's own fault paths (a full disk through
``max_page_count``, a lock held too long, a read-only connection) must surface as
``StoreUnavailable`` with nothing half-written, and a child process SIGKILLed at a random
instant must lose none of the records it reported durable. Timings are never asserted here:
``firmware.stores.bench`` measures them.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core.errors import CoreError
from firmware.core.keys import MemoryKeyStore, aes_cmac
from firmware.stores import (
    SCHEMA_VERSION,
    Action,
    ActionAlreadyApplied,
    AuthFailureLimiter,
    BlacklistEntry,
    DeltaChainBroken,
    DeviceDatabase,
    DeviceMismatch,
    InvalidRecord,
    JournalRecord,
    JournalTampered,
    NotFound,
    StaleVersion,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    canonical_bytes,
)
from firmware.stores import journal as journal_module
from firmware.stores.bench import bench_blacklist, bench_journal, make_blacklist

REPO = Path(__file__).resolve().parent.parent
JOURNAL_KEY = bytes(range(16))
DEVICE = "bus-0042-v1"


@pytest.fixture
def keys() -> MemoryKeyStore:
    return MemoryKeyStore({"journal-mac": JOURNAL_KEY})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "device.db"


@pytest.fixture
def db(db_path: Path, keys: MemoryKeyStore):
    handle = DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys)
    yield handle
    handle.close()


def tap(card: int = 1234_5678_9012_3456, counter: int = 7, **extra: object) -> dict:
    record = {
        "kind": "tap",
        "time": 1_790_000_000_000 + counter,
        "card_number": card,
        "uid": b"\x04\x11\x22\x33",
        "counter_before": counter,
        "counter_after": counter + 1,
        "balance_before": 10_000,
        "balance_after": 8_000,
        "fare": 2_000,
        "product": 1,
        "line": "41",
        "vehicle": "42 KON 123",
        "validator_id": "front-door",
    }
    record.update(extra)
    return record


# --- schema, pragmas, opening ----------------------------------------------------------------


def test_schema_created_and_reopened(db_path: Path, keys: MemoryKeyStore) -> None:
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        assert db.schema_version == SCHEMA_VERSION
        seq = db.journal.intent(tap())
    inspect = sqlite_utils.Database(db_path)
    assert {
        "meta",
        "blacklist_a",
        "blacklist_b",
        "blacklist_delta",
        "actions",
        "journal",
        "open_intent",
        "card_counters",
    } <= set(inspect.table_names())
    assert inspect.view_names() == ["blacklist"]
    assert inspect["journal"].pks == ["seq"]
    assert inspect["open_intent"].foreign_keys[0].other_table == "journal"
    assert inspect.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    inspect.close()
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        assert db.journal.get(seq) is not None
        assert db.schema_version == SCHEMA_VERSION


def test_pragmas_in_effect(db: DeviceDatabase) -> None:
    pragmas = db.pragmas()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 1  # NORMAL: durable writes sync the WAL themselves
    assert pragmas["foreign_keys"] == 1
    assert pragmas["busy_timeout"] == 2000
    assert Path(f"{db.path}-wal").exists()


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every fdatasync/fsync the process makes from now on, by the file it reached."""
    synced: list[str] = []
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)

        def spy(fd: int, real=real) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    return synced


def test_intent_is_synced_to_storage_before_it_returns(
    db: DeviceDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_syncs(monkeypatch)
    seq = db.journal.intent(tap())
    assert synced == [f"{db.path}-wal"]  # the WAL holding the intent, once
    synced.clear()
    db.journal.done(seq, "ok", counter_after=8, balance_after=750)
    assert synced == []  # the done rides on the next durable write
    db.journal.intent(tap())
    assert synced == [f"{db.path}-wal"]


def test_a_failing_sync_is_an_unavailable_store(
    db: DeviceDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StoreUnavailable, match="could not be synced"):
        db.journal.intent(tap())
    monkeypatch.undo()
    assert db.journal.intent(tap()) > 0


def test_a_wal_unlinked_behind_the_stores_back_is_an_unavailable_store(
    db: DeviceDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL's descriptor is kept between syncs; a WAL that is no longer the file at its
    path (deleted by hand, a broken medium) must not be synced in its stead as if nothing
    had happened."""
    synced = _record_syncs(monkeypatch)
    db.journal.intent(tap())
    db.journal.intent(tap())
    assert synced == [f"{db.path}-wal"] * 2
    os.unlink(f"{db.path}-wal")
    with pytest.raises(StoreUnavailable, match="could not be synced"):
        db.journal.intent(tap())


def test_other_device_refused(db_path: Path, keys: MemoryKeyStore) -> None:
    DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys).close()
    with pytest.raises(DeviceMismatch):
        DeviceDatabase.open(db_path, device_id="bus-0043", journal_key=keys)
    with pytest.raises(InvalidRecord):
        DeviceDatabase.open(db_path, device_id="no spaces allowed")


def test_newer_schema_refused(db_path: Path) -> None:
    DeviceDatabase.open(db_path, device_id=DEVICE).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer than this software"):
        DeviceDatabase.open(db_path, device_id=DEVICE)


def test_failed_migration_leaves_nothing(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from firmware.stores import schema

    first = schema.MIGRATIONS[0]

    def broken(db: sqlite_utils.Database) -> None:
        first(db)  # creates every table (through sqlite-utils), then fails
        raise RuntimeError("power cut in the middle of the migration")

    monkeypatch.setattr(schema, "MIGRATIONS", [broken])
    with pytest.raises(RuntimeError):
        DeviceDatabase.open(db_path, device_id=DEVICE)
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    raw.close()
    monkeypatch.undo()
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.schema_version == SCHEMA_VERSION


def test_schema_1_migrates_to_the_overlay(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from firmware.stores import schema

    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:  # a file of schema 1
        assert db.schema_version == 1
        db.connection.executescript(
            "INSERT INTO blacklist_a VALUES (7, NULL, 1, 3), (8, NULL, 2, 3);"
            "UPDATE meta SET value = 3 WHERE key = 'blacklist_version';"
            "UPDATE meta SET value = 2 WHERE key = 'blacklist_count';"
        )
    monkeypatch.undo()
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.schema_version == SCHEMA_VERSION == 5
        assert db.blacklist.lookup(7) == BlacklistEntry(7, 1, None, 3)
        db.blacklist.apply_delta(3, 4, add=[(9, 1, None)], remove=[8])
        assert (db.blacklist.count, db.blacklist.overlay_size) == (2, 2)
        assert db.blacklist.lookup(8) is None and db.blacklist.lookup(9) is not None


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite file, just bytes" * 200)
    with pytest.raises(StoreCorrupt):
        DeviceDatabase.open(path, device_id=DEVICE)


def test_errors_are_core_errors() -> None:
    assert issubclass(StoreError, CoreError)
    for cls in (StoreUnavailable, DeltaChainBroken, StaleVersion, StoreCorrupt, InvalidRecord):
        assert issubclass(cls, StoreError)


def test_closed_database(db_path: Path, keys: MemoryKeyStore) -> None:
    db = DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys)
    db.close()
    db.close()
    with pytest.raises(StoreError):
        db.blacklist.lookup(1)
    with pytest.raises(StoreError):
        db.journal.intent(tap())


# --- blacklist ---------------------------------------------------------------------------------

BIG = (1 << 64) - 5  # a u64 card number above 2**63


@pytest.fixture(scope="module")
def hundred_k() -> list[tuple[int, int, bytes | None]]:
    return make_blacklist(100_000, random.Random(7))


def test_blacklist_full_load_and_lookups(db: DeviceDatabase, hundred_k: list) -> None:
    bl = db.blacklist
    assert (bl.version, bl.count) == (0, 0)
    assert bl.lookup(hundred_k[0][0]) is None
    assert bl.load_full(1, [*hundred_k, (BIG, 9, b"\x01\x02\x03\x04\x05\x06\x07")]) == 100_001
    assert (bl.version, bl.count) == (1, 100_001)
    rng = random.Random(1)
    for number, reason, uid in rng.sample(hundred_k, 500):
        assert bl.lookup(number) == BlacklistEntry(number, reason, uid, 1)
        if uid is not None:
            assert bl.lookup_uid(uid).card_number == number
    listed = {e[0] for e in hundred_k}
    for _ in range(500):
        absent = rng.randrange(10**15, 10**16)
        if absent not in listed:
            assert bl.lookup(absent) is None
    assert bl.lookup(BIG) == BlacklistEntry(BIG, 9, b"\x01\x02\x03\x04\x05\x06\x07", 1)
    assert bl.lookup_uid(b"\x01\x02\x03\x04\x05\x06\x07").card_number == BIG
    assert bl.lookup_uid(b"\xff\xff\xff\xfe") is None
    with pytest.raises(InvalidRecord):
        bl.lookup(-1)
    with pytest.raises(InvalidRecord):
        bl.lookup(1 << 64)
    with pytest.raises(InvalidRecord):
        bl.lookup_uid(b"\x01\x02")


def test_blacklist_reload_replaces_everything(db: DeviceDatabase) -> None:
    bl = db.blacklist
    bl.load_full(1, [(n, 1, None) for n in range(1, 1001)])
    bl.apply_delta(1, 2, add=[(5000, 2, None)], remove=[1])
    assert bl.overlay_size == 2
    assert bl.load_full(3, [(n, 3, None) for n in range(500, 800)] + [(600, 4, None)]) == 300
    assert (bl.version, bl.count, bl.overlay_size) == (3, 300, 0)
    assert bl.lookup(1) is None and bl.lookup(5000) is None and bl.lookup(2) is None
    assert bl.lookup(600) == BlacklistEntry(600, 4, None, 3)  # a card listed twice: last wins
    assert db.connection.execute("SELECT count(*) FROM blacklist").fetchone()[0] == 300


def test_blacklist_stale_full_load_refused_before_reading(db: DeviceDatabase) -> None:
    db.blacklist.load_full(5, [(1, 1, None)])

    def entries():
        raise AssertionError("the iterator must not be read for a stale version")
        yield

    for version in (4, 5):
        with pytest.raises(StaleVersion) as info:
            db.blacklist.load_full(version, entries())
        assert (info.value.current, info.value.offered) == (5, version)
    assert db.blacklist.lookup(1) is not None


def test_blacklist_delta_chain(db: DeviceDatabase) -> None:
    bl = db.blacklist
    bl.load_full(10, [(n, 1, None) for n in range(100, 200)])
    bl.apply_delta(
        10, 11, add=[(1000, 2, b"\xaa\xbb\xcc\xdd"), (150, 7, None)], remove=[101, 102, 99999]
    )
    assert (bl.version, bl.count) == (11, 99)  # +1000, -101, -102; 150 updated, 99999 absent
    assert bl.lookup(1000) == BlacklistEntry(1000, 2, b"\xaa\xbb\xcc\xdd", 11)
    assert bl.lookup(150) == BlacklistEntry(150, 7, None, 11)
    assert bl.lookup(101) is None
    assert bl.lookup_uid(b"\xaa\xbb\xcc\xdd").card_number == 1000
    bl.apply_delta(11, 12, add=[(101, 3, None)], remove=[1000, 150])
    assert (bl.version, bl.count) == (12, 98)
    assert bl.lookup(101) == BlacklistEntry(101, 3, None, 12)
    assert bl.lookup(1000) is None and bl.lookup(150) is None
    assert bl.lookup_uid(b"\xaa\xbb\xcc\xdd") is None
    assert db.connection.execute("SELECT count(*) FROM blacklist").fetchone()[0] == 98

    with pytest.raises(DeltaChainBroken) as broken:
        bl.apply_delta(13, 14, add=[(5, 1, None)])
    assert (broken.value.current, broken.value.from_version) == (12, 13)
    with pytest.raises(StaleVersion):
        bl.apply_delta(11, 12, add=[(5, 1, None)])
    with pytest.raises(StaleVersion):
        bl.apply_delta(12, 12, add=[(5, 1, None)])
    assert (bl.version, bl.count) == (12, 98)
    assert bl.lookup(5) is None


def test_blacklist_delta_before_any_full_list(db: DeviceDatabase) -> None:
    db.blacklist.apply_delta(0, 1, add=[(42, 1, None)])
    assert db.blacklist.count == 1 and db.blacklist.lookup(42) is not None


def test_blacklist_failed_load_leaves_old_list(
    db: DeviceDatabase, db_path: Path, hundred_k: list
) -> None:
    bl = db.blacklist
    bl.load_full(1, hundred_k[:1000])
    other = DeviceDatabase.open(db_path, device_id=DEVICE)
    seen_during_load: list[tuple[int, int, bool]] = []

    def failing_entries():
        for i, entry in enumerate(hundred_k[1000:]):
            if i == 60_000:  # a first chunk is committed to the staging table by now
                seen_during_load.append(
                    (
                        other.blacklist.version,
                        other.blacklist.count,
                        other.blacklist.lookup(hundred_k[1000][0]) is None,
                    )
                )
                raise RuntimeError("bundle stream broke")
            yield entry

    with pytest.raises(RuntimeError, match="bundle stream broke"):
        bl.load_full(2, failing_entries())
    assert seen_during_load == [(1, 1000, True)]  # a reader saw the old list throughout
    assert (bl.version, bl.count) == (1, 1000)
    assert bl.lookup(hundred_k[0][0]) is not None
    assert bl.lookup(hundred_k[1000][0]) is None
    with pytest.raises(InvalidRecord):
        bl.load_full(2, [*hundred_k[1000:2000], (1, 1, "not bytes")])
    assert (bl.version, bl.count) == (1, 1000)
    assert bl.load_full(2, hundred_k[1000:3000]) == 2000  # and the next load works
    assert other.blacklist.lookup(hundred_k[1000][0]) is not None  # seen by the other handle
    assert other.blacklist.lookup(hundred_k[0][0]) is None
    other.close()


# --- action list -------------------------------------------------------------------------------

CARD = 1111_2222_3333_4444


def actions_v1() -> list[Action]:
    return [
        Action("A-1", CARD, "topup", valid_until=2_000, amount=5_000),
        Action("A-2", CARD, "pass", valid_until=1_000, product_id=30),
        Action("A-3", 9999, "topup", valid_until=2_000, amount=100),
    ]


def test_actions_pending_and_exactly_once(db: DeviceDatabase) -> None:
    acts = db.actions
    assert acts.replace_all(1, actions_v1()) == 3
    assert [a.action_id for a in acts.pending_for(CARD)] == ["A-1", "A-2"]
    assert [a.action_id for a in acts.pending_for(CARD, now=1_500)] == ["A-1"]
    assert acts.pending_for(1) == []
    seq = db.journal.intent(tap(CARD, kind="action-applied", action_id="A-1"))
    done = db.journal.done(seq, "ok", balance_after=15_000)
    acts.mark_applied("A-1", done)
    with pytest.raises(ActionAlreadyApplied):
        acts.mark_applied("A-1", done)
    with pytest.raises(NotFound):
        acts.mark_applied("A-404", done)
    with pytest.raises(InvalidRecord):
        acts.mark_applied("A-2", 10_000)  # no such journal record
    assert [a.action_id for a in acts.pending_for(CARD)] == ["A-2"]
    assert acts.get("A-1").applied_seq == done
    assert [a.action_id for a in acts.applied_unreported()] == ["A-1"]

    # The center, not told yet, lists A-1 again: it must not become pending.
    acts.replace_all(2, actions_v1())
    assert [a.action_id for a in acts.pending_for(CARD)] == ["A-2"]
    assert acts.mark_reported(["A-1", "A-2"]) == 1  # A-2 was never applied
    assert acts.applied_unreported() == []
    acts.replace_all(3, actions_v1()[1:])  # the center stopped listing A-1: forgotten
    assert acts.get("A-1") is None
    assert acts.version == 3
    with pytest.raises(StaleVersion):
        acts.replace_all(3, [])


def test_only_an_open_load_of_an_action_hides_it(db: DeviceDatabase) -> None:
    """A load in doubt (an open action-applied intent) keeps its action from being loaded a
    second time; a record of another kind naming the same id (a top-up names its credit
    allowance in action_id) does not."""
    db.actions.replace_all(1, actions_v1())
    db.journal.intent(tap(CARD, kind="topup", action_id="A-2"))
    assert [a.action_id for a in db.actions.pending_for(CARD)] == ["A-1", "A-2"]
    seq = db.journal.intent(tap(CARD, kind="action-applied", action_id="A-1"))
    assert [a.action_id for a in db.actions.pending_for(CARD)] == ["A-2"]
    db.journal.done(seq, "not-charged", balance_after=10_000)
    assert [a.action_id for a in db.actions.pending_for(CARD)] == ["A-1", "A-2"]


def test_action_applied_with_done_atomically(db: DeviceDatabase) -> None:
    db.actions.replace_all(1, actions_v1())
    seq = db.journal.intent(tap(CARD, kind="action-applied", action_id="A-1"))
    # In doubt: not offered again until the intent is resolved.
    assert [a.action_id for a in db.actions.pending_for(CARD)] == ["A-2"]
    done = db.journal.done(seq, "ok", apply_action=True)
    assert db.actions.get("A-1").applied_seq == done
    second = db.journal.intent(tap(CARD, kind="action-applied", action_id="A-1"))
    with pytest.raises(ActionAlreadyApplied):
        db.journal.done(second, "ok", apply_action=True)
    assert [r.seq for r in db.journal.open_intents()] == [second]  # nothing was written
    db.journal.done(second, "not-written")
    assert db.journal.open_intents() == []


def test_action_delta_and_validation(db: DeviceDatabase) -> None:
    acts = db.actions
    acts.replace_all(1, actions_v1())
    acts.apply_delta(
        1,
        2,
        add=[
            {
                "action_id": "A-4",
                "card_number": CARD,
                "kind": "topup",
                "valid_until": 5_000,
                "amount": 1,
            }
        ],
        remove=["A-2"],
    )
    assert [a.action_id for a in acts.pending_for(CARD)] == ["A-1", "A-4"]
    with pytest.raises(DeltaChainBroken):
        acts.apply_delta(1, 3, remove=["A-1"])
    with pytest.raises(StaleVersion):
        acts.apply_delta(2, 2, remove=["A-1"])
    for bad in (
        Action("B", CARD, "topup", valid_until=1, amount=0),
        Action("B", CARD, "topup", valid_until=1, amount=5, product_id=1),
        Action("B", CARD, "pass", valid_until=1),
        Action("B", CARD, "gift", valid_until=1, amount=5),
        Action("", CARD, "topup", valid_until=1, amount=5),
        Action("B", -1, "topup", valid_until=1, amount=5),
    ):
        with pytest.raises(InvalidRecord):
            acts.apply_delta(2, 3, add=[bad])
    assert acts.version == 2


# --- journal -------------------------------------------------------------------------------


def test_journal_seq_monotonic_across_reopen(db_path: Path, keys: MemoryKeyStore) -> None:
    seqs = []
    for _ in range(3):
        with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
            seqs.append(db.journal.intent(tap()))
            seqs.append(db.journal.done(seqs[-1], "ok"))
            seqs.append(db.journal.event({"kind": "rejection", "time": 5, "reason": 3}))
    assert seqs == list(range(1, 10))
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        db.journal.mark_acked(9)
        assert db.journal.prune_acked() == 9
        assert db.journal.records() == []
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        assert db.journal.last_seq == 9
        assert db.journal.intent(tap()) == 10  # never reused, even with every record pruned


def test_intent_done_records(db: DeviceDatabase) -> None:
    seq = db.journal.intent(tap(counter=7))
    done = db.journal.done(seq, "ok", counter_after=8, balance_after=8_000, time=1_790_000_000_900)
    intent_rec, done_rec = db.journal.records()
    assert (intent_rec.seq, intent_rec.phase, intent_rec.link) == (seq, "intent", None)
    assert (done_rec.seq, done_rec.phase, done_rec.link) == (done, "done", seq)
    assert done_rec.card_number == intent_rec.card_number and done_rec.uid == intent_rec.uid
    assert (done_rec.kind, done_rec.outcome, done_rec.counter_after) == ("tap", "ok", 8)
    assert done_rec.time == 1_790_000_000_900
    assert intent_rec.device_id == DEVICE and len(intent_rec.mac) == 16
    assert intent_rec.line == "41" and intent_rec.vehicle == "42 KON 123"
    with pytest.raises(NotFound):
        db.journal.done(seq, "ok")  # closed already
    with pytest.raises(NotFound):
        db.journal.done(done, "ok")  # not an intent
    assert db.journal.last_seq == done


def test_open_intents_survive_power_loss(db_path: Path, keys: MemoryKeyStore) -> None:
    db = DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys)
    closed = db.journal.intent(tap(counter=1))
    db.journal.done(closed, "ok")
    in_doubt = db.journal.intent(tap(counter=2, balance_before=7_000))
    db.close()  # "power cut" between the intent and the card write
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        (record,) = db.journal.open_intents()
        assert (record.seq, record.counter_before, record.balance_before) == (in_doubt, 2, 7_000)
        db.journal.mark_acked(db.journal.last_seq)
        db.journal.prune_acked()  # an open intent is kept even when acked
        assert [r.seq for r in db.journal.open_intents()] == [in_doubt]
        db.journal.done(in_doubt, "resolved-written", counter_after=3)
        assert db.journal.open_intents() == []


def test_open_intents_of_one_card(db: DeviceDatabase) -> None:
    """A tap settles its own card's intents: the others are not read (nor verified) then."""
    big = 2**64 - 1  # a u64 card number above SQLite's signed range
    a = db.journal.intent(tap(card=11, counter=1))
    b = db.journal.intent(tap(card=big, counter=4))
    c = db.journal.intent(tap(card=11, counter=2))
    assert [r.seq for r in db.journal.open_intents()] == [a, b, c]
    assert [r.seq for r in db.journal.open_intents(card_number=11)] == [a, c]
    assert [r.seq for r in db.journal.open_intents(card_number=big)] == [b]
    assert db.journal.open_intents(card_number=12) == []
    db.connection.execute("UPDATE journal SET fare = 1 WHERE seq = ?", (b,))
    assert [r.seq for r in db.journal.open_intents(card_number=11)] == [a, c]
    with pytest.raises(JournalTampered):
        db.journal.open_intents(card_number=big)
    with pytest.raises(InvalidRecord):
        db.journal.open_intents(card_number=-1)


def test_mac_detects_changes_behind_the_api(db: DeviceDatabase, keys: MemoryKeyStore) -> None:
    seqs = [db.journal.intent(tap(counter=i)) for i in range(5)]
    assert db.journal.verify() == []
    db.connection.execute("UPDATE journal SET balance_after = 99999 WHERE seq = ?", (seqs[2],))
    db.connection.execute("UPDATE journal SET uid = NULL WHERE seq = ?", (seqs[4],))
    assert db.journal.verify() == [seqs[2], seqs[4]]
    with pytest.raises(JournalTampered) as info:
        db.journal.records()
    assert info.value.seqs == [seqs[2], seqs[4]]
    with pytest.raises(JournalTampered):
        db.journal.open_intents()
    assert len(db.journal.records(verify=False)) == 5
    with pytest.raises(JournalTampered):
        db.journal.get(seqs[2])
    assert db.journal.get(seqs[1]) is not None


def test_wrong_key_fails_verification(db_path: Path, keys: MemoryKeyStore) -> None:
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        db.journal.intent(tap())
    other = MemoryKeyStore({"journal-mac": bytes(16)})
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=other) as db:
        assert db.journal.verify() == [1]
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:  # no key: read-only journal
        assert len(db.journal.records(verify=False)) == 1
        with pytest.raises(StoreError):
            db.journal.intent(tap())


def test_mac_is_cmac_over_canonical_bytes(db: DeviceDatabase) -> None:
    seq = db.journal.intent(tap())
    record = db.journal.get(seq)
    assert record.mac == aes_cmac(JOURNAL_KEY, canonical_bytes(record))


def test_journal_key_as_callable_or_named(db_path: Path) -> None:
    calls = []

    def mac(data: bytes) -> bytes:
        calls.append(data)
        return aes_cmac(JOURNAL_KEY, data)

    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=mac) as db:
        db.journal.intent(tap())
    assert calls and calls[0].startswith(b"AFCJ\x01")
    store = MemoryKeyStore({"other-name": JOURNAL_KEY})
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=(store, "other-name")) as db:
        assert db.journal.verify() == []
    with pytest.raises(CoreError):
        DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=store)  # no journal-mac


def test_canonical_encoding_pinned() -> None:
    record = JournalRecord(
        kind="tap",
        time=1,
        card_number=(1 << 64) - 1,
        uid=b"\x01\x02\x03\x04",
        line="41",
        seq=2,
        phase="intent",
        device_id="d",
    )
    assert canonical_bytes(record).hex() == (
        "4146434a01"  # "AFCJ", format 1
        "01000164"  # device_id "d"
        "010000000000000002"  # seq 2
        "010006696e74656e74"  # phase "intent"
        "010003746170"  # kind "tap"
        "00"  # link
        "010000000000000001"  # time 1
        "01ffffffffffffffff"  # card number 2**64-1, unsigned
        "01000401020304"  # uid
        "00"
        "00"
        "00"
        "00"
        "00"
        "00"  # counters, balances, fare, product
        "0100023431"  # line "41"
        "00"
        "00"
        "00"
        "00"
        "00"  # vehicle, validator_id, outcome, reason, action_id
    )
    # Self-delimiting fields: moving a character from one text field to the next changes it.
    a = JournalRecord(kind="tap", time=1, line="ab", vehicle="c")
    b = JournalRecord(kind="tap", time=1, line="a", vehicle="bc")
    assert canonical_bytes(a) != canonical_bytes(b)


def _canonical_by_the_table(record: JournalRecord) -> bytes:
    """canonical_bytes as docs/stores.md states it, one field of the table at a time: the
    specification the journal's unrolled encoder is checked against."""
    parts = [b"AFCJ\x01"]
    for name, kind in journal_module._CANONICAL_FIELDS:
        value = getattr(record, name)
        if value is None:
            parts.append(b"\x00")
        elif kind == "i":
            parts.append(b"\x01" + struct.pack(">q", value))
        elif kind == "u":
            parts.append(b"\x01" + struct.pack(">Q", value))
        elif kind == "s":
            data = value.encode("utf-8")
            parts.append(b"\x01" + struct.pack(">H", len(data)) + data)
        else:
            parts.append(b"\x01" + struct.pack(">H", len(value)) + value)
    return b"".join(parts)


_I64S = st.none() | st.integers(-(1 << 63), (1 << 63) - 1)
_TEXTS = st.none() | st.text(max_size=70) | st.sampled_from(["41", "front-door", "ok", "tap"])
_RECORDS = st.builds(
    JournalRecord,
    kind=st.sampled_from(["tap", "topup", "repair", "rejection"]) | st.text(max_size=8),
    time=st.integers(-(1 << 63), (1 << 63) - 1),
    card_number=st.none() | st.integers(0, (1 << 64) - 1),
    uid=st.none() | st.binary(max_size=10),
    counter_before=_I64S,
    counter_after=_I64S,
    balance_before=_I64S,
    balance_after=_I64S,
    fare=_I64S,
    product=_I64S,
    line=_TEXTS,
    vehicle=_TEXTS,
    validator_id=_TEXTS,
    outcome=_TEXTS,
    reason=_I64S,
    action_id=_TEXTS,
    seq=st.integers(0, (1 << 63) - 1),
    phase=st.sampled_from(["intent", "done", "event"]),
    link=_I64S,
    device_id=st.sampled_from([DEVICE, "d", "ünïcode-device"]),
)


@settings(max_examples=400)
@given(record=_RECORDS)
def test_canonical_encoding_follows_the_field_table(record: JournalRecord) -> None:
    assert canonical_bytes(record) == _canonical_by_the_table(record)


@pytest.mark.parametrize(
    "change",
    [{"time": "1"}, {"fare": 1.5}, {"line": b"41"}, {"uid": "0411"}, {"card_number": -1}],
    ids=repr,
)
def test_canonical_encoding_of_wrong_types_fails_like_the_table(change: dict) -> None:
    """A value of the wrong type (put there behind the API) must fail to encode, as the
    table's encoder fails, so that verification counts the record as tampered."""
    record = dataclasses.replace(JournalRecord(kind="tap", time=1, seq=1, device_id="d"), **change)
    caught = (ValueError, TypeError, AttributeError, struct.error)
    with pytest.raises(caught):
        _canonical_by_the_table(record)
    with pytest.raises(caught):
        canonical_bytes(record)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_records_with_any_absent_fields_store_and_verify(data: st.DataObject) -> None:
    """Absent fields are written as SQL NULL literals (not bound): every pattern of them must
    read back as written and verify."""
    record = tap(action_id="load-1", reason=3, outcome="ok")
    for name in list(record):
        if name not in ("kind", "time") and data.draw(st.booleans(), label=name):
            record[name] = None
    with tempfile.TemporaryDirectory() as tmp:
        keys = MemoryKeyStore({"journal-mac": JOURNAL_KEY})
        with DeviceDatabase.open(Path(tmp) / "d.db", device_id=DEVICE, journal_key=keys) as db:
            seq = db.journal.event(record)
            got = db.journal.get(seq)
            assert {name: getattr(got, name) for name in record} == record
            assert db.journal.verify() == []


def test_done_is_the_same_from_another_handle(db_path: Path, keys: MemoryKeyStore) -> None:
    """done() takes the intent's fields from what its handle wrote, or reads them back when
    another handle (or an earlier run) wrote the intent: the records must not differ."""
    fields = ("kind", "time", "card_number", "uid", "action_id", "outcome", "counter_after")
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        first = db.journal.intent(tap(action_id="load-7"))
        same = db.journal.get(db.journal.done(first, "ok", counter_after=8))
        second = db.journal.intent(tap(action_id="load-7"))
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        other = db.journal.get(db.journal.done(second, "ok", counter_after=8))
        assert [getattr(same, f) for f in fields] == [getattr(other, f) for f in fields]
        assert (same.link, other.link) == (first, second)
        assert db.journal.verify() == []
        with pytest.raises(NotFound):
            db.journal.done(second, "ok")  # closed already, whoever closed it


def test_last_counter(db: DeviceDatabase) -> None:
    card = 5555_0000_1111_2222
    assert db.journal.last_counter(card) is None
    seq = db.journal.intent(tap(card, counter=10))  # plans counter_after=11
    assert db.journal.last_counter(card) == 10  # the plan is not "seen"
    db.journal.done(seq, "ok", counter_after=11)
    assert db.journal.last_counter(card) == 11
    db.journal.event({"kind": "rejection", "time": 1, "card_number": card, "counter_before": 4})
    assert db.journal.last_counter(card) == 11  # a rolled-back card does not lower it
    assert db.journal.last_counter(BIG) is None


def test_outbox_reading_and_acks(db: DeviceDatabase) -> None:
    for i in range(10):
        db.journal.event({"kind": "rejection", "time": i, "reason": i})
    assert [r.seq for r in db.journal.records(3, 4)] == [4, 5, 6, 7]
    assert db.journal.mark_acked(6) == 6
    assert db.journal.mark_acked(2) == 6  # cumulative: an old ack changes nothing
    with pytest.raises(InvalidRecord):
        db.journal.mark_acked(11)
    assert db.journal.prune_acked() == 6
    assert [r.seq for r in db.journal.records()] == [7, 8, 9, 10]
    assert db.journal.acked_seq == 6


def test_outbox_columns_are_the_records_transposed(db: DeviceDatabase) -> None:
    """The agent's columnar read says exactly what the record read says, field for field,
    u64 card numbers above 2**63 and absent fields included."""
    assert db.journal.record_columns() == {
        name: [] for name in db.journal.record_columns(0, 1)
    }
    seq = db.journal.intent(tap(card=BIG, counter=3))
    db.journal.done(seq, "ok", counter_after=4, balance_after=8_000)
    db.journal.event({"kind": "rejection", "time": 5, "reason": 2})
    db.journal.intent(tap(counter=9, uid=None, line=None))
    for since, limit in ((0, 1000), (1, 2), (3, 1)):
        records = db.journal.records(since, limit, verify=False)
        columns = db.journal.record_columns(since, limit)
        assert "device_id" not in columns
        for name, values in columns.items():
            assert values == [getattr(r, name) for r in records], name
    assert db.journal.record_columns()["card_number"][:2] == [BIG, BIG]


def test_invalid_records_refused(db: DeviceDatabase) -> None:
    for bad in (
        {"kind": "Tap", "time": 1},
        {"kind": "tap", "time": "now"},
        {"kind": "tap", "time": 1, "uid": b"\x01"},
        {"kind": "tap", "time": 1, "card_number": -1},
        {"kind": "tap", "time": 1, "fare": 1 << 63},
        {"kind": "tap", "time": 1, "line": "x" * 65},
        {"kind": "tap", "time": 1, "vehicle": "tab\there"},
        {"kind": "tap", "time": 1, "colour": "red"},
        {"time": 1},
    ):
        with pytest.raises(InvalidRecord):
            db.journal.intent(bad)
    seq = db.journal.intent(tap())
    with pytest.raises(InvalidRecord):
        db.journal.done(seq, "OK!")
    with pytest.raises(InvalidRecord):
        db.journal.done(seq, "ok", balance_after="lots")
    assert db.journal.last_seq == 1 and len(db.journal.open_intents()) == 1


# --- failures: disk full, locked, read-only ---------------------------------------------------


def test_disk_full_then_recovery(db: DeviceDatabase) -> None:
    for i in range(5):
        db.journal.done(db.journal.intent(tap(counter=i)), "ok")
    db.blacklist.load_full(1, [(n, 1, None) for n in range(1, 501)])
    raw = db.connection
    raw.execute(f"PRAGMA max_page_count = {raw.execute('PRAGMA page_count').fetchone()[0]}")
    last = db.journal.last_seq
    with pytest.raises(StoreUnavailable) as info:
        for i in range(10_000):  # bounded: the limit is reached within a few pages
            last = db.journal.intent(tap(counter=100 + i, line="x" * 60, vehicle="y" * 60))
    assert info.value.code == "SQLITE_FULL"
    assert db.journal.last_seq == last  # the failed intent left nothing behind
    assert len(db.journal.open_intents()) == last - 10  # one per intent that returned
    with pytest.raises(StoreUnavailable):
        db.blacklist.load_full(2, [(n, 2, None) for n in range(10_000, 30_000)])
    assert (db.blacklist.version, db.blacklist.count) == (1, 500)
    assert db.blacklist.lookup(250) == BlacklistEntry(250, 1, None, 1)
    assert db.journal.verify() == []

    raw.execute("PRAGMA max_page_count = 1073741823")  # space is back
    seq = db.journal.intent(tap(counter=999))
    assert seq == last + 1
    db.journal.done(seq, "ok")
    assert db.blacklist.load_full(2, [(n, 2, None) for n in range(10_000, 30_000)]) == 20_000
    assert db.journal.verify() == []


def test_locked_too_long(db_path: Path, keys: MemoryKeyStore) -> None:
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys, busy_timeout_ms=50) as db:
        db.blacklist.load_full(1, [(7, 1, None)])
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as info:
            db.journal.intent(tap())
        assert info.value.code == "SQLITE_BUSY"
        assert db.blacklist.lookup(7) is not None  # WAL: readers do not wait for the writer
        blocker.execute("ROLLBACK")
        blocker.close()
        assert db.journal.intent(tap()) == 1


def test_read_only_is_unavailable(db: DeviceDatabase) -> None:
    db.connection.execute("PRAGMA query_only = ON")
    with pytest.raises(StoreUnavailable):
        db.journal.intent(tap())
    with pytest.raises(StoreUnavailable):
        db.blacklist.apply_delta(0, 1, add=[(1, 1, None)])
    db.connection.execute("PRAGMA query_only = OFF")
    assert db.journal.intent(tap()) == 1


# --- kill -9 durability ----------------------------------------------------------------------

CHILD = """
import sys, time
from firmware.core.keys import MemoryKeyStore
from firmware.stores import DeviceDatabase
keys = MemoryKeyStore({"journal-mac": bytes(range(16))})
db = DeviceDatabase.open(sys.argv[1], device_id="bus-0042-v1", journal_key=keys)
print("ready", flush=True)
deadline = time.monotonic() + 5.0
i = 0
while time.monotonic() < deadline and i < 2000:
    seq = db.journal.intent({"kind": "tap", "time": i, "card_number": 10**15 + i,
                             "counter_before": i})
    print("i", seq, flush=True)
    if i % 3:
        print("d", db.journal.done(seq, "ok", counter_after=i + 1), seq, flush=True)
    i += 1
"""


def test_kill_9_loses_nothing_reported_durable(db_path: Path, keys: MemoryKeyStore) -> None:
    rng = random.Random()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reported_intents: list[int] = []
    reported_dones: dict[int, int] = {}
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db_path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert child.stdout is not None
        lines: list[list[str]] = []
        ready = threading.Event()

        def read(stream=child.stdout, lines=lines, ready=ready) -> None:
            for line in stream:
                if line.endswith("\n"):  # a line cut by the kill was not reported
                    lines.append(line.split())
                ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert ready.wait(30), "the child did not start"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        reader.join(10)
        assert child.returncode == -signal.SIGKILL, "the child finished before the kill"
        for words in lines:
            if words[0] == "i":
                reported_intents.append(int(words[1]))
            elif words[0] == "d":
                reported_dones[int(words[1])] = int(words[2])
    assert len(reported_intents) > 10
    with DeviceDatabase.open(db_path, device_id=DEVICE, journal_key=keys) as db:
        assert db.journal.verify() == []
        for seq in reported_intents:
            record = db.journal.get(seq)
            assert record is not None and record.phase == "intent"
        for seq, intent in reported_dones.items():
            record = db.journal.get(seq)
            assert record is not None and record.link == intent
        seqs = reported_intents + list(reported_dones)
        assert len(seqs) == len(set(seqs))  # no number issued twice across the crashes
        assert db.journal.intent(tap()) > max(seqs)
        open_seqs = {r.seq for r in db.journal.open_intents()}
        assert open_seqs.isdisjoint(reported_dones.values())


# --- auth-failure rate limiting ---------------------------------------------------------------


def test_auth_failures_block_after_burst() -> None:
    limiter = AuthFailureLimiter(max_failures=5, window_s=60, block_s=300)
    uid = b"\x04\x01\x02\x03"
    for t in range(4):
        assert not limiter.note_auth_failure(uid, 100.0 + t)
    assert not limiter.auth_blocked(uid, 104.0)
    assert limiter.note_auth_failure(uid, 104.0)
    assert limiter.auth_blocked(uid, 105.0)
    assert limiter.auth_blocked(uid, 403.9)
    assert not limiter.auth_blocked(uid, 404.1)
    assert not limiter.auth_blocked(b"\x04\x09\x09\x09", 105.0)


def test_auth_failures_spread_out_do_not_block() -> None:
    limiter = AuthFailureLimiter(max_failures=5, window_s=60, block_s=300)
    uid = b"\x04\x01\x02\x03"
    for t in range(20):
        assert not limiter.note_auth_failure(uid, t * 20.0)  # at most 3 per minute
    assert not limiter.auth_blocked(uid, 400.0)
    assert len(limiter) == 1
    assert not limiter.auth_blocked(uid, 500.0)
    assert len(limiter) == 0  # a track with nothing left in the window is dropped


def test_auth_limiter_memory_is_bounded() -> None:
    limiter = AuthFailureLimiter(max_entries=100)
    for i in range(10_000):
        limiter.note_auth_failure(i.to_bytes(4, "big"), float(i))
    assert len(limiter) == 100
    with pytest.raises(ValueError):
        AuthFailureLimiter(max_failures=0)


# --- benchmarks (smoke: the figures exist; timings are never asserted) -----------------------


def test_bench_functions_report_their_figures(tmp_path: Path) -> None:
    figures = bench_blacklist(tmp_path, entries=3000, delta=200, lookups=2000)
    assert {"blacklist_full_1m_s", "blacklist_delta_10k_s", "blacklist_lookup_p99_us"} <= set(
        figures
    )
    assert figures["blacklist_lookup_hit_ratio"] == pytest.approx(0.5)
    journal = bench_journal(tmp_path, taps=20)
    assert journal["journal_wal_bytes_per_tap"] > 0
