"""The emulated cameras, cabinet sensors and ``afc sim camera`` commands, spoken to with plain
sockets and files (no firmware): what a camera-site monitor will see from them is what real
cameras would say, and every fault does what it claims."""

from __future__ import annotations

import calendar
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_agent.protocol import verify_json_signature
from simulators.cameras import CabinetSensors, CameraFarm, CameraSimError, sign_config
from simulators.cameras.control import ControlHandler, UnixControlServer, send_commands
from simulators.cameras.siteconfig import open_site_message
from tools.camera_cmd import camera

SOAP = (b'<?xml version="1.0" encoding="UTF-8"?><s:Envelope '
        b'xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><GetSystemDateAndTime '
        b'xmlns="http://www.onvif.org/ver10/device/wsdl"/></s:Body></s:Envelope>')


def rtsp_options(port: int, cseq: int = 7, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"OPTIONS rtsp://127.0.0.1:{port}/ RTSP/1.0\r\nCSeq: {cseq}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def onvif_time(port: int, body: bytes = SOAP, path: str = "/onvif/device_service",
               timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/soap+xml\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def utc_of(answer: bytes) -> int:
    utc = answer.split(b"UTCDateTime")[1]
    f = {k: int(re.search(rf"<tt:{k}>(\d+)<".encode(), utc).group(1))
         for k in ("Year", "Month", "Day", "Hour", "Minute", "Second")}
    return calendar.timegm((f["Year"], f["Month"], f["Day"], f["Hour"], f["Minute"],
                            f["Second"]))


@pytest.fixture
def farm():
    with CameraFarm(2) as f:
        yield f


def test_a_healthy_camera_answers_rtsp_and_onvif(farm: CameraFarm) -> None:
    cam = farm.get("cam-01")
    answer = rtsp_options(cam.rtsp_port, cseq=41)
    assert answer.startswith(b"RTSP/1.0 200 OK\r\n") and b"CSeq: 41\r\n" in answer
    assert b"DESCRIBE" in answer
    t0 = int(time.time())
    got = onvif_time(cam.onvif_port)
    t1 = int(time.time())
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert t0 - 1 <= utc_of(got) <= t1 + 1
    body = got.split(b"\r\n\r\n", 1)[1]
    assert len(body) > 1200  # larger than the firmware's receive window, as real answers are
    assert cam.stats.rtsp_requests == 1 and cam.stats.onvif_requests == 1


def test_onvif_refuses_other_actions_and_paths(farm: CameraFarm) -> None:
    port = farm.get("cam-01").onvif_port
    fault = onvif_time(port, body=b"<s:Envelope><s:Body><GetDeviceInformation/></s:Body>")
    assert fault.startswith(b"HTTP/1.1 400") and b"ActionNotSupported" in fault
    assert onvif_time(port, path="/elsewhere").startswith(b"HTTP/1.1 404")


def test_down_refuses_and_ok_listens_again_on_the_same_ports(farm: CameraFarm) -> None:
    cam = farm.get("cam-02")
    ports = (cam.rtsp_port, cam.onvif_port)
    farm.set_fault("cam-02", "down")
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert rtsp_options(farm.get("cam-01").rtsp_port).startswith(b"RTSP/1.0 200")  # others up
    farm.set_fault("cam-02", "ok")
    assert (cam.rtsp_port, cam.onvif_port) == ports
    assert rtsp_options(cam.rtsp_port).startswith(b"RTSP/1.0 200")


def test_silent_accepts_and_never_answers(farm: CameraFarm) -> None:
    cam = farm.set_fault("cam-01", "silent")
    with pytest.raises(TimeoutError):
        rtsp_options(cam.rtsp_port, timeout=0.5)
    with pytest.raises(TimeoutError):
        onvif_time(cam.onvif_port, timeout=0.5)
    assert cam.stats.rtsp_requests == 1  # the request was read: TCP and the server are alive


def test_garbage_answers_bytes_that_are_not_the_protocol(farm: CameraFarm) -> None:
    cam = farm.set_fault("cam-01", "garbage")
    answer = rtsp_options(cam.rtsp_port)
    assert answer and not answer.startswith(b"RTSP/1.0")
    assert not onvif_time(cam.onvif_port).startswith(b"HTTP/1.1")


def test_slow_answers_late(farm: CameraFarm) -> None:
    cam = farm.set_fault("cam-01", "slow", delay_ms=1500)
    with pytest.raises(TimeoutError):
        rtsp_options(cam.rtsp_port, timeout=0.3)
    assert rtsp_options(cam.rtsp_port, timeout=10).startswith(b"RTSP/1.0 200")


def test_wrong_clock(farm: CameraFarm) -> None:
    cam = farm.set_fault("cam-01", "clock", clock_offset_s=-3600)
    assert abs(utc_of(onvif_time(cam.onvif_port)) - (time.time() - 3600)) <= 2


def test_fault_arguments_are_checked(farm: CameraFarm) -> None:
    with pytest.raises(CameraSimError, match="unknown fault"):
        farm.set_fault("cam-01", "on-fire")
    with pytest.raises(CameraSimError, match="delay_ms"):
        farm.set_fault("cam-01", "slow")
    with pytest.raises(CameraSimError, match="no camera 'cam-99'"):
        farm.set_fault("cam-99", "down")
    with pytest.raises(CameraSimError, match="exists already"):
        farm.add("cam-01")


def test_cabinet_sensor_file(tmp_path: Path) -> None:
    path = tmp_path / "cab" / "sensors.json"
    cab = CabinetSensors(path, temp_c=31.5)
    assert json.loads(path.read_text())["temp_c"] == 31.5
    cab.set(door_open=True, mains=False, ups_pct=55)
    on_file = json.loads(path.read_text())
    assert on_file["door_open"] is True and on_file["mains"] is False
    assert on_file["ups_pct"] == 55 and on_file["humidity_pct"] == 40.0
    for bad, why in (({"door_open": "yes"}, "true or false"), ({"temp_c": 500}, "outside"),
                     ({"smoke": 1}, "unknown cabinet reading"), ({"ups_pct": "x"}, "number")):
        with pytest.raises(CameraSimError, match=why):
            cab.set(**bad)
    assert json.loads(path.read_text()) == on_file  # a refused change writes nothing
    assert not list(path.parent.glob("*.tmp"))


def test_control_protocol(tmp_path: Path, farm: CameraFarm) -> None:
    cab = CabinetSensors(tmp_path / "cab.json")
    h = ControlHandler(farm, cab)
    assert h.handle("fault cam-01 slow 700").lines == ["ok"]
    assert farm.get("cam-01").fault == "slow" and farm.get("cam-01").delay_ms == 700
    listed = h.handle("list").lines
    assert listed[0].startswith("camera cam-01 ") and "fault=slow" in listed[0]
    assert listed[-1] == "ok"
    reply = h.handle("cabinet door_open=true temp_c=51.5").lines
    assert json.loads(reply[0])["door_open"] is True and reply[-1] == "ok"
    assert json.loads((tmp_path / "cab.json").read_text())["temp_c"] == 51.5
    assert h.handle("fault cam-01 clock").lines[-1].startswith("error: fault clock needs N")
    assert h.handle("cabinet temp_c=900").lines[-1].startswith("error: temp_c")
    assert h.handle("frobnicate").lines[-1].startswith("error: unknown command")
    assert h.handle("shutdown").shutdown

    stop = threading.Event()
    server = UnixControlServer(tmp_path / "ctl", h, stop.set).start()
    try:
        out = send_commands(tmp_path / "ctl", ["fault cam-02 down", "shutdown"])
        assert out == ["ok", "ok"] and farm.get("cam-02").fault == "down"
        assert stop.wait(5)
    finally:
        server.stop()


# -- afc sim camera ---------------------------------------------------------------------------


def test_cli_keygen_and_sign_config(tmp_path: Path) -> None:
    runner = CliRunner()
    key_file = tmp_path / "site.key"
    assert runner.invoke(camera, ["keygen", "--out", str(key_file)]).exit_code == 0
    assert key_file.stat().st_mode & 0o077 == 0
    again = runner.invoke(camera, ["keygen", "--out", str(key_file)])
    assert again.exit_code != 0 and "exists" in again.output
    key = bytes.fromhex(key_file.read_text())
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"broker": {"host": "10.1.2.3"}, "cameras": []}))
    result = runner.invoke(camera, ["sign-config", "--dev", "site-7", "--key-file",
                                    str(key_file), "--version", "3", "--in", str(cfg)])
    assert result.exit_code == 0, result.output
    msg = json.loads(result.output)
    assert msg["t"] == "cfg" and msg["version"] == 3 and msg["dev"] == "site-7"
    assert verify_json_signature(msg, hmac_key=key)
    assert json.loads(sign_config("site-7", key, 3, json.loads(cfg.read_text()),
                                  ts=msg["ts"])) == msg
    cfg.write_text("[1]")
    bad = runner.invoke(camera, ["sign-config", "--dev", "site-7", "--key-file",
                                 str(key_file), "--version", "3", "--in", str(cfg)])
    assert bad.exit_code != 0 and "JSON object" in bad.output


