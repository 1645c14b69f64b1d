"""The on-bus validator, in process: virtual cards in a field, a real device database, the
Konya tariff and a fake wall clock.

Every test looks at the three things a tap leaves behind: the card (read back afresh), the
journal (intent / done / event records and their fields) and the display. The tear tests
pull the card at every frame of the write phase, restart the device and re-tap, and check
the DESIGN.md invariant: no double charge, nothing unrecorded, the journal agrees with the
card.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from firmware.apps.card_keys import reactivate
from firmware.apps.cards import FieldCardSource
from firmware.apps.clock import GuardedClock
from firmware.apps.ui import RecordingUi, Signal
from firmware.apps.validator import Validator, ValidatorConfig
from firmware.core import card_layout as cl
from firmware.core import classic_layout as layout
from firmware.core import tariffs
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity
from firmware.core.errors import AuthenticationError, CoreError, NoResponseError
from firmware.core.fares import CardType, Reason, TripProduct
from firmware.core.keys import KeyStore, MemoryKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import CardSnapshot, Purse, PurseState, pass_for
from firmware.stores.database import DeviceDatabase
from firmware.stores.errors import StoreUnavailable
from firmware.stores.journal import (
    KIND_ACTION_APPLIED,
    KIND_REJECTION,
    KIND_TAP,
    PHASE_DONE,
    PHASE_EVENT,
    PHASE_INTENT,
    JournalRecord,
)
from simulators.cards import VirtualCard

NOW = 1_767_225_600 + 8 * 3600  # 2026-01-01 08:00 UTC, 11:00 in Konya
DAY = 86_400
FAR_FUTURE_MS = (NOW + 365 * DAY) * 1000
KEYS = MemoryKeyStore({
    "classic-sector": bytes(range(16)),
    "purse-mac": bytes(range(16, 32)),
    "journal-mac": bytes(range(32, 48)),
})
TABLE = tariffs.load("konya-2025")
FULL_FARE = TABLE.leg_fare("merkez", "full")
STUDENT_FARE = TABLE.leg_fare("merkez", "student")
TRANSFER_FARE = TABLE.fare_products["aktarma"].amounts["full"]
TOPUP = 5000

# validator 11 (front door) and 12 (middle door) on bus 501, line 42; validator 71 on bus 507,
# line 43 (another line of the same network: a transfer)
FRONT = ValidatorConfig("bus-501-v1", 11, 501, 42, "merkez",
                        vehicle_validator_ids=frozenset({12}))
MIDDLE = ValidatorConfig("bus-501-v2", 12, 501, 42, "merkez",
                         vehicle_validator_ids=frozenset({11}))
OTHER_LINE = ValidatorConfig("bus-507-v1", 71, 507, 43, "merkez")

OK_LINES = frozenset({"ok", "ok-late"})


# -- cards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardSpec:
    number: int
    card_type: CardType
    balance: int
    discount_until: int | None = None
    expires: int = NOW + 900 * DAY
    with_pass: bool = False
    seed: int = 0


FULL = CardSpec(1001, CardType.FULL, 10_000, seed=1)
STUDENT = CardSpec(1002, CardType.STUDENT, 10_000, discount_until=NOW + 200 * DAY, seed=2)
STUDENT_EXPIRED = CardSpec(1003, CardType.STUDENT, 10_000, discount_until=NOW - 10 * DAY,
                           seed=3)
SENIOR = CardSpec(1004, CardType.SENIOR_65, 0, discount_until=NOW + 365 * DAY, seed=4)
PASS_HOLDER = CardSpec(1005, CardType.FULL, 0, with_pass=True, seed=5)
EXPIRED = CardSpec(1006, CardType.FULL, 10_000, expires=NOW - 2 * DAY, seed=6)
POOR = CardSpec(1007, CardType.FULL, FULL_FARE - 1, seed=7)

_issued: dict[CardSpec, tuple[bytes, bytes]] = {}


def _reader(card: VirtualCard, seed: int = 99) -> ClassicReader:
    air = Field([card])
    air.reset()
    selected = select_card(air.transceive)
    rng = random.Random(seed)
    return ClassicReader(air.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))


def make_card(spec: CardSpec) -> VirtualCard:
    """A card issued to ``spec`` by the office (key B), fresh from the same image each time."""
    if spec not in _issued:
        card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(spec.seed))
        office = Purse(_reader(card), KEYS, key_type="B")
        office.issue(
            Identity(spec.number, spec.card_type.code, 1, NOW - 30 * DAY, spec.expires,
                     spec.discount_until, 1, b"HOLDER01"),
            balance=spec.balance,
        )
        if spec.with_pass:
            Purse(_reader(card), KEYS, key_type="B").write_pass(pass_for(1, NOW - 3600))
        _issued[spec] = (card.uid, bytes(card.memory))
    uid, memory = _issued[spec]
    return VirtualCard(uid, memory, rng=random.Random(spec.seed + 1000))


def read(card: VirtualCard) -> CardSnapshot:
    """The card as a fresh reader sees it (key A)."""
    return Purse(_reader(card), KEYS).read()


def status_value(card: VirtualCard) -> int:
    return layout.decode_value_block(card.block(cl.BLOCK_STATUS)).value


# -- the device -----------------------------------------------------------------------------


class Wall:
    """A fake wall clock."""

    def __init__(self, t: int = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: int) -> None:
        self.t += seconds


@dataclass
class Device:
    """One validator with its own database file; :meth:`restart` is a power cycle."""

    config: ValidatorConfig
    path: Path
    wall: Wall
    air: Field = field(default_factory=Field)
    saved_clock: list[int] = field(default_factory=list)
    db: DeviceDatabase | None = None
    v: Validator | None = None
    ui: RecordingUi | None = None
    keys: KeyStore = KEYS

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.db = DeviceDatabase.open(self.path, device_id=self.config.device_id,
                                      journal_key=self.keys)
        self.ui = RecordingUi()
        clock = GuardedClock(lambda: self.saved_clock[-1] if self.saved_clock else None,
                             self.saved_clock.append, wall=self.wall)
        rng = random.Random(self.config.validator_id)
        source = FieldCardSource(self.air, nonce=lambda: rng.getrandbits(32))
        self.v = Validator(self.config, source, self.db, self.keys, TABLE, self.ui, clock)

    def restart(self) -> None:
        self.db.close()
        self.start()

    def tap(self, card: VirtualCard):
        self.air.cards[:] = [card]
        card.place()
        out = self.v.poll()
        assert out is not None, "the card was not seen"
        self.v.finish_tap()  # what the loop's next idle moment does: the ride's done record
        return out

    @property
    def shown(self) -> tuple[str, str, Signal]:
        return self.ui.last

    def journal(self) -> list[JournalRecord]:
        return self.db.journal.records(0, 100_000)

    def last_seq(self) -> int:
        return self.db.journal.last_seq


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def devices(tmp_path, wall):
    made: list[Device] = []

    def make(config: ValidatorConfig = FRONT) -> Device:
        dev = Device(config, tmp_path / f"{config.device_id}.db", wall)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.db.close()


@pytest.fixture
def front(devices) -> Device:
    return devices(FRONT)


def done_for(records: list[JournalRecord], intent: JournalRecord) -> JournalRecord:
    dones = [r for r in records if r.phase == PHASE_DONE and r.link == intent.seq]
    assert len(dones) == 1, f"intent {intent.seq} has {len(dones)} done records"
    return dones[0]


def assert_paid_ride(dev: Device, card: VirtualCard, spec: CardSpec, fare: int, reason: Reason,
                     *, since: int = 0, product: TripProduct = TripProduct.PURSE,
                     counter: int = 1, balance_before: int | None = None) -> None:
    """Card, journal and display after one accepted ride that started at ``since``."""
    before = spec.balance if balance_before is None else balance_before
    snap = read(card)
    assert snap.state is PurseState.CONSISTENT
    assert (snap.balance, snap.purse, snap.backup) == (before - fare,) * 3
    assert snap.counter == counter
    trip = snap.newest_trip
    assert (trip.fare, trip.product, trip.validator_id, trip.line_id) == (
        fare, product, dev.config.validator_id, dev.config.line_id)
    assert trip.time == dev.wall.t
    records = [r for r in dev.journal() if r.seq > since]
    assert [(r.phase, r.kind) for r in records] == [(PHASE_INTENT, KIND_TAP),
                                                    (PHASE_DONE, KIND_TAP)]
    intent, done = records
    assert (intent.card_number, intent.counter_before, intent.counter_after) == (
        spec.number, counter - 1, counter)
    assert (intent.balance_before, intent.balance_after, intent.fare, intent.reason) == (
        before, before - fare, fare, reason.code)
    assert intent.uid == card.uid and intent.time == dev.wall.t * 1000
    assert (done.link, done.outcome, done.card_number) == (intent.seq, "ok", spec.number)
    assert (done.counter_after, done.balance_after) == (counter, before - fare)
    assert dev.db.journal.open_intents() == []
    assert dev.db.journal.verify() == []


# -- 1. rides, refusals, the action list --------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fare", "line1"),
    [
        (FULL, 2250, "İyi yolculuklar 22,50 TL"),
        (STUDENT, 900, "İyi yolculuklar 9,00 TL"),
    ],
    ids=["full", "student"],
)
def test_paid_ride(front, spec, fare, line1):
    assert (FULL_FARE, STUDENT_FARE) == (2250, 900)  # the Konya 2025 tariff
    card = make_card(spec)
    out = front.tap(card)
    assert out.accepted and (out.reason, out.fare) == (Reason.OK, fare)
    assert (out.balance, out.counter, out.card_number) == (spec.balance - fare, 1, spec.number)
    assert_paid_ride(front, card, spec, fare, Reason.OK)
    balance = spec.balance - fare
    assert front.shown == (line1, f"Bakiye {balance // 100},{balance % 100:02d} TL", Signal.OK)


def test_expired_discount_pays_full_fare_with_a_notice(front):
    card = make_card(STUDENT_EXPIRED)
    out = front.tap(card)
    assert out.accepted and (out.reason, out.fare) == (Reason.OK, FULL_FARE)
    assert_paid_ride(front, card, STUDENT_EXPIRED, FULL_FARE, Reason.OK)
    line1, line2, signal = front.shown
    assert line1 == "İyi yolculuklar 22,50 TL"
    assert signal is Signal.INFO  # amber: accepted with a remark
    assert Reason.DISCOUNT_EXPIRED.message_tr in line2  # "Vize süresi doldu" is on the display
    assert "Bakiye 77,50 TL" in line2


def test_pass_ride_costs_nothing(front, wall):
    card = make_card(PASS_HOLDER)
    out = front.tap(card)
    assert out.accepted and (out.reason, out.fare) == (Reason.OK_PASS, 0)
    assert_paid_ride(front, card, PASS_HOLDER, 0, Reason.OK_PASS, product=TripProduct.PASS)
    assert front.journal()[0].product == TripProduct.PASS
    assert front.shown == ("Abonman geçerli 0,00 TL", "Abonman", Signal.OK)
    # a pass ride locks out for 30 minutes, not the purse's 60 s
    seq, memory = front.last_seq(), bytes(card.memory)
    wall.advance(10 * 60)
    assert front.tap(card).reason is Reason.ALREADY_VALIDATED
    assert (front.last_seq(), bytes(card.memory)) == (seq, memory)


def test_free_ride(front):
    card = make_card(SENIOR)
    out = front.tap(card)
    assert out.accepted and (out.reason, out.fare) == (Reason.OK_FREE, 0)
    assert_paid_ride(front, card, SENIOR, 0, Reason.OK_FREE, product=TripProduct.FREE)
    assert front.shown == ("Ücretsiz geçiş 0,00 TL", "Bakiye 0,00 TL", Signal.OK)


def test_anti_passback_at_the_same_validator(front, wall):
    card = make_card(FULL)
    front.tap(card)
    seq, memory = front.last_seq(), bytes(card.memory)
    wall.advance(30)
    out = front.tap(card)
    assert (out.reason, out.accepted, out.fare, out.seqs) == (
        Reason.ALREADY_VALIDATED, False, 0, [])
    assert front.shown == ("Kart zaten okutuldu", "Already validated", Signal.INFO)
    assert bytes(card.memory) == memory, "nothing may be written to the card"
    assert front.last_seq() == seq, "nothing may be journaled"
    # the window is the tariff's 60 s: a minute later it is a new ride, charged once
    wall.advance(31)
    out = front.tap(card)
    assert (out.reason, out.fare, out.balance) == (Reason.OK, FULL_FARE, 10_000 - 2 * FULL_FARE)


def test_anti_passback_at_the_other_door(devices, wall):
    front, middle = devices(FRONT), devices(MIDDLE)
    card = make_card(FULL)
    front.tap(card)
    memory = bytes(card.memory)
    wall.advance(20)
    out = middle.tap(card)
    assert (out.reason, out.fare) == (Reason.ALREADY_VALIDATED, 0)
    assert middle.shown == ("Kart zaten okutuldu", "Already validated", Signal.INFO)
    assert bytes(card.memory) == memory
    assert middle.journal() == []
    assert read(card).balance == 10_000 - FULL_FARE


def test_transfer_to_another_line(devices, wall):
    front, other = devices(FRONT), devices(OTHER_LINE)
    card = make_card(FULL)
    front.tap(card)
    wall.advance(20 * 60)
    out = other.tap(card)
    assert TRANSFER_FARE == 1350  # 40 % off the 22,50 TL leg
    assert out.accepted and (out.reason, out.fare) == (Reason.OK_TRANSFER, TRANSFER_FARE)
    assert_paid_ride(other, card, FULL, TRANSFER_FARE, Reason.OK_TRANSFER, counter=2,
                     balance_before=10_000 - FULL_FARE)
    assert read(card).newest_trip.transfer_step == 1
    assert other.shown == ("Aktarma 13,50 TL", "Bakiye 64,00 TL", Signal.OK)
    # only the second ride is discounted: back on line 42 within the hour pays the full fare
    wall.advance(10 * 60)
    out = front.tap(card)
    assert (out.reason, out.fare) == (Reason.OK, FULL_FARE)


def test_transfer_window_is_an_hour(devices, wall):
    front, other = devices(FRONT), devices(OTHER_LINE)
    card = make_card(FULL)
    front.tap(card)
    wall.advance(3601)
    out = other.tap(card)
    assert (out.reason, out.fare) == (Reason.OK, FULL_FARE)


def _assert_rejected(dev: Device, card: VirtualCard, spec: CardSpec, reason: Reason,
                     out) -> JournalRecord:
    assert (out.reason, out.accepted, out.fare) == (reason, False, 0)
    assert dev.shown == (reason.message_tr, reason.message_en, Signal.REJECT)
    events = [r for r in dev.journal() if r.seq in out.seqs]
    assert len(events) == 1
    event = events[0]
    assert (event.phase, event.kind, event.reason, event.outcome) == (
        PHASE_EVENT, KIND_REJECTION, reason.code, "declined")
    assert (event.card_number, event.uid, event.balance_before, event.counter_before) == (
        spec.number, card.uid, spec.balance, 0)
    assert dev.db.journal.open_intents() == []
    assert not [r for r in dev.journal() if r.phase != PHASE_EVENT], "no card write intended"
    return event


def test_insufficient_balance(front):
    card = make_card(POOR)
    memory = bytes(card.memory)
    out = front.tap(card)
    _assert_rejected(front, card, POOR, Reason.INSUFFICIENT_BALANCE, out)
    assert bytes(card.memory) == memory, "the card is unchanged"
    assert read(card).balance == FULL_FARE - 1


def test_card_expired(front):
    card = make_card(EXPIRED)
    memory = bytes(card.memory)
    out = front.tap(card)
    _assert_rejected(front, card, EXPIRED, Reason.CARD_EXPIRED, out)
    assert bytes(card.memory) == memory


def test_blacklisted_card_is_blocked(devices, wall):
    front, other = devices(FRONT), devices(OTHER_LINE)
    front.db.blacklist.load_full(1, [(FULL.number, 1, None)])
    card = make_card(FULL)
    memory = bytes(card.memory)
    out = front.tap(card)
    _assert_rejected(front, card, FULL, Reason.BLACKLISTED, out)
    snap = read(card)
    assert snap.blocked and snap.status == 0 and status_value(card) == 0
    assert (snap.balance, snap.counter) == (FULL.balance, 0), "not charged"
    # only the status block changed
    changed = {i // 16 for i in range(len(memory)) if memory[i] != card.memory[i]}
    assert changed == {cl.BLOCK_STATUS}
    # the next tap, even where the blacklist has not arrived yet: the card itself says blocked
    wall.advance(120)
    out = other.tap(card)
    assert (out.reason, out.accepted) == (Reason.CARD_BLOCKED, False)
    assert other.shown == ("Kart kapatılmış", "Card blocked", Signal.REJECT)
    assert [(r.kind, r.reason) for r in other.journal()] == [
        (KIND_REJECTION, Reason.CARD_BLOCKED.code)]
    # and the listing validator keeps refusing it without charging
    wall.advance(120)
    out = front.tap(card)
    assert not out.accepted and read(card).balance == FULL.balance
    assert read(card).blocked


def test_online_topup_is_applied_exactly_once(front, wall):
    card = make_card(FULL)
    front.db.actions.replace_all(1, [{
        "action_id": "a1", "card_number": FULL.number, "kind": "topup", "amount": TOPUP,
        "valid_until": FAR_FUTURE_MS}])
    out = front.tap(card)
    assert out.accepted and (out.reason, out.fare) == (Reason.OK, FULL_FARE), out.note
    assert out.balance == FULL.balance + TOPUP - FULL_FARE
    assert front.shown == ("İyi yolculuklar 22,50 TL", "Bakiye 127,50 TL", Signal.OK)
    snap = read(card)
    assert (snap.balance, snap.counter, snap.state) == (12_750, 2, PurseState.CONSISTENT)
    topup_trip = snap.trip_with_counter(1)[1]
    assert (topup_trip.product, topup_trip.fare, topup_trip.validator_id) == (
        TripProduct.TOP_UP, TOPUP, FRONT.validator_id)
    records = front.journal()
    assert [(r.phase, r.kind) for r in records] == [
        (PHASE_INTENT, KIND_ACTION_APPLIED), (PHASE_DONE, KIND_ACTION_APPLIED),
        (PHASE_INTENT, KIND_TAP), (PHASE_DONE, KIND_TAP)]
    load, loaded = records[0], records[1]
    assert (load.action_id, load.card_number, load.counter_before, load.counter_after) == (
        "a1", FULL.number, 0, 1)
    assert (load.balance_before, load.balance_after, load.fare) == (10_000, 15_000, -TOPUP)
    assert (loaded.link, loaded.outcome, loaded.action_id, loaded.balance_after) == (
        load.seq, "ok", "a1", 15_000)
    assert (records[2].balance_before, records[3].balance_after) == (15_000, 12_750)
    unreported = front.db.actions.applied_unreported()
    assert [(a.action_id, a.applied_seq) for a in unreported] == [("a1", loaded.seq)]
    assert front.db.actions.pending_for(FULL.number, wall.t * 1000) == []
    # the next tap does not load it again
    wall.advance(3600)
    out = front.tap(card)
    assert (out.fare, out.balance) == (FULL_FARE, 12_750 - FULL_FARE)
    assert read(card).balance == 12_750 - FULL_FARE
    assert [a.action_id for a in front.db.actions.applied_unreported()] == ["a1"]
    assert len([r for r in front.journal() if r.kind == KIND_ACTION_APPLIED]) == 2
    assert front.db.journal.verify() == []


def test_an_online_load_listed_on_two_validators_reaches_the_card_once(devices, wall):
    """The center lists an action on every device; the card records the action number it
    received, so the second device does not load it again."""
    card = make_card(FULL)
    action = {"action_id": "web-7", "card_number": FULL.number, "kind": "topup",
              "amount": TOPUP, "valid_until": FAR_FUTURE_MS, "card_seq": 1}
    first, second = devices(FRONT), devices(OTHER_LINE)
    for dev in (first, second):
        dev.db.actions.replace_all(1, [action])
    out = first.tap(card)
    assert out.balance == FULL.balance + TOPUP - FULL_FARE
    assert read(card).identity.actions_applied == 1
    wall.advance(20 * 60)
    out = second.tap(card)
    assert out.accepted, out.note
    snap = read(card)
    assert snap.balance == FULL.balance + TOPUP - FULL_FARE - out.fare  # loaded once only
    assert [r for r in second.journal() if r.kind == KIND_ACTION_APPLIED] == []
    assert second.db.actions.applied_unreported() == []


# -- 2. security ----------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["balance", "card type"])
def test_forged_card_is_blocked_and_journaled(front, wall, what):
    card = make_card(FULL)
    if what == "balance":  # well-formed value blocks, no purse MAC key
        for block in (cl.BLOCK_PURSE, cl.BLOCK_BACKUP):
            card.memory[16 * block:16 * block + 16] = layout.encode_value_block(99_999, block)
    else:  # a full-fare card made 65+ (free), identity MAC unchanged
        card.memory[16 * cl.BLOCK_IDENTITY + 4] = CardType.SENIOR_65.code
    forged = bytes(card.memory)
    out = front.tap(card)
    assert not out.accepted and out.note.startswith("forged"), out.note
    assert front.shown == ("Kart bloke", "Card blocked", Signal.REJECT)
    records = front.journal()
    assert [(r.phase, r.kind, r.reason, r.outcome, r.uid) for r in records] == [
        (PHASE_EVENT, KIND_REJECTION, Reason.CARD_BLOCKED.code, "forged", card.uid)]
    assert status_value(card) == 0, "the status block is blocked"
    changed = {i // 16 for i in range(len(forged)) if forged[i] != card.memory[i]}
    assert changed == {cl.BLOCK_STATUS}, "nothing but the block was written"
    wall.advance(120)
    out = front.tap(card)
    assert not out.accepted and out.fare == 0
    assert [r for r in front.journal() if r.phase != PHASE_EVENT] == []
    assert front.db.journal.verify() == []


def test_rolled_back_card_is_refused_and_blocked(front, wall):
    card = make_card(FULL)
    dump = bytes(card.memory)
    front.tap(card)
    wall.advance(3600)
    front.tap(card)
    assert read(card).balance == 10_000 - 2 * FULL_FARE
    seq = front.last_seq()
    card.memory[:] = dump  # the old dump: every MAC verifies
    wall.advance(3600)
    out = front.tap(card)
    assert (out.reason, out.accepted, out.fare) == (Reason.CARD_BLOCKED, False, 0)
    assert "Kart bloke" in front.shown[0] and front.shown[2] is Signal.REJECT
    new = [r for r in front.journal() if r.seq > seq]
    assert [(r.phase, r.kind, r.reason, r.outcome) for r in new] == [
        (PHASE_EVENT, KIND_REJECTION, Reason.CARD_BLOCKED.code, "rolled-back")]
    assert (new[0].card_number, new[0].counter_before, new[0].balance_before) == (
        FULL.number, 0, 10_000)
    snap = read(card)
    assert snap.blocked and snap.balance == 10_000 and snap.counter == 0
    assert front.db.journal.last_counter(FULL.number) == 2
    wall.advance(3600)
    out = front.tap(card)
    assert not out.accepted and read(card).balance == 10_000
    assert front.db.journal.verify() == []


def _selection_frames(card: VirtualCard) -> int:
    before = card.counters.frames
    air = Field([card])
    FieldCardSource(air).next_card()
    return card.counters.frames - before


def test_foreign_card_is_invalid_then_rate_limited(front, wall):
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(77))  # not issued
    memory = bytes(card.memory)
    selection = _selection_frames(card)
    for _ in range(5):
        before = card.counters.frames
        out = front.tap(card)
        assert out.note == "not our card" and not out.accepted
        assert front.shown == ("Geçersiz kart", "Invalid card", Signal.REJECT)
        assert card.counters.frames - before > selection, "an AUTH was attempted"
        wall.advance(10)  # 5 failures within 60 s
    before = card.counters.frames
    out = front.tap(card)
    assert out.note == "rate-limited"
    assert front.shown == ("Kart okunamadı", "Card not readable", Signal.REJECT)
    assert card.counters.frames - before == selection, "no AUTH after the selection"
    assert bytes(card.memory) == memory
    assert [r for r in front.journal() if r.phase != PHASE_EVENT] == []
    # our own cards are not affected by someone else's block
    assert front.tap(make_card(FULL)).accepted
    # the block lapses after 5 minutes: authentication is tried again
    wall.advance(301)
    before = card.counters.frames
    assert front.tap(card).note == "not our card"
    assert card.counters.frames - before > selection


def test_failures_spread_over_more_than_a_minute_are_not_limited(front, wall):
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(78))
    for _ in range(6):
        assert front.tap(card).note == "not our card"
        wall.advance(20)


# -- 3. tears and power cuts ----------------------------------------------------------------


class PowerCut(Exception):
    """The validator lost power: nothing after this point ran."""


def _setup_topup(db: DeviceDatabase) -> None:
    db.actions.replace_all(1, [{
        "action_id": "a1", "card_number": FULL.number, "kind": "topup", "amount": TOPUP,
        "valid_until": FAR_FUTURE_MS}])


SCENARIOS = {"ride": None, "topup": _setup_topup}


def _write_phase(tmp_path, scenario: str, keys: KeyStore = KEYS) -> tuple[int, int]:
    """(frames before the first intent, frames of the write phase) of a clean tap."""
    dev = Device(FRONT, tmp_path / "probe.db", Wall(), keys=keys)
    try:
        if SCENARIOS[scenario]:
            SCENARIOS[scenario](dev.db)
        card = make_card(FULL)
        at_intent: list[int] = []
        real_intent = dev.db.journal.intent

        def spy(record):
            at_intent.append(card.counters.frames)
            return real_intent(record)

        dev.db.journal.intent = spy
        start = card.counters.frames
        out = dev.tap(card)
        assert out.accepted and out.fare == FULL_FARE, out.note
        return at_intent[0] - start, card.counters.frames - at_intent[0]
    finally:
        dev.db.close()


def _check_after_retap(dev: Device, card: VirtualCard, scenario: str, rides: int) -> None:
    """The invariants once the card was re-tapped: ``rides`` fares were taken."""
    loaded = TOPUP if scenario == "topup" else 0
    snap = read(card)
    assert snap.state is PurseState.CONSISTENT
    assert snap.purse == snap.backup == snap.balance
    # (a) exactly the expected money moved: never twice, never negative
    assert snap.balance == FULL.balance + loaded - rides * FULL_FARE >= 0
    records = dev.journal()
    mine = [r for r in records if r.card_number == FULL.number]
    charged = [r for r in mine if r.phase == PHASE_DONE and r.kind == KIND_TAP
               and r.outcome in OK_LINES]
    assert len(charged) == rides, "every fare the card paid is journaled once"
    if scenario == "topup":
        applied = [r for r in mine if r.phase == PHASE_DONE and r.kind == KIND_ACTION_APPLIED
                   and r.outcome in OK_LINES]
        assert len(applied) == 1, "the top-up is journaled as applied exactly once"
        unreported = dev.db.actions.applied_unreported()
        assert [a.action_id for a in unreported] == ["a1"]
        assert unreported[0].applied_seq == applied[0].seq
    # (b) every intent is closed, consistently with the card
    assert dev.db.journal.open_intents() == []
    for intent in (r for r in records if r.phase == PHASE_INTENT):
        done = done_for(records, intent)
        assert done.outcome in {"ok", "ok-late", "not-charged"}
        if done.outcome == "not-charged":
            assert done.balance_after == intent.balance_before
    # (c) the journal's last word on the card is the card's balance
    last_done = [r for r in mine if r.phase == PHASE_DONE][-1]
    assert (last_done.balance_after, last_done.counter_after) == (snap.balance, snap.counter)
    # (d) every record verifies
    assert dev.db.journal.verify() == []


@pytest.mark.parametrize("scenario", ["ride", "topup"])
@pytest.mark.parametrize("answer", [True, False], ids=["answered", "silent"])
def test_tear_at_every_frame_of_the_write_phase(tmp_path, scenario, answer):
    before_write, write_frames = _write_phase(tmp_path, scenario)
    assert write_frames >= (20 if scenario == "topup" else 10)
    interrupted = completed = 0
    for k in range(1, write_frames + 1):
        for delay in (10, 120):  # within anti-passback, and after it
            wall = Wall()
            dev = Device(FRONT, tmp_path / f"{scenario}-{answer}-{k}-{delay}.db", wall)
            try:
                if SCENARIOS[scenario]:
                    SCENARIOS[scenario](dev.db)
                card = make_card(FULL)
                card.faults.tear_after(before_write + k, answer=answer)
                out = dev.tap(card)
                assert card.counters.tears == 1, f"k={k}: the tear did not fire"
                card.faults.clear()
                if out.note:
                    assert out.note.startswith("write interrupted"), out.note
                    assert not out.accepted and out.fare == 0, "not a boarding"
                    assert dev.shown == ("Tekrar okutun", "Tap again", Signal.REJECT)
                    interrupted += 1
                else:
                    assert out.accepted and out.fare == FULL_FARE
                    completed += 1
                # what the card says now, from the card alone: old or new, nothing between
                torn = read(card)
                if scenario == "topup":
                    assert torn.purse in {10_000, 15_000, 12_750}, k
                else:
                    assert torn.purse in {10_000, 10_000 - FULL_FARE}, k
                assert torn.backup in {10_000, 15_000, torn.purse}, k
                loaded = torn.purse != 10_000
                ride_moved = torn.purse in {10_000 - FULL_FARE, 12_750}
                in_doubt = dev.db.journal.open_intents()
                assert bool(in_doubt) == bool(out.note), "an interrupted write leaves its intent"
                # power cycle, then the rider taps again
                dev.restart()
                wall.advance(delay)
                again = dev.tap(card)
                if delay < 60 and ride_moved:
                    assert again.reason is Reason.ALREADY_VALIDATED, (k, again)
                else:
                    assert again.accepted and again.fare == FULL_FARE, (k, again)
                rides = 1 + (ride_moved and delay >= 60)
                _check_after_retap(dev, card, scenario, rides)
                # the taps in doubt were resolved by what the card showed
                records = dev.journal()
                for intent in in_doubt:
                    happened = ride_moved if intent.kind == KIND_TAP else loaded
                    assert done_for(records, intent).outcome == (
                        "ok-late" if happened else "not-charged"), (k, intent)
            finally:
                dev.db.close()
    assert interrupted and completed == (2 if answer else 0)


@pytest.mark.parametrize("scenario", ["ride", "topup"])
def test_power_lost_between_card_write_and_done(front, wall, monkeypatch, scenario):
    dev = front
    if SCENARIOS[scenario]:
        SCENARIOS[scenario](dev.db)
    card = make_card(FULL)
    journal = dev.db.journal

    def cut(*args, **kwargs):
        raise PowerCut

    monkeypatch.setattr(journal, "done", cut)
    with pytest.raises(PowerCut):
        dev.tap(card)
    snap = read(card)
    moved = TOPUP if scenario == "topup" else -FULL_FARE
    assert snap.balance == FULL.balance + moved, "the card was written"
    [intent] = journal.open_intents()
    monkeypatch.undo()
    dev.restart()
    wall.advance(10)
    again = dev.tap(card)
    records = dev.journal()
    assert done_for(records, intent).outcome == "ok-late"
    assert done_for(records, intent).balance_after == FULL.balance + moved
    if scenario == "ride":
        assert again.reason is Reason.ALREADY_VALIDATED, "not charged again"
        assert read(card).balance == FULL.balance - FULL_FARE
    else:
        assert again.accepted and again.fare == FULL_FARE
        assert read(card).balance == FULL.balance + TOPUP - FULL_FARE, "loaded once"
    _check_after_retap(dev, card, scenario, 1)
    # a later tap is a new ride, charged once
    wall.advance(120)
    assert dev.tap(card).fare == FULL_FARE
    _check_after_retap(dev, card, scenario, 2)


# -- 4. disk full ---------------------------------------------------------------------------


def test_disk_full_means_out_of_service_and_no_charge(front, wall):
    db = front.db
    conn = db.connection
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    # fill the last free bytes with records, large ones first, then smaller and smaller
    # ones, until not even a bare record fits (a tap's intent is larger than that)
    for n in (64, 16, 4, 0):
        filler = {"kind": "alarm", "time": 1, "line": "x" * n, "vehicle": "x" * n,
                  "validator_id": "x" * n, "action_id": "x" * n} if n else \
            {"kind": "alarm", "time": 1}
        with pytest.raises(StoreUnavailable):
            for _ in range(10_000):
                db.journal.event(filler)
    filled = db.journal.last_seq
    card = make_card(FULL)
    memory = bytes(card.memory)
    out = front.tap(card)
    assert out.note == "out of service" and not out.accepted
    assert front.shown[2] is Signal.OUT_OF_SERVICE
    assert front.v.out_of_service
    assert bytes(card.memory) == memory, "the card is not written without a journal"
    assert read(card).balance == FULL.balance
    assert db.journal.last_seq == filled and db.journal.open_intents() == []
    # room again: the next tap charges normally and the validator is back in service
    conn.execute("PRAGMA max_page_count = 1073741823")
    wall.advance(5)
    out = front.tap(card)
    assert out.accepted and (out.fare, out.balance) == (FULL_FARE, FULL.balance - FULL_FARE)
    assert not front.v.out_of_service
    assert front.shown == ("İyi yolculuklar 22,50 TL", "Bakiye 77,50 TL", Signal.OK)
    assert_paid_ride(front, card, FULL, FULL_FARE, Reason.OK, since=filled)
    # the center hears of it: the outage with the time it began (the full database could not
    # take the event then), and the return to service
    events = [(e.event, e.severity, e.time) for e in db.events.pending()]
    assert events == [("out-of-service", "alarm", (wall.t - 5) * 1000),
                      ("in-service", "info", wall.t * 1000)]


def _ride_records(dev: Device, card_number: int) -> list[tuple[str, str | None]]:
    return [(r.phase, r.outcome) for r in dev.journal()
            if r.card_number == card_number and r.kind == KIND_TAP]


def test_the_done_record_follows_after_the_beep(front, wall):
    """The rider waits for the card and the fsynced intent only; the done record is written
    at the validator's next idle moment, or first thing at the next tap if none came."""
    card = make_card(FULL)
    front.air.cards[:] = [card]
    card.place()
    out = front.v.poll()
    assert out.accepted and front.shown[2] is Signal.OK
    assert read(card).balance == FULL.balance - FULL_FARE, "the card is written before"
    [intent] = front.db.journal.open_intents()
    assert _ride_records(front, FULL.number) == [(PHASE_INTENT, None)]
    front.v.housekeeping()  # the loop's idle step once the card has gone
    assert front.db.journal.open_intents() == []
    assert _ride_records(front, FULL.number) == [(PHASE_INTENT, None), (PHASE_DONE, "ok")]
    assert done_for(front.journal(), intent).balance_after == FULL.balance - FULL_FARE
    # no idle moment between two cards: the next tap writes the previous done first
    other = make_card(STUDENT)
    front.air.cards[:] = [other]
    other.place()
    assert front.v.poll().accepted
    assert [r.card_number for r in front.db.journal.open_intents()] == [STUDENT.number], \
        "the second ride's own done waits for the next idle moment"
    wall.advance(120)
    card.place()
    front.air.cards[:] = [card]
    assert front.v.poll().accepted
    assert [r.card_number for r in front.db.journal.open_intents()] == [FULL.number]
    assert _ride_records(front, STUDENT.number)[-1] == (PHASE_DONE, "ok")
    assert front.db.journal.verify() == []


