"""The bayi (dealer) top-up terminal, in process: a virtual card in an RF field, a real device
database, and a credit allowance signed with an Ed25519 key made here (the "center").

What is pinned down:

* a load moves exactly the amount onto the card (checked by a fresh key-A read, as a
  validator would see it), journals intent + done, and prints a receipt that never shows the
  full UID;
* every refusal (allowance missing, forged, out of date or for another terminal; credit,
  daily limit or card maximum exceeded; blocked card; non-positive amount) leaves the card
  and the journal byte for byte as they were;
* a monthly pass is priced by the card's rider category (a discount that does not cover the
  whole pass pays full price) and its price comes out of the credit;
* a torn top-up leaves its intent open and the card at exactly the old or the new balance;
  while the intent is open its amount stays *reserved* against the credit (a dealer who
  pulls the card mid-write cannot sell value the credit never sees), and when the card is
  next presented the terminal settles the intent from the card itself: ``ok-late`` (counted)
  if the top-up is on the card, ``not-charged`` (released) if it is not;
* every top-up and pass sale record (intent, done, the done that settles a torn one) names the
  allowance it drew on in ``action_id`` (``credit:<allowance_id>``) under the journal MAC, and
  a ``not-charged`` settlement gives the credit back to that allowance, not to a newer one.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.apps.cards import FieldCardSource
from firmware.apps.topup import (
    ALLOWANCE_ID_MAX,
    CreditAllowance,
    TopupRefused,
    TopupTerminal,
    allowance_id_of,
    allowance_ref,
)
from firmware.apps.ui import RecordingUi, Signal
from firmware.core import classic_layout as layout
from firmware.core import tariffs
from firmware.core.anticollision import Field, masked_uid
from firmware.core.card_layout import Identity, PassBlock
from firmware.core.errors import AuthenticationError, CoreError
from firmware.core.fares import TripRecord
from firmware.core.keys import KeyStore, MemoryKeyStore
from firmware.core.purse import PRODUCT_PASS, PRODUCT_TOPUP, Purse, PurseState, purse_delta
from firmware.stores.database import DeviceDatabase
from firmware.stores.journal import KIND_TOPUP
from simulators.cards import VirtualCard

NOW = 1_767_258_000  # 2026-01-01 09:00 UTC = 12:00 in Konya (Türkiye is UTC+3 all year)
DAY = 86_400
LOCAL_MIDNIGHT_JAN_2 = NOW + 12 * 3600  # 2026-01-01 21:00 UTC
KEYS = MemoryKeyStore({
    "classic-sector": bytes(range(16)),
    "purse-mac": bytes(range(16, 32)),
    "journal-mac": bytes(range(32, 48)),
})
TABLE = tariffs.load("konya-2025")
CENTER = Ed25519PrivateKey.generate()
CENTER_KEY = CENTER.public_key()
DEALER = "bayi-017"
TERMINAL_ID = 9017
FULL, STUDENT, TEACHER = 1, 2, 3  # card type codes (fares.CardType.code)
PASS_MONTHLY = 1  # product_code of the Konya "abonman"
REF = "credit:A-2026-001"  # what the records of a sale under the default allowance name


def allowance(amount: int = 1_000_000, *, valid_from: int = NOW - DAY,
              valid_until: int = NOW + 30 * DAY, signer: Ed25519PrivateKey = CENTER,
              dealer_id: str = DEALER, allowance_id: str = "A-2026-001") -> CreditAllowance:
    unsigned = CreditAllowance(dealer_id, allowance_id, amount, valid_from, valid_until, b"")
    return replace(unsigned, signature=signer.sign(unsigned.signed_bytes()))


class Bayi:
    """One dealer terminal with one customer card lying on its reader."""

    def __init__(self, tmp_path, *, balance: int = 10_000, card_type: int = FULL,
                 discount_until: int | None = None, seed: int = 1,
                 allowance: CreditAllowance | None = None, daily_limit: int = 5_000_000,
                 center_key=CENTER_KEY, card_number: int = 4_200_001,
                 keys: KeyStore = KEYS, issued_under: tuple[KeyStore, int] = (KEYS, 1)
                 ) -> None:
        self.keys = keys  # the terminal's key store
        self.card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
        self.field = Field([self.card])
        self.rng = random.Random(seed + 1000)
        self.source = FieldCardSource(self.field, nonce=lambda: self.rng.getrandbits(32))
        self.card_number = card_number
        office, key_version = issued_under  # the office's store and its card key version
        Purse(self.access(), office, key_type="B").issue(
            Identity(card_number, card_type, 1, NOW - 30 * DAY, NOW + 3650 * DAY,
                     discount_until, key_version, b"HOLDER01"),
            balance=balance,
        )
        self.db_path = tmp_path / "bayi.db"
        self.ui = RecordingUi()
        self._allowance, self._center_key, self._daily_limit = allowance, center_key, daily_limit
        self.open()

    def open(self) -> None:
        self.db = DeviceDatabase.open(self.db_path, device_id=DEALER, journal_key=self.keys)
        self.terminal = TopupTerminal(
            TERMINAL_ID, self.db, self.keys, TABLE, self.ui, allowance=self._allowance,
            center_key=self._center_key, daily_limit=self._daily_limit,
        )

    def reopen(self) -> None:
        """The terminal restarts (power cut, update): a new process opens the same file."""
        self.db.close()
        self.open()

    def access(self):
        access = self.source.next_card()
        assert access is not None
        return access

    def load(self, amount: int, now: int = NOW):
        return self.terminal.load(self.access(), amount, now)

    def sell_pass(self, product: int = PASS_MONTHLY, now: int = NOW):
        return self.terminal.sell_pass(self.access(), product, now)

    def read(self):
        """What a validator (key A) reads from the card now."""
        return Purse(self.access(), KEYS, key_type="A").read()

    def records(self):
        return self.db.journal.records(0, 1000)

    def state(self) -> tuple[bytes, int]:
        return bytes(self.card.memory), self.db.journal.last_seq

    def refused(self, action, match: str) -> TopupRefused:
        """``action()`` is refused with ``match`` and changes neither the card nor the journal."""
        before = self.state()
        with pytest.raises(TopupRefused, match=match) as info:
            action()
        assert self.state() == before
        return info.value


@pytest.fixture
def utc_host(monkeypatch):
    """Run as a device whose system clock zone is UTC (the usual embedded Linux default)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- the happy path ----------------------------------------------------------------------------


