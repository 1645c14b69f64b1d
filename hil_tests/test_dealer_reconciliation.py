"""Dealer fraud, end to end (issue 7): the center flags top-ups the credit it issued does not
cover, and leaves an honest dealer alone.

Every part is the real one: Debian's mosquitto; ``afc sim center run`` with an ingest worker
process; ``afc sim center allowance issue`` signing each dealer's credit allowance, recording
it and publishing it retained for the dealer; ``python -m edge_agent`` on each dealer
terminal, which applies the credit bundle to the device database and ships the journal;
``firmware.apps.topup.TopupTerminal`` loading virtual MIFARE cards against the synced
allowance; every record the terminals write names the allowance it drew on
(``action_id`` ``credit:<allowance_id>``). The insider then writes extra top-ups straight into
his terminal's journal with the right journal MAC key (a dealer with root on his own
terminal): naming his own allowance, over the allowance and over the day's limit; naming an
allowance the center never issued; naming the honest dealer's allowance; and, naming none as
an older terminal would, after his allowance expired. He also publishes a batch not signed
with his terminal's key. ``afc sim center report`` (text and ``--json``) must flag exactly the
insider's records, each forged allowance by its id, and not the honest dealer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import protocol as P
from edge_agent.keys import generate_key_file, public_hex
from edge_agent.testing import make_device, wait_until
from firmware.apps.cards import FieldCardSource
from firmware.apps.topup import CreditAllowance, TopupTerminal
from firmware.apps.ui import RecordingUi
from firmware.core import classic_layout as layout
from firmware.core import tariffs
from firmware.core.anticollision import Field
from firmware.core.card_layout import Identity
from firmware.core.keys import MemoryKeyStore
from firmware.core.purse import PRODUCT_TOPUP, Purse
from firmware.stores.journal import KIND_TOPUP
from simulators.cards import VirtualCard
from simulators.center.store import SqliteCenterStore

REPO = Path(__file__).resolve().parent.parent
HONEST, INSIDER = "bayi-017", "bayi-023"
CARD_KEYS = MemoryKeyStore({"classic-sector": bytes(range(16)),
                            "purse-mac": bytes(range(16, 32))})
TABLE = tariffs.load("konya-2025")


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _afc(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


class Counter:
    """A dealer's counter: a terminal and a stack of customers' cards (virtual 1K cards)."""

    def __init__(self, device, center_public, seed: int) -> None:
        self.db = device.open_db()
        self.terminal = TopupTerminal(int(seed) + 9000, self.db, CARD_KEYS, TABLE,
                                      RecordingUi(), allowance=None, center_key=center_public,
                                      daily_limit=80_000)
        self.rng = random.Random(seed)

    def load(self, amount: int, now: int) -> int:
        """A new customer's card on the reader, ``amount`` kuruş loaded; the receipt's seq."""
        card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=self.rng)
        field = Field([card])
        source = FieldCardSource(field, nonce=lambda: self.rng.getrandbits(32))
        number = self.rng.randrange(10_000_000, 99_999_999)
        Purse(source.next_card(), CARD_KEYS, key_type="B").issue(
            Identity(number, 1, 1, now - 86400, now + 3650 * 86400, None, 1, b"HOLDER01"),
            balance=500)
        receipt = self.terminal.load(source.next_card(), amount, now)
        assert receipt.balance_after == 500 + amount
        return receipt.journal_seq

    def close(self) -> None:
        self.db.close()


def _forge(db, now: int, amount: int, *, time_s: int, names: str | None) -> list[int]:
    """What the insider writes into his own journal (valid MACs, no card ever loaded);
    ``names``: the ``action_id`` (``credit:<allowance_id>``), None as an older terminal."""
    seq = db.journal.intent({
        "kind": KIND_TOPUP, "time": time_s * 1000, "card_number": 55_000_000 + amount,
        "uid": b"\x0a\x0b\x0c\x0d", "counter_before": 1, "counter_after": 2,
        "balance_before": 0, "balance_after": amount, "fare": amount,
        "product": PRODUCT_TOPUP, "validator_id": "9023", "action_id": names})
    done = db.journal.done(seq, "ok", counter_after=2, balance_after=amount, balance_before=0,
                           fare=amount, product=PRODUCT_TOPUP)
    return [seq, done]


def test_center_flags_the_insiders_top_ups_and_not_the_honest_dealer(mosquitto, tmp_path):
    now = int(time.time())  # the terminals check the allowance against the wall clock
    center_key = generate_key_file(tmp_path / "center.key")
    db = tmp_path / "center.db"
    devices = {dev: make_device(tmp_path / dev, dev, mosquitto.host, mosquitto.port,
                                center_key=center_key,
                                sections={"device": {"kind": "topup"},
                                          "log": {"level": "info"}})
               for dev in (HONEST, INSIDER)}
    for dev, device in devices.items():
        _afc("sim", "center", "register", "--db", str(db), "--device", dev, "--kind", "topup",
             "--public-key", public_hex(device.key))
    broker = f"{mosquitto.host}:{mosquitto.port}"
    for dev, allowance_id in ((HONEST, "A-017-1"), (INSIDER, "A-023-1")):
        issued = json.loads(_afc(
            "sim", "center", "allowance", "issue", "--db", str(db), "--key",
            str(tmp_path / "center.key"), "--dealer", dev, "--id", allowance_id,
            "--amount-tl", "1000", "--valid-from", str(now - 3600), "--valid-days", "1",
            "--daily-limit-tl", "800", "--broker", broker))
        assert issued["published"] and issued["amount"] == 100_000

    center = _spawn("-m", "tools.cli", "sim", "center", "run", "--broker", broker, "--db",
                    str(db), "--key", str(tmp_path / "center.key"), "--workers", "1",
                    log=tmp_path / "center.log")
    agents = {dev: _spawn("-m", "edge_agent", "--config", str(d.config),
                          log=tmp_path / f"{dev}.agent.log") for dev, d in devices.items()}
    counters: list[Counter] = []
    center_log = tmp_path / "center.log"
    try:
        assert wait_until(lambda: "ingest subscribed" in center_log.read_text(), 30, 0.1), (
            center_log.read_text()[-2000:])
        # the agents apply the retained credit bundles: the terminals load against them
        for dev, device in devices.items():
            with device.open_db() as ddb:
                assert wait_until(lambda ddb=ddb: ddb.config.get("credit") is not None, 30), (
                    (tmp_path / f"{dev}.agent.log").read_text()[-2000:])
                credit = CreditAllowance.from_json(bytes(ddb.config.get("credit").body).decode())
                assert credit.dealer_id == dev
        honest = Counter(devices[HONEST], center_key.public_key(), 17)
        insider = Counter(devices[INSIDER], center_key.public_key(), 23)
        counters += [honest, insider]
        honest_seqs = [honest.load(amount, now + i) for i, amount in
                       enumerate((25_000, 30_000, 20_000))]  # 750 TL of 1000, today
        assert honest.terminal.credit_left(now + 5) == 25_000
        insider_real = insider.load(40_000, now)  # through his terminal: within limits
        # the insider, with the journal MAC key, writes what his terminal would refuse
        own = "credit:A-023-1"  # what his terminal names
        over_day = _forge(insider.db, now, 45_000, time_s=now + 1, names=own)  # 850 TL today
        over_credit = _forge(insider.db, now, 30_000, time_s=now + 2, names=own)  # 1150 TL
        expired = _forge(insider.db, now, 5_000, time_s=now + 3 * 86400,
                         names=None)  # after valid_until, naming none (older software)
        # ... naming an allowance the center never issued, and the honest dealer's: two
        # days later, so neither touches a day's limit
        never_issued = _forge(insider.db, now, 2_000, time_s=now + 3 * 86400 + 1,
                              names="credit:A-023-9")
        honests = _forge(insider.db, now, 3_000, time_s=now + 3 * 86400 + 2,
                         names="credit:A-017-1")
        assert insider.db.journal.verify() == []  # the MACs are right: the device cannot tell
        # ... and a batch signed with a key that is not his terminal's
        forged = [replace(r, seq=r.seq + 500, link=None if r.link is None else r.link + 500,
                          mac=b"") for r in insider.db.journal.records(0, 100)
                  if r.seq in over_credit]
        payload = P.encode_batch(INSIDER, forged, Ed25519PrivateKey.generate(),
                                 ts=time.time_ns() // 1_000_000)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue-1")
        client.connect(mosquitto.host, mosquitto.port)
        client.loop_start()
        try:
            client.publish(P.dev_topic(INSIDER, "txn"), payload, qos=1).wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()

        # every record reaches the center (the agents ship them, the center acks them)
        with SqliteCenterStore(db) as store:
            for dev, counter in ((HONEST, honest), (INSIDER, insider)):
                last = counter.db.journal.last_seq
                assert wait_until(lambda dev=dev, last=last: store.upto(dev) >= last, 60,
                                  0.1), (tmp_path / f"{dev}.agent.log").read_text()[-2000:]
            assert wait_until(lambda: store.bad_batches(INSIDER) != [], 20, 0.1)
            # the terminals' records reached the center naming their allowances
            assert {r.action_id for r in store.records(HONEST)} == {"credit:A-017-1"}
            assert [r.action_id for r in store.records(INSIDER)
                    if r.seq in (insider_real, *never_issued)] == [
                "credit:A-023-1", "credit:A-023-9", "credit:A-023-9"]
    finally:
        for counter in counters:
            counter.close()
        for proc in agents.values():
            _stop(proc)
        _stop(center)

    report = json.loads(_afc("sim", "center", "report", "--db", str(db), "--json"))
    dealers = {d["dealer_id"]: d for d in report["dealers"]}
    assert report["flagged_dealers"] == [INSIDER]
    h = dealers[HONEST]
    assert (h["flagged"], h["topups"], h["total"]) == (False, 3, 75_000)
    # the insider's record naming the honest dealer's allowance is not counted on it
    assert [(a["allowance_id"], a["used"]) for a in h["allowances"]] == [("A-017-1", 75_000)]
    assert honest_seqs == [1, 3, 5]
    flags = {f["kind"]: f for f in dealers[INSIDER]["findings"]}
    assert sorted(flags) == ["other-dealer", "outside-validity", "over-allowance",
                             "over-daily-limit", "refused-batch", "unknown-allowance"]
    assert (flags["unknown-allowance"]["allowance_id"], flags["unknown-allowance"]["named"],
            flags["unknown-allowance"]["amount"]) == ("A-023-9", True, 2_000)
    assert flags["unknown-allowance"]["records"] == [[INSIDER, s] for s in never_issued]
    assert (flags["other-dealer"]["allowance_id"], flags["other-dealer"]["named"],
            flags["other-dealer"]["amount"]) == ("A-017-1", True, 3_000)
    assert flags["other-dealer"]["records"] == [[INSIDER, s] for s in honests]
    assert HONEST in flags["other-dealer"]["message"]
    assert (flags["outside-validity"]["allowance_id"], flags["outside-validity"]["named"]) == (
        None, False)  # the unnamed record: attributed by time, as before
    assert flags["over-daily-limit"]["records"] == [[INSIDER, s] for s in over_day + over_credit]
    assert flags["over-daily-limit"]["amount"] == 115_000 - 80_000
    assert flags["over-allowance"]["records"] == [[INSIDER, s] for s in over_credit]
    assert flags["over-allowance"]["amount"] == 15_000
    assert flags["outside-validity"]["records"] == [[INSIDER, s] for s in expired]
    assert f"{over_credit[0] + 500}..{over_credit[1] + 500}" in flags["refused-batch"]["message"]
    flagged = {tuple(r) for f in flags.values() for r in f["records"]}
    assert (INSIDER, insider_real) not in flagged  # his one real load is not in question
    text = _afc("sim", "center", "report", "--db", str(db))
    assert f"{HONEST}: 3 top-up(s), 750,00 TL, matched by credit" in text
    assert f"{INSIDER}: 6 top-up(s), 1.250,00 TL, 6 finding(s)" in text
    assert "FLAG over-allowance: allowance A-023-1: 1.150,00 TL loaded against 1.000,00 TL" \
        in text
    assert ("FLAG unknown-allowance: 1 top-up(s), 20,00 TL: they name credit allowance "
            "A-023-9, which the center never issued") in text
    assert (f"FLAG other-dealer: 1 top-up(s), 30,00 TL: they name allowance A-017-1, issued "
            f"to dealer {HONEST}, not to {INSIDER}") in text
