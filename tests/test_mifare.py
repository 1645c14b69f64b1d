"""MIFARE Classic protocol: the reader side against the card side, in process, bit level."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.core.classic_layout import KeyType
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
# the keys and key types authenticate takes: the C path's and the ones it hands back
_AUTH_KEYS = st.sampled_from(
    [FFKEY, KEY_A, KEY_B, bytearray(FFKEY), int.from_bytes(FFKEY, "big"), b"short", 1 << 48]
)
_KEY_TYPES = st.sampled_from(["A", "B", "a", "b", KeyType.A, KeyType.B, "C"])
# what the reader hears instead of an answer: silence, a 4-bit NACK, any other length
_MANGLED = st.tuples(
    st.integers(0, (1 << 80) - 1), st.sampled_from([0, 4, 8, 18, 27, 36, 37, 45, 72, 162])
)
_SESSION_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("auth"), st.sampled_from([4, 8]), st.just(FFKEY), st.just("A")),
        st.tuples(st.just("auth"), _BLOCKS, st.sampled_from([FFKEY, KEY_A]), st.sampled_from("AB")),
        st.tuples(st.just("auth"), _BLOCKS, _AUTH_KEYS, _KEY_TYPES),
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
        st.tuples(st.just("mangle"), st.integers(1, 3), _MANGLED),
    ),
    max_size=30,
)


def _session_transcript(seed: int, ops: list[tuple], *, slow: bool) -> list[tuple]:
    """Run ``ops`` against a seeded virtual card; every outcome and the state after it.

    ``slow``: the card's and the tag's C paths are switched off, the reader has a tracer
    (which keeps it on its Python paths) and a fault is armed that never fires (which keeps
    the virtual card on its fault-checking path, which goes through ``ClassicTag.handle``).

    Every frame on the air, both ways, is part of the transcript, and so is the protocol
    state of both sides (:func:`_protocol_state`). A "mangle" op replaces an answer the card
    gave with another frame before the reader hears it."""
    from firmware.core import mifare
    from firmware.core.anticollision import Field, select_card
    from simulators.cards import VirtualCard

    rng = random.Random(seed)
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
    field = Field([card])
    saved = (
        mifare.classic_card_frame,
        mifare.classic_tag_frame,
        mifare.classic_reader_authenticate,
    )
    if slow:
        mifare.classic_card_frame = lambda card, frame: None
        mifare.classic_tag_frame = lambda tag, frame: None
        mifare.classic_reader_authenticate = lambda *args: False
        card.faults.tear_after(10**9)
    out: list[tuple] = []
    air: list[tuple] = []
    mangle: list = [None, None]  # answers to go, the frame the reader hears instead

    def transceive(frame: BitFrame) -> BitFrame:
        answer = field.transceive(frame)
        air.append((_frame_key(frame), _frame_key(answer)))
        if mangle[0] is not None:
            mangle[0] -= 1
            if mangle[0] == 0:
                mangle[0] = None
                return mangle[1]
        return answer

    try:
        reader = None

        def connect() -> ClassicReader:
            field.reset()
            selected = select_card(transceive)
            return ClassicReader(
                transceive,
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
                    result = transceive(BitFrame(bits & ((1 << length) - 1), length))
                elif name == "flip":
                    result = card.faults.flip_bits(*args)
                elif name == "tear":
                    result = card.faults.tear_after(args[0], answer=args[1])
                elif name == "mangle":
                    bits, length = args[1]
                    mangle[:] = [args[0], BitFrame(bits & ((1 << length) - 1), length)]
                    result = None
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
                    _protocol_state(tag.card, reader),
                    tuple(air),
                )
            )
            air.clear()
    finally:
        (
            mifare.classic_card_frame,
            mifare.classic_tag_frame,
            mifare.classic_reader_authenticate,
        ) = saved
    return out


def _frame_key(frame: BitFrame) -> tuple:
    return type(frame), frame.bits, type(frame.bits), frame.length, frame.collision


def _cipher_key(cipher) -> tuple | None:
    """A cipher as its class and register, or None."""
    return None if cipher is None else (type(cipher), cipher.lfsr)


def _card_state(card: ClassicCard) -> tuple:
    """Every attribute of the card's protocol state a frame can set, with the nonce's type."""
    return (
        card.state,
        _cipher_key(card.cipher),
        card._nt,
        type(card._nt),
        card.auth_sector,
        card.auth_key_type,
        card._transfer_buffer,
        card._pending_block,
        card._pending_op,
    )


def _protocol_state(card: ClassicCard, reader: ClassicReader) -> tuple:
    """Every attribute an authentication sets, on both sides, with its type."""
    return (*_card_state(card), _cipher_key(reader.cipher), reader.sector_block)


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


# ---------------------------------------------------------------------------------------------
# The authentication in C (classic_reader_authenticate; the card's nonce in _card_frame) against
# the Python methods, scenario by scenario: every outcome, frame and state must be the same
# ---------------------------------------------------------------------------------------------


class _Air:
    """The reader's transceive to a card, recording both directions; ``script`` maps the
    number of a frame (1 = the next one) to what the reader hears instead of the answer
    (a callable of the answer) or to ``"lost"`` (the frame never reaches the card)."""

    def __init__(self, card: ClassicCard) -> None:
        self.card = card
        self.frames: list[tuple] = []
        self.script: dict[int, object] = {}
        self.count = 0

    def __call__(self, frame: BitFrame) -> BitFrame:
        self.count += 1
        change = self.script.pop(self.count, None)
        if change == "lost":
            answer = SILENCE
        else:
            answer = self.card.handle(frame)
            if change is not None:
                answer = change(answer)
        self.frames.append((_frame_key(frame), _frame_key(answer)))
        return answer

    def then(self, n: int, change) -> None:
        """Change the ``n``-th frame from now."""
        self.script[self.count + n] = change


class _Int(int):
    pass


class _Frame(BitFrame):
    __slots__ = ()


def _nack_frame(answer: BitFrame) -> BitFrame:
    return BitFrame(0x4, 4)


def _as_subclass(answer: BitFrame) -> BitFrame:
    return _Frame(answer.bits, answer.length) if answer else answer


def _auth(block, key=FFKEY, key_type="A"):
    return lambda card, reader, air: reader.authenticate(block, key, key_type)


def _change(n, change):
    return lambda card, reader, air: air.then(n, change)


def _read(block):
    return lambda card, reader, air: reader.read(block)


_SECURED = [_auth(4), lambda card, reader, air: secure_sector(reader, 2)]
_AUTH_SCENARIOS = {
    "plain": [_auth(4), _read(4)],
    "plain key as int, type b": [_auth(5, int.from_bytes(FFKEY, "big"), "b"), _read(4)],
    "plain bytearray key, KeyType": [_auth(6, bytearray(FFKEY), KeyType.B)],
    "nested": [*_SECURED, _auth(8, KEY_B, "B"), _read(8), _auth(5), _read(4), _auth(9, KEY_A)],
    "nested sector trailer": [_auth(4), _auth(63), _read(63)],
    "wrong key": [_auth(4, KEY_A), _auth(4)],
    "wrong key type": [*_SECURED, _auth(8, KEY_B, "A")],
    "nested wrong key": [*_SECURED, _auth(8, FFKEY, "B"), _auth(4)],
    "block not on the card": [_auth(64), _auth(4)],
    "nested, block not on the card": [_auth(4), _auth(200, KEY_A, "B")],
    "block out of range": [_auth(256), _auth(-1)],
    "block as a bool": [_auth(True), _read(1)],
    "bad key type": [_auth(4, FFKEY, "C"), _auth(4, FFKEY, None)],
    "bad key": [_auth(4, b"short"), _auth(4, 1 << 48), _auth(4, -1), _auth(4, "FFFFFFFFFFFF")],
    "silence to AUTH": [_change(1, "lost"), _auth(4)],
    "nested, silence to AUTH": [_auth(4), _change(1, "lost"), _auth(8)],
    "card torn after its nonce": [_change(2, "lost"), _auth(4)],
    "nested, card torn after its nonce": [_auth(4), _change(2, "lost"), _auth(8)],
    "NACK to AUTH": [_change(1, _nack_frame), _auth(4)],
    "nonce of 18 bits": [_change(1, lambda a: BitFrame(a.bits & 0x3FFFF, 18)), _auth(4)],
    "nested nonce of 45 bits": [_auth(4), _change(1, lambda a: BitFrame(a.bits, 45)), _auth(8)],
    "nonce with a bad parity bit": [_change(1, lambda a: _flip(a, 17)), _auth(4)],
    "nested nonce with a bad parity bit": [_auth(4), _change(1, lambda a: _flip(a, 8)), _auth(8)],
    "nested nonce with a bad data bit": [_auth(4), _change(1, lambda a: _flip(a, 30)), _auth(8)],
    "nonce as a BitFrame subclass": [_change(1, _as_subclass), _auth(4), _read(4)],
    "NACK to the reader's answer": [_change(2, _nack_frame), _auth(4)],
    "{at} with a bad parity bit": [_change(2, lambda a: _flip(a, 26)), _auth(4)],
    "{at} wrong, parity right": [_change(2, lambda a: _flip(_flip(a, 9), 17)), _auth(4)],
    "{at} of 45 bits": [_change(2, lambda a: BitFrame(a.bits, 45)), _auth(4)],
    "{at} as a BitFrame subclass": [_change(2, _as_subclass), _auth(4), _read(4)],
    "nested {at} wrong": [_auth(4), _change(2, lambda a: _flip(_flip(a, 0), 8)), _auth(8)],
    "session dropped by a bad answer, then plain": [
        _auth(4),
        _change(1, lambda a: _flip(a, 3)),
        _read(4),
        _auth(4),
    ],
}


def _auth_transcript(steps, *, fast: bool, cipher=Crypto1, nonces=None, reader_nonce=None):
    """Run ``steps`` on a fresh pair, the C authentication paths on (``fast``) or off; each
    step's outcome with the frames on the air and the protocol state after it."""
    from firmware.core import mifare

    card, reader, memory = make_pair(cipher=cipher)
    if nonces is not None:
        card._nonces = nonces()
    if reader_nonce is not None:
        reader._nonce = reader_nonce()
    air = _Air(card)
    reader._transceive = air
    saved = mifare.classic_card_frame, mifare.classic_reader_authenticate
    if not fast:
        mifare.classic_card_frame = lambda card, frame: None
        mifare.classic_reader_authenticate = lambda *args: False
    out = []
    try:
        for step in steps:
            try:
                result = ("ok", step(card, reader, air))
            except Exception as exc:
                result = ("raised", type(exc), str(exc))
            out.append((result, tuple(air.frames), _protocol_state(card, reader), bytes(memory)))
            air.frames.clear()
    finally:
        mifare.classic_card_frame, mifare.classic_reader_authenticate = saved
    return out


