"""A sans-I/O model of the NXP PN532 as a host sees it over HSU: bytes in, bytes out.

:class:`Pn532Emulator` stands in for the reader chip on test rigs. It decodes the host's
frames with the same codec the driver uses (:mod:`firmware.reader.codec`), answers them the
way the PN532 User Manual (UM0701-02) describes, and talks to virtual cards through the
core's bit-level air model (:class:`~firmware.core.anticollision.Field`). Nothing here reads a
port or a clock: :meth:`Pn532Emulator.receive` consumes host bytes and returns the chip's
bytes, and the one thing that depends on time -- an InListPassiveTarget waiting for a card
with "retry forever" -- is finished by :meth:`Pn532Emulator.poll`, which the server calls
when it has nothing else to do and after a card is placed.

Why bit level: the validator's transparent mode sends raw bit frames with its own parity
through InCommunicateThru, and the chip-crypto mode has the chip run Crypto1. Modelling the
chip on top of the same BitFrame/Field/ClassicReader code the cards use means both modes
reach the card bit for bit, so a framing or parity bug in the driver shows up here and not
only on a bus in the field.

Host line protocol (UM0701-02 section 6.2):

* a valid command frame is acknowledged (ACK) and then answered with a response frame;
* a frame whose length or data checksum fails is discarded without an answer; the host sees
  no ACK within its timeout and sends the command again (UM0701-02 6.2.3);
* a syntactically valid frame the chip cannot execute (unknown command code, wrong number
  of parameters, a parameter out of range where the response has no status byte) is
  acknowledged and answered with the application-level error frame ``00 00 FF 01 FF 7F 81
  00``;
* a NACK from the host makes the chip send its last response frame again;
* an ACK from the host while a command is still running aborts that command: no response;
* any new command frame also aborts a command still running;
* after PowerDown the chip sleeps: bytes are ignored until a ``0x55`` arrives on HSU (when
  WakeUpEnable allowed HSU), then it listens again.

See ``docs/pn532-emulator.md`` for the status-code choices and the known differences from a
real chip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from firmware.core.anticollision import (
    HLTA_FRAME,
    SAK_UID_INCOMPLETE,
    SEL_CODES,
    Card,
    Field,
    SelectedCard,
    cascade_levels,
    select_card,
    select_frame,
)
from firmware.core.crypto1 import (
    Cipher,
    decrypt_bits,
    decrypt_frame,
    encrypt_bits,
    encrypt_frame,
)
from firmware.core.errors import CoreError, CrcError, FrameError, ParityError
from firmware.core.iso14443a import (
    HLTA,
    REQA,
    SILENCE,
    WUPA,
    BitFrame,
    concat,
    crc_a,
    decode,
    encode,
    encode_bits,
    short_frame,
    split,
    strip_crc,
    with_crc,
)
from firmware.core.mifare import (
    ACK as MIFARE_ACK,
)
from firmware.core.mifare import (
    AUTH_A,
    AUTH_B,
    DECREMENT,
    INCREMENT,
    RESTORE,
    WRITE,
    ClassicReader,
)
from firmware.reader.codec import (
    ACK_FRAME,
    ERROR_FRAME,
    Ack,
    BadFrame,
    ErrorFrame,
    Event,
    Frame,
    Garbage,
    Nack,
    Pn532Codec,
    encode_response,
)
from firmware.reader.constants import (
    BRTY_106A,
    FIRMWARE_VERSION,
    LAST_BITS_MASK,
    MF_CRYPTO1_ON,
    PARITY_DISABLE,
    RX_CRC_EN,
    TX_CRC_EN,
    Command,
    Register,
    RFConfigItem,
    Status,
)

logger = logging.getLogger(__name__)


def traced_command(command: int, params: bytes) -> str:
    """A host command as the frame trace shows it, with no key material: the MIFARE
    authentication the chip runs itself carries the sector key (shown as ``<key>``), and a
    WRITE may carry a sector trailer's keys (its 16 data bytes shown as ``<16 bytes>``).
    Everything else is shown in hex: frames of transparent mode are Crypto1-encrypted
    already, and the rest is card data and chip settings."""
    try:
        name = Command(command).name
    except ValueError:
        name = f"0x{command:02X}"
    if command == Command.IN_DATA_EXCHANGE and len(params) >= 2:
        tg, mifare = params[0], params[1]
        if mifare in (AUTH_A, AUTH_B) and len(params) >= 3:
            # Tg, 60/61, block, key (6), UID (4)
            return (f"{name} tg={tg} {mifare:02X} block={params[2]} <key> "
                    f"uid=…{params[-2:].hex().upper() if len(params) >= 13 else ''}")
        if mifare == WRITE and len(params) > 3:
            return f"{name} tg={tg} A0 block={params[2]} <{len(params) - 3} bytes>"
    return f"{name} {params.hex(' ')}".rstrip()

# CIU registers the shared table lacks or gets wrong (firmware.reader.constants.Register has
# CIU_COMM_IRQ = 0x6333 and CIU_DIV_IRQ = 0x6334; in the PN532 they are 0x6334 and 0x6335,
# with CommIEn at 0x6332 and DivIEn at 0x6333, as libnfc's pn53x-internal.h lists them).
CIU_COMM_IEN = 0x6332
CIU_DIV_IEN = 0x6333
CIU_COMM_IRQ = 0x6334
CIU_DIV_IRQ = 0x6335

# CIU_Error bits (same layout as the PN512/MFRC52x ErrorReg)
ERR_PROTOCOL = 0x01
ERR_PARITY = 0x02
ERR_CRC = 0x04
ERR_COLL = 0x08
# CIU_Coll: bit 5 CollPosNotValid, bits 4..0 CollPos (1..31, 0 meaning bit 32)
COLL_POS_NOT_VALID = 0x20
COLL_VALUES_AFTER = 0x80

SFR_P3 = 0xFFB0
SFR_P7 = 0xFFF7

WAKE_HSU = 0x10  # PowerDown WakeUpEnable bit: wake on HSU activity
RETRY_FOREVER = 0xFF  # MxRtyPassiveActivation value meaning "try until a card comes"
MAX_TARGETS = 2  # InListPassiveTarget MaxTg limit of the PN532
BRTY_MAX = 0x04  # 0 106A, 1 212 FeliCa, 2 424 FeliCa, 3 106B, 4 106 Jewel
IMMEDIATE_LIST_ATTEMPTS = 3  # activations tried at once before a list command goes pending

# InDataExchange MIFARE command shapes the chip handles itself
_AUTH_LEN = 12  # 60/61, block, key (6), UID (4)
_WRITE_LEN = 18  # A0, block, 16 data bytes: the chip runs both phases
_VALUE_LEN = 6  # C0/C1/C2, block, 4-byte operand: both phases

# RFConfiguration: item -> length of its configuration data (UM0701-02 7.3.1)
_RF_ITEM_LENGTHS = {
    RFConfigItem.RF_FIELD: 1,
    RFConfigItem.VARIOUS_TIMINGS: 3,
    RFConfigItem.MAX_RTY_COM: 1,
    RFConfigItem.MAX_RETRIES: 3,
    RFConfigItem.ANALOG_106A: 11,
    RFConfigItem.ANALOG_212_424: 8,
    RFConfigItem.ANALOG_TYPE_B: 3,
    RFConfigItem.ANALOG_ISO_DEP: 9,
}

# Plausible reset values (PN512-family CIU reset values; TxMode/RxMode with CRC on, which is
# what libnfc assumes of a PN532 after power-up). Addresses not listed read 0x00 until written.
RESET_REGISTERS: dict[int, int] = {
    Register.CIU_MODE: 0x3B,
    Register.CIU_TX_MODE: TX_CRC_EN,
    Register.CIU_RX_MODE: RX_CRC_EN,
    Register.CIU_TX_CONTROL: 0x80,
    0x6306: 0x10,  # TxSel
    0x6307: 0x84,  # RxSel
    0x6308: 0x84,  # RxThreshold
    0x6309: 0x4D,  # Demod
    Register.CIU_MANUAL_RCV: 0x00,
    0x6314: 0x26,  # ModWidth
    0x6316: 0x48,  # RFCfg
    0x6317: 0x88,  # GsNOn
    0x6318: 0x20,  # CWGsP
    0x6319: 0x20,  # ModGsP
    Register.CIU_COMMAND: 0x20,
    CIU_COMM_IEN: 0x80,
    CIU_DIV_IEN: 0x00,
    CIU_COMM_IRQ: 0x14,
    CIU_DIV_IRQ: 0x00,
    Register.CIU_ERROR: 0x00,
    Register.CIU_STATUS1: 0x21,
    Register.CIU_STATUS2: 0x00,
    Register.CIU_WATER_LEVEL: 0x08,
    Register.CIU_CONTROL: 0x10,
    Register.CIU_BIT_FRAMING: 0x00,
    Register.CIU_COLL: COLL_VALUES_AFTER | COLL_POS_NOT_VALID,
    SFR_P3: 0x3F,
    SFR_P7: 0x06,
}


class _SyntaxError(Exception):
    """The command cannot be executed as sent: the chip answers with its error frame."""


@dataclass(frozen=True, slots=True)
class Target:
    """A target the chip has listed: its number and what InListPassiveTarget reported.

    ``atqa`` is in on-air order (low byte first), as the core's anticollision returns it;
    the PN532 reports it the other way round (``00 04`` for a MIFARE Classic 1K).
    """

    tg: int
    uid: bytes
    atqa: bytes
    sak: int


@dataclass(frozen=True, slots=True)
class _ListRequest:
    max_tg: int
    brty: int
    uid: bytes | None


_PENDING = object()  # a command handler's "answer later" marker


class Pn532Emulator:
    """The PN532 chip: host bytes in, chip bytes out, cards in an RF field.

    ``cards`` are placed in the field at once. ``nonce`` supplies the reader nonces of the
    chip's own Crypto1 (chip-crypto mode); tests pass a seeded one, the default is random.

    Thread safety: none. One thread owns an emulator (the server's loop); anything else
    asks that thread to act (see :meth:`simulators.pn532.server.Pn532Server.call`).
    """

    def __init__(
        self, cards: Iterable[Card] = (), *, nonce: Callable[[], int] | None = None
    ) -> None:
        self.field = Field()
        self._nonce = nonce
        self.internal_errors = 0  # handler bugs caught at the boundary (tests assert 0)
        self._dispatch = self._handlers()
        self.reset()
        for card in cards:
            self.place_card(card)

    # -- state the outside world changes ---------------------------------------------------

    def reset(self) -> None:
        """Power-on reset of the chip (cards stay where they are, but lose power)."""
        self._codec = Pn532Codec.for_chip()
        self._registers: dict[int, int] = dict(RESET_REGISTERS)
        self._rx_last_bits = 0
        self._cipher: Cipher | None = None
        self._targets: dict[int, Target] = {}
        self._current: int | None = None
        self._pending: _ListRequest | None = None
        self._last_response: bytes | None = None
        self._last_error = 0
        self._asleep = False
        self._sleep_after_answer = False
        self._wake_sources = 0
        self._rf_on = False
        self._max_retries = bytes((0xFF, 0x01, RETRY_FOREVER))  # ATR, PSL, PassiveActivation
        self._max_rty_com = 0x00
        self._parameters = 0x00
        self._sam_mode = 0x01
        self._baud_code = 0x04  # 115200
        self.field.reset()

    def place_card(self, card: Card) -> None:
        """A card enters the field: it powers up fresh (IDLE). Placing a card that is
        already there does nothing, unless it left by itself (a virtual card's tear fault:
        ``in_field`` false), which brings it back.

        A pending InListPassiveTarget is not finished here: the caller runs :meth:`poll`
        next and sends what it returns, so the answer goes out in the server's one place.
        """
        if any(c is card for c in self.field.cards):
            if getattr(card, "in_field", True) is False:
                card.reset()
            return
        card.reset()
        self.field.add(card)

    def remove_card(self, card: Card) -> None:
        """A card leaves the field and loses power. Listed targets stay listed, as on a
        real chip, which only finds out at the next exchange (status 0x01, timeout)."""
        if any(c is card for c in self.field.cards):
            self.field.remove(card)

    @property
    def cards(self) -> list[Card]:
        """The cards in the field now."""
        return list(self.field.cards)

    @property
    def pending(self) -> bool:
        """Whether an InListPassiveTarget is waiting for a card (poll() may finish it)."""
        return self._pending is not None

    @property
    def asleep(self) -> bool:
        """Whether the chip is in PowerDown and waits for an HSU wake-up (0x55)."""
        return self._asleep

    @property
    def targets(self) -> list[Target]:
        """The targets listed now (Tg order)."""
        return [self._targets[k] for k in sorted(self._targets)]

    @property
    def rf_on(self) -> bool:
        return self._rf_on

    def status(self) -> dict[str, object]:
        """A snapshot for the control channel and for logs."""
        return {
            "asleep": self._asleep,
            "pending": self.pending,
            "rf": self._rf_on,
            "cards": len(self.field.cards),
            "targets": [(t.tg, t.uid.hex()) for t in self.targets],
            "current": self._current,
            "crypto1": self._cipher is not None,
            "last_error": self._last_error,
        }

    # -- the host line ------------------------------------------------------------------------

    def receive(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the bytes the chip sends back (maybe none).

        Never raises on any input: a handler bug is logged, counted in
        :attr:`internal_errors` and answered with the error frame.
        """
        data = bytes(data)
        if self._asleep:
            data = self._wake_up(data)
            if not data:
                return b""
        self._codec.feed(data)
        out = bytearray()
        while (event := self._codec.next_event()) is not None:
            out += self._on_event(event)
            if self._asleep:
                # bytes behind the PowerDown command in the same chunk reach a sleeping chip
                self._codec.clear()
                break
        return bytes(out)

    def poll(self) -> bytes:
        """Retry a pending InListPassiveTarget once; the response frame when it found a
        card, else ``b""``. Cheap to call often: one REQA when the field is empty."""
        request = self._pending
        if request is None or self._asleep:
            return b""
        try:
            body = self._try_list(request)
        except Exception:  # the boundary: log, count, keep serving
            self.internal_errors += 1
            logger.exception("PN532 emulator: internal error while polling for a card")
            body = None
        if body is None:
            return b""
        self._pending = None
        frame = encode_response(Command.IN_LIST_PASSIVE_TARGET, body)
        self._last_response = frame
        logger.debug("PN532 emulator: pending InListPassiveTarget found %d target(s)", body[0])
        return frame

    def _wake_up(self, data: bytes) -> bytes:
        at = data.find(b"\x55")
        if at < 0 or not self._wake_sources & WAKE_HSU:
            return b""
        self._asleep = False
        self._codec.clear()
        logger.debug("PN532 emulator: woken up by HSU")
        return data[at:]

    def _on_event(self, event: Event) -> bytes:
        if isinstance(event, Frame):
            return self._on_frame(event)
        if isinstance(event, Ack):
            if self._pending is not None:
                logger.debug("PN532 emulator: host ACK aborts the pending command")
                self._pending = None
            return b""
        if isinstance(event, Nack):
            return self._last_response or b""
        if isinstance(event, BadFrame):
            logger.info("PN532 emulator: frame discarded, no ACK: %s", event.reason)
        elif isinstance(event, Garbage):
            logger.debug("PN532 emulator: %d garbage bytes skipped", len(event.data))
        elif isinstance(event, ErrorFrame):
            logger.info("PN532 emulator: the host sent an error frame; ignored")
        return b""

    def _on_frame(self, frame: Frame) -> bytes:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("host > chip: %s", traced_command(frame.command, frame.params))
        if self._pending is not None:
            logger.debug("PN532 emulator: a new command aborts the pending one")
        self._pending = None
        self._last_response = None
        command = frame.command
        try:
            body = self._execute(command, frame.params)
            if body is _PENDING:
                return ACK_FRAME
            response = encode_response(command, body)
        except _SyntaxError as exc:
            logger.info("PN532 emulator: command 0x%02X refused: %s", command, exc)
            response = ERROR_FRAME
        except Exception:  # the boundary: log, count, keep serving
            self.internal_errors += 1
            logger.exception("PN532 emulator: internal error in command 0x%02X", command)
            response = ERROR_FRAME
        self._last_response = response
        if self._sleep_after_answer:
            self._sleep_after_answer = False
            self._go_to_sleep()
        return ACK_FRAME + response

    def _execute(self, command: int, params: bytes) -> bytes | object:
        handler = self._dispatch.get(command)
        if handler is None:
            raise _SyntaxError(f"unknown or unemulated command 0x{command:02X}")
        return handler(params)

    def _handlers(self) -> dict[int, Callable[[bytes], bytes | object]]:
        return {
            Command.DIAGNOSE: self._diagnose,
            Command.GET_FIRMWARE_VERSION: self._get_firmware_version,
            Command.GET_GENERAL_STATUS: self._get_general_status,
            Command.READ_REGISTER: self._read_register,
            Command.WRITE_REGISTER: self._write_register,
            Command.READ_GPIO: self._read_gpio,
            Command.WRITE_GPIO: self._write_gpio,
            Command.SET_SERIAL_BAUD_RATE: self._set_serial_baud_rate,
            Command.SET_PARAMETERS: self._set_parameters,
            Command.SAM_CONFIGURATION: self._sam_configuration,
            Command.POWER_DOWN: self._power_down,
            Command.RF_CONFIGURATION: self._rf_configuration,
            Command.IN_DATA_EXCHANGE: self._in_data_exchange,
            Command.IN_COMMUNICATE_THRU: self._in_communicate_thru,
            Command.IN_DESELECT: self._in_deselect,
            Command.IN_LIST_PASSIVE_TARGET: self._in_list_passive_target,
            Command.IN_RELEASE: self._in_release,
            Command.IN_SELECT: self._in_select,
        }

    # -- miscellaneous commands -----------------------------------------------------------

    def _diagnose(self, p: bytes) -> bytes:
        if not p:
            raise _SyntaxError("Diagnose needs NumTst")
        test = p[0]
        if test == 0x00:  # communication line test: NumTst and the data come back
            return bytes(p)
        if test in (0x01, 0x02, 0x07) and len(p) == 1:  # ROM, RAM, self antenna: all good
            return b"\x00"
        raise _SyntaxError(f"Diagnose test 0x{test:02X} is not emulated or malformed")

    def _get_firmware_version(self, p: bytes) -> bytes:
        _no_params(p, "GetFirmwareVersion")
        return FIRMWARE_VERSION

    def _get_general_status(self, p: bytes) -> bytes:
        _no_params(p, "GetGeneralStatus")
        out = bytearray((self._last_error, 0x00, len(self._targets)))  # Err, Field, NbTg
        for t in self.targets:
            out += bytes((t.tg, 0x00, 0x00, 0x00))  # Tg, BrRx, BrTx 106 kbps, type A
        out.append(0x00)  # SAM status
        return bytes(out)

    def _read_register(self, p: bytes) -> bytes:
        if not p or len(p) % 2:
            raise _SyntaxError("ReadRegister takes 2-byte addresses")
        return bytes(self._read_reg((p[i] << 8) | p[i + 1]) for i in range(0, len(p), 2))

    def _write_register(self, p: bytes) -> bytes:
        if not p or len(p) % 3:
            raise _SyntaxError("WriteRegister takes (address, value) triples")
        for i in range(0, len(p), 3):
            self._write_reg((p[i] << 8) | p[i + 1], p[i + 2])
        return b""

    def _read_gpio(self, p: bytes) -> bytes:
        _no_params(p, "ReadGPIO")
        return bytes((self._read_reg(SFR_P3), self._read_reg(SFR_P7), 0x00))

    def _write_gpio(self, p: bytes) -> bytes:
        if len(p) != 2:
            raise _SyntaxError("WriteGPIO takes P3 and P7")
        if p[0] & 0x80:
            self._registers[SFR_P3] = p[0] & 0x3F
        if p[1] & 0x80:
            self._registers[SFR_P7] = p[1] & 0x06
        return b""

    def _set_serial_baud_rate(self, p: bytes) -> bytes:
        if len(p) != 1 or p[0] > 0x08:
            raise _SyntaxError("SetSerialBaudRate takes one code 0x00..0x08")
        self._baud_code = p[0]  # a pty has no baud rate; remembered for GetGeneralStatus users
        return b""

    def _set_parameters(self, p: bytes) -> bytes:
        if len(p) != 1:
            raise _SyntaxError("SetParameters takes one Flags byte")
        self._parameters = p[0]
        return b""

    def _sam_configuration(self, p: bytes) -> bytes:
        if not 1 <= len(p) <= 3 or not 0x01 <= p[0] <= 0x04:
            raise _SyntaxError("SAMConfiguration takes Mode 1..4 [Timeout [IRQ]]")
        self._sam_mode = p[0]
        return b""

    def _power_down(self, p: bytes) -> bytes:
        if not 1 <= len(p) <= 2:
            raise _SyntaxError("PowerDown takes WakeUpEnable [GenerateIRQ]")
        self._wake_sources = p[0]
        self._sleep_after_answer = True  # the answer goes out first, then the chip sleeps
        return bytes((Status.OK,))

    def _go_to_sleep(self) -> None:
        self._asleep = True
        self._set_rf(False)
        self._codec.clear()
        logger.debug("PN532 emulator: PowerDown, wake-up sources 0x%02X", self._wake_sources)

    def _rf_configuration(self, p: bytes) -> bytes:
        if not p or _RF_ITEM_LENGTHS.get(p[0]) != len(p) - 1:
            raise _SyntaxError("RFConfiguration: unknown CfgItem or wrong data length")
        item, data = p[0], p[1:]
        if item == RFConfigItem.RF_FIELD:
            self._set_rf(bool(data[0] & 0x01))
        elif item == RFConfigItem.MAX_RETRIES:
            self._max_retries = bytes(data)
        elif item == RFConfigItem.MAX_RTY_COM:
            self._max_rty_com = data[0]
        return b""

    # -- registers ------------------------------------------------------------------------

    def _read_reg(self, address: int) -> int:
        value = self._registers.get(address, 0x00)
        if address == Register.CIU_CONTROL:
            return (value & ~LAST_BITS_MASK & 0xFF) | self._rx_last_bits
        if address == Register.CIU_STATUS2:
            value &= ~MF_CRYPTO1_ON & 0xFF
            return value | (MF_CRYPTO1_ON if self._cipher is not None else 0)
        return value

    def _write_reg(self, address: int, value: int) -> None:
        if address == Register.CIU_STATUS2 and not value & MF_CRYPTO1_ON:
            # the host switches the chip's cipher off (libnfc does so before re-selecting)
            self._cipher = None
        self._registers[address] = value

    # -- the RF side ----------------------------------------------------------------------

    def _set_rf(self, on: bool) -> None:
        if on and not self._rf_on:
            self.field.reset()  # cards power up: IDLE
        elif not on and self._rf_on:
            self.field.reset()  # cards lose power; the chip forgets its targets
            self._targets.clear()
            self._current = None
            self._cipher = None
        self._rf_on = on

    def _air(self, frame: BitFrame) -> BitFrame:
        """One reader frame on the air, and what the chip hears back."""
        if not self._rf_on or not frame:
            return SILENCE
        return self.field.transceive(frame)

    def _activate(self, uid: bytes | None, *, wakeup: bool = False) -> SelectedCard | None:
        """REQA/WUPA, anticollision and SELECT: one card, or None when none answered (or
        the answers made no sense, which to a reader is the same as no card)."""
        try:
            if uid is None:
                return select_card(self._air, wakeup=wakeup)
            return self._select_uid(uid, wakeup=wakeup)
        except CoreError as exc:
            logger.debug("PN532 emulator: activation failed: %s", exc)
            return None

    def _select_uid(self, uid: bytes, *, wakeup: bool) -> SelectedCard | None:
        """Select the card with this UID: REQA/WUPA, then SELECT at every cascade level with
        the whole UID CLn (no anticollision needed: every other card drops out)."""
        answer = self._air(short_frame(WUPA if wakeup else REQA))
        if answer.length != 18:
            return None
        atqa = split(answer)[0]
        levels = cascade_levels(uid)
        sak = 0
        for i, level in enumerate(levels):
            answer = self._air(select_frame(SEL_CODES[i], level))
            if not answer or answer.collision >= 0:
                return None
            sak = strip_crc(decode(answer))[0]
            if bool(sak & SAK_UID_INCOMPLETE) != (i < len(levels) - 1):
                return None
        return SelectedCard(bytes(uid), atqa, sak, levels)

    def _halt_current(self) -> None:
        """HLTA to the selected target (encrypted inside a Crypto1 session, as the CIU with
        MFCrypto1On sends it); the chip's session ends either way."""
        if self._current is None:
            return
        if self._cipher is not None:
            self._air(encrypt_frame(self._cipher, with_crc(bytes((HLTA, 0x00)))))
        else:
            self._air(HLTA_FRAME)
        self._cipher = None
        self._current = None

    def _switch_to(self, tg: int) -> bool:
        """Make target ``tg`` the selected one (the chip does this by itself when the host
        addresses a target that is not the current one): HLTA the current, WUPA, SELECT."""
        if self._current == tg:
            return True
        self._halt_current()
        self._ensure_rf()
        if self._activate(self._targets[tg].uid, wakeup=True) is None:
            return False
        self._current = tg
        return True

    def _ensure_rf(self) -> None:
        if not self._rf_on:
            self._set_rf(True)

    # -- InListPassiveTarget --------------------------------------------------------------

    def _in_list_passive_target(self, p: bytes) -> bytes | object:
        if len(p) < 2:
            raise _SyntaxError("InListPassiveTarget takes MaxTg BrTy [InitiatorData]")
        max_tg, brty, init = p[0], p[1], bytes(p[2:])
        if not 1 <= max_tg <= MAX_TARGETS:
            raise _SyntaxError(f"MaxTg {max_tg} (the PN532 lists 1 or 2 targets)")
        if brty > BRTY_MAX:
            raise _SyntaxError(f"BrTy 0x{brty:02X} unknown")
        if brty == BRTY_106A and init and len(init) not in (4, 7, 10):
            raise _SyntaxError(f"InitiatorData of {len(init)} bytes is not a UID")
        request = _ListRequest(max_tg, brty, init if brty == BRTY_106A and init else None)
        # listing starts afresh: the previous targets are forgotten and the chip's session
        # ends. No HLTA: a card still ACTIVE takes the REQA as an error and falls back to
        # IDLE, so the retry after it finds the card again, as with a real chip.
        self._targets.clear()
        self._current = None
        self._cipher = None
        self._ensure_rf()
        retries = self._max_retries[2]
        attempts = IMMEDIATE_LIST_ATTEMPTS if retries == RETRY_FOREVER else retries + 1
        for _ in range(min(attempts, IMMEDIATE_LIST_ATTEMPTS)):
            body = self._try_list(request)
            if body is not None:
                return body
        if retries == RETRY_FOREVER:
            self._pending = request
            return _PENDING
        return b"\x00"

    def _try_list(self, request: _ListRequest) -> bytes | None:
        """One activation round; the response body (NbTg + target data) or None."""
        if request.brty != BRTY_106A or not self._rf_on:
            return None  # only 106 kbps type A cards exist in this field
        first = self._activate(request.uid)
        if first is None:
            return None
        found = [first]
        self._current = 1
        if request.max_tg == 2 and request.uid is None:
            self._halt_current()  # so the next REQA finds another card
            second = self._activate(None)
            if second is not None:
                found.append(second)
                self._current = 2
        self._targets = {i: Target(i, c.uid, c.atqa, c.sak) for i, c in enumerate(found, start=1)}
        out = bytearray((len(found),))
        for tg, card in enumerate(found, start=1):
            # SENS_RES high byte first (a MIFARE Classic 1K reads 00 04), SEL_RES, NFCID1
            out += bytes((tg, card.atqa[1], card.atqa[0], card.sak, len(card.uid))) + card.uid
        return bytes(out)

    # -- InSelect / InDeselect / InRelease ----------------------------------------------------

    def _one_target_param(self, p: bytes, name: str) -> int:
        if len(p) != 1:
            raise _SyntaxError(f"{name} takes one Tg byte")
        return p[0]

    def _in_select(self, p: bytes) -> bytes:
        tg = self._one_target_param(p, "InSelect")
        if tg not in self._targets:
            status = Status.COMMAND_NOT_ACCEPTABLE
        else:
            status = Status.OK if self._switch_to(tg) else Status.TIMEOUT
        self._last_error = status
        return bytes((status,))

    def _in_deselect(self, p: bytes) -> bytes:
        tg = self._one_target_param(p, "InDeselect")
        if tg and tg not in self._targets:
            return bytes((Status.COMMAND_NOT_ACCEPTABLE,))
        if tg == 0 or tg == self._current:
            self._halt_current()
        return bytes((Status.OK,))

    def _in_release(self, p: bytes) -> bytes:
        tg = self._one_target_param(p, "InRelease")
        if tg and tg not in self._targets:
            return bytes((Status.COMMAND_NOT_ACCEPTABLE,))
        if tg == 0 or tg == self._current:
            self._halt_current()
        if tg == 0:
            self._targets.clear()
        else:
            self._targets.pop(tg, None)
        return bytes((Status.OK,))

    # -- InDataExchange: the chip's MIFARE Classic engine ----------------------------------

    def _in_data_exchange(self, p: bytes) -> bytes:
        if len(p) < 2:
            raise _SyntaxError("InDataExchange takes Tg and at least one data byte")
        tg, out = p[0] & 0x3F, bytes(p[1:])  # bit 6 of Tg is MI (chaining): not needed here
        status, data = self._data_exchange(tg, out)
        self._last_error = status
        return bytes((status,)) + data

    def _data_exchange(self, tg: int, out: bytes) -> tuple[int, bytes]:
        if tg not in self._targets:
            return Status.COMMAND_NOT_ACCEPTABLE, b""
        if not self._switch_to(tg):
            return Status.TIMEOUT, b""
        cmd = out[0]
        if cmd in (AUTH_A, AUTH_B):
            return self._mifare_auth(out), b""
        if cmd == WRITE and len(out) == _WRITE_LEN:
            status = self._expect_ack(self._send(out[:2]))
            if status == Status.OK:
                status = self._expect_ack(self._send(out[2:]))
            return status, b""
        if cmd in (INCREMENT, DECREMENT, RESTORE) and len(out) == _VALUE_LEN:
            status = self._expect_ack(self._send(out[:2]))
            if status != Status.OK:
                return status, b""
            answer = self._send(out[2:])
            # success is silence: the chip waits out its timeout and reports OK
            return (Status.OK if not answer else self._expect_ack(answer)), b""
        return self._expect_data(self._send(out))

    def _mifare_auth(self, out: bytes) -> int:
        if len(out) < _AUTH_LEN:
            return Status.INVALID_PARAMETER
        block, key, uid4 = out[1], out[2:8], out[8:12]  # the chip uses 4 UID bytes only
        reader = ClassicReader(self._air, uid4, nonce=self._nonce)
        reader.cipher = self._cipher  # inside a session the card expects a nested auth
        try:
            reader.authenticate(block, key, "A" if out[0] == AUTH_A else "B")
        except CoreError as exc:
            # MFAuthent either ends with MFCrypto1On set or not: wrong key, wrong key type,
            # no answer at all all end here, as 0x14
            logger.debug("PN532 emulator: MIFARE authentication failed: %s", exc)
            self._cipher = None
            return Status.MIFARE_AUTH_ERROR
        self._cipher = reader.cipher
        return Status.OK

    def _send(self, plain: bytes) -> BitFrame:
        """A MIFARE command frame with CRC_A, through the cipher when a session is open."""
        data = with_crc(plain)
        frame = encrypt_frame(self._cipher, data) if self._cipher else encode(data)
        return self._air(frame)

    def _expect_ack(self, answer: BitFrame) -> int:
        if not answer:
            return Status.TIMEOUT
        if answer.collision >= 0:
            return Status.COLLISION
        if answer.length != 4:
            return Status.DEP_INVALID_FORMAT
        code = decrypt_bits(self._cipher, answer) if self._cipher else answer.bits
        return Status.OK if code == MIFARE_ACK else Status.DEP_INVALID_FORMAT

    def _expect_data(self, answer: BitFrame) -> tuple[int, bytes]:
        if not answer or answer.length == 4:
            return self._expect_ack(answer), b""
        if answer.collision >= 0:
            return Status.COLLISION, b""
        if answer.length % 9:
            return Status.FRAMING_ERROR, b""
        try:
            data = decrypt_frame(self._cipher, answer) if self._cipher else decode(answer)
        except ParityError:
            return Status.PARITY_ERROR, b""
        try:
            return Status.OK, strip_crc(data)
        except CrcError:
            return Status.CRC_ERROR, b""

    # -- InCommunicateThru: raw frames, framing by the CIU registers ----------------------

    def _in_communicate_thru(self, p: bytes) -> bytes:
        if not p:
            raise _SyntaxError("InCommunicateThru takes at least one data byte")
        self._ensure_rf()
        answer = self._air(self._tx_frame(bytes(p)))
        status, data = self._rx_frame(answer)
        self._last_error = status
        return bytes((status,)) + data

    def _tx_frame(self, out: bytes) -> BitFrame:
        """The bits the CIU puts on the air for DataOut, by TxLastBits, ParityDisable,
        TxCRCEn and MFCrypto1On."""
        regs = self._registers
        tx_last = regs.get(Register.CIU_BIT_FRAMING, 0) & LAST_BITS_MASK
        tx_crc = regs.get(Register.CIU_TX_MODE, 0) & TX_CRC_EN
        if regs.get(Register.CIU_MANUAL_RCV, 0) & PARITY_DISABLE:
            # the bytes are the packed bit stream (the host's own parity bits included)
            frame = BitFrame.from_packed(out, tx_last or 8)
            if tx_crc and not tx_last:
                crc = int.from_bytes(crc_a(out), "little")
                frame = concat((frame, BitFrame(crc, 16)))
            return frame
        cipher = self._cipher
        if tx_last:
            whole, partial = out[:-1], out[-1] & ((1 << tx_last) - 1)
        else:
            whole, partial = (with_crc(out) if tx_crc else out), None
        head = SILENCE
        if whole:
            head = encrypt_frame(cipher, whole) if cipher else encode(whole)
        if partial is None:
            return head
        tail = encrypt_bits(cipher, partial, tx_last) if cipher else encode_bits(partial, tx_last)
        return concat((head, tail))

    def _rx_frame(self, answer: BitFrame) -> tuple[int, bytes]:
        """The card's answer as the CIU hands it over, with status, RxLastBits, CIU_Error
        and CIU_Coll updated."""
        regs = self._registers
        self._rx_last_bits = 0
        regs[Register.CIU_ERROR] = 0x00
        regs[Register.CIU_COLL] = COLL_VALUES_AFTER | COLL_POS_NOT_VALID
        if not answer:
            return Status.TIMEOUT, b""
        parity_off = regs.get(Register.CIU_MANUAL_RCV, 0) & PARITY_DISABLE
        if answer.collision >= 0:
            at = answer.collision if parity_off else answer.collision - answer.collision // 9
            regs[Register.CIU_COLL] = (at + 1) & 0x1F if at < 32 else COLL_POS_NOT_VALID
            regs[Register.CIU_ERROR] = ERR_COLL
            return Status.COLLISION, b""
        if parity_off:
            data, last = answer.to_packed()
            self._rx_last_bits = last % 8
        else:
            status, data = self._rx_with_parity(answer)
            if status != Status.OK:
                return status, b""
        if regs.get(Register.CIU_RX_MODE, 0) & RX_CRC_EN:
            try:
                if self._rx_last_bits:
                    raise CrcError("a frame with a partial last byte carries no CRC_A")
                data = strip_crc(data)
            except CrcError:
                regs[Register.CIU_ERROR] = ERR_CRC
                return Status.CRC_ERROR, b""
        return Status.OK, bytes(data)

    def _rx_with_parity(self, answer: BitFrame) -> tuple[int, bytes]:
        whole, rest = divmod(answer.length, 9)
        cipher = self._cipher
        try:
            if cipher is not None:
                if whole == 0:  # a 4-bit ACK/NACK
                    self._rx_last_bits = rest % 8
                    return Status.OK, bytes((decrypt_bits(cipher, answer),))
                if rest:
                    raise FrameError("encrypted frame with a partial last byte")
                return Status.OK, decrypt_frame(cipher, answer)
            data = decode(BitFrame(answer.bits & ((1 << 9 * whole) - 1), 9 * whole))
            if rest:
                data += bytes((answer.bits >> (9 * whole),))
                self._rx_last_bits = rest % 8
            return Status.OK, data
        except ParityError:
            self._registers[Register.CIU_ERROR] = ERR_PARITY
            return Status.PARITY_ERROR, b""
        except FrameError:
            self._registers[Register.CIU_ERROR] = ERR_PROTOCOL
            return Status.FRAMING_ERROR, b""


def _no_params(p: bytes, name: str) -> None:
    if p:
        raise _SyntaxError(f"{name} takes no parameters")
