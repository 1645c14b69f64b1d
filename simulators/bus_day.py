"""A day of bus service through the PN532 emulator: cards, riders, devices and a wall clock.

One ``afc sim reader`` process holds every card of the day, all of them off the reader
(``--absent``) until their rider taps: it stands for the RF world. The devices run in this
process on that one reader line, each with its own configuration, database and wall clock:
the validators at the doors of the buses and a bayi top-up terminal. A rider's move is

    place N  →  the device reads / charges / loads the card  →  remove N
             →  the device polls an empty field (as its loop does between riders)

so a card tapped twice is a second arrival, exactly as on a bus. The clock is simulated
(every device reads the same fake wall time, through its own :class:`GuardedClock`), which
lets a whole service day run in seconds, in time order across devices.

The scenario is seeded: :func:`standard_cards` issues the mix of cards, :func:`plan_day`
writes the riders' day (rush hours, transfers, double taps, top-ups), :class:`BusDay` runs
it and records every outcome. Expectations and reconciliation are the caller's business
(``hil_tests/test_bus_day.py`` keeps its own ledger from the published tariff figures).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from firmware.apps.cards import Pn532CardSource
from firmware.apps.clock import GuardedClock
from firmware.apps.topup import CreditAllowance, Receipt, TopupRefused, TopupTerminal
from firmware.apps.ui import RecordingUi
from firmware.apps.validator import TapOutcome, Validator, ValidatorConfig
from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity, PassBlock
from firmware.core.errors import CoreError
from firmware.core.fares import CardType, FareTable
from firmware.core.keys import KeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import CardSnapshot, Purse
from firmware.reader.driver import Pn532
from firmware.stores.database import DeviceDatabase

from .cards import VirtualCard
from .rig import ReaderEmulatorProcess, RigError

log = logging.getLogger("simulators.bus_day")

LOCAL_TZ = ZoneInfo("Europe/Istanbul")
DAY_SECONDS = 86_400
#: The rider kinds :func:`standard_cards` issues and :func:`plan_day` knows how to ride.
KINDS = (
    "full", "student", "student-expired", "65+", "disabled", "65+-expired", "pass",
    "pass-student", "pass-expired", "low", "blacklisted", "expired", "online-topup",
    "online-pass",
)


def local_time(day: date, hour: int, minute: int = 0, second: int = 0) -> int:
    """Unix seconds of a local (Europe/Istanbul) wall time on ``day``."""
    return int(datetime(day.year, day.month, day.day, hour, minute, second,
                        tzinfo=LOCAL_TZ).timestamp())


# -- cards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardPlan:
    """One card of the day: who holds it, what is on it at the start, where its file is.

    ``number`` is the emulator's card number (1-based, the order of ``--card``);
    ``card_number`` is the number printed on the card. Dates are unix seconds; the card
    stores them as local dates (valid *through* that day).
    """

    number: int
    card_number: int
    kind: str
    card_type: CardType
    balance: int
    expires: int
    discount_until: int | None = None
    pass_block: PassBlock | None = None
    path: Path | None = None
    uid: bytes = b""


def standard_cards(count: int, day: date, rng: random.Random) -> list[CardPlan]:
    """A seeded mix of ``count`` cards (at least 20): full and student fares, expired
    discounts, free 65+ and disabled cards, pass holders (valid and expired), low balances,
    and one each of a blacklisted card, an expired card, a card with an online top-up
    waiting and one with an online pass waiting."""
    if count < 20:
        raise ValueError("a bus day needs at least 20 cards")
    midnight = local_time(day, 0)
    far = midnight + 5 * 365 * DAY_SECONDS
    pass_start = midnight - 10 * DAY_SECONDS
    old_pass_start = midnight - 40 * DAY_SECONDS
    shares = [  # kind, share of the cards
        ("student", 0.15), ("student-expired", 0.05), ("65+", 0.07), ("disabled", 0.04),
        ("65+-expired", 0.02), ("pass", 0.06), ("pass-student", 0.02), ("pass-expired", 0.02),
        ("low", 0.10),
    ]
    kinds = ["blacklisted", "expired", "online-topup", "online-pass"]
    for kind, share in shares:
        kinds += [kind] * max(1, round(share * count))
    kinds += ["full"] * (count - len(kinds))
    rng.shuffle(kinds)

    def money(lo: int, hi: int) -> int:
        return rng.randrange(lo // 50, hi // 50 + 1) * 50

    plans = []
    for i, kind in enumerate(kinds):
        card_type = {
            "student": CardType.STUDENT, "student-expired": CardType.STUDENT,
            "65+": CardType.SENIOR_65, "65+-expired": CardType.SENIOR_65,
            "disabled": CardType.DISABLED, "pass-student": CardType.STUDENT,
        }.get(kind, CardType.FULL)
        discount = None
        if card_type is not CardType.FULL:
            discount = (midnight - 20 * DAY_SECONDS if kind.endswith("-expired")
                        else midnight + 200 * DAY_SECONDS)
        balance = {
            "full": money(3_000, 40_000), "student": money(1_000, 15_000),
            "student-expired": money(3_000, 20_000), "65+": money(0, 2_000),
            "disabled": money(0, 2_000), "65+-expired": money(3_000, 10_000),
            "pass": money(0, 5_000), "pass-student": money(0, 3_000),
            "low": money(0, 3_000), "blacklisted": money(5_000, 10_000),
            "expired": money(5_000, 10_000), "online-topup": money(0, 1_000),
            "online-pass": money(3_000, 6_000),
        }.get(kind, money(0, 20_000))
        pass_block = None
        if kind in ("pass", "pass-student"):
            pass_block = PassBlock(1, pass_start, pass_start + 30 * DAY_SECONDS - 1)
        elif kind == "pass-expired":
            pass_block = PassBlock(1, old_pass_start, old_pass_start + 30 * DAY_SECONDS - 1)
            balance = money(0, 1_500) if rng.random() < 0.5 else money(5_000, 10_000)
        plans.append(CardPlan(
            number=i + 1, card_number=30_000_000 + i, kind=kind, card_type=card_type,
            balance=balance,
            expires=midnight - 10 * DAY_SECONDS if kind == "expired" else far,
            discount_until=discount, pass_block=pass_block,
        ))
    return plans


def issue_cards(plans: Sequence[CardPlan], keys: KeyStore, directory: Path, *,
                issued_at: int, seed: int = 0) -> list[CardPlan]:
    """Personalise a factory-fresh virtual card for each plan (key B, as the office does),
    write its pass if it has one, and save it as ``directory/card-NNN.json``. Returns the
    plans with their ``path`` and ``uid``; UIDs are seeded and distinct."""
    out, uids = [], set()
    rng = random.Random(seed)
    for plan in plans:
        while True:
            card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(rng.random()),
                                   label=f"bus day: {plan.kind} {plan.card_number}")
            if card.uid not in uids:
                break
        uids.add(card.uid)
        field_ = Field([card])
        selected = select_card(field_.transceive)
        office = Purse(ClassicReader(field_.transceive, selected.uid), keys, key_type="B")
        office.issue(Identity(plan.card_number, plan.card_type.code, 1,
                              issued_at - 400 * DAY_SECONDS, plan.expires, plan.discount_until,
                              1, b"BUSDAY00"), balance=plan.balance)
        if plan.pass_block is not None:
            field_.reset()
            selected = select_card(field_.transceive)
            Purse(ClassicReader(field_.transceive, selected.uid), keys,
                  key_type="B").write_pass(plan.pass_block)
        path = directory / f"card-{plan.number:03d}.json"
        card.save(path)
        out.append(replace(plan, path=path, uid=card.uid))
    return out


def read_card(path: Path, keys: KeyStore) -> CardSnapshot:
    """Read a saved card file in process with key A, as a validator would."""
    card = VirtualCard.from_file(path)
    field_ = Field([card])
    selected = select_card(field_.transceive)
    return Purse(ClassicReader(field_.transceive, selected.uid), keys).read()


# -- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidatorSpec:
    """A validator of the day: its configuration, and its reader mode before and after the
    midday restart."""

    device_id: str
    validator_id: int
    vehicle_id: int
    line_id: int
    other_validators: frozenset[int] = frozenset()
    modes: tuple[str, str] = ("transparent", "chip")

    def config(self, mode: str) -> ValidatorConfig:
        return ValidatorConfig(
            device_id=self.device_id, validator_id=self.validator_id,
            vehicle_id=self.vehicle_id, line_id=self.line_id, line_group="merkez",
            vehicle_validator_ids=self.other_validators, reader_mode=mode,
        )


def standard_fleet() -> list[ValidatorSpec]:
    """Line 41: bus 1 with a front and a middle door; line 42 (the transfer line): bus 2.
    The doors run opposite reader modes and swap them at the midday restart, so both modes
    serve the whole day."""
    return [
        ValidatorSpec("bus-1-front", 411, 1, 41, frozenset({412}), ("transparent", "chip")),
        ValidatorSpec("bus-1-middle", 412, 1, 41, frozenset({411}), ("chip", "transparent")),
        ValidatorSpec("bus-2-front", 421, 2, 42, frozenset(), ("transparent", "chip")),
    ]


BAYI_DEVICE = "bayi-017"
BAYI_TERMINAL_ID = 9017


# -- the riders' day --------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One move of a rider: a tap at a validator, or a top-up of ``amount`` at the bayi."""

    time: int
    card: int  # the emulator's card number
    device: str
    amount: int = 0
    why: str = ""