@pytest.mark.parametrize("name", list(_AUTH_SCENARIOS))
def test_authentication_in_c_matches_python(name):
    steps = _AUTH_SCENARIOS[name]
    fast = _auth_transcript(steps, fast=True)
    assert fast == _auth_transcript(steps, fast=False)
    # arguments authenticate refuses before anything goes on the air, else frames
    refused = name in ("block out of range", "bad key type", "bad key")
    assert any(frames for _, frames, _, _ in fast) is not refused


def test_authentication_scenarios_end_as_expected():
    """The scenarios above test what they say (else comparing them proves little)."""

    def outcomes(name):
        return [
            r[0] if r[0] == "ok" else r[1]
            for r, *_ in _auth_transcript(_AUTH_SCENARIOS[name], fast=True)
        ]

    assert outcomes("plain") == ["ok", "ok"]
    assert outcomes("nested")[-4:] == ["ok", "ok", "ok", "ok"]
    assert outcomes("wrong key") == [AuthenticationError, NoResponseError]
    # a failed authentication silences the card until it is selected again
    assert outcomes("nested wrong key") == ["ok", "ok", AuthenticationError, NoResponseError]
    assert outcomes("block not on the card") == [NackError, NoResponseError]
    assert outcomes("silence to AUTH")[1] is NoResponseError
    assert outcomes("card torn after its nonce")[1] is AuthenticationError
    assert outcomes("nonce of 18 bits")[1].__name__ == "FrameError"
    assert outcomes("nonce with a bad parity bit")[1] is ParityError
    assert outcomes("nested nonce with a bad parity bit")[2] is AuthenticationError
    assert outcomes("{at} wrong, parity right")[1] is AuthenticationError
    assert outcomes("nonce as a BitFrame subclass") == ["ok", "ok", "ok"]


