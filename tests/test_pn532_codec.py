"""PN532 HSU framing (firmware.reader.codec): known answers, chunking, resynchronisation,
bounded memory, encoders and fuzzing.

Sources for the known answers (each literal below is checked byte for byte):

* NXP UM0701-02 "PN532 User Manual" rev. 02, 6.2.1.1-6.2.1.6 (frame formats; the extended
  frame carries at most 264 data bytes + TFI = 265; the chip answers with a normal frame up to
  255 bytes), quoted in martin-eden/Embedded_Scrapyard libraries/Adafruit-PN532/README.md,
  which also shows the "syntax error" frame ``00 00 FF 01 FF 7F 81 00`` as seen on a real chip;
* nfc-tools/libnfc libnfc/chips/pn53x.c (``pn53x_ack_frame``, ``pn53x_nack_frame``,
  ``pn53x_error_frame``) and libnfc/chips/pn53x-internal.h (the normal and the extended frame
  of GetFirmwareVersion ``00 FF FF FF 00 02 FE D4 02 2A 00``; NORMAL max 254 + TFI, EXTENDED
  max 264 + TFI);
* HSU traces in public code: the wake-up + SAMConfiguration, GetFirmwareVersion and
  InListPassiveTarget exchanges (ACK and response in one read) commented in many PN532 UART
  scripts (e.g. "wake up reader / get firmware / read the tag" comments:
  ``55 55 00 .. 00 FF 03 FD D4 14 01 17 00`` -> ``00 00 FF 00 FF 00 00 00 FF 02 FE D5 15 16 00``,
  ``00 00 FF 02 FE D4 02 2A 00`` -> ``.. 00 00 FF 06 FA D5 03 32 01 06 07 E8 00``);
  Adafruit's SAMConfig ``D4 14 01 14 01`` = ``00 00 FF 05 FB D4 14 01 14 01 02 00`` (quoted as
  such in several drivers); sqf-ice/test USER/src/PN532/nfc.c, an STM32 UART driver, for a
  MIFARE Classic 1K ("m1") InListPassiveTarget answer
  ``00 00 ff 00 ff 00 00 00 ff 0c f4 d5 4b 01 01 00 04 08 04 d0 bb e1 1a 48 00`` and a CPU card
  answer with ATS.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from firmware.core.errors import CoreError
from firmware.reader.codec import (
    ACK_FRAME,
    ERROR_FRAME,
    MAX_BUFFERED,
    MAX_FRAME_LEN,
    NACK_FRAME,
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
from firmware.reader.constants import FIRMWARE_VERSION, TFI_CHIP, TFI_HOST, Command
from firmware.reader.errors import FrameFormatError

QUIET = frozenset((0x00, 0x55))  # preamble/postamble and HSU wake-up bytes
# the most a drained codec may hold: one incomplete extended frame (00 FF FF FF M L LCS + body)
MAX_PENDING = 7 + MAX_FRAME_LEN + 1
ROLES = {"host": Pn532Codec.for_host, "chip": Pn532Codec.for_chip}


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def decode(stream: bytes, role: str = "host", cuts: list[int] | None = None) -> list:
    """Feed ``stream`` split at ``cuts`` (all at once when None), draining after each feed."""
    codec = ROLES[role]()
    bounds = [0, *sorted(set(cuts or [])), len(stream)]
    events = []
    for lo, hi in itertools.pairwise(bounds):
        codec.feed(stream[lo:hi])
        events += codec.events()
        assert codec.buffered <= MAX_PENDING
    assert codec.next_event() is None
    return events


def normalize(events: list) -> list:
    """Garbage boundaries and quiet bytes inside Garbage depend on how bytes arrive; merge
    consecutive Garbage, keep only its non-quiet bytes, drop what is left empty."""
    out: list = []
    for event in events:
        if isinstance(event, Garbage):
            noisy = bytes(b for b in event.data if b not in QUIET)
            if not noisy:
                continue
            if out and isinstance(out[-1], Garbage):
                out[-1] = Garbage(out[-1].data + noisy)
            else:
                out.append(Garbage(noisy))
        else:
            out.append(event)
    return out


def no_garbage(events: list) -> list:
    return [e for e in events if not isinstance(e, Garbage)]


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


# --------------------------------------------------------------------------- known answers

GET_FIRMWARE_VERSION = h("00 00 FF 02 FE D4 02 2A 00")
FIRMWARE_RESPONSE = h("00 00 FF 06 FA D5 03 32 01 06 07 E8 00")
SAM_CONFIGURATION = h("00 00 FF 05 FB D4 14 01 14 01 02 00")
IN_LIST_PASSIVE_TARGET = h("00 00 FF 04 FC D4 4A 01 00 E1 00")
# sqf-ice/test USER/src/PN532/nfc.c: ACK then the answer for a MIFARE Classic 1K, one read
MIFARE_1K_ANSWER = h("00 00 ff 00 ff 00 00 00 ff 0c f4 d5 4b 01 01 00 04 08 04 d0 bb e1 1a 48 00")
# same file: a CPU (ISO-DEP) card, SAK 28, with its ATS
CPU_CARD_ANSWER = h(
    "00 00 ff 00 ff 00 00 00 ff 1c e4 d5 4b 01 01 00 04 28 04 fd e6 08 99 10 78 80 90 02 20"
    " 90 00 00 00 00 00 fd e6 08 99 5c 00"
)


def test_get_firmware_version_command_is_the_manual_frame():
    assert encode_command(Command.GET_FIRMWARE_VERSION) == GET_FIRMWARE_VERSION
    assert decode(GET_FIRMWARE_VERSION, "chip") == [Frame(TFI_HOST, b"\x02")]


def test_get_firmware_version_response_is_the_manual_frame():
    assert encode_response(Command.GET_FIRMWARE_VERSION, FIRMWARE_VERSION) == FIRMWARE_RESPONSE
    [frame] = decode(FIRMWARE_RESPONSE, "host")
    assert frame == Frame(TFI_CHIP, h("03 32 01 06 07"))
    assert frame.command == Command.GET_FIRMWARE_VERSION + 1
    assert frame.params == FIRMWARE_VERSION  # IC 0x32 (PN532), Ver 1, Rev 6, Support 7


def test_sam_configuration_frame():
    # mode 01 (normal), timeout 0x14 (x 50 ms = 1 s), IRQ 01: Adafruit SAMConfig's bytes
    assert encode_command(Command.SAM_CONFIGURATION, h("01 14 01")) == SAM_CONFIGURATION
    assert decode(SAM_CONFIGURATION, "chip") == [Frame(TFI_HOST, h("14 01 14 01"))]
    assert encode_response(Command.SAM_CONFIGURATION) == h("00 00 FF 02 FE D5 15 16 00")


def test_hsu_wake_up_trace_is_decoded_without_garbage():
    # the host wakes the chip with 55 55 and a run of 00 before SAMConfiguration(01)
    wake = h("55 55 00 00 00 00 00 00 00 00 00 00 00 00 00 00 ff 03 fd d4 14 01 17 00")
    assert decode(wake, "chip") == [Frame(TFI_HOST, h("14 01"))]
    # the chip's ACK and answer arrive in one read
    answer = h("00 00 FF 00 FF 00 00 00 FF 02 FE D5 15 16 00")
    assert decode(answer, "host") == [Ack(), Frame(TFI_CHIP, b"\x15")]


def test_ack_nack_and_error_frames():
    assert h("00 00 FF 00 FF 00") == ACK_FRAME
    assert h("00 00 FF FF 00 00") == NACK_FRAME
    assert h("00 00 FF 01 FF 7F 81 00") == ERROR_FRAME
    for role in ROLES:
        assert decode(ACK_FRAME, role) == [Ack()]
        assert decode(NACK_FRAME, role) == [Nack()]
        assert decode(ERROR_FRAME, role) == [ErrorFrame()]
    # and the error frame is what encode_frame makes of TFI 7F with no data
    assert encode_frame(0x7F, b"") == ERROR_FRAME


def test_in_list_passive_target_for_a_mifare_classic_1k():
    assert encode_command(Command.IN_LIST_PASSIVE_TARGET, h("01 00")) == IN_LIST_PASSIVE_TARGET
    events = decode(MIFARE_1K_ANSWER, "host")
    assert kinds(events) == ["Ack", "Frame"]
    frame = events[1]
    assert frame.command == Command.IN_LIST_PASSIVE_TARGET + 1
    p = frame.params
    assert p[0] == 1 and p[1] == 1  # NbTg, Tg
    assert p[2:4] == h("00 04")  # SENS_RES (ATQA) of a MIFARE Classic 1K
    assert p[4] == 0x08  # SEL_RES (SAK) 08 = MIFARE Classic 1K
    assert p[5] == 4 and p[6:] == h("d0 bb e1 1a")  # NFCIDLength, NFCID1
    # the encoder rebuilds the chip's bytes exactly
    assert encode_response(Command.IN_LIST_PASSIVE_TARGET, p) == MIFARE_1K_ANSWER[6:]


def test_in_list_passive_target_with_ats():
    events = decode(CPU_CARD_ANSWER, "host")
    assert kinds(events) == ["Ack", "Frame"]
    p = events[1].params
    assert len(events[1].data) == 0x1C - 1 and p[4] == 0x28 and p[6:10] == h("fd e6 08 99")
    assert p[10] == 0x10  # ATS length byte, the ATS runs to the end of the frame
    assert len(p) == 10 + p[10]


def test_libnfc_extended_frame_of_a_short_command():
    # the host may use the extended form for short frames too (UM0701-02 6.2.1.2)
    assert decode(h("00 FF FF FF 00 02 FE D4 02 2A 00"), "chip") == [Frame(TFI_HOST, b"\x02")]


@pytest.mark.parametrize(
    ("n_params", "head"),
    [
        (252, "00 00 FF FE 02"),  # TFI + cmd + 252 = 254
        (253, "00 00 FF FF 01"),  # 255: still a normal frame, as the chip sends it (6.2.1.2)
        (254, "00 00 FF FF FF 01 00 FF"),  # 256: extended (LENm 01, LENl 00, LCS FF)
        (262, "00 00 FF FF FF 01 08 F7"),  # 264
        (263, "00 00 FF FF FF 01 09 F6"),  # 265 = MAX_FRAME_LEN, the PN532's limit
    ],
)
def test_long_frames_round_trip_with_their_length_fields(n_params, head):
    params = bytes((i * 7 + 3) & 0xFF for i in range(n_params))
    frame = encode_command(Command.IN_DATA_EXCHANGE, params)
    body = bytes((TFI_HOST, Command.IN_DATA_EXCHANGE)) + params
    assert frame == h(head) + body + bytes(((-sum(body)) & 0xFF, 0x00))
    assert decode(frame, "chip") == [Frame(TFI_HOST, body[1:])]
    # byte by byte too: the decoder must wait for the whole announced length
    assert decode(frame, "chip", cuts=list(range(len(frame)))) == [Frame(TFI_HOST, body[1:])]


def test_a_normal_frame_of_255_bytes_from_the_chip_is_accepted():
    # UM0701-02 6.2.1.2: the PN532 uses the normal frame up to 255 bytes (LEN FF, LCS 01)
    body = bytes((TFI_CHIP, 0x41, 0x00)) + bytes(range(252))
    frame = h("00 00 FF FF 01") + body + bytes(((-sum(body)) & 0xFF, 0x00))
    assert decode(frame, "host") == [Frame(TFI_CHIP, body[1:])]


# --------------------------------------------------------------------------- encoders


def test_encoder_length_limits():
    assert len(encode_frame(TFI_HOST, bytes(MAX_FRAME_LEN - 1))) == MAX_FRAME_LEN + 10
    with pytest.raises(FrameFormatError):
        encode_frame(TFI_HOST, bytes(MAX_FRAME_LEN))
    encode_command(0x40, bytes(MAX_FRAME_LEN - 2))
    with pytest.raises(FrameFormatError):
        encode_command(0x40, bytes(MAX_FRAME_LEN - 1))
    encode_response(0x40, bytes(MAX_FRAME_LEN - 2))
    with pytest.raises(FrameFormatError) as info:
        encode_response(0x40, bytes(MAX_FRAME_LEN - 1))
    # one except clause in the validator loop catches it
    assert isinstance(info.value, CoreError)


@pytest.mark.parametrize("command", list(Command))
def test_encode_response_puts_command_plus_one(command):
    frame = encode_response(command, b"\x00")
    assert frame[5:7] == bytes((TFI_CHIP, command + 1))
    assert decode(frame, "host") == [Frame(TFI_CHIP, bytes((command + 1, 0)))]
    assert decode(encode_command(command), "chip") == [Frame(TFI_HOST, bytes((command,)))]


@settings(max_examples=200)
@given(tfi=st.sampled_from([TFI_HOST, TFI_CHIP]), data=st.binary(min_size=1, max_size=264))
def test_encode_frame_fields_and_round_trip(tfi, data):
    frame = encode_frame(tfi, data)
    body = bytes((tfi,)) + data
    n = len(body)
    assert frame[:3] == h("00 00 FF") and frame[-1] == 0x00
    if n <= 254:
        assert frame[3] == n and (frame[3] + frame[4]) & 0xFF == 0
        assert frame[5:-2] == body
    else:
        assert frame[3:5] == h("FF FF") and frame[5] << 8 | frame[6] == n
        assert (frame[5] + frame[6] + frame[7]) & 0xFF == 0
        assert frame[8:-2] == body
    assert (sum(body) + frame[-2]) & 0xFF == 0
    role = "chip" if tfi == TFI_HOST else "host"
    assert decode(frame, role) == [Frame(tfi, data)]


# --------------------------------------------------------------------------- chunking

STREAM_ITEMS = [
    (h("55 55 00 00 00"), []),  # wake-up: nothing to report
    (ACK_FRAME, [Ack()]),
    (FIRMWARE_RESPONSE, [Frame(TFI_CHIP, h("03 32 01 06 07"))]),
    (NACK_FRAME, [Nack()]),
    (MIFARE_1K_ANSWER, [Ack(), Frame(TFI_CHIP, h("4b 01 01 00 04 08 04 d0 bb e1 1a"))]),
    (ERROR_FRAME, [ErrorFrame()]),
    (encode_response(0x40, bytes(range(256)) + h("00 FF 00 FF")), None),  # extended, 00 FF inside
    (h("00 00"), []),
    (encode_response(0x4A, b""), [Frame(TFI_CHIP, b"\x4b")]),
]
STREAM = b"".join(item for item, _ in STREAM_ITEMS)
STREAM_EVENTS = [
    e
    for item, events in STREAM_ITEMS
    for e in (events if events is not None else [Frame(TFI_CHIP, item[9:-2])])
]


def test_stream_all_at_once():
    assert len(STREAM) < MAX_BUFFERED
    assert decode(STREAM) == STREAM_EVENTS


def test_stream_byte_by_byte():
    assert decode(STREAM, cuts=list(range(len(STREAM)))) == STREAM_EVENTS


def test_stream_with_next_event_interleaved_per_byte():
    codec = Pn532Codec.for_host()
    events = []
    for byte in STREAM:
        assert codec.next_event() is None  # drained: nothing pending before the next byte
        codec.feed(bytes((byte,)))
        while (event := codec.next_event()) is not None:
            events.append(event)
    assert events == STREAM_EVENTS


@settings(max_examples=300)
@given(st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_stream_in_random_splits(cuts):
    assert decode(STREAM, cuts=cuts) == STREAM_EVENTS


# noise between the same items: the only chunking-dependent part is how Garbage is cut up
NOISE = [
    b"\x12\x34",
    b"\x00\x99",
    b"",
    b"\xaa\x00\x55\xbb",
    b"\x55\x55",
    b"\x01",
    b"\xfe",
    b"",
    b"\x80",
]
NOISY_STREAM = (
    b"".join(n + item for n, (item, _) in zip(NOISE, STREAM_ITEMS, strict=True)) + b"\xcc\x00"
)


def test_noisy_stream_all_at_once_and_byte_by_byte():
    expected = []
    frames = iter(STREAM_EVENTS)
    for n, (item, events) in zip(NOISE, STREAM_ITEMS, strict=True):
        expected.append(Garbage(n))
        expected += [next(frames) for _ in (events if events is not None else [item])]
    expected = normalize([*expected, Garbage(b"\xcc")])
    assert normalize(decode(NOISY_STREAM)) == expected
    assert normalize(decode(NOISY_STREAM, cuts=list(range(len(NOISY_STREAM))))) == expected


@settings(max_examples=300)
@given(st.lists(st.integers(0, len(NOISY_STREAM)), max_size=40))
def test_noisy_stream_in_random_splits(cuts):
    assert normalize(decode(NOISY_STREAM, cuts=cuts)) == normalize(decode(NOISY_STREAM))


# Regression: feed() once trimmed the buffer before parsing and lost whole frames.
def test_a_large_feed_of_valid_frames_loses_nothing():
    frame = encode_response(0x40, bytes(range(200)))
    stream = frame * 25  # 5225 bytes > MAX_BUFFERED, e.g. one big read after a busy spell
    expected = [Frame(TFI_CHIP, frame[6:-2])] * 25
    assert decode(stream, cuts=list(range(0, len(stream), 64))) == expected  # drained: fine
    assert decode(stream) == expected  # one feed: 6 frames vanish


# --------------------------------------------------------------------------- resynchronisation


def test_garbage_before_and_between_frames_is_reported():
    stream = b"\x12\x34" + FIRMWARE_RESPONSE + b"\xaa\xbb\xcc" + ACK_FRAME + b"\x99"
    events = decode(stream)
    assert kinds(events) == ["Garbage", "Frame", "Garbage", "Ack", "Garbage"]
    # (the preamble/postamble 00 next to the noise may be part of the reported bytes)
    assert b"\x12\x34" in events[0].data and b"\xaa\xbb\xcc" in events[2].data
    assert normalize(events)[0::2] == [
        Garbage(h("12 34")),
        Garbage(h("aa bb cc")),
        Garbage(b"\x99"),
    ]
    assert events[1] == Frame(TFI_CHIP, h("03 32 01 06 07"))


def test_only_preamble_postamble_and_wake_up_bytes_are_not_garbage():
    quiet = h("55 55 00 00 00 55 00")
    stream = quiet + FIRMWARE_RESPONSE + quiet + ACK_FRAME + quiet + quiet
    assert decode(stream) == [Frame(TFI_CHIP, h("03 32 01 06 07")), Ack()]
    assert decode(quiet * 100) == []
    # one other byte among them is enough to be worth a log line
    assert normalize(decode(h("55 55 00 56 00") + ACK_FRAME)) == [Garbage(b"\x56"), Ack()]


def test_bad_lcs_is_reported_and_the_next_frame_decoded():
    bad = bytearray(FIRMWARE_RESPONSE)
    bad[4] ^= 0x01  # LCS
    events = decode(bytes(bad) + encode_response(0x14))
    assert isinstance(events[0], BadFrame) and "LCS" in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, b"\x15")]


def test_bad_dcs_is_reported_and_the_next_frame_decoded():
    bad = bytearray(FIRMWARE_RESPONSE)
    bad[-2] ^= 0x80  # DCS
    events = decode(bytes(bad) + FIRMWARE_RESPONSE)
    assert isinstance(events[0], BadFrame) and "DCS" in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


@pytest.mark.parametrize("where", ["data", "lcs", "dcs"])
def test_corrupted_extended_frame_then_a_valid_one(where):
    frame = bytearray(encode_response(0x40, bytes(300 - 40)))
    index = {"data": 100, "lcs": 7, "dcs": len(frame) - 2}[where]
    frame[index] ^= 0x5A
    events = decode(bytes(frame) + FIRMWARE_RESPONSE)
    assert isinstance(events[0], BadFrame)
    assert ("DCS" if where != "lcs" else "length checksum") in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


@pytest.mark.parametrize("length", [0, MAX_FRAME_LEN + 1, 0xFFFF])
def test_extended_length_out_of_range(length):
    hi, lo = length >> 8, length & 0xFF
    header = bytes((0x00, 0x00, 0xFF, 0xFF, 0xFF, hi, lo, (-(hi + lo)) & 0xFF))
    events = decode(header + FIRMWARE_RESPONSE)
    assert isinstance(events[0], BadFrame) and "out of range" in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


def test_frames_too_short_to_carry_a_command():
    # LEN 0 that is not an ACK, and a TFI alone
    events = decode(h("00 00 FF 00 00 00") + encode_frame(TFI_CHIP, b"") + ACK_FRAME)
    assert kinds(no_garbage(events)) == ["BadFrame", "BadFrame", "Ack"]
    assert "length 0" in events[0].reason and "command" in no_garbage(events)[1].reason


def test_truncated_frame_followed_by_a_valid_one():
    # the line dropped the end of a response; the driver retries and the answer comes again
    events = decode(FIRMWARE_RESPONSE[:8] + FIRMWARE_RESPONSE)
    assert isinstance(events[0], BadFrame)
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


def test_truncated_extended_header_holds_frames_back_but_loses_none():
    # an extended header announcing 265 bytes swallows what follows until that many arrived;
    # then the DCS fails, and every frame inside is found again
    stuck = h("00 00 FF FF FF 01 09 F6 D5 41")
    codec = Pn532Codec.for_host()
    codec.feed(stuck + FIRMWARE_RESPONSE * 5)
    assert codec.events() == []
    codec.feed(FIRMWARE_RESPONSE * 20)  # 10 + 25 x 13 bytes > 7 + 265 + 1
    events = codec.events()
    assert isinstance(events[0], BadFrame) and "DCS" in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07"))] * 25


def test_clear_drops_a_partial_frame():
    codec = Pn532Codec.for_host()
    codec.feed(FIRMWARE_RESPONSE[:9])
    assert codec.events() == [] and codec.buffered > 0
    codec.clear()
    assert codec.buffered == 0
    codec.feed(FIRMWARE_RESPONSE)
    assert codec.events() == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


def test_start_code_inside_garbage():
    stream = h("11 00 FF 22 33") + FIRMWARE_RESPONSE
    events = decode(stream)
    assert kinds(no_garbage(events)) == ["BadFrame", "Frame"]
    assert normalize(events) == [
        Garbage(b"\x11"),
        events[1],
        Garbage(h("22 33")),
        Frame(TFI_CHIP, h("03 32 01 06 07")),
    ]
    assert "LCS" in events[1].reason


def test_start_code_with_a_plausible_length_inside_garbage():
    # 00 FF 05 FB looks like a header: the decoder reads into the real frame, the DCS fails,
    # and it resynchronises two bytes later instead of dropping the swallowed frame
    events = decode(h("00 FF 05 FB") + FIRMWARE_RESPONSE + ACK_FRAME)
    assert isinstance(events[0], BadFrame) and "DCS" in events[0].reason
    assert no_garbage(events)[1:] == [Frame(TFI_CHIP, h("03 32 01 06 07")), Ack()]


def test_wrong_tfi_is_a_bad_frame():
    # a host hearing its own echo (D4), or the emulator hearing a chip (D5)
    events = decode(GET_FIRMWARE_VERSION + FIRMWARE_RESPONSE, "host")
    assert kinds(events) == ["BadFrame", "Frame"]  # the echo is consumed whole, no garbage
    assert "TFI 0xD4" in events[0].reason
    events = decode(FIRMWARE_RESPONSE + GET_FIRMWARE_VERSION, "chip")
    assert kinds(events) == ["BadFrame", "Frame"] and "TFI 0xD5" in events[0].reason
    assert events[1] == Frame(TFI_HOST, b"\x02")


def test_codec_roles():
    assert Pn532Codec.for_host().expect_tfi == TFI_CHIP
    assert Pn532Codec.for_chip().expect_tfi == TFI_HOST
    with pytest.raises(ValueError):
        Pn532Codec(0x7F)
    codec = Pn532Codec(TFI_CHIP)
    assert codec.next_event() is None and codec.events() == [] and codec.buffered == 0


# --------------------------------------------------------------------------- bounded memory


def test_megabytes_of_garbage_without_start_codes_stay_bounded():
    rng = random.Random(532)
    noise = bytes(rng.choice(range(0x01, 0xFF)) for _ in range(1 << 16))  # no 00, no FF
    codec = Pn532Codec.for_host()
    for _ in range(32):  # 2 MiB, never drained
        codec.feed(noise)
        assert codec.buffered <= MAX_BUFFERED
    codec.feed(FIRMWARE_RESPONSE)
    assert normalize(codec.events())[-1] == Frame(TFI_CHIP, h("03 32 01 06 07"))


def test_garbage_drained_as_it_comes_is_all_reported_and_bounded():
    rng = random.Random(533)
    chunk = bytes(rng.choice(range(0x01, 0xFF)) for _ in range(4000)) + b"\x00"
    codec = Pn532Codec.for_host()
    reported = 0
    for _ in range(256):  # ~1 MiB
        codec.feed(chunk)
        assert codec.buffered <= MAX_BUFFERED
        events = codec.events()
        assert all(isinstance(e, Garbage) for e in events)
        reported += sum(len(e.data) for e in events)
        assert codec.buffered <= 1  # only a trailing 00 that may start a start code
    assert reported == 256 * len(chunk) - codec.buffered
    codec.feed(FIRMWARE_RESPONSE[1:])  # the kept 00 serves as the first start code byte
    assert no_garbage(codec.events()) == [Frame(TFI_CHIP, h("03 32 01 06 07"))]


def test_a_flood_of_preamble_bytes_stays_bounded():
    codec = Pn532Codec.for_chip()
    for _ in range(64):
        codec.feed(bytes(1 << 14))
        assert codec.events() == []
        assert codec.buffered <= 1


# --------------------------------------------------------------------------- fuzz

# bytes that matter to the framing, drawn more often than chance would
framing_bytes = st.lists(
    st.one_of(
        st.sampled_from([0x00, 0xFF, 0x55, 0xD4, 0xD5, 0x7F, 0x01, 0xFE]), st.integers(0, 255)
    ),
    max_size=1500,
).map(bytes)


@settings(max_examples=300)
@given(data=framing_bytes, role=st.sampled_from(sorted(ROLES)), seed=st.randoms())
def test_random_bytes_never_raise_and_chunking_does_not_matter(data, role, seed):
    cuts = [seed.randrange(len(data) + 1) for _ in range(seed.randrange(12))]
    whole = decode(data, role)
    for event in whole:
        assert isinstance(event, Ack | Nack | ErrorFrame | Frame | BadFrame | Garbage)
        if isinstance(event, Frame):
            assert event.tfi == ROLES[role]().expect_tfi and len(event.data) >= 1
        if isinstance(event, Garbage):
            assert event.data and any(b not in QUIET for b in event.data)
    assert normalize(decode(data, role, cuts=cuts)) == normalize(whole)


SPECIAL_FRAMES = {
    "ack": (ACK_FRAME, Ack()),
    "nack": (NACK_FRAME, Nack()),
    "error": (ERROR_FRAME, ErrorFrame()),
}
PIECE_KINDS = [
    "frame",
    "ack",
    "nack",
    "error",
    "wrong_tfi",
    "garbage",
    "quiet",
    "bad_lcs",
    "bad_dcs",
]


@st.composite
def line_traffic(draw, expect_tfi):
    """A stream of pieces and the events each must give.

    Guarantee checked: when every ``00 FF`` in the stream is either a piece's own start code
    or lies inside a well-formed frame before its postamble (so garbage and the remains of a
    corrupted frame hold no start code, and do not make one with their neighbours), then:
    every valid frame, ACK, NACK and error frame comes out exactly once and in order; each
    corrupted or wrong-TFI frame gives exactly one BadFrame at its place; and the non-quiet
    skipped bytes come out as Garbage in between. Garbage is generated at random and any FF
    that would complete a start code is turned into FE; for corrupted frames the condition
    is assumed (it fails only when a random body or length field holds 00 FF).
    """
    other_tfi = TFI_CHIP if expect_tfi == TFI_HOST else TFI_HOST
    pieces = []
    for kind in draw(st.lists(st.sampled_from(PIECE_KINDS), max_size=10)):
        if kind in ("frame", "wrong_tfi", "bad_lcs", "bad_dcs"):
            n = draw(st.one_of(st.integers(1, 24), st.integers(250, MAX_FRAME_LEN - 1)))
            data = draw(st.binary(min_size=n, max_size=n))
            tfi = expect_tfi if kind != "wrong_tfi" else draw(st.sampled_from([other_tfi, 0x7F, 0]))
            raw = bytearray(encode_frame(tfi, data))
            if kind == "frame":
                pieces.append((kind, bytes(raw), [Frame(tfi, data)]))
                continue
            if kind == "bad_lcs":
                raw[4 if len(data) < 254 else 7] ^= draw(st.integers(1, 255))
            elif kind == "bad_dcs":
                raw[-2] ^= draw(st.integers(1, 255))
            pieces.append((kind, bytes(raw), [BadFrame("")]))
        elif kind == "garbage":
            pieces.append((kind, draw(st.binary(min_size=1, max_size=40)), []))
        elif kind == "quiet":
            pieces.append((kind, bytes(draw(st.lists(st.sampled_from([0, 0x55]), max_size=8))), []))
        else:
            frame, event = SPECIAL_FRAMES[kind]
            pieces.append((kind, frame, [event]))

    stream = bytearray()
    allowed: set[int] = set()
    expected: list = []
    for kind, raw, events in pieces:
        offset = len(stream)
        if kind == "garbage":
            raw = bytearray(raw)
            for i, byte in enumerate(raw):
                before = raw[i - 1] if i else (stream[-1] if stream else None)
                if byte == 0xFF and before == 0x00:
                    raw[i] = 0xFE
            raw = bytes(raw)
        stream += raw
        if kind in ("garbage", "quiet"):
            expected.append(Garbage(raw))
        elif kind in ("bad_lcs", "bad_dcs"):
            allowed.add(offset + 1)
            expected += [*events, Garbage(raw[3:])]
        else:
            allowed.update(range(offset + 1, offset + len(raw) - 1))
            expected += events
    start = stream.find(b"\x00\xff")
    while start >= 0:
        assume(start in allowed)
        start = stream.find(b"\x00\xff", start + 1)
    assert len(stream) <= MAX_BUFFERED
    return bytes(stream), normalize(expected)


def _blank_reasons(events: list) -> list:
    return [BadFrame("") if isinstance(e, BadFrame) else e for e in events]


@settings(max_examples=300)
@given(data=st.data(), role=st.sampled_from(sorted(ROLES)), seed=st.randoms())
def test_mixed_traffic_recovers_every_valid_frame_once_in_order(data, role, seed):
    stream, expected = data.draw(line_traffic(ROLES[role]().expect_tfi))
    cuts = [seed.randrange(len(stream) + 1) for _ in range(seed.randrange(16))]
    assert _blank_reasons(normalize(decode(stream, role))) == expected
    assert _blank_reasons(normalize(decode(stream, role, cuts=cuts))) == expected
