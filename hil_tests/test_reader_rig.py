"""The reader rig end to end: our PN532 driver against `afc sim reader` on a real pty.

Every test starts the emulator as its own process, exactly as a test bench does, and drives
it through the serial line in both MIFARE Classic modes: chip crypto (the PN532's Crypto1)
and transparent (host Crypto1, raw frames through InCommunicateThru).
"""

from __future__ import annotations

import pytest

from firmware.core import classic_layout as layout
from firmware.core.errors import AuthenticationError, NackError
from firmware.reader.errors import ReaderTimeout, ReaderUnavailable

FF = bytes.fromhex("FFFFFFFFFFFF")
KEY_A = bytes.fromhex("A1A2A3A4A5A6")
KEY_B = bytes.fromhex("B1B2B3B4B5B6")
MODES = ["chip", "transparent"]
CARDS = {
    "new:1k": (layout.CardType.CLASSIC_1K, 4),
    "new:1k:7": (layout.CardType.CLASSIC_1K, 7),
    "new:4k": (layout.CardType.CLASSIC_4K, 4),
    "new:4k:7": (layout.CardType.CLASSIC_4K, 7),
}


def open_card(pn, mode):
    target = pn.select()
    card = pn.chip_classic(target) if mode == "chip" else pn.transparent_classic(target)
    return target, card


def test_firmware_version_over_the_pty(reader_rig):
    _, pn = reader_rig("new:1k")
    assert pn.firmware_version() == (0x32, 1, 6, 7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", list(CARDS))
def test_detect_authenticate_read_write_value(reader_rig, spec, mode):
    card_type, uid_len = CARDS[spec]
    _, pn = reader_rig(spec)
    target, card = open_card(pn, mode)
    assert len(target.uid) == uid_len
    assert target.sak == card_type.sak
    card.authenticate(4, FF, "A")
    assert card.read(4) == bytes(16)
    card.write(5, bytes(range(16)))
    assert card.read(5) == bytes(range(16))
    card.write(6, layout.encode_value_block(1000, 6))
    card.decrement(6, 250)
    card.transfer(6)
    assert layout.decode_value_block(card.read(6)) == (750, 6)
    card.increment(6, 50)
    card.transfer(6)
    card.restore(6)
    card.transfer(5)
    assert layout.decode_value_block(card.read(5)) == (800, 6)
    if card_type is layout.CardType.CLASSIC_4K:
        block = layout.first_block(36, card_type) + 9  # a large sector
        card.authenticate(block, FF, "A")
        card.write(block, b"large sector 36!")
        assert card.read(block) == b"large sector 36!"


@pytest.mark.parametrize("mode", MODES)
def test_access_bits_and_wrong_keys(reader_rig, mode):
    _, pn = reader_rig("new:1k")
    _, card = open_card(pn, mode)
    card.authenticate(4, FF, "A")
    card.write(4, layout.encode_value_block(500, 4))
    card.write(7, layout.transit_trailer(KEY_A, KEY_B).to_bytes())
    pn.rf_field(False)
    pn.rf_field(True)
    _, card = open_card(pn, mode)
    with pytest.raises(AuthenticationError):
        card.authenticate(4, FF, "A")  # the transport key no longer opens the sector
    pn.rf_field(False)
    pn.rf_field(True)
    _, card = open_card(pn, mode)
    card.authenticate(4, KEY_A, "A")
    assert layout.decode_value_block(card.read(4)).value == 500
    with pytest.raises(NackError):
        card.write(5, bytes(16))  # data blocks are written with key B only
    pn.rf_field(False)
    pn.rf_field(True)
    _, card = open_card(pn, mode)
    card.authenticate(4, KEY_B, "B")
    card.write(5, b"written with B!!")
    assert card.read(5) == b"written with B!!"


def test_reader_unplugged_then_back(reader_rig, tmp_path):
    emulator, pn = reader_rig("new:1k")
    emulator.stop()
    with pytest.raises((ReaderTimeout, ReaderUnavailable)):
        pn.firmware_version()
    # the technician plugs the reader back: same port path, a new process behind it
    emulator.start()
    pn.reconnect()
    assert pn.firmware_version()[0] == 0x32
    assert len(pn.select().uid) == 4