@pytest.mark.parametrize(
    "nonce",
    [
        lambda: True,  # an int subclass: the Python step takes it
        lambda: _Int(0x1234ABCD),
        lambda: -5,  # the low 32 bits, as ``& 0xFFFFFFFF`` takes them
        lambda: (1 << 70) + 0x89ABCDEF,
        lambda: 3.5,  # not an int at all: the same TypeError either way
    ],
    ids=["bool", "int-subclass", "negative", "huge", "float"],
)
@pytest.mark.parametrize("side", ["card", "reader"])
def test_unusual_nonces_match_python(nonce, side):
    def make():
        return nonce

    kwargs = {"nonces": make} if side == "card" else {"reader_nonce": make}
    steps = [_auth(4), _auth(8), _read(8), _auth(5, KEY_A)]
    fast = _auth_transcript(steps, fast=True, **kwargs)
    assert fast == _auth_transcript(steps, fast=False, **kwargs)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["auth", "read", "change"]),
            _BLOCKS,
            _AUTH_KEYS,
            _KEY_TYPES,
            st.integers(1, 3),
            _MANGLED | st.tuples(st.integers(0, 80), st.just(-1)),
        ),
        max_size=12,
    ),
)
def test_random_authentications_match_python(seed, steps):
    """Plain and nested authentications with any block, key and key type, with answers
    replaced or bits flipped on the air."""

    def step(op):
        kind, block, key, key_type, n, (bits, length) = op
        if kind == "auth":
            return _auth(block, key, key_type)
        if kind == "read":
            return _read(block)
        if length < 0:
            return _change(n, lambda a: _flip(a, bits % a.length) if a else a)
        return _change(n, lambda a: BitFrame(bits & ((1 << length) - 1), length))

    script = [step(op) for op in steps]
    rng = random.Random(seed)
    nonce = rng.getrandbits(64)

    def nonces():
        r = random.Random(nonce)
        return lambda: r.getrandbits(32)

    fast = _auth_transcript(script, fast=True, nonces=nonces, reader_nonce=nonces)
    assert fast == _auth_transcript(script, fast=False, nonces=nonces, reader_nonce=nonces)


