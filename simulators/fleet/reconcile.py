"""The end of a fleet run: the invariants of DESIGN.md, checked across the whole system.

Inputs are what is really there at the end: the center's database and its reconciliation
report (``afc sim center report --json``), every device database, every card read back with
key A, the blacklist chain the center published, the camera sites' events at the center.

The checks:

1. **Every record at the center exactly once.** Per device, the center holds sequence
   numbers 1..N without a gap, N being the device journal's last sequence number (nothing
   lost; duplicates cannot exist, the center keys records by ``(device, seq)``).
2. **Every card write at the center exactly once, balances to the kuruş.** A card's
   transaction counter counts its writes (taps, top-ups, online loads). For every card but
   the injected clone and rollback, each counter step from the issued value to the value on
   the card is claimed by exactly one charging record at the center (a completed intent,
   or an intent left open by a power cut that the card itself confirms), the balance read
   before each step is the balance written by the one before, the first is the issued
   balance and the last is the balance on the card. Two charging claims on one step is a
   double charge; a step nobody claims is a ride the center never heard of.
3. **The injected clone and the rolled-back card were caught**: both are suspected clones
   in the center's report, and no other card is (a false alarm would block a rider).
4. **Every blacklist delta reached every validator**: each validator database holds the
   center's current blacklist version and every card the deltas added.
5. **Device clocks never ran backwards**: record times are non-decreasing in sequence order
   on every device, also the one whose wall clock was set back.
6. **Camera alarms delivered in order**: per site, the center holds every event the site
   raised (``seq`` 1 to the last one its firmware logged), received in ``seq`` order, and
   the alarms the run injected appear among them in the order they were injected.
7. **No emulator bug**: the PN532 emulators caught no internal error.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.stores.journal import (
    KIND_REPAIR,
    PHASE_DONE,
    PHASE_INTENT,
    JournalRecord,
)

__all__ = [
    "CardState",
    "Check",
    "DeviceFacts",
    "Reconciliation",
    "check_cards",
    "device_facts",
    "reconcile",
]

_CHARGED = ("ok", "ok-late")


@dataclass(frozen=True)
class CardState:
    """A card's counter and balance, read with key A."""

    card_number: int
    counter: int
    balance: int


@dataclass(frozen=True)
class DeviceFacts:
    """What a device database holds at the end (read without writing to it)."""

    device_id: str
    last_seq: int
    acked_seq: int
    blacklist_version: int
    blacklisted: frozenset[int]
    open_intents: int
    time_regressions: list[tuple[int, int]]  # (seq, previous time - this time, ms)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)


@dataclass
class Reconciliation:
    checks: list[Check]
    ledger: dict[str, int]
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[str]:
        out = []
        for c in self.checks:
            if not c.ok:
                out += [f"{c.name}: {p}" for p in (c.problems or [c.detail])]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "ledger": self.ledger,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail,
                            "problems": c.problems[:50]} for c in self.checks],
                "suspected_clones": self.report.get("suspected_clones", [])}

    def to_text(self) -> str:
        lines = ["Reconciliation:"]
        for c in self.checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
            lines += [f"        {i}" for i in c.info[:10]]
            for p in c.problems[:10]:
                lines.append(f"        - {p}")
            if len(c.problems) > 10:
                lines.append(f"        - ... and {len(c.problems) - 10} more")
        led = self.ledger
        lines.append(
            f"  Ledger (kuruş): issued {led.get('issued', 0):,} + loaded {led.get('loaded', 0):,}"
            f" - fares {led.get('fares', 0):,} = {led.get('expected', 0):,}; on the cards "
            f"{led.get('on_cards', 0):,}"
        )
        return "\n".join(lines)


# -- reading device databases --------------------------------------------------------------------


