"""ISO/IEC 14443-3 type A framing: CRC_A against published frames, parity, bit frames."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core import iso14443a
from firmware.core.errors import CoreError, CrcError, FrameError, ParityError
from firmware.core.iso14443a import (
    SILENCE,
    BitFrame,
    concat,
    crc_a,
    decode,
    encode,
    encode_bits,
    odd_parity,
    short_frame,
    split,
    strip_crc,
    with_crc,
)

# Whole frames as sent on the air (payload followed by its CRC_A, low byte first), each from a
# public trace or document:
PUBLISHED_FRAMES = [
    # HLTA: miguelbalboa/rfid src/MFRC522.cpp, MIFARE_OpenUidBackdoor ("50 00 57 CD (HALT + CRC)")
    ("5000 57cd", "HLTA"),
    # proxmark3 Google Code wiki "RunningPM3" (mirror github.com/peterfox/proxmark3
    # RunningPM3.md), "hf 14a list" of an Omnikey reader: READ block 0, SELECT, HLTA, AUTH
    ("3000 02a8", "READ block 0"),
    ("93708476 81ddae 019a", "SELECT cl1 847681dd"),
    ("6000 f57b", "AUTH A block 0"),
    # RfidResearchGroup/proxmark3 tools/mfkey/example_trace.txt: SELECT, SAK, AUTH A block 0x32
    ("93709c599b326c 6b30", "SELECT cl1 9c599b32"),
    ("08 b6dd", "SAK 08 (MIFARE Classic 1K)"),
    ("6032 6469", "AUTH A block 0x32"),
    # RfidResearchGroup/proxmark3 tools/mf_nonce_brute/README.md sample trace
    ("9370fdacf6d87f 214f", "SELECT cl1 fdacf6d8"),
    ("6004 d13d", "AUTH A block 4"),
    # maxieds/ChameleonMiniDESFireStack Firmware/Chameleon-Mini/Application/DESFire/Docs/
    # DESFireSupportReadme.md, libnfc `nfc-anticol` output: 7-byte UID select, SAKs, RATS, ATS
    ("93708808c7df98 9cae", "SELECT cl1 cascade 88 08 c7 df"),
    ("24 d836", "SAK 24"),
    ("9570f102fc6c63 3a98", "SELECT cl2 f1 02 fc 6c"),
    ("20 fc70", "SAK 20"),
    ("e050 bca5", "RATS"),
    ("067500810280 66fd", "ATS"),
    # same file, Proxmark "hf mfdes list" (CRC column "ok")
    ("93708808e2385a 95d5", "SELECT cl1 cascade 88 08 e2 38"),
    ("9570f6125342f5 cb66", "SELECT cl2 f6 12 53 42"),
    ("e080 3173", "RATS"),
]


@pytest.mark.parametrize("frame_hex", [pytest.param(f, id=name) for f, name in PUBLISHED_FRAMES])
def test_crc_a_of_published_frames(frame_hex):
    frame = bytes.fromhex(frame_hex.replace(" ", ""))
    payload, crc = frame[:-2], frame[-2:]
    assert crc_a(payload) == crc
    assert with_crc(payload) == frame
    assert strip_crc(frame) == payload


def test_crc_a_catalogue_check_value():
    # CRC RevEng catalogue, CRC-16/ISO-IEC-14443-3-A: check = 0xbf05 for "123456789"
    # (reflected CRC, so sent low byte first)
    assert crc_a(b"123456789") == bytes((0x05, 0xBF))
    assert crc_a(b"") == bytes((0x63, 0x63))  # the preset, nothing shifted in


@settings(max_examples=300)
@given(data=st.binary(max_size=64))
def test_crc_a_matches_bitwise_definition(data):
    """A bit-by-bit reflected CRC (polynomial x^16 + x^12 + x^5 + 1, preset 0x6363)."""
    crc = 0x6363
    for byte in data:
        for i in range(8):
            bit = ((byte >> i) & 1) ^ (crc & 1)
            crc >>= 1
            if bit:
                crc ^= 0x8408
    assert crc_a(data) == crc.to_bytes(2, "little")


@settings(max_examples=300)
@given(payload=st.binary(min_size=1, max_size=32), data=st.data())
def test_strip_crc_detects_corruption(payload, data):
    frame = bytearray(with_crc(payload))
    assert strip_crc(bytes(frame)) == payload
    # CRC-16 catches every single-bit error and every burst of up to 16 bits
    start = data.draw(st.integers(0, 8 * len(frame) - 1))
    width = data.draw(st.integers(1, min(16, 8 * len(frame) - start)))
    value = int.from_bytes(frame, "little") ^ (((1 << width) - 1) << start)
    with pytest.raises(CrcError):
        strip_crc(value.to_bytes(len(frame), "little"))


@pytest.mark.parametrize("frame", [b"", b"\x63", b"\x63\x63", bytes.fromhex("57cd")])
def test_strip_crc_rejects_frames_without_payload(frame):
    with pytest.raises(CrcError):
        strip_crc(frame)


def test_strip_crc_rejects_swapped_crc_bytes():
    with pytest.raises(CrcError):
        strip_crc(bytes.fromhex("5000cd57"))


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------


def test_odd_parity_all_bytes():
    for b in range(256):
        p = odd_parity(b)
        assert p in (0, 1)
        assert (bin(b).count("1") + p) % 2 == 1, b
    assert (odd_parity(0x00), odd_parity(0x01), odd_parity(0x03), odd_parity(0xFF)) == (1, 0, 1, 1)


# ---------------------------------------------------------------------------------------------
# Standard frames
# ---------------------------------------------------------------------------------------------


def test_encode_known_layout():
    # 93 20 (ANTICOLL cl1): 0x93 has four ones -> parity 1; 0x20 has one -> parity 0.
    frame = encode(b"\x93\x20")
    assert frame.length == 18
    on_air = "".join(str(frame.bit(i)) for i in range(frame.length))
    assert on_air == "110010011000001000"  # 0x93 LSB first, parity, 0x20, parity
    assert frame.bits == 0x93 | 1 << 8 | 0x20 << 9
    assert split(frame) == (b"\x93\x20", [1, 0])


@settings(max_examples=500)
@given(data=st.binary(max_size=40))
def test_encode_split_decode_roundtrip(data):
    frame = encode(data)
    assert frame.length == 9 * len(data)
    assert decode(frame) == data
    assert split(frame) == (data, [odd_parity(b) for b in data])
    assert encode(data, [odd_parity(b) for b in data]) == frame


@settings(max_examples=300)
@given(data=st.binary(max_size=40), parity_seed=st.integers(min_value=0))
def test_encode_with_explicit_parity(data, parity_seed):
    parity = [(parity_seed >> i) & 1 for i in range(len(data))]
    frame = encode(data, parity)
    assert split(frame) == (data, parity)


@settings(max_examples=500)
@given(data=st.binary(min_size=1, max_size=40), where=st.integers(min_value=0))
def test_wrong_parity_bit_raises(data, where):
    i = where % len(data)
    frame = encode(data)
    bad = BitFrame(frame.bits ^ (1 << (9 * i + 8)), frame.length)
    with pytest.raises(ParityError):
        decode(bad)
    # a flipped data bit breaks the parity of its byte too
    bit = where % (9 * len(data))
    if bit % 9 != 8:
        with pytest.raises(ParityError):
            decode(BitFrame(frame.bits ^ (1 << bit), frame.length))


def test_encode_rejects_wrong_parity_count():
    with pytest.raises(FrameError):
        encode(b"\x01\x02", [1])
    with pytest.raises(FrameError):
        encode(b"\x01", [1, 0])


@pytest.mark.parametrize("length", [1, 8, 10, 17, 19])
def test_split_rejects_partial_bytes(length):
    with pytest.raises(FrameError):
        split(BitFrame(0, length))
    with pytest.raises(FrameError):
        decode(BitFrame(0, length))


def test_empty_frame():
    assert encode(b"") == SILENCE
    assert split(SILENCE) == (b"", [])
    assert decode(SILENCE) == b""
    assert not SILENCE
    assert encode(b"\x00")


# ---------------------------------------------------------------------------------------------
# Short frames, raw bit frames, packing, concatenation
# ---------------------------------------------------------------------------------------------


def test_short_frames_reqa_wupa():
    assert (iso14443a.REQA, iso14443a.WUPA, iso14443a.HLTA) == (0x26, 0x52, 0x50)
    reqa = short_frame(iso14443a.REQA)
    assert (reqa.bits, reqa.length) == (0x26, 7)
    assert [reqa.bit(i) for i in range(7)] == [0, 1, 1, 0, 0, 1, 0]  # LSB first
    assert reqa.to_packed() == (b"\x26", 7)
    assert short_frame(iso14443a.WUPA).to_packed() == (b"\x52", 7)
    assert BitFrame.from_packed(b"\x26", 7) == reqa


@pytest.mark.parametrize("command", [0x80, 0xFF, 0x100, -1])
def test_short_frame_rejects_8_bit_commands(command):
    with pytest.raises(FrameError):
        short_frame(command)


def test_encode_bits_ack_nack():
    ack = encode_bits(0xA, 4)
    assert (ack.bits, ack.length) == (0xA, 4)
    assert ack.to_packed() == (b"\x0a", 4)
    with pytest.raises(FrameError):
        encode_bits(0x10, 4)
    with pytest.raises(FrameError):
        encode_bits(0, -1)
    with pytest.raises(FrameError):
        encode_bits(-1, 4)


def test_known_packing_of_9_bit_bytes():
    # 93 20 with parity: bits 0-7 = 0x93, bit 8 = 1, bits 9-16 = 0x20, bit 17 = 0
    assert encode(b"\x93\x20").to_packed() == (b"\x93\x41\x00", 2)
    # HLTA 50 00 57 CD: 36 bits; parities 1 (0x50), 1 (0x00), 0 (0x57), 0 (0xCD)
    value = 0x50 | 1 << 8 | 0x00 << 9 | 1 << 17 | 0x57 << 18 | 0 << 26 | 0xCD << 27 | 0 << 35
    assert encode(bytes.fromhex("500057cd")).to_packed() == (value.to_bytes(5, "little"), 4)
    assert SILENCE.to_packed() == (b"", 0)


@settings(max_examples=500)
@given(length=st.integers(0, 400), bits=st.integers(min_value=0))
def test_packed_roundtrip(length, bits):
    frame = BitFrame(bits & ((1 << length) - 1), length)
    data, last = frame.to_packed()
    assert len(data) == (length + 7) // 8
    assert (last == 0) if length == 0 else (1 <= last <= 8)
    assert BitFrame.from_packed(data, last) == frame


def test_from_packed_ignores_bits_past_the_last_valid_one():
    assert BitFrame.from_packed(b"\xff", 4) == BitFrame(0xF, 4)
    assert BitFrame.from_packed(b"\x00\xff", 1) == BitFrame(0x100, 9)
    assert BitFrame.from_packed(b"") == SILENCE
    assert BitFrame.from_packed(b"\x12\x34") == BitFrame(0x3412, 16)


@pytest.mark.parametrize("last_bits", [0, 9, -1, 16])
def test_from_packed_rejects_bad_last_bits(last_bits):
    with pytest.raises(FrameError):
        BitFrame.from_packed(b"\x00", last_bits)


@settings(max_examples=300)
@given(parts=st.lists(st.binary(max_size=8), max_size=5))
def test_concat_of_frames_is_frame_of_concat(parts):
    assert concat(encode(p) for p in parts) == encode(b"".join(parts))


def test_concat_split_anticollision_frame():
    # a split anticollision frame: 93 20 followed by raw bits is one sequence on the air
    head = encode(b"\x93\x20")
    tail = encode_bits(0b101, 3)
    joined = concat([head, tail, SILENCE])
    assert joined.length == 21
    assert joined.bits == head.bits | 0b101 << 18
    assert concat([]) == SILENCE


@pytest.mark.parametrize(
    ("bits", "length"), [(1, 0), (2, 1), (0x100, 8), (-1, 8), (0, -1), (1 << 64, 64)]
)
def test_bitframe_rejects_values_that_do_not_fit(bits, length):
    with pytest.raises(FrameError):
        BitFrame(bits, length)


def test_bitframe_accepts_values_that_fit_and_is_immutable():
    assert BitFrame(0xFF, 8).bits == 0xFF
    assert BitFrame((1 << 64) - 1, 64).length == 64
    frame = BitFrame(0, 0)
    assert frame == SILENCE
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.bits = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Garbage in: a value or a CoreError, never anything else
# ---------------------------------------------------------------------------------------------


@settings(max_examples=1000)
@given(
    raw=st.binary(max_size=40),
    last_bits=st.integers(-4, 12),
    length=st.integers(0, 400),
    bits=st.integers(min_value=0),
)
def test_decoders_on_garbage(raw, last_bits, length, bits):
    frame = BitFrame(bits & ((1 << length) - 1), length)
    calls = [
        lambda: strip_crc(raw),
        lambda: split(frame),
        lambda: decode(frame),
        lambda: BitFrame.from_packed(raw, last_bits),
        lambda: decode(BitFrame.from_packed(raw, last_bits)),
        lambda: split(BitFrame.from_packed(raw)),
    ]
    for call in calls:
        with contextlib.suppress(CoreError):
            call()


@settings(max_examples=300)
@given(bits=st.integers(-(1 << 70), 1 << 70), length=st.integers(-5, 70))
def test_bitframe_constructor_on_garbage(bits, length):
    try:
        frame = BitFrame(bits, length)
    except FrameError:
        assert length < 0 or bits < 0 or bits >= 1 << max(length, 0)
        return
    assert 0 <= frame.bits < 1 << frame.length
