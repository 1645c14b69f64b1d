"""Dealer (bayi) credit at the center: the allowances it issued, and top-ups they do not cover.

A top-up terminal loads only against a center-signed credit allowance and its own per-day
limit (``firmware/apps/topup.py``); it keeps what it has used as journal tallies. Those
tallies never leave the device, so the center recomputes them from the records it stored and
compares them with what it issued. That is the control for a dealer who gets around his own
terminal (an insider writing records into its database with the journal MAC key, a patched
terminal, a terminal with a forged allowance): the records still arrive, signed, and here
they do not add up.

**What the center knows it issued.** :func:`record_credit_bundle` is called for every
``credit`` bundle the :class:`~.publisher.Publisher` signs or publishes, and by
``afc sim center allowance register`` for a signed bundle file (or an allowance file, for a
terminal without an agent). The allowance inside must verify against the center's own key:
an allowance the center did not sign is not one it issued (and a terminal refuses it too).

**Which top-ups count.** The terminal's rule: a top-up or pass sale counts with its intent
(the amount is ``fare``), and only a done record ``not-charged`` (the write never reached the
card) gives it back; an intent still open counts. A stand-alone ``topup`` record, or a done
whose intent the center never received, counts as well (only an insider writes those).

**Which allowance a top-up used.** The terminal names it: a top-up record's ``action_id`` is
``credit:<allowance_id>`` (``firmware.apps.topup.allowance_ref``; on its intent, copied to its
done), and the center checks the top-up against *that* allowance (the counting record's name:
the intent's, else the stand-alone record's). Findings name the allowance
(``allowance_id``, ``named`` true): ``unknown-allowance`` (the center never issued an allowance
with that id to anyone, or the ``action_id`` is not a ``credit:`` reference at all),
``other-dealer`` (the center issued it to another dealer) or ``outside-validity`` (the record's
time is before its ``valid_from`` or not before its ``valid_until``). A flagged top-up counts
towards no allowance's sum; one within its own allowance counts towards that one, even when a
newer allowance of the dealer covers the same time.

A record naming no allowance (a terminal of older software) is attributed by time, as before
the terminals named it: to the allowance issued *to that dealer* whose validity covers the
top-up's time, the most recently issued one when several do (what a terminal that synced it
uses). When none does, the finding (``named`` false) says why: ``no-allowance`` (the center
never issued this dealer an allowance), ``other-dealer`` (only allowances issued to other
dealers cover that time) or ``outside-validity`` (this dealer's allowances all start later or
ended earlier).

**Limits.** ``over-allowance``: the top-ups attributed to one allowance add up to more than its
amount (every top-up from the one that crossed the line is listed). ``over-daily-limit``: a
local day's top-ups (Türkiye, UTC+3 all year, the terminal's own day) add up to more than the
dealer's per-day limit: the ``daily_limit`` recorded with the newest allowance of the dealer
that covers the day and has one, else the report's default (the terminal's default,
50,000 TL).

**Signatures.** A batch whose signature does not verify is refused at ingest (never stored,
never acked, its range reported to the device in ``bad`` of the next ack); the report lists
those ranges per dealer as ``refused-batch``, and they show as sequence gaps until the
terminal resends them in a batch that verifies. The journal record MACs stay on the device
(docs/protocol.md): the center cannot check them, it relies on the batch signature.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import ProtocolError
from edge_agent.protocol import Bundle, decode_bundle
from firmware.apps.topup import (
    ALLOWANCE_REF_PREFIX,
    CreditAllowance,
    TopupRefused,
    allowance_id_of,
)
from firmware.stores.journal import KIND_TOPUP, PHASE_DONE, PHASE_EVENT, PHASE_INTENT, JournalRecord

from .errors import CenterError
from .store import AllowanceInfo, CenterStore, now_ms

__all__ = [
    "DEFAULT_DAILY_LIMIT",
    "NOT_CHARGED",
    "DealerFinding",
    "DealerReconciliation",
    "TopUp",
    "allowance_info",
    "reconcile_dealer",
    "reconcile_dealers",
    "record_credit_bundle",
    "register_allowance_file",
    "topups",
]

log = logging.getLogger("afc.center.dealer")

#: The terminal's default per-day limit (kuruş): ``TopupTerminal(daily_limit=...)``.
DEFAULT_DAILY_LIMIT = 5_000_000
#: The done outcome that gives a top-up's credit back (``firmware.apps.topup.NOT_CHARGED``).
NOT_CHARGED = "not-charged"
_TR_OFFSET_S = 3 * 3600  # Türkiye is UTC+3 all year: the terminal's day key


def local_day(time_ms: int) -> int:
    """The terminal's day number of a record time (days since 1970-01-01, Türkiye time)."""
    return (time_ms // 1000 + _TR_OFFSET_S) // 86400


def day_text(day: int) -> str:
    import datetime as dt

    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def tl(kurus: int) -> str:
    """Kuruş as the terminals print it: ``1.234,50 TL``."""
    sign = "-" if kurus < 0 else ""
    whole, frac = divmod(abs(kurus), 100)
    return f"{sign}{whole:,}".replace(",", ".") + f",{frac:02d} TL"


# -- what the center issued ---------------------------------------------------------------------


def allowance_info(
    allowance: Mapping[str, Any],
    center_public: Ed25519PublicKey,
    *,
    daily_limit: int | None = None,
    bundle: Bundle | None = None,
    source: str = "publisher",
) -> AllowanceInfo:
    """An allowance (the ``credit`` bundle's ``allowance`` map, or an allowance file's
    content) as the center records it, after checking the center signed it."""
    try:
        credit = CreditAllowance.from_json(json.dumps(dict(allowance)))
        credit.check_usable(center_public)
    except TopupRefused as exc:
        raise CenterError(f"{exc}: the center records only allowances it signed itself and a "
                          "terminal can load against") from None
    if daily_limit is not None and daily_limit < 0:
        raise CenterError("the per-day limit must be >= 0 kuruş")
    return AllowanceInfo(
        credit.allowance_id, credit.dealer_id, credit.amount, credit.valid_from,
        credit.valid_until, credit.signature.hex(), daily_limit,
        None if bundle is None else bundle.version, None if bundle is None else bundle.target,
        source, bundle.ts if bundle is not None else now_ms(),
    )


def record_credit_bundle(
    store: CenterStore,
    bundle: Bundle,
    center_public: Ed25519PublicKey,
    *,
    daily_limit: int | None = None,
    source: str = "publisher",
) -> AllowanceInfo:
    """Record the allowance a (verified) ``credit`` bundle carries as issued."""
    if bundle.kind != "credit":
        raise CenterError(f"a {bundle.kind} bundle carries no credit allowance")
    info = allowance_info(bundle.body["allowance"], center_public, daily_limit=daily_limit,
                          bundle=bundle, source=source)
    if bundle.target is not None and bundle.target != info.dealer_id:
        log.warning("credit bundle %d for device %s carries allowance %s of dealer %s: that "
                    "terminal will refuse it", bundle.version, bundle.target, info.allowance_id,
                    info.dealer_id)
    new = store.add_allowance(info)
    log.info("allowance %s: dealer=%s amount=%d valid=%d..%d bundle=%s (%s)",
             info.allowance_id, info.dealer_id, info.amount, info.valid_from, info.valid_until,
             bundle.version, "recorded" if new else "already recorded")
    return info


def register_allowance_file(
    store: CenterStore,
    path: str | Path,
    center_public: Ed25519PublicKey,
    *,
    daily_limit: int | None = None,
) -> AllowanceInfo:
    """Record the allowance in a signed ``credit`` bundle file (``afc bundle sign --kind
    credit``), or in an allowance JSON file as a terminal without an agent reads it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CenterError(f"cannot read {path}: {exc.strerror}") from None
    if data.lstrip()[:1] == b"{":
        try:
            allowance = json.loads(data)
        except ValueError as exc:
            raise CenterError(f"{path} is neither a signed bundle nor allowance JSON: "
                              f"{exc}") from None
        if not isinstance(allowance, dict):
            raise CenterError(f"{path} must hold an allowance object")
        info = allowance_info(allowance.get("allowance", allowance), center_public,
                              daily_limit=daily_limit, source="file")
        store.add_allowance(info)
        return info
    try:
        bundle = decode_bundle(data, center_public, now_ms=0)  # expired or not: it was issued
    except ProtocolError as exc:
        raise CenterError(f"{path}: not a bundle signed by this center: {exc}") from None
    return record_credit_bundle(store, bundle, center_public, daily_limit=daily_limit,
                                source="file")


# -- what the dealers did -----------------------------------------------------------------------


@dataclass(frozen=True)
class TopUp:
    """One load or pass sale as it counts against the dealer's credit."""

    device_id: str
    seq: int  # the record that counts (the intent, or the stand-alone record)
    time: int  # Unix ms
    amount: int  # kuruş
    records: tuple[int, ...]  # every stored record of it (intent and done)
    #: the counting record's ``action_id``: ``credit:<allowance_id>`` from a terminal that
    #: names its allowance, None from older software (then attributed by time)
    action_id: str | None = None

    @property
    def allowance_id(self) -> str | None:
        """The allowance the record names (None: names none, or not a ``credit:`` one)."""
        return allowance_id_of(self.action_id)


def topups(records: Iterable[JournalRecord]) -> list[TopUp]:
    """One device's top-ups as its terminal counts them (see the module docstring)."""
    intents: dict[int, JournalRecord] = {}
    dones: dict[int, JournalRecord] = {}
    loose: list[JournalRecord] = []
    for rec in records:
        if rec.kind != KIND_TOPUP:
            continue
        if rec.phase == PHASE_INTENT:
            intents[rec.seq] = rec
        elif rec.phase == PHASE_DONE and rec.link is not None:
            dones[rec.link] = rec
        elif rec.phase in (PHASE_EVENT, PHASE_DONE):
            loose.append(rec)
    out = []
    for seq, intent in intents.items():
        done = dones.pop(seq, None)
        if done is not None and done.outcome == NOT_CHARGED:
            continue
        refs = (seq,) if done is None else (seq, done.seq)
        out.append(TopUp(intent.device_id, seq, intent.time, max(0, intent.fare or 0), refs,
                         intent.action_id))
    for rec in [*dones.values(), *loose]:  # a done without its intent, a stand-alone record
        if rec.outcome != NOT_CHARGED:
            out.append(TopUp(rec.device_id, rec.seq, rec.time, max(0, rec.fare or 0),
                             (rec.seq,), rec.action_id))
    return sorted((t for t in out if t.amount > 0), key=lambda t: (t.time, t.seq))


@dataclass(frozen=True)
class DealerFinding:
    dealer_id: str
    # unknown-allowance | no-allowance | other-dealer | outside-validity | over-allowance |
    # over-daily-limit | refused-batch
    kind: str
    message: str
    records: list[tuple[str, int]]  # (device_id, seq) of the records involved
    allowance_id: str | None = None
    amount: int = 0  # kuruş: the top-ups concerned, or the excess over a limit
    #: True: the records name ``allowance_id`` themselves (``unknown-allowance``,
    #: ``other-dealer``, ``outside-validity`` of a named allowance); False: attributed by time
    named: bool = False


@dataclass
class AllowanceUse:
    allowance_id: str
    amount: int
    used: int
    valid_from: int
    valid_until: int
    topups: int


@dataclass
class DealerReconciliation:
    dealer_id: str
    topups: int
    total: int  # kuruş
    allowances: list[AllowanceUse] = field(default_factory=list)
    findings: list[DealerFinding] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "dealer_id": self.dealer_id, "topups": self.topups, "total": self.total,
            "allowances": [asdict(a) for a in self.allowances], "flagged": self.flagged,
            "findings": [{**asdict(f), "records": [list(r) for r in f.records]}
                         for f in self.findings],
        }