def test_a_done_the_database_cannot_take_is_kept_and_written_when_it_can(front, wall):
    db = front.db
    card = make_card(FULL)
    front.air.cards[:] = [card]
    card.place()
    assert front.v.poll().accepted
    conn = db.connection
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnavailable):
        for _ in range(10_000):  # fill the database to the last byte
            db.journal.event({"kind": "alarm", "time": 1})
    front.v.housekeeping()
    assert front.v.out_of_service and front.shown[2] is Signal.OUT_OF_SERVICE
    [intent] = db.journal.open_intents()
    front.v.housekeeping()  # still full: still pending, still out of service
    assert front.v.out_of_service and len(db.journal.open_intents()) == 1
    conn.execute("PRAGMA max_page_count = 1073741823")
    front.v.housekeeping()
    assert not front.v.out_of_service and db.journal.open_intents() == []
    done = done_for(front.journal(), intent)
    assert (done.outcome, done.balance_after) == ("ok", FULL.balance - FULL_FARE)
    assert [e.event for e in db.events.pending()] == ["out-of-service", "in-service"]


def test_a_validator_stopped_with_a_done_pending_writes_it(front, wall):
    card = make_card(FULL)
    front.air.cards[:] = [card]
    card.place()
    polls = iter([True])  # one turn of the loop (the tap), then the stop: no idle moment
    front.v.run(stop=lambda: next(polls, False) is False, idle_sleep=0)
    assert front.db.journal.open_intents() == []
    assert _ride_records(front, FULL.number) == [(PHASE_INTENT, None), (PHASE_DONE, "ok")]


