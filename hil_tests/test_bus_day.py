"""HIL: a service day of two bus lines through the PN532 emulator, reconciled to the kuruş.

Hundreds of riders with every kind of card (full, student, expired student discount, free
65+ and disabled, expired free discount, pass holders, an expired pass, low balances, a
blacklisted card, an expired card, an online top-up and an online pass waiting in a
validator's action list) ride line 41 (bus 1: front and middle door) and line 42 (bus 2)
through the rush hours; they transfer, tap twice, tap at the other door, and top up at a
bayi terminal around midday. The cards live in one ``afc sim reader`` process (all off the
reader until tapped); the validators and the bayi terminal run in this process on its pty,
in both reader modes (the validators restart at 13:00 and swap modes), on a simulated clock.

The test keeps its own ledger of every card from the *published* Konya 2025 figures
(docs/fares.md), never from the fare engine, checks each tap's outcome against it, and at
the end — emulator stopped, card files saved — reads every card back with key A and
reconciles cards, ledger and the device journals exactly.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.apps.topup import CreditAllowance
from firmware.apps.validator import load_tariff
from firmware.core.fares import CardType
from firmware.core.keys import FileKeyStore
from firmware.stores.database import DeviceDatabase
from simulators.bus_day import (
    BAYI_DEVICE,
    BusDay,
    CardPlan,
    issue_cards,
    local_time,
    pick,
    plan_day,
    read_card,
    standard_cards,
    standard_fleet,
)

DAY = date(2026, 3, 10)  # a Tuesday

# The Konya 2025 tariff as published (docs/fares.md, firmware/core/tariffs/konya-2025.toml):
LEG_FARE = {"full": 2250, "student": 900}  # tam 22,50 TL, öğrenci 9,00 TL
TRANSFER_FARE = {"full": 1350, "student": 540}  # aktarma: 40 % off the second ride
TRANSFER_WINDOW = 3600  # seconds from the journey's first boarding (end inclusive)
TRANSFERS_PER_JOURNEY = 1  # only the second ride is discounted
LOCKOUT = {"purse": 60, "pass": 1800, "free": 1800}  # anti-passback, per product used
PASS_DAYS = 30
PASS_CODE = 1

ONLINE_TOPUP = 10_000  # 100,00 TL bought on the web, waiting at bus 1's front door
ONLINE_DEVICE = "bus-1-front"
ONLINE_PASS_DEVICE = "bus-2-front"
ALLOWANCE = 2_000_000  # the dealer's signed credit: 20.000 TL


# -- the expected ledger ----------------------------------------------------------------------


@dataclass
class Entry:
    """One entry of a card's trip log (the card keeps the newest two)."""

    product: str  # purse | pass | free | topup
    time: int
    line: int
    validator: int
    step: int
    fare: int


@dataclass
class Ledger:
    """What a card must hold, kept from the tariff rules as published."""

    plan: CardPlan
    balance: int
    counter: int = 0
    blocked: bool = False
    pass_until: tuple[int, int] | None = None
    log: list[Entry] = field(default_factory=list)  # newest first
    charged: int = 0
    loaded: int = 0
    bayi_loaded: int = 0
    refusals: Counter = field(default_factory=Counter)
    journaled_refusals: Counter = field(default_factory=Counter)
    validator_taps: Counter = field(default_factory=Counter)

    def push(self, entry: Entry) -> None:
        self.counter += 1
        self.log = [entry, *self.log][:2]

    def category(self, t: int) -> str:
        plan = self.plan
        discount = plan.discount_until is not None and t < plan.discount_until
        if plan.card_type is CardType.STUDENT:
            return "student" if discount else "full"
        if plan.card_type in (CardType.SENIOR_65, CardType.DISABLED):
            return "free" if discount else "full"
        return "full"


