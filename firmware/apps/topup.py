"""The bayi (dealer) top-up terminal: load stored value or sell a monthly pass.

The dealer sells value the city has not been paid for yet, so every load is bounded by a
credit allowance the center issued and signed (Ed25519, checked against the pinned center
key), by a per-day limit, and by the card's maximum balance. What the dealer has used is
not a counter that could drift: it is the sum of the top-ups in the terminal's own journal,
whose records are MAC'd by the terminal and sequence-numbered for the center.

A top-up or pass sale torn mid-write leaves its journal intent open, and an open intent
counts as used: the dealer may have the customer's cash and the card may hold the value, so a
tear (accidental or deliberate) must not give the credit back. The next time the card is on
this terminal the intent is settled from the card itself: ``ok-late`` (it stays counted) when
the card shows the update, ``not-charged`` (the credit is released) when it shows it never
happened. When the card can no longer tell (its trip log moved on), the intent stays open and
the center settles it.

Every top-up intent names the allowance it drew on in the journal's ``action_id`` field, as
``credit:<allowance_id>`` (:func:`allowance_ref`, the same text as the allowance's tally), and
its done record carries it too (``Journal.done`` copies it from the intent). The center checks
each named top-up against that very allowance (``simulators/center/dealer.py``) instead of
guessing it from the time. ``action_id`` means an action-list entry only on
``action-applied`` records (the validator's online loads); a ``topup`` record never applies
an action, and the prefix keeps the two apart. Settling ``not-charged`` gives the credit back
to the allowance the intent names, even if a newer allowance is in force by then.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.core.anticollision import masked_uid
from firmware.core.card_layout import PassBlock
from firmware.core.errors import AuthenticationError, CoreError
from firmware.core.fares import FareTable
from firmware.core.keys import KeyStore
from firmware.core.mifare import ClassicAccess
from firmware.core.purse import (
    PRODUCT_PASS,
    PRODUCT_TOPUP,
    CardSnapshot,
    Purse,
    PurseState,
    product_of,
    purse_delta,
    topup_trip,
)
from firmware.stores.journal import KIND_TOPUP, JournalRecord

from .card_keys import OlderCardKeys, key_version_of
from .ui import Signal, Ui
from .validator import tl

log = logging.getLogger("afc.topup")

LOCAL_TZ_NAME = "Europe/Istanbul"
#: Outcome of the done record that settles an open intent whose write never reached the card.
NOT_CHARGED = "not-charged"
#: How a top-up record's ``action_id`` (and the allowance's journal tally) names an allowance.
ALLOWANCE_REF_PREFIX = "credit:"
#: The longest text a journal record's ``action_id`` and a tally name may hold.
_REF_MAX = 64
#: The longest allowance id that still fits: ``credit:`` + id within :data:`_REF_MAX`.
ALLOWANCE_ID_MAX = _REF_MAX - len(ALLOWANCE_REF_PREFIX)


class TopupRefused(CoreError):
    """A top-up the terminal must not do: over the credit, the day's limit or the card's
    maximum balance, or an invalid allowance. The message is shown to the dealer."""


def allowance_ref(allowance_id: str) -> str:
    """The ``action_id`` of a top-up record (and the name of the journal tally) for the
    allowance ``allowance_id``: ``credit:<allowance_id>``.

    Refused (:class:`TopupRefused`) when the journal could not store it: an id longer than
    :data:`ALLOWANCE_ID_MAX` characters or with characters that are not printable. Such an
    allowance cannot be journaled, so the terminal cannot load against it and the center
    does not issue it."""
    ref = f"{ALLOWANCE_REF_PREFIX}{allowance_id}"
    if not allowance_id or len(ref) > _REF_MAX or not ref.isprintable():
        raise TopupRefused(
            f"credit allowance id {allowance_id!r:.80} cannot be journaled: it must be 1 to "
            f"{ALLOWANCE_ID_MAX} printable characters (ask the center for an allowance with "
            "a shorter id)"
        )
    return ref


def allowance_id_of(action_id: str | None) -> str | None:
    """The allowance id a top-up record's ``action_id`` names, or None when it names none
    (a terminal of older software) or is not an allowance reference."""
    if action_id is None or not action_id.startswith(ALLOWANCE_REF_PREFIX):
        return None
    return action_id[len(ALLOWANCE_REF_PREFIX):] or None


@dataclass(frozen=True)
class CreditAllowance:
    """A center-issued, signed allowance: ``amount`` kuruş of loads until ``valid_until``."""

    dealer_id: str
    allowance_id: str
    amount: int
    valid_from: int  # unix seconds
    valid_until: int
    signature: bytes

    def signed_bytes(self) -> bytes:
        body = {"dealer_id": self.dealer_id, "allowance_id": self.allowance_id,
                "amount": self.amount, "valid_from": self.valid_from,
                "valid_until": self.valid_until}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def verify(self, center_key: Ed25519PublicKey) -> None:
        try:
            center_key.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise TopupRefused(
                f"credit allowance {self.allowance_id} is not signed by the center"
            ) from None

    def check_usable(self, center_key: Ed25519PublicKey) -> None:
        """Everything a terminal needs of an allowance before it can load against it: the
        center's signature, a validity that ends after it starts, an amount >= 0, and an
        id the journal can name in every top-up record (:func:`allowance_ref`). The one
        check the center runs before recording an allowance it issued and ``afc bundle``
        runs before signing one; :class:`TopupRefused` says which part fails."""
        self.verify(center_key)
        if self.valid_until <= self.valid_from or self.amount < 0:
            raise TopupRefused(f"credit allowance {self.allowance_id}: amount must be >= 0 "
                               "and valid_until after valid_from")
        allowance_ref(self.allowance_id)

    @classmethod
    def from_json(cls, text: str) -> CreditAllowance:
        try:
            data = json.loads(text)
            return cls(str(data["dealer_id"]), str(data["allowance_id"]), int(data["amount"]),
                       int(data["valid_from"]), int(data["valid_until"]),
                       bytes.fromhex(data["signature"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise TopupRefused(f"credit allowance file is malformed: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps({**json.loads(self.signed_bytes()), "signature": self.signature.hex()})


@dataclass
class Receipt:
    terminal_id: int
    card_number: int
    uid: bytes
    kind: str  # "topup" | "pass"
    amount: int
    balance_after: int
    journal_seq: int
    time: int
    #: the card key version the card was read and written with, when older than the key
    #: store's current one (a card issued before ``afc keys rotate``); None: the current
    #: one. For the terminal's log and the tests: the customer's receipt does not show it.
    key_version: int | None = None

    def text(self) -> str:
        # Konya's time, whatever zone the terminal's OS is set to
        when = datetime.fromtimestamp(self.time, ZoneInfo(LOCAL_TZ_NAME)).strftime(
            "%d.%m.%Y %H:%M")
        what = (f"Yükleme / Top-up  {tl(self.amount)}" if self.kind == "topup"
                else f"Abonman / Pass   {tl(self.amount)}")
        return "\n".join([
            "KONYAKART - BAYİ YÜKLEME",
            f"Terminal {self.terminal_id}   {when}",
            f"Kart / Card  {self.card_number}  ({masked_uid(self.uid)})",
            what,
            f"Bakiye / Balance  {tl(self.balance_after)}",
            f"İşlem no / Ref  {self.journal_seq}",
        ])


class TopupTerminal:
    def __init__(
        self,
        terminal_id: int,
        db,
        keys: KeyStore,
        table: FareTable,
        ui: Ui,
        *,
        allowance: CreditAllowance | None,
        center_key: Ed25519PublicKey | None,
        daily_limit: int = 5_000_000,
    ) -> None:
        self.terminal_id = terminal_id
        self.db = db
        self.keys = keys
        self.table = table
        self.ui = ui
        self._allowance = allowance
        self._allowance_version = 0
        self.center_key = center_key
        self.daily_limit = daily_limit

    @property
    def allowance(self) -> CreditAllowance | None:
        """The allowance in force: the newest one the agent synced into the device database
        (a ``credit`` bundle), else the one given at start (a file, for a terminal without
        an agent). Read at each use, so a new allowance applies from the next sale on."""
        try:
            entry = self.db.config.get("credit")
        except (AttributeError, CoreError):
            entry = None
        if entry is not None and entry.version != self._allowance_version:
            self._allowance = CreditAllowance.from_json(bytes(entry.body).decode())
            self._allowance_version = entry.version
        return self._allowance

    def _credit_ref(self, when: int) -> str | None:
        """``credit:<allowance_id>`` of the allowance in force at ``when``, or None when none
        covers it (or its id cannot be journaled: then nothing was ever tallied under it)."""
        a = self.allowance
        if a is None or not a.valid_from <= when < a.valid_until:
            return None
        try:
            return allowance_ref(a.allowance_id)
        except TopupRefused:
            return None

    def _tallies(self, amount: int, when: int, credit_ref: str | None) -> dict[str, int]:
        """The running totals a sale at ``when`` moves: the local day and, given its
        ``credit_ref``, the allowance it drew on. Kept in the journal's own transactions, so
        they survive the agent pruning acknowledged records; an open intent counts until
        settled."""
        tallies = {self._day_key(when): amount}
        if credit_ref is not None:
            tallies[credit_ref] = amount
        return tallies

    @staticmethod
    def _day_key(when: int) -> str:
        local = when + 3 * 3600  # Türkiye is UTC+3 all year
        return f"day:{local // 86400}"

    def credit_left(self, now: int) -> int:
        """Kuruş of credit left at ``now``; refused when no usable allowance is in force."""
        return self._credit(now)[0]

    def _credit(self, now: int) -> tuple[int, str]:
        """The credit left at ``now`` and the ``credit:<allowance_id>`` it is left on: one
        read of the allowance, so the allowance a sale is checked against is the one its
        records name (the agent may sync a new one at any moment)."""
        a = self.allowance
        if a is None or self.center_key is None:
            raise TopupRefused("no credit allowance from the center: top-ups are disabled")
        a.verify(self.center_key)
        if a.dealer_id != self.db.device_id:
            raise TopupRefused(
                f"credit allowance {a.allowance_id} is for dealer {a.dealer_id}, "
                f"not for this terminal ({self.db.device_id})"
            )
        if not a.valid_from <= now < a.valid_until:
            raise TopupRefused(f"credit allowance {a.allowance_id} is not valid now")
        ref = allowance_ref(a.allowance_id)
        return a.amount - self.db.journal.tally(ref), ref

    def _check(self, amount: int, balance: int, now: int) -> str:
        """Refuse a load the credit, the day or the card cannot take; returns the
        ``credit:<allowance_id>`` it draws on."""
        if amount <= 0:
            raise TopupRefused("the amount must be positive")
        left, ref = self._credit(now)
        if amount > left:
            raise TopupRefused(f"over the dealer's credit: {tl(left)} left")
        today = self.db.journal.tally(self._day_key(now))
        if today + amount > self.daily_limit:
            raise TopupRefused(
                f"over the daily limit: {tl(max(0, self.daily_limit - today))} left today"
            )
        room = self.table.top_up_room(balance)
        if amount > room:
            raise TopupRefused(f"over the card's maximum balance: at most {tl(room)}")
        return ref

    def _card(self, access: ClassicAccess, now: int) -> tuple[Purse, CardSnapshot]:
        """Read the card (key B), finish an interrupted update, settle this terminal's open
        intents for it; a blocked card is refused.

        A card the store's current card keys do not open is tried with the older versions
        the store holds (a card issued before ``afc keys rotate``), and the purse returned
        then writes under the version it was read with: the card is never re-keyed here."""
        purse = Purse(access, self.keys, key_type="B")
        try:
            snap = purse.read()
        except AuthenticationError:
            purse = OlderCardKeys.of(self.keys).open(purse)
            snap = purse.read()
            log.info("topup %s: card uid=%s read under card key version %d (not the current "
                     "one): written back under it", self.db.device_id, masked_uid(purse.uid),
                     key_version_of(purse))
        if snap.state not in (PurseState.CONSISTENT, PurseState.GHOST_TRIP):
            snap = purse.repair(snap)
        self._settle(snap, now)
        if snap.blocked:
            raise TopupRefused("the card is blocked: send the holder to the KONYAKART office")
        if self.db.blacklist.lookup(snap.identity.card_number) is not None:
            raise TopupRefused("the card is on the blacklist: no loads (KONYAKART office)")
        if snap.identity.expires <= now:
            raise TopupRefused("the card has expired: the holder needs a new card")
        return purse, snap

    def _settle(self, snap: CardSnapshot, now: int) -> None:
        journal = self.db.journal
        for intent in journal.open_intents(card_number=snap.identity.card_number):
            if intent.kind != KIND_TOPUP:
                continue
            landed = self._landed(intent, snap)
            if landed is None:
                continue  # the card cannot tell any more: stays counted, the center settles it
            if landed:
                journal.done(intent.seq, "ok-late", time=now * 1000, fare=intent.fare,
                             product=intent.product, counter_after=intent.counter_after,
                             balance_before=intent.balance_before,
                             balance_after=intent.balance_after)
            else:
                # the credit goes back to the allowance the intent names; an intent of older
                # software names none: then to the one in force at its time, as it was tallied
                when = intent.time // 1000
                ref = intent.action_id if allowance_id_of(intent.action_id) is not None \
                    else self._credit_ref(when)
                journal.done(intent.seq, NOT_CHARGED, time=now * 1000, fare=0,
                             product=intent.product, counter_after=snap.counter,
                             balance_before=snap.balance, balance_after=snap.balance,
                             tallies={k: -v for k, v in self._tallies(
                                 max(0, intent.fare or 0), when, ref).items()})

    def _landed(self, intent: JournalRecord, snap: CardSnapshot) -> bool | None:
        """Whether the card shows the write of ``intent``; None when it cannot tell."""
        when = intent.time // 1000
        if intent.product == PRODUCT_PASS:
            block = snap.pass_block
            if block is not None and block.valid_from == when:
                return True
            return None if block is not None and block.valid_from > when else False
        target = intent.counter_after
        if target is None or snap.counter < target:
            return False  # the card's counter never reached this top-up (a repaired snapshot)
        found = snap.trip_with_counter(target)
        if found is None:
            return None  # the entry left the two-entry trip log
        trip = found[1]
        return (product_of(trip) == PRODUCT_TOPUP and trip.time == when
                and trip.validator_id == self.terminal_id and purse_delta(trip) == intent.fare)

    def load(self, access: ClassicAccess, amount: int, now: int) -> Receipt:
        """Add ``amount`` kuruş to the card's purse (key B), journaled and signed; the
        records name the allowance it drew on (``action_id``)."""
        purse, snap = self._card(access, now)
        ref = self._check(amount, snap.balance, now)
        seq = self.db.journal.intent({
            "kind": KIND_TOPUP, "time": now * 1000, "card_number": snap.identity.card_number,
            "uid": bytes(access.uid), "counter_before": snap.counter,
            "counter_after": snap.counter + 1, "balance_before": snap.balance,
            "balance_after": snap.balance + amount, "fare": amount, "product": PRODUCT_TOPUP,
            "validator_id": str(self.terminal_id), "action_id": ref,
        }, tallies=self._tallies(amount, now, ref))
        new = purse.apply(snap, topup_trip(0, now, self.terminal_id, amount))
        self.db.journal.done(seq, "ok", counter_after=new.counter, balance_after=new.balance,
                             balance_before=snap.balance, fare=amount, product=PRODUCT_TOPUP)
        self.ui.show(f"Yüklendi {tl(amount)}", f"Bakiye {tl(new.balance)}", Signal.OK)
        return Receipt(self.terminal_id, snap.identity.card_number, bytes(access.uid), "topup",
                       amount, new.balance, seq, now, key_version_of(purse))

    def sell_pass(self, access: ClassicAccess, product_code: int, now: int) -> Receipt:
        """Sell a monthly pass: the price comes out of the dealer's credit (the records name
        the allowance), the pass is written to the card (valid 30 days from this hour)."""
        product = self.table.pass_product(product_code)
        if product is None:
            raise TopupRefused(f"no pass product {product_code} in tariff {self.table.name}")
        purse, snap = self._card(access, now)
        pass_ = self.table.pass_for(product_code, now)
        price = pass_price(self.table, product, snap.view().card_type,
                           discount_until=snap.identity.discount_until, until=pass_.valid_until)
        ref = self._check_credit_only(price, now)
        seq = self.db.journal.intent({
            "kind": KIND_TOPUP, "time": now * 1000, "card_number": snap.identity.card_number,
            "uid": bytes(access.uid), "counter_before": snap.counter,
            "counter_after": snap.counter, "balance_before": snap.balance,
            "balance_after": snap.balance, "fare": price, "product": PRODUCT_PASS,
            "validator_id": str(self.terminal_id), "action_id": ref,
        }, tallies=self._tallies(price, now, ref))
        purse.write_pass(PassBlock(product_code, pass_.valid_from, pass_.valid_until))
        self.db.journal.done(seq, "ok", fare=price, product=PRODUCT_PASS,
                             counter_after=snap.counter, balance_before=snap.balance,
                             balance_after=snap.balance)
        self.ui.show("Abonman yüklendi", f"{tl(price)}", Signal.OK)
        return Receipt(self.terminal_id, snap.identity.card_number, bytes(access.uid), "pass",
                       price, snap.balance, seq, now, key_version_of(purse))

    def _check_credit_only(self, amount: int, now: int) -> str:
        """The credit check alone (a pass sale); returns the ``credit:<allowance_id>``."""
        left, ref = self._credit(now)
        if amount > left:
            raise TopupRefused(f"over the dealer's credit: {tl(left)} left")
        return ref


def pass_price(table: FareTable, product, card_type, *, discount_until: int | None = None,
               until: int | None = None) -> int:
    """The pass price for this card's rider category (student passes are cheaper); a card
    type the product has no price for pays the highest (full) price.

    Given ``until`` (the end of the pass), a category that needs the yearly re-validation
    pays its price only if the card's discount lasts as long as the pass; otherwise the
    default (full) category's: docs/fares.md, "Pass against discount"."""
    category = table.category_for(card_type)
    if (category is not None and category.revalidation and until is not None
            and (discount_until is None or discount_until < until)):
        category = table.default_category
    amounts = dict(product.amounts)
    if category is not None and category.category_id in amounts:
        return amounts[category.category_id]
    return max(amounts.values())


def load_allowance(path: str | Path | None) -> CreditAllowance | None:
    if path is None or not Path(path).exists():
        return None
    return CreditAllowance.from_json(Path(path).read_text())
