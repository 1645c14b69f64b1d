"""Virtual MIFARE Classic cards: selection, card files, spec strings and fault injection.

The cards are driven the way a reader drives them: through ``select_card`` on a ``Field``
and the core's ``ClassicReader``, at the level of bit frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, PiccState, halt, select_card
from firmware.core.classic_layout import CardType
from firmware.core.crypto1 import decrypt_bits, encrypt_frame
from firmware.core.errors import (
    AuthenticationError,
    CodecError,
    CoreError,
    NackError,
    NoResponseError,
    ParityError,
)
from firmware.core.iso14443a import REQA, SILENCE, BitFrame, short_frame, with_crc
from firmware.core.mifare import CardState, ClassicReader
from simulators.cards import (
    CardFileError,
    SimulatorError,
    VirtualCard,
    image_from_json,
    image_from_raw,
    image_to_json,
    masked_uid,
    parse_card_spec,
    random_uid,
    uid_from_block0,
)
from simulators.cards import files as card_files

FFKEY = bytes.fromhex("FFFFFFFFFFFF")
UID4 = bytes.fromhex("9C599B32")
UID7 = bytes.fromhex("045F217A3C5880")
# a 7-byte UID whose 5th byte happens to be the XOR of its first four (0x04^0x11^0x22^0x33)
UID7_LOOKS_LIKE_BCC = bytes.fromhex("04112233041234")
ONE_K, FOUR_K = CardType.CLASSIC_1K, CardType.CLASSIC_4K


def examples(n: int) -> int:
    """At least ``n`` hypothesis examples, more under the slow profile (AFC_SLOW=1)."""
    return max(n, settings().max_examples)


def new_card(card_type=ONE_K, uid=None, uid_size=4, seed=1, **kw) -> VirtualCard:
    return VirtualCard.new(card_type, uid, uid_size, random.Random(seed), **kw)


def connect(card: VirtualCard, seed: int = 7, wakeup: bool = False):
    """Put ``card`` in a field, select it and return (field, selected, reader)."""
    field = Field([card])
    selected = select_card(field.transceive, wakeup=wakeup)
    rng = random.Random(seed)
    reader = ClassicReader(field.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))
    return field, selected, reader


def reselect(field: Field, reader: ClassicReader):
    """Start a new session as a reader does: HLTA (plain, ends any session), WUPA, select."""
    reader.reset()
    halt(field.transceive)
    return select_card(field.transceive, wakeup=True)


# -- the card on the air ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("card_type", "uid_size", "atqa", "sak"),
    [
        (ONE_K, 4, 0x0004, 0x08),
        (ONE_K, 7, 0x0044, 0x08),
        (FOUR_K, 4, 0x0002, 0x18),
        (FOUR_K, 7, 0x0042, 0x18),
    ],
)
def test_new_card_selects_and_works_with_transport_keys(card_type, uid_size, atqa, sak):
    card = new_card(card_type, uid_size=uid_size)
    assert len(card.uid) == uid_size and card.card_type is card_type
    assert card.atqa == atqa.to_bytes(2, "little") and card.sak == sak
    assert bytes(card.memory) == bytes(layout.factory_memory(card.uid, card_type))
    _field, selected, reader = connect(card)
    assert selected.uid == card.uid
    assert selected.atqa == atqa.to_bytes(2, "little")
    assert selected.sak == sak
    blocks = [4, 5] + ([129, 200] if card_type is FOUR_K else [])
    for block in blocks:
        reader.authenticate(block, FFKEY, "A")
        assert reader.read(block) == bytes(16)
        data = random.Random(block).randbytes(16)
        reader.write(block, data)
        assert reader.read(block) == data
        assert card.block(block) == data
    # block 0 is read-only whatever the access bits say
    reader.authenticate(0, FFKEY, "A")
    assert reader.read(0)[: len(card.uid)] == card.uid
    with pytest.raises(NackError):
        reader.write(0, bytes(16))


def test_card_type_atqa_sak_agree_with_core():
    for card_type in CardType:
        for size in (4, 7):
            card = new_card(card_type, uid_size=size)
            assert card.atqa == card_type.atqa(size).to_bytes(2, "little")
            assert card.sak == card_type.sak


@settings(max_examples=examples(200))
@given(st.integers(0, 2**32), st.sampled_from([4, 7]))
def test_random_uids_are_valid(seed, size):
    uid = random_uid(random.Random(seed), size)
    assert len(uid) == size
    if size == 4:
        assert uid[0] & 0x0F != 0x08  # never 0x88 (cascade tag), 0x08 (random ID), RFU x8
    else:
        assert uid[0] == 0x04 and uid[3] != 0x88


def test_seeded_cards_replay_the_same_session():
    def session(seed):
        card = new_card(seed=seed)
        frames = []
        field = Field([card])

        def transceive(frame):
            answer = field.transceive(frame)
            frames.append((frame, answer))
            return answer

        selected = select_card(transceive)
        reader = ClassicReader(transceive, selected.uid, nonce=lambda: 0x12345678)
        reader.authenticate(4, FFKEY)
        reader.read(4)
        return card.uid, frames

    assert session(3) == session(3)
    assert session(3)[1] != session(4)[1]


def test_new_card_with_given_uid_and_bad_uids():
    card = new_card(uid=UID4, label="staff card 12")
    assert card.uid == UID4 and card.label == "staff card 12"
    assert len(new_card(uid=UID7).uid) == 7
    for bad in (bytes.fromhex("88112233"), bytes.fromhex("0411228833445566"[:14]), b"\1\2\3"):
        with pytest.raises(CardFileError):
            new_card(uid=bad)
    with pytest.raises(CardFileError):
        new_card(uid_size=5)
    with pytest.raises(CardFileError, match="block 0 starts with"):
        VirtualCard(UID4, layout.factory_memory(UID7, ONE_K))


def test_card_satisfies_field_protocol_and_never_returns_none():
    card = new_card()
    field = Field([card])
    select_card(field.transceive)
    # a frame for the Classic layer (ClassicTag would get None from the selector)
    answer = card.handle(BitFrame(0x1FF, 9))
    assert isinstance(answer, BitFrame)
    field.remove(card)
    assert card.in_field and card.tag.selector.state is PiccState.IDLE


def test_masked_uid_keeps_two_bytes():
    assert masked_uid(UID4) == "****9B32"
    assert masked_uid(UID7) == "**********5880"
    assert "9C59" not in repr(new_card(uid=UID4))


# -- card files ----------------------------------------------------------------------------------


def used_card(card_type=ONE_K, uid=UID4, seed=1) -> VirtualCard:
    """A card with data, a value block and changed keys: something worth saving."""
    card = new_card(card_type, uid=uid, seed=seed, label="test card")
    _field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    reader.write(4, b"KONYAKART test\0\0")
    reader.write(5, layout.encode_value_block(1234, 5))
    trailer = layout.transit_trailer(bytes.fromhex("A0A1A2A3A4A5"), bytes.fromhex("B0B1B2B3B4B5"))
    reader.write(7, trailer.to_bytes())
    return card


@pytest.mark.parametrize("card_type", [ONE_K, FOUR_K])
@pytest.mark.parametrize("uid", [UID4, UID7, UID7_LOOKS_LIKE_BCC], ids=["uid4", "uid7", "uid7bcc"])
def test_json_round_trip(tmp_path, card_type, uid):
    card = used_card(card_type, uid)
    path = tmp_path / "card.json"
    assert card.save(path) == path
    loaded = VirtualCard.from_file(path)
    assert loaded.uid == uid and loaded.card_type is card_type and loaded.label == "test card"
    assert bytes(loaded.memory) == bytes(card.memory)
    assert loaded.path == path and loaded.file_format == "json"
    doc = json.loads(path.read_text())
    assert doc["format"] == "afc-card" and doc["version"] == 1
    assert doc["card_type"] == card_type.value and doc["uid"] == uid.hex().upper()
    assert len(doc["blocks"]) == card_type.blocks
    # one block per line, so a diff shows exactly the blocks that changed
    lines = path.read_text().splitlines()
    assert sum(1 for line in lines if len(line.strip().strip('",')) == 32) == card_type.blocks
    assert bytes.fromhex(doc["blocks"][7]) == card.block(7)  # keys kept


@pytest.mark.parametrize("suffix", [".mfd", ".bin", ".dump", ".MFD"])
@pytest.mark.parametrize("card_type", [ONE_K, FOUR_K])
@pytest.mark.parametrize("uid", [UID4, UID7, UID7_LOOKS_LIKE_BCC], ids=["uid4", "uid7", "uid7bcc"])
def test_raw_round_trip(tmp_path, suffix, card_type, uid):
    card = used_card(card_type, uid)
    path = tmp_path / f"dump{suffix}"
    card.save(path)
    assert path.read_bytes() == bytes(card.memory)
    loaded = VirtualCard.from_file(path)
    assert loaded.uid == uid and loaded.card_type is card_type
    assert bytes(loaded.memory) == bytes(card.memory)
    assert loaded.file_format == "raw" and loaded.label is None


def test_raw_dump_from_another_tool_keeps_its_keys(tmp_path):
    """A dump as nfc-mfclassic/mfoc/Proxmark write it: real keys in every trailer and
    manufacturer data that is not ours. It must load and answer to its own keys."""
    key_a, key_b = bytes.fromhex("A0A1A2A3A4A5"), bytes.fromhex("D3F7D3F7D3F7")
    uid = bytes.fromhex("DEADBEEF")
    memory = bytearray(1024)
    memory[0:16] = uid + bytes([0x22]) + bytes.fromhex("0804006263646566676869")
    for sector in range(16):
        t = layout.trailer_block(sector, ONE_K)
        memory[16 * t : 16 * t + 16] = key_a + bytes.fromhex("FF078069") + key_b
    path = tmp_path / "hf-mf-DEADBEEF-dump.bin"
    path.write_bytes(memory)
    card = VirtualCard.from_file(path)
    assert card.uid == uid and bytes(card.memory) == bytes(memory)
    _field, _selected, reader = connect(card)
    reader.authenticate(8, key_a, "A")
    assert reader.read(8) == bytes(16)
    with pytest.raises(AuthenticationError):
        reader.authenticate(12, FFKEY, "A")


def test_uid_from_block0_rules():
    assert uid_from_block0(layout.factory_memory(UID4, ONE_K)[:16]) == UID4
    assert uid_from_block0(layout.factory_memory(UID7, FOUR_K)[:16]) == UID7
    block0 = layout.factory_memory(UID7_LOOKS_LIKE_BCC, ONE_K)[:16]
    assert uid_from_block0(block0) == UID7_LOOKS_LIKE_BCC
    # without the 7-byte manufacturer layout, a matching BCC means a 4-byte UID
    assert uid_from_block0(UID7_LOOKS_LIKE_BCC + bytes(9)) == UID7_LOOKS_LIKE_BCC[:4]
    assert uid_from_block0(UID7_LOOKS_LIKE_BCC + bytes(9), uid_size=7) == UID7_LOOKS_LIKE_BCC
    with pytest.raises(CardFileError):
        uid_from_block0(block0, uid_size=10)


@settings(max_examples=examples(150))
@given(
    st.sampled_from([4, 7]),
    st.binary(min_size=6, max_size=6),
    st.sampled_from(list(CardType)),
    st.binary(min_size=0, max_size=64),
)
def test_image_round_trips_any_uid(uid_size, uid_bytes, card_type, payload):
    uid = (bytes([0x04]) + uid_bytes)[:7] if uid_size == 7 else uid_bytes[:4]
    if (uid_size == 4 and uid[0] == 0x88) or (uid_size == 7 and uid[3] == 0x88):
        return
    memory = layout.factory_memory(uid, card_type)
    memory[16 : 16 + len(payload)] = payload
    image = card_files.make_image(uid, card_type, memory, "x")
    assert image_from_raw(bytes(memory)) == card_files.CardImage(uid, card_type, bytes(memory))
    assert image_from_json(image_to_json(image)) == image


def test_save_without_path_and_format_override(tmp_path):
    card = new_card()
    with pytest.raises(CardFileError, match="give save"):
        card.save()
    odd = tmp_path / "card.img"
    with pytest.raises(CardFileError, match="extension"):
        card.save(odd)
    card.save(odd, format="raw")
    assert odd.read_bytes() == bytes(card.memory)
    loaded = VirtualCard.from_file(odd, format="raw")
    assert loaded.uid == card.uid
    # save() goes back to the file and the format it came from
    loaded.memory[16:32] = b"\x11" * 16
    loaded.save()
    assert VirtualCard.from_file(odd, format="raw").block(1) == b"\x11" * 16
    with pytest.raises(CardFileError, match="unknown card file format"):
        card.save(tmp_path / "x.json", format="eml")


def test_save_is_atomic(tmp_path, monkeypatch):
    card = used_card()
    path = tmp_path / "card.json"
    card.save(path)
    before = path.read_bytes()
    card.memory[64:80] = b"\x55" * 16

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card_files.os, "fsync", broken_fsync)
    with pytest.raises(CardFileError, match="No space left"):
        card.save()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["card.json"]  # no temporary file left behind
    monkeypatch.undo()
    card.save()
    assert VirtualCard.from_file(path).block(4) == b"\x55" * 16
    assert os.listdir(tmp_path) == ["card.json"]
    assert (path.stat().st_mode & 0o777) == 0o600  # dumps hold keys
    with pytest.raises(CardFileError, match="cannot write"):
        card.save(tmp_path / "missing" / "card.json")


def json_doc(card_type=ONE_K, uid=UID4):
    card = new_card(card_type, uid=uid)
    return json.loads(image_to_json(card.image()))


def write_json(tmp_path, doc, raw=None):
    path = tmp_path / "card.json"
    path.write_text(raw if raw is not None else json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["blocks"].pop(), "63 blocks given; a classic-1k card has 64"),
        (lambda d: d["blocks"].append("00" * 16), "65 blocks given"),
        (lambda d: d["blocks"].__setitem__(5, "0G" + "00" * 15), "block 5 must be"),
        (lambda d: d["blocks"].__setitem__(6, "00" * 15), "block 6 must be"),
        (lambda d: d["blocks"].__setitem__(6, 0), "block 6 must be"),
        (lambda d: d.__setitem__("uid", "0A0B0C0D"), "block 0 starts with 9C599B32"),
        (lambda d: d.__setitem__("uid", "0A0B0C0"), "uid must be a string of hex"),
        (lambda d: d.__setitem__("uid", "9C599B"), "has 3 bytes"),
        (lambda d: d["blocks"].__setitem__(0, "9C599B3200" + "00" * 11), "BCC"),
        (lambda d: d.__setitem__("card_type", "classic-2k"), "card_type 'classic-2k'"),
        (lambda d: d.__setitem__("version", 2), "version 2 is not supported"),
        (lambda d: d.__setitem__("version", True), "version True"),
        (lambda d: d.__setitem__("format", "other"), "field 'format'"),
        (lambda d: d.__setitem__("lable", "typo"), "unknown field(s) 'lable'"),
        (lambda d: d.pop("blocks"), "missing field(s) 'blocks'"),
        (lambda d: d.__setitem__("label", 5), "label must be a string"),
        (lambda d: d.__setitem__("blocks", "00"), "blocks must be a list"),
    ],
)
def test_corrupt_json_rejected(tmp_path, mutate, message):
    doc = json_doc()
    mutate(doc)
    path = write_json(tmp_path, doc)
    with pytest.raises(CardFileError) as info:
        VirtualCard.from_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "a card file is a JSON object"),
        ('{"uid": "00", "uid": "01"}', "key 'uid' appears twice"),
        ("\udcff", "not valid JSON"),
    ],
)
def test_malformed_json_rejected(tmp_path, text, message):
    path = tmp_path / "card.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CardFileError, match=message):
        VirtualCard.from_file(path)


def test_corrupt_raw_dumps_rejected(tmp_path):
    good = bytes(new_card(uid=UID4).memory)
    cases = {
        "truncated.mfd": (good[:1000], "1000 bytes of card memory"),
        "empty.bin": (b"", "0 bytes of card memory"),
        "mini.mfd": (good[:320], "320 bytes"),
        "cascade.mfd": (b"\x88\x01\x02\x03\x88" + good[5:], "cascade tag"),
        "uid7cascade.mfd": (bytes.fromhex("04010288050607") + good[7:], "cascade tag"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CardFileError, match=message):
            VirtualCard.from_file(path)
    huge = tmp_path / "huge.bin"
    huge.write_bytes(bytes(card_files.MAX_FILE_BYTES + 1))
    with pytest.raises(CardFileError, match="larger than"):
        VirtualCard.from_file(huge)
    with pytest.raises(CardFileError, match="no such card file"):
        VirtualCard.from_file(tmp_path / "absent.json")
    with pytest.raises(CardFileError, match="extension"):
        VirtualCard.from_file(tmp_path / "card.txt")
    assert issubclass(CardFileError, CodecError) and issubclass(CardFileError, SimulatorError)


@settings(max_examples=examples(150))
@given(st.one_of(st.binary(max_size=300), st.sampled_from([bytes(1024), bytes(4096)])))
def test_garbage_files_only_raise_card_file_error(data):
    for parse in (image_from_raw, image_from_json):
        with contextlib.suppress(CardFileError):
            parse(data)


@settings(max_examples=examples(100))
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=20,
    )
)
def test_garbage_json_only_raises_card_file_error(value):
    doc = json_doc()
    for key in ("uid", "blocks", "card_type", "label", "version"):
        mutated = dict(doc, **{key: value})
        with contextlib.suppress(CardFileError):
            image_from_json(json.dumps(mutated))


# -- spec strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "card_type", "uid_size"),
    [
        ("new:1k", ONE_K, 4),
        ("new:4k", FOUR_K, 4),
        ("new:1k:7", ONE_K, 7),
        ("new:4k:7", FOUR_K, 7),
        ("new:1k:4", ONE_K, 4),
        ("NEW:4K", FOUR_K, 4),
        ("new:classic-4k:7", FOUR_K, 7),
    ],
)
def test_spec_new_cards(spec, card_type, uid_size):
    card = parse_card_spec(spec, random.Random(5))
    assert card.card_type is card_type and len(card.uid) == uid_size
    assert card.path is None
    assert select_card(Field([card]).transceive).sak == card_type.sak


def test_spec_with_uid():
    assert parse_card_spec("new:1k:uid=0A0B0C0D").uid == bytes.fromhex("0A0B0C0D")
    card = parse_card_spec("new:4k:uid=045F217A3C5880:7")
    assert card.uid == UID7 and card.card_type is FOUR_K


def test_spec_paths_remember_where_to_save(tmp_path):
    used_card().save(tmp_path / "a.json")
    new_card(uid=UID7).save(tmp_path / "b.mfd")
    card = parse_card_spec(str(tmp_path / "a.json"))
    assert card.uid == UID4 and card.path == tmp_path / "a.json"
    card.memory[64:80] = b"\x42" * 16
    card.save()
    assert parse_card_spec(str(tmp_path / "a.json")).block(4) == b"\x42" * 16
    raw = parse_card_spec(str(tmp_path / "b.mfd"))
    assert raw.uid == UID7 and raw.file_format == "raw"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("new:", "card type is missing"),
        ("new:2k", "unknown card type '2k'"),
        ("new:1k:5", "unknown option '5'"),
        ("new:1k:7:7", "UID size is given twice"),
        ("new:1k:uid=zz", "not 8 or 14 hex digits"),
        ("new:1k:uid=0A0B", "not 8 or 14 hex digits"),
        ("new:1k:uid=01020304:uid=01020304", "UID is given twice"),
        ("new:1k:7:uid=0A0B0C0D", "does not match"),
        ("new:1k:uid=880B0C0D", "cascade tag"),
        ("new:1k:label=x", "unknown option"),
        ("no/such/card.json", "no such card file"),
    ],
)
def test_bad_specs_list_the_accepted_forms(spec, message):
    with pytest.raises(CardFileError) as info:
        parse_card_spec(spec)
    text = str(info.value)
    assert message in text
    assert "new:1k:7" in text and "PATH" in text  # the accepted forms are listed


def test_spec_directory_and_bad_file(tmp_path):
    with pytest.raises(CardFileError, match="directory"):
        parse_card_spec(str(tmp_path))
    (tmp_path / "short.bin").write_bytes(bytes(100))
    with pytest.raises(CardFileError, match="100 bytes"):
        parse_card_spec(str(tmp_path / "short.bin"))


# -- faults: tears ---------------------------------------------------------------------------------

OLD_VALUE, CHARGE = 1000, 250
PURSE_STEPS = ("authenticate", "decrement", "transfer", "read")
# reader frames of each step: AUTH, {nr}{ar}; DEC, operand; TRANSFER; READ
STEP_OF_FRAME = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}


def purse_card():
    card = new_card(seed=11)
    field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    reader.write(5, layout.encode_value_block(OLD_VALUE, 5))
    return card, field, reader


def run_purse_update(reader):
    """The steps of a charge; returns (index of the failing step, exception) or (None, None)."""
    for i, step in enumerate(PURSE_STEPS):
        try:
            if step == "authenticate":
                reader.authenticate(4, FFKEY)
            elif step == "decrement":
                reader.decrement(5, CHARGE)
            elif step == "transfer":
                reader.transfer(5)
            else:
                reader.read(5)
        except CoreError as exc:
            return i, exc
    return None, None


@pytest.mark.parametrize("answer", [True, False], ids=["answered", "unanswered"])
@pytest.mark.parametrize("n", range(1, 7))
def test_tear_after_n_frames(n, answer):
    card, field, reader = purse_card()
    reselect(field, reader)
    card.faults.tear_after(n, answer=answer)
    failed, exc = run_purse_update(reader)
    # the card is gone from the frame after n (or from frame n itself without its answer)
    silent_frame = n + 1 if answer else n
    if silent_frame == 4:
        # the value operand is answered with silence even on success; the loss shows at
        # TRANSFER
        silent_frame = 5
    if silent_frame > 6:
        assert failed is None
    else:
        assert failed == STEP_OF_FRAME[silent_frame]
        # silence after {nr}{ar} looks like a wrong key to any reader
        expected = AuthenticationError if silent_frame == 2 else NoResponseError
        assert isinstance(exc, expected), exc
    # memory holds exactly the old or the new purse: new once TRANSFER was processed
    value = layout.decode_value_block(card.block(5)).value
    assert value == (OLD_VALUE - CHARGE if n >= 5 else OLD_VALUE)
    assert not card.in_field and card.counters.tears == 1
    assert card.counters.lost_answers == (0 if answer or n == 4 else 1)
    # out of the field: nothing answers, nothing is counted as handled
    frames = card.counters.frames
    with pytest.raises(NoResponseError):
        select_card(field.transceive, wakeup=True)
    assert card.counters.frames == frames and card.counters.ignored >= 1
    assert card.tag.card.state is CardState.ACTIVE and card.tag.card.cipher is None
    # back in the field: the reader recovers the purse from the card
    card.place()
    reselect(field, reader)
    reader.authenticate(4, FFKEY)
    assert layout.decode_value_block(reader.read(5)).value in (OLD_VALUE, OLD_VALUE - CHARGE)
    assert not card.faults.armed


def test_tear_during_selection_and_field_reset_brings_card_back():
    card = new_card()
    field = Field([card])
    card.faults.tear_after(1)  # REQA answered, then gone before the ANTICOLLISION
    with pytest.raises(NoResponseError, match="ANTICOLLISION"):
        select_card(field.transceive)
    assert not card.in_field
    field.reset()  # the reader power-cycles its field: the card powers up again
    assert card.in_field
    assert select_card(field.transceive).uid == card.uid


def test_remove_and_place():
    card = new_card()
    field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    card.remove()
    assert card.handle(short_frame(REQA)) == SILENCE
    with pytest.raises(NoResponseError):
        reader.read(4)
    card.place()
    assert select_card(field.transceive).uid == card.uid
    assert card.counters.tears == 0


@pytest.mark.parametrize("commit", [False, True], ids=["before-data", "after-data"])
def test_tear_between_write_phases(commit):
    card = new_card(seed=3)
    _field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    old, new = card.block(6), b"\xab" * 16
    card.faults.tear_in_write(commit=commit)
    assert card.faults.armed
    reader.read(6)  # not a WRITE: no effect
    with pytest.raises(NoResponseError, match="WRITE data for block 6"):
        reader.write(6, new)  # the command phase was acknowledged, the data phase is not
    assert card.block(6) == (new if commit else old)
    assert not card.in_field and card.counters.tears == 1
    assert card.counters.lost_answers == (1 if commit else 0)
    assert not card.faults.armed


def test_tear_in_nth_write_and_only_accepted_writes_count():
    card = new_card(seed=4)
    field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    card.faults.tear_in_write(commit=True, nth=2)
    reader.write(4, b"\x01" * 16)
    with pytest.raises(NackError):
        reader.write(8, b"\x02" * 16)  # other sector: refused, does not count
    reselect(field, reader)
    reader.authenticate(4, FFKEY)
    with pytest.raises(NoResponseError):
        reader.write(5, b"\x03" * 16)
    assert card.block(4) == b"\x01" * 16 and card.block(5) == b"\x03" * 16
    assert card.block(8) == bytes(16)


def test_write_tear_lapses_when_the_write_is_abandoned():
    card = new_card(seed=5)
    field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    card.faults.tear_in_write(commit=True)
    # WRITE command, then the reader gives up and reselects instead of sending data
    reader._command(bytes([0xA0, 4]), "WRITE")
    assert card.tag.card.state is CardState.WRITE_PENDING
    reselect(field, reader)
    reader.authenticate(4, FFKEY)
    reader.write(4, b"\x07" * 16)
    assert card.in_field and card.counters.tears == 0 and card.block(4) == b"\x07" * 16


def test_a_garbled_data_phase_ends_the_write_and_the_session():
    """A data frame with a bad CRC is NACKed; like any NACK it ends the session (the card
    falls back to IDLE), so the armed commit-tear never fires and memory is unchanged."""
    card = new_card(seed=8)
    _field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    before = card.block(4)
    card.faults.tear_in_write(commit=True)
    ack = reader._command(bytes([0xA0, 4]), "WRITE")
    assert decrypt_bits(reader.cipher, ack) == 0xA
    bad = with_crc(b"\x09" * 16)[:-1] + b"\x00"
    nack = card.handle(encrypt_frame(reader.cipher, bad))
    assert nack.length == 4 and decrypt_bits(reader.cipher, nack) == 0x5
    assert card.in_field and not card.faults.armed
    assert reader._command(b"\x09" * 16, "data") == SILENCE  # no session any more
    assert card.block(4) == before


# -- faults: bit errors and slow answers -----------------------------------------------------------


def test_flipped_bit_in_an_encrypted_answer_is_a_parity_error():
    card = new_card(seed=6)
    _field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    card.faults.flip_bits(2, count=1)  # the 2nd answer from now: the second READ
    assert reader.read(4) == bytes(16)
    with pytest.raises(ParityError):
        reader.read(4)
    assert card.counters.bits_flipped == 1 and not card.faults.armed


def test_flipped_ack_and_atqa():
    card = new_card(seed=7)
    field, _selected, reader = connect(card)
    reader.authenticate(4, FFKEY)
    card.faults.flip_bits(1)
    with pytest.raises(NackError):  # a flipped 4-bit ACK reads as a NACK
        reader.write(4, bytes(16))
    card.faults.flip_bits(1, count=1)
    with pytest.raises(ParityError, match="ATQA"):
        reselect(field, reader)


def test_several_flipped_bits_are_detected():
    for seed in range(20):
        card = new_card(seed=seed)
        _field, _selected, reader = connect(card)
        reader.authenticate(4, FFKEY)
        card.faults.flip_bits(1, count=3)
        with pytest.raises(CoreError):
            reader.read(4)


def test_noise_is_deterministic_and_bounded():
    def run(seed):
        card = new_card(seed=seed)
        card.faults.noise(0.5, count=2)
        answers = [card.handle(short_frame(REQA)) for _ in range(3)]
        for _ in range(20):
            card.place()
            answers.append(card.handle(short_frame(REQA)))
        return answers, card.counters.bits_flipped

    first, flipped = run(9)
    assert (first, flipped) == run(9)
    assert 0 < flipped < 2 * 21  # some answers hit, not all
    card = new_card()
    card.faults.noise(1.0)
    with pytest.raises(CoreError):
        select_card(Field([card]).transceive)
    card.faults.noise(0)
    card.place()
    assert select_card(Field([card]).transceive).uid == card.uid


def test_slow_answers_sleep():
    card = new_card()
    card.faults.slow(0.05, nth_answer=2)
    start = time.perf_counter()
    field = Field([card])
    select_card(field.transceive)  # ATQA, anticollision, SAK: the 2nd answer is delayed
    elapsed = time.perf_counter() - start
    assert 0.05 <= elapsed < 1.0
    assert card.counters.delayed == 1 and not card.faults.armed
    card.faults.slow(0.02)  # every answer
    card.place()
    start = time.perf_counter()
    select_card(field.transceive)
    assert time.perf_counter() - start >= 3 * 0.02
    assert card.counters.delayed == 4
    card.faults.clear()
    card.place()
    start = time.perf_counter()
    select_card(field.transceive)
    assert time.perf_counter() - start < 0.02


@pytest.mark.parametrize(
    "arm",
    [
        lambda f: f.tear_after(0),
        lambda f: f.tear_after(True),
        lambda f: f.tear_in_write(commit=True, nth=0),
        lambda f: f.flip_bits(0),
        lambda f: f.flip_bits(1, count=65),
        lambda f: f.noise(1.5),
        lambda f: f.noise("0.1"),
        lambda f: f.slow(5.5),
        lambda f: f.slow(-1),
        lambda f: f.slow(0.1, nth_answer=0),
    ],
)
def test_fault_settings_out_of_bounds(arm):
    with pytest.raises(SimulatorError):
        arm(new_card().faults)


def test_describe_clear_and_counters():
    card = new_card()
    faults = card.faults
    assert not faults.armed and faults.describe() == []
    faults.tear_after(3, answer=False)
    faults.tear_in_write(commit=True)
    faults.flip_bits(2, 3)
    faults.noise(0.25)
    faults.slow(0.5, nth_answer=1)
    text = "\n".join(faults.describe())
    for words in (
        "before answering frame 3",
        "after the data",
        "flip 3 bit(s) of answer 2",
        "probability 0.25",
        "delay answer 1 by 0.5 s",
    ):
        assert words in text
    faults.clear()
    assert not faults.armed
    card.handle(short_frame(REQA))
    assert card.counters.as_dict() == {
        "frames": 1,
        "ignored": 0,
        "answers": 1,
        "lost_answers": 0,
        "tears": 0,
        "bits_flipped": 0,
        "delayed": 0,
    }
    card.counters.reset()
    assert set(card.counters.as_dict().values()) == {0}


# -- garbage on the air ----------------------------------------------------------------------------

frames = st.builds(
    lambda length, bits: BitFrame(bits & ((1 << length) - 1), length),
    st.integers(0, 200),
    st.integers(0, (1 << 200) - 1),
)


def card_in_state(state: str, seed: int) -> tuple[VirtualCard, ClassicReader | None]:
    card = new_card(uid_size=7 if seed % 2 else 4, seed=seed)
    if state == "idle":
        return card, None
    _field, _selected, reader = connect(card, seed)
    if state == "authenticated":
        reader.authenticate(4, FFKEY)
    elif state == "write_pending":
        reader.authenticate(4, FFKEY)
        reader._command(bytes([0xA0, 5]), "WRITE")
    elif state == "nonce_sent":
        reader._command(bytes([0x60, 4]), "AUTH")
    return card, reader


@settings(max_examples=examples(300))
@given(
    st.sampled_from(["idle", "selected", "nonce_sent", "authenticated", "write_pending"]),
    st.integers(0, 1000),
    st.lists(frames, min_size=1, max_size=8),
    st.booleans(),
)
def test_garbage_frames_never_raise(state, seed, garbage, noisy):
    card, _reader = card_in_state(state, seed)
    if noisy:
        card.faults.noise(0.5, count=3)
        card.faults.tear_after(1 + seed % 5, answer=bool(seed % 3))
    for frame in garbage:
        answer = card.handle(frame)
        assert isinstance(answer, BitFrame)
    card.place()
    # the card is still a working card afterwards
    card.faults.clear()
    _field, selected, reader = connect(card, seed)
    assert selected.uid == card.uid
    reader.authenticate(4, FFKEY)