def test_cli_serve_with_stdin_control(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        camera, ["serve", "--count", "2", "--cabinet", str(tmp_path / "c.json"),
                 "--control", "-"],
        input="fault cam-02 garbage\nlist\ncabinet mains=false\nshutdown\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    info = json.loads(lines[0])
    assert [c["id"] for c in info["cameras"]] == ["cam-01", "cam-02"]
    assert any("cam-02" in line and "fault=garbage" in line for line in lines)
    assert json.loads((tmp_path / "c.json").read_text())["mains"] is False


def test_cli_site_runs_a_whole_site(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        camera, ["site", "--workdir", str(tmp_path / "w"), "--cameras", "1", "--dev", "site-9"],
        input="cabinet door_open=true\nshutdown\n")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.splitlines()[0])
    key_file = Path(info["key_file"])
    assert key_file.stat().st_mode & 0o077 == 0 and len(key_file.read_text().strip()) == 64
    identity = json.loads((tmp_path / "w" / "flash" / "identity.json").read_text())
    assert identity == {"dev": "site-9", "key": key_file.read_text().strip()}
    assert info["broker"].startswith("127.0.0.1:") and info["cameras"][0]["id"] == "cam-01"


def test_open_site_message_refuses_a_forgery() -> None:
    key = bytes(32)
    good = sign_config("site-1", key, 1, {"broker": {"host": "1.2.3.4"}})
    assert open_site_message(good, key)["version"] == 1
    with pytest.raises(CameraSimError, match="bad or no signature"):
        open_site_message(good.replace(b'"version":1', b'"version":2'), key)
