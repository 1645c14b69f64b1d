"""Fuzzing what a card holds: a virtual card whose application blocks (and trailers) hold
anything, read by :meth:`Purse.read`, decoded by ``afc card inspect`` and tapped on a
validator.

A card is attacker-controlled input (a cloner writes any bytes he likes once he has the
keys; a torn write leaves half a block): reading one may refuse it only with a
:class:`~firmware.core.errors.CoreError` subclass (CardForged, CodecError,
AuthenticationError ...), never another exception, and a validator tap never raises at all.
"""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.apps.cards import FieldCardSource
from firmware.apps.clock import GuardedClock
from firmware.apps.ui import RecordingUi
from firmware.apps.validator import Validator, ValidatorConfig
from firmware.core import classic_layout as layout
from firmware.core import tariffs
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity
from firmware.core.errors import CoreError
from firmware.core.keys import MemoryKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import Purse, PurseState
from firmware.stores.database import DeviceDatabase
from simulators.cards import VirtualCard
from tools.card_cmd import _decode_application

KEYS = MemoryKeyStore({"classic-sector": bytes(range(16)), "purse-mac": bytes(range(1, 17)),
                       "journal-mac": bytes(range(2, 18))})
NOW = 1_767_258_000
APP_BLOCKS = (4, 5, 6, 8, 9, 10, 12, 13, 14)
TRAILERS = (7, 11, 15)


def _reader(card: VirtualCard) -> ClassicReader:
    air = Field([card])
    air.reset()
    card.place()
    selected = select_card(air.transceive)
    rng = random.Random(3)
    return ClassicReader(air.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))


def _issued() -> tuple[bytes, bytes]:
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(77))
    Purse(_reader(card), KEYS, key_type="B").issue(
        Identity(123_456, 2, 1, NOW - 86400, NOW + 900 * 86400, NOW + 200 * 86400, 1,
                 b"FUZZ0001"), balance=5_000)
    return card.uid, bytes(card.memory)


UID, IMAGE = _issued()

block_content = st.one_of(
    st.none(),  # as issued
    st.binary(min_size=16, max_size=16),
    st.builds(layout.encode_value_block, st.integers(-(2**31), 2**31 - 1),
              st.integers(0, 255)),
    st.tuples(st.integers(0, 127)).map(lambda bit: ("flip", bit[0])),
)
trailer_content = st.one_of(
    st.none(),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=3, max_size=3).map(lambda access: ("access", access)),
)


def fuzzed_card(blocks, trailers) -> VirtualCard:
    memory = bytearray(IMAGE)
    for block, content in zip(APP_BLOCKS, blocks, strict=True):
        start = 16 * block
        if content is None:
            continue
        if isinstance(content, tuple):  # one flipped bit of what was issued
            memory[start + content[1] // 8] ^= 1 << (content[1] % 8)
        else:
            memory[start:start + 16] = content
    for block, content in zip(TRAILERS, trailers, strict=True):
        start = 16 * block
        if content is None:
            continue
        if isinstance(content, tuple):  # same keys, any access bits
            memory[start + 6:start + 9] = content[1]
        else:
            memory[start:start + 16] = content
    return VirtualCard(UID, memory, rng=random.Random(5))


@given(st.lists(block_content, min_size=9, max_size=9),
       st.lists(trailer_content, min_size=3, max_size=3))
def test_reading_any_card_contents_raises_only_core_errors(blocks, trailers):
    card = fuzzed_card(blocks, trailers)
    try:
        snap = Purse(_reader(card), KEYS).read()
    except CoreError:
        return
    assert snap.state in PurseState
    if snap.state is not PurseState.CONSISTENT:
        with contextlib.suppress(CoreError):
            Purse(_reader(card), KEYS).repair(snap)


@given(st.lists(block_content, min_size=9, max_size=9))
def test_inspect_decodes_any_application_blocks(blocks):
    card = fuzzed_card(blocks, [None, None, None])
    raw = {b: bytes(card.memory[16 * b:16 * b + 16]) for b in APP_BLOCKS}
    try:
        report = _decode_application(UID, raw, KEYS)
    except CoreError:
        return
    assert set(report) == {"identity", "pass", "purse", "trips", "status"}
    if all(b is None for b in blocks):
        assert report["identity"]["check"]["ok"] and report["purse"]["checks"][2]["ok"]


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    db = DeviceDatabase.open(tmp_path_factory.mktemp("fuzz") / "v.db", device_id="fuzz-v1",
                             journal_key=KEYS)
    saved: list[int] = []
    clock = GuardedClock(lambda: saved[-1] if saved else None, saved.append,
                         wall=lambda: NOW)
    v = Validator(ValidatorConfig("fuzz-v1", 1, 1, 1, "merkez"), FieldCardSource(Field([])),
                  db, KEYS, tariffs.load("konya-2025"), RecordingUi(), clock)
    yield v
    db.close()


@given(blocks=st.lists(block_content, min_size=9, max_size=9),
       trailers=st.lists(trailer_content, min_size=3, max_size=3))
def test_a_validator_tap_on_any_card_contents_never_raises(validator, blocks, trailers):
    card = fuzzed_card(blocks, trailers)
    outcome = validator.tap(_reader(card))
    if outcome.accepted:
        assert outcome.fare >= 0 and outcome.card_number is not None


@pytest.mark.slow
def test_soak_random_cards_through_purse_read():
    rng = random.Random(1)
    for _ in range(20_000):
        blocks = [None if rng.random() < 0.6 else rng.randbytes(16) for _ in APP_BLOCKS]
        trailers = [None if rng.random() < 0.9 else rng.randbytes(16) for _ in TRAILERS]
        with contextlib.suppress(CoreError):
            Purse(_reader(fuzzed_card(blocks, trailers)), KEYS).read()
