"""The PN532 emulator: host frames in, chip frames out; both reader modes against the card
model bit for bit; the pty/TCP server, the control channel and ``afc sim reader``."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from firmware.core import classic_layout as layout
from firmware.core.anticollision import select_card
from firmware.core.errors import AuthenticationError
from firmware.core.iso14443a import SILENCE, BitFrame, encode, with_crc
from firmware.core.mifare import ClassicReader, ClassicTag, TagNonces
from firmware.reader.codec import (
    ACK_FRAME,
    ERROR_FRAME,
    NACK_FRAME,
    Ack,
    Frame,
    Pn532Codec,
    encode_command,
    encode_response,
)
from firmware.reader.constants import (
    MF_CRYPTO1_ON,
    PARITY_DISABLE,
    RX_CRC_EN,
    TX_CRC_EN,
    Command,
    Register,
    Status,
    describe_status,
)
from simulators.pn532 import Pn532Emulator, Pn532Server
from tools.cli import main

UID4 = bytes.fromhex("9C599B32")
UID4B = bytes.fromhex("1A2B3C4D")
UID7 = bytes.fromhex("045F217A3C5880")
FFKEY = b"\xff" * 6
KEY_A = bytes.fromhex("A0A1A2A3A4A5")
KEY_B = bytes.fromhex("B0B1B2B3B4B5")
REPO = Path(__file__).resolve().parents[1]

GET_FIRMWARE_VERSION = bytes.fromhex("0000FF02FED4022A00")
FIRMWARE_RESPONSE = bytes.fromhex("0000FF06FAD50332010607E800")
SAM_CONFIGURATION = bytes.fromhex("0000FF05FBD4140114010200")
LIST_ONE_106A = bytes.fromhex("0000FF04FCD44A0100E100")


def tag(uid=UID4, card_type=layout.CardType.CLASSIC_1K, seed=1) -> ClassicTag:
    memory = layout.factory_memory(uid, card_type)
    return ClassicTag(uid, memory, card_type=card_type, nonces=TagNonces(random.Random(seed)))


def emulator(*cards, seed=7) -> Pn532Emulator:
    rng = random.Random(seed)
    return Pn532Emulator(cards, nonce=lambda: rng.getrandbits(32))


class Host:
    """The host side over :meth:`Pn532Emulator.receive`: frames out, events back."""

    def __init__(self, emu: Pn532Emulator) -> None:
        self.emu = emu
        self.codec = Pn532Codec.for_host()

    def send(self, data: bytes) -> list:
        self.codec.feed(self.emu.receive(data))
        return self.codec.events()

    def command(self, command: int, params: bytes = b"") -> bytes:
        events = self.send(encode_command(command, params))
        assert events and events[0] == Ack(), events
        assert len(events) == 2, events
        frame = events[1]
        assert isinstance(frame, Frame), frame
        assert frame.command == command + 1
        return frame.params

    def read_reg(self, *addresses: int) -> bytes:
        params = b"".join(a.to_bytes(2, "big") for a in addresses)
        return self.command(Command.READ_REGISTER, params)

    def write_reg(self, *pairs: tuple[int, int]) -> None:
        params = b"".join(a.to_bytes(2, "big") + bytes((v,)) for a, v in pairs)
        assert self.command(Command.WRITE_REGISTER, params) == b""

    def list_targets(self, max_tg: int = 1, init: bytes = b"") -> bytes:
        return self.command(Command.IN_LIST_PASSIVE_TARGET, bytes((max_tg, 0x00)) + init)

    def exchange(self, tg: int, data: bytes) -> tuple[int, bytes]:
        out = self.command(Command.IN_DATA_EXCHANGE, bytes((tg,)) + data)
        return out[0], out[1:]

    def auth(self, block: int, key: bytes, uid: bytes, key_type: str = "A", tg: int = 1) -> int:
        cmd = 0x60 if key_type == "A" else 0x61
        return self.exchange(tg, bytes((cmd, block)) + key + uid[-4:])[0]

    def transparent(self) -> None:
        """Parity and CRC generation off: the bytes are bits on the air (libnfc's way)."""
        tx, rx, manual = self.read_reg(
            Register.CIU_TX_MODE, Register.CIU_RX_MODE, Register.CIU_MANUAL_RCV
        )
        self.write_reg(
            (Register.CIU_TX_MODE, tx & ~TX_CRC_EN & 0xFF),
            (Register.CIU_RX_MODE, rx & ~RX_CRC_EN & 0xFF),
            (Register.CIU_MANUAL_RCV, manual | PARITY_DISABLE),
        )

    def thru(self, frame: BitFrame) -> BitFrame:
        """A transceive for the core's reader code, over InCommunicateThru in transparent
        mode: the packed bit stream out, TxLastBits set; RxLastBits read back."""
        data, last = frame.to_packed()
        self.write_reg((Register.CIU_BIT_FRAMING, last % 8))
        out = self.command(Command.IN_COMMUNICATE_THRU, data)
        if out[0] == Status.TIMEOUT:
            return SILENCE
        assert out[0] == Status.OK, describe_status(out[0])
        rx_last = self.read_reg(Register.CIU_CONTROL)[0] & 0x07
        return BitFrame.from_packed(out[1:], rx_last or 8)


def no_retries(host: Host) -> None:
    """MxRtyPassiveActivation 0: InListPassiveTarget answers at once, card or not."""
    assert host.command(Command.RF_CONFIGURATION, bytes((0x05, 0xFF, 0x01, 0x00))) == b""


# --- the host line: frames, ACK/NACK, errors -------------------------------------------------


def test_get_firmware_version_is_ack_then_pn532_v1_6():
    emu = emulator()
    assert emu.receive(GET_FIRMWARE_VERSION) == ACK_FRAME + FIRMWARE_RESPONSE
    assert Host(emu).command(Command.GET_FIRMWARE_VERSION) == bytes.fromhex("32010607")


def test_sam_configuration_hand_built_frame():
    emu = emulator()
    assert emu.receive(SAM_CONFIGURATION) == ACK_FRAME + bytes.fromhex("0000FF02FED5151600")


def test_frames_split_across_reads_and_garbage_before_them():
    emu = emulator()
    out = b"".join(emu.receive(bytes((b,))) for b in b"\x12\xab\x55\x55" + GET_FIRMWARE_VERSION)
    assert out == ACK_FRAME + FIRMWARE_RESPONSE


@pytest.mark.parametrize(
    "bad",
    [
        GET_FIRMWARE_VERSION[:-2] + b"\x2b\x00",  # DCS wrong
        bytes.fromhex("0000FF02FDD4022A00"),  # LCS wrong
        bytes.fromhex("0000FF02FED5022900"),  # TFI D5: a chip frame, not a command
    ],
    ids=["dcs", "lcs", "tfi"],
)
def test_bad_frame_gets_no_ack_and_the_line_recovers(bad):
    emu = emulator()
    assert emu.receive(bad) == b""
    assert emu.receive(GET_FIRMWARE_VERSION) == ACK_FRAME + FIRMWARE_RESPONSE


def test_nack_resends_the_last_response_only():
    emu = emulator()
    assert emu.receive(NACK_FRAME) == b""  # nothing said yet
    emu.receive(GET_FIRMWARE_VERSION)
    assert emu.receive(NACK_FRAME) == FIRMWARE_RESPONSE
    assert emu.receive(NACK_FRAME) == FIRMWARE_RESPONSE


@pytest.mark.parametrize(
    ("command", "params"),
    [
        (0x99, b""),  # no such command
        (0x8C, b"\x00" * 37),  # TgInitAsTarget: a real command, not emulated
        (Command.GET_FIRMWARE_VERSION, b"\x00"),
        (Command.IN_LIST_PASSIVE_TARGET, b"\x03\x00"),  # MaxTg 3
        (Command.IN_LIST_PASSIVE_TARGET, b"\x01"),
        (Command.IN_LIST_PASSIVE_TARGET, b"\x01\x09"),  # BrTy 9
        (Command.IN_LIST_PASSIVE_TARGET, b"\x01\x00\x01\x02"),  # 2-byte "UID"
        (Command.READ_REGISTER, b"\x63"),
        (Command.WRITE_REGISTER, b"\x63\x02"),
        (Command.RF_CONFIGURATION, b"\x05\xff"),
        (Command.RF_CONFIGURATION, b"\x07\x00"),
        (Command.SAM_CONFIGURATION, b"\x00"),
        (Command.IN_DATA_EXCHANGE, b"\x01"),
        (Command.IN_COMMUNICATE_THRU, b""),
        (Command.DIAGNOSE, b""),
    ],
)
def test_unknown_commands_and_wrong_parameters_get_the_error_frame(command, params):
    emu = emulator(tag())
    assert emu.receive(encode_command(command, params)) == ACK_FRAME + ERROR_FRAME
    assert emu.receive(NACK_FRAME) == ERROR_FRAME
    assert emu.internal_errors == 0


def test_misc_commands():
    host = Host(emulator(tag()))
    assert host.command(Command.SET_PARAMETERS, b"\x14") == b""
    assert host.command(Command.DIAGNOSE, b"\x00libnfc") == b"\x00libnfc"
    assert host.command(Command.DIAGNOSE, b"\x01") == b"\x00"
    assert host.command(Command.GET_GENERAL_STATUS) == bytes.fromhex("0000 00 00")
    host.list_targets()
    assert host.command(Command.GET_GENERAL_STATUS) == bytes.fromhex("000001 01000000 00")


def test_registers_read_back_with_reset_values_and_computed_bits():
    host = Host(emulator())
    assert host.read_reg(Register.CIU_TX_MODE, Register.CIU_RX_MODE) == b"\x80\x80"
    assert host.read_reg(Register.CIU_MANUAL_RCV, Register.CIU_STATUS2) == b"\x00\x00"
    host.write_reg((0x6305, 0x40), (0xFFB0, 0x12))
    assert host.read_reg(0x6305, 0xFFB0, 0x6320) == b"\x40\x12\x00"
    host.write_reg((Register.CIU_CONTROL, 0x17))  # RxLastBits are read-only
    assert host.read_reg(Register.CIU_CONTROL) == b"\x10"
    host.write_reg((Register.CIU_STATUS2, MF_CRYPTO1_ON))  # cannot switch a cipher on
    assert host.read_reg(Register.CIU_STATUS2) == b"\x00"


def test_power_down_sleeps_until_hsu_wake_up():
    emu = emulator()
    host = Host(emu)
    assert host.command(Command.POWER_DOWN, b"\x10") == b"\x00"  # wake on HSU
    assert emu.asleep
    assert emu.receive(GET_FIRMWARE_VERSION) == b""  # no 0x55 first: still asleep
    wake = b"\x55\x55\x00\x00\x00\x00\x00\x00"
    assert emu.receive(wake + GET_FIRMWARE_VERSION) == ACK_FRAME + FIRMWARE_RESPONSE
    assert not emu.asleep


def test_power_down_without_hsu_wake_source_stays_asleep():
    emu = emulator()
    assert Host(emu).command(Command.POWER_DOWN, b"\x20") == b"\x00"  # RF wake-up only
    assert emu.receive(b"\x55\x55\x00\x00\x00" + GET_FIRMWARE_VERSION) == b""
    emu.reset()
    assert emu.receive(GET_FIRMWARE_VERSION) == ACK_FRAME + FIRMWARE_RESPONSE


# --- InListPassiveTarget -------------------------------------------------------------------


def test_list_no_card_with_finite_retries_answers_zero_targets():
    host = Host(emulator())
    no_retries(host)
    assert host.list_targets() == b"\x00"


def test_list_one_card_4_byte_uid_hand_built_frame():
    emu = emulator(tag())
    expected = encode_response(0x4A, bytes.fromhex("0101 0004 08 04") + UID4)
    assert emu.receive(LIST_ONE_106A) == ACK_FRAME + expected


@pytest.mark.parametrize(
    ("uid", "card_type", "atqa", "sak"),
    [
        (UID7, layout.CardType.CLASSIC_1K, "0044", 0x08),
        (UID4, layout.CardType.CLASSIC_4K, "0002", 0x18),
        (UID7, layout.CardType.CLASSIC_4K, "0042", 0x18),
    ],
)
def test_list_reports_sens_res_high_byte_first_sak_and_uid(uid, card_type, atqa, sak):
    host = Host(emulator(tag(uid, card_type)))
    expected = b"\x01\x01" + bytes.fromhex(atqa) + bytes((sak, len(uid))) + uid
    assert host.list_targets() == expected


def test_list_two_cards_finds_both_and_addresses_each():
    host = Host(emulator(tag(UID4), tag(UID7, seed=2)))
    out = host.list_targets(max_tg=2)
    assert out[0] == 2
    first = out[1 : 1 + 5 + out[5]]
    second = out[1 + len(first) :]
    assert first[0] == 1 and second[0] == 2
    uids = {first[5:], second[5:]}
    assert uids == {UID4, UID7}
    # the chip re-selects whichever target the host addresses (HLTA, WUPA, SELECT)
    for tg, uid in ((1, first[5:]), (2, second[5:]), (1, first[5:])):
        assert host.auth(0, FFKEY, uid, tg=tg) == Status.OK
        status, block0 = host.exchange(tg, b"\x30\x00")
        assert status == Status.OK and block0.startswith(uid)


def test_list_one_of_two_cards_and_by_uid():
    host = Host(emulator(tag(UID4), tag(UID4B, seed=2)))
    assert host.list_targets()[0] == 1
    out = host.list_targets(init=UID4B)
    assert out == b"\x01\x01\x00\x04\x08\x04" + UID4B


def test_list_two_with_one_card_then_exchange_wakes_it():
    host = Host(emulator(tag(UID7)))
    out = host.list_targets(max_tg=2)
    assert out[0] == 1  # the lone card was halted while looking for a second one
    assert host.auth(4, FFKEY, UID7) == Status.OK
    assert host.exchange(1, b"\x30\x04") == (Status.OK, bytes(16))


def test_list_waits_for_a_card_when_retrying_forever():
    emu = emulator()
    card = tag()
    assert emu.receive(LIST_ONE_106A) == ACK_FRAME  # default MxRtyPassiveActivation 0xFF
    assert emu.pending
    for _ in range(3):
        assert emu.poll() == b""
    emu.place_card(card)
    assert emu.poll() == encode_response(0x4A, bytes.fromhex("0101 0004 08 04") + UID4)
    assert not emu.pending
    assert emu.poll() == b""


@pytest.mark.parametrize("abort", [ACK_FRAME, GET_FIRMWARE_VERSION], ids=["ack", "new-command"])
def test_host_aborts_a_waiting_list(abort):
    emu = emulator()
    assert emu.receive(LIST_ONE_106A) == ACK_FRAME
    out = emu.receive(abort)
    assert out == (b"" if abort == ACK_FRAME else ACK_FRAME + FIRMWARE_RESPONSE)
    emu.place_card(tag())
    assert not emu.pending and emu.poll() == b""


def test_release_deselect_select_and_rf_off():
    host = Host(emulator(tag()))
    host.list_targets()
    assert host.command(Command.IN_DESELECT, b"\x01") == b"\x00"
    assert host.command(Command.IN_SELECT, b"\x01") == b"\x00"  # WUPA wakes the halted card
    assert host.auth(0, FFKEY, UID4) == Status.OK
    assert host.command(Command.IN_RELEASE, b"\x00") == b"\x00"
    assert host.exchange(1, b"\x30\x00")[0] == Status.COMMAND_NOT_ACCEPTABLE
    assert host.command(Command.IN_SELECT, b"\x01") == bytes((Status.COMMAND_NOT_ACCEPTABLE,))
    # the released card was halted: only a power cycle of the field brings it back to REQA
    assert host.command(Command.RF_CONFIGURATION, b"\x01\x00") == b""  # field off
    assert host.list_targets()[0] == 1  # the field comes back on, the card is IDLE again
    assert host.command(Command.RF_CONFIGURATION, b"\x01\x00") == b""
    assert host.exchange(1, b"\x30\x00")[0] == Status.COMMAND_NOT_ACCEPTABLE


# --- chip crypto: InDataExchange -------------------------------------------------------------


def test_chip_crypto_auth_read_write_value_ops():
    card = tag()
    host = Host(emulator(card))
    host.list_targets()
    assert host.auth(4, FFKEY, UID4) == Status.OK
    assert host.read_reg(Register.CIU_STATUS2)[0] & MF_CRYPTO1_ON
    # block 0 is in another sector: the card NACKs, the chip reports 0x13
    assert host.exchange(1, b"\x30\x00") == (Status.DEP_INVALID_FORMAT, b"")
    # after a NACK the card is back in IDLE: without a new selection it cannot authenticate
    assert host.auth(4, FFKEY, UID4) == Status.MIFARE_AUTH_ERROR
    assert host.list_targets()[0] == 1
    assert host.auth(4, FFKEY, UID4) == Status.OK
    data = bytes(range(16))
    assert host.exchange(1, b"\xa0\x05" + data) == (Status.OK, b"")
    assert host.exchange(1, b"\x30\x05") == (Status.OK, data)
    assert card.memory[16 * 5 : 16 * 6] == data
    value = layout.encode_value_block(1000, 4)
    assert host.exchange(1, b"\xa0\x04" + value)[0] == Status.OK
    assert host.exchange(1, b"\xc0\x04" + (350).to_bytes(4, "little"))[0] == Status.OK
    assert host.exchange(1, b"\xb0\x04")[0] == Status.OK
    assert host.exchange(1, b"\xc1\x04" + (50).to_bytes(4, "little"))[0] == Status.OK
    assert host.exchange(1, b"\xb0\x04")[0] == Status.OK
    assert host.exchange(1, b"\xc2\x04" + bytes(4))[0] == Status.OK  # RESTORE: backup copy
    assert host.exchange(1, b"\xb0\x06")[0] == Status.OK
    assert layout.decode_value_block(card.memory[64:80]).value == 700
    assert layout.decode_value_block(card.memory[96:112]).value == 700
    # nested authentication into another sector inside the session
    assert host.auth(8, FFKEY, UID4) == Status.OK
    assert host.exchange(1, b"\x30\x08") == (Status.OK, bytes(16))


def test_chip_crypto_7_byte_uid_uses_its_last_four_bytes():
    host = Host(emulator(tag(UID7)))
    host.list_targets()
    assert host.auth(0, FFKEY, UID7) == Status.OK  # the helper sends uid[-4:]
    assert host.exchange(1, b"\x30\x00")[1][:7] == UID7


def test_wrong_key_is_0x14_then_the_card_is_silent():
    host = Host(emulator(tag()))
    host.list_targets()
    assert host.auth(4, KEY_A, UID4) == Status.MIFARE_AUTH_ERROR
    assert not host.read_reg(Register.CIU_STATUS2)[0] & MF_CRYPTO1_ON
    assert host.exchange(1, b"\x30\x04")[0] == Status.TIMEOUT  # the card left the session
    assert host.command(Command.GET_GENERAL_STATUS)[0] == Status.TIMEOUT
    assert host.list_targets()[0] == 1  # it answers a new activation
    assert host.auth(4, FFKEY, UID4) == Status.OK
    assert host.auth(4, FFKEY, UID4[::-1]) == Status.MIFARE_AUTH_ERROR  # UID bytes matter
    assert host.exchange(1, b"\x60\x04" + FFKEY)[0] == Status.INVALID_PARAMETER


def test_access_bits_refusal_is_0x13_and_allowed_ops_still_work():
    card = tag()
    host = Host(emulator(card))
    host.list_targets()
    assert host.auth(4, FFKEY, UID4) == Status.OK
    assert host.exchange(1, b"\xa0\x04" + layout.encode_value_block(1000, 4))[0] == Status.OK
    trailer = layout.transit_trailer(KEY_A, KEY_B).to_bytes()
    assert host.exchange(1, b"\xa0\x07" + trailer)[0] == Status.OK
    assert host.auth(4, KEY_A, UID4) == Status.OK
    assert host.exchange(1, b"\xa0\x04" + bytes(16))[0] == Status.DEP_INVALID_FORMAT  # write
    host.list_targets()  # a NACK sends the card back to IDLE: select it again
    assert host.auth(4, KEY_A, UID4) == Status.OK
    increment = b"\xc1\x04" + (10).to_bytes(4, "little")
    assert host.exchange(1, increment)[0] == Status.DEP_INVALID_FORMAT
    host.list_targets()
    assert host.auth(4, KEY_A, UID4) == Status.OK
    assert host.exchange(1, b"\xc0\x04" + (10).to_bytes(4, "little"))[0] == Status.OK
    assert host.exchange(1, b"\xb0\x04")[0] == Status.OK
    assert host.exchange(1, b"\x30\x04")[1] == layout.encode_value_block(990, 4)
    assert host.auth(4, FFKEY, UID4) == Status.MIFARE_AUTH_ERROR  # transport key is gone


def test_unknown_target_and_removed_card():
    card = tag()
    emu = emulator(card)
    host = Host(emu)
    assert host.exchange(1, b"\x30\x00")[0] == Status.COMMAND_NOT_ACCEPTABLE
    host.list_targets()
    assert host.exchange(2, b"\x30\x00")[0] == Status.COMMAND_NOT_ACCEPTABLE
    emu.remove_card(card)
    assert host.exchange(1, b"\x30\x00")[0] == Status.TIMEOUT
    assert host.auth(0, FFKEY, UID4) == Status.MIFARE_AUTH_ERROR


# --- InCommunicateThru: raw frames ----------------------------------------------------------


def test_transparent_mode_host_crypto1_bit_for_bit():
    """The host runs anticollision and Crypto1 itself; the chip passes packed bit streams
    (the host's encrypted parity bits included) both ways, RxLastBits read back."""
    card = tag(UID7)
    host = Host(emulator(card))
    host.transparent()
    selected = select_card(host.thru)  # anticollision through the chip, bit by bit
    assert selected.uid == UID7
    rng = random.Random(3)
    reader = ClassicReader(host.thru, UID7, nonce=lambda: rng.getrandbits(32))
    reader.authenticate(4, FFKEY, "A")
    assert host.read_reg(Register.CIU_STATUS2)[0] & MF_CRYPTO1_ON == 0  # host crypto only
    reader.write(5, b"transparent mode")
    assert reader.read(5) == b"transparent mode"
    reader.write(4, layout.encode_value_block(500, 4))
    reader.decrement(4, 120)
    reader.transfer(4)
    reader.authenticate(8, FFKEY, "A")  # nested
    reader.write(9, bytes(range(16)))
    assert card.memory[80:96] == b"transparent mode"
    assert layout.decode_value_block(card.memory[64:80]).value == 380
    assert card.memory[144:160] == bytes(range(16))


def test_transparent_mode_after_chip_listing_wrong_key():
    host = Host(emulator(tag()))
    host.list_targets()  # the chip selects; the host takes over in transparent mode
    host.transparent()
    reader = ClassicReader(host.thru, UID4)
    with pytest.raises(AuthenticationError):
        reader.authenticate(4, KEY_A, "A")


def test_communicate_thru_with_parity_and_crc_by_the_chip():
    host = Host(emulator(tag()))
    host.write_reg(
        (Register.CIU_BIT_FRAMING, 7), (Register.CIU_TX_MODE, 0x00), (Register.CIU_RX_MODE, 0x00)
    )
    assert host.command(Command.IN_COMMUNICATE_THRU, b"\x26") == b"\x00\x04\x00"  # REQA
    assert host.read_reg(Register.CIU_CONTROL)[0] & 7 == 0
    assert host.command(Command.IN_COMMUNICATE_THRU, b"\x26")[0] == Status.TIMEOUT
    assert host.read_reg(Register.CIU_ERROR) == b"\x00"


def test_communicate_thru_goes_through_the_chip_cipher_after_chip_auth():
    host = Host(emulator(tag()))
    host.list_targets()
    assert host.auth(4, FFKEY, UID4) == Status.OK
    assert host.exchange(1, b"\xa0\x06" + b"chip cipher thru")[0] == Status.OK
    # CRC by the chip, parity by the chip, Crypto1 by the chip (MFCrypto1On)
    assert host.command(Command.IN_COMMUNICATE_THRU, b"\x30\x06") == b"\x00chip cipher thru"
    host.write_reg((Register.CIU_RX_MODE, 0x00))  # keep the card's CRC_A
    out = host.command(Command.IN_COMMUNICATE_THRU, b"\x30\x06")
    assert out[0] == Status.OK and len(out) == 19
    host.write_reg((Register.CIU_STATUS2, 0x00))  # host switches the chip's cipher off
    assert host.command(Command.IN_COMMUNICATE_THRU, b"\x30\x06")[0] == Status.TIMEOUT


class BadCard:
    """A card that answers every frame with one fixed (broken) frame."""

    def __init__(self, answer: BitFrame) -> None:
        self.answer = answer

    def handle(self, frame: BitFrame) -> BitFrame:
        return self.answer

    def reset(self) -> None:
        pass


@pytest.mark.parametrize(
    ("answer", "status", "error_bit"),
    [
        (BitFrame(encode(b"\x04\x00").bits ^ (1 << 8), 18), Status.PARITY_ERROR, 0x02),
        (encode(b"\x01\x02\x03\x04"), Status.CRC_ERROR, 0x04),
        (encode(with_crc(b"\x01\x02")), Status.OK, 0x00),
    ],
    ids=["parity", "crc", "good"],
)
def test_communicate_thru_checks_parity_and_crc(answer, status, error_bit):
    host = Host(emulator(BadCard(answer)))
    out = host.command(Command.IN_COMMUNICATE_THRU, b"\x30\x00")
    assert out[0] == status
    assert host.read_reg(Register.CIU_ERROR)[0] == error_bit
    if status == Status.OK:
        assert out[1:] == b"\x01\x02"


# --- fuzz ------------------------------------------------------------------------------------

_COMMANDS = [int(c) for c in Command] + [0x8C, 0xFF, 0x41]


@given(st.lists(st.binary(max_size=120), max_size=8))
def test_fuzz_random_bytes_never_raise(chunks):
    emu = emulator(tag())
    for chunk in chunks:
        assert isinstance(emu.receive(chunk), bytes)
        assert isinstance(emu.poll(), bytes)
    assert emu.internal_errors == 0


@given(
    st.lists(
        st.tuples(st.sampled_from(_COMMANDS), st.binary(max_size=40)), min_size=1, max_size=10
    ),
    st.booleans(),
)
def test_fuzz_well_formed_frames_always_answered(frames, listed):
    emu = emulator(tag(), tag(UID7, seed=5))
    if listed:
        Host(emu).list_targets()
    for command, params in frames:
        asleep = emu.asleep
        out = emu.receive(encode_command(command, params))
        assert isinstance(out, bytes)
        if not asleep and command != Command.IN_LIST_PASSIVE_TARGET:
            assert out.startswith(ACK_FRAME) and len(out) > len(ACK_FRAME)
        assert isinstance(emu.poll(), bytes)
    assert emu.internal_errors == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x00, 0x80, 0x83]),  # TxMode
            st.sampled_from([0x00, 0x80]),  # RxMode
            st.sampled_from([0x00, PARITY_DISABLE]),  # ManualRCV
            st.integers(0, 7),  # TxLastBits
            st.binary(min_size=1, max_size=20),
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_fuzz_communicate_thru_under_any_framing(frames, chip_session):
    emu = emulator(tag(), BadCard(encode(b"\x01\x02")))
    host = Host(emu)
    if chip_session:
        emu.remove_card(emu.cards[1])  # the noisy card would spoil the activation
        host.list_targets(init=UID4)
        assert host.auth(4, FFKEY, UID4) == Status.OK
    for tx, rx, manual, last, data in frames:
        host.write_reg(
            (Register.CIU_TX_MODE, tx),
            (Register.CIU_RX_MODE, rx),
            (Register.CIU_MANUAL_RCV, manual),
            (Register.CIU_BIT_FRAMING, last),
        )
        out = host.command(Command.IN_COMMUNICATE_THRU, data)
        assert out[0] in {int(s) for s in Status}
        assert host.read_reg(Register.CIU_CONTROL)[0] & 0xF8 == 0x10
    assert emu.internal_errors == 0