def test_load_adds_the_amount_journals_it_and_prints_a_receipt(tmp_path, utc_host):
    bayi = Bayi(tmp_path, balance=10_000, allowance=allowance(1_000_000))
    receipt = bayi.load(5_000)

    snap = bayi.read()
    assert (snap.balance, snap.purse, snap.backup, snap.counter) == (15_000, 15_000, 15_000, 1)
    assert snap.state is PurseState.CONSISTENT
    assert purse_delta(snap.newest_trip) == 5_000
    assert snap.newest_trip.validator_id == TERMINAL_ID and snap.newest_trip.time == NOW

    intent, done = bayi.records()
    assert (intent.phase, intent.kind, intent.card_number, intent.uid) == (
        "intent", KIND_TOPUP, bayi.card_number, bayi.card.uid)
    assert (intent.balance_before, intent.balance_after, intent.fare, intent.product) == (
        10_000, 15_000, 5_000, PRODUCT_TOPUP)
    assert (intent.counter_before, intent.counter_after, intent.validator_id) == (
        0, 1, str(TERMINAL_ID))
    assert intent.time == NOW * 1000
    assert (intent.action_id, done.action_id) == (REF, REF)  # the allowance it drew on
    assert (done.phase, done.link, done.outcome, done.kind) == ("done", intent.seq, "ok",
                                                                 KIND_TOPUP)
    assert (done.balance_before, done.balance_after, done.counter_after, done.fare) == (
        10_000, 15_000, 1, 5_000)
    assert bayi.db.journal.open_intents() == [] and bayi.db.journal.verify() == []

    assert (receipt.kind, receipt.amount, receipt.balance_after, receipt.journal_seq) == (
        "topup", 5_000, 15_000, intent.seq)
    text = receipt.text()
    assert str(bayi.card_number) in text
    assert "50,00 TL" in text and "150,00 TL" in text
    assert f"İşlem no / Ref  {intent.seq}" in text
    assert masked_uid(bayi.card.uid) in text
    uid_hex = bayi.card.uid.hex()
    assert uid_hex not in text.lower() and uid_hex[:4] not in text.lower()
    # the receipt shows Konya's time whatever the host's zone (12:00 local = 09:00 UTC)
    assert "01.01.2026 12:00" in text and "Terminal 9017" in text

    assert bayi.terminal.credit_left(NOW) == 1_000_000 - 5_000
    assert bayi.ui.last[2] is Signal.OK and "50,00 TL" in bayi.ui.last[0]


def test_credit_allowance_survives_a_json_round_trip():
    a = allowance(123_45)
    again = CreditAllowance.from_json(a.to_json())
    assert again == a
    again.verify(CENTER.public_key())
    with pytest.raises(TopupRefused, match="malformed"):
        CreditAllowance.from_json('{"dealer_id": "x"}')


# -- refusals: card and journal untouched ------------------------------------------------------