def test_reference_cipher_and_tracer_keep_the_python_path():
    """With the reference cipher or a tracer the C path declines before anything is sent,
    and the Python path gives the same session."""
    from firmware.core import _framing

    sent = []
    for cipher in (Crypto1Ref, Crypto1):
        card, reader, _ = make_pair(cipher=cipher)
        if cipher is Crypto1:
            reader._tracer = lambda entry: sent.append(entry.direction)
        reader._transceive = lambda frame, card=card: (sent.append(frame), card.handle(frame))[1]
        assert _framing.classic_reader_authenticate(reader, 4, FFKEY, "A") is False
        assert sent == []
        reader.authenticate(4, FFKEY, "A")
        assert reader.read(4) == bytes(16)
        sent.clear()
    for cipher in (Crypto1Ref, Crypto1):
        steps = [_auth(4), _read(4), _auth(8, FFKEY, "B"), _auth(8, KEY_A)]
        assert _auth_transcript(steps, fast=True, cipher=cipher) == _auth_transcript(
            steps, fast=False, cipher=cipher
        )


@pytest.mark.parametrize(
    "args",
    [
        (4, FFKEY, "A", "not a reader"),
        (4, FFKEY, "AB"),
        (4, FFKEY, "c"),
        (4, FFKEY, None),
        (4, FFKEY[:5], "A"),
        (4, memoryview(FFKEY), "A"),
        (4, 1 << 48, "A"),
        (4, -1, "A"),
        (4, True, "A"),
        (256, FFKEY, "A"),
        (-1, FFKEY, "A"),
        (1 << 70, FFKEY, "A"),
        (True, FFKEY, "A"),
        (4.0, FFKEY, "A"),
    ],
)
def test_reader_authenticate_in_c_declines_odd_arguments(args):
    """Anything but the usual arguments: False, and nothing sent (``authenticate`` then
    raises or runs as the specification says)."""
    from firmware.core import _framing

    sent = []
    card, reader, _ = make_pair()
    reader._transceive = lambda frame: (sent.append(frame), card.handle(frame))[1]
    target = reader if len(args) == 3 else args[3]
    assert _framing.classic_reader_authenticate(target, *args[:3]) is False
    assert sent == []