def expect_tap(card: Ledger, spec, t: int, blacklist: set[int],
               actions: dict[tuple[str, int], list[tuple[str, int]]]) -> tuple[str, int]:
    """(reason, fare) of a tap, and the card's new state, by the published rules."""
    plan = card.plan
    if plan.card_number in blacklist:
        card.blocked = True  # the validator writes the blocked flag
        return "BLACKLISTED", 0
    if card.blocked:
        return "CARD_BLOCKED", 0
    # online loads waiting at this validator: applied first, once
    for kind, value in actions.pop((spec.device_id, plan.card_number), []):
        if kind == "topup":
            card.balance += value
            card.loaded += value
            card.push(Entry("topup", t, 0, spec.validator_id, 0, 0))
        else:
            card.pass_until = (t, t + PASS_DAYS * 86_400)
    if t >= plan.expires:
        return "CARD_EXPIRED", 0
    rides = [e for e in card.log if e.product != "topup"]
    prev = rides[0] if rides else None
    same_vehicle = {spec.validator_id, *spec.other_validators}
    if prev is not None and prev.validator in same_vehicle \
            and t - prev.time < LOCKOUT[prev.product]:
        return "ALREADY_VALIDATED", 0
    step = 0
    if prev is not None and prev.line != spec.line_id and prev.step < TRANSFERS_PER_JOURNEY \
            and t - prev.time <= TRANSFER_WINDOW:
        step = prev.step + 1  # prev.step == 0: prev was the journey's first boarding
    category = card.category(t)
    pass_valid = card.pass_until is not None and card.pass_until[0] <= t < card.pass_until[1]
    pass_expired = card.pass_until is not None and t >= card.pass_until[1]
    if pass_valid:
        product, reason, fare = "pass", "OK_PASS", 0
    elif category == "free":
        product, reason, fare = "free", "OK_FREE", 0
    else:
        product = "purse"
        reason, fare = ("OK_TRANSFER", TRANSFER_FARE[category]) if step else \
            ("OK", LEG_FARE[category])
        if fare > card.balance:
            return ("PASS_EXPIRED" if pass_expired else "INSUFFICIENT_BALANCE"), 0
    card.balance -= fare
    card.charged += fare
    card.push(Entry(product, t, spec.line_id, spec.validator_id, step, fare))
    return reason, fare


# -- the journal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One completed card update from a device journal (done record + its intent)."""

    device: str
    seq: int
    time: int
    card_number: int
    kind: str
    balance_before: int
    balance_after: int
    counter_before: int
    counter_after: int
    fare: int | None
    action_id: str | None


def journal_of(path: Path, device_id: str, keys) -> tuple[list[Move], list, list, list]:
    """(moves, events, open intents, MAC failures) of one device database."""
    with DeviceDatabase.open(path, device_id=device_id, journal_key=keys) as db:
        records = db.journal.records(0, 1_000_000)
        by_seq = {r.seq: r for r in records}
        moves = []
        for r in records:
            if r.phase != "done":
                continue
            intent = by_seq[r.link]
            assert r.outcome == "ok", (device_id, r)
            assert r.card_number == intent.card_number
            if intent.balance_after is not None:
                assert r.balance_after == intent.balance_after, (device_id, intent, r)
            assert r.counter_after == intent.counter_after, (device_id, intent, r)
            moves.append(Move(device_id, r.seq, r.time // 1000, r.card_number, r.kind,
                              intent.balance_before, r.balance_after, intent.counter_before,
                              r.counter_after, intent.fare, r.action_id))
        events = [r for r in records if r.phase == "event"]
        return moves, events, db.journal.open_intents(), db.journal.verify()


# -- the day ----------------------------------------------------------------------------------