def test_refused_without_an_allowance(tmp_path):
    bayi = Bayi(tmp_path, allowance=None)
    bayi.refused(lambda: bayi.load(5_000), "no credit allowance")
    bayi.refused(lambda: bayi.sell_pass(), "no credit allowance")
    with pytest.raises(TopupRefused, match="no credit allowance"):
        bayi.terminal.credit_left(NOW)


def test_the_allowance_the_agent_synced_is_used_from_the_next_sale(tmp_path):
    bayi = Bayi(tmp_path, allowance=None)
    bayi.refused(lambda: bayi.load(5_000), "no credit allowance")
    # what the agent does with a verified ``credit`` bundle (edge_agent.config_sync)
    bayi.db.config.put("credit", 3, allowance(20_000, allowance_id="A-2026-002").to_json().encode())
    bayi.load(5_000)
    assert bayi.terminal.credit_left(NOW) == 15_000
    # a bigger allowance replaces it; a forged one is refused at the sale, as from a file
    bayi.db.config.put("credit", 4, allowance(50_000, allowance_id="A-2026-003").to_json().encode())
    assert bayi.terminal.credit_left(NOW) == 50_000
    forged = allowance(10**9, allowance_id="A-2026-004", signer=Ed25519PrivateKey.generate())
    bayi.db.config.put("credit", 5, forged.to_json().encode())
    bayi.refused(lambda: bayi.load(5_000), "not signed by the center")


def test_refused_without_a_pinned_center_key(tmp_path):
    bayi = Bayi(tmp_path, allowance=allowance(), center_key=None)
    bayi.refused(lambda: bayi.load(5_000), "no credit allowance")


def test_refused_when_the_allowance_is_signed_by_another_key(tmp_path):
    bayi = Bayi(tmp_path, allowance=allowance(signer=Ed25519PrivateKey.generate()))
    bayi.refused(lambda: bayi.load(5_000), "not signed by the center")


def test_refused_when_the_signed_allowance_was_edited(tmp_path):
    bayi = Bayi(tmp_path, allowance=replace(allowance(10_000), amount=10_000_000))
    bayi.refused(lambda: bayi.load(5_000), "not signed by the center")


def test_refused_when_the_allowance_is_for_another_dealer(tmp_path):
    """An allowance is the center's word for one terminal: copied onto a second terminal
    (each of which sums only its own journal) it would multiply the dealer's credit."""
    bayi = Bayi(tmp_path, allowance=allowance(dealer_id="bayi-018"))
    bayi.refused(lambda: bayi.load(5_000), "bayi-018")


@pytest.mark.parametrize("now", [NOW - 2 * DAY, NOW - DAY - 1, NOW + 30 * DAY,
                                 NOW + 31 * DAY])
def test_refused_when_the_allowance_is_not_valid_yet_or_any_more(tmp_path, now):
    bayi = Bayi(tmp_path, allowance=allowance(valid_from=NOW - DAY, valid_until=NOW + 30 * DAY))
    bayi.refused(lambda: bayi.load(5_000, now), "not valid now")


@pytest.mark.parametrize("now", [NOW - DAY, NOW + 30 * DAY - 1])
def test_the_allowance_window_includes_its_start_and_excludes_its_end(tmp_path, now):
    bayi = Bayi(tmp_path, allowance=allowance(valid_from=NOW - DAY, valid_until=NOW + 30 * DAY))
    bayi.load(5_000, now)
    assert bayi.read().balance == 15_000


def test_credit_is_used_up_by_earlier_loads_also_after_a_restart(tmp_path):
    bayi = Bayi(tmp_path, balance=0, allowance=allowance(10_000))
    bayi.load(6_000)
    assert bayi.terminal.credit_left(NOW) == 4_000
    err = bayi.refused(lambda: bayi.load(5_000, NOW + 60), "over the dealer's credit")
    assert "40,00 TL left" in str(err)

    bayi.reopen()  # the used credit is in the journal, not in memory
    assert bayi.terminal.credit_left(NOW + 120) == 4_000
    bayi.refused(lambda: bayi.load(4_001, NOW + 120), "over the dealer's credit")
    bayi.load(4_000, NOW + 180)
    assert bayi.terminal.credit_left(NOW + 240) == 0
    bayi.reopen()
    bayi.refused(lambda: bayi.load(1, NOW + 300), "0,00 TL left")
    assert bayi.read().balance == 10_000


def test_loads_before_the_allowance_window_do_not_use_it(tmp_path):
    bayi = Bayi(tmp_path, balance=0, allowance=allowance(10_000, valid_from=NOW - 10 * DAY,
                                                          valid_until=NOW - DAY))
    bayi.load(8_000, NOW - 2 * DAY)
    bayi._allowance = allowance(10_000, valid_from=NOW - DAY, allowance_id="A-2026-002")
    bayi.reopen()
    assert bayi.terminal.credit_left(NOW) == 10_000


