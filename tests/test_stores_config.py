"""Schema 5 of the device database: the config store, the event log, device status and the
agent's durable counters. Real SQLite files; concurrency through two real connections."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from firmware.core import tariffs
from firmware.core.fares import FareTable
from firmware.stores import (
    SCHEMA_VERSION,
    DeviceDatabase,
    EventRecord,
    InvalidRecord,
    StaleVersion,
    StoreCorrupt,
)
from firmware.stores import schema as schema_module

DEVICE = "bus-0042-v1"
KONYA = (Path(tariffs.__file__).parent / "konya-2025.toml").read_bytes()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "device.db"


@pytest.fixture
def db(db_path: Path):
    with DeviceDatabase.open(db_path, device_id=DEVICE) as handle:
        yield handle


def test_schema_5_tables(db: DeviceDatabase) -> None:
    assert SCHEMA_VERSION >= 5 and db.schema_version == SCHEMA_VERSION
    names = {r[0] for r in db.connection.execute("SELECT name FROM sqlite_master")}
    assert {"config", "events", "device_status", "agent_state"} <= names


def test_schema_4_file_migrates_keeping_its_data(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:4])
    with DeviceDatabase.open(db_path, device_id=DEVICE) as old:
        assert old.schema_version == 4
        old.blacklist.load_full(3, [(7, 1, None)])
    monkeypatch.undo()
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.schema_version == SCHEMA_VERSION
        assert db.blacklist.lookup(7) is not None
        assert db.config.version("fares") == 0 and db.events.last_seq == 0


# -- config store ------------------------------------------------------------------------------


def test_put_get_and_versions(db: DeviceDatabase) -> None:
    assert db.config.get("credit") is None and db.config.version("credit") == 0
    db.config.put("credit", 1, b'{"amount":1}', applied=123)
    entry = db.config.get("credit")
    assert entry is not None
    assert (entry.kind, entry.version, entry.body, entry.applied) == (
        "credit", 1, b'{"amount":1}', 123)
    db.config.put("credit", 5, b'{"amount":2}')
    assert db.config.version("credit") == 5
    assert db.config.versions() == {"credit": 5}


def test_rollback_and_replay_refused(db: DeviceDatabase) -> None:
    db.config.put("agent", 4, b"{}")
    for version in (4, 3, 1):
        with pytest.raises(StaleVersion) as info:
            db.config.put("agent", version, b'{"x":1}')
        assert (info.value.current, info.value.offered) == (4, version)
    assert db.config.get("agent").body == b"{}"  # type: ignore[union-attr]


def test_bad_input_refused(db: DeviceDatabase) -> None:
    for kind in ("", "Fares", "x" * 40, "a b", 5):
        with pytest.raises(InvalidRecord):
            db.config.put(kind, 1, b"")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord):
        db.config.put("credit", 0, b"")
    with pytest.raises(InvalidRecord):
        db.config.put("credit", 1, "text, not bytes")  # type: ignore[arg-type]


def test_fare_table_round_trip(db: DeviceDatabase) -> None:
    assert db.config.fare_table() is None
    db.config.put("fares", 2, KONYA)
    table = db.config.fare_table()
    assert isinstance(table, FareTable)
    assert table == FareTable.from_toml(KONYA)


def test_fares_that_do_not_load_are_refused_before_writing(db: DeviceDatabase) -> None:
    db.config.put("fares", 1, KONYA)
    for body in (b"not toml = = =", b'name = "x"\n', b"\xff\xfe"):
        with pytest.raises(InvalidRecord, match="fare table"):
            db.config.put("fares", 2, body)
    assert db.config.version("fares") == 1 and db.config.fare_table() is not None


def test_corrupted_fare_table_is_reported(db: DeviceDatabase) -> None:
    db.config.put("fares", 1, KONYA)
    db.connection.execute("UPDATE config SET body = x'00' WHERE kind = 'fares'")
    with pytest.raises(StoreCorrupt):
        db.config.fare_table()


def test_put_is_atomic_between_processes(db_path: Path) -> None:
    """Two connections race the same versions: each version lands once, versions only rise."""
    DeviceDatabase.open(db_path, device_id=DEVICE).close()
    wins: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        with DeviceDatabase.open(db_path, device_id=DEVICE, busy_timeout_ms=10_000) as db:
            for version in range(1, 41):
                try:
                    db.config.put("credit", version, str(version).encode())
                except StaleVersion:
                    continue
                with lock:
                    wins.append(version)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(wins) == sorted(set(wins)) and 40 in wins
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.config.get("credit").body == b"40"  # type: ignore[union-attr]


# -- agent counters ----------------------------------------------------------------------------


def test_advance_only_forwards_and_durably(db_path: Path) -> None:
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.config.advance("cmd_nonce", 5)
        assert not db.config.advance("cmd_nonce", 5)
        assert not db.config.advance("cmd_nonce", 4)
        assert db.config.advance("cmd_nonce", 6)
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        assert db.config.state("cmd_nonce") == 6
        assert not db.config.advance("cmd_nonce", 6)
        db.config.set_state("last_tap_ts", 99)
        assert db.config.state("last_tap_ts") == 99
        with pytest.raises(InvalidRecord):
            db.config.advance("cmd_nonce", -1)
        with pytest.raises(InvalidRecord):
            db.config.set_state("BAD KEY", 1)


# -- events ------------------------------------------------------------------------------------


def test_events_numbered_forwarded_and_deleted(db_path: Path) -> None:
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        a = db.events.raise_event("reader-lost", "alarm", {"port": "/dev/ttyS0"}, time=10)
        b = db.events.raise_event("in-service")
        assert (a, b) == (1, 2)
        pending = db.events.pending()
        assert pending[0] == EventRecord(1, 10, "reader-lost", "alarm", {"port": "/dev/ttyS0"})
        assert pending[1].severity == "info" and pending[1].detail == {}
        assert db.events.delete([1, 2]) == 2
        assert db.events.count == 0
    with DeviceDatabase.open(db_path, device_id=DEVICE) as db:
        # numbers keep growing after every row was forwarded and the file reopened
        assert db.events.raise_event("door-open", "warning") == 3
        assert [e.seq for e in db.events.pending(after=2)] == [3]


def test_event_cap_drops_info_then_warning_never_alarms(db: DeviceDatabase) -> None:
    db.events.cap = 10
    for i in range(4):
        db.events.raise_event("reader-lost", "alarm", {"i": i})
    for i in range(3):
        db.events.raise_event("disk-low", "warning", {"i": i})
    for i in range(20):
        db.events.raise_event("in-service", "info", {"i": i})
    kept = db.events.pending(100)
    assert len(kept) == 10
    assert sum(e.severity == "alarm" for e in kept) == 4
    assert sum(e.severity == "warning" for e in kept) == 3
    # the newest info events survive, the oldest went first
    assert [e.detail["i"] for e in kept if e.severity == "info"] == [17, 18, 19]
    for i in range(10):
        db.events.raise_event("reader-lost", "alarm", {"i": 100 + i})
    kept = db.events.pending(100)
    assert all(e.severity == "alarm" for e in kept) and len(kept) == 14


def test_event_input_checked(db: DeviceDatabase) -> None:
    with pytest.raises(InvalidRecord):
        db.events.raise_event("Reader Lost")
    with pytest.raises(InvalidRecord):
        db.events.raise_event("reader-lost", "critical")
    with pytest.raises(InvalidRecord):
        db.events.raise_event("reader-lost", detail={"x": object()})
    with pytest.raises(InvalidRecord):
        db.events.raise_event("reader-lost", detail={"x": "y" * 5000})
    with pytest.raises(InvalidRecord):
        db.events.raise_event("reader-lost", detail=["not", "a", "map"])  # type: ignore[arg-type]
    assert db.events.count == 0 and db.events.last_seq == 0


def test_unreadable_detail_does_not_block_forwarding(db: DeviceDatabase) -> None:
    db.events.raise_event("door-open")
    db.connection.execute("UPDATE events SET detail = 'not json'")
    assert db.events.pending()[0].detail == {"unreadable": True}


def test_status(db: DeviceDatabase) -> None:
    assert db.events.status() == {}
    db.events.set_status("reader", "ok", time=5)
    db.events.set_status("reader", "lost", time=6)
    assert db.events.status() == {"reader": ("lost", 6)}
    for bad in ({"name": "Bad", "value": 1}, {"name": "x", "value": True},
                {"name": "x", "value": "y" * 65}, {"name": "x", "value": [1]}):
        with pytest.raises(InvalidRecord):
            db.events.set_status(bad["name"], bad["value"])  # type: ignore[arg-type]


def test_events_from_another_process_connection(db_path: Path) -> None:
    """The application raises, the agent (another connection) reads and deletes."""
    DeviceDatabase.open(db_path, device_id=DEVICE).close()
    with DeviceDatabase.open(db_path, device_id=DEVICE) as app, \
            DeviceDatabase.open(db_path, device_id=DEVICE) as agent:
        seqs = [app.events.raise_event("reader-lost", "alarm") for _ in range(5)]
        got = agent.events.pending()
        assert [e.seq for e in got] == seqs
        agent.events.delete(seqs[:3])
        assert [e.seq for e in app.events.pending()] == seqs[3:]
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT value FROM meta WHERE key = 'event_seq'").fetchone()[0] == 5
    raw.close()
