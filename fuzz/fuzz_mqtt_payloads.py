"""atheris harness: bytes -> an MQTT message (topic + payload) -> the handler that reads that
topic, device side and center side, through their real entry points.

Device side (the edge agent): ``dev/{id}/ack`` -> ``Agent._on_ack``; ``dev/{id}/cmd`` ->
``Commands.decode``, ``Commands.accept`` on the device database, ``Commands.run`` and the
signed reply (``encode``/``refusal``), in the order of ``Agent._command_worker``;
``cfg/...`` -> ``ConfigSync.decode`` + ``apply`` (fuzz_bundles.BundleRig, with its
database checks). Center side (simulators/center): ``dev/+/txn`` -> ``IngestWorker.process``
(verify, store, ack); ``dev/+/{status,telemetry,event,reply}`` -> ``Monitor.process``, and
a ``cfg-reload-request`` event on to ``Publisher.on_reload_request`` as the monitor's session
does. Camera sites: their status/telemetry/events reach the same ``Monitor.process``;
``simulators.cameras.siteconfig.open_site_message`` (HMAC-checked) reads them too.

Structured messages are signed with the right test key (center key for acks, commands and
bundles; device key for batches, replies and JSON messages; the site's HMAC key) so the
fuzzer gets past the signatures, then sometimes one field is broken; a raw mode sends the
bytes themselves. What may come out of each handler is what its caller catches:
``ProtocolError`` subclasses (and ``StoreError``) from the command path where the worker
catches them, ``CenterError``/``ProtocolError`` from a reload request, ``ProtocolError``/
``CameraSimError`` from ``open_site_message``, and nothing at all from ``_on_ack``,
``IngestWorker.process``, ``Monitor.process``, ``ConfigSync`` (but ``StoreError``),
``Commands.run``/``encode``/``refusal``.

Findings so far: none (see tests/test_fuzz_mqtt_payloads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import shutil
import zlib
from collections import Counter
from typing import Any

import _common  # first: puts the repository on sys.path
import cbor2
import fuzz_bundles as fb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol
from edge_agent.agent import Agent
from edge_agent.commands import Commands
from edge_agent.errors import ProtocolError, ReplayRejected
from edge_agent.keys import public_hex
from edge_agent.settings import load_settings
from edge_agent.testing import make_device
from firmware.stores import StoreError
from simulators.cameras.errors import CameraSimError
from simulators.cameras.siteconfig import hmac_json_signer, open_site_message
from simulators.center.errors import CenterError
from simulators.center.ingest import IngestWorker, Monitor
from simulators.center.mqtt import BrokerAddress
from simulators.center.publisher import Publisher
from simulators.center.store import SqliteCenterStore

Draw = fb.Draw
DEVICE_ID = fb.DEVICE_ID
SITE_ID = "FUZZ-SITE-1"
CENTER_KEY = fb.CENTER_KEY
SITE_KEY = hashlib.sha256(b"afc fuzz camera site").digest()
NOW_MS = fb.NOW_MS
LEAVES = ("ack", "cmd", "cfg", "txn", "status", "telemetry", "event", "reply", "site")
_I64 = 1 << 63


class MqttRig:
    """The device's agent pieces and a reference center, on throw-away databases."""

    def __init__(self) -> None:
        #: How often each handler got past its checks (a harness stuck at the signature
        #: would reach nothing: tests/test_fuzz_mqtt_payloads.py checks these).
        self.reached: Counter[str] = Counter()
        self.folder = fb.scratch_dir("afc-fuzz-mqtt-")
        self.device = make_device(self.folder / "dev", DEVICE_ID, "127.0.0.1", 1,
                                  center_key=CENTER_KEY)
        self.device_key: Ed25519PrivateKey = self.device.key
        settings = load_settings(self.device.config)
        self.agent = Agent(settings)
        # What Agent.run() sets up before its handlers run (no broker here).
        self.agent._acked = 0
        self.agent._ack_candidates = set()
        self.agent._ack_wake = asyncio.Event()
        self.agent._bad_reported = set()
        self.agent._rejections_logged = {}
        self.commands = Commands(DEVICE_ID, CENTER_KEY.public_key(), self.device_key,
                                 settings.log_path, status=lambda: {"sw": "fuzz", "acked": 0})
        # the configuration connection to the device database, as the agent's cfg worker
        self.bundles = fb.BundleRig(self.device.folder)
        self.db = self.device.open_db()
        self.store = SqliteCenterStore(self.folder / "center.db")
        self.store.register_device(DEVICE_ID, "validator", public_hex(self.device_key))
        self.store.register_device(SITE_ID, "camera-site", None)
        self.published: list[tuple[str, bytes, bool]] = []  # the last few
        self.publish_count = 0
        self.publisher = Publisher(self.store, CENTER_KEY, self._publish)
        # a blacklist chain in the center's history, so reload requests have work to do
        self.publisher.sign("blacklist", {"entries": [(1, 1, None), (2, 2, b"\x01\x02\x03\x04")]})
        self.publisher.sign("blacklist-delta", {"add": [(3, 0, None)], "remove": [1]}, base=1)
        address = BrokerAddress("127.0.0.1", 1)  # never connected: process() is sans-MQTT
        self.ingest = IngestWorker(self.store, CENTER_KEY, address)
        self.monitor = Monitor(self.store, address, persistent=False,
                               on_reload_request=self.publisher.on_reload_request)
        self.next_seq = 1
        self.nonce = 0

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published.append((topic, payload, retain))
        self.publish_count += 1
        del self.published[:-8]

    def close(self) -> None:
        self.bundles.close()
        self.db.close()
        self.store.close()
        self.ingest._executor.shutdown(wait=False)
        self.monitor._executor.shutdown(wait=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- the handlers, as their callers run them -----------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Route ``topic`` as the agent, the center's ingest and monitor subscribe to it."""
        agent = self.agent
        if topic == agent._topics["ack"]:
            self.on_ack(payload)
        elif topic == agent._topics["cmd"]:
            self.on_command(payload)
        elif topic.startswith("afc/v1/cfg/"):
            result = self.bundles.deliver(topic, payload)
            if result is not None and result.outcome == fb.APPLIED:
                self.reached["cfg"] += 1
        parts = topic.split("/")
        if len(parts) == 5 and parts[:3] == ["afc", "v1", "dev"]:
            if parts[4] == "txn":
                self.on_batch(topic, payload)
            elif parts[4] in ("status", "telemetry", "event", "reply"):
                self.on_monitor(topic, payload)

    def on_ack(self, payload: bytes) -> None:
        agent = self.agent
        acks = agent.stats["acks"]
        agent._on_ack(payload)  # must not raise: it runs in the dispatch loop
        if agent.stats["acks"] > acks:
            self.reached["ack"] += 1
        if any(t <= agent._acked for t in agent._ack_candidates):
            raise AssertionError("an ack at or below the acked mark became a candidate")
        if len(agent._ack_candidates) > 64 or len(agent._bad_reported) > 1000:
            raise AssertionError("ack bookkeeping grew past its bounds")

    def on_command(self, payload: bytes) -> None:
        """``Agent._command_worker`` for one payload (what it catches is caught here)."""
        try:
            cmd = self.commands.decode(payload, NOW_MS)
        except ProtocolError:  # Expired included: logged and dropped
            return
        try:
            Commands.accept(self.db, cmd)
        except ReplayRejected as exc:
            reply = self.commands.refusal(cmd, str(exc), NOW_MS)
            protocol.decode_reply(reply, self.device_key.public_key())
            self.reached["cmd-replay"] += 1
            return
        except StoreError:
            return
        result = self.commands.run(cmd, NOW_MS)
        reply = self.commands.encode(result.reply)
        back = protocol.decode_reply(reply, self.device_key.public_key())
        if back.id != cmd.id:
            raise AssertionError(f"reply to {cmd.id!r} names {back.id!r}")
        self.reached["cmd"] += 1

    def on_batch(self, topic: str, payload: bytes) -> None:
        ack = self.ingest.process(topic, payload)  # must not raise
        if ack is not None:
            self.reached["txn"] += 1
            ack_topic, ack_payload = ack
            dev = protocol.parse_dev_topic(ack_topic)[0]
            decoded = protocol.decode_ack(ack_payload, CENTER_KEY.public_key(), device_id=dev)
            if decoded.upto != self.store.upto(dev):
                raise AssertionError(f"ack upto {decoded.upto} but {self.store.upto(dev)} stored")

    def on_monitor(self, topic: str, payload: bytes) -> None:
        out = self.monitor.process(topic, payload)  # must not raise
        if out is not None:
            self.reached["monitor"] += 1
        if isinstance(out, dict) and out.get("event") == "cfg-reload-request":
            detail = out.get("detail") if isinstance(out.get("detail"), dict) else {}
            published = self.publish_count
            with contextlib.suppress(CenterError, ProtocolError):  # as Monitor._session does
                asyncio.run(self.publisher.on_reload_request(out["dev"], detail))
            self.reached["reload-served" if self.publish_count > published
                         else "reload-asked"] += 1

    def on_site(self, payload: bytes) -> None:
        try:
            msg = open_site_message(payload, SITE_KEY)
        except (ProtocolError, CameraSimError):
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("dev"), str):
            raise AssertionError(f"open_site_message returned {msg!r:.80}")
        self.reached["site"] += 1

    # -- messages ------------------------------------------------------------------------------

    def message(self, d: Draw) -> tuple[str, str, bytes]:
        """``(leaf, topic, payload)`` from the fuzzer bytes."""
        leaf = d.pick(LEAVES)
        if leaf == "cfg":
            topic, payload = fb.message(d, self.bundles.db)
            return leaf, topic, payload
        dev = SITE_ID if leaf == "site" or (leaf in ("status", "telemetry", "event")
                                            and d.chance(60)) else DEVICE_ID
        c = d.below(32)
        topic_dev = dev if c < 28 else d.pick(("OTHER-1", SITE_ID, "", "+", "a/b"))
        topic = f"afc/v1/dev/{topic_dev}/{'status' if leaf == 'site' else leaf}"
        if d.below(16) == 15:  # the bytes themselves
            return leaf, topic, d.rest()
        build = getattr(self, f"_{leaf}")
        return leaf, topic, build(d, dev)

    def _sign(self, d: Draw, fields: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
        if d.chance(12):
            fields[d.pick((*fields, "extra", "v", "sig"))] = d.value()
        if d.chance(6):
            key = d.pick((CENTER_KEY, self.device_key))
        try:
            return protocol.sign_message(fields, key)
        except ProtocolError:
            return cbor2.dumps(fields)

    def _ack(self, d: Draw, dev: str) -> bytes:
        upto = d.pick((self.agent._acked + 1, self.agent._acked + 5, 0, self.agent._acked,
                       _I64 - 1, _I64, -1, None)) if d.chance(60) else d.uint(1)
        fields: dict[str, Any] = {"t": "ack", "dev": dev, "upto": upto, "ts": NOW_MS}
        if d.chance(90):
            fields["bad"] = [d.pick(([1, 2], [0, _I64 - 1], [5], [1, 2, 3], [-1, 1], "x",
                                     [d.uint(2), d.uint(2)])) for _ in range(d.below(4))]
        return self._sign(d, fields, CENTER_KEY)

    def _cmd(self, d: Draw, dev: str) -> bytes:
        self.nonce += 1
        name = d.pick((*protocol.COMMAND_NAMES, *protocol.COMMAND_NAMES, "reboot", "x" * 40))
        args: dict[str, Any] = {}
        for _ in range(d.below(3)):
            args[d.pick(("since", "max_bytes", "x"))] = d.pick(
                (0, NOW_MS, -1, 2**63 - 1, 1024, 10**9, "0", None, 1.5, [], True))
        fields = {"t": "cmd", "dev": dev, "id": d.pick(("c1", "c2", "", "x" * 70)),
                  "name": name, "args": args,
                  "nonce": d.pick((self.nonce, self.nonce, self.nonce - 1, 1, 0, _I64 - 1)),
                  "ts": NOW_MS, "expires": d.pick((NOW_MS + 60_000, NOW_MS, NOW_MS - 1, 0))}
        return self._sign(d, fields, CENTER_KEY)

    def _txn(self, d: Draw, dev: str) -> bytes:
        n, seed = 1 + d.below(4), d.uint(2)
        size = len(protocol.wire_sample(n, random.Random(seed), device_id=dev))
        first = self.next_seq if d.chance(200) else d.pick((1, self.next_seq + 3, _I64 - size))
        records = protocol.wire_sample(n, random.Random(seed), device_id=dev, first_seq=first)
        if first < 1 << 40:  # the device's own sequence (not the jump to the i64 edge)
            self.next_seq = max(self.next_seq, records[-1].seq + 1)
        payload = protocol.encode_batch(dev, records, self.device_key, ts=NOW_MS)
        if not d.chance(100):
            return payload
        msg = cbor2.loads(payload)
        body = cbor2.loads(zlib.decompress(msg["body"], wbits=-15))
        for _ in range(1 + d.below(3)):
            body[d.pick((*sorted(body), "x"))] = d.value() if d.chance(128) else [
                d.pick((None, 0, 1, -1, _I64, "x", b"\x00" * 4)) for _ in range(d.below(2 * n + 2))]
        fields = {k: v for k, v in msg.items() if k not in ("sig", "v")}
        fields["body"] = fb.deflate(cbor2.dumps(body))
        if d.chance(30):
            fields[d.pick(("n", "first", "last"))] = d.pick((0, 1, n + 1, -1, _I64))
        return self._sign(d, fields, self.device_key)

    def _reply(self, d: Draw, dev: str) -> bytes:
        fields: dict[str, Any] = {"t": "reply", "dev": dev, "id": d.pick(("c1", "", "x" * 70)),
                                  "ok": d.pick((True, False, 1, None)), "ts": NOW_MS}
        if d.chance(128):
            fields["result"] = d.value() if d.chance(60) else {"pong": True}
        if d.chance(60):
            fields["error"] = d.pick(("bad", "", "x" * 5000, 5))
        return self._sign(d, fields, self.device_key)

    def _json(self, d: Draw, dev: str, leaf: str) -> bytes:
        fields: dict[str, Any] = {"dev": dev, "ts": d.pick((NOW_MS, NOW_MS + 1, 0, -1, _I64))
                                  if d.chance(60) else NOW_MS - d.uint(2),
                                  "kind": d.pick(("validator", "camera-site", "Bad Kind", 5))}
        if leaf == "status":
            fields["state"] = d.pick(("online", "offline", "", None, 5))
            fields["sw"] = d.pick(("1.0", None, "x" * 300))
        elif leaf == "telemetry":
            fields.update({d.pick(("outbox_depth", "cpu_pct", "cameras", "temp_c", "x")):
                           d.value() for _ in range(d.below(4))})
        else:
            fields["event"] = d.pick(("cfg-reload-request", "cfg-reload-request", "door-open",
                                      "camera-down", "camera-up", "", None, 7))
            fields["severity"] = d.pick(("info", "warning", "alarm", "bogus", None))
            fields["seq"] = d.pick((1, 2, d.uint(2), -1, None, "3",
                                    _I64 - 1, _I64))
            reload = {"kind": d.pick(("blacklist", "blacklist", "fares", "blacklist-delta",
                                      "nothing", "", 5)), "version": d.pick((0, 1, None))}
            fields["detail"] = d.pick((reload, reload, reload, {"camera": d.pick(("c1", ""))},
                                       None, [], "x")) if d.chance(230) else d.value()
        for _ in range(d.below(2)):
            fields[d.pick(("v", "dev", "ts", "kind", "sig", "x"))] = d.value()
        scheme = d.below(8)
        try:
            if scheme < 4:
                signer = protocol.ed25519_json_signer(self.device_key)
                return protocol.encode_json_message(fields, signer=signer)
            if scheme < 6:
                return protocol.encode_json_message(fields, signer=hmac_json_signer(SITE_KEY))
            if scheme == 6:
                return protocol.encode_json_message(fields)
            return protocol.encode_json_message(
                fields, signer=lambda _data: d.pick(("ed25519:00", "hmac-sha256:zz", ":", "")))
        except ProtocolError:
            return repr(fields).encode()

    def _status(self, d: Draw, dev: str) -> bytes:
        return self._json(d, dev, "status")

    def _telemetry(self, d: Draw, dev: str) -> bytes:
        return self._json(d, dev, "telemetry")

    def _event(self, d: Draw, dev: str) -> bytes:
        return self._json(d, dev, "event")

    def _site(self, d: Draw, dev: str) -> bytes:
        return self._json(d, SITE_ID, d.pick(("status", "telemetry", "event")))


#: Inputs per rig before a fresh one.
RIGS = _common.RigPool(MqttRig, 300)


def deliver(rig: MqttRig, leaf: str, topic: str, payload: bytes) -> None:
    """One message to whoever reads its topic (camera-site messages to both readers)."""
    rig.handle(topic, payload)
    if leaf == "site":
        rig.on_site(payload)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    with fb.quiet():
        _one_input(data)


def _one_input(data: bytes) -> None:
    rig = RIGS.next()
    d = Draw(data)
    for _ in range(1 + d.below(3)):
        leaf, topic, payload = rig.message(d)
        deliver(rig, leaf, topic, payload)
        if d.chance(30):  # QoS 1 delivers twice now and then
            deliver(rig, leaf, topic, payload)


if __name__ == "__main__":
    _common.run(TestOneInput)
