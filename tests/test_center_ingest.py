"""The center's ingest and monitor against a real Mosquitto, driven by a device-side client
that speaks edge_agent.protocol: batches stored once and acked cumulatively, duplicates
dropped, forged and garbage input refused without stopping anything, status and events
kept, a reload request answered with a full bundle, a command answered and verified."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiomqtt
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol as P
from edge_agent.keys import generate_key_file, load_public_key, public_hex
from simulators.center.commands import CommandTimeout, send_command
from simulators.center.devicesim import BatchSender
from simulators.center.mqtt import BrokerAddress
from simulators.center.service import CenterService
from simulators.center.status import fleet_status

DEV = "KNY-BUS-0042-V1"
DEV_KEY = Ed25519PrivateKey.generate()


def run(coro, timeout: float = 40.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Center:
    """A CenterService with its ingest worker in-process (workers=0), started and stopped
    around a test body."""

    def __init__(self, broker, tmp_path):
        self.key_path = tmp_path / "center.key"
        self.key = generate_key_file(self.key_path)
        self.address = BrokerAddress(broker.host, broker.port)
        self.db = tmp_path / "center.db"
        devices = tmp_path / "devices.toml"
        devices.write_text(f'[[device]]\nid = "{DEV}"\nkind = "validator"\n'
                           f'public_key = "{public_hex(DEV_KEY)}"\n')
        self.devices = devices

    async def __aenter__(self):
        self.service = CenterService(self.address, self.db, self.key_path, workers=0,
                                     devices_file=self.devices)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.run(self.stop))
        await asyncio.wait_for(self.service.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.wait_for(self.task, 15)

    @property
    def stats(self):
        return self.service.local_worker.stats

    def sender(self, device_id=DEV, key=DEV_KEY):
        return BatchSender(self.address, device_id, key, self.key.public_key())


def test_batches_stored_once_and_acked_cumulatively(mosquitto, tmp_path):
    recs = P.wire_sample(150, random.Random(1), device_id=DEV)  # seq 1..300

    async def body():
        async with Center(mosquitto, tmp_path) as c, c.sender() as dev:
            await dev.send(recs[200:])            # 201..300 first: nothing contiguous yet
            assert (await dev.wait_acks(1)).pop().upto == 0
            await dev.send(recs[:200], 100)       # 1..100, 101..200
            ack = await dev.wait_upto(300)
            assert ack.upto == 300 and ack.bad == ()
            before = len(dev.acks)
            await dev.send(recs[100:200])         # a retransmission: dropped, acked again
            acks = await dev.wait_acks(before + 1)
            uptos = [a.upto for a in acks]
            assert uptos == sorted(uptos) and uptos[-1] == 300  # cumulative, monotonic
            assert c.stats.records_new == 300 and c.stats.duplicates == 100
            records = list(c.service.store.records(DEV))
            assert records == recs  # every field as the device sent it
            return c

    run(body())


def test_forged_and_unknown_batches_are_not_acked_good_ones_are(mosquitto, tmp_path):
    recs = P.wire_sample(30, random.Random(2), device_id=DEV)  # seq 1..60
    forger = Ed25519PrivateKey.generate()

    async def body():
        async with Center(mosquitto, tmp_path) as c, c.sender() as dev:
            # 41..60 forged: had it been stored, the ack would reach 60
            await dev.send_payload(P.encode_batch(DEV, recs[40:], forger, ts=1))
            stranger = P.wire_sample(2, random.Random(3), device_id="STRANGER-1")
            await dev.send_payload(P.encode_batch("STRANGER-1", stranger, forger, ts=1),
                                   topic_device="STRANGER-1")  # unregistered device
            await dev.send_payload(P.encode_batch(DEV, recs[40:], DEV_KEY, ts=1),
                                   topic_device="OTHER-DEV")  # on another device's topic
            await dev.send(recs[20:40])                         # good, after a gap
            await dev.send(recs[:20])                           # the real 1..20
            await dev.wait_upto(40)
            acks = dev.acks
            assert all(a.upto in (0, 40) for a in acks)  # never beyond the good records
            assert ((41, 60),) in [a.bad for a in acks]  # the forged batch, reported
            assert c.stats.by_reason == {"SignatureInvalid": 1, "unknown-device": 1,
                                         "ProtocolError": 1}
            assert c.service.store.seqs(DEV) == list(range(1, 41))
            assert c.service.store.record_count() == 40

    run(body())


GARBAGE = [b"", b"\x00", b"\xff" * 64, b"not cbor at all", cbor2.dumps([1, 2, 3]),
           cbor2.dumps({"v": 1, "t": "txn"}), cbor2.dumps({"v": 99, "t": "txn", "dev": DEV}),
           json.dumps({"v": 1, "dev": DEV}).encode(), b"{" * 10_000,
           bytes(random.Random(4).randbytes(2_000_000))]


def test_garbage_on_every_subscribed_topic_is_logged_and_ingest_keeps_going(mosquitto,
                                                                            tmp_path, caplog):
    recs = P.wire_sample(5, random.Random(5), device_id=DEV)
    leaves = ("txn", "status", "telemetry", "event", "reply")

    async def body():
        async with Center(mosquitto, tmp_path) as c, c.sender() as dev:
            async with aiomqtt.Client(mosquitto.host, mosquitto.port,
                                      identifier="garbage") as client:
                for leaf in leaves:
                    for payload in GARBAGE:
                        await client.publish(f"afc/v1/dev/{DEV}/{leaf}", payload, qos=1)
                await client.publish("afc/v1/dev/bad id/txn", b"x", qos=1)
            await dev.send(recs)
            assert (await dev.wait_upto(10)).upto == 10
            assert c.stats.refused == len(GARBAGE) + 1  # and the bad device id
            assert c.service.monitor.refused >= 4 * len(GARBAGE) - 1
            assert not c.task.done()

    with caplog.at_level("WARNING"):
        run(body())
    assert "batch refused" in caplog.text and "monitor refused" in caplog.text


def test_monitor_keeps_status_events_and_answers_reload_requests(mosquitto, tmp_path):
    async def body():
        async with Center(mosquitto, tmp_path) as c:
            await c.service.publisher.publish_blacklist_full([(1, 1, None), (2, 1, None)])
            await c.service.publisher.publish_blacklist_delta(add=[(3, 1, None)])
            sign = P.ed25519_json_signer(DEV_KEY)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port,
                                      identifier=DEV) as client:
                await client.subscribe("afc/v1/cfg/blacklist", qos=1)
                first = await anext(client.messages)  # the retained full list, version 1
                assert P.decode_bundle(first.payload, c.key.public_key(), now_ms=0).version == 1
                base = {"dev": DEV, "kind": "validator"}
                await client.publish(f"afc/v1/dev/{DEV}/status", P.encode_json_message(
                    {**base, "ts": 1, "state": "online", "sw": "0.9"}, signer=sign), qos=1,
                    retain=True)
                # a forged signature: refused
                forged = P.encode_json_message({**base, "ts": 2, "state": "offline"},
                                               signer=P.ed25519_json_signer(
                                                   Ed25519PrivateKey.generate()))
                await client.publish(f"afc/v1/dev/{DEV}/status", forged, qos=1)
                await client.publish(f"afc/v1/dev/{DEV}/event", P.encode_json_message(
                    {**base, "ts": 3, "event": "cfg-reload-request", "severity": "warning",
                     "seq": 1, "detail": {"kind": "blacklist-delta", "version": 1}}), qos=1)
                reload = await asyncio.wait_for(anext(client.messages), 10)
                full = P.decode_bundle(reload.payload, c.key.public_key(), now_ms=0)
                assert (full.kind, full.version) == ("blacklist", 2)
                assert full.body["entries"] == [(1, 1, None), (2, 1, None), (3, 1, None)]
            (entry,) = [e for e in fleet_status(c.service.store) if e.device_id == DEV]
            assert entry.state == "online" and entry.sw == "0.9"  # the forged one was refused
            (event,) = c.service.store.events(DEV)
            assert event["event"] == "cfg-reload-request"

    run(body())


async def _responder(address, center_public, *, answer: bool, ready: asyncio.Event):
    """A device's command handling as the protocol requires (the agent's real one lives in
    edge_agent): verify, check the nonce, reply signed."""
    last_nonce = 0
    async with aiomqtt.Client(address.host, address.port, identifier="responder") as client:
        await client.subscribe(f"afc/v1/dev/{DEV}/cmd", qos=1)
        ready.set()
        async for message in client.messages:
            cmd = P.decode_command(message.payload, center_public, device_id=DEV,
                                   now_ms=time.time_ns() // 1_000_000)
            assert cmd.nonce > last_nonce
            last_nonce = cmd.nonce
            if answer:
                reply = P.Reply(DEV, cmd.id, True, 1, {"pong": cmd.args.get("n")})
                await client.publish(f"afc/v1/dev/{DEV}/reply", P.encode_reply(reply, DEV_KEY),
                                     qos=1)


def test_command_round_trip_and_timeout(mosquitto, tmp_path):
    async def body():
        async with Center(mosquitto, tmp_path) as c:
            ready = asyncio.Event()
            responder = asyncio.create_task(
                _responder(c.address, c.key.public_key(), answer=True, ready=ready))
            await asyncio.wait_for(ready.wait(), 5)
            for n in (1, 2):  # through the center's own connection and monitor
                reply = await c.service.commands.send(DEV, "ping", {"n": n}, timeout_s=10)
                assert reply.ok and reply.result == {"pong": n}
            reply = await send_command(c.address, c.service.store, c.key, DEV, "ping",
                                       {"n": 3}, timeout_s=10)  # the CLI's path
            assert reply.result == {"pong": 3}
            responder.cancel()
            await asyncio.gather(responder, return_exceptions=True)
            ready = asyncio.Event()
            silent = asyncio.create_task(
                _responder(c.address, c.key.public_key(), answer=False, ready=ready))
            await asyncio.wait_for(ready.wait(), 5)
            with pytest.raises(CommandTimeout):
                await c.service.commands.send(DEV, "ping", {}, timeout_s=0.5)
            silent.cancel()
            await asyncio.gather(silent, return_exceptions=True)
            assert c.service.store.reply(DEV, reply.id) == reply

    run(body())


def test_bundle_cli_publishes_retained(mosquitto, tmp_path):
    from click.testing import CliRunner

    from tools.bundle_cmd import bundle

    runner = CliRunner()
    key = tmp_path / "center.key"
    pub = public_hex(generate_key_file(key))
    settings = tmp_path / "agent.toml"
    # (only what a device accepts remotely: `afc bundle sign` refuses anything else)
    settings.write_text("[telemetry]\ninterval_s = 30.0\n[batch]\nmax_records = 200\n")
    out = tmp_path / "agent.bundle"
    res = runner.invoke(bundle, ["sign", "--kind", "agent", "--version", "4", "--key", str(key),
                                 "--in", str(settings), "--out", str(out), "--target", DEV])
    assert res.exit_code == 0, res.output
    broker = f"{mosquitto.host}:{mosquitto.port}"
    other = public_hex(Ed25519PrivateKey.generate())
    res = runner.invoke(bundle, ["publish", "--broker", broker, "--in", str(out),
                                 "--center-public", other])
    assert res.exit_code != 0  # verification before publishing refuses a foreign signature
    res = runner.invoke(bundle, ["publish", "--broker", broker, "--in", str(out),
                                 "--center-public", pub])
    assert res.exit_code == 0, res.output
    assert f"afc/v1/cfg/agent/{DEV}" in res.output

    async def fetch():
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="late") as c:
            await c.subscribe(f"afc/v1/cfg/+/{DEV}", qos=1)
            return await anext(c.messages)  # retained: there although published before

    message = run(fetch(), 10)
    got = P.decode_bundle(message.payload, load_public_key(pub), now_ms=0, device_id=DEV)
    assert (got.kind, got.version, got.body) == ("agent", 4, {"settings": {
        "telemetry": {"interval_s": 30.0}, "batch": {"max_records": 200}}})
    assert message.retain


# -- the monitor's persistent session (issue 5) ---------------------------------------------


def _device_publish(broker, messages):
    """A device publishing (topic leaf, JSON object) pairs at QoS 1 while the center may be
    down; returns when the broker has them all."""
    async def body():
        async with aiomqtt.Client(broker.host, broker.port, identifier=DEV) as client:
            for leaf, msg in messages:
                await client.publish(f"afc/v1/dev/{DEV}/{leaf}", P.encode_json_message(
                    {"dev": DEV, "kind": "validator", **msg}), qos=1)
    run(body(), 15)


async def _monitor_until(store, broker, predicate, *, persistent=True, timeout_s=10.0):
    """Run a Monitor until ``predicate(store)`` holds (bounded), then stop it."""
    from simulators.center.ingest import Monitor

    monitor = Monitor(store, BrokerAddress(broker.host, broker.port), persistent=persistent)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await asyncio.wait_for(monitor.subscribed.wait(), 10)
        deadline = time.monotonic() + timeout_s
        while not predicate(store) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return predicate(store), monitor
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def test_monitor_session_persists_so_events_sent_while_the_center_is_down_arrive(mosquitto,
                                                                                  tmp_path):
    """Events and telemetry published while the monitor is away are queued by the broker for
    its persistent session and stored when it comes back; a replay of them changes nothing.
    The same with a clean session loses them (what issue 5 reported)."""
    from simulators.center.store import SqliteCenterStore

    def events(n):
        return lambda s: len(s.events(DEV)) >= n

    with SqliteCenterStore(tmp_path / "center.db") as store:
        store.register_device(DEV, "validator", None)
        center_id = store.center_id()
        ok, first = run(_monitor_until(store, mosquitto, events(0)))  # session created
        assert ok and first.identifier == f"afc-center-monitor-{center_id}"
        down = [("event", {"ts": 10, "event": "reader-lost", "severity": "alarm", "seq": 1,
                           "detail": {}}),
                ("telemetry", {"ts": 11, "uptime_s": 5, "outbox_depth": 7}),
                ("event", {"ts": 12, "event": "reader-back", "severity": "info", "seq": 2,
                           "detail": {}}),
                ("event", {"ts": 13, "event": "door-open", "severity": "warning",
                           "detail": {"door": 1}})]  # no seq: deduplicated by content
        _device_publish(mosquitto, down)
        ok, _ = run(_monitor_until(store, mosquitto, events(3)))
        assert ok, store.events(DEV)
        assert [e["event"] for e in store.events(DEV)] == ["door-open", "reader-back",
                                                            "reader-lost"]
        (state,) = [s for s in store.device_states() if s.device_id == DEV]
        assert state.telemetry == {"v": 1, "dev": DEV, "kind": "validator", "ts": 11,
                                   "uptime_s": 5, "outbox_depth": 7}
        # the same messages again (a replay), and an older telemetry: nothing changes
        _device_publish(mosquitto, [*down, ("telemetry", {"ts": 9, "outbox_depth": 99})])
        ok, replayed = run(_monitor_until(store, mosquitto, lambda s: False, timeout_s=1.5))
        assert replayed.stored == 0 and replayed.refused == 0
        assert len(store.events(DEV)) == 3
        (state,) = [s for s in store.device_states() if s.device_id == DEV]
        assert state.telemetry["ts"] == 11 and state.telemetry["outbox_depth"] == 7

    # a clean session (the old behaviour) loses what was published while it was away
    with SqliteCenterStore(tmp_path / "other.db") as other:
        assert other.center_id() != center_id  # another center, another session
        ok, _ = run(_monitor_until(other, mosquitto, events(0), persistent=False))
        _device_publish(mosquitto, [("event", {"ts": 20, "event": "disk-low", "seq": 9,
                                               "severity": "warning", "detail": {}})])
        ok, _ = run(_monitor_until(other, mosquitto, events(1), persistent=False,
                                   timeout_s=1.5))
        assert not ok and other.events(DEV) == []
