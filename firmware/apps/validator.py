"""The on-bus validator: poll, read, decide, journal, write, show — offline, in milliseconds.

One tap (:meth:`Validator.tap`):

1. a card arrives (:mod:`.cards`); a UID with too many failed authentications lately is
   refused before any authentication (an emulated card cannot harvest nonces at will);
2. the card is read and checked (:class:`~firmware.core.purse.Purse`): MACs, purse state;
   a forged card is journaled and blocked;
3. an interrupted earlier update is finished (roll forward) and journaled as a repair; this
   device's own open intents for the card are settled from the card's counter and trip log;
4. a card whose counter is below what this device has already seen is a rolled-back or cloned
   card: refused, journaled, blocked; a blacklisted card likewise;
5. pending online loads (the action list) are applied, each exactly once;
6. the fare engine decides (a pure function); a refusal is journaled as an event and shown;
7. the journal's *intent* is made durable, the card is written (tear-safe protocol), the
   display shows the fare and the new balance; the ride's *done* record follows "after the
   beep" (:meth:`Validator.finish_tap`: at the next idle moment, or first thing at the next
   tap), so the rider waits for the card and the fsynced intent only. A done lost to a power
   cut in between is the tap in doubt that DESIGN.md plans for: the intent stays open and is
   settled from the card's counter and trip log when the card is next seen.

If the journal cannot be written (disk full, database error) the validator charges nothing:
it shows "out of service" and tries again at the next poll, recovering by itself when the
store accepts writes again.
"""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from firmware.core import fares
from firmware.core.anticollision import masked_uid
from firmware.core.card_layout import CardForged, PassBlock
from firmware.core.errors import AuthenticationError, CoreError
from firmware.core.fares import Decision, FareTable, Reason, ValidatorContext
from firmware.core.keys import KeyStore
from firmware.core.mifare import ClassicAccess
from firmware.core.purse import (
    PRODUCT_PASS,
    PRODUCT_TOPUP,
    CardNeedsService,
    CardSnapshot,
    Purse,
    PurseState,
    topup_trip,
)
from firmware.stores.errors import NotFound, StoreError, StoreUnavailable
from firmware.stores.journal import KIND_ACTION_APPLIED, KIND_REJECTION, KIND_REPAIR, KIND_TAP
from firmware.stores.ratelimit import AuthFailureLimiter

from .card_keys import OlderCardKeys, key_version_of
from .cards import CardSource
from .clock import GuardedClock
from .ui import Signal, Ui

log = logging.getLogger("afc.validator")




def tl(kurus: int) -> str:
    return f"{kurus // 100},{kurus % 100:02d} TL"


