"""MIFARE Classic protocol: the reader side against the card side, in process, bit level."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.core.crypto1 import Crypto1, Crypto1Ref
from firmware.core.errors import (
    AuthenticationError,
    CoreError,
    CrcError,
    NackError,
    NoResponseError,
    ParityError,
    ProtocolError,
)
from firmware.core.iso14443a import SILENCE, BitFrame
from firmware.core.mifare import (
    NACK_INVALID_OP,
    CardState,
    ClassicCard,
    ClassicReader,
    TagNonces,
)

UID4 = bytes.fromhex("9C599B32")
UID7 = bytes.fromhex("045F217A3C5880")
FFKEY = bytes.fromhex("FFFFFFFFFFFF")
KEY_A = bytes.fromhex("A0A1A2A3A4A5")
KEY_B = bytes.fromhex("B0B1B2B3B4B5")


def make_pair(uid=UID4, card_type=layout.CardType.CLASSIC_1K, cipher=Crypto1, seed=1):
    memory = layout.factory_memory(uid, card_type)
    card = ClassicCard(
        uid, memory, card_type=card_type, cipher_factory=cipher,
        nonces=TagNonces(random.Random(seed)),
    )
    rng = random.Random(seed + 1000)
    reader = ClassicReader(
        card.handle, uid, cipher_factory=cipher, nonce=lambda: rng.getrandbits(32)
    )
    return card, reader, memory


def secure_sector(reader: ClassicReader, sector: int, card_type=layout.CardType.CLASSIC_1K):
    """Personalise a factory sector: keys A/B and the transit access conditions."""
    first = layout.first_block(sector, card_type)
    reader.authenticate(first, FFKEY, "A")
    reader.write(first, layout.encode_value_block(1000, first))
    trailer = layout.transit_trailer(KEY_A, KEY_B).to_bytes()
    reader.write(layout.trailer_block(sector, card_type), trailer)


@pytest.mark.parametrize("cipher", [Crypto1, Crypto1Ref], ids=["cython", "reference"])
@pytest.mark.parametrize("uid", [UID4, UID7], ids=["uid4", "uid7"])
def test_auth_read_write_value_roundtrip(cipher, uid):
    _card, reader, memory = make_pair(uid, cipher=cipher)
    reader.authenticate(4, FFKEY, "A")
    assert reader.read(4) == bytes(16)
    payload = bytes(range(16))
    reader.write(5, payload)
    assert reader.read(5) == payload
    assert memory[16 * 5 : 16 * 6] == payload
    reader.write(6, layout.encode_value_block(1000, 6))
    reader.decrement(6, 250)
    reader.transfer(6)
    assert layout.decode_value_block(reader.read(6)) == (750, 6)
    reader.increment(6, 100)
    reader.transfer(6)
    assert layout.decode_value_block(bytes(memory[96:112])) == (850, 6)
    # RESTORE + TRANSFER copies a value block: the backup pattern of a purse
    reader.restore(6)
    reader.transfer(5)
    assert layout.decode_value_block(bytes(memory[80:96])) == (850, 6)


def test_nested_authentication_switches_sector_and_key():
    card, reader, _memory = make_pair()
    secure_sector(reader, 2)
    reader.halt()
    card.reset()
    reader.authenticate(4, FFKEY, "A")
    reader.write(4, b"sector one data!")
    reader.authenticate(8, KEY_B, "B")  # nested: the card nonce arrives encrypted
    assert card.auth_sector == 2
    reader.decrement(8, 1)
    reader.transfer(8)
    assert layout.decode_value_block(reader.read(8))[0] == 999
    reader.authenticate(5, FFKEY, "A")  # nested back into sector 1
    assert reader.read(4) == b"sector one data!"


def test_nested_auth_with_wrong_key_fails_cleanly():
    _card, reader, _ = make_pair()
    secure_sector(reader, 2)
    reader.authenticate(4, FFKEY, "A")
    with pytest.raises(AuthenticationError):
        reader.authenticate(8, FFKEY, "A")
    assert reader.cipher is None


def test_wrong_key_gives_authentication_error_and_card_stays_silent():
    card, reader, _ = make_pair()
    with pytest.raises(AuthenticationError, match="wrong key"):
        reader.authenticate(4, KEY_A, "A")
    assert reader.cipher is None
    assert card.state is CardState.ABORTED


def test_wrong_key_type_after_personalisation():
    card, reader, _ = make_pair()
    secure_sector(reader, 3)
    reader.halt()
    card.reset()
    with pytest.raises(AuthenticationError):
        reader.authenticate(12, KEY_B, "A")  # key B offered as key A


def test_access_bits_are_enforced():
    card, reader, memory = make_pair()
    secure_sector(reader, 1)
    reader.halt()
    card.reset()
    reader.authenticate(4, KEY_A, "A")
    before = bytes(memory[16 * 5 : 16 * 6])
    with pytest.raises(NackError) as info:
        reader.write(5, b"x" * 16)  # transit layout: data writable with key B only
    assert info.value.code == NACK_INVALID_OP
    assert bytes(memory[16 * 5 : 16 * 6]) == before
    card.reset()
    reader.authenticate(4, KEY_A, "A")
    reader.decrement(4, 10)  # decrement is allowed with key A
    reader.transfer(4)
    with pytest.raises(NackError):
        reader.increment(4, 10)  # increment needs key B
    card.reset()
    reader.authenticate(4, KEY_B, "B")
    reader.increment(4, 10)
    reader.transfer(4)
    assert layout.decode_value_block(bytes(memory[64:80]))[0] == 1000


def test_trailer_read_masks_keys():
    _, reader, _ = make_pair()
    secure_sector(reader, 1)
    reader.authenticate(4, KEY_A, "A")
    trailer = reader.read(7)
    assert trailer[0:6] == bytes(6)  # key A is never readable
    assert trailer[10:16] == bytes(6)  # key B is not readable in the transit layout
    assert trailer[6:9] == layout.transit_trailer(KEY_A, KEY_B).to_bytes()[6:9]


def test_read_outside_authenticated_sector_is_refused():
    _, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    with pytest.raises(NackError):
        reader.read(8)


def test_manufacturer_block_is_read_only():
    _, reader, memory = make_pair()
    reader.authenticate(0, FFKEY, "A")
    assert reader.read(0) == bytes(memory[0:16])
    with pytest.raises(NackError):
        reader.write(0, bytes(16))


def test_value_command_on_non_value_block_is_refused():
    _, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    reader.write(4, b"not a value blk!")
    with pytest.raises(NackError):
        reader.decrement(4, 1)


def test_transfer_without_buffer_is_refused():
    _, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    with pytest.raises(NackError):
        reader.transfer(4)


def test_commands_without_session_need_authentication():
    _, reader, _ = make_pair()
    with pytest.raises(ProtocolError):
        reader.read(4)


def test_halt_silences_the_card():
    card, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    reader.halt()
    assert card.state is CardState.HALTED
    assert card.handle(BitFrame(0x26, 7)) == SILENCE


def test_card_removed_mid_write_is_a_clean_no_response():
    card, reader, memory = make_pair()
    reader.authenticate(4, FFKEY, "A")
    calls = {"n": 0}

    def tearing(frame: BitFrame) -> BitFrame:
        calls["n"] += 1
        return SILENCE if calls["n"] > 1 else card.handle(frame)

    reader._transceive = tearing
    before = bytes(memory[80:96])
    with pytest.raises(NoResponseError):
        reader.write(5, b"y" * 16)
    assert bytes(memory[80:96]) == before  # the data phase never reached the card


def _flip(frame: BitFrame, index: int) -> BitFrame:
    return BitFrame(frame.bits ^ (1 << index), frame.length)


def test_corrupted_parity_in_answer_is_a_frame_error():
    card, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")

    def corrupt(frame: BitFrame) -> BitFrame:
        answer = card.handle(frame)
        return _flip(answer, 8) if answer.length > 9 else answer  # first parity bit

    reader._transceive = corrupt
    with pytest.raises(ParityError):
        reader.read(4)
    assert reader.cipher is None


def test_corrupted_crc_in_answer_is_a_crc_error():
    card, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")

    def corrupt(frame: BitFrame) -> BitFrame:
        answer = card.handle(frame)
        if answer.length == 18 * 9:
            # flip one data bit and its parity bit: parity still checks, the CRC cannot
            return _flip(_flip(answer, 9 * 3), 9 * 3 + 8)
        return answer

    reader._transceive = corrupt
    with pytest.raises(CrcError):
        reader.read(4)


def test_card_answers_crc_error_with_nack():
    _card, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    send = reader._transceive

    def corrupt(frame: BitFrame) -> BitFrame:
        return send(_flip(_flip(frame, 0), 8))  # bad data bit with matching parity

    reader._transceive = corrupt
    with pytest.raises(NackError) as info:
        reader.read(4)
    assert info.value.code == 0x5


def test_4k_large_sector_roundtrip():
    card_type = layout.CardType.CLASSIC_4K
    _card, reader, _memory = make_pair(card_type=card_type)
    first = layout.first_block(35, card_type)
    reader.authenticate(first, FFKEY, "A")
    reader.write(first + 14, bytes(range(16, 32)))
    assert reader.read(first + 14) == bytes(range(16, 32))
    assert layout.sector_of(first + 14, card_type) == 35


def test_tracer_sees_plaintext_of_every_frame():
    entries = []
    memory = layout.factory_memory(UID4, layout.CardType.CLASSIC_1K)
    card = ClassicCard(UID4, memory)
    reader = ClassicReader(card.handle, UID4, tracer=entries.append)
    reader.authenticate(4, FFKEY, "A")
    reader.read(4)
    directions = [e.direction for e in entries]
    assert directions == ["R>C", "C>R", "R>C", "C>R", "R>C", "C>R"]
    assert entries[0].plain[:2] == bytes([0x60, 4])
    assert entries[-1].plain == bytes(16)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, (1 << 200) - 1), st.integers(0, 200)), max_size=6))
def test_card_never_crashes_on_garbage(frames):
    card, reader, _ = make_pair()
    if frames and frames[0][1] % 2:
        reader.authenticate(4, FFKEY, "A")  # garbage inside an open session too
    for bits, length in frames:
        answer = card.handle(BitFrame(bits & ((1 << length) - 1), length))
        assert isinstance(answer, BitFrame)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, (1 << 200) - 1), st.integers(0, 200)), min_size=1))
def test_reader_rejects_garbage_answers_with_core_errors(answers):
    it = iter(answers)

    def garbage(frame: BitFrame) -> BitFrame:
        bits, length = next(it, (0, 0))
        return BitFrame(bits & ((1 << length) - 1), length)

    reader = ClassicReader(garbage, UID4)
    try:
        reader.authenticate(4, FFKEY, "A")
        reader.read(4)
        reader.write(4, bytes(16))
    except CoreError:
        pass


# ---------------------------------------------------------------------------------------------
# The C fast paths (firmware/core/_framing.pyx: classic_card_frame, classic_reader_read,
# classic_reader_command, classic_reader_ack) against the Python code they stand in for
# ---------------------------------------------------------------------------------------------

# mostly sector 1 (where the session is), now and then anywhere
_BLOCKS = st.sampled_from([4, 5, 5, 6, 6, 7]) | st.integers(0, 70)
_VALUES = st.builds(
    layout.encode_value_block,
    st.integers(-5, 5000) | st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([5, 6]) | st.integers(0, 255),
)
_AMOUNTS = st.integers(0, 3000) | st.integers(0, 2**31 - 1)
_SESSION_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("auth"), st.sampled_from([4, 8]), st.just(FFKEY), st.just("A")),
        st.tuples(st.just("auth"), _BLOCKS, st.sampled_from([FFKEY, KEY_A]), st.sampled_from("AB")),
        st.tuples(st.just("read"), _BLOCKS),
        st.tuples(st.just("write"), _BLOCKS, st.binary(min_size=16, max_size=16) | _VALUES),
        st.tuples(st.sampled_from(["increment", "decrement"]), _BLOCKS, _AMOUNTS),
        st.tuples(st.sampled_from(["restore", "transfer"]), _BLOCKS),
        st.tuples(
            st.just("value+transfer"),
            st.sampled_from(["increment", "decrement", "restore"]),
            _BLOCKS,
            _AMOUNTS,
            _BLOCKS,
        ),
        st.tuples(st.just("halt")),
        st.tuples(st.just("reselect")),
        st.tuples(st.just("air"), st.integers(0, (1 << 200) - 1), st.integers(0, 200)),
        st.tuples(st.just("flip"), st.integers(1, 3)),
        st.tuples(st.just("tear"), st.integers(1, 4), st.booleans()),
    ),
    max_size=30,
)


def _session_transcript(seed: int, ops: list[tuple], *, slow: bool) -> list[tuple]:
    """Run ``ops`` against a seeded virtual card; every outcome and the state after it.

    ``slow``: the card's and the tag's C paths are switched off, the reader has a tracer
    (which keeps it on its Python paths) and a fault is armed that never fires (which keeps
    the virtual card on its fault-checking path, which goes through ``ClassicTag.handle``)."""
    from firmware.core import mifare
    from firmware.core.anticollision import Field, select_card
    from simulators.cards import VirtualCard

    rng = random.Random(seed)
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
    field = Field([card])
    saved = mifare.classic_card_frame, mifare.classic_tag_frame
    if slow:
        mifare.classic_card_frame = lambda card, frame: None
        mifare.classic_tag_frame = lambda tag, frame: None
        card.faults.tear_after(10**9)
    out: list[tuple] = []
    try:
        reader = None

        def connect() -> ClassicReader:
            field.reset()
            selected = select_card(field.transceive)
            return ClassicReader(
                field.transceive,
                selected.uid,
                nonce=lambda: rng.getrandbits(32),
                tracer=(lambda entry: None) if slow else None,
            )

        reader = connect()
        reader.authenticate(4, FFKEY, "A")
        reader.write(5, layout.encode_value_block(1000, 5))
        reader.write(6, layout.encode_value_block(-7, 6))
        for op in ops:
            name, *args = op
            try:
                if name == "auth":
                    result = reader.authenticate(*args)
                elif name == "reselect" or not card.in_field:
                    card.place()  # back after a tear
                    reader = connect()
                    result = reader.uid
                elif name == "reselect":
                    reader = connect()
                    result = reader.uid
                elif name == "air":
                    bits, length = args
                    result = field.transceive(BitFrame(bits & ((1 << length) - 1), length))
                elif name == "flip":
                    result = card.faults.flip_bits(*args)
                elif name == "tear":
                    result = card.faults.tear_after(args[0], answer=args[1])
                elif name == "value+transfer":
                    how, block, amount, target = args
                    if reader.cipher is None:
                        card.place()
                        reader = connect()
                        reader.authenticate(4, FFKEY, "A")
                    if how == "restore":
                        reader.restore(block)
                    else:
                        getattr(reader, how)(block, amount)
                    result = reader.transfer(target)
                else:
                    if reader.cipher is None:  # open a session first, as a rig would
                        card.place()
                        reader = connect()
                        reader.authenticate(4, FFKEY, "A")
                    result = getattr(reader, name)(*args)
                outcome = ("ok", result)
            except (CoreError, ValueError) as exc:
                outcome = ("raised", type(exc), str(exc))
            tag = card.tag
            out.append(
                (
                    op,
                    outcome,
                    bytes(card.memory),
                    tag.card.state,
                    tag.selector.state,
                    card.in_field,
                    card.counters.as_dict(),
                    reader.cipher is None,
                )
            )
    finally:
        mifare.classic_card_frame, mifare.classic_tag_frame = saved
    return out


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), ops=_SESSION_OPS)
def test_fast_paths_match_the_python_paths(seed, ops):
    fast = _session_transcript(seed, ops, slow=False)
    assert fast == _session_transcript(seed, ops, slow=True)


def test_fast_paths_are_taken():
    """The C paths are really in use on an ordinary session (else the test above compares
    the Python paths with themselves)."""
    from firmware.core import _framing

    card, reader, _ = make_pair()
    reader.authenticate(4, FFKEY, "A")
    assert _framing.classic_reader_read(reader, 4) == bytes(16)
    frame = _framing.classic_reader_command(reader, bytes([0x30, 4]))  # READ 4, by hand
    assert reader.cipher is not None and frame.length == 162
    assert _framing.classic_card_frame(card, BitFrame(0, 0)) is None  # not a session frame
    assert _framing.classic_tag_frame(card, frame) is None  # not a tag
    assert _framing.classic_reader_ack(reader, BitFrame(0, 0), "x") is False
