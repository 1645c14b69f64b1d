"""The Cython framing core (``firmware/core/_framing.pyx``) against its pure-Python reference.

Every public framing function of :mod:`firmware.core.iso14443a` and :mod:`firmware.core.crypto1`
is the Cython version; the ``_ref`` function beside it is the specification. Each test runs both
on the same random input and demands the same outcome: the same value of the same type, or the
same exception class with the same message, and for the cipher helpers the same cipher state
afterwards. Inputs the fast path hands to the reference (memoryviews, lists of ints, subclasses,
the reference cipher) are included, so the dispatch itself is checked too.
"""

from __future__ import annotations

import array
import dataclasses
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core import _framing, crypto1, iso14443a
from firmware.core.crypto1 import Crypto1, Crypto1Ref
from firmware.core.errors import CrcError, FrameError, ParityError
from firmware.core.iso14443a import BitFrame

FRAMING = ["crc_a", "with_crc", "strip_crc", "encode", "split", "decode"]
CIPHER_HELPERS = [
    "encrypt_frame",
    "decrypt_frame",
    "encrypt_bits",
    "decrypt_bits",
    "encrypt_nested_nonce",
    "decrypt_nested_nonce",
    "encrypt_reader_answer",
    "decrypt_reader_answer",
]
MASK48 = (1 << 48) - 1


def typed(value):
    """A value with the types of all its parts, so ``b"" == bytearray()`` or ``1 == True``
    cannot pass for equal."""
    if isinstance(value, (tuple, list)):
        return type(value), tuple(typed(v) for v in value)
    if isinstance(value, BitFrame):
        return type(value), value.bits, type(value.bits), value.length, value.collision
    return type(value), value


def outcome(fn, *args):
    try:
        return "ok", typed(fn(*args))
    except Exception as exc:
        return "raised", type(exc), str(exc)


def same(name, module, *args):
    """Run ``name`` and ``name_ref`` of ``module`` on ``args``; both outcomes must match."""
    fast = outcome(getattr(module, name), *args)
    ref = outcome(getattr(module, name + "_ref"), *args)
    assert fast == ref, (name, args)
    return fast


class IntSub(int):
    pass


class BytesSub(bytes):
    pass


class FrameSub(BitFrame):
    __slots__ = ()


class Crypto1Sub(Crypto1):
    pass


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------


def test_public_names_are_the_fast_paths_and_references_stay_exported():
    for name in FRAMING:
        assert getattr(iso14443a, name) is getattr(_framing, name)
        assert getattr(iso14443a, name + "_ref").__module__ == "firmware.core.iso14443a"
        assert name in iso14443a.__all__ and name + "_ref" in iso14443a.__all__
    for name in CIPHER_HELPERS:
        assert getattr(crypto1, name) is getattr(_framing, name)
        assert getattr(crypto1, name + "_ref").__module__ == "firmware.core.crypto1"
        assert name in crypto1.__all__ and name + "_ref" in crypto1.__all__


def test_keyword_arguments_as_before():
    frame = iso14443a.encode(data=b"\x93\x20", parity=[1, 0])
    assert iso14443a.split(frame=frame) == (b"\x93\x20", [1, 0])
    assert iso14443a.decode(frame=frame) == b"\x93\x20"
    assert iso14443a.crc_a(data=b"") == b"\x63\x63"
    assert iso14443a.strip_crc(frame=iso14443a.with_crc(data=b"\x50\x00")) == b"\x50\x00"
    a, b = Crypto1(0xA0A1A2A3A4A5), Crypto1(0xA0A1A2A3A4A5)
    sent = crypto1.encrypt_frame(cipher=a, plain=b"\x30\x04", feed=False)
    assert crypto1.decrypt_frame(cipher=b, frame=sent, feed=False) == b"\x30\x04"
    ack = crypto1.encrypt_bits(cipher=a, value=0xA, nbits=4)
    assert crypto1.decrypt_bits(cipher=b, frame=ack) == 0xA