def test_reader_authenticate_in_c_declines_odd_readers():
    from firmware.core import _framing

    class SubReader(ClassicReader):
        pass

    card, _, _ = make_pair()
    sub = SubReader(card.handle, UID4)
    odd_cuid = ClassicReader(card.handle, UID4)
    odd_cuid._cuid = _Int(odd_cuid._cuid)
    other_factory = ClassicReader(card.handle, UID4, cipher_factory=lambda key: Crypto1(key))
    for r in (sub, odd_cuid, other_factory):
        assert _framing.classic_reader_authenticate(r, 4, FFKEY, "A") is False
    # and all of them still authenticate, in Python
    for r in (sub, odd_cuid, other_factory):
        card.reset()
        r.authenticate(4, FFKEY, "A")
        assert r.read(4) == bytes(16)


def test_authentication_fast_paths_are_taken(monkeypatch):
    """On an ordinary plain and nested authentication neither side runs a Python step."""
    from firmware.core import _framing

    card, reader, _ = make_pair()
    ran = []
    for name in ("_auth_nonce", "_auth_reply", "_auth_check"):
        monkeypatch.setattr(ClassicReader, name, lambda *a, name=name: ran.append(name))
    for name in ("_command", "_start_auth", "_send_nonce", "_finish_auth"):
        monkeypatch.setattr(ClassicCard, name, lambda *a, name=name: ran.append(name))
    reader.authenticate(4, FFKEY, "A")
    assert card.state is CardState.AUTHENTICATED and card.auth_sector == 1
    reader.authenticate(9, FFKEY, "B")
    assert card.auth_sector == 2 and card.auth_key_type is KeyType.B
    assert reader.sector_block == 9 and reader.cipher.lfsr == card.cipher.lfsr
    assert ran == []
    # a plain AUTH outside a session is answered by the card in C, through the tag too
    card.reset()
    frame = _framing.encode(_framing.with_crc(bytes([0x61, 12])))
    answer = _framing.classic_card_frame(card, frame)
    assert answer.length == 36 and card.state is CardState.AUTH_NONCE_SENT
    assert card.auth_sector == 3 and card.auth_key_type is KeyType.B and ran == []


def _plain_frames() -> dict[str, BitFrame]:
    from firmware.core.iso14443a import encode, with_crc

    auth = with_crc(bytes([0x60, 4]))
    frames = {
        "AUTH-A 4": encode(auth),
        "AUTH-B 63": encode(with_crc(bytes([0x61, 63]))),
        "AUTH-A 64 (not on a 1K)": encode(with_crc(bytes([0x60, 64]))),
        "AUTH-B 255": encode(with_crc(bytes([0x61, 255]))),
        "AUTH with a bad CRC": encode(auth[:3] + bytes([auth[3] ^ 1])),
        "AUTH with a bad parity bit": _flip(encode(auth), 17),
        "AUTH with a flipped bit and its parity": _flip(_flip(encode(auth), 9), 17),
        "AUTH of 3 bytes": encode(with_crc(bytes([0x60, 4, 0]))),
        "AUTH without CRC": encode(bytes([0x60, 4])),
        "READ outside a session": encode(with_crc(bytes([0x30, 4]))),
        "HLTA": encode(with_crc(bytes([0x50, 0]))),
        "35 bits": BitFrame(encode(auth).bits & ((1 << 35) - 1), 35),
        "37 bits": BitFrame(encode(auth).bits, 37),
        "7 bits": BitFrame(0x26, 7),
        "subclass": _Frame(encode(auth).bits, 36),
    }
    return frames


