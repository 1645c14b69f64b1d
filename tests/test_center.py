"""The reference center without a broker: its SQLite store (exactly-once, high-water mark,
processes sharing one file), the reconciliation report, the bundle publisher's version chain,
and the `afc sim center` / `afc bundle` commands through click's runner."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import random
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol as P
from edge_agent.keys import generate_key_file, public_hex
from firmware.stores.journal import JournalRecord
from simulators.center.errors import CenterError
from simulators.center.publisher import Publisher
from simulators.center.report import SUSPECTED_CLONE_REASON, build_report
from simulators.center.status import fleet_status, format_status
from simulators.center.store import SqliteCenterStore
from tools.bundle_cmd import bundle
from tools.center_cmd import center

DEV = "KNY-BUS-0042-V1"
KEY = Ed25519PrivateKey.generate()
CENTER = Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path):
    with SqliteCenterStore(tmp_path / "center.db") as s:
        s.register_device(DEV, "validator", public_hex(KEY))
        yield s


def batch(records, dev=DEV) -> P.Batch:
    return P.Batch(dev, records[0].seq, records[-1].seq, 1, tuple(records))


# -- store ------------------------------------------------------------------------------------


def test_store_is_exactly_once_with_contiguous_high_water(store):
    recs = P.wire_sample(150, random.Random(1), device_id=DEV)  # seq 1..300
    later = store.store_batch(batch(recs[100:200]))
    assert (later.new, later.duplicates, later.upto) == (100, 0, 0)  # 1..100 missing
    first = store.store_batch(batch(recs[:100]))
    assert (first.new, first.upto) == (100, 200)  # the gap closed: upto jumps over both
    again = store.store_batch(batch(recs[50:250]))  # overlaps stored and new
    assert (again.new, again.duplicates, again.upto) == (50, 150, 250)
    assert store.record_count(DEV) == 250
    assert list(store.records(DEV)) == recs[:250]  # every field round-trips through SQLite
    assert store.upto(DEV) == 250


def test_store_takes_decoded_batches_straight_from_their_columns(store, tmp_path):
    """A decoded batch is stored from its columns (no record objects): every field, NULLs,
    BLOB UIDs and card numbers above 2**63 round-trip exactly, and duplicates are counted."""
    recs = P.wire_sample(40, random.Random(6), device_id=DEV)
    recs[3] = dataclasses.replace(recs[3], card_number=(1 << 64) - 1, uid=bytes(10))
    recs[4] = dataclasses.replace(recs[4], card_number=(1 << 64) - 1, uid=bytes(10))
    decoded = P.decode_batch(P.encode_batch(DEV, recs, KEY, ts=77), {DEV: KEY.public_key()}.get)
    result = store.store_batches([decoded], worker="w-1")[0]
    assert (result.new, result.duplicates, result.upto) == (80, 0, 80)
    assert list(store.records(DEV)) == recs
    again = store.store_batch(decoded)
    assert (again.new, again.duplicates, again.upto) == (0, 80, 80)
    raw = sqlite3.connect(tmp_path / "center.db")
    types = raw.execute("SELECT typeof(uid), typeof(line), typeof(outcome), batch_ts, worker "
                        "FROM records WHERE seq IN (1, 2) ORDER BY seq").fetchall()
    raw.close()
    assert types == [("blob", "text", "null", 77, "w-1"), ("blob", "null", "text", 77, "w-1")]


def test_store_refuses_unregistered_device_and_keeps_bad_ranges(store):
    other = P.wire_sample(1, random.Random(2), device_id="OTHER-1")
    with pytest.raises(CenterError, match="not registered"):
        store.store_batch(batch(other, "OTHER-1"))
    store.note_bad_batch(DEV, 5, 9, "signature")
    store.note_bad_batch(DEV, 11, 12, "format")
    assert store.take_bad_ranges(DEV) == [(5, 9), (11, 12)]
    assert store.take_bad_ranges(DEV) == []  # reported once
    assert [b["reason"] for b in store.bad_batches(DEV)] == ["signature", "format"]


def test_store_is_durable_and_in_wal_mode(store, tmp_path):
    store.store_batch(batch(P.wire_sample(5, random.Random(3), device_id=DEV)))
    raw = sqlite3.connect(tmp_path / "center.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT count(*) FROM records").fetchone()[0] == 10
    raw.close()


def _store_in_process(path: str, start: int, n: int) -> None:
    recs = P.wire_sample(n, random.Random(start), device_id=DEV, first_seq=start)
    with SqliteCenterStore(path) as s:
        for i in range(0, len(recs), 10):
            s.store_batch(batch(recs[i:i + 10]))


def test_processes_sharing_one_store_store_each_record_once(store, tmp_path):
    """Four processes store overlapping ranges of one device at once: every record once,
    and the high-water mark is exact."""
    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "center.db")
    procs = [ctx.Process(target=_store_in_process, args=(path, 1 + 100 * i, 100))
             for i in range(4)]  # seq 1..200, 101..300, 201..400, 301..500
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert store.record_count(DEV) == 500
    assert store.seqs(DEV) == list(range(1, 501))
    assert store.upto(DEV) == 500


def test_nonces_increase_and_survive_reopen(store, tmp_path):
    a = store.next_nonce(DEV, 1000)
    b = store.next_nonce(DEV, 1000)
    assert (a, b) == (1000, 1001)
    with SqliteCenterStore(tmp_path / "center.db") as again:
        assert again.next_nonce(DEV, 5) == 1002


def test_status_events_dedup_and_alarms(store):
    assert store.record_json("status", {"v": 1, "dev": DEV, "ts": 1, "kind": "validator",
                                        "state": "online", "sw": "1.2"}, signed=False)
    ev = {"v": 1, "dev": "CAM-SITE-7", "ts": 2, "kind": "camera-site", "event": "door-open",
          "severity": "alarm", "seq": 1, "detail": {}}
    assert store.record_json("event", ev, signed=False)
    assert not store.record_json("event", ev, signed=False)  # same seq: duplicate
    cam = {"event": "camera-down", "severity": "alarm", "detail": {"camera": "c2"}}
    store.record_json("event", {**ev, **cam, "seq": 2, "ts": 3}, signed=False)
    store.record_json("event", {**ev, "event": "door-closed", "severity": "info", "seq": 3,
                                "ts": 4}, signed=False)
    store.record_json("telemetry", {"v": 1, "dev": "CAM-SITE-7", "ts": 5,
                                    "cameras": {"c1": "up", "c2": "down"}}, signed=False)
    entries = {e.device_id: e for e in fleet_status(store, now=10)}
    assert entries[DEV].online and entries[DEV].sw == "1.2"
    cam_site = entries["CAM-SITE-7"]
    assert not cam_site.online  # no retained status: not known to be online
    assert [a["event"] for a in cam_site.open_alarms] == ["camera-down"]  # the door closed
    text = format_status(list(entries.values()), now=10)
    assert "ALARM camera-down" in text and "c2:down" in text


# -- report -----------------------------------------------------------------------------------


def tap(seq, t, card, cb, bb, fare=2250, vehicle="42 KY 042"):
    intent = JournalRecord(kind="tap", seq=seq, phase="intent", time=t * 1000,
                           card_number=card, uid=b"\x01\x02\x03\x04", counter_before=cb,
                           counter_after=cb + 1, balance_before=bb, balance_after=bb - fare,
                           fare=fare, line="48", vehicle=vehicle, validator_id="V1")
    done = JournalRecord(kind="tap", seq=seq + 1, phase="done", link=seq, time=t * 1000,
                         card_number=card, uid=b"\x01\x02\x03\x04", counter_after=cb + 1,
                         balance_after=bb - fare, outcome="ok")
    return [intent, done]


def test_report_finds_gaps_regressions_fast_clones_and_balance_jumps(tmp_path):
    a, b = "BUS-A", "BUS-B"
    with SqliteCenterStore(tmp_path / "c.db") as s:
        for dev in (a, b):
            s.register_device(dev, "validator", public_hex(KEY))
        t0 = 1_760_000_000
        a_recs = (tap(1, t0, 111, 5, 9000) + tap(3, t0, 222, 10, 9000)
                  + tap(5, t0, 333, 1, 1000) + tap(7, t0, 444, 1, 9000)
                  + tap(9, t0, 555, 1, 9000) + tap(13, t0 + 10, 666, 1, 9000))
        b_recs = (tap(1, t0 + 30, 111, 6, 6750, vehicle="42 KY 043")  # 30 s later, other bus
                  + tap(3, t0 + 3600, 222, 8, 9000, vehicle="42 KY 043")  # counter went back
                  + tap(5, t0 + 3600, 333, 2, 5000, vehicle="42 KY 043")  # balance grew
                  + tap(7, t0 + 3600, 444, 5, 6750, vehicle="42 KY 043")  # taps elsewhere
                  + tap(9, t0 + 3600, 555, 2, 6750, vehicle="42 KY 043"))  # all consistent
        s.store_batch(batch(a_recs[:10], a))  # seq 1..10
        s.store_batch(batch(a_recs[10:], a))  # seq 13..14: 11, 12 missing
        s.store_batch(batch(b_recs, b))
        report = build_report(s, min_travel_s=120)

    devices = {d.device_id: d for d in report.devices}
    assert devices[a].gaps == [(11, 12)] and devices[a].upto == 10
    assert devices[b].gaps == [] and devices[b].upto == 10 and devices[b].complete
    kinds = {(f.card_number, f.kind) for f in report.findings}
    assert kinds == {(111, "too-fast"), (222, "counter-regression"),
                     (333, "balance-mismatch"), (444, "counter-gap")}
    assert report.suspected_clones == [111, 222]
    assert report.proposed_blacklist_delta == {
        "add": [[111, SUSPECTED_CLONE_REASON, None], [222, SUSPECTED_CLONE_REASON, None]],
        "remove": []}
    # the proposal is a valid blacklist-delta body as it stands
    body = report.proposed_blacklist_delta
    P.encode_bundle(P.Bundle("blacklist-delta", 2, body, 0, base=1), CENTER)
    assert report.cards_seen == 6
    assert json.loads(json.dumps(report.to_json()))["suspected_clones"] == [111, 222]
    assert "missing seq 11..12" in report.to_text()


def test_report_sees_open_intents(store):
    recs = tap(1, 100, 7, 1, 100)[:1]  # an intent whose done never came
    store.store_batch(batch(recs))
    (dev,) = build_report(store).devices
    assert dev.open_intents == [1]


# -- publisher --------------------------------------------------------------------------------


def test_blacklist_chain_and_reload_compose_a_full_list(store):
    published: list[tuple[str, bytes, bool]] = []

    async def publish(topic, payload, retain):
        published.append((topic, payload, retain))

    pub = Publisher(store, CENTER, publish)

    async def scenario():
        await pub.publish_blacklist_full([(30, 1, None), (10, 1, b"\x01\x02\x03\x04")])
        await pub.publish_blacklist_delta(add=[(20, 2, None)], remove=[30])
        await pub.publish_blacklist_delta(add=[(40, 2, None)])
        return await pub.republish_full("blacklist-delta")

    full = asyncio.run(scenario())
    topics = [t for t, _, _ in published]
    assert topics == ["afc/v1/cfg/blacklist", "afc/v1/cfg/blacklist-delta",
                      "afc/v1/cfg/blacklist-delta", "afc/v1/cfg/blacklist"]
    assert all(retain for _, _, retain in published)
    deltas = [P.decode_bundle(p, CENTER.public_key(), now_ms=0) for t, p, _ in published[1:3]]
    assert [(d.version, d.base) for d in deltas] == [(2, 1), (3, 2)]
    # the reload is a *full* list at the chain's current version, with every delta applied
    assert (full.kind, full.version) == ("blacklist", 3)
    assert full.body["entries"] == [(10, 1, b"\x01\x02\x03\x04"), (20, 2, None), (40, 2, None)]
    assert pub.blacklist_state() == (3, {10: (1, b"\x01\x02\x03\x04"), 20: (2, None),
                                         40: (2, None)})
    with pytest.raises(CenterError, match="rollback"):
        pub.sign("blacklist", {"entries": []}, version=2)
    # a second reload republishes the same full list
    again = asyncio.run(pub.republish_full("blacklist"))
    assert again.version == 3 and published[-1][1] == published[-2][1]


def test_reload_request_for_other_kinds_republishes_latest(store):
    published: list[bytes] = []

    async def publish(topic, payload, retain):
        published.append(payload)

    pub = Publisher(store, CENTER, publish)
    asyncio.run(pub.publish("agent", {"settings": {"telemetry_s": 30}}))
    asyncio.run(pub.publish("agent", {"settings": {"telemetry_s": 60}}))
    asyncio.run(pub.on_reload_request(DEV, {"kind": "agent", "version": 1}))
    got = P.decode_bundle(published[-1], CENTER.public_key(), now_ms=0)
    assert (got.version, got.body) == (2, {"settings": {"telemetry_s": 60}})
    assert asyncio.run(pub.republish_full("fares")) is None  # nothing ever signed


# -- commands (CLI) -----------------------------------------------------------------------------


def test_center_cli_keygen_register_report_status(tmp_path):
    runner = CliRunner()
    db = str(tmp_path / "c.db")
    res = runner.invoke(center, ["keygen", "--out", str(tmp_path / "dev.key")])
    assert res.exit_code == 0, res.output
    dev_pub = res.output.strip()
    assert len(dev_pub) == 64
    res = runner.invoke(center, ["keygen", "--out", str(tmp_path / "dev.key")])
    assert res.exit_code != 0 and "refusing to overwrite" in str(res.exception)
    res = runner.invoke(center, ["register", "--db", db, "--device", DEV, "--public-key",
                                 dev_pub, "--kind", "validator"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(center, ["register", "--db", db, "--device", "bad/id",
                                 "--public-key", dev_pub])
    assert res.exit_code != 0
    res = runner.invoke(center, ["report", "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["devices"][0]["device_id"] == DEV
    res = runner.invoke(center, ["status", "--db", db, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["online"] is False
    for sub in ("run", "report", "status", "register", "cmd", "keygen"):
        res = runner.invoke(center, [sub, "--help"])
        assert res.exit_code == 0 and len(res.output) > 200


def test_bundle_cli_sign_verify_and_refusals(tmp_path):
    runner = CliRunner()
    key = tmp_path / "center.key"
    pub = public_hex(generate_key_file(key))
    other = public_hex(Ed25519PrivateKey.generate())
    csv_file = tmp_path / "bl.csv"
    csv_file.write_text("card_number,reason,uid\n12345678,1,01020304\n87654321,2,\n")
    out = tmp_path / "bl.bundle"
    res = runner.invoke(bundle, ["sign", "--kind", "blacklist", "--version", "7", "--key",
                                 str(key), "--in", str(csv_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["entries"] == 2
    res = runner.invoke(bundle, ["verify", "--center-public", pub, "--in", str(out)])
    assert res.exit_code == 0 and json.loads(res.output)["valid"] is True
    res = runner.invoke(bundle, ["verify", "--center-public", other, "--in", str(out)])
    assert res.exit_code != 0 and "signature" in str(res.exception)
    tariff = Path(__file__).parents[1] / "firmware/core/tariffs/konya-2025.toml"
    res = runner.invoke(bundle, ["sign", "--kind", "fares", "--version", "2025082701", "--key",
                                 str(key), "--in", str(tariff), "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1.5\n")
    res = runner.invoke(bundle, ["sign", "--kind", "fares", "--version", "3", "--key",
                                 str(key), "--in", str(bad), "--out", str(tmp_path / "g")])
    assert res.exit_code != 0
    delta = tmp_path / "d.json"
    delta.write_text(json.dumps({"add": [[5, 1, None]], "remove": [12345678]}))
    res = runner.invoke(bundle, ["sign", "--kind", "blacklist-delta", "--version", "8",
                                 "--key", str(key), "--in", str(delta), "--out",
                                 str(tmp_path / "d.bundle")])
    assert res.exit_code != 0 and "base" in str(res.exception)  # a delta needs --base
    res = runner.invoke(bundle, ["--help"])
    assert res.exit_code == 0 and "newer than theirs" in res.output


# -- dealer credit (issue 7) ------------------------------------------------------------------

T0 = 1_767_225_600  # 2026-01-01 00:00 UTC = 03:00 in Türkiye
DAY_S = 86_400


def topup(seq, t, amount, *, done="ok", card=4_200_001, dev="bayi-1", names=None):
    """A load as firmware/apps/topup.py journals it: intent (the amount in ``fare``), then
    done (``not-charged`` gives the credit back); ``done=None`` leaves the intent open.
    ``names``: the ``action_id`` both carry (``credit:<allowance_id>`` from a terminal that
    names its allowance; None as from older software)."""
    intent = JournalRecord(kind="topup", seq=seq, phase="intent", time=t * 1000,
                           card_number=card, uid=b"\x01\x02\x03\x04", counter_before=1,
                           counter_after=2, balance_before=100, balance_after=100 + amount,
                           fare=amount, product=1, validator_id="9017", action_id=names,
                           device_id=dev)
    if done is None:
        return [intent]
    return [intent, JournalRecord(kind="topup", seq=seq + 1, phase="done", link=seq,
                                  time=t * 1000, card_number=card, uid=b"\x01\x02\x03\x04",
                                  counter_after=2, balance_after=100 + amount,
                                  fare=amount if done != "not-charged" else 0, product=1,
                                  outcome=done, action_id=names, device_id=dev)]


def _publisher(store):
    published: list[tuple[str, bytes, bool]] = []

    async def publish(topic, payload, retain):
        published.append((topic, payload, retain))

    return Publisher(store, CENTER, publish), published


def test_issued_allowances_are_recorded_from_the_publisher_and_from_signed_files(store,
                                                                                 tmp_path):
    pub, published = _publisher(store)
    bundle_1 = asyncio.run(pub.issue_allowance("bayi-1", "A-1", 100_000, T0, T0 + 30 * DAY_S,
                                               daily_limit=60_000))
    assert (bundle_1.kind, bundle_1.target, bundle_1.version) == ("credit", "bayi-1", 1)
    assert published[0][0] == "afc/v1/cfg/credit/bayi-1" and published[0][2]  # retained
    (a1,) = store.allowances("bayi-1")
    assert (a1.allowance_id, a1.amount, a1.valid_from, a1.valid_until, a1.daily_limit,
            a1.bundle_version, a1.target, a1.source) == (
        "A-1", 100_000, T0, T0 + 30 * DAY_S, 60_000, 1, "bayi-1", "publisher")
    # the allowance inside is what a terminal accepts: signed by the center, for the dealer
    from firmware.apps.topup import CreditAllowance

    credit = CreditAllowance.from_json(json.dumps(bundle_1.body["allowance"]))
    credit.verify(CENTER.public_key())
    # a signed credit bundle file (afc bundle sign --kind credit) and an allowance file
    signed = dataclasses.replace(
        CreditAllowance("bayi-2", "A-2", 50_000, T0, T0 + 7 * DAY_S, b""))
    signed = dataclasses.replace(signed, signature=CENTER.sign(signed.signed_bytes()))
    bundle_file = tmp_path / "credit.bundle"
    bundle_file.write_bytes(P.encode_bundle(P.Bundle(
        "credit", 3, {"allowance": json.loads(signed.to_json())}, 0, target="bayi-2"), CENTER))
    key_file = tmp_path / "center.key"
    generate_key_file(key_file)  # another center's key: its signature does not check out
    runner = CliRunner()
    res = runner.invoke(center, ["allowance", "register", "--db", str(store.path),
                                 "--key", str(key_file), "--in", str(bundle_file)])
    assert res.exit_code != 0 and "not a bundle signed by this center" in str(res.exception)
    res = runner.invoke(center, ["allowance", "register", "--db", str(store.path),
                                 "--center-public", public_hex(CENTER), "--in",
                                 str(bundle_file), "--daily-limit-tl", "300"])
    assert res.exit_code == 0, res.output
    allowance_file = tmp_path / "allowance.json"
    third = dataclasses.replace(signed, allowance_id="A-3", dealer_id="bayi-3", signature=b"")
    third = dataclasses.replace(third, signature=CENTER.sign(third.signed_bytes()))
    allowance_file.write_text(third.to_json())
    res = runner.invoke(center, ["allowance", "register", "--db", str(store.path),
                                 "--center-public", public_hex(CENTER), "--in",
                                 str(allowance_file)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(center, ["allowance", "list", "--db", str(store.path), "--json"])
    listed = {a["allowance_id"]: a for a in json.loads(res.output)}
    assert sorted(listed) == ["A-1", "A-2", "A-3"]
    assert (listed["A-2"]["dealer_id"], listed["A-2"]["daily_limit"], listed["A-2"]["source"],
            listed["A-2"]["bundle_version"]) == ("bayi-2", 30_000, "file", 3)
    assert listed["A-3"]["bundle_version"] is None and "signature_hex" not in listed["A-3"]
    # refused: an allowance the center did not sign (before anything is signed or stored),
    # and an allowance id reused for another grant
    forged = dataclasses.replace(signed, allowance_id="A-9",
                                 signature=Ed25519PrivateKey.generate().sign(b"x"))
    with pytest.raises(CenterError, match="not signed by the center"):
        pub.sign("credit", {"allowance": json.loads(forged.to_json())}, target="bayi-2")
    with pytest.raises(CenterError, match="already issued to dealer bayi-1"):
        pub.sign_allowance("bayi-1", "A-1", 999_999, T0, T0 + DAY_S)
    assert [a.allowance_id for a in store.allowances()] == ["A-1", "A-2", "A-3"]
    assert len(store.bundles("credit", "bayi-1")) == 1
    res = runner.invoke(center, ["allowance", "issue", "--db", str(store.path), "--key",
                                 str(key_file), "--dealer", "bayi-1", "--id", "A-1",
                                 "--amount-tl", "5", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "issued already" in str(res.exception)


def test_dealer_report_flags_top_ups_the_issued_credit_does_not_cover(tmp_path):
    """An honest dealer within its allowance and per-day limit (a torn load settled
    not-charged gives its credit back) is not flagged; an insider's extra loads are, each for
    its reason; a dealer the center never gave credit to is flagged whole."""
    with SqliteCenterStore(tmp_path / "c.db") as s:
        for dev in ("bayi-1", "bayi-2", "bayi-3"):
            s.register_device(dev, "topup", public_hex(KEY))
        pub, _ = _publisher(s)
        asyncio.run(pub.issue_allowance("bayi-1", "A-1", 100_000, T0, T0 + 30 * DAY_S,
                                        daily_limit=60_000))
        asyncio.run(pub.issue_allowance("bayi-2", "A-2", 50_000, T0, T0 + 10 * DAY_S,
                                        daily_limit=40_000))
        h = 3600
        honest = (topup(1, T0 + h, 30_000) + topup(3, T0 + 2 * h, 29_000)
                  + topup(5, T0 + 3 * h, 50_000, done="not-charged")  # torn: released
                  + topup(7, T0 + DAY_S + h, 40_000))  # the next day: 99,000 of 100,000
        s.store_batch(batch(honest, "bayi-1"))
        insider = (topup(1, T0 + h, 20_000) + topup(3, T0 + 2 * h, 15_000)
                   + topup(5, T0 + 3 * h, 10_000)  # 45,000 that day: over 40,000
                   + topup(7, T0 + DAY_S, 10_000, done=None)  # open intent: counts, 55,000
                   + topup(8, T0 + 20 * DAY_S, 7_000)  # only A-1 (bayi-1's) covers it
                   + topup(10, T0 + 40 * DAY_S, 3_000))  # no allowance at all covers it
        s.store_batch(batch(insider, "bayi-2"))
        s.store_batch(batch(topup(1, T0 + h, 1_000, dev="bayi-3"), "bayi-3"))
        s.note_bad_batch("bayi-2", 12, 20, "batch signature does not verify")
        report = build_report(s)
        res = CliRunner().invoke(center, ["report", "--db", str(tmp_path / "c.db"), "--json"])
        text = CliRunner().invoke(center, ["report", "--db", str(tmp_path / "c.db")])

    dealers = {d.dealer_id: d for d in report.dealers}
    assert report.flagged_dealers == ["bayi-2", "bayi-3"]
    one = dealers["bayi-1"]
    assert (one.topups, one.total, one.findings) == (3, 99_000, [])
    assert [(a.allowance_id, a.used, a.topups) for a in one.allowances] == [("A-1", 99_000, 3)]
    two = {f.kind: f for f in dealers["bayi-2"].findings}
    assert sorted(two) == ["other-dealer", "outside-validity", "over-allowance",
                           "over-daily-limit", "refused-batch"]
    assert (two["over-allowance"].allowance_id, two["over-allowance"].amount,
            two["over-allowance"].records) == ("A-2", 5_000, [("bayi-2", 7)])
    assert (two["over-daily-limit"].amount, two["over-daily-limit"].records) == (
        5_000, [("bayi-2", 5), ("bayi-2", 6)])
    assert (two["other-dealer"].allowance_id, two["other-dealer"].records) == (
        "A-1", [("bayi-2", 8), ("bayi-2", 9)])
    assert "bayi-1" in two["other-dealer"].message
    assert (two["outside-validity"].amount, two["outside-validity"].records) == (
        3_000, [("bayi-2", 10), ("bayi-2", 11)])
    assert "12..20" in two["refused-batch"].message
    (three,) = dealers["bayi-3"].findings
    assert (three.kind, three.amount, three.records) == (
        "no-allowance", 1_000, [("bayi-3", 1), ("bayi-3", 2)])
    # the command shows the same, as JSON and as text
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["flagged_dealers"] == ["bayi-2", "bayi-3"]
    by_id = {d["dealer_id"]: d for d in out["dealers"]}
    assert by_id["bayi-1"]["flagged"] is False and by_id["bayi-1"]["total"] == 99_000
    assert sorted(f["kind"] for f in by_id["bayi-2"]["findings"]) == sorted(two)
    assert text.exit_code == 0
    assert "bayi-1: 3 top-up(s), 990,00 TL, matched by credit" in text.output
    assert ("FLAG over-allowance: allowance A-2: 550,00 TL loaded against 500,00 TL issued"
            in text.output)
    assert "FLAG no-allowance" in text.output and "bayi-3#1" in text.output


def test_dealer_counting_follows_the_terminal_and_the_default_daily_limit(tmp_path):
    """What counts is what the terminal counts: an intent (also while open, also without its
    done at the center), not a not-charged one; a done or stand-alone record whose intent
    never arrived counts too. The per-day limit without one recorded is the report's default."""
    from simulators.center.dealer import reconcile_dealer, topups

    recs = (topup(1, T0, 1_000) + topup(3, T0, 2_000, done="not-charged")
            + topup(5, T0, 4_000, done=None) + topup(6, T0, 8_000)[1:]  # done only
            + [dataclasses.replace(topup(8, T0, 16_000)[0], phase="event")])
    counted = topups(recs)
    assert [(t.seq, t.amount, t.records) for t in counted] == [
        (1, 1_000, (1, 2)), (5, 4_000, (5,)), (7, 8_000, (7,)), (8, 16_000, (8,))]
    with SqliteCenterStore(tmp_path / "c.db") as s:
        pub, _ = _publisher(s)
        pub.sign_allowance("bayi-1", "A-1", 10**9, T0 - DAY_S, T0 + DAY_S)
        issued = s.allowances()
    result = reconcile_dealer("bayi-1", recs, issued, default_daily_limit=20_000)
    assert [(f.kind, f.amount, f.allowance_id) for f in result.findings] == [
        ("over-daily-limit", 9_000, None)]
    assert reconcile_dealer("bayi-1", recs, issued, default_daily_limit=29_000).findings == []


