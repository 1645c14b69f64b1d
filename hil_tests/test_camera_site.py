"""The camera-site firmware on the real MicroPython unix port, against a real Mosquitto, with
emulated cameras and cabinet sensors (issue 6): normal operation and every alarm.

Each test builds a :class:`simulators.cameras.SiteRig`: a broker, three cameras (RTSP +
ONVIF on loopback), a cabinet sensor file, the firmware with its own flash directory, and a
recorder subscribed to ``afc/v1/#`` (the center's view). Timings are the rig's fast ones
(probes every 0.3 s), so each test takes seconds. Offline behaviour, configuration and the
watchdog are in test_camera_site_offline.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.protocol import decode_json_message, verify_json_signature
from simulators.cameras import Recorder, SiteRig

DEV = "site-0042"
KEY = bytes.fromhex("6b1f0c2a9d3e4f5061728394a5b6c7d8e9f00112233445566778899aabbccdd0")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[SiteRig]:
    with SiteRig(tmp_path, device_id=DEV, key=KEY) as r:
        yield r


def _about(camera: str):
    return lambda e: e["detail"].get("camera") == camera


def test_normal_operation_birth_status_telemetry(rig: SiteRig) -> None:
    boot = rig.wait_event("boot")
    assert boot["detail"]["cause"] == "power-on" and boot["seq"] == 1
    tele = rig.wait_cameras({"cam-01": "up", "cam-02": "up", "cam-03": "up"})
    msg = decode_json_message(rig.rec.wait_for(lambda m: m.json() == tele).payload)
    assert verify_json_signature(msg, hmac_key=KEY)
    assert not verify_json_signature(msg, hmac_key=bytes(32))
    assert msg["kind"] == "camera-site" and msg["dev"] == DEV
    assert isinstance(msg["mem_free"], int) and msg["mem_free"] > 0
    assert msg["door"] == "closed" and msg["power"] == "mains"
    assert msg["temp_c"] == 24 and msg["humidity_pct"] == 40 and msg["ups_pct"] == 100
    assert msg["outbox_depth"] == 0 and msg["cfg_version"] == 1
    # the cameras were really asked, by both protocols
    for cam in rig.farm.cameras.values():
        assert cam.stats.rtsp_requests > 0 and cam.stats.onvif_requests > 0

    # a center that connects now gets the retained, signed birth status
    with Recorder(rig.broker.host, rig.broker.port, client_id="late",
                  topic=f"afc/v1/dev/{DEV}/status") as late:
        st = late.wait_for(lambda m: m.retain).json()
        assert st["state"] == "online" and st["sw"].startswith("afcsite/")
        assert verify_json_signature(st, hmac_key=KEY)

    # a clean stop leaves "offline" retained
    assert rig.firmware.stop() == 0
    rig.rec.wait_for(lambda m: m.leaf == "status" and m.json()["state"] == "offline")
    every = rig.rec.snapshot()
    assert all(m.qos == 1 for m in every if m.leaf in ("event", "status"))
    assert all(verify_json_signature(m.json(), hmac_key=KEY) for m in every)


def test_last_will_on_power_cut(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-01": "up"})
    rig.firmware.kill()
    will = rig.rec.wait_for(lambda m: m.leaf == "status" and m.json()["state"] == "offline",
                            timeout=30)
    assert verify_json_signature(will.json(), hmac_key=KEY)


@pytest.mark.parametrize(
    ("alarm", "clear", "cause", "mend"),
    [
        ("door-open", "door-closed", {"door_open": True}, {"door_open": False}),
        ("over-temperature", "temperature-ok", {"temp_c": 58.5}, {"temp_c": 30.0}),
        ("mains-lost", "mains-back", {"mains": False, "ups_pct": 80.0}, {"mains": True}),
        ("ups-battery-low", "ups-battery-ok", {"ups_pct": 12.0}, {"ups_pct": 90.0}),
    ],
)
def test_cabinet_alarm_raised_and_cleared(rig: SiteRig, alarm, clear, cause, mend) -> None:
    rig.wait_cameras({"cam-01": "up"})
    rig.cabinet.set(**cause)
    ev = rig.wait_event(alarm)
    assert ev["severity"] == "alarm"
    status = rig.rec.wait_for(lambda m: m.leaf == "status" and alarm in m.json()["alarms"])
    assert status.qos == 1
    rig.cabinet.set(**mend)
    back = rig.wait_event(clear)
    assert back["severity"] == "info" and back["seq"] > ev["seq"]
    if alarm == "over-temperature":
        assert ev["detail"] == {"temp_c": 59, "limit_c": 45}
    if alarm == "mains-lost":
        assert ev["detail"] == {"ups_pct": 80}
    rig.rec.wait_for(lambda m: m.leaf == "status" and alarm not in m.json()["alarms"],
                     since=rig.mark() - 1)
    seqs = sorted({e["seq"] for e in rig.events()})  # QoS 1 may deliver one twice
    assert seqs == list(range(1, len(seqs) + 1))


def test_camera_down_and_back(rig: SiteRig) -> None:
    rig.wait_cameras({"cam-02": "up"})
    rig.farm.set_fault("cam-02", "down")
    down = rig.wait_event("camera-down", where=_about("cam-02"))
    assert down["severity"] == "alarm" and down["detail"]["reason"] == "rtsp-refused"
    rig.wait_cameras({"cam-01": "up", "cam-02": "down", "cam-03": "up"})
    rig.farm.set_fault("cam-02", "ok")
    up = rig.wait_event("camera-up", where=_about("cam-02"))
    assert up["detail"]["from"] == "down" and up["seq"] > down["seq"]


@pytest.mark.parametrize(
    ("fault", "kw", "event", "reason"),
    [
        ("silent", {}, "camera-down", "rtsp-no-answer"),
        ("garbage", {}, "camera-down", "rtsp-bad-reply"),
        ("slow", {"delay_ms": 250}, "camera-degraded", "slow"),
        ("clock", {"clock_offset_s": 600}, "camera-degraded", "clock"),
    ],
)
def test_camera_faults_classified(rig: SiteRig, fault, kw, event, reason) -> None:
    rig.wait_cameras({"cam-03": "up"})
    rig.farm.set_fault("cam-03", fault, **kw)
    ev = rig.wait_event(event, where=_about("cam-03"))
    assert ev["detail"]["reason"] == reason
    if fault == "clock":
        assert 597_000 <= ev["detail"]["clock_offset_ms"] <= 603_000
        tele = rig.wait_cameras({"cam-03": "degraded"})
        assert 597_000 <= tele["cam_clock_offset_ms"]["cam-03"] <= 603_000
    # one bad camera leaves the others alone
    state = "down" if event == "camera-down" else "degraded"
    rig.wait_cameras({"cam-01": "up", "cam-02": "up", "cam-03": state})


def test_debug_lines_only_when_asked_and_never_the_key(tmp_path: Path, rig: SiteRig) -> None:
    """Field technicians run the site with ``--debug``; without it the log stays at info."""
    rig.firmware.wait_for(r"^I uplink-up ", 20)
    assert not [line for line in rig.firmware.lines if line.startswith("D ")]
    with_debug = SiteRig(tmp_path / "debug", device_id=DEV, key=KEY)
    with_debug.firmware.debug = True
    with with_debug:
        line = with_debug.firmware.wait_for(r"^D timing .*dev=site-0042 .*telemetry_ms=", 20)
        assert line is not None
        text = "\n".join(with_debug.firmware.lines)
        assert KEY.hex() not in text.lower() and "wdt_ms=" in text