def test_daily_limit_follows_the_local_day_in_turkiye(tmp_path):
    bayi = Bayi(tmp_path, balance=0, allowance=allowance(1_000_000), daily_limit=10_000)
    bayi.load(6_000, NOW)  # 12:00 local, 1 January
    err = bayi.refused(lambda: bayi.load(5_000, LOCAL_MIDNIGHT_JAN_2 - 1), "daily limit")
    assert "40,00 TL left today" in str(err)
    # 00:00 local on 2 January is still 1 January in UTC: a UTC day would refuse this
    bayi.load(5_000, LOCAL_MIDNIGHT_JAN_2)
    # 23:00 local on 2 January (20:00 UTC): the same local day, 50 TL already loaded
    late = LOCAL_MIDNIGHT_JAN_2 + 23 * 3600
    bayi.refused(lambda: bayi.load(6_000, late), "50,00 TL left today")
    bayi.load(5_000, late)
    bayi.refused(lambda: bayi.load(1, late + 60), "0,00 TL left today")
    assert bayi.read().balance == 16_000


def test_refused_above_the_cards_maximum_balance(tmp_path):
    assert TABLE.max_balance == 300_000
    bayi = Bayi(tmp_path, balance=290_000, allowance=allowance(1_000_000))
    err = bayi.refused(lambda: bayi.load(10_001), "maximum balance")
    assert "at most 100,00 TL" in str(err)
    bayi.load(10_000)
    assert bayi.read().balance == TABLE.max_balance
    bayi.refused(lambda: bayi.load(1, NOW + 60), "at most 0,00 TL")


def test_refused_for_a_blocked_card(tmp_path):
    bayi = Bayi(tmp_path, allowance=allowance())
    purse = Purse(bayi.access(), KEYS, key_type="A")
    purse.read()
    purse.block_card()  # a validator found it on the blacklist
    bayi.refused(lambda: bayi.load(5_000), "blocked")
    bayi.refused(lambda: bayi.sell_pass(), "blocked")
    assert bayi.read().balance == 10_000 and bayi.read().pass_block is None


@pytest.mark.parametrize("amount", [0, -1, -5_000])
def test_refused_for_a_non_positive_amount(tmp_path, amount):
    bayi = Bayi(tmp_path, allowance=allowance())
    bayi.refused(lambda: bayi.load(amount), "must be positive")


def test_refusals_leave_the_credit_untouched(tmp_path):
    bayi = Bayi(tmp_path, balance=290_000, allowance=allowance(50_000))
    bayi.refused(lambda: bayi.load(20_000), "maximum balance")
    bayi.refused(lambda: bayi.load(60_000), "over the dealer's credit")
    assert bayi.terminal.credit_left(NOW) == 50_000
    assert bayi.records() == []


# -- monthly pass ------------------------------------------------------------------------------


@pytest.mark.parametrize(("card_type", "price"), [(STUDENT, 35_000), (TEACHER, 35_000),
                                                   (FULL, 140_000)])
def test_pass_sale_at_the_category_price_is_taken_from_the_credit(tmp_path, card_type, price):
    bayi = Bayi(tmp_path, card_type=card_type, discount_until=NOW + 365 * DAY,
                allowance=allowance(1_000_000))
    receipt = bayi.sell_pass(PASS_MONTHLY, NOW + 1_234)

    snap = bayi.read()
    assert snap.pass_block == PassBlock(
        PASS_MONTHLY, NOW + 1_234, NOW + 1_234 + TABLE.pass_validity_days * DAY)
    assert TABLE.pass_validity_days == 30
    view = snap.view().pass_product
    assert view.is_valid_at(NOW + 1_234) and view.is_valid_at(NOW + 1_234 + 30 * DAY - 1)
    assert not view.is_valid_at(NOW + 1_234 + 30 * DAY) and not view.is_valid_at(NOW + 1_233)
    assert (snap.balance, snap.counter) == (10_000, 0)  # the purse is not touched

    assert (receipt.kind, receipt.amount, receipt.balance_after) == ("pass", price, 10_000)
    assert "Abonman / Pass" in receipt.text()
    intent, done = bayi.records()
    assert (intent.kind, intent.product, intent.fare, intent.card_number) == (
        KIND_TOPUP, PRODUCT_PASS, price, bayi.card_number)
    assert (done.link, done.outcome, done.fare) == (intent.seq, "ok", price)
    assert bayi.terminal.credit_left(NOW + 2_000) == 1_000_000 - price