def run_bus_day(tmp_path: Path, n_cards: int, seed: int) -> dict:
    started = time.perf_counter()
    rng = random.Random(seed)
    keys = FileKeyStore.generate(tmp_path / "keys.toml",
                                 names=("classic-sector", "purse-mac", "journal-mac"))
    table = load_tariff("konya-2025")
    midnight = local_time(DAY, 0)
    cards_dir = tmp_path / "cards"
    cards_dir.mkdir()
    cards = issue_cards(standard_cards(n_cards, DAY, rng), keys, cards_dir,
                        issued_at=midnight - 30 * 86_400, seed=seed)
    fleet = standard_fleet()
    specs = {s.device_id: s for s in fleet}

    center = Ed25519PrivateKey.generate()
    unsigned = CreditAllowance("bayi-017", f"alw-{DAY:%Y%m%d}", ALLOWANCE, midnight,
                               midnight + 86_400, b"")
    allowance = replace(unsigned, signature=center.sign(unsigned.signed_bytes()))

    blacklisted, expired = pick(cards, "blacklisted"), pick(cards, "expired")
    online, online_pass = pick(cards, "online-topup"), pick(cards, "online-pass")
    action_lists = {
        ONLINE_DEVICE: [{"action_id": "web-topup-1", "card_number": online.card_number,
                         "kind": "topup", "amount": ONLINE_TOPUP,
                         "valid_until": (midnight + 7 * 86_400) * 1000}],
        ONLINE_PASS_DEVICE: [{"action_id": "web-pass-1", "card_number": online_pass.card_number,
                              "kind": "pass", "product_id": PASS_CODE,
                              "valid_until": (midnight + 7 * 86_400) * 1000}],
    }
    events = plan_day(cards, DAY, rng, fleet, online_devices={
        "online-topup": ONLINE_DEVICE, "online-pass": ONLINE_PASS_DEVICE})
    issued_s = time.perf_counter() - started

    # the expected ledger, event by event
    ledgers = {c.number: Ledger(c, c.balance, pass_until=None if c.pass_block is None else
                                (c.pass_block.valid_from, c.pass_block.valid_until))
               for c in cards}
    pending = {(ONLINE_DEVICE, online.card_number): [("topup", ONLINE_TOPUP)],
               (ONLINE_PASS_DEVICE, online_pass.card_number): [("pass", PASS_CODE)]}
    blacklist = {blacklisted.card_number}
    expected: list[tuple[str, int] | str] = []
    for e in events:
        card = ledgers[e.card]
        if e.device == BAYI_DEVICE:
            if card.blocked:
                expected.append("refused")
            else:
                card.balance += e.amount
                card.loaded += e.amount
                card.bayi_loaded += e.amount
                card.push(Entry("topup", e.time, 0, 9017, 0, 0))
                expected.append("loaded")
            continue
        reason, fare = expect_tap(card, specs[e.device], e.time, blacklist, pending)
        card.validator_taps[e.device] += 1
        if reason not in ("OK", "OK_TRANSFER", "OK_PASS", "OK_FREE"):
            card.refusals[reason] += 1
            if reason != "ALREADY_VALIDATED":
                card.journaled_refusals[reason] += 1
        expected.append((reason, fare))
    assert not pending, f"online loads never picked up: {pending}"

    # the day through the emulator
    ran = time.perf_counter()
    rig = BusDay(tmp_path, keys, cards, fleet, table, allowance=allowance,
                 center_key=center.public_key(), blacklist=blacklist, actions=action_lists,
                 restart_at=local_time(DAY, 13))
    with rig:
        results = rig.run(events)
        credit_left = rig.bayi.credit_left(local_time(DAY, 23))
        emulator_log = rig.emulator.stderr_text()
    day_s = time.perf_counter() - ran
    assert rig.emulator_exit == 0, emulator_log

    # 1. every move did what the published tariff says
    mismatches = []
    for result, want in zip(results, expected, strict=True):
        e = result.event
        if result.error:
            mismatches.append((e, result.error))
        elif e.device == BAYI_DEVICE:
            got = "loaded" if result.receipt is not None else "refused"
            if got != want:
                mismatches.append((e, want, got, result.refused))
        else:
            out = result.outcome
            got = None if out is None else (out.reason.name if out.reason else out.note,
                                            out.fare)
            if got != want or (out.accepted != want[0].startswith("OK")):
                mismatches.append((e, result.mode, want, got, out and out.note))
    assert not mismatches, f"{len(mismatches)} moves differ from the tariff:\n" + "\n".join(
        map(repr, mismatches[:20]))

    # 2. every card, read back with key A, holds exactly its ledger
    snaps = {c.number: read_card(c.path, keys) for c in cards}
    for number, card in ledgers.items():
        snap, plan = snaps[number], card.plan
        assert snap.identity.card_number == plan.card_number
        assert snap.balance == plan.balance + card.loaded - card.charged == card.balance, \
            (plan, snap.balance, card)
        assert snap.counter == card.counter, (plan, snap.counter, card)
        assert snap.purse == snap.backup == snap.balance
        assert snap.blocked == card.blocked, plan
        if card.log:
            newest = snap.newest_trip
            want = card.log[0]
            assert (newest.time, newest.validator_id, newest.transfer_step) == \
                (want.time, want.validator, want.step), (plan, newest, want)
            if want.product != "topup":
                assert (newest.line_id, newest.fare) == (want.line, want.fare), (plan, newest)

    # 3. the journals: every update once, chained per card, summing to the card
    moves: list[Move] = []
    events_by_card: dict[int, Counter] = defaultdict(Counter)
    devices = [*((s.device_id, rig.devices[s.device_id].db_path) for s in fleet),
               (BAYI_DEVICE, rig.bayi_db_path)]
    for device_id, path in devices:
        dev_moves, dev_events, open_intents, bad_macs = journal_of(path, device_id, keys)
        assert open_intents == [], (device_id, open_intents)
        assert bad_macs == [], (device_id, bad_macs)
        moves += dev_moves
        for ev in dev_events:
            events_by_card[ev.card_number][ev.reason] += 1
    per_card: dict[int, list[Move]] = defaultdict(list)
    for m in moves:
        per_card[m.card_number].append(m)
    by_number = {c.card_number: ledgers[c.number] for c in cards}
    assert set(per_card) <= set(by_number)
    reason_code = {"BLACKLISTED": 14, "CARD_BLOCKED": 13, "CARD_EXPIRED": 12,
                   "INSUFFICIENT_BALANCE": 11, "PASS_EXPIRED": 15}
    for number, card in by_number.items():
        chain = sorted(per_card.get(number, []), key=lambda m: (m.time, m.seq))
        balance, counter = card.plan.balance, 0
        charged = loaded = 0
        for m in chain:
            assert (m.balance_before, m.counter_before) == (balance, counter), (card.plan, m)
            is_pass_load = m.kind == "action-applied" and m.counter_after == m.counter_before
            assert m.counter_after == counter + (0 if is_pass_load else 1), (card.plan, m)
            if m.kind == "tap":
                assert m.fare == m.balance_before - m.balance_after >= 0, m
                charged += m.fare
            else:
                assert m.balance_after >= m.balance_before, m
                loaded += m.balance_after - m.balance_before
            balance, counter = m.balance_after, m.counter_after
        snap = snaps[card.plan.number]
        assert (balance, counter) == (snap.balance, snap.counter), (card.plan, chain)
        assert (charged, loaded) == (card.charged, card.loaded), (card.plan, chain)
        assert dict(events_by_card.get(number, {})) == {
            reason_code[r]: n for r, n in card.journaled_refusals.items()}, (card.plan, chain)

    # 4. the special cards
    bl = ledgers[blacklisted.number]
    assert snaps[blacklisted.number].blocked and bl.refusals["BLACKLISTED"] >= 2
    assert not per_card.get(blacklisted.card_number), "the blacklisted card was charged"
    assert snaps[blacklisted.number].balance == blacklisted.balance
    ex = ledgers[expired.number]
    assert ex.refusals["CARD_EXPIRED"] >= 2 and not per_card.get(expired.card_number)
    assert snaps[expired.number].balance == expired.balance
    on = ledgers[online.number]
    assert on.validator_taps[ONLINE_DEVICE] >= 2, "the online-load rider must come back"
    with DeviceDatabase.open(rig.devices[ONLINE_DEVICE].db_path, device_id=ONLINE_DEVICE,
                             journal_key=keys) as db:
        applied = db.actions.applied_unreported()
        assert [(a.action_id, a.amount) for a in applied] == [("web-topup-1", ONLINE_TOPUP)]
        assert db.actions.pending_for(online.card_number) == []
    loads = [m for m in per_card[online.card_number] if m.kind == "action-applied"]
    assert [(m.device, m.action_id, m.balance_after - m.balance_before) for m in loads] == [
        (ONLINE_DEVICE, "web-topup-1", ONLINE_TOPUP)]
    assert on.loaded == ONLINE_TOPUP
    with DeviceDatabase.open(rig.devices[ONLINE_PASS_DEVICE].db_path,
                             device_id=ONLINE_PASS_DEVICE, journal_key=keys) as db:
        assert [a.action_id for a in db.actions.applied_unreported()] == ["web-pass-1"]
    op = snaps[online_pass.number]
    assert op.pass_block is not None and op.pass_block.product_id == PASS_CODE

    # 5. the dealer: what it loaded is what its credit went down by
    bayi_loaded = sum(c.bayi_loaded for c in ledgers.values())
    assert credit_left == ALLOWANCE - bayi_loaded

    # the summary
    taps = [r for r in results if r.event.device != BAYI_DEVICE]
    reasons = Counter(r.outcome.reason.name for r in taps)
    latencies = sorted(r.seconds * 1000 for r in taps)
    modes = Counter(r.mode for r in taps)
    by_mode = {m: statistics.median(r.seconds * 1000 for r in taps if r.mode == m)
               for m in modes}
    summary = {
        "cards": len(cards),
        "kinds": dict(Counter(c.kind for c in cards)),
        "riders": len({r.event.card for r in taps}),
        "taps": len(taps),
        "charges": sum(1 for r in taps if r.outcome.fare > 0),
        "charged_kurus": sum(c.charged for c in ledgers.values()),
        "free_or_pass_rides": reasons["OK_FREE"] + reasons["OK_PASS"],
        "transfers": reasons["OK_TRANSFER"],
        "reasons": dict(reasons),
        "modes": dict(modes),
        "bayi_topups": sum(1 for r in results if r.receipt is not None),
        "bayi_refused": sum(1 for r in results if r.refused is not None),
        "loaded_kurus": sum(c.loaded for c in ledgers.values()),
        "journal_moves": len(moves),
        "tap_ms_p50": round(statistics.median(latencies), 1),
        "tap_ms_p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
        "tap_ms_p50_by_mode": {m: round(v, 1) for m, v in by_mode.items()},
        "issue_s": round(issued_s, 1),
        "day_s": round(day_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    print("bus day:", summary)
    return summary


def test_a_bus_day_reconciles_to_the_kurus(tmp_path):
    summary = run_bus_day(tmp_path, n_cards=150, seed=20260310)
    # the scenario covers what it claims to
    reasons = summary["reasons"]
    for reason in ("OK", "OK_TRANSFER", "OK_PASS", "OK_FREE", "ALREADY_VALIDATED",
                   "INSUFFICIENT_BALANCE", "BLACKLISTED", "CARD_EXPIRED", "PASS_EXPIRED"):
        assert reasons.get(reason, 0) > 0, (reason, reasons)
    assert summary["modes"].get("chip", 0) > 50 and summary["modes"].get("transparent", 0) > 50
    assert summary["bayi_topups"] > 0 and summary["bayi_refused"] > 0
    assert summary["taps"] >= 300


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AFC_SLOW") != "1",
                    reason="slow soak run: set AFC_SLOW=1 (about 100 s)")
def test_a_busy_bus_day_reconciles_to_the_kurus(tmp_path):
    summary = run_bus_day(tmp_path, n_cards=600, seed=7)
    assert summary["taps"] >= 1200