def test_reader_changes_are_events_once_each(front, wall):
    front.v.note_reader(True)  # the first sight of a working reader is no event
    front.v.note_reader(True)
    front.v.note_reader(False, "no answer from the PN532 in 1.0 s")
    front.v.note_reader(False, "no answer from the PN532 in 1.0 s")
    wall.advance(30)
    front.v.note_reader(True)
    events = [(e.event, e.severity) for e in front.db.events.pending()]
    assert events == [("reader-lost", "alarm"), ("reader-back", "info")]
    assert front.db.events.status()["reader"][0] == "ok"


def test_a_fare_bundle_applied_by_the_agent_is_used_from_the_next_tap(front, wall):
    from firmware.core import tariffs

    text = (Path(tariffs.__file__).parent / "konya-2025.toml").read_text()
    dearer = text.replace("{ full = 2250,", "{ full = 2500,", 1)
    assert dearer != text, "the Konya tariff's full fare line moved: update this test"
    card = make_card(FULL)
    assert front.tap(card).fare == FULL_FARE
    front.db.config.put("fares", 7, dearer.encode())  # what the agent does with a bundle
    wall.advance(120)
    assert front.tap(card).fare == FULL_FARE  # mid-service: not before the validator is idle
    front.v.housekeeping()
    wall.advance(120)
    assert front.tap(card).fare == 2500


