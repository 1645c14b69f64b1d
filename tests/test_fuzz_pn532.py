"""Fuzzing the PN532 host line: the codec on both sides and the emulated chip behind it.

A reader cable delivers anything (noise, a second host, a chip answering garbage): the codec
must turn every byte sequence into events and never raise, keep its memory bounded, and
decode well-formed frames the same whatever chunks they arrive in; the emulator must answer
any frame without an internal error. Bounded in CI (the hypothesis profile of conftest.py;
AFC_SLOW=1 raises it), plus a seeded soak marked ``slow``.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.reader.codec import (
    HARD_MAX_BUFFERED,
    Ack,
    BadFrame,
    ErrorFrame,
    Frame,
    Garbage,
    Nack,
    Pn532Codec,
    encode_command,
    encode_frame,
    encode_response,
)
from firmware.reader.constants import Command
from simulators.cards import VirtualCard
from simulators.pn532.emulator import Pn532Emulator

EVENTS = (Ack, Nack, ErrorFrame, Frame, BadFrame, Garbage)
CODES = [int(c) for c in Command]


def drain(codec: Pn532Codec, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        codec.feed(chunk)
        events += codec.events()
        assert codec.buffered <= HARD_MAX_BUFFERED + len(chunk)
    return events


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
def test_codec_turns_any_bytes_into_events(chunks, host):
    codec = Pn532Codec.for_host() if host else Pn532Codec.for_chip()
    events = drain(codec, chunks)
    assert all(isinstance(e, EVENTS) for e in events)


@given(st.lists(st.tuples(st.sampled_from(CODES), st.binary(max_size=262)), min_size=1,
                max_size=8),
       st.lists(st.integers(0, 5000), max_size=12))
def test_well_formed_frames_decode_the_same_in_any_chunks(frames, cuts):
    stream = b"".join(encode_response(code, data) for code, data in frames)
    events = drain(Pn532Codec.for_host(), chunked(stream, cuts))
    assert [(e.command, e.params) for e in events] == [(c + 1, d) for c, d in frames]


@given(st.binary(max_size=64), st.sampled_from(CODES), st.binary(max_size=40))
def test_a_frame_after_garbage_free_of_start_codes_is_found(noise, code, params):
    noise = noise.replace(b"\x00\xff", b"\x00\xfe")
    if noise.endswith(b"\x00"):
        noise += b"\x01"
    events = drain(Pn532Codec.for_chip(), [noise + encode_command(code, params)])
    frames = [e for e in events if isinstance(e, Frame)]
    assert [(f.command, f.params) for f in frames] == [(code, params)]


def _emulator(seed: int) -> Pn532Emulator:
    rng = random.Random(seed)
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
    return Pn532Emulator([card], nonce=lambda: rng.getrandbits(32))


@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(CODES), st.binary(max_size=48)).map(
        lambda cp: encode_command(*cp)),
    st.tuples(st.integers(0, 255), st.binary(max_size=48)).map(
        lambda cp: encode_frame(0xD4, bytes([cp[0]]) + cp[1])),
    st.binary(max_size=40),
), max_size=12), st.integers(0, 2**16))
def test_the_emulated_chip_answers_any_frame_without_an_internal_error(frames, seed):
    chip = _emulator(seed)
    for frame in frames:
        out = chip.receive(frame)
        out += chip.poll()
        assert isinstance(out, bytes)
        assert all(isinstance(e, EVENTS) for e in drain(Pn532Codec.for_host(), [out]))
    assert chip.internal_errors == 0


@pytest.mark.slow
def test_soak_the_codec_and_the_chip_with_seeded_noise():
    rng = random.Random(20251127)
    for round_ in range(2_000):
        chip = _emulator(round_)
        codec = Pn532Codec.for_host()
        for _ in range(50):
            if rng.random() < 0.5:
                data = encode_command(rng.choice(CODES), rng.randbytes(rng.randrange(0, 40)))
            else:
                data = rng.randbytes(rng.randrange(0, 80))
            out = chip.receive(data) + chip.poll()
            drain(codec, [out])
        assert chip.internal_errors == 0
