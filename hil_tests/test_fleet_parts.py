"""The fleet simulator's parts, each against the real thing: the scenario loader, the link
proxy between a real Mosquitto and a real MQTT client, a real validator process on the fleet
clock with its disk filling up, the rider planner, and the reconciliation checks fed with
broken ledgers (every check must be able to fail)."""

from __future__ import annotations

import random
import socket
import sqlite3
import sys
import time
from dataclasses import replace
from datetime import date

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity
from firmware.core.classic_layout import CardType
from firmware.core.keys import FileKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import Purse
from firmware.stores.journal import JournalRecord
from simulators.bus_day import local_time, standard_cards
from simulators.cards import VirtualCard
from simulators.fleet import ScenarioError, load_scenario
from simulators.fleet.clock import ClockSetting, write_clock
from simulators.fleet.procs import ManagedProcess
from simulators.fleet.proxy import LinkProxy
from simulators.fleet.reconcile import CardState, DeviceFacts, check_cards, reconcile
from simulators.fleet.rf import RfWorld, read_snapshot
from simulators.fleet.riders import MIN_TRAVEL_S, build_fleet, plan_riders
from simulators.fleet.runner import classify
from simulators.fleet.scenario import scenario_from_dict

DAY = date(2026, 3, 10)


# -- scenarios ------------------------------------------------------------------------------


def test_shipped_scenarios_load_and_an_empty_one_has_defaults():
    for name in ("demo", "ci", "soak"):
        sc = load_scenario(name)
        assert sc.name == name and sc.validators >= 3 and sc.speed > 1
    empty = scenario_from_dict({})
    assert empty.validators == 5 and empty.cards == 30 and not empty.faults.any_process_fault


@pytest.mark.parametrize("data, words", [
    ({"faults": {"kil_agent": 2}}, "faults.kil_agent"),
    ({"lines": [{"id": 1, "validators": 4}]}, "validators must be within 1..3"),
    ({"time": {"start": "25:00"}}, "time.start"),
    ({"riders": {"cards": 5}}, "riders.cards"),
    ({"faults": {"clone": "yes"}}, "faults.clone must be true or false"),
])
def test_scenario_mistakes_are_refused_by_name(data, words):
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, source="my.toml")
    assert words in str(info.value) and str(info.value).startswith("my.toml:")


def test_unknown_scenario_names_the_shipped_ones():
    with pytest.raises(ScenarioError, match="demo"):
        load_scenario("no-such-city")


# -- the link proxy -------------------------------------------------------------------------


def _client(port: int, name: str) -> tuple[mqtt.Client, list[bytes]]:
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    return client, got


