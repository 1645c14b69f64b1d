"""Fuzzing every MQTT payload a handler reads, device side and center side, by topic.

fuzz/fuzz_mqtt_payloads.py routes each message as the subscribers do: the agent's ack,
command and configuration handlers; the center's ingest (``IngestWorker.process``) and
monitor (``Monitor.process``, reload requests on to the publisher); camera-site messages
to the monitor and ``open_site_message``. Structured messages are signed with the right
test key so they get past the signatures. Only what each caller catches may come out (see
the harness doc); an ack the ingest sends must verify and match what is stored; a
command's reply must verify and name the command.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_agent import protocol

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))
try:
    fm = importlib.import_module("fuzz_mqtt_payloads")
finally:
    sys.path.remove(str(FUZZ))

_RIG: list = []  # one rig for the module (hypothesis does not mix with function fixtures)


def shared_rig():
    if not _RIG:
        _RIG.append(fm.MqttRig())
    return _RIG[0]


@pytest.fixture(scope="module", autouse=True)
def _close_rig():
    yield
    while _RIG:
        _RIG.pop().close()


@pytest.fixture
def rig():
    r = fm.MqttRig()
    yield r
    r.close()


def run_bytes(rig, data: bytes) -> None:
    with fm.fb.quiet():
        d = fm.Draw(data)
        for _ in range(1 + d.below(3)):
            fm.deliver(rig, *rig.message(d))


@settings(max_examples=400)
@given(st.binary(max_size=800))
@example(b"")
@example(bytes(100))
def test_any_mqtt_message_is_handled_or_refused_cleanly(data):
    run_bytes(shared_rig(), data)


@settings(max_examples=150)
@given(st.sampled_from(["ack", "cmd", "txn", "status", "telemetry", "event", "reply"]),
       st.binary(max_size=400))
def test_raw_bytes_on_every_topic(leaf, payload):
    rig = shared_rig()
    with fm.fb.quiet():
        fm.deliver(rig, leaf, protocol.dev_topic(fm.DEVICE_ID, leaf), payload)


def test_the_harness_reaches_every_handler():
    """Seeded inputs get past the signatures into every handler: a harness stuck at a
    signature or a topic check would prove nothing."""
    rig = fm.MqttRig()
    try:
        rng = random.Random(7)
        for _ in range(400):
            run_bytes(rig, rng.randbytes(rng.randrange(0, 500)))
        for what in ("ack", "cmd", "cmd-replay", "txn", "monitor", "site", "cfg",
                     "reload-served"):
            assert rig.reached[what] > 0, (what, rig.reached)
    finally:
        rig.close()


def event(rig, **fields) -> bytes:
    msg = {"dev": fm.DEVICE_ID, "ts": fm.NOW_MS, "kind": "validator", "event": "door-open",
           "severity": "warning", "detail": {}, **fields}
    return protocol.encode_json_message(msg, signer=protocol.ed25519_json_signer(rig.device_key))


def test_an_event_seq_at_the_i64_edge_is_stored(rig):
    out = rig.monitor.process(protocol.dev_topic(fm.DEVICE_ID, "event"),
                              event(rig, seq=2**63 - 1))
    assert out is not None and out["seq"] == 2**63 - 1


def test_an_event_seq_beyond_64_bits_is_refused_not_a_crash(rig):
    """Found by fuzz_mqtt_payloads: such a seq raised OverflowError out of Monitor.process,
    which ended the monitor's session and, through CenterService.run, the whole center."""
    for seq in (2**63, 2**64, 10**30, -(2**63) - 1):
        payload = event(rig, seq=seq)
        assert json.loads(payload)["seq"] == seq
        assert rig.monitor.process(protocol.dev_topic(fm.DEVICE_ID, "event"), payload) is None


@pytest.mark.slow
@settings(max_examples=20_000)
@given(st.binary(max_size=2000))
def test_mqtt_harness_soak(data):
    run_bytes(shared_rig(), data)
