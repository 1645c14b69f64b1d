"""The purse on the card: reading it, and changing it so that a tear never loses or invents
money.

Works on any :class:`~firmware.core.mifare.ClassicAccess` (host Crypto1 over a PN532 in
transparent mode, the PN532's own Crypto1, or a virtual card in process), so the tear tests
and the validators run the same code.

The update protocol (a charge; a top-up is the same with INCREMENT and key B)::

    1. write trip log entry  T(n+1)  into the slot not holding T(n)       sector 3
    2. DECREMENT purse by the fare, TRANSFER to the purse                 sector 2
    3. WRITE purse record   R(n+1, new balance, MAC over T(n+1))
    4. RESTORE purse, TRANSFER to the backup

A tear (the card leaves the field, or the validator loses power) between any two commands
leaves one of these states, which :meth:`Purse.read` classifies and :meth:`Purse.repair`
settles deterministically, from the card alone:

    torn after   purse/backup/record          what the next read does
    ----------   --------------------------   ---------------------------------------------
    (nothing)    P = B = R.balance, R = n     nothing: consistent, old state
    1            same, plus a T(n+1) "ghost"  nothing: the ride was not paid (ghost ignored)
    2            P = B - fare, R = n          roll forward: the money left the purse, and
                                              T(n+1) says what for; write R(n+1), restore B
    3            P != B, R = n+1, R = P       roll forward: restore B
    4            P = B = R.balance, R = n+1   nothing: consistent, new state

So the purse ends at exactly the old or the new state, and the new state only when the money
actually moved. Anything else (a MAC that does not verify, value blocks that disagree in a
way no tear produces) is a forged or rolled-back card: :class:`CardForged`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import StrEnum

from . import card_layout as cl
from . import classic_layout as layout
from .card_layout import CardForged, CardMacs, Identity, PassBlock, PurseRecord
from .errors import CodecError, CoreError
from .fares import CardType as FareCardType
from .fares import CardView, PassProduct, TripRecord
from .keys import KeyStore
from .mifare import ClassicAccess

PRODUCT_PURSE, PRODUCT_PASS, PRODUCT_FREE, PRODUCT_TOPUP, PRODUCT_REPAIR = 0, 1, 2, 3, 4
EMPTY_TRIP = bytes(16)
TRANSPORT_KEY = bytes.fromhex("FFFFFFFFFFFF")


class PurseState(StrEnum):
    """How :meth:`Purse.read` found the purse."""

    CONSISTENT = "consistent"
    GHOST_TRIP = "ghost_trip"  # torn after step 1: consistent, an unpaid trip entry to ignore
    ROLL_FORWARD_RECORD = "roll_forward_record"  # torn after step 2
    ROLL_FORWARD_BACKUP = "roll_forward_backup"  # torn after step 3


class CardNeedsService(CoreError):
    """The card is in a state no tear of this protocol produces and no MAC proves forged
    (e.g. a torn write of a whole block on a card without anti-tearing): it goes to the
    office, where the journal and the center's ledger settle it."""


def product_of(trip: TripRecord) -> int:
    return trip.flags & 0x0F


def purse_delta(trip: TripRecord) -> int:
    """What ``trip`` did to the purse, in kuruş: negative for a charge, positive for a load.

    A top-up amount does not fit the 16-bit fare field, so a top-up entry (product 3) carries
    the high 16 bits of the amount in ``line_id`` (a top-up has no line).
    """
    if product_of(trip) == PRODUCT_TOPUP:
        return trip.fare | (trip.line_id << 16)
    return -trip.fare


def topup_trip(counter: int, now: int, terminal_id: int, amount: int) -> TripRecord:
    """The trip log entry of a top-up of ``amount`` kuruş."""
    if not 0 < amount < 1 << 32:
        raise CodecError(f"top-up amount {amount} out of range")
    return TripRecord(
        counter=counter, time=now, line_id=amount >> 16, validator_id=terminal_id,
        fare=amount & 0xFFFF, transfer_step=0, flags=PRODUCT_TOPUP,
    )


def unchanged_day_spent(snap: CardSnapshot, trip: TripRecord) -> int:
    """The day spend a roll-forward keeps when the caller has no fare engine at hand: the
    old value. It can only under-count the day (in the rider's favour), never over-charge;
    a validator passes the engine's own rule instead."""
    return snap.record.day_spent


