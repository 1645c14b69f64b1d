"""Reconciliation: is every device's journal complete, and does every card's history add up?

Per device: the stored sequence numbers must run 1, 2, 3... without holes (a hole is a
batch that never arrived or was refused); ``upto`` is the contiguous part, and intents with
no done record are the taps still in doubt.

Per card, over the records of *all* devices in time order: every card write moves the card's
transaction counter forward, so

- a counter read from the card (``counter_before``) *below* one already written or read
  earlier is a **counter regression**: the card was rolled back (an old dump written back) or
  a clone is in use;
- the same card at two different devices on different vehicles within ``min_travel_s`` is
  **too fast to travel**: two physical cards share one number;
- a counter *above* the last written one is a **counter gap** (taps on a device whose
  records have not arrived yet: informational);
- with no gap, the balance read at a tap must equal the balance written by the previous
  transaction; a difference is a **balance mismatch** (a purse changed outside the system).

Cards with a regression or a too-fast pair are *suspected clones*; the report proposes a
``blacklist-delta`` body adding them (reason :data:`SUSPECTED_CLONE_REASON`), for an operator
to review and publish (``afc bundle sign --kind blacklist-delta``).

Per dealer (:mod:`.dealer`): top-ups that no allowance the center issued to that dealer
covers, allowances loaded beyond their amount, days beyond the per-day limit, and batches
refused at ingest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from firmware.stores.journal import PHASE_DONE, PHASE_INTENT, JournalRecord

from .dealer import DEFAULT_DAILY_LIMIT, DealerReconciliation, reconcile_dealers, tl
from .store import CenterStore

__all__ = [
    "SUSPECTED_CLONE_REASON",
    "CardFinding",
    "DeviceReconciliation",
    "Report",
    "build_report",
    "reconcile_cards",
    "reconcile_device",
]

#: Blacklist reason code the proposed delta uses for a suspected clone.
SUSPECTED_CLONE_REASON = 3
#: Two taps of one card at different vehicles closer than this are physically impossible.
DEFAULT_MIN_TRAVEL_S = 120


@dataclass(frozen=True)
class DeviceReconciliation:
    device_id: str
    records: int
    first: int | None
    last: int | None
    upto: int
    gaps: list[tuple[int, int]]
    open_intents: list[int]

    @property
    def complete(self) -> bool:
        return not self.gaps


@dataclass(frozen=True)
class CardFinding:
    card_number: int
    kind: str  # counter-regression | too-fast | counter-gap | balance-mismatch
    message: str
    records: list[tuple[str, int]]  # (device_id, seq) of the records involved


@dataclass
class Report:
    devices: list[DeviceReconciliation]
    cards_seen: int
    findings: list[CardFinding] = field(default_factory=list)
    min_travel_s: int = DEFAULT_MIN_TRAVEL_S
    dealers: list[DealerReconciliation] = field(default_factory=list)
    default_daily_limit: int = DEFAULT_DAILY_LIMIT

    @property
    def flagged_dealers(self) -> list[str]:
        """Dealers with top-ups their credit does not cover (or refused batches)."""
        return [d.dealer_id for d in self.dealers if d.flagged]

    @property
    def suspected_clones(self) -> list[int]:
        kinds = ("counter-regression", "too-fast")
        return sorted({f.card_number for f in self.findings if f.kind in kinds})

    @property
    def proposed_blacklist_delta(self) -> dict[str, Any]:
        """A ``blacklist-delta`` body (see docs/protocol.md) adding the suspected clones."""
        return {"add": [[card, SUSPECTED_CLONE_REASON, None] for card in self.suspected_clones],
                "remove": []}

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": [
                {**asdict(d), "gaps": [list(g) for g in d.gaps], "complete": d.complete}
                for d in self.devices
            ],
            "cards_seen": self.cards_seen,
            "findings": [
                {**asdict(f), "records": [list(r) for r in f.records]} for f in self.findings
            ],
            "suspected_clones": self.suspected_clones,
            "proposed_blacklist_delta": self.proposed_blacklist_delta,
            "min_travel_s": self.min_travel_s,
            "dealers": [d.to_json() for d in self.dealers],
            "flagged_dealers": self.flagged_dealers,
            "default_daily_limit": self.default_daily_limit,
        }

    def to_text(self) -> str:
        lines = ["Devices:"]
        for d in self.devices:
            state = "complete" if d.complete else f"{len(d.gaps)} gap(s)"
            lines.append(
                f"  {d.device_id}: {d.records} records, seq {d.first}..{d.last}, "
                f"contiguous up to {d.upto}, {state}"
                + (f", {len(d.open_intents)} tap(s) in doubt" if d.open_intents else "")
            )
            for a, b in d.gaps[:20]:
                lines.append(f"    missing seq {a}..{b}" if a != b else f"    missing seq {a}")
            if len(d.gaps) > 20:
                lines.append(f"    ... and {len(d.gaps) - 20} more gaps")
        lines.append(f"Cards: {self.cards_seen} seen, {len(self.findings)} finding(s)")
        for f in self.findings:
            where = ", ".join(f"{dev}#{seq}" for dev, seq in f.records)
            lines.append(f"  card {f.card_number}: {f.kind}: {f.message} [{where}]")
        clones = self.suspected_clones
        lines.append(f"Suspected clones: {len(clones)}"
                     + (f" ({', '.join(map(str, clones[:20]))})" if clones else ""))
        if clones:
            lines.append("Proposed blacklist delta (review, then sign with afc bundle sign "
                         "--kind blacklist-delta):")
            lines.append("  " + json.dumps(self.proposed_blacklist_delta))
        if self.dealers:
            lines.append(f"Dealers: {len(self.dealers)}, "
                         f"{len(self.flagged_dealers)} flagged")
        for d in self.dealers:
            lines.append(f"  {d.dealer_id}: {d.topups} top-up(s), {tl(d.total)}, "
                         + (f"{len(d.findings)} finding(s)" if d.flagged else "matched by credit"))
            for a in d.allowances:
                lines.append(f"    allowance {a.allowance_id}: {tl(a.used)} of {tl(a.amount)} "
                             f"used, {a.topups} top-up(s), valid {a.valid_from}..{a.valid_until}")
            for f in d.findings:
                where = ", ".join(f"{dev}#{seq}" for dev, seq in f.records[:20])
                more = f" +{len(f.records) - 20} more" if len(f.records) > 20 else ""
                lines.append(f"    FLAG {f.kind}: {f.message}"
                             + (f" [{where}{more}]" if where else ""))
        return "\n".join(lines)


def reconcile_device(
    device_id: str, seqs: list[int], records: list[JournalRecord] | None = None
) -> DeviceReconciliation:
    """Gaps in one device's stored sequence numbers (expected 1, 2, 3, ...) and, given its
    records, the intents without a done record (taps in doubt)."""
    gaps: list[tuple[int, int]] = []
    expected = 1
    upto = 0
    for seq in seqs:
        if seq > expected:
            gaps.append((expected, seq - 1))
        elif not gaps:
            upto = seq
        expected = seq + 1
    records = records or []
    intents = {r.seq for r in records if r.phase == PHASE_INTENT}
    closed = {r.link for r in records if r.phase == PHASE_DONE}
    return DeviceReconciliation(
        device_id, len(seqs), seqs[0] if seqs else None, seqs[-1] if seqs else None, upto,
        gaps, sorted(intents - closed),
    )


def reconcile_cards(
    records: Iterable[JournalRecord], *, min_travel_s: int = DEFAULT_MIN_TRAVEL_S
) -> tuple[int, list[CardFinding]]:
    """Findings over records sorted by card number, then time (as the store gives them)."""
    findings: list[CardFinding] = []
    cards = 0
    current: int | None = None
    card_records: list[JournalRecord] = []
    for rec in records:
        if rec.card_number != current:
            if card_records:
                findings += _card_findings(card_records, min_travel_s)
            cards += 1
            current = rec.card_number
            card_records = []
        card_records.append(rec)
    if card_records:
        findings += _card_findings(card_records, min_travel_s)
    return cards, findings


def _card_findings(records: list[JournalRecord], min_travel_s: int) -> list[CardFinding]:
    card = records[0].card_number
    assert card is not None
    out: list[CardFinding] = []
    top: tuple[int, JournalRecord] | None = None  # highest counter seen so far, and where
    written: JournalRecord | None = None  # the last record that wrote the card (done/event)
    last_tap: JournalRecord | None = None
    regressed = False
    for rec in records:
        ref = (rec.device_id, rec.seq)
        cb = rec.counter_before
        if cb is not None and rec.phase != PHASE_DONE:
            if top is not None and cb < top[0] and not regressed:
                regressed = True
                out.append(CardFinding(
                    card, "counter-regression",
                    f"counter {cb} read at {rec.device_id} after {top[0]} was seen at "
                    f"{top[1].device_id}: rolled back or cloned",
                    [(top[1].device_id, top[1].seq), ref],
                ))
            if written is not None and written.counter_after is not None:
                if cb > written.counter_after:
                    out.append(CardFinding(
                        card, "counter-gap",
                        f"counter {cb} after {written.counter_after}: "
                        f"{cb - written.counter_after} transaction(s) not (yet) reported",
                        [(written.device_id, written.seq), ref],
                    ))
                elif (
                    cb == written.counter_after
                    and rec.balance_before is not None
                    and written.balance_after is not None
                    and rec.balance_before != written.balance_after
                ):
                    out.append(CardFinding(
                        card, "balance-mismatch",
                        f"balance {rec.balance_before} read, {written.balance_after} written "
                        "by the previous transaction: the purse changed outside the system",
                        [(written.device_id, written.seq), ref],
                    ))
        if rec.phase != PHASE_DONE:  # a tap (intent) or a rejection: the card was presented
            if (
                last_tap is not None
                and last_tap.device_id != rec.device_id
                and (rec.vehicle is None or last_tap.vehicle != rec.vehicle)
                and rec.time - last_tap.time < min_travel_s * 1000
            ):
                out.append(CardFinding(
                    card, "too-fast",
                    f"presented at {last_tap.device_id} and {rec.device_id} "
                    f"{(rec.time - last_tap.time) / 1000:g} s apart (< {min_travel_s} s)",
                    [(last_tap.device_id, last_tap.seq), ref],
                ))
            last_tap = rec
        seen = [c for c in (cb, rec.counter_after if rec.phase != PHASE_INTENT else None)
                if c is not None]
        if seen and (top is None or max(seen) > top[0]):
            top = (max(seen), rec)
        if rec.phase != PHASE_INTENT and rec.counter_after is not None:
            written = rec
    return out


def build_report(
    store: CenterStore,
    *,
    min_travel_s: int = DEFAULT_MIN_TRAVEL_S,
    default_daily_limit: int = DEFAULT_DAILY_LIMIT,
) -> Report:
    """Reconcile everything in ``store``. ``default_daily_limit`` (kuruş) is the dealers'
    per-day limit where no allowance records one."""
    device_ids = sorted({d.device_id for d in store.devices()}
                        | set(getattr(store, "record_device_ids", list)()))
    devices = []
    for dev in device_ids:
        records = list(store.records(dev))
        devices.append(reconcile_device(dev, [r.seq for r in records], records))
    cards, findings = reconcile_cards(store.records_by_card(), min_travel_s=min_travel_s)
    dealers = reconcile_dealers(store, default_daily_limit=default_daily_limit)
    return Report(devices, cards, findings, min_travel_s, dealers, default_daily_limit)