def test_named_top_ups_are_checked_against_the_allowance_they_name(tmp_path):
    """A top-up naming its allowance (``credit:<id>``) is checked against that one: never
    issued -> unknown-allowance, another dealer's -> other-dealer, its time outside that
    allowance -> outside-validity (even when another allowance of the dealer covers the
    time), each naming the id; the named ones within validity sum on that allowance even
    when a newer one covers the time. Unnamed records (older terminals) are still
    attributed by time; the day's sum takes every top-up, as before."""
    with SqliteCenterStore(tmp_path / "c.db") as s:
        for dev in ("bayi-1", "bayi-2"):
            s.register_device(dev, "topup", public_hex(KEY))
        pub, _ = _publisher(s)
        pub.sign_allowance("bayi-1", "A-1", 100_000, T0, T0 + 30 * DAY_S, daily_limit=150_000)
        pub.sign_allowance("bayi-2", "A-2", 50_000, T0, T0 + 30 * DAY_S)
        pub.sign_allowance("bayi-1", "A-1b", 100_000, T0 + 5 * DAY_S, T0 + 40 * DAY_S)
        h = 3600
        recs = (topup(1, T0 + h, 60_000, names="credit:A-1")
                # A-1b is the newest covering this time: by time it would land there
                + topup(3, T0 + 10 * DAY_S, 50_000, names="credit:A-1")
                + topup(5, T0 + 2 * h, 7_000, names="credit:A-404", done=None)  # open intent
                + topup(6, T0 + 3 * h, 8_000, names="credit:A-2")
                + topup(8, T0 + 35 * DAY_S, 9_000, names="credit:A-1")  # A-1 ended; A-1b not
                + topup(10, T0 + 4 * h, 1_000, names="web-topup-1")  # no credit reference
                + topup(12, T0 + 11 * DAY_S, 4_000, names="credit:A-404", done="not-charged")
                + topup(14, T0 + 20 * DAY_S, 11_000)  # unnamed: by time, to A-1b
                + topup(16, T0 + 50 * DAY_S, 2_000))  # unnamed: no allowance covers it
        s.store_batch(batch(recs, "bayi-1"))
        s.store_batch(batch(topup(1, T0 + h, 5_000, dev="bayi-2", names="credit:A-2"),
                            "bayi-2"))
        report = build_report(s)
        res = CliRunner().invoke(center, ["report", "--db", str(tmp_path / "c.db"), "--json"])
        text = CliRunner().invoke(center, ["report", "--db", str(tmp_path / "c.db")])

    dealers = {d.dealer_id: d for d in report.dealers}
    assert report.flagged_dealers == ["bayi-1"]
    two = dealers["bayi-2"]
    assert (two.findings, [(a.allowance_id, a.used) for a in two.allowances]) == (
        [], [("A-2", 5_000)])  # bayi-1's record naming A-2 is not counted on it
    one = dealers["bayi-1"]
    assert (one.topups, one.total) == (8, 148_000)  # the not-charged one gives its 40 TL back
    assert [(a.allowance_id, a.used, a.topups) for a in one.allowances] == [
        ("A-1", 110_000, 2), ("A-1b", 11_000, 1)]
    found = [(f.kind, f.allowance_id, f.named, f.amount, f.records) for f in one.findings]
    assert found == [
        ("outside-validity", None, False, 2_000, [("bayi-1", 16), ("bayi-1", 17)]),
        ("unknown-allowance", "A-404", True, 7_000, [("bayi-1", 5)]),
        ("other-dealer", "A-2", True, 8_000, [("bayi-1", 6), ("bayi-1", 7)]),
        ("unknown-allowance", "web-topup-1", True, 1_000, [("bayi-1", 10), ("bayi-1", 11)]),
        ("outside-validity", "A-1", True, 9_000, [("bayi-1", 8), ("bayi-1", 9)]),
        ("over-allowance", "A-1", False, 10_000, [("bayi-1", 3), ("bayi-1", 4)]),
    ]
    msgs = {(f.kind, f.allowance_id): f.message for f in one.findings}
    assert "A-404, which the center never issued" in msgs[("unknown-allowance", "A-404")]
    assert "not a credit allowance" in msgs[("unknown-allowance", "web-topup-1")]
    assert "issued to dealer bayi-2, not to bayi-1" in msgs[("other-dealer", "A-2")]
    assert f"valid {T0}..{T0 + 30 * DAY_S}" in msgs[("outside-validity", "A-1")]
    # the day's sum counts every top-up, named or not, flagged or not: 76,000 on day one
    # (60,000 + 7,000 + 8,000 + 1,000) against the 150,000 A-1 records for bayi-1
    from simulators.center.dealer import reconcile_dealer

    with SqliteCenterStore(tmp_path / "c.db") as s:
        low = reconcile_dealer("bayi-1", s.records("bayi-1"),
                               [dataclasses.replace(a, daily_limit=75_000)
                                if a.allowance_id == "A-1" else a for a in s.allowances()])
    (day,) = [f for f in low.findings if f.kind == "over-daily-limit"]
    assert (day.amount, day.allowance_id, day.records) == (
        1_000, "A-1", [("bayi-1", 10), ("bayi-1", 11)])
    # the command shows the same, as JSON (with ``named``) and as text
    assert res.exit_code == 0, res.output
    by_id = {d["dealer_id"]: d for d in json.loads(res.output)["dealers"]}
    assert [(f["kind"], f["allowance_id"], f["named"]) for f in by_id["bayi-1"]["findings"]] \
        == [(k, a, n) for k, a, n, _, _ in found]
    assert text.exit_code == 0
    assert ("FLAG unknown-allowance: 1 top-up(s), 70,00 TL: they name credit allowance "
            "A-404, which the center never issued") in text.output
    assert "bayi-1#5" in text.output and "bayi-2: 1 top-up(s), 50,00 TL, matched" in text.output


def test_the_center_issues_no_allowance_a_terminal_cannot_name(store):
    """``credit:`` + the id must fit a journal record's ``action_id`` (64 characters)."""
    from firmware.apps.topup import ALLOWANCE_ID_MAX

    pub, _ = _publisher(store)
    with pytest.raises(CenterError, match=r"cannot be journaled.*a terminal can load against"):
        pub.sign_allowance("bayi-1", "A" * (ALLOWANCE_ID_MAX + 1), 1_000, T0, T0 + DAY_S)
    assert store.allowances() == []
    pub.sign_allowance("bayi-1", "A" * ALLOWANCE_ID_MAX, 1_000, T0, T0 + DAY_S)
    assert [a.allowance_id for a in store.allowances()] == ["A" * ALLOWANCE_ID_MAX]