def _nonces_raising():
    from firmware.core.errors import CodecError

    def nonces():
        raise CodecError("nonce generator failed")

    return nonces


_CARD_SETUPS = {
    "ordinary": lambda card: None,
    "cipher left over in ACTIVE": lambda card: setattr(card, "cipher", Crypto1(0x123456789ABC)),
    "nonce generator raises": lambda card: setattr(card, "_nonces", _nonces_raising()),
    "nonce an int subclass": lambda card: setattr(card, "_nonces", lambda: _Int(7)),
    "memory as bytes": lambda card: setattr(card, "memory", bytes(card.memory)),
    "another cipher factory": lambda card: setattr(card, "_new_cipher", Crypto1Ref),
    "halted": lambda card: setattr(card, "state", CardState.HALTED),
}


@pytest.mark.parametrize("setup", list(_CARD_SETUPS))
@pytest.mark.parametrize("through", ["card", "tag"])
def test_card_plain_auth_in_c_matches_python(setup, through):
    """A frame outside a session to the card (or the tag in front of it): the C answer to a
    plain AUTH, and everything it hands back, against ``handle`` in Python."""
    from firmware.core import mifare
    from firmware.core.anticollision import select_card
    from firmware.core.mifare import ClassicTag

    def run(fast: bool) -> list[tuple]:
        out = []
        saved = mifare.classic_card_frame, mifare.classic_tag_frame
        if not fast:
            mifare.classic_card_frame = lambda card, frame: None
            mifare.classic_tag_frame = lambda tag, frame: None
        try:
            for name, frame in _plain_frames().items():
                memory = layout.factory_memory(UID4, layout.CardType.CLASSIC_1K)
                tag = ClassicTag(UID4, memory, nonces=TagNonces(random.Random(5)))
                select_card(tag.handle)
                _CARD_SETUPS[setup](tag.card)
                target = tag if through == "tag" else tag.card
                try:
                    answer = ("ok", _frame_key(target.handle(frame)))
                except Exception as exc:
                    answer = ("raised", type(exc), str(exc))
                state = (*_card_state(tag.card), tag.selector.state)
                out.append((name, answer, state))
        finally:
            mifare.classic_card_frame, mifare.classic_tag_frame = saved
        return out

    fast = run(True)
    assert fast == run(False)
    if setup == "ordinary":
        answers = dict((name, answer) for name, answer, _ in fast)
        assert answers["AUTH-A 4"][1][3] == 36  # the card nonce
        assert answers["AUTH with a bad CRC"][1][3] == 4  # a NACK


def test_nested_auth_with_a_failing_nonce_generator_matches_python():
    """A CoreError out of the nonce generator in a nested AUTH: NACK, session dropped."""
    from firmware.core.errors import CodecError

    def fail():
        raise CodecError("nonce generator failed")

    steps = [
        _auth(4),
        lambda card, reader, air: setattr(card, "_nonces", fail),
        _auth(8),
    ]
    fast = _auth_transcript(steps, fast=True)
    assert fast == _auth_transcript(steps, fast=False)
    assert fast[-1][0][1] is NackError


class _SubRandom(random.Random):
    pass


@pytest.mark.parametrize("rng_class", [random.Random, _SubRandom])
def test_tag_nonces_are_randrange_steps_of_the_prng(rng_class):
    """TagNonces draws randrange(1, 4096) its own way for a random.Random (and by calling
    it for anything else) and steps by jump tables: the nonces are still exactly these."""
    from firmware.core.crypto1 import prng_successor

    nonces = TagNonces(rng_class(11))
    ref = rng_class(11)
    seed = ref.getrandbits(16) or 1
    x = prng_successor((seed << 16) | seed, 16)
    for _ in range(20_000):
        x = prng_successor(x, 16 + ref.randrange(1, 4096))
        assert nonces() == x
    # the rejected draws (4095) were met on the way, so that branch was compared too
    draws = random.Random(11)
    draws.getrandbits(16)
    rejected = 0
    for _ in range(20_000):
        while draws.getrandbits(12) >= 4095:
            rejected += 1
    assert rejected > 0