def test_the_fast_module_can_be_imported_first():
    """_framing takes BitFrame and its tables from iso14443a on first use, so importing it
    before anything else (no import cycle) still works."""
    code = (
        "from firmware.core import _framing\n"
        "f = _framing.encode(b'\\x93\\x20')\n"
        "assert type(f).__module__ == 'firmware.core.iso14443a', type(f)\n"
        "assert _framing.split(f) == (b'\\x93\\x20', [1, 0])\n"
        "assert _framing.crc_a(b'123456789') == b'\\x05\\xbf'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# CRC_A
# ---------------------------------------------------------------------------------------------

buffers = st.binary(max_size=64)
as_type = st.sampled_from([bytes, bytearray])


@settings(max_examples=500)
@given(data=buffers, kind=as_type)
def test_crc_a_and_with_crc(data, kind):
    same("crc_a", iso14443a, kind(data))
    same("with_crc", iso14443a, kind(data))


@settings(max_examples=400)
@given(payload=st.binary(max_size=64), kind=as_type, data=st.data())
def test_strip_crc_correct_and_corrupted(payload, kind, data):
    frame = bytearray(iso14443a.with_crc_ref(payload))
    assert same("strip_crc", iso14443a, kind(frame))[0] == ("ok" if len(payload) else "raised")
    # corrupt 1..3 bits, or cut the frame short
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(frame) - 1))
        frame[bit // 8] ^= 1 << (bit % 8)
    same("strip_crc", iso14443a, kind(frame))
    same("strip_crc", iso14443a, kind(frame[: data.draw(st.integers(0, len(frame)))]))


@pytest.mark.parametrize("frame", [b"", b"\x63", b"\x63\x63", b"\x57\xcd", b"\x50\x00\xcd\x57"])
def test_strip_crc_error_messages(frame):
    outcome_ = same("strip_crc", iso14443a, frame)
    assert outcome_[:2] == ("raised", CrcError)


# ---------------------------------------------------------------------------------------------
# encode / split / decode
# ---------------------------------------------------------------------------------------------

parity_bits = st.integers(0, 1) | st.booleans()
odd_parity_values = st.integers() | st.booleans() | st.builds(IntSub, st.integers(-5, 5))


@settings(max_examples=400)
@given(data=buffers, kind=as_type, draw=st.data())
def test_encode(data, kind, draw):
    data = kind(data)
    same("encode", iso14443a, data)
    same("encode", iso14443a, data, None)
    n = len(data)
    parity = draw.draw(st.lists(parity_bits, min_size=n, max_size=n))
    same("encode", iso14443a, data, parity)
    same("encode", iso14443a, data, tuple(parity))
    # any ints at all (p & 1 decides), and a wrong count
    wild = draw.draw(st.lists(odd_parity_values, min_size=n, max_size=n))
    same("encode", iso14443a, data, wild)
    other = draw.draw(st.integers(0, 66).filter(lambda m: m != n))
    same("encode", iso14443a, data, [1] * other)
    same("encode", iso14443a, data, tuple([0] * other))


@pytest.mark.parametrize(
    "parity",
    [
        [1.0, 0],
        [None, 1],
        ["1", 0],
        [1, 1 << 200],
        [-(1 << 100) - 1, -1],
        range(2),
        array.array("B", [1, 0]),
        {0: 1, 1: 0},
        b"\x01\x00",
        42,
    ],
)
def test_encode_odd_parity_arguments(parity):
    same("encode", iso14443a, b"\x93\x20", parity)


@pytest.mark.parametrize(
    "data",
    [
        memoryview(b"\x93\x20"),
        [0x93, 0x20],
        (0x93, 0x20),
        array.array("B", [0x93, 0x20]),
        BytesSub(b"\x93\x20"),
        [0x93, 0x120],
        [-1],
        "ab",
        None,
        7,
    ],
)
def test_odd_data_arguments_follow_the_reference(data):
    for name in ("crc_a", "with_crc", "strip_crc", "encode"):
        same(name, iso14443a, data)
    same("encode", iso14443a, data, [1, 0])


def test_iterators_follow_the_reference():
    """One-shot iterables: each call gets a fresh one (with_crc_ref consumes it in bytes()
    before crc_a_ref sees it, and the fast path must do the same)."""
    for name in ("crc_a", "with_crc", "strip_crc", "encode"):
        fast = outcome(getattr(iso14443a, name), iter(b"\x93\x20\x01"))
        ref = outcome(getattr(iso14443a, name + "_ref"), iter(b"\x93\x20\x01"))
        assert fast == ref, name
    fast = outcome(iso14443a.encode, b"\x93\x20", iter([1, 0]))
    assert fast == outcome(iso14443a.encode_ref, b"\x93\x20", iter([1, 0]))


def frames(max_bits: int = 9 * 66):
    """BitFrames of any length (mostly whole 9-bit bytes), any bits, now and then a collision
    index, a subclass, or a bool where an int belongs."""
    lengths = st.integers(0, max_bits // 9).map(lambda n: 9 * n) | st.integers(0, max_bits)

    @st.composite
    def build(draw):
        length = draw(lengths)
        bits = draw(st.integers(0, (1 << length) - 1)) if length else 0
        collision = draw(st.sampled_from([-1, -1, -1, 0, length]))
        cls = draw(st.sampled_from([BitFrame] * 6 + [FrameSub]))
        return cls(bits, length, collision)

    return build()


@st.composite
def encoded_frames(draw):
    """Standard frames with the right parity, some with one bit flipped."""
    data = draw(st.binary(max_size=64))
    frame = iso14443a.encode_ref(data)
    if data and draw(st.booleans()):
        frame = BitFrame(frame.bits ^ (1 << draw(st.integers(0, frame.length - 1))), frame.length)
    return frame


@settings(max_examples=600)
@given(frame=frames() | encoded_frames())
def test_split_and_decode(frame):
    same("split", iso14443a, frame)
    same("decode", iso14443a, frame)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(BitFrame(0, 0), id="silence"),
        pytest.param(BitFrame(0, 1), id="1-bit"),
        pytest.param(BitFrame(0x1FF, 9), id="0xff-bad-parity"),
        pytest.param(BitFrame(True, 9), id="bool-bits"),
        pytest.param(BitFrame(0, True), id="bool-length"),
        # longer than the fast path takes, and not whole bytes
        pytest.param(BitFrame(1, 1 << 24 | 1), id="2^24+1-bits"),
        pytest.param(BitFrame((1 << 9 * 5000) - 1, 9 * 5000), id="5000-bytes-bad-parity"),
        pytest.param(iso14443a.encode_ref(bytes(range(256)) * 4), id="1024-bytes"),
        pytest.param(FrameSub(0x120, 18), id="subclass"),
    ],
)
def test_split_and_decode_edge_frames(frame):
    same("split", iso14443a, frame)
    same("decode", iso14443a, frame)