@pytest.mark.parametrize("discount_until", [None, NOW - DAY, NOW + 10 * DAY])
def test_a_discount_that_does_not_cover_the_whole_pass_pays_full_price(tmp_path,
                                                                        discount_until):
    """docs/fares.md: "The top-up terminal should not sell a discounted pass that outlasts
    the discount" (the validator honours a pass to its end, whatever the discount)."""
    bayi = Bayi(tmp_path, card_type=STUDENT, discount_until=discount_until,
                allowance=allowance(1_000_000))
    assert bayi.sell_pass().amount == 140_000
    assert bayi.terminal.credit_left(NOW) == 1_000_000 - 140_000


def test_pass_price_counts_against_later_loads(tmp_path):
    bayi = Bayi(tmp_path, allowance=allowance(150_000))
    bayi.sell_pass()  # full price 1.400 TL
    assert bayi.terminal.credit_left(NOW) == 10_000
    bayi.refused(lambda: bayi.load(15_000, NOW + 60), "100,00 TL left")
    bayi.reopen()
    bayi.refused(lambda: bayi.sell_pass(now=NOW + 120), "over the dealer's credit")


def test_pass_sale_is_refused_over_the_credit_and_for_an_unknown_product(tmp_path):
    bayi = Bayi(tmp_path, allowance=allowance(139_999))
    bayi.refused(lambda: bayi.sell_pass(), "over the dealer's credit")
    bayi.refused(lambda: bayi.sell_pass(product=99), "no pass product 99")
    assert bayi.read().pass_block is None


def test_pass_sales_ignore_the_daily_limit_but_count_towards_it(tmp_path):
    """Pinned behaviour: a pass is checked against the credit only, but its price is part of
    the day's total that limits later loads."""
    bayi = Bayi(tmp_path, allowance=allowance(1_000_000), daily_limit=100_000)
    bayi.sell_pass()  # 1.400 TL, above the 1.000 TL daily limit
    bayi.refused(lambda: bayi.load(100, NOW + 60), "daily limit")


# -- tears -------------------------------------------------------------------------------------

AMOUNT = 5_000
ALLOWED = 100_000


def write_phase(tmp_path) -> range:
    """The frame numbers (counted from the arrival of the card) of a load's card writes."""
    bayi = Bayi(tmp_path / "probe", allowance=allowance(ALLOWED))
    counters = bayi.card.counters
    access = bayi.access()
    start = counters.frames
    Purse(access, KEYS, key_type="B").read()
    read = counters.frames - start
    access = bayi.access()
    start = counters.frames
    bayi.terminal.load(access, AMOUNT, NOW)
    total = counters.frames - start
    assert total - read >= 6
    return range(read + 1, total + 1)


def torn_load(bayi: Bayi, k: int, answer: bool) -> None:
    access = bayi.access()
    bayi.card.faults.tear_after(k, answer=answer)
    with pytest.raises(CoreError) as info:
        bayi.terminal.load(access, AMOUNT, NOW)
    assert not isinstance(info.value, TopupRefused)
    bayi.card.faults.clear()


def test_a_torn_top_up_reserves_its_credit_until_the_card_settles_it(tmp_path):
    (tmp_path / "probe").mkdir()
    phase = write_phase(tmp_path)
    outcomes, states = set(), set()
    for k in phase:
        for answer in (True, False):
            if answer and k == phase[-1]:
                continue  # the last ACK got out: a complete load, not a tear
            where = tmp_path / f"k{k}-{int(answer)}"
            where.mkdir()
            bayi = Bayi(where, balance=10_000, seed=k, allowance=allowance(ALLOWED))
            torn_load(bayi, k, answer)
            ctx = (k, answer)

            # the error left exactly one open intent, and its amount stays reserved
            (intent,) = bayi.records()
            assert bayi.db.journal.open_intents() == [intent], ctx
            assert (intent.fare, intent.counter_after, intent.action_id) == (AMOUNT, 1, REF), ctx
            assert bayi.terminal.credit_left(NOW) == ALLOWED - AMOUNT, ctx

            # the rider boards a bus: the validator (key A) repairs the card from itself
            purse = Purse(bayi.access(), KEYS, key_type="A")
            torn = purse.read()
            states.add(torn.state)
            repaired = purse.repair(torn)
            final = bayi.read()
            assert final.state in (PurseState.CONSISTENT, PurseState.GHOST_TRIP), ctx
            assert final.purse == final.backup == final.balance == repaired.balance, ctx
            assert (final.balance, final.counter) in ((10_000, 0), (15_000, 1)), ctx
            loaded = final.balance == 15_000
            outcomes.add(loaded)
            # the terminal has not seen the card again: still reserved, whatever happened
            assert bayi.db.journal.open_intents() == [intent], ctx
            assert bayi.terminal.credit_left(NOW + 30) == ALLOWED - AMOUNT, ctx

            # the customer comes back: the terminal settles the intent from the card first
            bayi.load(1_000, NOW + 60)
            assert bayi.db.journal.open_intents() == [], ctx
            settled = next(r for r in bayi.records() if r.link == intent.seq)
            assert settled.outcome == ("ok-late" if loaded else "not-charged"), ctx
            assert settled.action_id == REF, ctx  # the settling done names it too
            used = (AMOUNT if loaded else 0) + 1_000
            assert bayi.terminal.credit_left(NOW + 90) == ALLOWED - used, ctx
            assert bayi.read().balance == 10_000 + used, ctx
            assert bayi.db.journal.verify() == [], ctx
    assert outcomes == {True, False}  # both sides of the commit point were torn
    assert states == set(PurseState)  # and every state the protocol can leave was met