def plan_day(cards: Sequence[CardPlan], day: date, rng: random.Random,
             fleet: Sequence[ValidatorSpec], *, online_devices: Mapping[str, str],
             bayi: str = BAYI_DEVICE) -> list[Event]:
    """The riders' day, in time order: most riders commute in the rush hours (07:00–09:00
    and 17:00–19:00, peaking mid-window), some ride off-peak; a third of the journeys
    transfer to the other line (mostly within the hour, some too late, a few try a third
    leg); some riders tap twice (same door, other door, or after the lock-out); low-balance
    riders top up at the bayi around midday; the blacklisted, expired and online-load cards
    get their own scripts (an online-load card boards first at the validator
    ``online_devices[kind]`` holding its action, morning and evening). Each card's moves are
    at distinct, increasing seconds."""
    by_line: dict[int, list[ValidatorSpec]] = {}
    for spec in fleet:
        by_line.setdefault(spec.line_id, []).append(spec)
    lines = sorted(by_line)
    specs = {s.device_id: s for s in fleet}

    def door(line: int) -> ValidatorSpec:
        doors = by_line[line]
        return doors[0] if len(doors) == 1 or rng.random() < 0.7 else rng.choice(doors[1:])

    events: list[Event] = []

    def tap(t: int, plan: CardPlan, spec: ValidatorSpec, why: str) -> None:
        events.append(Event(int(t), plan.number, spec.device_id, 0, why))

    def boarding(t: float, plan: CardPlan, spec: ValidatorSpec, why: str) -> None:
        tap(t, plan, spec, why)
        r = rng.random()
        if r < 0.06:  # taps again at once: "did it beep?"
            tap(t + rng.randint(2, 30), plan, spec, why + ", double tap")
        elif r < 0.09:  # and at the other door of the same bus
            others = [s for s in by_line[spec.line_id] if s is not spec]
            if others:
                tap(t + rng.randint(2, 30), plan, rng.choice(others), why + ", other door")
        elif r < 0.11:  # after the stored-value lock-out, at the lock-out's very edge
            tap(t + rng.choice((59, 60, 61, 90)), plan, spec, why + ", tap again later")

    def journey(t: float, plan: CardPlan, why: str, first: ValidatorSpec | None = None) -> None:
        line = first.line_id if first else rng.choice(lines)
        boarding(t, plan, first or door(line), why)
        if len(lines) < 2 or rng.random() >= 0.35:
            return
        other = next(x for x in lines if x != line)
        r = rng.random()
        gap = rng.randint(600, 3000) if r < 0.85 else rng.randint(3660, 4800)
        boarding(t + gap, plan, door(other), why + ", transfer")
        if rng.random() < 0.1:  # a third leg, back on the first line
            boarding(t + gap + rng.randint(300, 900), plan, door(line), why + ", third leg")

    def morning() -> float:
        return local_time(day, 7) + rng.triangular(0, 7200, 3000)

    def evening() -> float:
        return local_time(day, 17) + rng.triangular(0, 7200, 3600)

    def midday() -> float:
        return local_time(day, 11) + rng.uniform(0, 3 * 3600)

    for plan in cards:
        kind = plan.kind
        if kind == "blacklisted":
            tap(morning(), plan, door(lines[0]), "blacklisted")
            events.append(Event(local_time(day, 12, 30), plan.number, bayi, 5_000, "top-up"))
            tap(evening(), plan, door(lines[-1]), "blacklisted again")
            continue
        if kind == "expired":
            tap(morning(), plan, door(lines[0]), "expired card")
            tap(evening(), plan, door(lines[-1]), "expired card again")
            continue
        if kind in online_devices:
            journey(morning(), plan, kind, first=specs[online_devices[kind]])
            journey(evening(), plan, kind + ", evening", first=specs[online_devices[kind]])
            continue
        if kind == "low":
            journey(morning(), plan, "low balance")
            if rng.random() < 0.7:
                amount = rng.choice((5_000, 10_000, 20_000))
                events.append(Event(int(midday()), plan.number, bayi, amount, "top-up"))
            journey(evening(), plan, "low balance, evening")
            continue
        if rng.random() < 0.85:
            journey(morning(), plan, "morning")
        if rng.random() < 0.25:
            journey(local_time(day, 10) + rng.uniform(0, 6 * 3600), plan, "off-peak")
        if kind == "full" and rng.random() < 0.05:
            events.append(Event(int(midday()), plan.number, bayi,
                                rng.choice((5_000, 10_000)), "top-up"))
        if rng.random() < 0.75:
            journey(evening(), plan, "evening")
    return _in_order(events)