# -- 5. the clock set back ------------------------------------------------------------------


def test_clock_set_back_does_not_reopen_anti_passback(front, wall):
    card = make_card(FULL)
    front.tap(card)
    ride_time = wall.t
    seq, memory = front.last_seq(), bytes(card.memory)
    wall.advance(-3600)  # the RTC jumps back an hour
    wall.advance(5)
    assert front.v.clock.now() == ride_time
    assert front.v.clock.set_back_by == 3600 - 5
    out = front.tap(card)
    assert out.reason is Reason.ALREADY_VALIDATED and out.fare == 0
    assert (front.last_seq(), bytes(card.memory)) == (seq, memory)
    # across a restart too: the high-water mark was saved
    front.restart()
    assert front.v.clock.now() >= ride_time - 60
    assert front.tap(card).reason is Reason.ALREADY_VALIDATED
    assert read(card).balance == FULL.balance - FULL_FARE
    assert front.last_seq() == seq
    # time goes on from the high-water mark once the wall clock catches up
    wall.advance(3600 + 60)
    out = front.tap(card)
    assert (out.reason, out.fare) == (Reason.OK, FULL_FARE)
    assert all(r.time >= ride_time * 1000 for r in front.journal())


def test_a_torn_online_load_gets_its_number_recorded_when_the_card_returns(
    devices, wall, monkeypatch
):
    """The card leaves right after the load landed, before it recorded the action's number:
    the same validator records it when it settles its open intent at the next tap, so a
    second device that still lists the action does not load it again."""
    action = {"action_id": "web-8", "card_number": FULL.number, "kind": "topup",
              "amount": TOPUP, "valid_until": FAR_FUTURE_MS, "card_seq": 1}
    first, second = devices(FRONT), devices(OTHER_LINE)
    for dev in (first, second):
        dev.db.actions.replace_all(1, [action])
    card = make_card(FULL)
    real_record = Purse.record_action

    def torn(self, snap, card_seq):
        raise NoResponseError("card removed (test)")

    monkeypatch.setattr(Purse, "record_action", torn)
    out = first.tap(card)
    assert not out.accepted
    landed = read(card)
    assert landed.balance == FULL.balance + TOPUP and landed.identity.actions_applied == 0
    assert len(first.db.journal.open_intents()) == 1
    monkeypatch.setattr(Purse, "record_action", real_record)
    wall.advance(120)
    out = first.tap(card)
    assert out.accepted, out.note
    assert read(card).identity.actions_applied == 1
    assert first.db.journal.open_intents() == []
    wall.advance(20 * 60)
    out = second.tap(card)
    assert out.accepted, out.note
    assert [r for r in second.journal() if r.kind == KIND_ACTION_APPLIED] == []
    assert read(card).balance == FULL.balance + TOPUP - FULL_FARE - out.fare