@dataclass(frozen=True, slots=True)
class CardSnapshot:
    """Everything a tap reads from the card, decoded and checked."""

    uid: bytes
    identity: Identity
    pass_block: PassBlock | None
    purse: int  # value block 8
    backup: int  # value block 9
    record: PurseRecord
    trips: tuple[TripRecord | None, TripRecord | None]  # slots of blocks 12 and 13
    status: int  # value block 14: 1 in service, <= 0 blocked
    state: PurseState
    pending: TripRecord | None = None  # the trip a roll-forward will complete

    @property
    def blocked(self) -> bool:
        return self.status < cl.STATUS_ACTIVE

    @property
    def counter(self) -> int:
        return self.record.counter

    @property
    def balance(self) -> int:
        return self.record.balance

    def trip_with_counter(self, counter: int) -> tuple[int, TripRecord] | None:
        for slot, trip in enumerate(self.trips):
            if trip is not None and trip.counter == counter:
                return slot, trip
        return None

    @property
    def newest_trip(self) -> TripRecord | None:
        found = self.trip_with_counter(self.record.counter)
        return found[1] if found else None

    def view(self) -> CardView:
        """The fare engine's view of this card."""
        ident = self.identity
        pass_block = self.pass_block
        return CardView(
            card_number=ident.card_number,
            card_type=FareCardType.from_code(ident.card_type),
            discount_valid_until=ident.discount_until,
            card_expires=ident.expires,
            blocked=self.blocked,
            balance=self.record.balance,
            pass_product=None if pass_block is None else PassProduct(
                pass_block.product_id, pass_block.valid_from, pass_block.valid_until
            ),
            trips=self.recent_trips(),
            day_spent=self.record.day_spent,
        )

    def recent_trips(self) -> tuple[TripRecord, ...]:
        """Committed trips (counter <= the record's), newest first."""
        trips = [t for t in self.trips if t is not None and t.counter <= self.record.counter]
        return tuple(sorted(trips, key=lambda t: t.counter, reverse=True))


