"""The camera-site firmware offline and reconfigured (issue 6), on the real MicroPython unix
port against a real Mosquitto: broker down then back (every event delivered, in order), a
power cut with events on flash, the ring full of telemetry, signed config messages (bad ones
rejected, a good one applied once), and the watchdog resetting a stalled loop.

The rig's recorder keeps a persistent session on a broker with persistence, so it receives
what the site published while it was itself reconnecting after a broker restart.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.protocol import verify_json_signature
from simulators.cameras import SiteRig, cfg_topic, sign_config
from simulators.cameras.firmware import WATCHDOG_STATUS

DEV = "site-0043"
KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[SiteRig]:
    with SiteRig(tmp_path, device_id=DEV, key=KEY) as r:
        yield r


def _delivered(events: list[dict]) -> list[dict]:
    """Events in order of first arrival, a redelivery dropped as the center drops it (QoS 1
    is at least once: an event whose PUBACK was lost to a reset comes again, same seq)."""
    seen: set[int] = set()
    out = []
    for e in events:
        if e["seq"] not in seen:
            seen.add(e["seq"])
            out.append(e)
    return out


def _seqs(events: list[dict]) -> list[int]:
    return [e["seq"] for e in _delivered(events)]


def _go_offline(rig: SiteRig) -> int:
    mark = rig.firmware.line_count
    rig.broker.stop()
    rig.firmware.wait_for(r"uplink-lost", since=mark)
    return mark


def test_broker_down_then_back_delivers_every_event_in_order(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up", "cam-02": "up"})
    fw = rig.firmware
    mark = _go_offline(rig)
    rig.cabinet.set(door_open=True)
    fw.wait_for(r"event=door-open", since=mark)
    rig.farm.set_fault("cam-01", "down")
    fw.wait_for(r"event=camera-down", since=mark)
    rig.cabinet.set(mains=False, ups_pct=70.0)
    fw.wait_for(r"event=mains-lost", since=mark)
    rig.cabinet.set(door_open=False)
    fw.wait_for(r"event=door-closed", since=mark)
    # retrying with a backlog: the 4 events and at least 2 telemetry reports made offline
    fw.wait_for(r"uplink-down .*outbox=([6-9]|\d\d)", since=mark)
    rig.broker.start()
    fw.wait_for(r"uplink-up", since=mark, timeout=15)
    last = rig.wait_event("door-closed", timeout=15)
    events = rig.events()
    assert _seqs(events) == list(range(1, last["seq"] + 1)), "a gap or a reordering"
    names = [e["event"] for e in _delivered(events)]
    assert names[-4:] == ["door-open", "camera-down", "mains-lost", "door-closed"]
    # the telemetry made offline came too (after the events it followed), showing the backlog
    rig.rec.wait_for(lambda m: m.leaf == "telemetry" and m.json()["outbox_depth"] >= 4)


def test_power_cut_with_events_on_flash(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up"})
    fw = rig.firmware
    mark = _go_offline(rig)
    rig.cabinet.set(door_open=True)
    fw.wait_for(r"event=door-open seq=2", since=mark)
    rig.farm.set_fault("cam-02", "down")
    fw.wait_for(r"event=camera-down seq=3", since=mark)
    assert fw.kill() == -signal.SIGKILL  # power cut: only the flash survives

    mark = fw.line_count
    fw.start()  # power back, broker still down
    fw.wait_for(r"boot .*cause=unclean", since=mark)
    fw.wait_for(r"event=boot seq=4", since=mark)  # the event counter survived too
    rig.broker.start()
    boot = rig.wait_event("boot", where=lambda e: e["seq"] == 4, timeout=15)
    assert boot["severity"] == "warning" and boot["detail"]["cause"] == "unclean"
    events = rig.events()
    assert _seqs(events)[:4] == [1, 2, 3, 4]
    assert [e["event"] for e in _delivered(events)[:4]] == [
        "boot", "door-open", "camera-down", "boot"]


def test_ring_full_drops_telemetry_keeps_events(tmp_path: Path) -> None:
    with SiteRig(tmp_path, device_id=DEV, key=KEY, cameras=1, ring_slots=6,
                 timing={"telemetry_ms": 100}) as rig:
        rig.wait_cameras({"cam-01": "up"})
        fw = rig.firmware
        mark = _go_offline(rig)
        rig.cabinet.set(door_open=True)
        fw.wait_for(r"event=door-open", since=mark)
        time.sleep(1.5)  # ~15 telemetry reports into a 6-slot ring that holds 1 event
        rig.cabinet.set(door_open=False)
        fw.wait_for(r"event=door-closed", since=mark)
        rig.broker.start()
        rig.wait_event("door-closed", timeout=15)
        events = rig.events()
        assert _seqs(events) == list(range(1, len(_delivered(events)) + 1))
        tele = rig.rec.wait_for(lambda m: m.leaf == "telemetry" and "dropped" in m.json()).json()
        assert tele["dropped"]["telemetry"] >= 5 and tele["dropped"]["event"] == 0


def test_bad_config_messages_rejected_good_one_applied(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up"})
    topic = cfg_topic(DEV)
    on_flash = rig.firmware.file("config.json").read_text()
    good = dict(rig.config, cameras=rig.config["cameras"][:2])
    good["thresholds"] = dict(good["thresholds"], temp_high_c=40)

    def rejected(payload: bytes, reason: str) -> None:
        since = rig.mark()
        rig.rec.publish(topic, payload, retain=True)
        ev = rig.wait_event("cfg-rejected", since=since)
        assert ev["detail"]["reason"] == reason, ev
        assert ev["detail"]["version"] == 1

    rejected(b"{not json", "bad-json")
    rejected(b"[1, 2]", "bad-json")
    rejected(sign_config(DEV, bytes(32), 2, good), "bad-signature")
    forged = json.loads(sign_config(DEV, KEY, 2, good))
    forged["config"]["broker"]["host"] = "10.66.66.66"  # changed after signing
    rejected(json.dumps(forged).encode(), "bad-signature")
    unsigned = json.loads(sign_config(DEV, KEY, 2, good))
    del unsigned["sig"]
    rejected(json.dumps(unsigned).encode(), "bad-signature")
    rejected(sign_config("site-0099", KEY, 2, good), "wrong-device")
    floats = dict(good, thresholds=dict(good["thresholds"], temp_high_c=40.5))
    rejected(sign_config(DEV, KEY, 2, floats), "invalid-config")
    unknown = dict(good, cameras=[dict(good["cameras"][0], user="admin")])
    rejected(sign_config(DEV, KEY, 2, unknown), "invalid-config")
    rejected(b'{"v": 1}' + b" " * 5000, "too-large")
    assert rig.firmware.file("config.json").read_text() == on_flash  # nothing applied
    assert rig.firmware.running

    since = rig.mark()
    rig.push_config(good, 2)
    applied = rig.wait_event("cfg-applied", since=since)
    assert applied["detail"] == {"version": 2, "previous": 1}
    assert json.loads(rig.firmware.file("config.json").read_text())["version"] == 2
    # the new config is in force: two cameras, reported with the new version
    tele = rig.rec.wait_for(
        lambda m: m.leaf == "telemetry" and m.json()["cfg_version"] == 2
        and set(m.json()["cameras"]) == {"cam-01", "cam-02"}, since=since).json()
    assert verify_json_signature(tele, hmac_key=KEY)
    # an older version afterwards is a rollback
    since = rig.mark()
    rig.push_config(good, 1)
    ev = rig.wait_event("cfg-rejected", since=since)
    assert ev["detail"]["reason"] == "stale-version" and ev["detail"]["version"] == 2


def test_retained_config_applied_once_across_restarts(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up"})
    rig.push_config(dict(rig.config, cameras=rig.config["cameras"][:1]), 5)
    rig.wait_event("cfg-applied")
    assert rig.firmware.stop() == 0
    since = rig.mark()
    rig.firmware.start()
    rig.rec.wait_for(lambda m: m.leaf == "status" and m.json()["state"] == "online"
                     and m.json()["cfg_version"] == 5, since=since)
    rig.wait_cameras({"cam-01": "up"}, since=since)
    names = [e["event"] for e in _delivered(rig.events())]
    assert names.count("cfg-applied") == 1 and "cfg-rejected" not in names


def test_watchdog_resets_a_stalled_loop(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up"})
    rig.cabinet.set(bus_hang_ms=120_000)  # the sensor read blocks: the whole loop stops
    assert rig.firmware.wait(timeout=30) == WATCHDOG_STATUS
    assert any("watchdog-reset" in line for line in rig.firmware.lines)
    rig.cabinet.set(bus_hang_ms=0)
    mark = rig.firmware.line_count
    rig.firmware.start()
    rig.firmware.wait_for(r"boot .*cause=watchdog", since=mark)
    boot = rig.wait_event("boot", where=lambda e: e["detail"]["cause"] == "watchdog")
    assert boot["severity"] == "warning" and boot["seq"] == 2