@pytest.mark.parametrize("landed", [True, False], ids=["written", "not-written"])
def test_a_torn_online_pass_load_is_settled_from_the_pass_block(front, wall, monkeypatch,
                                                                   landed):
    """A pass load changes no counter: after a tear the pass block itself says whether it
    landed, and the action is applied exactly once either way."""
    front.db.actions.replace_all(1, [{
        "action_id": "pass-1", "card_number": FULL.number, "kind": "pass", "product_id": 1,
        "valid_until": FAR_FUTURE_MS}])
    card = make_card(FULL)
    real_write = Purse.write_pass

    def torn(self, block):
        if landed:
            real_write(self, block)
        raise NoResponseError("card removed (test)")

    monkeypatch.setattr(Purse, "write_pass", torn)
    out = front.tap(card)
    assert not out.accepted
    assert len(front.db.journal.open_intents()) == 1
    assert (read(card).pass_block is not None) == landed
    monkeypatch.setattr(Purse, "write_pass", real_write)
    wall.advance(120)
    out = front.tap(card)
    assert out.accepted, out.note
    assert front.db.journal.open_intents() == []
    snap = read(card)
    assert snap.pass_block is not None and snap.pass_block.product_id == 1
    applied = front.db.actions.applied_unreported()
    assert [a.action_id for a in applied] == ["pass-1"]
    outcomes = [r.outcome for r in front.journal()
                if r.kind == KIND_ACTION_APPLIED and r.phase == PHASE_DONE]
    assert outcomes == (["ok-late"] if landed else ["not-charged", "ok"])


