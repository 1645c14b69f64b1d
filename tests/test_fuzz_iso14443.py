"""Fuzzing ISO/IEC 14443-3 type A framing and the card model that sits behind it.

Whatever arrives on the air (noise, a truncated frame, wrong parity, a relay attacker's
bits): :class:`BitFrame` packing, ``decode``/``split``/``strip_crc`` (Cython) and their
pure-Python references must agree, result for result and error class for error class, and
raise nothing but :class:`~firmware.core.errors.FrameError`; a virtual MIFARE Classic
card must answer any sequence of frames with a frame (or silence), never an exception.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.core.errors import FrameError
from firmware.core.iso14443a import (
    BitFrame,
    decode,
    decode_ref,
    split,
    split_ref,
    strip_crc,
    strip_crc_ref,
    with_crc,
)
from simulators.cards import VirtualCard


def outcome(fn, *args):
    """The result, or the class of the FrameError raised (anything else propagates)."""
    try:
        return ("ok", fn(*args))
    except FrameError as exc:
        return ("error", type(exc))


frames = st.builds(
    lambda data, last: BitFrame.from_packed(data, last) if data else BitFrame(0, 0),
    st.binary(max_size=40), st.integers(1, 8))


@given(st.binary(max_size=64), st.integers(-2, 10))
def test_from_packed_accepts_or_refuses_cleanly(data, last_bits):
    got = outcome(BitFrame.from_packed, data, last_bits)
    if got[0] == "ok":
        frame = got[1]
        assert frame.length <= 8 * len(data)
        if data:
            assert BitFrame.from_packed(*frame.to_packed()) == frame


@given(frames)
def test_decode_and_split_agree_with_the_reference_on_any_frame(frame):
    assert outcome(decode, frame) == outcome(decode_ref, frame)
    assert outcome(split, frame) == outcome(split_ref, frame)


@given(st.binary(max_size=64))
def test_strip_crc_agrees_with_the_reference_on_any_bytes(data):
    assert outcome(strip_crc, data) == outcome(strip_crc_ref, data)
    if data:  # a frame carries at least one byte before its CRC_A
        assert strip_crc(with_crc(data)) == data


@given(st.lists(frames, max_size=25), st.integers(0, 2**16), st.booleans())
def test_a_virtual_card_answers_any_frames(sequence, seed, activate):
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
    card.reset()
    if activate:
        card.handle(BitFrame(0x26, 7))  # REQA: the card is then READY for anything
    for frame in sequence:
        answer = card.handle(frame)
        assert isinstance(answer, BitFrame)


@pytest.mark.slow
def test_soak_a_card_with_seeded_noise():
    rng = random.Random(14443)
    for round_ in range(5_000):
        card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(round_))
        card.reset()
        card.handle(BitFrame(0x52, 7))
        for _ in range(40):
            n = rng.randrange(0, 20)
            frame = BitFrame.from_packed(rng.randbytes(n), rng.randrange(1, 9)) if n else \
                BitFrame(0, 0)
            assert isinstance(card.handle(frame), BitFrame)