def _refs(items: Iterable[TopUp]) -> list[tuple[str, int]]:
    return [(t.device_id, seq) for t in items for seq in t.records]


def _covers(a: AllowanceInfo, time_ms: int) -> bool:
    return a.valid_from <= time_ms // 1000 < a.valid_until


def reconcile_dealer(
    dealer_id: str,
    records: Iterable[JournalRecord],
    issued: list[AllowanceInfo],
    *,
    bad_batches: Iterable[Mapping[str, Any]] = (),
    default_daily_limit: int = DEFAULT_DAILY_LIMIT,
) -> DealerReconciliation:
    """Check one dealer's top-ups against every allowance the center issued (``issued``:
    all dealers', in issue order)."""
    records = list(records)
    stored = {r.seq for r in records}
    loads = topups(records)
    mine = [a for a in issued if a.dealer_id == dealer_id]
    result = DealerReconciliation(dealer_id, len(loads), sum(t.amount for t in loads))
    newest_first = list(reversed(mine))
    by_id = {a.allowance_id: a for a in issued}
    by_allowance: dict[str, list[TopUp]] = defaultdict(list)
    unmatched: dict[tuple[str, str | None], list[TopUp]] = defaultdict(list)
    named: dict[tuple[str, str], list[TopUp]] = defaultdict(list)
    for t in loads:
        if t.action_id is not None:  # the record names its allowance: check that one
            allowance_id = t.allowance_id
            named_one = by_id.get(allowance_id) if allowance_id is not None else None
            if named_one is None:
                named[("unknown-allowance", t.action_id)].append(t)
            elif named_one.dealer_id != dealer_id:
                named[("other-dealer", named_one.allowance_id)].append(t)
            elif not _covers(named_one, t.time):
                named[("outside-validity", named_one.allowance_id)].append(t)
            else:
                by_allowance[named_one.allowance_id].append(t)
            continue
        covering = next((a for a in newest_first if _covers(a, t.time)), None)
        if covering is not None:
            by_allowance[covering.allowance_id].append(t)
        elif not mine:
            unmatched[("no-allowance", None)].append(t)
        else:
            other = next((a for a in reversed(issued) if _covers(a, t.time)), None)
            if other is not None:
                unmatched[("other-dealer", other.allowance_id)].append(t)
            else:
                unmatched[("outside-validity", None)].append(t)
    for (kind, allowance_id), items in unmatched.items():
        total = sum(t.amount for t in items)
        if kind == "no-allowance":
            message = (f"{len(items)} top-up(s), {tl(total)}: the center never issued a credit "
                       f"allowance to dealer {dealer_id}")
        elif kind == "other-dealer":
            assert allowance_id is not None
            message = (f"{len(items)} top-up(s), {tl(total)}: no allowance of {dealer_id} "
                       f"covers their time, only {allowance_id} issued to dealer "
                       f"{by_id[allowance_id].dealer_id}")
        else:
            spans = ", ".join(f"{a.allowance_id} {a.valid_from}..{a.valid_until}" for a in mine)
            message = (f"{len(items)} top-up(s), {tl(total)}: outside the validity of every "
                       f"allowance issued to {dealer_id} ({spans})")
        result.findings.append(DealerFinding(dealer_id, kind, message, _refs(items),
                                             allowance_id, total))
    for (kind, named_id), items in named.items():
        total = sum(t.amount for t in items)
        what = f"{len(items)} top-up(s), {tl(total)}"
        if kind == "unknown-allowance":
            allowance_id = allowance_id_of(named_id)
            if allowance_id is None:
                message = (f"{what}: their records name {named_id!r:.80}, not a credit "
                           f"allowance (the terminal writes {ALLOWANCE_REF_PREFIX}<allowance "
                           "id>)")
            else:
                message = (f"{what}: they name credit allowance {allowance_id}, which the "
                           "center never issued (to any dealer)")
            named_id = allowance_id if allowance_id is not None else named_id
        elif kind == "other-dealer":
            message = (f"{what}: they name allowance {named_id}, issued to dealer "
                       f"{by_id[named_id].dealer_id}, not to {dealer_id}")
        else:
            a = by_id[named_id]
            message = (f"{what}: they name allowance {named_id}, valid {a.valid_from}.."
                       f"{a.valid_until}, but their time is outside it")
        result.findings.append(DealerFinding(dealer_id, kind, message, _refs(items),
                                             named_id, total, named=True))
    for a in mine:
        items = by_allowance.get(a.allowance_id, [])
        used = sum(t.amount for t in items)
        result.allowances.append(AllowanceUse(a.allowance_id, a.amount, used, a.valid_from,
                                              a.valid_until, len(items)))
        if used > a.amount:
            running, over = 0, []
            for t in items:
                running += t.amount
                if running > a.amount:
                    over.append(t)
            result.findings.append(DealerFinding(
                dealer_id, "over-allowance",
                f"allowance {a.allowance_id}: {tl(used)} loaded against {tl(a.amount)} issued "
                f"({tl(used - a.amount)} over; {len(over)} top-up(s) past the limit)",
                _refs(over), a.allowance_id, used - a.amount,
            ))
    per_day: dict[int, list[TopUp]] = defaultdict(list)
    for t in loads:
        per_day[local_day(t.time)].append(t)
    for day, items in sorted(per_day.items()):
        limit, source = default_daily_limit, "default"
        start = day * 86400 - _TR_OFFSET_S
        for a in newest_first:
            if a.daily_limit is not None and a.valid_from < start + 86400 and \
                    a.valid_until > start:
                limit, source = a.daily_limit, a.allowance_id
                break
        total = sum(t.amount for t in items)
        if total > limit:
            running, over = 0, []
            for t in items:
                running += t.amount
                if running > limit:
                    over.append(t)
            result.findings.append(DealerFinding(
                dealer_id, "over-daily-limit",
                f"{day_text(day)} (Türkiye): {tl(total)} loaded, the per-day limit is "
                f"{tl(limit)} ({source}); {len(over)} top-up(s) past it",
                _refs(over), None if source == "default" else source, total - limit,
            ))
    for bad in bad_batches:
        first, last = int(bad["first"]), int(bad["last"])
        resent = all(seq in stored for seq in range(first, min(last, first + 100_000) + 1))
        result.findings.append(DealerFinding(
            dealer_id, "refused-batch",
            f"batch seq {first}..{last} refused at ingest ({str(bad['reason'])[:120]}): not "
            "stored from it; "
            + ("the records were stored since from a batch that verified" if resent else
               "its records stay missing until the terminal resends them in a batch that "
               "verifies"),
            [], None, 0,
        ))
    return result


def reconcile_dealers(
    store: CenterStore, *, default_daily_limit: int = DEFAULT_DAILY_LIMIT
) -> list[DealerReconciliation]:
    """Every dealer: registered top-up terminals, dealers that were issued an allowance, and
    any other device that journaled top-ups."""
    issued = store.allowances()
    dealers = {d.device_id for d in store.devices() if d.kind == "topup"}
    dealers |= {a.dealer_id for a in issued}
    dealers |= set(getattr(store, "topup_device_ids", list)())
    bad_batches = getattr(store, "bad_batches", None)
    out = []
    for dealer in sorted(dealers):
        bad = bad_batches(dealer) if bad_batches is not None else []
        out.append(reconcile_dealer(dealer, store.records(dealer), issued, bad_batches=bad,
                                    default_daily_limit=default_daily_limit))
    return out