# -- 6. key rotation: cards of an older card key version (issue 7) --------------------------

#: The device's key store after ``afc keys rotate classic-sector purse-mac``: version 1 (what
#: every card of :func:`make_card` was issued under) kept, version 2 current.
V2_SECTOR, V2_MAC = bytes(range(100, 116)), bytes(range(116, 132))
ROTATED = MemoryKeyStore({
    "classic-sector": {1: bytes(range(16)), 2: V2_SECTOR},
    "purse-mac": {1: bytes(range(16, 32)), 2: V2_MAC},
    "journal-mac": bytes(range(32, 48)),
})
#: The same current version, never rotated: the baseline a rotated store must cost no more than.
ONLY_V2 = MemoryKeyStore({
    "classic-sector": {2: V2_SECTOR},
    "purse-mac": {2: V2_MAC},
    "journal-mac": bytes(range(32, 48)),
})
#: Three versions held, 3 current.
THREE = MemoryKeyStore({
    "classic-sector": {1: bytes(range(16)), 2: V2_SECTOR, 3: bytes(range(200, 216))},
    "purse-mac": {1: bytes(range(16, 32)), 2: V2_MAC, 3: bytes(range(216, 232))},
    "journal-mac": bytes(range(32, 48)),
})
FULL_V2 = CardSpec(2001, CardType.FULL, 10_000, seed=21)
_issued_v2: dict[CardSpec, tuple[bytes, bytes]] = {}