def test_split_and_decode_of_frames_built_around_the_constructor():
    """A frame whose fields were forced past BitFrame's check: the reference's arithmetic
    (not the fast path's) decides what it means."""
    forced = [
        (1 << 40, 18),
        (-5, 18),
        (-1, 9),
        (-(1 << 100), 162),
        (0x1FF, -9),
        (3, 1 << 70),
        (-5, 4),
        (1 << 9, 8),
        # around the one-word path of frames up to 7 bytes: bits past the length but within
        # its bytes, past its bytes, past 64 bits
        (1 << 39, 36),
        (1 << 40, 36),
        (1 << 70, 36),
        ((1 << 64) - 1, 63),
        (1 << 64, 63),
        ((1 << 72) - 1, 72),
    ]
    for bits, length in forced:
        frame = BitFrame(0, 0)
        object.__setattr__(frame, "bits", bits)
        object.__setattr__(frame, "length", length)
        same("split", iso14443a, frame)
        same("decode", iso14443a, frame)
        run_everywhere("decrypt_frame", 0x123456789ABC, 1, False, frame, across=False)
        run_everywhere("decrypt_bits", 0x123456789ABC, 1, False, frame, across=False)


@pytest.mark.parametrize("frame", [None, 18, (0, 18), b"\x00\x00\x00"])
def test_split_and_decode_of_non_frames(frame):
    same("split", iso14443a, frame)
    same("decode", iso14443a, frame)


def test_known_error_messages():
    assert outcome(iso14443a.split, BitFrame(0, 10)) == (
        "raised",
        FrameError,
        "frame of 10 bits is not a whole number of bytes with parity",
    )
    bad = BitFrame(iso14443a.encode(b"\x00\x01").bits ^ (1 << 17), 18)
    assert outcome(iso14443a.decode, bad) == (
        "raised",
        ParityError,
        "parity error in byte 1 of 2 (0x01)",
    )
    assert outcome(iso14443a.encode, b"\x01", [1, 0]) == (
        "raised",
        FrameError,
        "2 parity bits given for 1 bytes",
    )


# ---------------------------------------------------------------------------------------------
# Crypto1 frame helpers, with both cipher implementations
# ---------------------------------------------------------------------------------------------