@dataclass(frozen=True)
class ValidatorConfig:
    """What a validator is and where it runs (``[device]`` of its TOML configuration)."""

    device_id: str
    validator_id: int
    vehicle_id: int
    line_id: int
    line_group: str  # the tariff network of the line (e.g. "merkez" in the Konya tariff)
    direction: int = 0
    vehicle_validator_ids: frozenset[int] = frozenset()
    tariff: str = "konya-2025"  # a shipped tariff name or a TOML path
    reader_mode: str = "transparent"

    @classmethod
    def from_toml(cls, path: str | Path) -> ValidatorConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CoreError(f"cannot read validator configuration {path}: {exc}") from exc
        device = data.get("device", {})
        try:
            return cls(
                device_id=str(device["id"]),
                validator_id=int(device["validator_id"]),
                vehicle_id=int(device["vehicle_id"]),
                line_id=int(device["line_id"]),
                line_group=str(device.get("line_group", "merkez")),
                direction=int(device.get("direction", 0)),
                vehicle_validator_ids=frozenset(device.get("other_validators", [])),
                tariff=str(data.get("tariff", {}).get("name", "konya-2025")),
                reader_mode=str(data.get("reader", {}).get("mode", "transparent")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CoreError(
                f"validator configuration {path}: [device] needs id, validator_id, vehicle_id "
                f"and line_id ({exc})"
            ) from exc

    def context(self) -> ValidatorContext:
        return ValidatorContext(
            validator_id=self.validator_id, vehicle_id=self.vehicle_id, line_id=self.line_id,
            line_group=self.line_group, direction=self.direction,
            vehicle_validator_ids=self.vehicle_validator_ids,
        )


def load_tariff(name_or_path: str) -> FareTable:
    from firmware.core import tariffs

    if name_or_path in tariffs.available():
        return tariffs.load(name_or_path)
    return FareTable.from_toml(Path(name_or_path))


@dataclass
class TapOutcome:
    """What one tap did (for the display, the tests and the HIL reconciliation)."""

    uid: bytes
    reason: Reason | None = None
    accepted: bool = False
    fare: int = 0
    balance: int | None = None
    card_number: int | None = None
    counter: int | None = None
    seqs: list[int] = field(default_factory=list)
    note: str = ""
    #: the card key version the card was read and written with, when older than the key
    #: store's current one (a card issued before ``afc keys rotate``); None: the current one
    key_version: int | None = None


class Validator:
    def __init__(
        self,
        config: ValidatorConfig,
        cards: CardSource,
        db,
        keys: KeyStore,
        table: FareTable,
        ui: Ui,
        clock: GuardedClock | None = None,
        limiter: AuthFailureLimiter | None = None,
    ) -> None:
        self.config = config
        self.ctx = config.context()
        self.cards = cards
        self.db = db
        self.keys = keys
        self.table = table
        self.ui = ui
        self.clock = clock or GuardedClock(lambda: None, lambda t: None)
        self.limiter = limiter or AuthFailureLimiter()
        self.out_of_service = False
        self._taps_since_checkpoint = 0
        self._out_since: int | None = None  # wall time the validator went out of service
        self._out_reported = False
        self.reader_ok: bool | None = None
        self._fares_version = self._config_version("fares")
        # the last ride's done record, written after the beep: (seq, counter, balance)
        self._done_pending: tuple[int, int, int] | None = None

    # -- journal helpers ------------------------------------------------------------------

    def _base(self, snap: CardSnapshot | None, uid: bytes, now: int) -> dict:
        rec = {
            "time": now * 1000,
            "uid": uid,
            "line": str(self.config.line_id),
            "vehicle": str(self.config.vehicle_id),
            "validator_id": str(self.config.validator_id),
        }
        if snap is not None:
            rec.update(card_number=snap.identity.card_number, counter_before=snap.counter,
                       balance_before=snap.balance)
        return rec

    def _event(self, snap, uid, now, reason: Reason, outcome: str, out: TapOutcome) -> None:
        seq = self.db.journal.event(
            {**self._base(snap, uid, now), "kind": KIND_REJECTION, "reason": reason.code,
             "outcome": outcome}
        )
        out.seqs.append(seq)

    # -- the loop -------------------------------------------------------------------------

    def poll(self) -> TapOutcome | None:
        """One turn of the loop: process the card in the field, if a new one arrived."""
        access = self.cards.next_card()
        if access is None:
            return None
        return self.tap(access)

    def tap(self, access: ClassicAccess) -> TapOutcome:
        uid = bytes(access.uid)
        now = self.clock.now()
        out = TapOutcome(uid)
        self._taps_since_checkpoint += 1
        try:
            self.finish_tap()  # the previous ride's, when no idle moment came between
            self._tap(access, uid, now, out)
            if self.out_of_service:
                self._back_in_service(now)
        except StoreUnavailable as exc:
            if not self.out_of_service:
                self._go_out_of_service(now, exc)
            out.accepted = False  # nothing was charged (or it is in doubt): not a boarding
            out.note = "out of service"
            log.error("validator %s out of service: %s", self.config.device_id, exc)
            self.ui.show("HİZMET DIŞI", "Out of service", Signal.OUT_OF_SERVICE)
            self.cards.forget()
        return out

    def _tap(self, access: ClassicAccess, uid: bytes, now: int, out: TapOutcome) -> None:
        if self.limiter.auth_blocked(uid, now):
            out.note = "rate-limited"
            self.ui.show("Kart okunamadı", "Card not readable", Signal.REJECT)
            return
        purse = Purse(access, self.keys)
        try:
            try:
                snap = purse.read()
            except AuthenticationError:
                # a card issued before a key rotation? the older versions held, newest first
                # (firmware/apps/card_keys.py); never reached when the current version opens it
                purse = OlderCardKeys.of(self.keys).open(purse)
                snap = purse.read()
                out.key_version = key_version_of(purse)
                log.info("validator %s: card uid=%s read under card key version %d (not the "
                         "current one): written back under it", self.config.device_id,
                         masked_uid(uid), out.key_version)
        except AuthenticationError:
            self.limiter.note_auth_failure(uid, now)
            out.note = "not our card"
            log.info("tap uid=%s: authentication failed (not a fare card?)", masked_uid(uid))
            self.ui.show("Geçersiz kart", "Invalid card", Signal.REJECT)
            return
        except CardForged as exc:
            out.note = f"forged: {exc}"
            log.warning("tap uid=%s: forged card: %s", masked_uid(uid), exc)
            self._event(None, uid, now, Reason.CARD_BLOCKED, "forged", out)
            self._try_block(purse)
            self.ui.show("Kart bloke", "Card blocked", Signal.REJECT)
            return
        except CoreError as exc:
            out.note = f"read failed: {exc}"
            self.cards.forget()
            self.ui.show("Tekrar okutun", "Tap again", Signal.REJECT)
            return
        out.card_number, out.counter, out.balance = snap.identity.card_number, snap.counter, \
            snap.balance
        # every Purse this tap makes from here takes purse.store: for a card of an older key
        # version, the view pinned to its version (a card is never re-keyed mid-tap)
        try:
            self._process(purse, snap, uid, now, out)
        except (CardNeedsService, CardForged) as exc:
            out.accepted = False
            out.note = str(exc)
            self.ui.show("Bilet gişesine", "See ticket office", Signal.REJECT)
        except StoreUnavailable:
            raise
        except CoreError as exc:
            # the card left the field (or a bit error) mid-update: the intent stays open and
            # the card's counter settles it at the next tap
            out.accepted = False
            out.note = f"write interrupted: {exc}"
            log.info("tap card=%s: interrupted: %s", snap.identity.card_number, exc)
            self.cards.forget()
            self.ui.show("Tekrar okutun", "Tap again", Signal.REJECT)

    def _process(self, purse: Purse, snap: CardSnapshot, uid: bytes, now: int,
                 out: TapOutcome) -> None:
        journal = self.db.journal
        number = snap.identity.card_number
        # finish an interrupted update, from the card alone
        if snap.state in (PurseState.ROLL_FORWARD_RECORD, PurseState.ROLL_FORWARD_BACKUP):
            seq = journal.intent({**self._base(snap, uid, now), "kind": KIND_REPAIR,
                                  "counter_after": snap.counter + (
                                      1 if snap.state is PurseState.ROLL_FORWARD_RECORD else 0),
                                  "balance_after": snap.purse})
            snap = purse.repair(snap)  # keeps the day spend: never over-counts against the rider
            journal.done(seq, "ok", counter_after=snap.counter, balance_after=snap.balance)
            out.seqs.append(seq)
        settled = self._settle_open_intents(purse, snap, now)
        if settled is not snap:
            purse = Purse(purse.access, purse.store)  # a key-B write moved the session
        snap = settled
        # rolled back or cloned: the card is behind what this device has already seen
        seen = journal.last_counter(number)
        if seen is not None and snap.counter < seen:
            log.warning("card=%s counter %d below %d seen here: rollback or clone",
                        number, snap.counter, seen)
            self._event(snap, uid, now, Reason.CARD_BLOCKED, "rolled-back", out)
            self._try_block(purse)
            out.reason = Reason.CARD_BLOCKED
            self.ui.show("Kart bloke", "Card blocked", Signal.REJECT)
            return
        blacklisted = self.db.blacklist.lookup(number) is not None
        if not blacklisted and not snap.blocked:
            loaded = self._apply_actions(purse, snap, uid, now, out)
            if loaded is not snap:
                # the loader left the card authenticated elsewhere with key B: the ride
                # starts a fresh session rather than trusting ``purse``'s idea of the sector
                purse = Purse(purse.access, purse.store)
            snap = loaded
        decision = fares.decide(snap.view(), self.table, now, self.ctx, 1,
                                blacklisted=blacklisted)
        out.reason, out.accepted = decision.reason, decision.accepted
        if not decision.accepted:
            if decision.reason is not Reason.ALREADY_VALIDATED:
                self._event(snap, uid, now, decision.reason, "declined", out)
            if decision.reason is Reason.BLACKLISTED and not snap.blocked:
                self._try_block(purse)
            self.ui.show(decision.reason.message_tr, decision.reason.message_en,
                         Signal.INFO if decision.reason is Reason.ALREADY_VALIDATED
                         else Signal.REJECT)
            return
        self._charge(purse, snap, decision, uid, now, out)

    def _charge(self, purse: Purse, snap: CardSnapshot, decision: Decision, uid: bytes,
                now: int, out: TapOutcome) -> None:
        trip = decision.trip
        seq = self.db.journal.intent({
            **self._base(snap, uid, now), "kind": KIND_TAP,
            "counter_after": snap.counter + 1, "balance_after": snap.balance - decision.fare,
            "fare": decision.fare, "product": trip.flags & 0x0F, "reason": decision.reason.code,
        })
        out.seqs.append(seq)
        new = purse.apply(snap, trip, decision.day_spent)
        self._done_pending = (seq, new.counter, new.balance)  # finish_tap() writes it
        out.fare, out.balance, out.counter = decision.fare, new.balance, new.counter
        line2 = f"Bakiye {tl(new.balance)}"
        if trip.flags & 0x0F == PRODUCT_PASS:
            line2 = "Abonman"
        notice = decision.notice
        signal = Signal.INFO if notice is not None else Signal.OK
        if notice is not None:  # "Vize süresi doldu", "Abonman süresi doldu" (docs/fares.md)
            line2 = f"{notice.message_tr} · {line2}"
        self.ui.show(f"{decision.reason.message_tr} {tl(decision.fare)}", line2, signal)

    def _settle_open_intents(self, purse: Purse, snap: CardSnapshot, now: int) -> CardSnapshot:
        """Close this device's intents for this card: done if the card shows the update,
        not-charged if it does not."""
        journal = self.db.journal
        for intent in journal.open_intents(card_number=snap.identity.card_number):
            if intent.kind == KIND_ACTION_APPLIED and intent.product == PRODUCT_PASS:
                self._settle_pass_intent(intent, snap, now)
                continue
            target = intent.counter_after
            if target is None or intent.counter_before == target:
                continue  # nothing on the card can tell: the center settles it
            found = snap.trip_with_counter(target)
            ours = found is not None and found[1].validator_id == self.config.validator_id \
                and found[1].time == intent.time // 1000
            if ours and snap.counter >= target:
                # a top-up that reached the card is applied: mark its action in the same
                # transaction, or the next lines would load it a second time
                action = (self.db.actions.get(intent.action_id)
                          if intent.kind == KIND_ACTION_APPLIED
                          and intent.product == PRODUCT_TOPUP else None)
                if action is not None and action.card_seq is not None \
                        and action.card_seq > snap.identity.actions_applied:
                    # the load landed but the tear came before the card recorded its
                    # number: record it now, before closing the intent
                    loader = Purse(purse.access, purse.store, key_type="B")
                    snap = loader.record_action(snap, action.card_seq)
                journal.done(intent.seq, "ok-late", counter_after=target,
                             balance_after=intent.balance_after, time=now * 1000,
                             apply_action=action is not None and action.applied_seq is None)
            elif snap.counter < target or found is not None:
                # the card never reached that counter, or another device's update holds it
                journal.done(intent.seq, "not-charged", counter_after=snap.counter,
                             balance_after=snap.balance, time=now * 1000)
            # else: the entry has scrolled out of the two-entry trip log; the intent stays
            # open and the center settles it from every device's records
        return snap

    def _settle_pass_intent(self, intent, snap: CardSnapshot, now: int) -> None:
        """A pass load changes no counter; the pass block itself tells whether it landed:
        this validator writes passes valid from the moment of the tap."""
        when = intent.time // 1000
        block = snap.pass_block
        journal = self.db.journal
        if block is not None and block.valid_from == when:
            action = self.db.actions.get(intent.action_id) if intent.action_id else None
            journal.done(intent.seq, "ok-late", time=now * 1000, counter_after=snap.counter,
                         apply_action=action is not None and action.applied_seq is None)
        elif block is None or block.valid_from < when:
            journal.done(intent.seq, "not-charged", time=now * 1000,
                         counter_after=snap.counter)
        # else: a newer pass was written since; the center settles it

    def _apply_actions(self, purse: Purse, snap: CardSnapshot, uid: bytes, now: int,
                       out: TapOutcome) -> CardSnapshot:
        """Online loads waiting for this card: each written and reported exactly once.

        Loading value needs key B (INCREMENT); a validator's key store holds it for this
        purpose (in production, a SAM that only performs increments for signed actions)."""
        actions = self.db.actions.pending_for(snap.identity.card_number, now * 1000)
        for action in actions:
            if action.card_seq is not None and action.card_seq <= snap.identity.actions_applied:
                # another device already loaded it: the center hears of it from that device
                log.info("action %s for card=%s is already on the card", action.action_id,
                         snap.identity.card_number)
                continue
            loader = Purse(purse.access, purse.store, key_type="B")
            base = {**self._base(snap, uid, now), "kind": KIND_ACTION_APPLIED,
                    "action_id": action.action_id}
            if action.kind == "topup":
                amount = action.amount or 0
                if amount <= 0 or snap.balance + amount > self.table.max_balance:
                    log.info("action %s for card=%s skipped: balance would pass the maximum",
                             action.action_id, snap.identity.card_number)
                    continue
                seq = self.db.journal.intent({
                    **base, "counter_after": snap.counter + 1,
                    "balance_after": snap.balance + amount, "fare": -amount,
                    "product": PRODUCT_TOPUP,
                })
                snap = loader.apply(snap, topup_trip(0, now, self.config.validator_id, amount))
            elif action.kind == "pass" and action.product_id is not None:
                product = self.table.pass_for(action.product_id, now)
                seq = self.db.journal.intent({**base, "product": PRODUCT_PASS,
                                              "counter_after": snap.counter})
                block = PassBlock(action.product_id, product.valid_from, product.valid_until)
                loader.write_pass(block)
                snap = replace(snap, pass_block=block)
            else:
                continue
            if action.card_seq is not None:
                snap = loader.record_action(snap, action.card_seq)
            self.db.journal.done(seq, "ok", apply_action=True, counter_after=snap.counter,
                                 balance_after=snap.balance)
            out.seqs.append(seq)
        return snap

    def _try_block(self, purse: Purse) -> None:
        try:
            purse.block_card()
        except CoreError as exc:
            log.info("could not write the blocked flag: %s", exc)

    # -- service state and events for the center ---------------------------------------------

    def _raise(self, event: str, severity: str, detail: dict, when: int) -> bool:
        """Best effort: an event the database cannot take now is not worth failing a tap."""
        try:
            self.db.events.raise_event(event, severity, detail, time=when * 1000)
            return True
        except StoreError as exc:
            log.warning("validator %s: event %s not recorded: %s", self.config.device_id,
                        event, exc)
            return False

    def _go_out_of_service(self, now: int, exc: Exception) -> None:
        self.out_of_service = True
        self._out_since = now
        # Usually the database that failed cannot take the event either; then it is raised
        # with its original time when the validator is back in service.
        self._out_reported = self._raise("out-of-service", "alarm",
                                         {"cause": type(exc).__name__}, now)

    def _back_in_service(self, now: int) -> None:
        self.out_of_service = False
        since = self._out_since if self._out_since is not None else now
        if not self._out_reported:
            self._raise("out-of-service", "alarm", {"cause": "StoreUnavailable"}, since)
        self._raise("in-service", "info", {"out_for_s": max(0, now - since)}, now)
        self._out_since = None
        log.info("validator %s back in service", self.config.device_id)

    def note_reader(self, ok: bool, detail: str = "") -> None:
        """The reader loop's view of the reader: an event and the status the agent reports,
        on each change only (a reader that stays lost is not an event per poll)."""
        if ok == self.reader_ok:
            return
        first = self.reader_ok is None
        self.reader_ok = ok
        now = self.clock.now()
        try:
            self.db.events.set_status("reader", "ok" if ok else "lost", time=now * 1000)
        except StoreError as exc:
            log.warning("validator %s: reader status not recorded: %s", self.config.device_id,
                        exc)
        if not ok:
            log.error("validator %s: reader lost: %s", self.config.device_id, detail)
            self._raise("reader-lost", "alarm", {"detail": detail[:120]}, now)
        elif not first:
            log.info("validator %s: reader back", self.config.device_id)
            self._raise("reader-back", "info", {}, now)

    def _config_version(self, kind: str) -> int:
        try:
            return self.db.config.version(kind)
        except StoreError:
            return 0

    def _pick_up_fares(self) -> None:
        """A fare table the agent applied since the last look replaces the one in use: between
        taps, so a tap is decided by one table from start to end."""
        version = self._config_version("fares")
        if version <= self._fares_version:
            return
        try:
            table = self.db.config.fare_table()
        except CoreError as exc:
            log.error("validator %s: fare bundle %d not usable, keeping %s: %s",
                      self.config.device_id, version, self.table.version, exc)
            self._fares_version = version
            return
        if table is not None:
            log.info("validator %s: fare table %s (bundle %d) in use",
                     self.config.device_id, table.version, version)
            self.table = table
        self._fares_version = version

    #: Taps between two idle checkpoints of the device database (see :meth:`housekeeping`).
    CHECKPOINT_EVERY_TAPS = 16

    def finish_tap(self) -> bool:
        """Write what the last ride left for after the beep: its journal *done* record.
        True if there was one.

        Called at the next idle moment (:meth:`housekeeping`), at the start of the next tap,
        and by whoever stops the validator. :class:`StoreUnavailable` if the database cannot
        take it: the record stays pending and is tried again (out of service meanwhile).
        """
        pending = self._done_pending
        if pending is None:
            return False
        seq, counter, balance = pending
        try:
            self.db.journal.done(seq, "ok", counter_after=counter, balance_after=balance)
        except NotFound:
            log.warning("validator %s: seq=%d was settled before its done record was written",
                        self.config.device_id, seq)
        self._done_pending = None
        return True

    def housekeeping(self) -> None:
        """Work that must not lengthen a tap, done while no card is in the field.

        The last ride's done record first (:meth:`finish_tap`); a database that cannot take
        it puts the validator out of service until it can. Then a WAL checkpoint once a few
        taps were journaled: the journal's commits then keep overwriting WAL space that
        already exists (a sync without file growth, and no checkpoint on a tap), and the WAL
        stays a few hundred KB. A failed checkpoint is logged, not raised: the next durable
        write reports a broken database where it matters.
        """
        try:
            if self.finish_tap() and self.out_of_service:
                self._back_in_service(self.clock.now())
        except StoreUnavailable as exc:
            if not self.out_of_service:
                self._go_out_of_service(self.clock.now(), exc)
                self.ui.show("HİZMET DIŞI", "Out of service", Signal.OUT_OF_SERVICE)
            log.error("validator %s out of service: %s", self.config.device_id, exc)
            return
        self._pick_up_fares()
        if self._taps_since_checkpoint < self.CHECKPOINT_EVERY_TAPS:
            return
        try:
            self.db.checkpoint("PASSIVE")
            self._taps_since_checkpoint = 0
        except CoreError as exc:
            log.warning("validator %s: checkpoint failed: %s", self.config.device_id, exc)

    def run(self, *, stop=lambda: False, idle_sleep: float = 0.05) -> None:
        """Poll until ``stop()`` is true."""
        try:
            while not stop():
                try:
                    if self.poll() is None:
                        self.housekeeping()
                        time.sleep(idle_sleep)
                except CoreError as exc:
                    log.warning("validator %s: %s", self.config.device_id, exc)
                    time.sleep(idle_sleep)
        finally:
            try:
                self.finish_tap()
            except StoreError as exc:  # the intent stays open: settled at the card's next tap
                log.error("validator %s: last done record not written: %s",
                          self.config.device_id, exc)
