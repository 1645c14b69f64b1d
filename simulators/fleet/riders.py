"""The fleet's devices, cards and riders' day, all from the scenario's seed.

Cards come from :func:`simulators.bus_day.standard_cards` (the same seeded mix of full,
student, 65+, disabled, pass, low-balance, blacklisted, expired and online-load cards the
bus-day test rides), issued by :func:`simulators.bus_day.issue_cards`. The riders' day is
planned here because a fleet has many lines and buses and a configurable rush-hour profile;
the moves are :class:`simulators.bus_day.Event` (a tap at a validator, or a top-up at a
bayi terminal).

Two rules keep the day physically possible, so that the center's clone detection has no
false alarm to raise: a card's moves are at distinct, increasing seconds, and a card never
appears on two different vehicles (or a vehicle and a bayi) closer than
:data:`MIN_TRAVEL_S` apart. The injected clone breaks the second rule on purpose.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

from simulators.bus_day import (
    CardPlan,
    Event,
    ValidatorSpec,
    local_time,
)

from .scenario import Scenario

__all__ = [
    "MIN_TRAVEL_S",
    "BayiSpec",
    "Fleet",
    "RiderDay",
    "build_fleet",
    "plan_riders",
]

#: Simulated seconds a card needs between two different vehicles (the center's
#: ``--min-travel-s`` default is 120: anything closer is a suspected clone).
MIN_TRAVEL_S = 180
#: Top-ups a low-balance rider may buy, in kuruş.
TOPUP_AMOUNTS = (5_000, 10_000, 20_000)
ONLINE_TOPUP = 10_000
PASS_PRODUCT = 1


@dataclass(frozen=True)
class BayiSpec:
    device_id: str
    terminal_id: int


@dataclass(frozen=True)
class Fleet:
    """The devices of a scenario: validators by bus, bayi terminals."""

    validators: tuple[ValidatorSpec, ...]
    bayis: tuple[BayiSpec, ...]

    def buses(self) -> dict[int, list[ValidatorSpec]]:
        out: dict[int, list[ValidatorSpec]] = {}
        for spec in self.validators:
            out.setdefault(spec.vehicle_id, []).append(spec)
        return out

    def lines(self) -> dict[int, dict[int, list[ValidatorSpec]]]:
        """line id -> vehicle id -> its doors."""
        out: dict[int, dict[int, list[ValidatorSpec]]] = {}
        for spec in self.validators:
            out.setdefault(spec.line_id, {}).setdefault(spec.vehicle_id, []).append(spec)
        return out

    def spec(self, device_id: str) -> ValidatorSpec | None:
        return next((s for s in self.validators if s.device_id == device_id), None)


def build_fleet(scenario: Scenario) -> Fleet:
    """Device ids ``bus-LL-BB-vD`` (line, bus, door), vehicle ids ``L*100+B``, validator ids
    ``vehicle*10+D``; doors alternate reader modes so both serve every line."""
    specs = []
    for line in scenario.lines:
        for bus in range(1, line.buses + 1):
            vehicle = line.id * 100 + bus
            ids = [vehicle * 10 + door for door in range(1, line.validators + 1)]
            for door, vid in enumerate(ids, 1):
                mode = "transparent" if (bus + door) % 2 == 0 else "chip"
                specs.append(ValidatorSpec(
                    f"bus-{line.id}-{bus:02d}-v{door}", vid, vehicle, line.id,
                    frozenset(i for i in ids if i != vid), (mode, mode)))
    bayis = tuple(BayiSpec(f"bayi-{n:03d}", 9000 + n)
                  for n in range(1, scenario.bayi_terminals + 1))
    return Fleet(tuple(specs), bayis)


@dataclass
class RiderDay:
    """The planned day: moves in time order, and the cards chosen for special parts."""

    events: list[Event]
    online: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (card, device)
    clone_of: int | None = None  # the emulator number of the cloned card
    clone_events: list[Event] = field(default_factory=list)  # the clone's own taps
    rollback: int | None = None
    rollback_after: int | None = None  # the dump is taken after this simulated time
    rollback_at: int | None = None  # ... and written back just before this one
    victims: list[int] = field(default_factory=list)  # blacklisted by deltas during the day
    power_cuts: list[Event] = field(default_factory=list)


def _window_sampler(scenario: Scenario, day: date, rng: random.Random):
    start = local_time(day, *map(int, scenario.start.split(":")))
    end = local_time(day, *map(int, scenario.end.split(":")))
    windows = []
    for a, b, weight in scenario.rush:
        lo = max(start, local_time(day, *map(int, a.split(":"))))
        hi = min(end, local_time(day, *map(int, b.split(":"))))
        if hi > lo and weight > 0:
            windows.append((lo, hi, weight * (hi - lo)))
    if not windows:
        windows = [(start, end, 1.0)]
    total = sum(w for _, _, w in windows)

    def sample() -> float:
        r = rng.uniform(0, total)
        chosen = windows[-1]
        for window in windows:
            if r <= window[2]:
                chosen = window
                break
            r -= window[2]
        lo, hi, _ = chosen
        return lo + rng.triangular(0, hi - lo, (hi - lo) / 2)

    return sample, start, end


def plan_riders(cards: Sequence[CardPlan], fleet: Fleet, scenario: Scenario,
                rng: random.Random) -> RiderDay:
    """The riders' day (see the module docstring for the rules)."""
    lines = fleet.lines()
    line_ids = sorted(lines)
    sample, day_start, day_end = _window_sampler(scenario, scenario.day, rng)
    latest = day_end - 2 * 3600  # leave room for transfers before the day ends
    bayis = [b.device_id for b in fleet.bayis]
    events: list[Event] = []

    def door(line: int) -> ValidatorSpec:
        bus = rng.choice(sorted(lines[line]))
        doors = lines[line][bus]
        return doors[0] if len(doors) == 1 or rng.random() < 0.7 else rng.choice(doors[1:])

    def tap(t: float, plan: CardPlan, spec: ValidatorSpec, why: str) -> None:
        events.append(Event(int(t), plan.number, spec.device_id, 0, why))

    def boarding(t: float, plan: CardPlan, spec: ValidatorSpec, why: str) -> None:
        tap(t, plan, spec, why)
        r = rng.random()
        if r < scenario.double_tap:
            tap(t + rng.randint(2, 30), plan, spec, why + ", double tap")
        elif r < scenario.double_tap * 1.5:
            others = [s for s in fleet.buses()[spec.vehicle_id] if s is not spec]
            if others:
                tap(t + rng.randint(2, 30), plan, rng.choice(others), why + ", other door")
        elif r < scenario.double_tap * 2:
            tap(t + rng.choice((59, 61, 90)), plan, spec, why + ", tap again later")

    def journey(t: float, plan: CardPlan, why: str, first: ValidatorSpec | None = None) -> None:
        line = first.line_id if first else rng.choice(line_ids)
        boarding(t, plan, first or door(line), why)
        if len(line_ids) < 2 or rng.random() >= scenario.transfer:
            return
        other = rng.choice([x for x in line_ids if x != line])
        gap = rng.randint(600, 3000) if rng.random() < 0.85 else rng.randint(3660, 4800)
        boarding(t + gap, plan, door(other), why + ", transfer")
        if rng.random() < 0.1:
            boarding(t + gap + rng.randint(300, 900), plan, door(line), why + ", third leg")

    def when() -> float:
        return min(sample(), latest)

    def n_journeys() -> int:
        whole = int(scenario.journeys)
        return max(1, whole + (1 if rng.random() < scenario.journeys - whole else 0))

    day = RiderDay([])
    specs = list(fleet.validators)
    online_targets = {"online-topup": specs[0].device_id,
                      "online-pass": specs[-1].device_id}
    full = [c for c in cards if c.kind == "full" and c.balance >= 8_000]
    rng.shuffle(full)
    special: dict[str, int] = {}
    if scenario.faults.clone and full:
        special["clone"] = full.pop().number
    if scenario.faults.rollback and full:
        special["rollback"] = full.pop().number
    victims = [full.pop().number for _ in range(min(scenario.faults.blacklist_deltas,
                                                    len(full)))]
    day.victims = victims
    for plan in cards:
        kind = plan.kind
        if kind == "blacklisted":
            tap(when(), plan, door(line_ids[0]), "blacklisted")
            tap(when(), plan, door(line_ids[-1]), "blacklisted again")
            continue
        if kind == "expired":
            tap(when(), plan, door(line_ids[0]), "expired card")
            continue
        if kind in online_targets and scenario.online_loads:
            day.online[kind] = (plan.card_number, online_targets[kind])
            first = next(s for s in specs if s.device_id == online_targets[kind])
            journey(when(), plan, kind, first=first)
            continue
        if plan.number in special.values() or plan.number in victims:
            # several journeys spread over the day: before and after the fault that
            # concerns them (the clone's copy, the rollback's dump, the delta)
            for k in range(3):
                t = day_start + (k + 1) * (day_end - day_start) / 4 + rng.uniform(-1800, 1800)
                journey(min(t, latest), plan, f"{kind}, journey {k + 1}")
            continue
        for k in range(n_journeys()):
            journey(when(), plan, f"{kind}, journey {k + 1}")
        if bayis and ((kind == "low" and rng.random() < scenario.topup)
                      or (kind == "full" and rng.random() < 0.05)):
            events.append(Event(int(when()), plan.number, rng.choice(bayis),
                                rng.choice(TOPUP_AMOUNTS), "top-up"))
    day.events = _physical(events, fleet)
    by_card: dict[int, list[Event]] = {}
    for e in day.events:
        by_card.setdefault(e.card, []).append(e)
    if "clone" in special:
        number = special["clone"]
        day.clone_of = number
        mine = [e for e in by_card[number] if fleet.spec(e.device)]
        # the clone is made after the original's first tap and rides another line right
        # after the original's next taps: the same card on two vehicles at once
        for e in mine[1:3]:
            spec = fleet.spec(e.device)
            assert spec is not None
            others = [x for x in line_ids if x != spec.line_id] or line_ids
            day.clone_events.append(Event(e.time + rng.randint(20, 60), -1,
                                          door(rng.choice(others)).device_id, 0, "clone"))
    if "rollback" in special:
        number = special["rollback"]
        mine = [e for e in by_card[number] if fleet.spec(e.device)]
        day.rollback = number
        day.rollback_after = mine[0].time
        day.rollback_at = mine[-1].time
    if scenario.faults.power_cut:
        # the first tap of the day of riders whose card will certainly be charged: the cut
        # then lands inside a card write
        plans_by_number = {c.number: c for c in cards}
        candidates = [evs[0] for number, evs in sorted(by_card.items())
                      if number not in special.values() and number not in victims
                      and plans_by_number[number].kind in ("full", "student")
                      and plans_by_number[number].balance >= 3_000
                      and fleet.spec(evs[0].device) is not None]
        rng.shuffle(candidates)
        day.power_cuts = sorted(candidates[:scenario.faults.power_cut], key=lambda e: e.time)
    return day


def _physical(events: list[Event], fleet: Fleet) -> list[Event]:
    """Time order; per card distinct increasing seconds, and at least MIN_TRAVEL_S between
    two different vehicles (a bayi counts as a place of its own)."""
    vehicle = {s.device_id: s.vehicle_id for s in fleet.validators}
    out = []
    last: dict[int, tuple[int, object]] = {}
    for e in sorted(events, key=lambda e: (e.time, e.card)):
        where = vehicle.get(e.device, e.device)
        t = e.time
        if e.card in last:
            prev_t, prev_where = last[e.card]
            t = max(t, prev_t + (1 if prev_where == where else MIN_TRAVEL_S))
        last[e.card] = (t, where)
        out.append(e if t == e.time else Event(t, e.card, e.device, e.amount, e.why))
    return sorted(out, key=lambda e: (e.time, e.card))