CIPHER_CLASSES = [Crypto1, Crypto1Ref, Crypto1Sub]


def states(key: int, warmup: int, encrypted: bool):
    """One cipher per implementation, all in the same state (key, then ``warmup`` words)."""
    ciphers = [cls(key) for cls in CIPHER_CLASSES]
    for c in ciphers:
        for i in range(warmup):
            c.word((key * (i + 7)) & 0xFFFFFFFF, encrypted)
    return ciphers


def lfsr(cipher) -> int:
    return cipher.lfsr


def run_everywhere(name, key, warmup, encrypted, *args, across=True):
    """``name`` and ``name_ref`` with each cipher implementation: the same outcome and the
    same cipher state afterwards (then the same next keystream byte) for each implementation,
    and with ``across`` the same for all of them."""
    fast = [
        (outcome(getattr(crypto1, name), c, *args), lfsr(c), c.byte(0))
        for c in states(key, warmup, encrypted)
    ]
    ref = [
        (outcome(getattr(crypto1, name + "_ref"), c, *args), lfsr(c), c.byte(0))
        for c in states(key, warmup, encrypted)
    ]
    assert fast == ref, (name, args)
    if across:
        assert all(r == ref[0] for r in ref), (name, args, ref)
    return fast[0][0]


keys = st.integers(0, MASK48)
warmups = st.integers(0, 3)
payloads = st.binary(max_size=80)  # past 64 bytes the parity words no longer fit in 64 bits


@settings(max_examples=300)
@given(key=keys, warmup=warmups, encrypted=st.booleans(), plain=payloads, feed=st.booleans())
def test_encrypt_frame(key, warmup, encrypted, plain, feed):
    result = run_everywhere("encrypt_frame", key, warmup, encrypted, plain, feed)
    assert result[0] == "ok"
    run_everywhere("encrypt_frame", key, warmup, encrypted, bytearray(plain))


@settings(max_examples=300)
@given(key=keys, warmup=warmups, plain=payloads, feed=st.booleans(), draw=st.data())
def test_decrypt_frame_of_genuine_and_damaged_frames(key, warmup, plain, feed, draw):
    frame = crypto1.encrypt_frame_ref(states(key, warmup, False)[1], plain, feed)
    assert run_everywhere("decrypt_frame", key, warmup, False, frame, feed) == (
        "ok",
        (bytes, plain),
    )
    if plain:
        flipped = frame.bits ^ (1 << draw.draw(st.integers(0, frame.length - 1)))
        damaged = BitFrame(flipped, 9 * len(plain))
        result = run_everywhere("decrypt_frame", key, warmup, False, damaged, feed)
        assert result[:2] == ("raised", ParityError) or feed
    # a different key stream (a wrong key): garbage with, nearly always, a parity error
    run_everywhere("decrypt_frame", key ^ 1, warmup, False, frame, feed)


@settings(max_examples=300)
@given(key=keys, warmup=warmups, frame=frames(), feed=st.booleans())
def test_decrypt_frame_of_random_frames(key, warmup, frame, feed):
    run_everywhere("decrypt_frame", key, warmup, True, frame, feed)


@settings(max_examples=300)
@given(
    key=keys,
    warmup=warmups,
    value=st.integers(0, 15) | st.integers(),
    nbits=st.integers(0, 8) | st.integers(-3, 70),
)
def test_encrypt_bits(key, warmup, value, nbits):
    run_everywhere("encrypt_bits", key, warmup, False, value, nbits)


@settings(max_examples=300)
@given(key=keys, warmup=warmups, length=st.integers(0, 12), data=st.data())
def test_decrypt_bits(key, warmup, length, data):
    frame = BitFrame(data.draw(st.integers(0, (1 << length) - 1)), length)
    result = run_everywhere("decrypt_bits", key, warmup, False, frame)
    assert (result[0] == "ok") == (length <= 8)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("encrypt_frame", ([1, 2, 3],)),
        ("encrypt_frame", ("abc",)),
        ("encrypt_frame", (memoryview(b"abc"), 1)),
        ("decrypt_frame", (BitFrame(0, 10),)),
        ("decrypt_frame", (None,)),
        ("decrypt_frame", (FrameSub(0x1FF, 9),)),
        ("encrypt_bits", (0xA, True)),
        ("encrypt_bits", (IntSub(5), 4)),
        ("encrypt_bits", (1.5, 4)),
        ("encrypt_bits", (-1, 64)),
        ("encrypt_bits", (1 << 200, 65)),
        ("decrypt_bits", (BitFrame(0, 9),)),
        ("decrypt_bits", (BitFrame(True, 1),)),
        ("decrypt_bits", (FrameSub(5, 4),)),
        ("decrypt_bits", (b"\x05",)),
    ],
    ids=repr,
)
def test_cipher_helpers_on_odd_arguments(name, args):
    # the two ciphers reject odd plaintexts with messages of their own: compare per cipher
    run_everywhere(name, 0xFFFFFFFFFFFF, 1, False, *args, across=False)