class Purse:
    """The fare application on one selected card.

    ``access`` talks to the card; ``store`` provides the per-card sector and MAC keys;
    ``key_type`` is the key this device holds: "A" on validators, "B" on top-up terminals
    and at the issuing office.
    """

    def __init__(
        self,
        access: ClassicAccess,
        store: KeyStore,
        *,
        key_type: str = "A",
        card_type: layout.CardType = layout.CardType.CLASSIC_1K,
    ) -> None:
        self.access = access
        self.uid = bytes(access.uid)
        self.store = store
        self.key_type = key_type
        self.card_type = card_type
        self._macs: CardMacs | None = None
        self._sector: tuple[int, str] | None = None  # the open session: (sector, key)
        self._keys: dict[tuple[int, str], bytes] = {}

    @property
    def macs(self) -> CardMacs:
        if self._macs is None:
            self._macs = CardMacs(self.store, self.uid)
        return self._macs

    def _auth(self, sector: int, key_type: str | None = None) -> None:
        kt = key_type or self.key_type
        key = self._keys.get((sector, kt))
        if key is None:  # derived once per tap (the purse sector is entered twice)
            key = self._keys[sector, kt] = self.store.classic_key(self.uid, sector, kt)
        self.access.authenticate(layout.first_block(sector, self.card_type), key, kt)
        self._sector = (sector, kt)

    def _in(self, sector: int, key_type: str | None = None) -> None:
        """Authenticate unless the session is already on ``sector`` with that key."""
        if self._sector != (sector, key_type or self.key_type):
            self._auth(sector, key_type)

    # -- reading ---------------------------------------------------------------------------

    def read(self) -> CardSnapshot:
        """Read and check the whole application (3 authentications, 9 block reads)."""
        macs = self.macs
        self._auth(cl.IDENTITY_SECTOR)
        b4, b5, b6 = (self.access.read(b) for b in (4, 5, 6))
        identity = Identity.parse(b4, b5, macs)
        pass_block = PassBlock.parse(b6, macs)
        self._auth(cl.PURSE_SECTOR)
        raw_p, raw_b, raw_r = (self.access.read(b) for b in (8, 9, 10))
        self._auth(cl.TRIP_SECTOR)
        raw_t = [self.access.read(b) for b in cl.BLOCK_TRIPS]
        raw_s = self.access.read(cl.BLOCK_STATUS)
        try:
            purse = layout.decode_value_block(raw_p).value
            backup = layout.decode_value_block(raw_b).value
            status = layout.decode_value_block(raw_s).value
        except CodecError as exc:
            raise CardForged(f"a value block of the purse is malformed: {exc}") from exc
        trips = tuple(None if not any(t) else TripRecord.from_bytes(t) for t in raw_t)
        record, tag = PurseRecord.parse(raw_r)
        snap = CardSnapshot(
            self.uid, identity, pass_block, purse, backup, record, trips, status,
            PurseState.CONSISTENT,
        )
        return self._classify(snap, tag)

    def _trip_bytes(self, snap: CardSnapshot, counter: int) -> bytes | None:
        if counter == 0:
            return EMPTY_TRIP
        found = snap.trip_with_counter(counter)
        return found[1].to_bytes() if found else None

    def _classify(self, snap: CardSnapshot, tag: bytes) -> CardSnapshot:
        rec = snap.record
        committed = self._trip_bytes(snap, rec.counter)
        if committed is None or not rec.verifies(self.macs, tag, committed):
            raise CardForged(
                "purse record MAC does not verify: the purse was edited or restored"
            )
        nxt = snap.trip_with_counter(rec.counter + 1)
        pending = nxt[1] if nxt else None
        p, b = snap.purse, snap.backup
        if p == b == rec.balance:
            state = PurseState.GHOST_TRIP if pending else PurseState.CONSISTENT
            return _restated(snap, state, None)
        if p == rec.balance and p != b:
            # torn after step 3: the record already says P; only the backup lags
            return replace(snap, state=PurseState.ROLL_FORWARD_BACKUP)
        if b == rec.balance and pending is not None and p - b == purse_delta(pending):
            return replace(snap, state=PurseState.ROLL_FORWARD_RECORD, pending=pending)
        raise CardForged(
            f"purse value blocks ({p}, backup {b}) disagree with the record ({rec.balance}) "
            "in a way no interrupted update produces"
        )

    # -- writing ---------------------------------------------------------------------------

    def repair(
        self,
        snap: CardSnapshot,
        day_spent: Callable[[CardSnapshot, TripRecord], int] = unchanged_day_spent,
    ) -> CardSnapshot:
        """Finish an interrupted update (roll forward); a consistent card is returned as is.

        ``day_spent`` gives the record's day spend after the pending trip (the fare engine's
        rule; the default keeps the old value)."""
        if snap.state is PurseState.ROLL_FORWARD_RECORD:
            trip = snap.pending
            new = PurseRecord(trip.counter, snap.purse, min(day_spent(snap, trip), 0xFFFF))
            self._in(cl.PURSE_SECTOR)
            self.access.write(cl.BLOCK_RECORD, new.block(self.macs, trip.to_bytes()))
            self.access.restore(cl.BLOCK_PURSE)
            self.access.transfer(cl.BLOCK_BACKUP)
            return replace(
                snap, record=new, backup=snap.purse, state=PurseState.CONSISTENT, pending=None
            )
        if snap.state is PurseState.ROLL_FORWARD_BACKUP:
            self._in(cl.PURSE_SECTOR)
            self.access.restore(cl.BLOCK_PURSE)
            self.access.transfer(cl.BLOCK_BACKUP)
            return replace(snap, backup=snap.purse, state=PurseState.CONSISTENT)
        return snap

    def apply(
        self, snap: CardSnapshot, trip: TripRecord, day_spent: int | None = None
    ) -> CardSnapshot:
        """Write one purse change (a ride, free or paid, or a top-up) with the tear-safe
        protocol. ``trip.counter`` is set here to the card's counter + 1; ``day_spent`` is
        the fare engine's new day spend (None keeps the old one: top-ups, repairs)."""
        if snap.state not in (PurseState.CONSISTENT, PurseState.GHOST_TRIP):
            raise CardNeedsService("repair the card before changing it")
        trip = type(trip)(  # replace(trip, counter=...), without replace's field walk
            snap.record.counter + 1, trip.time, trip.line_id, trip.validator_id, trip.fare,
            trip.transfer_step, trip.flags,
        )
        delta = purse_delta(trip)
        if snap.purse + delta < 0:
            raise CodecError("a purse change may never make the balance negative")
        # 1. the trip log entry, into the slot not holding the committed newest trip
        committed = snap.trip_with_counter(snap.record.counter)
        slot = 1 - committed[0] if committed else 0
        self._in(cl.TRIP_SECTOR)
        self.access.write(cl.BLOCK_TRIPS[slot], trip.to_bytes())
        # 2. the money
        self._auth(cl.PURSE_SECTOR)
        if delta < 0:
            self.access.decrement(cl.BLOCK_PURSE, -delta)
            self.access.transfer(cl.BLOCK_PURSE)
        elif delta > 0:
            self.access.increment(cl.BLOCK_PURSE, delta)
            self.access.transfer(cl.BLOCK_PURSE)
        # 3. the record, binding counter, balance and the new trip
        spent = snap.record.day_spent if day_spent is None else min(day_spent, 0xFFFF)
        new = PurseRecord(trip.counter, snap.purse + delta, spent)
        self.access.write(cl.BLOCK_RECORD, new.block(self.macs, trip.to_bytes()))
        # 4. the backup follows
        if delta:
            self.access.restore(cl.BLOCK_PURSE)
            self.access.transfer(cl.BLOCK_BACKUP)
        trips = list(snap.trips)
        trips[slot] = trip
        return type(snap)(
            snap.uid, snap.identity, snap.pass_block, new.balance, new.balance, new,
            tuple(trips), snap.status, PurseState.CONSISTENT, None,
        )

    def record_action(self, snap: CardSnapshot, card_seq: int) -> CardSnapshot:
        """Record on the card that it received the center's action ``card_seq`` (key B):
        a load listed on several devices is then applied by the first one only. Written
        after the load itself, so a tear can never lose a paid load (at worst a second
        device that still lists the action loads it again before the center withdraws it)."""
        identity = replace(snap.identity, actions_applied=card_seq)
        b4, b5 = identity.blocks(self.macs)
        self._auth(cl.IDENTITY_SECTOR, "B")
        self.access.write(cl.BLOCK_IDENTITY, b4)
        self.access.write(cl.BLOCK_HOLDER, b5)
        return replace(snap, identity=identity)

    def block_card(self) -> None:
        """Set the status block to 'blocked' (a DECREMENT: key A can never undo it)."""
        self._in(cl.TRIP_SECTOR)
        self.access.decrement(cl.BLOCK_STATUS, 1)
        self.access.transfer(cl.BLOCK_STATUS)

    def write_pass(self, pass_block: PassBlock) -> None:
        """Load a monthly pass (key B)."""
        self._auth(cl.IDENTITY_SECTOR, "B")
        self.access.write(cl.BLOCK_PASS, pass_block.block(self.macs))

    # -- issuing ---------------------------------------------------------------------------

    def issue(
        self,
        identity: Identity,
        *,
        balance: int = 0,
        transport_key: bytes = TRANSPORT_KEY,
    ) -> None:
        """Personalise a factory-fresh card (transport keys): MAD, identity, empty purse and
        trip log, per-card keys and access bits. Done at the office with key B's store."""
        macs = self.macs
        uid = self.uid
        keys = {
            s: (self.store.classic_key(uid, s, "A"), self.store.classic_key(uid, s, "B"))
            for s in (0, *cl.APP_SECTORS)
        }
        record = PurseRecord(0, balance, 0)

        def sector(s: int, blocks: dict[int, bytes]) -> None:
            self.access.authenticate(layout.first_block(s, self.card_type), transport_key, "A")
            for block, data in blocks.items():
                self.access.write(block, data)
            self.access.write(
                layout.trailer_block(s, self.card_type), cl.sector_trailer(s, *keys[s])
                if s else cl.mad_trailer(keys[0][1])
            )

        mad = cl.encode_mad({s: cl.APP_AID for s in cl.APP_SECTORS})
        sector(0, {1: mad[:16], 2: mad[16:]})
        b4, b5 = identity.blocks(macs)
        sector(1, {4: b4, 5: b5, 6: bytes(16)})
        sector(2, {
            8: layout.encode_value_block(balance, 8),
            9: layout.encode_value_block(balance, 8),
            10: record.block(macs, EMPTY_TRIP),
        })
        sector(3, {12: bytes(16), 13: bytes(16),
                   14: layout.encode_value_block(cl.STATUS_ACTIVE, 14)})
        self._sector = None


def _restated(
    snap: CardSnapshot, state: PurseState, pending: TripRecord | None
) -> CardSnapshot:
    """``replace(snap, state=state, pending=pending)`` without replace's field walk."""
    return type(snap)(
        snap.uid, snap.identity, snap.pass_block, snap.purse, snap.backup, snap.record,
        snap.trips, snap.status, state, pending,
    )


def pass_for(product_id: int, loaded_at: int, days: int = 30) -> PassBlock:
    """A pass block valid for ``days`` days from the moment it was loaded, with an exclusive
    end: the same rule as :meth:`firmware.core.fares.FareTable.pass_for`, which top-up
    terminals use with the tariff's validity."""
    return PassBlock(product_id, loaded_at, loaded_at + int(timedelta(days=days).total_seconds()))