def device_facts(device_id: str, db_path: Path) -> DeviceFacts:
    """Read a device database read-only (the agent or the validator may still hold it)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        top = conn.execute("SELECT max(seq) FROM journal").fetchone()[0] or 0
        last = max(int(top), int(meta.get("journal_floor", 0) or 0))
        times = conn.execute("SELECT seq, time FROM journal ORDER BY seq").fetchall()
        regressions = []
        for (_, t0), (seq, t1) in itertools.pairwise(times):
            if t1 < t0:
                regressions.append((seq, t0 - t1))
        open_intents = conn.execute("SELECT count(*) FROM open_intent").fetchone()[0]
        listed = frozenset(
            int(r[0]) & 0xFFFFFFFFFFFFFFFF
            for r in conn.execute("SELECT card_number FROM blacklist").fetchall()
        )
    finally:
        conn.close()
    return DeviceFacts(device_id, last, int(meta.get("journal_acked", 0) or 0),
                       int(meta.get("blacklist_version", 0) or 0), listed, int(open_intents),
                       regressions)


# -- the card ledger ------------------------------------------------------------------------------


@dataclass
class _Claim:
    start: int
    end: int
    balance_before: int | None
    balance_after: int | None
    kind: str
    resolved: bool
    ref: str


def _claims(records: Iterable[JournalRecord]) -> list[_Claim]:
    intents: dict[tuple[str, int], JournalRecord] = {}
    dones: dict[tuple[str, int], JournalRecord] = {}
    for r in records:
        if r.phase == PHASE_INTENT:
            intents[(r.device_id, r.seq)] = r
        elif r.phase == PHASE_DONE and r.link is not None:
            dones[(r.device_id, r.link)] = r
    out = []
    for key, i in intents.items():
        d = dones.get(key)
        if d is not None and d.outcome not in _CHARGED:
            continue  # settled: the write never reached the card
        end = d.counter_after if d is not None and d.counter_after is not None \
            else i.counter_after
        if i.counter_before is None or end is None or end == i.counter_before:
            continue  # no counter step (a pass load, a roll-forward of the backup only)
        bb = d.balance_before if d is not None and d.balance_before is not None \
            else i.balance_before
        ba = d.balance_after if d is not None and d.balance_after is not None \
            else i.balance_after
        out.append(_Claim(i.counter_before, end, bb, ba, i.kind, d is not None,
                          f"{key[0]}#{key[1]}"))
    return out


def check_cards(
    records_by_card: Mapping[int, list[JournalRecord]],
    issued: Mapping[int, CardState],
    final: Mapping[int, CardState],
    excluded: Iterable[int] = (),
) -> tuple[list[str], dict[str, int]]:
    """Check 2 of the module docstring; returns (problems, ledger totals in kuruş)."""
    problems: list[str] = []
    ledger = Counter(issued=0, loaded=0, fares=0, on_cards=0, steps=0, settled_by_card=0)
    skip = set(excluded)
    for number, start in sorted(issued.items()):
        if number in skip:
            continue
        end = final[number]
        claims = _claims(records_by_card.get(number, []))
        by_start: dict[int, list[_Claim]] = defaultdict(list)
        for c in claims:
            by_start[c.start].append(c)
        balance = start.balance
        ledger["issued"] += start.balance
        ledger["on_cards"] += end.balance
        for counter in range(start.counter, end.counter):
            here = by_start.pop(counter, [])
            charging = [c for c in here if c.kind != KIND_REPAIR]
            done = [c for c in charging if c.resolved]
            if len(done) > 1:
                problems.append(f"card {number}: counter {counter}->{counter + 1} charged "
                                f"{len(done)} times ({', '.join(c.ref for c in done)})")
                continue
            chosen = done[0] if done else (charging[0] if charging else None)
            if chosen is None:
                problems.append(f"card {number}: counter {counter}->{counter + 1} is on the card "
                                "but no device reported it to the center")
                continue
            if chosen.end != counter + 1:
                problems.append(f"card {number}: {chosen.ref} moves the counter {counter}->"
                                f"{chosen.end}")
            if not chosen.resolved:
                ledger["settled_by_card"] += 1
            if chosen.balance_before != balance:
                problems.append(f"card {number}: at counter {counter} the card held {balance} "
                                f"kuruş, {chosen.ref} read {chosen.balance_before}")
            if chosen.balance_after is None:
                problems.append(f"card {number}: {chosen.ref} has no balance after")
                continue
            delta = chosen.balance_after - (chosen.balance_before or 0)
            ledger["loaded" if delta > 0 else "fares"] += abs(delta)
            ledger["steps"] += 1
            balance = chosen.balance_after
        if balance != end.balance and not any(p.startswith(f"card {number}:") for p in problems):
            problems.append(f"card {number}: the center's ledger ends at {balance} kuruş, the "
                            f"card holds {end.balance}")
        for counter, rest in by_start.items():
            landed = [c for c in rest if c.resolved and c.kind != KIND_REPAIR]
            if landed and counter >= end.counter:
                problems.append(f"card {number}: {landed[0].ref} reports a write at counter "
                                f"{counter} the card never reached ({end.counter})")
    ledger["expected"] = ledger["issued"] + ledger["loaded"] - ledger["fares"]
    return problems, dict(ledger)


# -- the whole ------------------------------------------------------------------------------------


def reconcile(
    *,
    report: dict[str, Any],
    records: Iterable[JournalRecord],
    devices: Sequence[DeviceFacts],
    validators: Iterable[str],
    issued: Mapping[int, CardState],
    final: Mapping[int, CardState],
    injected_clones: Iterable[int],
    blacklist_version: int,
    delta_cards: Iterable[int],
    site_events: Mapping[str, list[dict[str, Any]]] | None = None,
    injected_alarms: Mapping[str, list[str]] | None = None,
    site_last_seq: Mapping[str, int] | None = None,
    emulator_errors: Mapping[str, int] | None = None,
) -> Reconciliation:
    checks: list[Check] = []
    by_device = {d["device_id"]: d for d in report.get("devices", [])}

    # 1. records exactly once
    problems = []
    total = 0
    for dev in devices:
        got = by_device.get(dev.device_id)
        total += dev.last_seq
        if got is None:
            if dev.last_seq:
                problems.append(f"{dev.device_id}: {dev.last_seq} record(s), none at the center")
            continue
        if got["gaps"]:
            problems.append(f"{dev.device_id}: missing seq {got['gaps'][:5]}")
        if got["upto"] != dev.last_seq or (got["last"] or 0) != dev.last_seq:
            problems.append(f"{dev.device_id}: journal ends at seq {dev.last_seq}, the center "
                            f"holds up to {got['upto']} (last {got['last']})")
    checks.append(Check("records", not problems,
                        f"{total} journal records of {len(devices)} devices at the center, "
                        "each once" if not problems else "records missing at the center",
                        problems))

    # 2. cards
    clones = set(injected_clones)
    by_card: dict[int, list[JournalRecord]] = defaultdict(list)
    for r in records:
        if r.card_number is not None:
            by_card[r.card_number].append(r)
    problems, ledger = check_cards(by_card, issued, final, clones)
    if ledger["expected"] != ledger["on_cards"] and not problems:
        problems.append(f"ledger {ledger['expected']} kuruş, cards {ledger['on_cards']}")
    n = len([c for c in issued if c not in clones])
    checks.append(Check(
        "cards", not problems,
        f"{n} cards, {ledger['steps']} card writes each at the center once "
        f"({ledger['settled_by_card']} settled from the card after a cut), balances agree to "
        "the kuruş" if not problems else "card writes and the center's ledger disagree",
        problems))

    # 3. clones
    suspected = set(report.get("suspected_clones", []))
    problems = [f"card {c} was cloned or rolled back and not caught" for c in
                sorted(clones - suspected)]
    problems += [f"card {c} is suspected without cause (a false alarm)" for c in
                 sorted(suspected - clones)]
    how = {}
    for finding in report.get("findings", []):
        if finding["card_number"] in clones and finding["kind"] in ("too-fast",
                                                                    "counter-regression"):
            how.setdefault(finding["card_number"], f"card {finding['card_number']}: "
                           f"{finding['kind']}: {finding['message']}")
    checks.append(Check("clones", not problems,
                        f"suspected clones {sorted(suspected)} = injected {sorted(clones)}",
                        problems, [how[c] for c in sorted(how)]))

    # 4. blacklist
    problems = []
    wanted = set(delta_cards)
    validators = set(validators)
    for dev in devices:
        if dev.device_id not in validators:
            continue
        if dev.blacklist_version != blacklist_version:
            problems.append(f"{dev.device_id}: blacklist version {dev.blacklist_version}, "
                            f"the center published {blacklist_version}")
        missing = wanted - dev.blacklisted
        if missing:
            problems.append(f"{dev.device_id}: cards {sorted(missing)} not on its blacklist")
    checks.append(Check("blacklist", not problems,
                        f"version {blacklist_version} with {len(wanted)} delta card(s) on all "
                        f"{len(validators)} validators", problems))

    # 5. clocks
    problems = [f"{d.device_id}: time goes back {ms} ms at seq {seq}"
                for d in devices for seq, ms in d.time_regressions[:3]]
    checks.append(Check("clocks", not problems,
                        "record times never go backwards on any device", problems))

    # 6. camera alarms
    if site_events is not None:
        problems = []
        alarms = injected_alarms or {}
        count = 0
        for site, events in sorted(site_events.items()):
            if not events:
                problems.append(f"{site}: no event reached the center")
                continue
            by_arrival = sorted(events, key=lambda e: (e["received_ms"], e["seq"]))
            seqs = [e["seq"] for e in by_arrival]
            count += len(seqs)
            if seqs != sorted(seqs):
                problems.append(f"{site}: events arrived out of order: seq {seqs[:12]}")
            last = max([*seqs, (site_last_seq or {}).get(site, 0)])
            holes = sorted(set(range(1, last + 1)) - set(seqs))
            if holes:
                problems.append(f"{site}: event seq {holes[:10]} never reached the center")
            names = [e["event"] for e in sorted(events, key=lambda e: e["seq"])]
            want = list(alarms.get(site, []))
            it = iter(names)
            if not all(any(n == w for n in it) for w in want):
                problems.append(f"{site}: injected alarms {want}, the center got {names}")
        checks.append(Check("camera alarms", not problems,
                            f"{count} events of {len(site_events)} site(s), in order, "
                            "none missing", problems))

    # 7. emulators
    errors = dict(emulator_errors or {})
    checks.append(Check("emulators", not errors, "no PN532 emulator error",
                        [f"{k}: {v} internal error(s)" for k, v in errors.items()]))

    # 8. dealers: the fleet's bayis are honest, so the center flags none of their top-ups
    # (each names the allowance the center issued; a flag here is a false alarm)
    dealers = report.get("dealers", [])
    problems = [f"{d['dealer_id']}: {f['kind']}: {f['message']}"
                for d in dealers for f in d.get("findings", [])]
    loads = sum(d.get("topups", 0) for d in dealers)
    checks.append(Check("dealers", not problems,
                        f"{loads} top-ups of {len(dealers)} dealers, all within the credit the "
                        "center issued" if not problems else "dealer top-ups flagged",
                        problems))
    return Reconciliation(checks, ledger, report)