def make_v2_card(spec: CardSpec) -> VirtualCard:
    """A card issued after the rotation: version 2 keys, and its identity says so."""
    if spec not in _issued_v2:
        card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(spec.seed))
        Purse(_reader(card), ROTATED, key_type="B").issue(
            Identity(spec.number, spec.card_type.code, 1, NOW - 30 * DAY, spec.expires,
                     spec.discount_until, 2, b"HOLDER02"),
            balance=spec.balance,
        )
        _issued_v2[spec] = (card.uid, bytes(card.memory))
    uid, memory = _issued_v2[spec]
    return VirtualCard(uid, memory, rng=random.Random(spec.seed + 1000))


class CountingKeyStore(KeyStore):
    """A key store that counts the per-card key derivations asked of it."""

    def __init__(self, base: KeyStore) -> None:
        self.base = base
        self.derivations = 0

    def names(self) -> list[str]:
        return self.base.names()

    def versions(self, name: str) -> list[int]:
        return self.base.versions(name)

    def current_version(self, name: str) -> int:
        return self.base.current_version(name)

    def diversify(self, name, uid, aid, system_id, *, key_version=None) -> bytes:
        self.derivations += 1
        return self.base.diversify(name, uid, aid, system_id, key_version=key_version)

    def cmac(self, name, data, *, key_version=None) -> bytes:
        return self.base.cmac(name, data, key_version=key_version)


def test_a_card_of_the_previous_key_version_rides_and_loads_under_its_own_version(
        tmp_path, wall):
    dev = Device(FRONT, tmp_path / "rotated.db", wall, keys=ROTATED)
    try:
        card = make_card(FULL)  # issued under version 1, before the rotation
        _setup_topup(dev.db)  # an online load waiting: key B of version 1 as well
        out = dev.tap(card)
        assert out.accepted and out.key_version == 1, out.note
        assert (out.fare, out.balance) == (FULL_FARE, FULL.balance + TOPUP - FULL_FARE)
        snap = read(card)  # with version 1 alone
        assert snap.state is PurseState.CONSISTENT and snap.identity.key_version == 1
        assert (snap.balance, snap.counter) == (FULL.balance + TOPUP - FULL_FARE, 2)
        # written back under version 1: the current version still does not open it
        with pytest.raises(AuthenticationError):
            Purse(_reader(card), ROTATED).read()
        assert dev.v.keys is ROTATED, "the pinned view lasts one tap"
        assert dev.db.journal.verify() == [] and dev.db.journal.open_intents() == []
        assert [a.action_id for a in dev.db.actions.applied_unreported()] == ["a1"]
        wall.advance(3600)
        again = dev.tap(card)
        assert again.accepted and again.key_version == 1
        assert read(card).balance == FULL.balance + TOPUP - 2 * FULL_FARE
        # a card issued after the rotation: the current version, nothing tried besides
        new = make_v2_card(FULL_V2)
        out = dev.tap(new)
        assert out.accepted and out.key_version is None, out.note
        assert Purse(_reader(new), ROTATED).read().balance == FULL_V2.balance - FULL_FARE
    finally:
        dev.db.close()