@pytest.mark.parametrize("answer", [True, False])
def test_the_terminal_itself_repairs_a_card_it_tore(tmp_path, answer):
    (tmp_path / "probe").mkdir()
    phase = write_phase(tmp_path)
    for k in phase if not answer else phase[:-1]:
        where = tmp_path / f"k{k}"
        where.mkdir()
        bayi = Bayi(where, balance=10_000, seed=k, allowance=allowance(ALLOWED))
        torn_load(bayi, k, answer)
        before = Purse(bayi.access(), KEYS, key_type="A").read()
        # the dealer tries again at once: roll forward (if the money moved), settle, load
        bayi.load(AMOUNT, NOW + 10)
        after = bayi.read()
        loaded = before.purse == 10_000 + AMOUNT  # the INCREMENT was transferred
        assert after.balance == 10_000 + AMOUNT * (2 if loaded else 1), (k, before.state)
        assert bayi.terminal.credit_left(NOW + 20) == ALLOWED - (after.balance - 10_000)
        assert bayi.db.journal.open_intents() == []


def test_an_open_intent_is_left_open_when_the_card_cannot_tell(tmp_path):
    """Two rides after the torn top-up push its trip entry out of the card's two-entry log:
    the terminal cannot tell whether it landed, so the credit stays reserved (the center
    settles it from the validators' journals)."""
    (tmp_path / "probe").mkdir()
    phase = write_phase(tmp_path)
    bayi = Bayi(tmp_path, balance=10_000, allowance=allowance(ALLOWED))
    torn_load(bayi, phase[-1], answer=False)  # the last ACK is lost: the money is on the card
    for i in range(2):
        purse = Purse(bayi.access(), KEYS, key_type="A")
        snap = purse.read()
        purse.apply(snap, TripRecord(0, NOW + 600 * (i + 1), 41, 421, 2250, 0, 0))
    bayi.load(1_000, NOW + 3_600)
    assert [(r.seq, r.action_id) for r in bayi.db.journal.open_intents()] == [(1, REF)]
    assert bayi.terminal.credit_left(NOW + 3_700) == ALLOWED - AMOUNT - 1_000


@pytest.mark.parametrize("commit", [True, False])
def test_a_torn_pass_sale_is_settled_from_the_pass_block(tmp_path, commit):
    bayi = Bayi(tmp_path, allowance=allowance(1_000_000))
    access = bayi.access()
    bayi.card.faults.tear_in_write(commit=commit)
    with pytest.raises(CoreError):
        bayi.terminal.sell_pass(access, PASS_MONTHLY, NOW)
    bayi.card.faults.clear()
    assert len(bayi.db.journal.open_intents()) == 1
    assert bayi.terminal.credit_left(NOW) == 1_000_000 - 140_000
    written = bayi.read().pass_block is not None
    assert written is commit
    (intent,) = bayi.db.journal.open_intents()
    assert (intent.product, intent.action_id) == (PRODUCT_PASS, REF)
    bayi.load(1_000, NOW + 60)
    assert bayi.db.journal.open_intents() == []
    assert bayi.terminal.credit_left(NOW + 60) == 1_000_000 - 1_000 - (
        140_000 if commit else 0)
    settled = next(r for r in bayi.records() if r.link == intent.seq)
    assert (settled.outcome, settled.action_id) == ("ok-late" if commit else "not-charged", REF)
    assert bayi.db.journal.verify() == []


# -- the allowance each record names (issue 7) -----------------------------------------------


