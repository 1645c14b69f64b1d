"""ISO/IEC 14443-3 type A activation: the reader's cascade against the card's state machine.

Reader and card are checked against each other through :class:`Field` (the in-process air),
and each against frames built by hand from the standard, so a shared misunderstanding of
the split-byte framing cannot hide on both sides at once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.core.anticollision import (
    HLTA_FRAME,
    SAK_UID_INCOMPLETE,
    UID_SIZES,
    BccError,
    CardSelector,
    Field,
    PiccState,
    SelectedCard,
    anticollision_answer,
    anticollision_frame,
    bcc,
    cascade_levels,
    enumerate_cards,
    field_response,
    halt,
    nvb,
    sak_frame,
    select_card,
    select_frame,
)
from firmware.core.errors import (
    CodecError,
    CollisionError,
    CoreError,
    CrcError,
    FrameError,
    NoResponseError,
    ParityError,
    ProtocolError,
)
from firmware.core.iso14443a import (
    REQA,
    SEL_CL1,
    SEL_CL2,
    SEL_CL3,
    SILENCE,
    WUPA,
    BitFrame,
    concat,
    crc_a,
    encode,
    encode_bits,
    odd_parity,
    short_frame,
    split,
    with_crc,
)

# ATQA as sent (low byte first): b8b7 = UID size, b3 = bit-frame anticollision.
ATQA_BY_SIZE = {4: bytes.fromhex("0400"), 7: bytes.fromhex("4400"), 10: bytes.fromhex("8400")}
SAK_CLASSIC_1K = 0x08


def card(uid_hex: str, sak: int = SAK_CLASSIC_1K, atqa: bytes | None = None) -> CardSelector:
    uid = bytes.fromhex(uid_hex)
    return CardSelector(uid, atqa if atqa is not None else ATQA_BY_SIZE[len(uid)], sak)


class Trace:
    """A transceive that records every exchange on the air."""

    def __init__(self, transceive: Callable[[BitFrame], BitFrame]) -> None:
        self.inner = transceive
        self.exchanges: list[tuple[BitFrame, BitFrame]] = []

    def __call__(self, frame: BitFrame) -> BitFrame:
        answer = self.inner(frame)
        self.exchanges.append((frame, answer))
        return answer

    def nvbs(self) -> list[int]:
        """NVB of every ANTICOLLISION/SELECT frame sent, in order."""
        sels = (SEL_CL1, SEL_CL2, SEL_CL3)
        return [(f.bits >> 9) & 0xFF for f, _ in self.exchanges if f.bits & 0xFF in sels]

    def collisions(self) -> list[int]:
        """Collision index of every answer to an ANTICOLLISION frame that had one."""
        sels = (SEL_CL1, SEL_CL2, SEL_CL3)
        return [
            a.collision
            for f, a in self.exchanges
            if f.bits & 0xFF in sels and (f.bits >> 9) & 0xFF != 0x70 and a.collision >= 0
        ]


def crc_a_bitwise(data: bytes) -> bytes:
    """CRC_A straight from the definition (ISO/IEC 14443-3 Annex B: x^16 + x^12 + x^5 + 1,
    reflected, preset 0x6363), one bit at a time: independent of the table in iso14443a."""
    crc = 0x6363
    for byte in data:
        for i in range(8):
            bit = ((byte >> i) ^ crc) & 1
            crc >>= 1
            if bit:
                crc ^= 0x8408
    return crc.to_bytes(2, "little")


def air_index(data_bit: int, known: int = 0) -> int:
    """Air position of UID CLn/BCC bit ``data_bit`` in a card's answer after ``known`` bits
    (a parity bit follows every byte that ends before it)."""
    return (data_bit - known) + (data_bit // 8 - known // 8)


# --- known answers ----------------------------------------------------------------------------


def test_crc_a_published_examples() -> None:
    # ISO/IEC 14443-3 Annex B examples and the HLTA every trace shows.
    assert crc_a(b"\x00\x00") == crc_a_bitwise(b"\x00\x00") == bytes.fromhex("a01e")
    assert crc_a(b"\x12\x34") == crc_a_bitwise(b"\x12\x34") == bytes.fromhex("26cf")
    assert crc_a(b"\x50\x00") == crc_a_bitwise(b"\x50\x00") == bytes.fromhex("57cd")
    assert encode(bytes.fromhex("500057cd")) == HLTA_FRAME


def test_select_frame_known_answer() -> None:
    # A sniffed MIFARE Classic 1K activation (Proxmark3 wiki, "Snooping on Mifare
    # communications"): 93 20 -> 9c 59 9b 32 6c; 93 70 9c 59 9b 32 6c 6b 30 -> 08 b6 dd.
    uid = bytes.fromhex("9c599b32")
    (level,) = cascade_levels(uid)
    assert level == bytes.fromhex("9c599b326c")
    assert bcc(uid) == 0x9C ^ 0x59 ^ 0x9B ^ 0x32 == 0x6C
    payload = bytes.fromhex("93709c599b326c")
    assert crc_a(payload) == crc_a_bitwise(payload) == bytes.fromhex("6b30")
    assert select_frame(SEL_CL1, level) == encode(bytes.fromhex("93709c599b326c6b30"))
    assert sak_frame(0x08) == encode(bytes.fromhex("08b6dd"))

    c = card("9c599b32")
    assert c.handle(short_frame(REQA)) == encode(bytes.fromhex("0400"))
    assert c.handle(encode(bytes.fromhex("9320"))) == encode(level)
    assert c.handle(select_frame(SEL_CL1, level)) == encode(bytes.fromhex("08b6dd"))
    assert c.state is PiccState.ACTIVE


@pytest.mark.parametrize(
    ("nbits", "code"), [(0, 0x20), (1, 0x21), (7, 0x27), (8, 0x30), (31, 0x57), (39, 0x67)]
)
def test_nvb_counts_sel_and_nvb_bytes(nbits: int, code: int) -> None:
    assert nvb(nbits) == code
    assert nvb(40) == 0x70


def test_split_byte_framing_known_answer() -> None:
    """11 known bits: the reader sends SEL, NVB 0x33, byte 0 with parity, then 3 bits and no
    parity; the card answers the 5 high bits of byte 1, the parity of the whole byte 1, then
    bytes 2..4 with parity."""
    level = bytes.fromhex("9c599b326c")
    known = int.from_bytes(level, "little")
    request = anticollision_frame(SEL_CL1, known, 11)
    assert request == concat([encode(bytes([0x93, 0x33, 0x9C])), encode_bits(0x59 & 0b111, 3)])
    assert request.length == 18 + 9 + 3
    expected = concat(
        [encode_bits(0x59 >> 3, 5), encode_bits(odd_parity(0x59), 1), encode(level[2:])]
    )
    assert anticollision_answer(level, 11) == expected

    c = card("9c599b32")
    c.handle(short_frame(REQA))
    assert c.handle(request) == expected
    # Full-byte split: whole bytes with parity both ways.
    assert c.handle(anticollision_frame(SEL_CL1, known, 16)) == encode(level[2:])
    # One bit left to send: the card answers the last BCC bit and the BCC's parity.
    assert c.handle(anticollision_frame(SEL_CL1, known, 39)) == BitFrame(
        (0x6C >> 7) | (odd_parity(0x6C) << 1), 2
    )
    assert c.state is PiccState.READY


def test_reader_ignores_the_parity_bit_of_the_split_byte() -> None:
    """The card computes it over the whole split byte, but ISO readers do not check it; a
    card that computes it over its own bits only must still be read."""
    level = bytes.fromhex("9c599b326c")
    answer_after_3_bits = anticollision_answer(level, 3)
    wrong = BitFrame(answer_after_3_bits.bits ^ (1 << 5), answer_after_3_bits.length)
    collided = BitFrame(encode(level).bits | 0b100, 45, collision=2)  # other card: bit 2 = 0

    selected = select_card(
        scripted(encode(bytes.fromhex("0400")), collided, wrong, sak_frame(0x08))
    )
    assert selected.uid == level[:4]


def test_card_drops_out_when_its_bits_do_not_match() -> None:
    c = card("9c599b32")
    c.handle(short_frame(REQA))
    other = int.from_bytes(bytes.fromhex("9c599b33"), "little")
    assert c.handle(anticollision_frame(SEL_CL1, other, 25)) == SILENCE
    assert c.state is PiccState.READY  # still in the game for the next round
    assert c.handle(encode(bytes.fromhex("9320"))) == encode(bytes.fromhex("9c599b326c"))


# --- selecting one card -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid_hex", "sak", "sels"),
    [
        ("9c599b32", 0x08, [SEL_CL1]),
        ("045f217a3c5880", 0x08, [SEL_CL1, SEL_CL2]),
        ("04a1b2c3d4e5f6071829", 0x20, [SEL_CL1, SEL_CL2, SEL_CL3]),
    ],
)
def test_select_single_card(uid_hex: str, sak: int, sels: list[int]) -> None:
    c = card(uid_hex, sak=sak)
    trace = Trace(Field([c]).transceive)
    selected = select_card(trace)
    uid = bytes.fromhex(uid_hex)
    assert selected == SelectedCard(uid, ATQA_BY_SIZE[len(uid)], sak, cascade_levels(uid))
    assert c.state is PiccState.ACTIVE
    sent = [f for f, _ in trace.exchanges]
    assert sent[0] == short_frame(REQA)
    assert [f.bits & 0xFF for f in sent[1:]] == [sel for sel in sels for _ in (0, 1)]
    assert trace.nvbs() == [0x20, 0x70] * len(sels)
    # Intermediate levels answer SAK 0x04, the last the card's own SAK.
    saks = [split(a)[0][0] for f, a in trace.exchanges if (f.bits >> 9) & 0xFF == 0x70]
    assert saks == [SAK_UID_INCOMPLETE] * (len(sels) - 1) + [sak]


def test_reqa_and_wupa_in_halt() -> None:
    c = card("045f217a3c5880")
    air = Field([c])
    select_card(air.transceive)
    halt(air.transceive)
    assert c.state is PiccState.HALT
    with pytest.raises(NoResponseError, match="WUPA"):
        select_card(air.transceive)  # REQA does not wake a halted card
    assert c.state is PiccState.HALT
    selected = select_card(air.transceive, wakeup=True)
    assert selected.uid == c.uid
    assert c.state is PiccState.ACTIVE and c.from_halt
    # ACTIVE*: an error sends the card back to HALT, not IDLE.
    assert c.handle(short_frame(REQA)) == SILENCE
    assert c.state is PiccState.HALT
    # WUPA also works from IDLE; a field reset forgets the HALT.
    air.reset()
    assert c.state is PiccState.IDLE
    assert select_card(air.transceive, wakeup=True).uid == c.uid
    assert not c.from_halt


def test_wupa_from_halt_then_error_in_ready_returns_to_halt() -> None:
    c = card("9c599b32")
    c.halt()
    assert c.handle(short_frame(WUPA)) == encode(c.atqa)
    assert c.state is PiccState.READY and c.from_halt
    assert c.handle(encode(bytes.fromhex("9520"))) == SILENCE  # wrong cascade level
    assert c.state is PiccState.HALT


def test_select_with_crc_error_gets_silence() -> None:
    c = card("9c599b32")
    c.handle(short_frame(REQA))
    good = bytes.fromhex("93709c599b326c6b30")
    bad_crc = encode(good[:-1] + bytes([good[-1] ^ 0x01]))  # parity right, CRC wrong
    assert c.handle(bad_crc) == SILENCE
    assert c.state is PiccState.IDLE  # a transmission error ends the selection
    # Parity error in an otherwise good SELECT: silence too.
    c.handle(short_frame(REQA))
    flipped_parity = BitFrame(encode(good).bits ^ (1 << 8), 81)
    assert c.handle(flipped_parity) == SILENCE
    # A good SELECT for another UID: silence, and the card waits for the next REQA.
    c.handle(short_frame(REQA))
    assert c.handle(select_frame(SEL_CL1, cascade_levels(bytes.fromhex("9c599b33"))[0])) == (
        SILENCE
    )
    assert c.state is PiccState.IDLE


def test_active_card_leaves_other_frames_to_the_layer_above() -> None:
    c = card("9c599b32")
    select_card(Field([c]).transceive)
    read_block_0 = encode(with_crc(b"\x30\x00"))
    assert c.handle(read_block_0) is None
    assert c.handle(encode(bytes.fromhex("9340"))) is None  # could be ciphertext: not ours
    assert c.handle(encode_bits(0xA, 4)) is None  # a 4-bit ACK-sized frame
    assert c.state is PiccState.ACTIVE
    assert c.handle(HLTA_FRAME) == SILENCE
    assert c.state is PiccState.HALT
    # A well-formed SELECT while ACTIVE is an error: back to IDLE.
    c.reset()
    select_card(Field([c]).transceive)
    assert c.handle(select_frame(SEL_CL1, c.levels[0])) == SILENCE
    assert c.state is PiccState.IDLE


def test_hlta_outside_active_is_an_error_not_a_halt() -> None:
    c = card("9c599b32")
    c.handle(short_frame(REQA))
    assert c.handle(HLTA_FRAME) == SILENCE
    assert c.state is PiccState.IDLE


def test_card_constructor_refuses_impossible_cards() -> None:
    with pytest.raises(CodecError):
        CardSelector(bytes(5), ATQA_BY_SIZE[4], 0x08)
    with pytest.raises(CodecError, match="cascade tag"):
        CardSelector(bytes.fromhex("88010203"), ATQA_BY_SIZE[4], 0x08)
    with pytest.raises(CodecError, match="uid3"):
        CardSelector(bytes.fromhex("04010288030405"), ATQA_BY_SIZE[7], 0x08)
    with pytest.raises(CodecError, match="ATQA"):
        CardSelector(bytes(4), b"\x04", 0x08)
    with pytest.raises(CodecError, match="0x04"):
        CardSelector(bytes(4), ATQA_BY_SIZE[4], 0x0C)


# --- several cards in one field ---------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 5, 7, 8, 15, 20, 31])
def test_collision_at_each_position_is_resolved(bit: int) -> None:
    base = bytes.fromhex("12345670")
    flipped = int.from_bytes(base, "little") ^ (1 << bit)
    one, zero = base, flipped.to_bytes(4, "little")
    if (flipped >> bit) & 1:
        one, zero = zero, one
    air = Field([card(one.hex()), card(zero.hex())])
    trace = Trace(air.transceive)
    first = select_card(trace)
    assert first.uid == one  # ISO's suggestion: take 1 at the collision
    assert trace.collisions() == [air_index(bit)]
    assert trace.nvbs() == [0x20, nvb(bit + 1), 0x70]
    halt(trace)
    assert select_card(trace).uid == zero


def test_collision_bit_zero_selects_the_other_card() -> None:
    air = Field([card("10000000"), card("11000000")])
    assert select_card(air.transceive, collision_bit=0).uid == bytes.fromhex("10000000")


@pytest.mark.parametrize(
    ("uids", "collision_at", "nvb_after"),
    [
        # Differ in the first bit of byte 0.
        (["10aabbcc", "11aabbcc"], 0, 0x21),
        # Differ only in the last UID bit (so the BCCs differ too): resolved at bit 31, then
        # the reader asks for the BCC alone (NVB 0x60).
        (["a1b2c3d4", "a1b2c354"], air_index(31), 0x60),
        # Three cards sharing 3 bytes and more: two rounds of collisions.
        (["deadbe01", "deadbe02", "deadbe03"], air_index(24), 0x52),
        # Two 7-byte UIDs with the same CL1: the collision is at cascade level 2.
        (["04112233445566", "04112233445567"], air_index(24), 0x51),
        # 10-byte UIDs with the same CL1 and CL2: collision at cascade level 3.
        (["04112233445566778899", "0411223344556677889a"], air_index(24), 0x51),
        # Mixed sizes: the cascade tag 0x88 collides with the single-size uid0 0x04 at bit 2.
        (["04112233", "04112233445566", "04112233445566778899"], air_index(2), 0x23),
    ],
)
def test_enumerate_cards_with_shared_prefixes(
    uids: list[str], collision_at: int, nvb_after: int
) -> None:
    cards = [card(u) for u in uids]
    trace = Trace(Field(cards).transceive)
    found = enumerate_cards(trace)
    assert sorted(f.uid.hex() for f in found) == sorted(uids)
    assert all(c.state is PiccState.HALT for c in cards)
    assert trace.collisions()[0] == collision_at
    assert nvb_after in trace.nvbs()


def test_atqa_collision_is_reported_not_fatal() -> None:
    air = Field([card("9c599b32"), card("045f217a3c5880")])
    first = select_card(air.transceive)
    assert first.atqa_collision
    assert first.atqa == bytes([0x04 | 0x44, 0x00])  # colliding bits read 1
    halt(air.transceive)
    second = select_card(air.transceive)
    assert not second.atqa_collision
    assert {first.uid, second.uid} == {bytes.fromhex("9c599b32"), bytes.fromhex("045f217a3c5880")}


class FaultyBcc(CardSelector):
    """A card that sends a wrong BCC on cascade level 1 (a broken clone)."""

    def __init__(self, uid: bytes, flip: int) -> None:
        super().__init__(uid, ATQA_BY_SIZE[len(uid)], SAK_CLASSIC_1K)
        first = bytearray(self.levels[0])
        first[4] ^= flip
        self.levels = (bytes(first), *self.levels[1:])


def test_wrong_bcc_detected_by_the_reader() -> None:
    with pytest.raises(BccError, match="BCC 0x6d") as info:
        select_card(Field([FaultyBcc(bytes.fromhex("9c599b32"), 0x01)]).transceive)
    assert isinstance(info.value, ProtocolError)


def test_collision_inside_the_bcc() -> None:
    uid = bytes.fromhex("9c599b32")  # BCC 0x6c = 0110_1100
    # The clone's BCC has a 1 where the genuine card has 0 (bit 0): the reader follows the
    # 1, reaches the clone alone, and its BCC check refuses it.
    trace = Trace(Field([card(uid.hex()), FaultyBcc(uid, 0x01)]).transceive)
    with pytest.raises(BccError):
        select_card(trace)
    assert trace.collisions() == [air_index(32)]
    assert trace.nvbs()[-1] == nvb(33)
    # The genuine card has the 1 (bit 2): the reader follows it and selects it.
    genuine = card(uid.hex())
    trace = Trace(Field([genuine, FaultyBcc(uid, 0x04)]).transceive)
    assert select_card(trace).uid == uid
    assert trace.collisions() == [air_index(34)]
    assert trace.nvbs() == [0x20, nvb(35), 0x70]
    assert genuine.state is PiccState.ACTIVE


def test_same_uid_different_sak_is_a_collision() -> None:
    air = Field([card("9c599b32", sak=0x08), card("9c599b32", sak=0x18)])
    with pytest.raises(CollisionError, match="share that UID"):
        select_card(air.transceive)


def _uid_size_ok(uid: bytes) -> bytes:
    uid = bytearray(uid)
    if len(uid) == 4 and uid[0] == 0x88:
        uid[0] ^= 1
    if len(uid) == 7 and uid[3] == 0x88:
        uid[3] ^= 1
    return bytes(uid)


@st.composite
def uid_sets(draw: st.DrawFn) -> set[bytes]:
    """1..4 distinct UIDs of mixed sizes, mostly near one another (long shared prefixes,
    a few flipped bits) so the anticollision loop has real work at every cascade level."""
    base = draw(st.binary(min_size=10, max_size=10))
    uids: set[bytes] = set()
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.sampled_from(UID_SIZES))
        if draw(st.booleans()):
            uid = bytearray(draw(st.binary(min_size=size, max_size=size)))
        else:
            uid = bytearray(base[:size])
            for b in draw(st.lists(st.integers(0, 8 * size - 1), max_size=3)):
                uid[b // 8] ^= 1 << (b % 8)
        uids.add(_uid_size_ok(bytes(uid)))
    return uids


@given(
    uids=uid_sets(),
    saks=st.lists(st.sampled_from([0x00, 0x08, 0x18, 0x20, 0x28]), min_size=4, max_size=4),
    collision_bit=st.sampled_from([0, 1]),
)
def test_reader_enumerates_exactly_the_cards_in_the_field(
    uids: set[bytes], saks: list[int], collision_bit: int
) -> None:
    pairs = zip(sorted(uids), saks[: len(uids)], strict=True)
    cards = [CardSelector(u, ATQA_BY_SIZE[len(u)], sak) for u, sak in pairs]
    air = Field(cards)
    found: dict[bytes, SelectedCard] = {}
    for _ in range(len(cards)):
        selected = select_card(air.transceive, collision_bit=collision_bit)
        assert selected.uid not in found
        found[selected.uid] = selected
        (active,) = [c for c in cards if c.state is PiccState.ACTIVE]
        assert active.uid == selected.uid and active.sak == selected.sak
        assert selected.levels == active.levels
        halt(air.transceive)
    assert set(found) == uids
    with pytest.raises(NoResponseError):
        select_card(air.transceive)
    assert all(c.state is PiccState.HALT for c in cards)


# --- the air ----------------------------------------------------------------------------------


def test_a_field_with_one_card_hears_what_field_response_hears() -> None:
    """One card in the field takes a shortcut past field_response: the same answers."""

    class Scripted:
        def __init__(self, answer: object) -> None:
            self.answer = answer

        def handle(self, frame: BitFrame) -> object:
            return self.answer

        def reset(self) -> None:
            pass

    frame = short_frame(REQA)
    for answer in (None, SILENCE, BitFrame(0, 0), BitFrame(0b1011, 4), BitFrame(1, 2, 1)):
        heard = Field([Scripted(answer)]).transceive(frame)
        assert heard == field_response([answer])
        assert type(heard) is BitFrame and (heard is SILENCE) == (not answer)


def test_field_response_superposes_answers() -> None:
    a = BitFrame(0b1010, 4)
    assert field_response([]) == SILENCE
    assert field_response([SILENCE, None]) == SILENCE
    assert field_response([SILENCE, a, None]) == a
    assert field_response([a, a]) == a
    both = field_response([a, BitFrame(0b0110, 4)])
    assert both == BitFrame(0b1110, 4, collision=2)
    # A longer answer is heard alone past the end of a shorter one.
    assert field_response([a, BitFrame(0b11010, 5)]) == BitFrame(0b11010, 5)
    # A collision already in an input (a nested field) is kept.
    assert field_response([BitFrame(0b1, 2, collision=1), BitFrame(0b1, 2)]).collision == 1


def test_field_remove_powers_the_card_down() -> None:
    c = card("9c599b32")
    air = Field([c])
    select_card(air.transceive)
    air.remove(c)
    assert c.state is PiccState.IDLE
    with pytest.raises(NoResponseError):
        select_card(air.transceive)


# --- the reader against faulty air ------------------------------------------------------------


def scripted(*answers: BitFrame) -> Callable[[BitFrame], BitFrame]:
    queue = list(answers)

    def transceive(frame: BitFrame) -> BitFrame:
        return queue.pop(0) if queue else SILENCE

    return transceive


def test_reader_errors_a_technician_can_act_on() -> None:
    atqa = encode(bytes.fromhex("0400"))
    level = bytes.fromhex("9c599b326c")
    with pytest.raises(NoResponseError, match="no card in the field"):
        select_card(Field().transceive)
    with pytest.raises(FrameError, match="ATQA of 17 bits"):
        select_card(scripted(BitFrame(0, 17)))
    with pytest.raises(ParityError, match="ATQA"):
        select_card(scripted(BitFrame(atqa.bits ^ (1 << 8), 18)))
    with pytest.raises(ProtocolError, match="Topaz"):
        select_card(scripted(encode(bytes.fromhex("000c"))))
    with pytest.raises(NoResponseError, match="left the field"):
        select_card(scripted(atqa))
    with pytest.raises(FrameError, match="parity error"):
        select_card(scripted(atqa, BitFrame(encode(level).bits ^ (1 << 17), 45)))
    with pytest.raises(FrameError, match="expected 45"):
        select_card(scripted(atqa, BitFrame(0, 44)))
    with pytest.raises(CollisionError, match="parity bit"):
        select_card(scripted(atqa, BitFrame(encode(level).bits, 45, collision=8)))
    with pytest.raises(FrameError, match="bogus"):
        select_card(scripted(atqa, BitFrame(encode(level).bits, 45, collision=50)))
    with pytest.raises(NoResponseError, match="SELECT"):
        select_card(scripted(atqa, encode(level)))
    with pytest.raises(CrcError, match="SAK at cascade level 1"):
        select_card(scripted(atqa, encode(level), encode(bytes.fromhex("08b6de"))))
    with pytest.raises(FrameError, match="SAK answer of 18 bits"):
        select_card(scripted(atqa, encode(level), encode(b"\x08\x00")))
    with pytest.raises(ProtocolError, match="no cascade tag"):
        select_card(scripted(atqa, encode(level), sak_frame(0x04)))


@pytest.mark.parametrize("byte_no", range(5))
def test_parity_error_in_a_whole_answer_names_the_byte(byte_no: int) -> None:
    """A full (no bits known) anticollision answer is checked five bytes at once; a parity
    error must still name the byte, as the bit-by-bit check does."""
    atqa = encode(bytes.fromhex("0400"))
    level = bytes.fromhex("9c599b326c")
    bad = BitFrame(encode(level).bits ^ (1 << (9 * byte_no + 8)), 45)
    name = "BCC" if byte_no == 4 else f"UID CL1 byte {byte_no}"
    expected = rf"\({name} = 0x{level[byte_no]:02x}\) at cascade level 1"
    with pytest.raises(FrameError, match=expected):
        select_card(scripted(atqa, bad))


@given(level=st.binary(min_size=5, max_size=5), known=st.integers(0, 39))
def test_answers_are_the_same_built_or_remembered(level: bytes, known: int) -> None:
    first = anticollision_answer(level, known)
    assert anticollision_answer(level, known) == first
    assert anticollision_answer(bytearray(level), known) == first  # not remembered, built


def test_sak_incomplete_after_level_three_is_refused() -> None:
    atqa = encode(ATQA_BY_SIZE[10])
    tagged = bytes.fromhex("88010203")
    level = encode(tagged + bytes([bcc(tagged)]))
    answers = [atqa] + [level, sak_frame(0x04)] * 3
    with pytest.raises(ProtocolError, match="level 3"):
        select_card(scripted(*answers))


def test_halt_answered_is_an_error() -> None:
    halt(scripted(SILENCE))
    with pytest.raises(ProtocolError, match="did not halt"):
        halt(scripted(encode_bits(0xA, 4)))


def test_enumerate_refuses_a_card_that_ignores_hlta() -> None:
    class Deaf(CardSelector):
        def halt(self) -> None:  # never halts: goes back to IDLE instead
            self.reset()

    with pytest.raises(ProtocolError, match="selected twice"):
        enumerate_cards(Field([Deaf(bytes.fromhex("9c599b32"), ATQA_BY_SIZE[4], 8)]).transceive)
    cards = [card(f"0{i}aabbcc") for i in range(4)]
    with pytest.raises(CollisionError, match="more than 3 cards"):
        enumerate_cards(Field(cards).transceive, limit=3)


# --- the card against garbage -----------------------------------------------------------------


def _card_in(state: str) -> CardSelector:
    c = card("045f217a3c5880")
    if state == "ready":
        c.handle(short_frame(REQA))
    elif state == "ready2":
        c.handle(short_frame(REQA))
        c.handle(select_frame(SEL_CL1, c.levels[0]))
    elif state == "active":
        select_card(Field([c]).transceive)
    elif state == "halt":
        c.halt()
    return c


def _near_valid_frames() -> st.SearchStrategy[BitFrame]:
    """Valid activation frames with a few bits flipped or cut: the garbage that gets
    furthest into the parser."""
    levels = cascade_levels(bytes.fromhex("045f217a3c5880"))
    known = int.from_bytes(levels[0], "little")
    valid = [
        short_frame(REQA),
        short_frame(WUPA),
        HLTA_FRAME,
        select_frame(SEL_CL1, levels[0]),
        select_frame(SEL_CL2, levels[1]),
        *(anticollision_frame(SEL_CL1, known, n) for n in range(40)),
    ]

    @st.composite
    def mutate(draw: st.DrawFn) -> BitFrame:
        frame = draw(st.sampled_from(valid))
        bits, length = frame.bits, frame.length
        for pos in draw(st.lists(st.integers(0, length - 1), max_size=3)):
            bits ^= 1 << pos
        cut = draw(st.integers(0, min(length, 3)))
        length -= cut
        return BitFrame(bits & ((1 << length) - 1), length)

    return mutate()


garbage_frames = st.one_of(
    st.integers(0, 120).flatmap(
        lambda n: st.builds(BitFrame, st.integers(0, (1 << n) - 1), st.just(n))
    ),
    _near_valid_frames(),
)


@given(
    state=st.sampled_from(["idle", "ready", "ready2", "active", "halt"]),
    frames=st.lists(garbage_frames, min_size=1, max_size=8),
)
def test_card_never_raises_on_garbage(state: str, frames: list[BitFrame]) -> None:
    c = _card_in(state)
    for frame in frames:
        was_active = c.state is PiccState.ACTIVE
        try:
            answer = c.handle(frame)
        except CoreError:  # allowed by contract, but the card should rather stay silent
            pytest.fail(f"CardSelector raised on {frame!r}")
        assert isinstance(c.state, PiccState)
        assert isinstance(answer, BitFrame) or (answer is None and was_active)


def test_card_refuses_non_frames_with_a_core_error() -> None:
    with pytest.raises(FrameError):
        card("9c599b32").handle(b"\x26")  # type: ignore[arg-type]