@pytest.mark.parametrize("scenario", ["ride", "topup"])
def test_a_torn_update_of_an_old_version_card_is_settled_under_that_version(tmp_path,
                                                                            scenario):
    """The tear proof of section 3 for a card read under an older version: repair, settling
    and the re-tap's write all use the card's own version, never the current one."""
    before_write, write_frames = _write_phase(tmp_path, scenario, ROTATED)
    interrupted = 0
    for k in range(1, write_frames + 1):
        wall = Wall()
        dev = Device(FRONT, tmp_path / f"old-{scenario}-{k}.db", wall, keys=ROTATED)
        try:
            if SCENARIOS[scenario]:
                SCENARIOS[scenario](dev.db)
            card = make_card(FULL)
            card.faults.tear_after(before_write + k)
            out = dev.tap(card)
            assert card.counters.tears == 1, f"k={k}: the tear did not fire"
            card.faults.clear()
            torn = read(card)  # version 1 alone: old or new, nothing between
            assert torn.purse in ({10_000, 15_000, 12_750} if scenario == "topup"
                                  else {10_000, 10_000 - FULL_FARE}), k
            ride_moved = torn.purse in {10_000 - FULL_FARE, 12_750}
            assert bool(dev.db.journal.open_intents()) == bool(out.note), k
            interrupted += bool(out.note)
            dev.restart()
            wall.advance(120)
            again = dev.tap(card)
            assert again.accepted and again.key_version == 1, (k, again)
            _check_after_retap(dev, card, scenario, 1 + ride_moved)
            with pytest.raises(AuthenticationError):
                Purse(_reader(card), ROTATED).read()
        finally:
            dev.db.close()
    assert interrupted == write_frames - 1, "every tear but the last frame's interrupts"


def test_rotation_costs_a_card_of_the_current_version_nothing(tmp_path, wall):
    """The tap of a card the current version opens is the same tap whether older versions
    are held or not: the same frames on the air, the same key derivations."""
    cost = {}
    for name, keys in (("never rotated", ONLY_V2), ("rotated", ROTATED)):
        counting = CountingKeyStore(keys)
        dev = Device(FRONT, tmp_path / f"{name}.db", wall, keys=counting)
        try:
            card = make_v2_card(FULL_V2)
            before = card.counters.frames
            out = dev.tap(card)
            assert out.accepted and out.key_version is None, out.note
            cost[name] = (card.counters.frames - before, counting.derivations)
        finally:
            dev.db.close()
    assert cost["rotated"] == cost["never rotated"]


def test_a_foreign_card_costs_one_authentication_per_version_held(tmp_path, wall):
    """Bounded: a card no version opens is tried once per version held, each try on a
    freshly activated card; with one version held there is no second try at all."""
    frames = {}
    for keys in (KEYS, THREE):
        dev = Device(FRONT, tmp_path / f"v{len(keys.versions('classic-sector'))}.db", wall,
                     keys=keys)
        try:
            card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(77))
            selection = _selection_frames(card)
            before = card.counters.frames
            out = dev.tap(card)
            assert out.note == "not our card" and not out.accepted
            assert dev.shown == ("Geçersiz kart", "Invalid card", Signal.REJECT)
            frames[len(keys.versions("classic-sector"))] = card.counters.frames - before
        finally:
            dev.db.close()
    one_try = frames[1] - selection
    assert one_try == 2, "AUTH, then the reader's answer the card ignores"
    # three versions: the first try, then two more, each after a new activation
    assert frames[3] == 3 * (selection + one_try)


def test_an_old_version_card_counts_once_against_the_auth_limiter(tmp_path, wall):
    """Trying the older versions is not an authentication failure: a rider with an old
    card taps as often as anybody without being rate-limited."""
    dev = Device(FRONT, tmp_path / "limiter.db", wall, keys=THREE)
    try:
        card = make_card(FULL)
        for _ in range(8):  # more than the limiter's failures per minute
            out = dev.tap(card)
            assert out.key_version == 1 and out.note != "rate-limited", out
            wall.advance(5)
    finally:
        dev.db.close()


def test_a_card_pulled_between_two_key_versions_is_tap_again(tmp_path, wall):
    dev = Device(FRONT, tmp_path / "pulled.db", wall, keys=ROTATED)
    try:
        card = make_card(FULL)
        selection = _selection_frames(card)
        card.faults.tear_after(selection + 2)  # gone after the failed version-2 AUTH
        out = dev.tap(card)
        assert not out.accepted and out.note.startswith("read failed"), out
        assert dev.shown == ("Tekrar okutun", "Tap again", Signal.REJECT)
        assert [r for r in dev.journal()] == []
        card.faults.clear()
        out = dev.tap(card)
        assert out.accepted and out.key_version == 1, out.note
    finally:
        dev.db.close()


def test_reactivation_refuses_another_card_in_place_of_the_one_tapped():
    """Between two key versions the card is selected again: if another card answers (the
    rider swapped cards), the tap stops rather than reading one card and writing another."""
    first, second = make_card(FULL), make_card(STUDENT)
    air = Field([first])
    air.reset()
    selected = select_card(air.transceive)
    reader = ClassicReader(air.transceive, selected.uid, nonce=lambda: 1)
    with pytest.raises(AuthenticationError):  # a wrong key: the card drops out of the session
        reader.authenticate(4, bytes(6), "A")
    assert reactivate(reader) is reader  # the same card: the same reader, session forgotten
    Purse(reader, KEYS).read()  # and it reads
    with pytest.raises(AuthenticationError):
        reader.authenticate(4, bytes(6), "A")
    air.cards[:] = [second]
    second.place()
    with pytest.raises(NoResponseError, match="another card answered"):
        reactivate(reader)
    air.cards[:] = []
    with pytest.raises(NoResponseError):
        reactivate(reader)

    class Opaque:
        uid = first.uid

    with pytest.raises(CoreError, match="cannot activate a card again"):
        reactivate(Opaque())
