"""The agent's parts without a broker: settings, the uplink buffer and its drop policy, batch
cutting and the in-flight window, configuration sync on a real device database, commands
and the log reader. The broker-facing behaviour is in test_agent.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol
from edge_agent.commands import ACTION_REBOOT, ACTION_RESYNC, EXIT_REBOOT, Commands
from edge_agent.config_sync import (
    APPLIED,
    DUPLICATE,
    REJECTED,
    RELOAD,
    SAME,
    STALE,
    SUPERSEDED,
    ConfigSync,
    Incoming,
    SyncResult,
)
from edge_agent.errors import (
    AgentConfigError,
    Expired,
    ProtocolError,
    ReplayRejected,
    SignatureInvalid,
)
from edge_agent.keys import public_hex
from edge_agent.logfile import LOG_FORMAT, UtcFormatter, open_log_handler, read_log_since
from edge_agent.outbox import BatchReader, OutgoingBatch, Waiting, Window
from edge_agent.settings import AgentSettings, BatchSettings, load_settings, settings_from_dict
from edge_agent.telemetry import HealthSampler, device_facts, read_temperature_c
from edge_agent.testing import make_device, write_taps
from edge_agent.uplink_queue import ROW_OVERHEAD, UplinkQueue
from firmware.core import tariffs
from firmware.stores import DeviceDatabase

KONYA = (Path(tariffs.__file__).parent / "konya-2025.toml").read_text()
DEV = "bus-0042-v1"
CENTER_HEX = "11" * 32


# -- settings ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_settings_get_working_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f'[device]\nid = "{DEV}"\n[identity]\ncenter_public = "{CENTER_HEX}"\n')
    s = load_settings(path)
    assert s.device.id == DEV and s.client_id == DEV
    assert s.device.db == tmp_path / "device.db"  # relative to the file
    assert s.identity.key == tmp_path / "device.key"
    assert s.queue_path == tmp_path / "device-uplink.db"
    assert s.log_path == tmp_path / "agent.log"
    assert (s.mqtt.protocol, s.mqtt.session, s.mqtt.tls) == ("5", "persistent", False)
    assert s.batch.max_records == 1000 and s.batch.window >= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\nhots = "a"\n',
         "unknown setting.*hots"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[batchh]\n', "unknown section"),
        ('[identity]\ncenter_public = "ab"\n', r"\[device\] id"),
        ('[device]\nid = "x"\n', "center_public is required"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\nport = "1883"\n',
         "port must be an integer"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\nprotocol = "4"\n',
         "protocol"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\nsession = "sticky"\n',
         "session"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[batch]\nwindow = 0\n',
         "window"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\ntls_cert = "c"\n'
         'tls_key = "k"\n', "tls_ca"),
        ('[device]\nid = "x y"\n[identity]\ncenter_public = "ab"\n', "id must be"),
        ("[device\n", "not valid TOML"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[mqtt]\nbackoff_max_s = 1'
         + "0" * 400 + "\n", "must be a number in range"),
        ('[device]\nid = "x"\n[identity]\ncenter_public = "ab"\n[batch]\nmax_age_s = nan\n',
         "max_age_s"),
    ],
)
def test_bad_settings_refused_with_a_clear_message(tmp_path: Path, text: str, message: str
                                                   ) -> None:
    with pytest.raises(AgentConfigError, match=message):
        load_settings(write(tmp_path, text))


def test_missing_settings_file(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_remote_settings_only_safe_sections() -> None:
    s = settings_from_dict({"device": {"id": DEV}, "identity": {"center_public": CENTER_HEX}})
    t = s.with_remote({"batch": {"window": 3}, "telemetry": {"interval_s": 5}})
    assert t.batch.window == 3 and t.telemetry.interval_s == 5.0
    assert t.batch.max_records == s.batch.max_records and t.mqtt == s.mqtt
    with pytest.raises(AgentConfigError, match="cannot be set remotely"):
        s.with_remote({"mqtt": {"host": "evil.example"}})
    with pytest.raises(AgentConfigError, match="window"):
        s.with_remote({"batch": {"window": 1000}})
    with pytest.raises(AgentConfigError, match="unknown"):
        s.with_remote({"batch": {"nope": 1}})


# -- uplink buffer -----------------------------------------------------------------------------


def test_queue_fifo_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with UplinkQueue.open(path, 1 << 20) as q:
        for i in range(5):
            q.put("telemetry", "afc/v1/dev/x/telemetry", f"t{i}".encode())
        q.put("event", "afc/v1/dev/x/event", b"e0")
        first = q.peek(3)
        assert [m.payload for m in first] == [b"t0", b"t1", b"t2"]
        q.delete(m.id for m in first)
    with UplinkQueue.open(path, 1 << 20) as q:
        assert [m.payload for m in q.peek(10)] == [b"t3", b"t4", b"e0"]
        assert q.bytes_used == sum(len(m.payload) + len(m.topic) + ROW_OVERHEAD
                                   for m in q.peek(10))


def test_queue_drops_oldest_telemetry_never_events(tmp_path: Path) -> None:
    budget = 4096
    with UplinkQueue.open(tmp_path / "q.db", budget) as q:
        topic = "afc/v1/dev/x/telemetry"
        row = 100 + len(topic) + ROW_OVERHEAD
        q.put("event", "afc/v1/dev/x/event", b"E" * 100)
        for i in range(100):
            q.put("telemetry", topic, bytes([i]) * 100)
        assert q.bytes_used <= budget
        kept = q.peek(1000)
        assert kept[0].cls == "event"  # the oldest message, but an event: kept
        tele = [m.payload[0] for m in kept if m.cls == "telemetry"]
        assert tele == list(range(100 - len(tele), 100))  # the newest telemetry survives
        assert q.dropped == 100 - len(tele) and len(tele) >= budget // row - 2
        # events go in even when only events would fit ...
        for _ in range(60):
            assert q.put("event", "afc/v1/dev/x/event", b"E" * 100) is not None
        assert q.count("telemetry") == 0 and q.count("event") == 61
        # ... and telemetry that cannot fit is itself dropped
        before = q.dropped
        assert q.put("telemetry", topic, b"late") is None
        assert q.dropped == before + 1
        assert q.take_dropped() == before + 1 and q.dropped == 0


def test_corrupt_queue_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"garbage, not sqlite" * 500)
    with caplog.at_level(logging.WARNING), UplinkQueue.open(path, 1 << 20) as q:
        assert q.count() == 0
        q.put("telemetry", "t", b"x")
    assert any("unreadable" in r.message for r in caplog.records)
    assert list(tmp_path.glob("q.db.corrupt-*"))


# -- batches and the window --------------------------------------------------------------------


@pytest.fixture
def device(tmp_path: Path):
    return make_device(tmp_path / "dev", DEV, "127.0.0.1", 1)


def test_batches_cut_by_count_age_and_bytes(device) -> None:
    key = device.key
    reader = BatchReader(DEV, key, BatchSettings(max_records=50, max_bytes=256 * 1024,
                                                 max_age_s=60))
    with device.open_db() as db:
        now = int(time.time() * 1000)
        write_taps(db, 10, start_ms=now)  # 20 records, fresh
        assert isinstance(reader.next_batch(db, 0, now), Waiting)
        batch = reader.next_batch(db, 0, now, True)
        assert isinstance(batch, OutgoingBatch) and (batch.first, batch.last) == (1, 20)
        # old records leave without force
        assert isinstance(reader.next_batch(db, 0, now + 61_000), OutgoingBatch)
        write_taps(db, 40, start_ms=now)  # 100 records: full batches leave at once
        full = reader.next_batch(db, 0, now)
        assert isinstance(full, OutgoingBatch) and full.count == 50
        decoded = protocol.decode_batch(full.payload, {DEV: key.public_key()}.get)
        assert [r.seq for r in decoded.records] == list(range(1, 51))
        assert decoded.records == tuple(  # every field but the device-local MAC travels
            dataclasses.replace(r, mac=b"") for r in db.journal.records(0, 50, verify=False)
        )
        assert reader.next_batch(db, 100, now) is None
        write_taps(db, 200, start_ms=now)  # 500 records
        small = BatchReader(DEV, key, BatchSettings(max_records=500, max_bytes=2048))
        cut = small.next_batch(db, 0, now, True)
        assert isinstance(cut, OutgoingBatch) and len(cut.payload) <= 2048
        assert 1 <= cut.count < 500 and cut.first == 1 and cut.last == cut.count
        assert reader.last_tap is not None


def test_a_backlog_leaves_in_full_batches_at_the_default_settings(device) -> None:
    """Issue 5: a device draining a backlog sends max_records (1000) per batch by default,
    each far inside max_bytes, every field but the MAC intact."""
    settings = BatchSettings()
    reader = BatchReader(DEV, device.key, settings)
    with device.open_db() as db:
        now = int(time.time() * 1000)
        write_taps(db, 600, start_ms=now)  # 1200 records, fresh
        batch = reader.next_batch(db, 0, now)  # full: leaves without waiting
        assert isinstance(batch, OutgoingBatch) and batch.count == settings.max_records
        assert len(batch.payload) <= settings.max_bytes // 8
        decoded = protocol.decode_batch(batch.payload, {DEV: device.key.public_key()}.get)
        assert decoded.records == tuple(
            dataclasses.replace(r, mac=b"") for r in db.journal.records(0, 1000, verify=False)
        )
        rest = reader.next_batch(db, batch.last, now, True)
        assert isinstance(rest, OutgoingBatch) and (rest.first, rest.last) == (1001, 1200)


@pytest.mark.parametrize(("column", "value", "message"), [
    ("line", "48\n", "line must be printable"),
    ("uid", b"12345", "uid must be 4, 7 or 10 bytes"),
    ("kind", "Tap", "kind must be a token"),
    ("phase", "opened", "unknown phase"),
])
def test_a_journal_record_the_codec_refuses_is_never_sent(device, column, value,
                                                          message) -> None:
    """A record changed behind the journal's back (its rules are checked on write only)
    stops the outbox with ProtocolError naming it; nothing of the batch is signed."""
    with device.open_db() as db:
        write_taps(db, 20, start_ms=1_760_000_000_000)
    raw = sqlite3.connect(device.db_path)
    with raw:
        raw.execute(f"UPDATE journal SET {column} = ? WHERE seq = 7", (value,))
    raw.close()
    reader = BatchReader(DEV, device.key, BatchSettings(max_records=50))
    with device.open_db() as db:
        with pytest.raises(ProtocolError, match=f"record seq 7: {message}"):
            reader.next_batch(db, 0, 1_760_000_100_000, True)
        ok = reader.next_batch(db, 7, 1_760_000_100_000, True)  # the records after it go
        assert isinstance(ok, OutgoingBatch) and ok.first == 8


def test_window_go_back_and_acks() -> None:
    w = Window(BatchSettings(window=2, ack_timeout_s=5, max_age_s=1), acked=10)
    assert w.can_send()
    w.sent(11, 20, now=100.0)
    w.sent(21, 30, now=101.0)
    assert not w.can_send() and w.next_deadline(102.0) == 3.0
    w.acknowledged(15)  # partial ack: the first batch stays in flight
    assert len(w.inflight) == 2 and w.acked == 15
    w.acknowledged(20)
    assert [b.first for b in w.inflight] == [21] and w.can_send()
    assert not w.timed_out(105.9) and w.timed_out(106.0)
    assert w.go_back() == 1 and w.sent_upto == 20 and w.retransmissions == 1
    w.acknowledged(5)  # older ack: nothing changes
    assert w.acked == 20
    w.acknowledged(40)  # acked beyond what this connection sent (an earlier connection's)
    assert w.sent_upto == 40 and not w.inflight
    assert not w.waited_enough(0.0)
    assert w.note_waiting(200.0) == 1.0 and w.waited_enough(201.0)
    w.reset(35)
    assert w.acked == 40 and w.sent_upto == 40


# -- configuration sync on a real database -----------------------------------------------------


@pytest.fixture
def sync_env(tmp_path: Path):
    center = Ed25519PrivateKey.generate()
    settings = settings_from_dict(
        {"device": {"id": DEV}, "identity": {"center_public": public_hex(center)}}
    )
    applied: list[dict] = []
    sync = ConfigSync(DEV, center.public_key(), settings, on_agent_settings=applied.append)
    with DeviceDatabase.open(tmp_path / "d.db", device_id=DEV) as db:
        yield sync, db, center, applied


def push(sync: ConfigSync, db: DeviceDatabase, bundle: protocol.Bundle,
         key: Ed25519PrivateKey, topic: str | None = None) -> SyncResult:
    topic = topic or protocol.cfg_topic(bundle.kind)
    decoded = sync.decode(topic, protocol.encode_bundle(bundle, key), int(time.time() * 1000))
    if isinstance(decoded, SyncResult):
        if decoded.outcome == REJECTED:
            sync.report_rejection(db, topic, decoded)
        return decoded
    assert isinstance(decoded, Incoming)
    return sync.apply(db, decoded)


def events(db: DeviceDatabase) -> list[tuple[str, dict]]:
    return [(e.event, e.detail) for e in db.events.pending(1000)]


def test_every_kind_applies_atomically_and_reports(sync_env) -> None:
    sync, db, center, applied = sync_env
    now = int(time.time() * 1000)
    bundles = [
        protocol.Bundle("fares", 3, {"name": "konya-2025", "toml": KONYA}, now),
        protocol.Bundle("blacklist", 5, {"entries": [(7, 1, None), (8, 2, b"\x01\x02\x03\x04")]},
                        now),
        protocol.Bundle("blacklist-delta", 6, {"add": [(9, 3, None)], "remove": [7]}, now,
                        base=5),
        protocol.Bundle("actions", 2, {"actions": [{
            "action_id": "a1", "card_number": 42, "kind": "topup", "valid_until": now + 10**9,
            "amount": 5000, "product_id": None, "card_seq": 1}]}, now),
        protocol.Bundle("credit", 4, {"allowance": {
            "dealer_id": "D1", "allowance_id": "A1", "amount": 100_000, "valid_from": 1,
            "valid_until": 2, "signature": "00" * 64}}, now),
        protocol.Bundle("agent", 1, {"settings": {"telemetry": {"interval_s": 30}}}, now),
    ]
    for b in bundles:
        assert push(sync, db, b, center).outcome == APPLIED, b.kind
    assert db.config.fare_table() is not None and db.config.version("fares") == 3
    assert db.blacklist.version == 6 and db.blacklist.lookup(7) is None
    assert db.blacklist.lookup(9) is not None and db.blacklist.lookup(8) is not None
    assert db.actions.version == 2 and db.actions.get("a1") is not None
    assert json.loads(db.config.get("credit").body)["amount"] == 100_000
    assert applied == [{"telemetry": {"interval_s": 30}}]
    assert [e for e, _ in events(db)] == ["cfg-applied"] * 6
    assert {d["kind"] for _, d in events(db)} == {b.kind for b in bundles}


def test_retained_again_is_silent_rollback_refused_once(sync_env) -> None:
    sync, db, center, _ = sync_env
    now = int(time.time() * 1000)
    b5 = protocol.Bundle("blacklist", 5, {"entries": [(7, 1, None)]}, now)
    payload = protocol.encode_bundle(b5, center)
    topic = protocol.cfg_topic("blacklist")
    first = sync.decode(topic, payload, now)
    assert isinstance(first, Incoming) and sync.apply(db, first).outcome == APPLIED
    assert sync.decode(topic, payload, now).outcome == DUPLICATE  # same payload: no work
    # the same version signed again (another payload): silently "same"
    assert push(sync, db, protocol.Bundle("blacklist", 5, {"entries": []}, now + 1),
                center).outcome == SAME
    assert db.blacklist.count == 1
    old = protocol.Bundle("blacklist", 4, {"entries": []}, now)
    assert push(sync, db, old, center).outcome == STALE
    assert push(sync, db, protocol.Bundle("blacklist", 4, {"entries": []}, now + 2),
                center).outcome == STALE
    assert db.blacklist.version == 5 and db.blacklist.lookup(7) is not None
    rejected = [d for e, d in events(db) if e == "cfg-rejected"]
    assert len(rejected) == 1 and "rollback" in rejected[0]["reason"]


def test_forged_expired_misaddressed_refused(sync_env) -> None:
    sync, db, center, _ = sync_env
    now = int(time.time() * 1000)
    forger = Ed25519PrivateKey.generate()
    good = protocol.Bundle("credit", 1, {"allowance": {
        "dealer_id": "D", "allowance_id": "A", "amount": 1, "valid_from": 1, "valid_until": 2,
        "signature": ""}}, now)
    assert push(sync, db, good, forger).reason.startswith("signature")
    expired = protocol.Bundle("agent", 1, {"settings": {}}, now, expires=now - 1000)
    assert push(sync, db, expired, center).reason.startswith("expired")
    other = protocol.Bundle("agent", 1, {"settings": {}}, now, target="bus-9")
    assert push(sync, db, other, center).outcome == REJECTED
    # a valid fares bundle replayed on the credit topic
    fares = protocol.Bundle("fares", 1, {"name": "k", "toml": KONYA}, now)
    assert push(sync, db, fares, center, protocol.cfg_topic("credit")).outcome == REJECTED
    # a fares bundle whose tariff does not load, and unsafe agent settings
    bad_fares = protocol.Bundle("fares", 2, {"name": "k", "toml": "nope = 1"}, now)
    assert push(sync, db, bad_fares, center).outcome == REJECTED
    unsafe = protocol.Bundle("agent", 2, {"settings": {"mqtt": {"host": "evil"}}}, now)
    assert push(sync, db, unsafe, center).outcome == REJECTED
    # garbage
    garbage = sync.decode("afc/v1/cfg/fares", b"\xa1\x01\x02garbage", now)
    assert isinstance(garbage, SyncResult) and garbage.outcome == REJECTED
    assert db.config.versions() == {} and db.blacklist.version == 0
    assert all(e == "cfg-rejected" for e, _ in events(db))
    assert len(events(db)) == 6  # one per refused bundle (garbage only logged here)


def test_delta_on_wrong_base_requests_full_reload(sync_env) -> None:
    sync, db, center, _ = sync_env
    now = int(time.time() * 1000)
    push(sync, db, protocol.Bundle("blacklist", 5, {"entries": [(1, 1, None)]}, now), center)
    gap = protocol.Bundle("blacklist-delta", 8, {"add": [(2, 1, None)], "remove": []}, now,
                          base=7)
    assert push(sync, db, gap, center).outcome == RELOAD
    assert db.blacklist.version == 5 and db.blacklist.lookup(2) is None
    reload = [d for e, d in events(db) if e == "cfg-reload-request"]
    assert reload == [{"kind": "blacklist", "version": 5, "offered": 8,
                       "delta_kind": "blacklist-delta"}]
    # an old delta retained from before the full list: superseded, neither a reload nor a
    # rejection to report
    before = events(db)
    old = protocol.Bundle("blacklist-delta", 4, {"add": [], "remove": []}, now, base=3)
    assert push(sync, db, old, center).outcome == SUPERSEDED
    assert events(db) == before


def test_the_full_list_under_the_deltas_in_force_is_not_a_rollback(sync_env) -> None:
    """After full 5 and delta 5->6 the broker still retains full 5 (the center publishes
    deltas on their own topic): at every agent start it arrives again and must be neither
    applied nor reported, while a full list older than that base still is."""
    sync, db, center, _ = sync_env
    now = int(time.time() * 1000)
    assert push(sync, db, protocol.Bundle("blacklist", 5, {"entries": [(1, 1, None)]}, now),
                center).outcome == APPLIED
    assert push(sync, db, protocol.Bundle("blacklist-delta", 6, {"add": [(2, 1, None)],
                                                                 "remove": []}, now, base=5),
                center).outcome == APPLIED
    assert db.blacklist.base_version == 5 and db.blacklist.version == 6
    before = events(db)
    for restart in range(3):  # a new process each time: nothing remembered
        sync.forget()
        again = protocol.Bundle("blacklist", 5, {"entries": [(1, 1, None)]}, now + restart)
        assert push(sync, db, again, center).outcome == SUPERSEDED
    assert events(db) == before and db.blacklist.lookup(2) is not None
    older = protocol.Bundle("blacklist", 4, {"entries": []}, now)
    assert push(sync, db, older, center).outcome == STALE
    assert [e for e, _ in events(db)][len(before):] == ["cfg-rejected"]


# -- commands ----------------------------------------------------------------------------------


def test_commands_nonce_replay_and_actions(tmp_path: Path) -> None:
    center = Ed25519PrivateKey.generate()
    device = Ed25519PrivateKey.generate()
    logfile = tmp_path / "agent.log"
    cmds = Commands(DEV, center.public_key(), device, logfile, status=lambda: {"acked": 3})
    now = int(time.time() * 1000)

    def cmd(name: str, nonce: int, *, key=center, expires=now + 60_000, args=None) -> bytes:
        return protocol.encode_command(
            protocol.Command(DEV, f"id{nonce}", name, args or {}, nonce, now, expires), key)

    with DeviceDatabase.open(tmp_path / "d.db", device_id=DEV) as db:
        ping = cmds.decode(cmd("ping", 5), now)
        Commands.accept(db, ping)
        result = cmds.run(ping, now)
        reply = protocol.decode_reply(cmds.encode(result.reply), device.public_key())
        assert reply.ok and reply.result == {"pong": True, "acked": 3} and reply.id == "id5"
        with pytest.raises(ReplayRejected):
            Commands.accept(db, cmds.decode(cmd("ping", 5), now))
        with pytest.raises(ReplayRejected):
            Commands.accept(db, cmds.decode(cmd("ping", 4), now))
        refusal = protocol.decode_reply(cmds.refusal(ping, "replay", now), device.public_key())
        assert not refusal.ok and refusal.error == "replay"
        with pytest.raises(SignatureInvalid):
            cmds.decode(cmd("ping", 9, key=Ed25519PrivateKey.generate()), now)
        with pytest.raises(Expired):
            cmds.decode(cmd("ping", 9, expires=now - 1), now)
        resync = cmds.decode(cmd("resync-config", 6), now)
        Commands.accept(db, resync)
        assert cmds.run(resync, now).action == ACTION_RESYNC
        reboot = cmds.decode(cmd("reboot-app", 7), now)
        Commands.accept(db, reboot)
        out = cmds.run(reboot, now)
        assert out.action == ACTION_REBOOT and out.reply.result == {"exit": EXIT_REBOOT}
        unknown = cmds.decode(cmd("format-disk", 8), now)
        assert not cmds.run(unknown, now).reply.ok
        bad = cmds.decode(cmd("send-logs", 9, args={"since": "yesterday"}), now)
        assert "bad arguments" in cmds.run(bad, now).reply.error
    with DeviceDatabase.open(tmp_path / "d.db", device_id=DEV) as db, \
            pytest.raises(ReplayRejected):  # the nonce survives a restart
        Commands.accept(db, cmds.decode(cmd("ping", 7), now))


def test_log_reader_since_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    handler = open_log_handler(path, 4096, 3)  # tiny: forces rotation
    logger = logging.getLogger("afc.test.logreader")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(200):
            logger.info("line %03d %s", i, "x" * 40)
            if i == 149:
                time.sleep(0.01)
                mark = int(time.time() * 1000)
                time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert path.with_name("agent.log.1").exists()
    recent = read_log_since(path, mark, 1 << 20)
    numbers = [int(line.split("line ")[1][:3]) for line in recent.text.splitlines()]
    assert numbers == list(range(150, 200)) and not recent.truncated
    cut = read_log_since(path, mark, 1024)
    assert cut.truncated and len(cut.text.encode()) <= 1024 and cut.next_since >= mark
    assert read_log_since(tmp_path / "missing.log", 0, 100).text == ""
    assert UtcFormatter(LOG_FORMAT).format(logging.makeLogRecord({"msg": "m"}))[23] == "Z"


# -- telemetry sources -------------------------------------------------------------------------


def test_health_and_device_facts(device, tmp_path: Path) -> None:
    sample = HealthSampler(tmp_path).sample()
    assert sample["disk_free_mb"] > 0 and sample["mem_used_mb"] > 0 and "cpu_pct" in sample
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("47500\n")
    (tmp_path / "thermal" / "thermal_zone1").mkdir()
    (tmp_path / "thermal" / "thermal_zone1" / "temp").write_text("garbage")
    assert read_temperature_c(tmp_path / "thermal") == 47.5
    assert read_temperature_c(tmp_path / "none") is None
    with device.open_db() as db:
        now = int(time.time() * 1000)
        write_taps(db, 3, start_ms=now - 30_000, rng=random.Random(2))
        db.events.set_status("reader", "lost")
        facts = device_facts(db, now)
        assert facts["outbox_depth"] == 6 and facts["outbox_age_s"] == 30
        assert facts["reader"] == "lost" and facts["events_pending"] == 0
        db.journal.mark_acked(6)
        assert device_facts(db, now)["outbox_depth"] == 0


def test_agent_settings_type(device) -> None:
    assert isinstance(load_settings(device.config), AgentSettings)


def test_cli_help_teaches_and_bad_config_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tools.agent_cmd import agent

    result = CliRunner().invoke(agent, ["--help"])
    assert result.exit_code == 0
    assert "--once" in result.output and "75" in result.output and "[device]" in result.output
    bad = write(tmp_path, "[device]\nid = 'x'\n")
    result = CliRunner().invoke(agent, ["--config", str(bad)])
    assert result.exit_code == 1 and "center_public is required" in result.output