def test_cipher_helper_error_messages():
    frame = crypto1.encrypt_frame(Crypto1(0xA0A1A2A3A4A5), b"\x30\x04\x26\xee")
    assert outcome(crypto1.decrypt_frame, Crypto1(0xB0B1B2B3B4B5), frame)[:2] == (
        "raised",
        ParityError,
    )
    assert outcome(crypto1.decrypt_bits, Crypto1(1), BitFrame(0, 9)) == (
        "raised",
        FrameError,
        "a short encrypted frame has at most 8 bits, got 9",
    )


# ---------------------------------------------------------------------------------------------
# Frames built in C
# ---------------------------------------------------------------------------------------------


def test_frames_built_in_c_are_ordinary_bitframes():
    """The fast paths build BitFrames without running their __init__ (the values fit by
    construction); the result must be indistinguishable from a constructed one."""
    cipher = Crypto1(0xA0A1A2A3A4A5)
    built = [
        iso14443a.encode(b"\x93\x20"),
        iso14443a.encode(b"\x01\x02\x03", [0, 1, 0]),
        crypto1.encrypt_frame(cipher, b"\x30\x04\x26\xee"),
        crypto1.encrypt_bits(cipher, 0xA, 4),
        crypto1.encrypt_nested_nonce(cipher, 0x01020304, 0x0A0B0C0D),
        crypto1.encrypt_reader_answer(cipher, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"),
    ]
    for frame in built:
        twin = BitFrame(frame.bits, frame.length)
        assert type(frame) is BitFrame
        assert frame == twin and hash(frame) == hash(twin) and repr(frame) == repr(twin)
        assert dataclasses.astuple(frame) == (frame.bits, frame.length, -1)
        assert type(frame.bits) is int and type(frame.length) is int
        assert pickle.loads(pickle.dumps(frame)) == frame
        with pytest.raises(dataclasses.FrozenInstanceError):
            frame.bits = 0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Authentication helpers: nested nonce and the reader's answer
# ---------------------------------------------------------------------------------------------

words = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=300)
@given(key=keys, warmup=warmups, cuid=words, nt=words)
def test_nested_nonce_round_trip(key, warmup, cuid, nt):
    frame = run_everywhere("encrypt_nested_nonce", key, warmup, False, cuid, nt)
    assert frame[0] == "ok"
    sent = crypto1.encrypt_nested_nonce_ref(states(key, warmup, False)[1], cuid, nt)
    assert run_everywhere("decrypt_nested_nonce", key, warmup, False, cuid, sent) == (
        "ok",
        (int, nt),
    )
    # another key (the card does not hold it): nearly always a parity mismatch, None
    run_everywhere("decrypt_nested_nonce", key ^ 0x10, warmup, False, cuid, sent)


@settings(max_examples=300)
@given(key=keys, warmup=warmups, cuid=words, frame=frames(), draw=st.data())
def test_decrypt_nested_nonce_of_random_frames(key, warmup, cuid, frame, draw):
    run_everywhere("decrypt_nested_nonce", key, warmup, True, cuid, frame)
    nonce = BitFrame(draw.draw(st.integers(0, (1 << 36) - 1)), 36)
    run_everywhere("decrypt_nested_nonce", key, warmup, True, cuid, nonce)


