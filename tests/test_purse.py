"""The card application: issuing, reading, the tear-safe purse protocol, forgery detection.

Runs the real protocol against a virtual card in process, through the core's reader side
(host Crypto1, bit frames), so every tear lands between two real card commands.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from firmware.core import card_layout as cl
from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import CardForged, Identity
from firmware.core.errors import CoreError, NackError
from firmware.core.fares import TripRecord
from firmware.core.keys import MemoryKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import (
    PRODUCT_PASS,
    Purse,
    PurseState,
    pass_for,
    purse_delta,
    topup_trip,
)
from simulators.cards import VirtualCard

NOW = 1_767_225_600  # 2026-01-01 00:00 UTC
STORE = MemoryKeyStore({"classic-sector": bytes(range(16)), "purse-mac": bytes(range(16, 32))})
IDENTITY = Identity(
    card_number=1234567, card_type=1, issuer=1, issued=NOW - 86400 * 30,
    expires=NOW + 86400 * 365 * 5, discount_until=NOW + 86400 * 200, key_version=1,
    holder_ref=b"HOLDER01",
)


def ride(fare: int, t: int = NOW, line: int = 10, product: int = 0) -> TripRecord:
    return TripRecord(counter=0, time=t, line_id=line, validator_id=7, fare=fare,
                      transfer_step=0, flags=product)


class Rig:
    """A virtual card in an in-process field, and a way to tap it."""

    def __init__(self, seed: int = 1, balance: int = 10_000) -> None:
        self.card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
        self.field = Field([self.card])
        self.rng = random.Random(seed + 1)
        purse = self.tap(key_type="B")
        purse.issue(IDENTITY, balance=balance)

    def tap(self, key_type: str = "A") -> Purse:
        self.field.reset()
        self.card.place()
        selected = select_card(self.field.transceive)
        reader = ClassicReader(self.field.transceive, selected.uid,
                               nonce=lambda: self.rng.getrandbits(32))
        return Purse(reader, STORE, key_type=key_type)

    def snapshot(self, key_type: str = "A"):
        return self.tap(key_type).read()


def test_issue_and_read_back():
    rig = Rig()
    snap = rig.snapshot()
    assert snap.identity.card_number == 1234567
    assert snap.identity.holder_ref == b"HOLDER01"
    assert snap.balance == snap.purse == snap.backup == 10_000
    assert snap.counter == 0 and snap.state is PurseState.CONSISTENT
    assert not snap.blocked and snap.pass_block is None
    mad = rig.card.memory[16:48]
    assert cl.decode_mad(bytes(mad)) == {1: cl.APP_AID, 2: cl.APP_AID, 3: cl.APP_AID}


def test_rides_fill_the_trip_ring_and_keep_the_balance():
    rig = Rig()
    for i in range(5):
        purse = rig.tap()
        snap = purse.read()
        new = purse.apply(snap, ride(1500, NOW + 600 * i, line=10 + i), day_spent=1500 * (i + 1))
        assert new.counter == i + 1
        assert new.balance == 10_000 - 1500 * (i + 1)
    snap = rig.snapshot()
    assert snap.balance == 10_000 - 5 * 1500 and snap.counter == 5
    assert [t.line_id for t in snap.recent_trips()] == [14, 13]
    assert snap.record.day_spent == 5 * 1500
    assert snap.view().balance == snap.balance and snap.view().day_spent == 5 * 1500
    assert [t.line_id for t in snap.view().trips] == [14, 13]


def test_topup_with_key_b_and_validators_cannot_add_value():
    rig = Rig()
    purse = rig.tap("B")
    snap = purse.read()
    new = purse.apply(snap, topup_trip(0, NOW, terminal_id=99, amount=150_000))
    assert new.balance == 160_000 and purse_delta(new.newest_trip) == 150_000
    assert rig.snapshot().balance == 160_000
    purse = rig.tap("A")
    snap = purse.read()
    with pytest.raises(NackError):
        purse.apply(snap, topup_trip(0, NOW, terminal_id=99, amount=100))  # no INCREMENT for A


def test_block_is_one_way_for_key_a():
    rig = Rig()
    purse = rig.tap()
    purse.read()
    purse.block_card()
    snap = rig.snapshot()
    assert snap.blocked
    purse = rig.tap()
    purse.read()
    key = STORE.classic_key(purse.uid, cl.TRIP_SECTOR, "A")
    purse.access.authenticate(12, key, "A")
    with pytest.raises(NackError):
        purse.access.increment(cl.BLOCK_STATUS, 1)


def test_pass_is_written_with_key_b_and_verified():
    rig = Rig()
    purse = rig.tap("B")
    purse.read()
    purse.write_pass(pass_for(7, NOW + 1234))
    snap = rig.snapshot()
    assert snap.pass_block.product_id == 7
    assert snap.pass_block.valid_from == NOW + 1234  # from the moment it was loaded
    assert snap.pass_block.valid_until == NOW + 1234 + 30 * 86400


def cracked_write(rig: Rig, block: int, data: bytes) -> None:
    """An attacker who cracked the Crypto1 keys (but has no MAC key) writes a block."""
    purse = rig.tap("B")
    sector = layout.sector_of(block, layout.CardType.CLASSIC_1K)
    purse.access.authenticate(block, STORE.classic_key(purse.uid, sector, "B"), "B")
    purse.access.write(block, data)


def test_edited_balance_is_forged():
    rig = Rig()
    cracked_write(rig, 8, layout.encode_value_block(999_999, 8))
    cracked_write(rig, 9, layout.encode_value_block(999_999, 8))
    with pytest.raises(CardForged):
        rig.snapshot()


def test_edited_record_is_forged():
    rig = Rig()
    raw = bytearray(rig.card.block(10))
    raw[4:8] = (999_999).to_bytes(4, "little")
    cracked_write(rig, 8, layout.encode_value_block(999_999, 8))
    cracked_write(rig, 9, layout.encode_value_block(999_999, 8))
    cracked_write(rig, 10, bytes(raw))
    with pytest.raises(CardForged, match="MAC"):
        rig.snapshot()


def test_edited_card_type_is_forged():
    rig = Rig()
    raw = bytearray(rig.card.block(4))
    raw[4] = 2  # make it a different rider category
    cracked_write(rig, 4, bytes(raw))
    with pytest.raises(CardForged, match="identity"):
        rig.snapshot()


def test_rolled_back_card_still_verifies_and_shows_an_old_counter():
    """A restored dump carries valid MACs: only the counter gives it away (the validator's
    last_counter and the center catch it; see docs/card-layout.md)."""
    rig = Rig()
    dump = bytes(rig.card.memory)
    purse = rig.tap()
    purse.apply(purse.read(), ride(2250))
    rig.card.memory[:] = dump
    snap = rig.snapshot()
    assert snap.counter == 0 and snap.balance == 10_000


# -- tears ---------------------------------------------------------------------------------------

FLOWS = {
    "charge": ("A", lambda: ride(2250)),
    "free-ride": ("A", lambda: ride(0, product=PRODUCT_PASS)),
    "topup": ("B", lambda: topup_trip(0, NOW, 5, 70_000)),
}


def frames_of(rig: Rig, key_type: str, trip_factory) -> int:
    """How many frames an update takes after the read (to tear at each of them)."""
    purse = rig.tap(key_type)
    snap = purse.read()
    before = rig.card.counters.frames
    purse.apply(snap, trip_factory())
    return rig.card.counters.frames - before


@pytest.mark.parametrize("flow", list(FLOWS))
def test_tear_at_every_command_boundary(flow):
    key_type, make = FLOWS[flow]
    n = frames_of(Rig(), key_type, make)
    assert n >= 6
    for k in range(1, n + 1):
        for answer in (True, False):
            rig = Rig(seed=k)
            purse = rig.tap(key_type)
            snap = purse.read()
            old_balance, old_counter = snap.balance, snap.counter
            delta = purse_delta(make())
            rig.card.faults.tear_after(k, answer=answer)
            with pytest.raises(CoreError):
                purse.apply(snap, make())
                raise CoreError("the tear never came")  # the last frame was answered
            rig.card.faults.clear()
            purse = rig.tap("A")
            after = purse.read()
            repaired = purse.repair(after)
            final = rig.tap("A").read()
            assert final.state in (PurseState.CONSISTENT, PurseState.GHOST_TRIP)
            assert final.purse == final.backup == final.balance
            assert (final.balance, final.counter) in (
                (old_balance, old_counter),
                (old_balance + delta, old_counter + 1),
            ), (k, answer, after.state)
            if final.counter == old_counter + 1:
                assert purse_delta(final.newest_trip) == delta
            assert repaired.balance == final.balance


def test_value_ops_unsupported_by_a_magic_clone_refuse_the_ride():
    """A clone card that NACKs value-block commands: the ride fails cleanly, nothing moved."""
    rig = Rig()
    purse = rig.tap()
    snap = purse.read()
    chip = rig.card.tag.card
    real_permits = chip._permits
    value_ops = ("decrement", "increment", "restore", "transfer")
    chip._permits = lambda block, op: op not in value_ops and real_permits(block, op)
    with pytest.raises(NackError):
        purse.apply(snap, ride(2250))
    chip._permits = real_permits
    after = rig.snapshot()
    assert after.balance == 10_000 and after.state is PurseState.GHOST_TRIP


def test_trip_record_bytes_are_what_the_record_mac_covers():
    rig = Rig()
    purse = rig.tap()
    new = purse.apply(purse.read(), ride(900))
    record, tag = cl.PurseRecord.parse(rig.card.block(10))
    macs = cl.CardMacs(STORE, rig.card.uid)
    assert record.verifies(macs, tag, new.newest_trip.to_bytes())
    other = replace(new.newest_trip, fare=901).to_bytes()
    assert not record.verifies(macs, tag, other)