def test_link_proxy_up_blackhole_drop_up(mosquitto):
    with LinkProxy((mosquitto.host, mosquitto.port), name="bus-1") as proxy:
        sub, got = _client(mosquitto.port, "center")
        sub.subscribe("t", qos=1)
        time.sleep(0.3)
        dev, _ = _client(proxy.port, "device")
        dev.publish("t", b"1", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while got != [b"1"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [b"1"] and proxy.bytes_up > 0

        proxy.set_state("blackhole")  # the link is dead, silently: nothing gets through
        info = dev.publish("t", b"2", qos=1)
        time.sleep(1.0)
        assert got == [b"1"] and not info.is_published()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            s.sendall(b"\x10\x00")  # accepted, then silence
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)

        proxy.set_state("drop")  # the modem reports no carrier: connections are reset
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            s.settimeout(2)
            with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
                s.sendall(b"\x10\x00" * 100)
                if not s.recv(1):
                    raise ConnectionResetError

        proxy.set_state("up")  # back: a fresh connection goes through again
        dev.loop_stop()
        dev2, _ = _client(proxy.port, "device-2")
        dev2.publish("t", b"3", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while b"3" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"3" in got
        for c in (dev2, sub):
            c.disconnect()
            c.loop_stop()


# -- a real validator on the fleet clock, with a disk that fills -----------------------------


def _issue(keys, number: int, balance: int, seed: int) -> VirtualCard:
    card = VirtualCard.new(CardType.CLASSIC_1K, rng=random.Random(seed))
    field = Field([card])
    selected = select_card(field.transceive)
    now = local_time(DAY, 0)
    Purse(ClassicReader(field.transceive, selected.uid), keys, key_type="B").issue(
        Identity(number, 1, 1, now - 86_400, now + 86_400 * 3650, None, 1, b"FLEETHIL"),
        balance=balance)
    return card


def test_validator_process_on_the_fleet_clock_with_a_full_disk(tmp_path):
    keys = FileKeyStore.generate(tmp_path / "keys.toml",
                                 names=("classic-sector", "purse-mac", "journal-mac"))
    rich, poor = _issue(keys, 51_000_001, 50_000, 1), _issue(keys, 51_000_002, 0, 2)
    other = _issue(keys, 51_000_003, 30_000, 3)
    (tmp_path / "v.toml").write_text(
        '[device]\nid = "bus-9"\nvalidator_id = 91\nvehicle_id = 9\nline_id = 41\n'
        f'[reader]\nmode = "transparent"\n[keys]\nstore = "{tmp_path / "keys.toml"}"\n')
    clock_path, faults_path = tmp_path / "clock.json", tmp_path / "faults.json"
    eight = local_time(DAY, 8)
    write_clock(clock_path, ClockSetting(time.time(), eight, 1.0))
    faults_path.write_text('{"disk_full": false}')
    rf = RfWorld(tmp_path)
    reader = rf.add_reader("bus-9")
    proc = ManagedProcess("bus-9", [sys.executable, "-m", "simulators.fleet.device",
                                    "--faults", str(faults_path), "--",
                                    "validator", "--reader", reader, "--db",
                                    str(tmp_path / "v.db"), "--config", str(tmp_path / "v.toml"),
                                    "--clock-file", str(clock_path)],
                          tmp_path / "bus-9.log", watch_stdout=True)

    def tap(card: VirtualCard) -> str:
        mark = proc.line_count
        rf.place("bus-9", card)
        got = proc.wait_line(mark, lambda s: s.startswith("["), 15)
        rf.remove("bus-9", card)
        assert rf.wait_polls("bus-9", 3, 5)
        assert got is not None, proc.log_tail()
        return got[2]

    def journal() -> list[tuple]:
        conn = sqlite3.connect(f"file:{tmp_path / 'v.db'}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT seq, phase, kind, time FROM journal ORDER BY seq"
                                ).fetchall()
        finally:
            conn.close()

    try:
        proc.start()
        assert rf.wait_polls("bus-9", 1, 30, since=0), proc.log_tail()
        assert classify(tap(rich)) == (True, "OK")
        first = journal()
        assert [r[1] for r in first] == ["intent", "done"]
        assert abs(first[0][3] / 1000 - eight) < 30  # the fleet's clock, not the machine's

        # the clock is set back an hour: the guard keeps time from running backwards
        write_clock(clock_path, ClockSetting(time.time(), eight - 3600, 1.0))
        assert classify(tap(poor))[1] == "INSUFFICIENT_BALANCE"
        assert journal()[-1][3] >= first[-1][3]

        # the disk fills up: within a page of records the validator refuses, charges nothing
        faults_path.write_text('{"disk_full": true}')
        seen = [classify(tap(poor))[1] for _ in range(3)]
        for _ in range(60):  # bounded: a 4 KiB page holds a few dozen records at most
            if seen[-1] == "OUT_OF_SERVICE":
                break
            seen.append(classify(tap(poor))[1])
        assert seen[-1] == "OUT_OF_SERVICE", seen
        before = len(journal())
        assert classify(tap(other))[1] == "OUT_OF_SERVICE"  # a rider who would pay
        assert len(journal()) == before
        faults_path.write_text('{"disk_full": false}')  # space back: in service again
        assert classify(tap(other)) == (True, "OK")
    finally:
        proc.stop()
        rf.stop()
    for card, balance in ((rich, 50_000), (other, 30_000)):  # one fare each, never two
        snap = read_snapshot(card, keys)
        assert (snap.counter, snap.balance) == (1, balance - 2250)


# -- the riders' day ------------------------------------------------------------------------


def test_rider_day_is_seeded_and_physically_possible():
    sc = replace(load_scenario("ci"), day=DAY)
    fleet = build_fleet(sc)
    cards = standard_cards(sc.cards, DAY, random.Random(1))
    day1 = plan_riders(cards, fleet, sc, random.Random(5))
    day2 = plan_riders(cards, fleet, sc, random.Random(5))
    assert day1.events == day2.events and day1.clone_events == day2.clone_events
    assert day1.clone_of is not None and day1.rollback is not None and len(day1.victims) == 2
    assert len({e.card for e in day1.power_cuts}) == 2
    vehicle = {s.device_id: s.vehicle_id for s in fleet.validators}
    last: dict[int, tuple[int, object]] = {}
    for e in day1.events:
        where = vehicle.get(e.device, e.device)
        if e.card in last:
            t, w = last[e.card]
            assert e.time > t and (w == where or e.time - t >= MIN_TRAVEL_S), e
        last[e.card] = (e.time, where)


# -- the reconciliation must be able to fail -------------------------------------------------


def _tap(dev: str, seq: int, card: int, cb: int, bb: int, fare: int, *, done: str | None = "ok",
         kind: str = "tap", t: int = 1_000_000) -> list[JournalRecord]:
    intent = JournalRecord(kind, t, card, b"\x01\x02\x03\x04", cb, cb + 1, bb, bb - fare, fare,
                           seq=seq, phase="intent", device_id=dev)
    if done is None:
        return [intent]
    return [intent, JournalRecord(kind, t, card, None, None, cb + 1, None, bb - fare,
                                  seq=seq + 1, phase="done", link=seq, outcome=done,
                                  device_id=dev)]


def _by_card(records):
    out: dict[int, list] = {}
    for r in records:
        out.setdefault(r.card_number, []).append(r)
    return out


def test_card_ledger_accepts_a_clean_history_and_a_cut_settled_by_the_card():
    issued = {7: CardState(7, 0, 10_000)}
    recs = _tap("a", 1, 7, 0, 10_000, 2250) + _tap("b", 1, 7, 1, 7750, 2250, done=None)
    recs += _tap("a", 3, 7, 2, 5500, 2250)
    problems, ledger = check_cards(_by_card(recs), issued, {7: CardState(7, 3, 3250)})
    assert problems == [] and ledger["fares"] == 6750 and ledger["settled_by_card"] == 1


@pytest.mark.parametrize("mutation, words", [
    ("double", "charged 2 times"),
    ("missing", "no device reported it"),
    ("balance", "the card held"),
    ("final", "the card holds"),
    ("phantom", "never reached"),
])
def test_card_ledger_catches_every_kind_of_wrong(mutation, words):
    issued = {7: CardState(7, 0, 10_000)}
    recs = _tap("a", 1, 7, 0, 10_000, 2250) + _tap("a", 3, 7, 1, 7750, 2250)
    final = CardState(7, 2, 5500)
    if mutation == "double":  # a second device reports the same write as its own
        recs += _tap("b", 1, 7, 1, 7750, 2250)
    elif mutation == "missing":
        recs = recs[:2]
    elif mutation == "balance":
        recs = recs[:2] + _tap("a", 3, 7, 1, 9999, 2250)
    elif mutation == "final":
        final = CardState(7, 2, 5400)
    elif mutation == "phantom":
        recs += _tap("b", 1, 7, 2, 5500, 2250)
    problems, _ = check_cards(_by_card(recs), issued, {7: final})
    assert any(words in p for p in problems), problems


def _device(name, last, **kw):
    base = dict(device_id=name, last_seq=last, acked_seq=last, blacklist_version=3,
                blacklisted=frozenset({99}), open_intents=0, time_regressions=[])
    base.update(kw)
    return DeviceFacts(**base)


def test_reconciliation_fails_each_system_invariant():
    report = {"devices": [{"device_id": "a", "gaps": [[3, 3]], "upto": 2, "last": 4}],
              "suspected_clones": [7, 8], "findings": [],
              "dealers": [{"dealer_id": "bayi-1", "topups": 2, "findings": [
                  {"kind": "over-daily-limit", "message": "60,000 TL on 2026-03-02"}]}]}
    issued, final = {7: CardState(7, 0, 100)}, {7: CardState(7, 0, 100)}
    result = reconcile(
        report=report, records=[], devices=[_device("a", 4, blacklist_version=2,
                                                    time_regressions=[(3, 5000)])],
        validators=["a"], issued=issued, final=final, injected_clones=[7, 9],
        blacklist_version=3, delta_cards=[99, 100],
        site_events={"s": [{"seq": 2, "event": "door-open", "received_ms": 1},
                           {"seq": 1, "event": "boot", "received_ms": 2}]},
        injected_alarms={"s": ["camera-down"]}, site_last_seq={"s": 4},
        emulator_errors={"bus": 1})
    failed = {c.name for c in result.checks if not c.ok}
    assert failed == {"records", "clones", "blacklist", "clocks", "camera alarms", "emulators",
                      "dealers"}
    text = " ".join(result.failures)
    for words in ("missing seq", "card 9 was cloned", "card 8 is suspected without cause",
                  "blacklist version 2", "[100] not on its blacklist", "time goes back",
                  "out of order", "seq [3, 4] never reached", "injected alarms",
                  "bayi-1: over-daily-limit"):
        assert words in text, words