def test_every_top_up_record_names_the_allowance_it_drew_on_under_the_mac(tmp_path):
    """Loads and pass sales name ``credit:<allowance_id>`` in intent and done; a newly synced
    allowance is named from the next sale on; the name is covered by the journal MAC."""
    bayi = Bayi(tmp_path, allowance=allowance(1_000_000))
    bayi.load(5_000)
    bayi.sell_pass(PASS_MONTHLY, NOW + 60)
    bayi.db.config.put("credit", 2, allowance(500_000, allowance_id="A-2026-002").to_json()
                       .encode())
    bayi.load(2_000, NOW + 120)
    records = bayi.records()
    assert [(r.phase, r.product, r.fare, r.action_id) for r in records] == [
        ("intent", PRODUCT_TOPUP, 5_000, REF), ("done", PRODUCT_TOPUP, 5_000, REF),
        ("intent", PRODUCT_PASS, 140_000, REF), ("done", PRODUCT_PASS, 140_000, REF),
        ("intent", PRODUCT_TOPUP, 2_000, "credit:A-2026-002"),
        ("done", PRODUCT_TOPUP, 2_000, "credit:A-2026-002")]
    assert [allowance_id_of(r.action_id) for r in records[::2]] == [
        "A-2026-001", "A-2026-001", "A-2026-002"]
    # the records name the allowance whose tally moved: each allowance's credit is its own
    assert bayi.db.journal.tally(REF) == 145_000
    assert bayi.terminal.credit_left(NOW + 180) == 500_000 - 2_000
    assert bayi.db.journal.verify() == []
    # pointing a record at another allowance behind the API breaks its MAC
    bayi.db.connection.execute("UPDATE journal SET action_id = 'credit:A-2026-002' "
                               "WHERE seq = 1")
    assert bayi.db.journal.verify() == [1]


def test_a_not_charged_settlement_gives_the_credit_back_to_the_allowance_it_names(tmp_path):
    """A load torn before the money moved, under allowance 001; the agent syncs 002 (which
    also covers the load's time) before the card comes back. The settlement names 001 and
    releases 001's credit: 002 gains nothing it did not issue."""
    (tmp_path / "probe").mkdir()
    phase = write_phase(tmp_path)
    bayi = Bayi(tmp_path, balance=10_000, allowance=allowance(ALLOWED))
    torn_load(bayi, phase[0], answer=False)  # the first write frame never got through
    assert bayi.read().balance == 10_000
    assert bayi.db.journal.tally(REF) == AMOUNT
    bayi.db.config.put("credit", 2, allowance(ALLOWED, allowance_id="A-2026-002").to_json()
                       .encode())
    bayi.load(1_000, NOW + 60)
    (intent, settled, load, _) = bayi.records()
    assert (settled.link, settled.outcome, settled.action_id) == (
        intent.seq, "not-charged", REF)
    assert load.action_id == "credit:A-2026-002"
    assert bayi.db.journal.tally(REF) == 0  # 001's reservation released
    assert bayi.terminal.credit_left(NOW + 60) == ALLOWED - 1_000  # 002: only its own load
    assert bayi.db.journal.verify() == []


def test_an_intent_of_older_software_is_settled_as_before(tmp_path):
    """An intent journaled without an allowance name (older software: only the tally knew
    it) settles ``not-charged`` naming none and releases the allowance in force at its
    time, as the terminal always did."""
    bayi = Bayi(tmp_path, balance=10_000, allowance=allowance(ALLOWED))
    bayi.db.journal.intent({
        "kind": KIND_TOPUP, "time": NOW * 1000, "card_number": bayi.card_number,
        "uid": bayi.card.uid, "counter_before": 0, "counter_after": 1, "balance_before": 10_000,
        "balance_after": 10_000 + AMOUNT, "fare": AMOUNT, "product": PRODUCT_TOPUP,
        "validator_id": str(TERMINAL_ID),
    }, tallies={"day:20454": AMOUNT, REF: AMOUNT})  # the old terminal's tallies
    assert bayi.terminal.credit_left(NOW) == ALLOWED - AMOUNT
    bayi.load(1_000, NOW + 60)  # the card never got it: counter 0 < 1
    (intent, settled, load, _) = bayi.records()
    assert (settled.outcome, settled.action_id, intent.action_id) == (
        "not-charged", None, None)
    assert load.action_id == REF
    assert bayi.terminal.credit_left(NOW + 60) == ALLOWED - 1_000
    assert bayi.db.journal.tally("day:20454") == 1_000


def test_an_allowance_id_the_journal_cannot_hold_is_refused(tmp_path):
    """``credit:`` + the id must fit the journal's 64-character ``action_id``: a longer id is
    refused with a message (card and journal untouched), the longest that fits loads."""
    assert ALLOWANCE_ID_MAX == 57
    longest = "A" * ALLOWANCE_ID_MAX
    assert allowance_ref(longest) == f"credit:{longest}"
    bayi = Bayi(tmp_path, allowance=allowance(allowance_id=longest + "X"))
    bayi.refused(lambda: bayi.load(5_000), "cannot be journaled: it must be 1 to 57")
    bayi.refused(lambda: bayi.sell_pass(), "cannot be journaled")
    for bad in ("", "A-1\n"):
        with pytest.raises(TopupRefused, match="printable"):
            allowance_ref(bad)
    (tmp_path / "ok").mkdir()
    fits = Bayi(tmp_path / "ok", allowance=allowance(allowance_id=longest))
    fits.load(5_000)
    assert [r.action_id for r in fits.records()] == [f"credit:{longest}"] * 2