# --- the server: pty, TCP, control -----------------------------------------------------------


def read_exact(line: serial.SerialBase, n: int, timeout: float = 3.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += line.read(n - len(out))
    return out


def transact(line: serial.SerialBase, command: int, params: bytes = b"") -> bytes:
    line.write(encode_command(command, params))
    assert read_exact(line, 6) == ACK_FRAME
    head = read_exact(line, 5)
    assert head[:3] == b"\x00\x00\xff", head
    body = read_exact(line, head[3] + 2)
    assert body[0] == 0xD5 and body[1] == command + 1
    return body[2:-2]


def test_pty_end_to_end_with_pyserial(tmp_path):
    link = tmp_path / "pn532"
    card = tag()
    server = Pn532Server(emulator(), cards=[card], port=link)
    assert link.is_symlink() and os.readlink(link) == server.pty_path
    with server, serial.serial_for_url(str(link), baudrate=115200, timeout=0.2) as line:
        line.write(b"\x55\x55\x00\x00\x00")
        assert transact(line, Command.GET_FIRMWARE_VERSION) == bytes.fromhex("32010607")
        # no card yet: the list command waits, the loop keeps serving
        line.write(encode_command(Command.IN_LIST_PASSIVE_TARGET, b"\x01\x00"))
        assert read_exact(line, 6) == ACK_FRAME
        assert line.read(1) == b""
        server.place(card)
        expected = encode_response(0x4A, bytes.fromhex("0101 0004 08 04") + UID4)
        assert read_exact(line, len(expected)) == expected
        assert transact(line, Command.IN_DATA_EXCHANGE, b"\x01\x60\x00" + FFKEY + UID4) == b"\x00"
        assert transact(line, Command.IN_DATA_EXCHANGE, b"\x01\x30\x00")[1:5] == UID4
        assert server.control("list") == [
            f"card 1 uid={UID4.hex().upper()} type=classic-1k state=placed",
            "ok 1 card(s)",
        ]
    assert server.join(5.0)
    assert not link.exists() and not link.is_symlink()


def test_tcp_socket_url_and_baud_timing():
    with Pn532Server(emulator(), listen=("127.0.0.1", 0), baud_timing=True) as server:
        assert server.url.startswith("socket://127.0.0.1:")
        with serial.serial_for_url(server.url, timeout=0.2) as line:
            assert transact(line, Command.GET_FIRMWARE_VERSION) == bytes.fromhex("32010607")
            data = bytes(200)
            start = time.monotonic()
            assert transact(line, Command.DIAGNOSE, b"\x00" + data) == b"\x00" + data
            # ACK + 211-byte response = 217 bytes at 115200 baud, 10 bits each: 18.8 ms
            assert time.monotonic() - start >= 0.015


def test_control_socket_protocol(tmp_path):
    path = tmp_path / "ctl"
    cards = [tag(), tag(UID7, seed=2)]
    emu = emulator()
    with Pn532Server(emu, cards=cards, control=str(path)) as server:
        assert server.control_address == str(path)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.settimeout(3.0)
            stream = sock.makefile("rw", newline="\n")

            def ask(line: str) -> list[str]:
                stream.write(line + "\n")
                stream.flush()
                out = []
                while not out or not out[-1].startswith(("ok", "error")):
                    out.append(stream.readline().rstrip("\n"))
                return out

            assert ask("list")[-1] == "ok 2 card(s)"
            assert "state=removed" in ask("list")[0]
            assert ask("place 2") == ["ok"]
            assert server.call(lambda: emu.cards) == [cards[1]]
            assert ask("place all") == ["ok"] and len(server.call(lambda: emu.cards)) == 2
            assert ask("remove 1") == ["ok"]
            assert ask("place 3")[0].startswith("error: no card '3'")
            assert ask("fault 1 tear-after 2")[0].startswith("error: unsupported")
            assert ask("add new:1k")[0].startswith("error:")  # no card factory here
            assert ask("bogus")[0].startswith("error: unknown command")
            assert ask("status")[0].startswith("ok asleep=0")
            assert ask("quit") == ["ok bye"]
            assert stream.readline() == ""
    assert not path.exists()


def test_control_routes_faults_to_virtual_cards():
    cards_pkg = pytest.importorskip("simulators.cards")
    card = cards_pkg.VirtualCard.new(layout.CardType.CLASSIC_1K, UID4, rng=random.Random(1))
    server = Pn532Server(emulator(), cards=[card])
    try:
        assert server.control("fault 1 tear-after 1 answer=false") == ["ok"]
        assert server.control("faults 1")[0].startswith("tear before answering")
        assert server.control("fault 1 clear") == ["ok"]
        assert server.control("faults 1") == ["ok"]
        assert server.control("fault 1 tear-after x")[0].startswith("error:")
        assert server.control("fault 1 _on_frame")[0].startswith("error: unsupported")
    finally:
        server.close()


# --- afc sim reader ------------------------------------------------------------------------


def test_cli_help_teaches():
    result = CliRunner().invoke(main, ["sim", "reader", "--help"])
    assert result.exit_code == 0
    for text in ("serial_for_url", "--port", "--listen", "--control", "new:1k", "tear-after"):
        assert text in result.output
    assert CliRunner().invoke(main, ["sim", "--help"]).exit_code == 0


def test_cli_bad_card_spec_is_one_line_error():
    result = CliRunner().invoke(main, ["sim", "reader", "--card", "new:2k"])
    assert result.exit_code == 1
    assert result.stderr.startswith("afc: error:")


def _afc(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "tools.cli", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_cli_serves_a_pty_and_saves_card_files_on_sigterm(tmp_path):
    cards_pkg = pytest.importorskip("simulators.cards")
    card_file = tmp_path / "card.json"
    cards_pkg.VirtualCard.new(layout.CardType.CLASSIC_1K, UID4).save(card_file)
    proc = _afc("sim", "reader", "--card", str(card_file), "--card", "new:4k")
    try:
        pty_path = proc.stdout.readline().decode().strip()
        assert pty_path.startswith("/dev/"), proc.stderr.read(500)
        with serial.serial_for_url(pty_path, timeout=0.2) as line:
            assert transact(line, Command.GET_FIRMWARE_VERSION) == bytes.fromhex("32010607")
            assert transact(line, Command.IN_LIST_PASSIVE_TARGET, b"\x01\x00")[0] == 1
            uid = transact(line, Command.IN_LIST_PASSIVE_TARGET, b"\x01\x00" + UID4)[6:]
            assert uid == UID4
            auth = b"\x01\x60\x04" + FFKEY + UID4
            assert transact(line, Command.IN_DATA_EXCHANGE, auth) == b"\x00"
            write = b"\x01\xa0\x05" + b"saved on SIGTERM"
            assert transact(line, Command.IN_DATA_EXCHANGE, write) == b"\x00"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
    saved = cards_pkg.VirtualCard.from_file(card_file)
    assert saved.block(5) == b"saved on SIGTERM"