def _in_order(events: list[Event]) -> list[Event]:
    """Sort by time; a card's moves get distinct, increasing seconds (a rider cannot be in
    two places at once), keeping their order."""
    events = sorted(events, key=lambda e: e.time)
    last: dict[int, int] = {}
    out = []
    for e in events:
        t = max(e.time, last.get(e.card, -1) + 1)
        last[e.card] = t
        out.append(e if t == e.time else Event(t, e.card, e.device, e.amount, e.why))
    return sorted(out, key=lambda e: e.time)


# -- running the day --------------------------------------------------------------------------


@dataclass
class EventResult:
    """What a move did: a tap's :class:`TapOutcome` (None when the validator saw no card),
    a top-up's receipt or refusal, or an error that escaped the application."""

    event: Event
    mode: str = ""
    outcome: TapOutcome | None = None
    receipt: Receipt | None = None
    refused: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Device:
    spec: ValidatorSpec
    db_path: Path
    db: DeviceDatabase | None = None
    app: Validator | None = None
    ui: RecordingUi = field(default_factory=RecordingUi)
    mode: str = ""


class BusDay:
    """The rig of a day: one emulator with every card off the reader, the validators of
    ``fleet`` and a bayi terminal in this process on its line, a simulated wall clock.

    ``blacklist`` card numbers are loaded into every validator's database as blacklist
    version 1; ``actions`` maps a validator's device id to its action list (version 1).
    At ``restart_at`` every validator restarts (database closed and reopened, clock
    high-water mark kept) in its second reader mode.
    """

    def __init__(
        self,
        workdir: Path,
        keys: KeyStore,
        cards: Sequence[CardPlan],
        fleet: Sequence[ValidatorSpec],
        table: FareTable,
        *,
        allowance: CreditAllowance | None = None,
        center_key=None,
        blacklist: Iterable[int] = (),
        actions: Mapping[str, list] | None = None,
        restart_at: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.keys = keys
        self.cards = list(cards)
        self.table = table
        self.allowance = allowance
        self.center_key = center_key
        self.blacklist = list(blacklist)
        self.actions = dict(actions or {})
        self.restart_at = restart_at
        self.now = 0
        self.devices = {s.device_id: _Device(s, self.workdir / f"{s.device_id}.db")
                        for s in fleet}
        self.bayi_db_path = self.workdir / f"{BAYI_DEVICE}.db"
        self._clock_marks: dict[str, int] = {}
        self._restarted = False
        self.emulator: ReaderEmulatorProcess | None = None
        self.pn: Pn532 | None = None
        self.bayi_db: DeviceDatabase | None = None
        self.bayi: TopupTerminal | None = None
        self.bayi_ui = RecordingUi()
        self.emulator_exit: int | None = None

    # -- life cycle -------------------------------------------------------------------------

    def clock(self, device_id: str) -> GuardedClock:
        """A device's guarded clock on the simulated wall time; its high-water mark
        survives the device's restart."""
        return GuardedClock(lambda: self._clock_marks.get(device_id),
                            lambda v: self._clock_marks.__setitem__(device_id, v),
                            wall=lambda: self.now)

    def start(self) -> BusDay:
        paths = [str(c.path) for c in self.cards]
        self.emulator = ReaderEmulatorProcess(
            self.workdir / "pn532", paths, control=str(self.workdir / "pn532.ctl"),
            extra_args=["--absent"], start_timeout=30.0,
        ).start()
        try:
            listed = self.emulator.control("list")
            for plan in self.cards:  # the emulator numbers the cards as we do
                line = listed[plan.number - 1]
                if not (line.startswith(f"card {plan.number} uid={plan.uid.hex().upper()} ")
                        and "state=removed" in line):
                    raise RigError(f"emulator card {plan.number} is not {plan.path}: {line}")
            self.pn = Pn532.open(str(self.emulator.port), response_timeout=2.0)
            self.pn.set_max_retries(passive=1)
            for dev in self.devices.values():
                db = DeviceDatabase.open(dev.db_path, device_id=dev.spec.device_id,
                                         journal_key=self.keys)
                if self.blacklist:
                    db.blacklist.load_full(1, [(n, 1, None) for n in self.blacklist])
                if dev.spec.device_id in self.actions:
                    db.actions.replace_all(1, self.actions[dev.spec.device_id])
                db.close()
                self._boot(dev, dev.spec.modes[0])
            self.bayi_db = DeviceDatabase.open(self.bayi_db_path, device_id=BAYI_DEVICE,
                                               journal_key=self.keys)
            self.bayi = TopupTerminal(BAYI_TERMINAL_ID, self.bayi_db, self.keys, self.table,
                                      self.bayi_ui, allowance=self.allowance,
                                      center_key=self.center_key)
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self, dev: _Device, mode: str) -> None:
        if dev.db is not None:
            dev.app.clock.flush()
            dev.db.close()
        dev.db = DeviceDatabase.open(dev.db_path, device_id=dev.spec.device_id,
                                     journal_key=self.keys)
        dev.mode = mode
        dev.app = Validator(dev.spec.config(mode), Pn532CardSource(self.pn, mode), dev.db,
                            self.keys, self.table, dev.ui, self.clock(dev.spec.device_id))

    def stop(self) -> int | None:
        """Close the databases and the reader, stop the emulator (it saves every card file);
        returns the emulator's exit status."""
        for dev in self.devices.values():
            if dev.db is not None:
                dev.app.clock.flush()
                dev.db.close()
                dev.db = dev.app = None
        if self.bayi_db is not None:
            self.bayi_db.close()
            self.bayi_db = None
        if self.pn is not None:
            self.pn.close()
            self.pn = None
        if self.emulator is not None:
            self.emulator_exit = self.emulator.stop()
        return self.emulator_exit

    def __enter__(self) -> BusDay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the day ----------------------------------------------------------------------------

    def run(self, events: Iterable[Event],
            progress: Callable[[EventResult], None] | None = None) -> list[EventResult]:
        results = []
        for event in events:
            if event.time < self.now:
                raise ValueError(f"events out of time order at {event}")
            self.now = event.time
            if self.restart_at is not None and not self._restarted and self.now >= self.restart_at:
                self._restarted = True
                for dev in self.devices.values():
                    self._boot(dev, dev.spec.modes[1])
            result = self._move(event)
            results.append(result)
            if progress is not None:
                progress(result)
        return results

    def _move(self, event: Event) -> EventResult:
        assert self.emulator is not None
        result = EventResult(event)
        self.emulator.control(f"place {event.card}")
        started = time.perf_counter()
        try:
            if event.device == BAYI_DEVICE:
                self._top_up(event, result)
            else:
                dev = self.devices[event.device]
                result.mode = dev.mode
                result.outcome = dev.app.poll()
        except CoreError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - started
        self.emulator.control(f"remove {event.card}")
        if event.device != BAYI_DEVICE:  # the loop polls on: the field is empty again
            try:
                stray = self.devices[event.device].app.poll()
            except CoreError as exc:
                stray = None
                result.error = result.error or f"empty poll: {type(exc).__name__}: {exc}"
            if stray is not None:
                result.error = result.error or f"a tap with no card on the reader: {stray}"
            else:  # and does its idle work: the ride's done record, a checkpoint
                self.devices[event.device].app.housekeeping()
        return result

    def _top_up(self, event: Event, result: EventResult) -> None:
        assert self.pn is not None and self.bayi is not None
        source = Pn532CardSource(self.pn, "transparent")
        result.mode = "transparent"
        access = source.next_card()
        if access is None:
            result.error = "the bayi terminal saw no card"
            return
        try:
            result.receipt = self.bayi.load(access, event.amount, self.now)
        except TopupRefused as exc:
            result.refused = str(exc)


def pick(cards: Sequence[CardPlan], kind: str) -> CardPlan:
    """The first card of ``kind``."""
    return next(c for c in cards if c.kind == kind)