@settings(max_examples=300)
@given(
    key=keys,
    warmup=warmups,
    nr=st.binary(min_size=4, max_size=4),
    ar=st.binary(min_size=4, max_size=4),
    draw=st.data(),
)
def test_reader_answer_round_trip_and_damage(key, warmup, nr, ar, draw):
    result = run_everywhere("encrypt_reader_answer", key, warmup, False, nr, ar)
    assert result[0] == "ok"
    run_everywhere("encrypt_reader_answer", key, warmup, False, bytearray(nr), ar)
    frame = crypto1.encrypt_reader_answer_ref(states(key, warmup, False)[1], nr, ar)
    assert run_everywhere("decrypt_reader_answer", key, warmup, False, frame) == (
        "ok",
        (bytes, nr + ar),
    )
    flipped = BitFrame(frame.bits ^ (1 << draw.draw(st.integers(0, 71))), 72)
    run_everywhere("decrypt_reader_answer", key, warmup, False, flipped)


@settings(max_examples=300)
@given(
    key=keys,
    warmup=warmups,
    nr=st.binary(max_size=40),
    ar=st.binary(max_size=40),
    frame=frames(),
)
def test_reader_answer_of_any_length_and_random_frames(key, warmup, nr, ar, frame):
    run_everywhere("encrypt_reader_answer", key, warmup, True, nr, ar)
    run_everywhere("decrypt_reader_answer", key, warmup, True, frame)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("encrypt_nested_nonce", (-1, 5)),
        ("encrypt_nested_nonce", (5, 1 << 32)),
        ("encrypt_nested_nonce", (True, 5)),
        ("encrypt_nested_nonce", (IntSub(5), 5)),
        ("encrypt_nested_nonce", (1.5, 5)),
        ("decrypt_nested_nonce", (1 << 32, BitFrame(0, 36))),
        ("decrypt_nested_nonce", (5, BitFrame(0, 27))),
        ("decrypt_nested_nonce", (5, BitFrame(0, 10))),
        ("decrypt_nested_nonce", (5, FrameSub(0, 36))),
        ("decrypt_nested_nonce", (5, None)),
        ("encrypt_reader_answer", ([1, 2], b"")),
        ("encrypt_reader_answer", (memoryview(b"abcd"), b"abcd")),
        ("encrypt_reader_answer", ("abcd", b"abcd")),
        ("decrypt_reader_answer", (BitFrame(0, 63),)),
        ("decrypt_reader_answer", (BitFrame(0, 70),)),
        ("decrypt_reader_answer", (FrameSub(0, 72),)),
        ("decrypt_reader_answer", (None,)),
    ],
    ids=repr,
)
def test_authentication_helpers_on_odd_arguments(name, args):
    run_everywhere(name, 0xFFFFFFFFFFFF, 1, False, *args, across=False)


def test_authentication_helper_error_messages():
    assert outcome(crypto1.decrypt_reader_answer, Crypto1(1), BitFrame(0, 63)) == (
        "raised",
        FrameError,
        "the reader's answer {nr}{ar} must be 8 bytes with parity, got 7",
    )
    assert outcome(crypto1.decrypt_nested_nonce, Crypto1(1), 5, BitFrame(0, 27)) == (
        "raised",
        FrameError,
        "an encrypted nonce must be 4 bytes with parity, got 3",
    )
    wrong = crypto1.encrypt_reader_answer(Crypto1(0xA0A1A2A3A4A5), bytes(4), bytes(4))
    assert outcome(crypto1.decrypt_reader_answer, Crypto1(0xB0B1B2B3B4B5), wrong)[:2] == (
        "raised",
        ParityError,
    )


# ---------------------------------------------------------------------------------------------
# The card's nonce generator by jump tables (prng_jump) against prng_successor
# ---------------------------------------------------------------------------------------------


@settings(max_examples=500)
@given(x=st.integers(0, 0xFFFFFFFF), n=st.integers(0, 9000) | st.sampled_from([0, 1, 64, 96]))
def test_prng_jump_is_prng_successor(x, n):
    jumped = outcome(_framing.prng_jump, x, n)
    assert jumped == outcome(crypto1.prng_successor, x, n)
    assert jumped == outcome(crypto1.prng_successor_ref, x, n)


@pytest.mark.parametrize(
    ("x", "n"),
    [
        (5, -1),
        (5, 8192),
        (5, 1 << 70),
        (-1, 5),
        (1 << 32, 5),
        (True, 5),
        (IntSub(5), 5),
        (5, IntSub(5)),
        (5, True),
        (1.5, 5),
        (5, 2.0),
        ("5", 5),
    ],
    ids=repr,
)
def test_prng_jump_hands_odd_arguments_to_prng_successor(x, n):
    assert outcome(_framing.prng_jump, x, n) == outcome(crypto1.prng_successor, x, n)