# -- pruning the journal ----------------------------------------------------------------------


def test_pruning_acknowledged_records_does_not_give_credit_back(tmp_path):
    bayi = Bayi(tmp_path, balance=0, allowance=allowance(10_000))
    bayi.load(6_000)
    bayi.db.journal.mark_acked(bayi.db.journal.last_seq)
    bayi.db.journal.prune_acked()
    assert bayi.terminal.credit_left(NOW) == 4_000


# -- key rotation: cards issued before ``afc keys rotate`` (issue 7) ---------------------------

#: The terminal's store after ``afc keys rotate classic-sector purse-mac``: version 1 (every
#: card of :class:`Bayi` was issued under it) kept, version 2 current.
ROTATED = MemoryKeyStore({
    "classic-sector": {1: bytes(range(16)), 2: bytes(range(100, 116))},
    "purse-mac": {1: bytes(range(16, 32)), 2: bytes(range(116, 132))},
    "journal-mac": bytes(range(32, 48)),
})


def not_rekeyed(bayi: Bayi) -> None:
    """The card still opens under version 1 alone and not under the current version 2."""
    assert bayi.read().identity.key_version == 1
    with pytest.raises(AuthenticationError):
        Purse(bayi.access(), ROTATED, key_type="A").read()


def test_a_card_of_the_previous_key_version_is_loaded_under_its_own_version(tmp_path):
    bayi = Bayi(tmp_path, balance=10_000, allowance=allowance(1_000_000), keys=ROTATED)
    receipt = bayi.load(5_000)
    assert receipt.key_version == 1 and receipt.balance_after == 15_000
    assert "key" not in receipt.text().lower()  # nothing for the customer to see
    assert bayi.read().balance == 15_000
    not_rekeyed(bayi)
    receipt = bayi.sell_pass(PASS_MONTHLY, NOW + 60)
    assert receipt.key_version == 1 and bayi.read().pass_block.product_id == PASS_MONTHLY
    not_rekeyed(bayi)
    assert bayi.terminal.credit_left(NOW + 60) == 1_000_000 - 5_000 - receipt.amount
    assert bayi.db.journal.verify() == [] and bayi.db.journal.open_intents() == []
    # a card of the current version on the same terminal: nothing older is tried
    (tmp_path / "v2").mkdir()
    fresh = Bayi(tmp_path / "v2", balance=0, allowance=allowance(1_000_000), keys=ROTATED,
                 issued_under=(ROTATED, 2), seed=7)
    assert fresh.load(1_000).key_version is None
    assert Purse(fresh.access(), ROTATED).read().balance == 1_000


def test_a_torn_top_up_of_an_old_version_card_is_settled_under_that_version(tmp_path):
    """Tear the load at every frame of its card writes; the next load settles the intent
    from the card and writes under version 1 again."""
    (tmp_path / "probe").mkdir()
    probe = Bayi(tmp_path / "probe", allowance=allowance(ALLOWED), keys=ROTATED)
    access = probe.access()
    start = probe.card.counters.frames
    probe.terminal.load(access, AMOUNT, NOW)
    total = probe.card.counters.frames - start  # frames of a whole load, old-version card
    outcomes = set()
    for k in range(1, total):  # the last frame's ACK getting out is a complete load
        where = tmp_path / f"k{k}"
        where.mkdir()
        bayi = Bayi(where, balance=10_000, seed=k, allowance=allowance(ALLOWED), keys=ROTATED)
        access = bayi.access()
        bayi.card.faults.tear_after(k)
        with pytest.raises(CoreError):
            bayi.terminal.load(access, AMOUNT, NOW)
        bayi.card.faults.clear()
        intents = bayi.db.journal.open_intents()
        if not intents:
            continue  # torn while reading (before the intent): nothing to settle
        bayi.load(1_000, NOW + 60)
        assert bayi.db.journal.open_intents() == [], k
        settled = next(r for r in bayi.records() if r.link == intents[0].seq)
        loaded = settled.outcome == "ok-late"
        outcomes.add(settled.outcome)
        assert bayi.read().balance == 10_000 + 1_000 + (AMOUNT if loaded else 0), k
        assert bayi.terminal.credit_left(NOW + 90) == ALLOWED - 1_000 - (
            AMOUNT if loaded else 0), k
        not_rekeyed(bayi)
        assert bayi.db.journal.verify() == [], k
    assert outcomes == {"ok-late", "not-charged"}
