"""The edge agent against a real Mosquitto and a minimal acking center (edge_agent.testing).

What must hold: records leave the journal only on the center's signed cumulative ack (never
on PUBACK), unacknowledged batches are sent again, a broker restart mid-drain loses nothing,
telemetry is buffered offline under its drop policy, events arrive, signed bundles are
applied (and forged/stale/broken ones refused and reported), commands are authenticated and
replay-proof, and garbage on any subscribed topic leaves the agent running. Waits are
bounded polls; nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol
from edge_agent.commands import EXIT_REBOOT
from edge_agent.testing import AckingPeer, AgentThread, make_device, wait_until, write_taps
from firmware.core import tariffs
from simulators.broker import BrokerTls, MosquittoBroker

DEV = "bus-0042-v1"
KONYA = (Path(tariffs.__file__).parent / "konya-2025.toml").read_text()


@pytest.fixture
def device(tmp_path: Path, mosquitto: MosquittoBroker):
    return make_device(tmp_path / "dev", DEV, mosquitto.host, mosquitto.port)


@pytest.fixture
def peer(device, mosquitto: MosquittoBroker):
    with AckingPeer(mosquitto.host, mosquitto.port, device.center_key,
                    {DEV: device.public}) as center:
        yield center


def journal_state(device) -> tuple[int, int]:
    """(acked mark, records still in the journal), read cheaply: tests poll it while the
    agent runs in this process."""
    conn = sqlite3.connect(f"file:{device.db_path}?mode=ro", uri=True, timeout=5)
    try:
        acked = conn.execute("SELECT value FROM meta WHERE key = 'journal_acked'").fetchone()
        count = conn.execute("SELECT count(*) FROM journal").fetchone()
        return int(acked[0]), int(count[0])
    finally:
        conn.close()


def reconfigure(device, **sections: dict) -> None:
    """Rewrite agent.toml with changed sections (a new device folder is not needed)."""
    text = device.config.read_text()
    for name, values in sections.items():
        for key, value in values.items():
            line = f"{key} = {json.dumps(value)}"
            marker = f"[{name}]\n"
            head, _, tail = text.partition(marker)
            lines = [ln for ln in tail.split("\n") if not ln.startswith(f"{key} =")]
            text = head + marker + line + "\n" + "\n".join(lines)
    device.config.write_text(text)


def json_messages(peer: AckingPeer, leaf: str) -> list[dict]:
    return [json.loads(p) for _, p in peer.leaf(leaf) if p]


# -- the outbox --------------------------------------------------------------------------------


def test_prunes_only_on_the_centers_ack_not_on_puback(device, peer) -> None:
    peer.acking = False
    with device.open_db() as db:
        write_taps(db, 150)  # 300 records
    with AgentThread(device.config) as run:
        # the broker PUBACKed every batch: the center has every record ...
        assert wait_until(lambda: peer.count(DEV) == 300)
        # ... but without the application ack nothing is marked or pruned
        assert journal_state(device) == (0, 300)
        assert run.agent.stats["acks"] == 0
        peer.ack(DEV, 120)
        assert wait_until(lambda: journal_state(device)[0] == 120)
        with device.open_db() as db:  # pruning may wait, but never touches unacked records
            assert [r.seq for r in db.journal.records(120, 1000, verify=False)] == list(
                range(121, 301))
        peer.ack(DEV, 300)
        assert wait_until(lambda: journal_state(device) == (300, 0))
        assert run.stop() == 0
    assert peer.seqs(DEV) == list(range(1, 301))


def test_unacknowledged_batches_are_sent_again(device, peer) -> None:
    reconfigure(device, batch={"ack_timeout_s": 0.5, "max_records": 40, "window": 2})
    peer.acking = False
    with device.open_db() as db:
        write_taps(db, 50)  # 100 records
    with AgentThread(device.config) as run:
        # the window holds 2 batches; without acks the agent goes back and sends them again
        assert wait_until(lambda: [b[1] for b in peer.batches].count(1) >= 2)
        assert journal_state(device)[0] == 0
        assert run.agent.stats["retransmissions"] >= 1
        peer.acking = True
        peer.ack(DEV, peer.upto(DEV))
        assert wait_until(lambda: journal_state(device) == (100, 0))
    assert peer.seqs(DEV) == list(range(1, 101)) and peer.duplicates > 0
    assert not peer.refused  # a resent record is identical to the first copy


def test_forged_foreign_and_unissued_acks_are_ignored(device, peer) -> None:
    peer.acking = False
    with device.open_db() as db:
        write_taps(db, 10)  # 20 records
    with AgentThread(device.config) as run:
        assert wait_until(lambda: peer.count(DEV) == 20)
        now = int(time.time() * 1000)
        ack_topic = protocol.dev_topic(DEV, "ack")
        forger = Ed25519PrivateKey.generate()
        peer.publish(ack_topic, protocol.encode_ack(protocol.Ack(DEV, 20, now), forger))
        peer.publish(ack_topic, protocol.encode_ack(protocol.Ack("bus-9", 20, now),
                                                    device.center_key))
        peer.ack(DEV, 10_000)  # a seq this device never issued
        peer.ack(DEV, 2)  # in order behind the others: once it counts, they were handled
        assert wait_until(lambda: journal_state(device)[0] == 2)
        assert journal_state(device)[0] == 2
        assert run.agent.stats["acks_ignored"] == 1 and run.agent.stats["rejected"] >= 2
        peer.ack(DEV, 20)
        assert wait_until(lambda: journal_state(device) == (20, 0))


def test_taps_written_while_running_flow_continuously(device, peer) -> None:
    with AgentThread(device.config):
        with device.open_db() as db:
            for i in range(5):
                write_taps(db, 20, rng=random.Random(i))
                time.sleep(0.05)
        assert wait_until(lambda: journal_state(device) == (200, 0))
    assert peer.seqs(DEV) == list(range(1, 201))


def test_broker_restart_mid_drain_loses_nothing(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "broker", persistence=True) as broker:
        device = make_device(tmp_path / "dev", DEV, broker.host, broker.port,
                             sections={"batch": {"max_records": 100, "window": 2}})
        with device.open_db() as db:
            write_taps(db, 1500)  # 3000 records
        with AckingPeer(broker.host, broker.port, device.center_key,
                        {DEV: device.public}) as peer, AgentThread(device.config) as run:
            assert wait_until(lambda: peer.upto(DEV) > 0)
            broker.restart(down_for=0.3)
            assert wait_until(lambda: journal_state(device) == (3000, 0), timeout=40)
            assert run.agent.stats["connections"] >= 2
        assert peer.seqs(DEV) == list(range(1, 3001))
        assert not peer.refused


def test_mqtt_311_and_clean_session(device, peer) -> None:
    reconfigure(device, mqtt={"protocol": "3.1.1", "session": "clean"})
    with device.open_db() as db:
        write_taps(db, 30)
    run = AgentThread(device.config, once=True, timeout_s=30).start()
    assert run.join(40) == 0
    assert journal_state(device) == (60, 0) and peer.upto(DEV) == 60


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    from edge_agent.pki import LocalCa
    from edge_agent.tls import client_ssl_context

    ca = LocalCa.create(tmp_path / "ca", "test-ca")
    ca.issue_server("broker")
    dev_cert, dev_key = ca.issue_device(DEV)
    center_cert, center_key = ca.issue_center("ingest")
    # mosquitto started as root reads its files after dropping to its own user
    etc = Path(tempfile.mkdtemp(prefix="afc-agent-tls-"))
    etc.chmod(0o755)
    owner = None
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            owner = pwd.getpwnam("mosquitto").pw_name
    try:
        files = ca.export_broker_files(etc, "broker", owner=owner)
        tls = BrokerTls(files["cafile"], files["certfile"], files["keyfile"])
        _run_tls(tmp_path, tls, ca, dev_cert, dev_key, client_ssl_context(
            ca.ca_path, center_cert, center_key))
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def _run_tls(tmp_path: Path, tls: BrokerTls, ca, dev_cert: Path, dev_key: Path,
             ctx) -> None:
    with MosquittoBroker(tmp_path / "broker", tls=tls, allow_anonymous=True) as broker:
        device = make_device(tmp_path / "dev", DEV, broker.host, broker.port, sections={
            "mqtt": {"tls_ca": str(ca.ca_path), "tls_cert": str(dev_cert),
                     "tls_key": str(dev_key)}})
        with device.open_db() as db:
            write_taps(db, 20)
        with AckingPeer(broker.host, broker.port, device.center_key, {DEV: device.public},
                        tls_context=ctx) as peer:
            run = AgentThread(device.config, once=True, timeout_s=30).start()
            assert run.join(40) == 0
            assert peer.seqs(DEV) == list(range(1, 41))


# -- status, telemetry, events -----------------------------------------------------------------


def test_birth_and_clean_shutdown_status(device, peer) -> None:
    with AgentThread(device.config):
        assert wait_until(lambda: any(m["state"] == "online"
                                      for m in json_messages(peer, "status")))
    assert wait_until(lambda: json_messages(peer, "status")[-1]["state"] == "offline")
    online = next(m for m in json_messages(peer, "status") if m["state"] == "online")
    assert online["dev"] == DEV and online["v"] == 1 and online["sw"]
    assert protocol.verify_json_signature(online, public_key=device.public)


def test_offline_telemetry_buffered_with_drop_policy_and_events_delivered(tmp_path: Path
                                                                          ) -> None:
    broker = MosquittoBroker(tmp_path / "broker")  # not started: the device is offline
    device = make_device(tmp_path / "dev", DEV, broker.host, broker.port, sections={
        "telemetry": {"interval_s": 0.1, "buffer_bytes": 16384}})
    with device.open_db() as db:
        db.events.set_status("reader", "lost")
        alarm = db.events.raise_event("reader-lost", "alarm", {"port": "/dev/ttyS0"})
    queue_path = device.folder / "device-uplink.db"

    def buffered() -> tuple[int, int]:
        if not queue_path.exists():
            return 0, 0
        conn = sqlite3.connect(queue_path)
        try:
            rows = conn.execute("SELECT count(*) FROM queue").fetchone()[0]
            dropped = conn.execute("SELECT value FROM counters WHERE name = 'dropped'"
                                   ).fetchone()[0]
            return rows, dropped
        except sqlite3.Error:
            return 0, 0
        finally:
            conn.close()

    with AgentThread(device.config) as run:
        # offline: telemetry piles up to the budget, then the oldest goes
        assert wait_until(lambda: buffered()[1] > 0, timeout=30)
        rows, _ = buffered()
        assert rows > 0 and os.path.getsize(queue_path) < 1 << 20
        assert not run.agent.connected
        with broker, AckingPeer(broker.host, broker.port, device.center_key,
                                {DEV: device.public}) as peer:
            assert wait_until(lambda: len(json_messages(peer, "telemetry")) >= rows)
            assert wait_until(lambda: json_messages(peer, "event"))
            assert wait_until(lambda: buffered()[0] <= 1)
            # the drop is reported by the reports made after it, not by the buffered ones
            assert wait_until(lambda: any(m.get("telemetry_dropped", 0) > 0
                                          for m in json_messages(peer, "telemetry")))
            telemetry = json_messages(peer, "telemetry")
            events = json_messages(peer, "event")
    report = telemetry[0]
    assert report["dev"] == DEV and report["reader"] == "lost" and "cpu_pct" in report
    assert "disk_free_mb" in report and report["outbox_depth"] == 0
    assert protocol.verify_json_signature(report, public_key=device.public)
    times = [m["ts"] for m in telemetry]
    assert times == sorted(times)  # the buffer is sent oldest first
    assert events[0]["event"] == "reader-lost" and events[0]["seq"] == alarm
    assert events[0]["severity"] == "alarm" and events[0]["detail"] == {"port": "/dev/ttyS0"}
    with device.open_db() as db:
        assert db.events.count == 0  # forwarded, acknowledged by the broker, deleted


# -- configuration -----------------------------------------------------------------------------


def events_of(peer: AckingPeer, name: str) -> list[dict]:
    return [m["detail"] for m in json_messages(peer, "event") if m["event"] == name]


def test_retained_bundles_applied_and_bad_ones_refused(device, peer) -> None:
    now = int(time.time() * 1000)
    # published before the agent runs: retained, delivered at subscription
    peer.bundle(protocol.Bundle("fares", 3, {"name": "konya-2025", "toml": KONYA}, now))
    peer.bundle(protocol.Bundle("blacklist", 5, {"entries": [(7, 1, None), (8, 1, None)]}, now))
    peer.bundle(protocol.Bundle("agent", 2, {"settings": {"batch": {"window": 3}}}, now),
                device_id=DEV)
    with AgentThread(device.config) as run:
        assert wait_until(lambda: len(events_of(peer, "cfg-applied")) == 3)
        with device.open_db() as db:
            assert db.config.fare_table() is not None and db.blacklist.version == 5
        assert run.agent.settings.batch.window == 3
        # a delta on the version in force, then one on a version the device never had
        peer.bundle(protocol.Bundle("blacklist-delta", 6, {"add": [(9, 2, None)],
                                                           "remove": [7]}, now, base=5))
        assert wait_until(lambda: len(events_of(peer, "cfg-applied")) == 4)
        peer.bundle(protocol.Bundle("blacklist-delta", 9, {"add": [], "remove": [8]}, now,
                                    base=8))
        assert wait_until(lambda: events_of(peer, "cfg-reload-request"))
        assert events_of(peer, "cfg-reload-request")[0]["version"] == 6
        # forged, rolled back, expired, for another device's topic
        peer.bundle(protocol.Bundle("blacklist", 10, {"entries": []}, now),
                    key=Ed25519PrivateKey.generate())
        peer.bundle(protocol.Bundle("fares", 2, {"name": "old", "toml": KONYA}, now))
        peer.bundle(protocol.Bundle("actions", 1, {"actions": []}, now, expires=now - 1))
        assert wait_until(lambda: len(events_of(peer, "cfg-rejected")) == 3)
        reasons = " ".join(d["reason"] for d in events_of(peer, "cfg-rejected"))
        assert "signature" in reasons and "rollback" in reasons and "expired" in reasons
        with device.open_db() as db:
            assert db.blacklist.version == 6 and db.blacklist.lookup(9) is not None
            assert db.blacklist.lookup(8) is not None  # the broken delta changed nothing
            assert db.config.version("fares") == 3 and db.actions.version == 0
        # the center answers the reload request with a full list: applied
        peer.bundle(protocol.Bundle("blacklist", 9, {"entries": [(1, 1, None)]}, now))
        assert wait_until(lambda: len(events_of(peer, "cfg-applied")) == 5)
        assert run.agent.stats["connections"] == 1


# -- commands ----------------------------------------------------------------------------------


def replies(peer: AckingPeer, device) -> list[protocol.Reply]:
    return [protocol.decode_reply(p, device.public) for _, p in peer.leaf("reply")]


def test_commands_answered_signed_and_replays_refused(device, peer) -> None:
    with AgentThread(device.config, log_file=True) as run:
        assert wait_until(lambda: run.agent.connected)
        since = int(time.time() * 1000) - 60_000
        ping = peer.command(DEV, "ping", 10)
        assert wait_until(lambda: len(replies(peer, device)) == 1)
        first = replies(peer, device)[0]
        assert first.ok and first.id == "c10" and first.result["pong"] is True
        peer.publish(protocol.dev_topic(DEV, "cmd"), ping)  # the recorded command again
        peer.command(DEV, "ping", 9, cmd_id="older")  # a lower nonce
        assert wait_until(lambda: len(replies(peer, device)) == 3)
        refused = replies(peer, device)[1:]
        assert [r.ok for r in refused] == [False, False]
        assert all("replay" in r.error for r in refused)
        peer.command(DEV, "send-logs", 11, args={"since": since, "max_bytes": 4096})
        assert wait_until(lambda: len(replies(peer, device)) == 4)
        logs = replies(peer, device)[3]
        assert logs.ok and "connected to" in logs.result["log"]
        assert len(logs.result["log"].encode()) <= 4096
        peer.command(DEV, "resync-config", 12)
        assert wait_until(lambda: len(replies(peer, device)) == 5)
        peer.command(DEV, "reboot-app", 13)
        assert run.join(20) == EXIT_REBOOT
    with device.open_db() as db:
        assert db.config.state("cmd_nonce") == 13  # durable: a restart keeps refusing replays


def test_garbage_on_every_subscribed_topic_leaves_the_agent_running(device, peer) -> None:
    rng = random.Random(7)
    now = int(time.time() * 1000)
    garbage = [
        b"", b"\x00", rng.randbytes(64), rng.randbytes(3000), b"{\"v\": 1}", b"\xa1\x61t\x63ack",
        b"\x9f" * 10_000, rng.randbytes(2 * 1024 * 1024),  # oversize
        protocol.encode_ack(protocol.Ack("bus-9", 5, now), device.center_key),  # not ours
    ]
    topics = [protocol.dev_topic(DEV, "ack"), protocol.dev_topic(DEV, "cmd")]
    topics += [protocol.cfg_topic(k) for k in protocol.BUNDLE_KINDS]
    topics += [protocol.cfg_topic(k, DEV) for k in protocol.BUNDLE_KINDS]
    topics += ["afc/v1/cfg/not-a-kind", f"afc/v1/cfg/not-a-kind/{DEV}"]
    with device.open_db() as db:
        write_taps(db, 10)
    with AgentThread(device.config, log_file=True) as run:
        assert wait_until(lambda: run.agent.connected)
        for topic in topics:
            for payload in garbage[:-1]:
                peer.publish(topic, payload)
            if "/cfg/" not in topic:
                peer.publish(topic, garbage[-1])
        # still working: it drains, answers and applies
        assert wait_until(lambda: journal_state(device) == (20, 0))
        peer.command(DEV, "ping", 1)
        assert wait_until(lambda: any(r.ok for r in replies(peer, device)))
        peer.bundle(protocol.Bundle("agent", 1, {"settings": {}}, now))
        assert wait_until(lambda: events_of(peer, "cfg-applied"))
        assert run.agent.stats["rejected"] >= len(topics)
        assert run.alive and run.agent.stats["connections"] == 1
        # the agent logged the refusals rather than crashing
        assert "refused" in (device.folder / "agent.log").read_text()


def test_stale_ack_type_confusion(device, peer) -> None:
    """A signed bundle replayed as an ack and an ack replayed as a command are refused:
    the signature's domain names the message type."""
    now = int(time.time() * 1000)
    bundle = protocol.encode_bundle(protocol.Bundle("agent", 1, {"settings": {}}, now),
                                    device.center_key)
    ack = protocol.encode_ack(protocol.Ack(DEV, 1, now), device.center_key)
    with device.open_db() as db:
        write_taps(db, 1)
    peer.acking = False
    with AgentThread(device.config) as run:
        assert wait_until(lambda: peer.count(DEV) == 2)
        peer.publish(protocol.dev_topic(DEV, "ack"), bundle)
        peer.publish(protocol.dev_topic(DEV, "cmd"), ack)
        peer.command(DEV, "ping", 1)
        assert wait_until(lambda: len(replies(peer, device)) == 1)
        assert journal_state(device) == (0, 2)
        assert run.agent.stats["rejected"] >= 2
        assert dataclasses.asdict(replies(peer, device)[0])["ok"] is True
