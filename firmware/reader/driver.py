"""The PN532 driver: commands, card detection, and both ways of running MIFARE Classic.

:class:`Pn532` speaks the host protocol through :class:`~firmware.reader.codec.Pn532Codec`
over any :class:`~firmware.reader.transport.SerialTransport`, so it drives a real PN532 on
a UART and the emulator on a pty unchanged. Every exchange is bounded: an ACK is awaited for
``ack_timeout``, a response for the command's own timeout; a lost or corrupted frame is
retried a bounded number of times (NACK asks the chip to resend), and a command that times
out is aborted with an ACK so the chip is ready for the next one. Each failure ends in one
exception from :mod:`firmware.reader.errors` with a message a technician can act on, and
the driver stays usable afterwards: no restart needed.

MIFARE Classic runs in two modes, both behind :class:`firmware.core.mifare.ClassicAccess`:

* chip crypto (:class:`ChipCryptoClassic`): the PN532's own Crypto1 engine; the host sends
  plain MIFARE commands through InDataExchange, the key in the authentication command;
* transparent (:meth:`Pn532.transparent_classic`): the host runs Crypto1 (the core's
  :class:`~firmware.core.mifare.ClassicReader`) and the PN532, with CRC and parity handling
  switched off in its CIU registers, just moves bits through InCommunicateThru. This is how a
  front end without a Crypto1 engine is driven, and it keeps the keys out of the reader chip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from firmware.core.anticollision import masked_uid
from firmware.core.errors import (
    AuthenticationError,
    CodecError,
    NackError,
    NoResponseError,
)
from firmware.core.iso14443a import SILENCE, BitFrame
from firmware.core.mifare import (
    AUTH_A,
    AUTH_B,
    DECREMENT,
    HALT,
    INCREMENT,
    READ,
    RESTORE,
    TRANSFER,
    WRITE,
    ClassicReader,
    key_to_int,
)

from .codec import (
    ACK_FRAME,
    NACK_FRAME,
    Ack,
    BadFrame,
    ErrorFrame,
    Frame,
    Garbage,
    Nack,
    Pn532Codec,
    encode_command,
)
from .constants import (
    BRTY_106A,
    LAST_BITS_MASK,
    MF_CRYPTO1_ON,
    PARITY_DISABLE,
    RX_CRC_EN,
    STATUS_ERROR_MASK,
    TX_CRC_EN,
    Command,
    Register,
    RFConfigItem,
    Status,
    describe_status,
)
from .errors import (
    ApplicationError,
    CommandFailed,
    FrameFormatError,
    NoCard,
    ReaderNacked,
    ReaderTimeout,
)
from .transport import SerialTransport

log = logging.getLogger(__name__)

WAKEUP = b"\x55\x55" + bytes(14)  # HSU wake-up: 0x55s then a long enough preamble


@dataclass(frozen=True, slots=True)
class Target:
    """A card found by InListPassiveTarget (106 kbps type A)."""

    tg: int
    atqa: bytes  # SENS_RES as the PN532 reports it
    sak: int
    uid: bytes

    def masked_uid(self) -> str:
        """The UID for logs: only the last two bytes, so logs do not track card holders."""
        return masked_uid(self.uid)


class Pn532:
    """A PN532 on a byte transport."""

    def __init__(
        self,
        transport: SerialTransport,
        *,
        ack_timeout: float = 0.1,
        response_timeout: float = 1.0,
        retries: int = 2,
        infer_bit_counts: bool = True,
    ) -> None:
        self.transport = transport
        self.infer_bit_counts = infer_bit_counts
        self.codec = Pn532Codec.for_host()
        self.ack_timeout = ack_timeout
        self.response_timeout = response_timeout
        self.retries = retries
        self._registers: dict[int, int] = {}  # cache of CIU values this driver last wrote
        self._transparent = False

    @classmethod
    def open(cls, url: str, **kwargs) -> Pn532:
        """Open the reader at ``url`` (see :mod:`firmware.reader.transport`) and wake it."""
        reader = cls(SerialTransport(url), **kwargs)
        try:
            reader.wake_up()
        except Exception:
            reader.close()
            raise
        return reader

    def close(self) -> None:
        self.transport.close()

    def reconnect(self) -> None:
        """Reopen the same URL and wake the chip: what a validator does after
        :class:`ReaderUnavailable` or a run of timeouts (reader unplugged and plugged back,
        USB-UART re-enumerated) instead of restarting the application."""
        self.transport.close()
        self.transport = SerialTransport(self.transport.url)
        self.codec.clear()
        self._registers.clear()
        self._transparent = False
        self.wake_up()

    def __enter__(self) -> Pn532:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the exchange ---------------------------------------------------------------------

    def _next_event(self, deadline: float, stall: float | None = None):
        """The next event before ``deadline``; None at the deadline, or earlier when a
        frame has started and no byte arrived for ``stall`` seconds (its tail was lost)."""
        last_byte = time.monotonic()
        while True:
            event = self.codec.next_event()
            if event is not None:
                if isinstance(event, Garbage):
                    log.debug("skipped %d garbage bytes on the reader line", len(event.data))
                    continue
                return event
            until = deadline
            if stall is not None and self.codec.in_frame:
                until = min(deadline, last_byte + stall)
            data = self.transport.read(until)
            if not data:
                if time.monotonic() >= until:
                    return None
                continue
            last_byte = time.monotonic()
            self.codec.feed(data)

    def command(self, command: int, params: bytes = b"", *, timeout: float | None = None) -> bytes:
        """Send one command and return its response data (after the response code).

        Raises :class:`ReaderTimeout` when the chip stays silent, :class:`ReaderNacked` when
        the line keeps corrupting frames, :class:`ApplicationError` on the chip's error frame.
        """
        timeout = self.response_timeout if timeout is None else timeout
        frame = encode_command(command, params)
        name = _command_name(command)
        self.codec.clear()
        self.transport.discard_input()
        response: Frame | None = None
        for attempt in range(self.retries + 1):
            self.transport.write(frame)
            event = self._await_ack(time.monotonic() + self.ack_timeout)
            if isinstance(event, Ack):
                break
            if isinstance(event, Frame) and event.command == (command + 1) & 0xFF:
                response = event  # the ACK was lost on the line, the answer was not
                break
            if isinstance(event, ErrorFrame):
                raise ApplicationError(f"PN532 rejected {name}: error frame (bad parameters)")
            log.debug("no ACK for %s (attempt %d): %s", name, attempt + 1, event)
        else:
            if isinstance(event, Nack):
                raise ReaderNacked(
                    f"PN532 did not accept {name} after {self.retries + 1} tries: "
                    "the serial line corrupts frames (check cable and baud rate)"
                )
            raise ReaderTimeout(
                f"PN532 did not acknowledge {name}: no answer on {self.transport.url} "
                "(check power, cable and baud rate)"
            )
        if response is not None:
            return response.params
        deadline = time.monotonic() + timeout
        nacks = 0
        while True:
            # a frame that started but went quiet lost its tail: do not wait for the deadline
            event = self._next_event(deadline, stall=self.ack_timeout)
            if event is None:
                if self.codec.in_frame and nacks < self.retries:
                    nacks += 1
                    self.codec.clear()
                    self.transport.write(NACK_FRAME)  # ask the chip for its response again
                    continue
                if time.monotonic() < deadline:
                    continue
                self.transport.write(ACK_FRAME)  # abort the command so the chip is free
                raise ReaderTimeout(f"PN532 did not answer {name} within {timeout:.3g} s")
            if isinstance(event, Frame):
                if event.command != (command + 1) & 0xFF:
                    log.debug("ignored a response 0x%02X to another command", event.command)
                    continue
                return event.params
            if isinstance(event, ErrorFrame):
                raise ApplicationError(f"PN532 could not execute {name}: error frame")
            if isinstance(event, BadFrame):
                if nacks >= self.retries:
                    raise ReaderNacked(f"the response to {name} kept arriving corrupted")
                nacks += 1
                self.codec.clear()
                self.transport.write(NACK_FRAME)  # ask for the response again
                continue
            # a stray ACK/NACK while waiting for a response: ignore it

    def _await_ack(self, deadline: float):
        """The chip's answer to a command frame: ACK, NACK, its error frame or (the ACK lost)
        the response itself. Line noise and broken frames are skipped, not answered: the
        chip will still send its ACK. None at the deadline."""
        while True:
            event = self._next_event(deadline)
            if event is None or not isinstance(event, BadFrame):
                return event

    def wake_up(self) -> None:
        """Wake the chip (HSU) and leave SAM in normal mode, as every driver does first."""
        self.transport.write(WAKEUP)
        self.sam_configuration()

    # -- plain commands -------------------------------------------------------------------

    def firmware_version(self) -> tuple[int, int, int, int]:
        """(IC, Ver, Rev, Support); a PN532 is IC 0x32."""
        data = self.command(Command.GET_FIRMWARE_VERSION)
        if len(data) != 4:
            raise FrameFormatError(f"firmware version has 4 bytes, got {data.hex()}")
        return data[0], data[1], data[2], data[3]

    def sam_configuration(self, mode: int = 0x01, timeout: int = 0x14, irq: int = 0x01) -> None:
        self.command(Command.SAM_CONFIGURATION, bytes((mode, timeout, irq)))

    def set_max_retries(self, atr: int = 0xFF, psl: int = 0x01, passive: int = 0x01) -> None:
        """RFConfiguration MaxRetries: ``passive`` bounds how long InListPassiveTarget looks
        for a card (0xFF = forever, which a validator loop must never use)."""
        self.command(
            Command.RF_CONFIGURATION, bytes((RFConfigItem.MAX_RETRIES, atr, psl, passive))
        )

    def rf_field(self, on: bool) -> None:
        self.command(Command.RF_CONFIGURATION, bytes((RFConfigItem.RF_FIELD, 0x01 if on else 0)))

    def read_registers(self, *addresses: int) -> bytes:
        params = b"".join(a.to_bytes(2, "big") for a in addresses)
        data = self.command(Command.READ_REGISTER, params)
        if len(data) != len(addresses):
            raise FrameFormatError(
                f"ReadRegister returned {len(data)} values for {len(addresses)} registers"
            )
        return data

    def write_registers(self, values: dict[int, int]) -> None:
        if not values:
            return
        params = b"".join(a.to_bytes(2, "big") + bytes((v & 0xFF,)) for a, v in values.items())
        self.command(Command.WRITE_REGISTER, params)
        self._registers.update(values)

    def list_passive_targets(self, max_targets: int = 1) -> list[Target]:
        """Look for type A cards (106 kbps); an empty list when none answered.

        Anticollision needs the chip's own CRC and parity handling, so transparent mode is
        left first; :meth:`transparent_classic` enters it again for the card found.
        """
        if self._transparent:
            self.leave_transparent_mode()
        data = self.command(
            Command.IN_LIST_PASSIVE_TARGET, bytes((max_targets, BRTY_106A))
        )
        for register in self._MODE_REGISTERS:  # the chip's firmware may have changed them
            self._registers.pop(register, None)
        if not data:
            raise FrameFormatError("InListPassiveTarget response is empty")
        count, pos, targets = data[0], 1, []
        try:
            for _ in range(count):
                tg, atqa, sak, n = data[pos], data[pos + 1 : pos + 3], data[pos + 3], data[pos + 4]
                uid = data[pos + 5 : pos + 5 + n]
                if len(uid) != n:
                    raise IndexError
                pos += 5 + n
                if sak & 0x20 and pos < len(data):  # ISO 14443-4 card: ATS follows
                    pos += data[pos]
                targets.append(Target(tg, bytes(atqa), sak, bytes(uid)))
        except IndexError:
            raise FrameFormatError(
                f"InListPassiveTarget response is truncated: {data.hex()}"
            ) from None
        return targets

    def select(self) -> Target:
        """The one card in the field, or :class:`NoCard`."""
        targets = self.list_passive_targets(1)
        if not targets:
            raise NoCard("no card in the field")
        log.debug("card %s selected (SAK %02X)", targets[0].masked_uid(), targets[0].sak)
        return targets[0]

    def _status_command(self, command: int, params: bytes, timeout: float | None = None) -> bytes:
        data = self.command(command, params, timeout=timeout)
        if not data:
            raise FrameFormatError(f"{_command_name(command)} response has no status byte")
        status = data[0] & STATUS_ERROR_MASK
        if status != Status.OK:
            raise CommandFailed(
                status, f"{_command_name(command)} failed: {describe_status(status)}"
            )
        return data[1:]

    def data_exchange(self, tg: int, data: bytes, *, timeout: float | None = None) -> bytes:
        """InDataExchange: a command to target ``tg`` through the chip's protocol engine."""
        return self._status_command(Command.IN_DATA_EXCHANGE, bytes((tg,)) + data, timeout)

    def communicate_thru(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """InCommunicateThru: raw bytes to the card currently selected."""
        return self._status_command(Command.IN_COMMUNICATE_THRU, data, timeout)

    def release(self, tg: int = 0) -> None:
        """InRelease (0 = all targets): the chip forgets the card and its crypto session."""
        self._status_command(Command.IN_RELEASE, bytes((tg,)))

    def deselect(self, tg: int = 0) -> None:
        self._status_command(Command.IN_DESELECT, bytes((tg,)))

    def power_down(self) -> None:
        """PowerDown, woken again by HSU activity (the next command wakes it)."""
        self.command(Command.POWER_DOWN, bytes((0x10,)))  # wake-up enable: HSU

    # -- MIFARE Classic -------------------------------------------------------------------

    def chip_classic(self, target: Target) -> ChipCryptoClassic:
        """MIFARE Classic through the PN532's own Crypto1 engine."""
        if self._transparent:
            self.leave_transparent_mode()
        return ChipCryptoClassic(self, target)

    def transparent_classic(self, target: Target, **reader_kwargs) -> ClassicReader:
        """MIFARE Classic with host Crypto1: the core's reader over :meth:`transceive_bits`."""
        self.enter_transparent_mode()
        return ClassicReader(self.transceive_bits, target.uid, **reader_kwargs)

    _MODE_REGISTERS = (
        Register.CIU_TX_MODE,
        Register.CIU_RX_MODE,
        Register.CIU_MANUAL_RCV,
        Register.CIU_STATUS2,
    )

    def _mode_registers(self) -> tuple[int, int, int, int]:
        """The four mode registers, from the cache when this driver wrote them last."""
        if all(r in self._registers for r in self._MODE_REGISTERS):
            tx, rx, manual, status2 = (self._registers[r] for r in self._MODE_REGISTERS)
        else:
            tx, rx, manual, status2 = self.read_registers(*self._MODE_REGISTERS)
        return tx, rx, manual, status2

    def enter_transparent_mode(self) -> None:
        """CRC and parity handling off, the chip's Crypto1 off: bits pass through as given."""
        tx, rx, manual, status2 = self._mode_registers()
        self.write_registers(
            {
                Register.CIU_TX_MODE: tx & ~TX_CRC_EN,
                Register.CIU_RX_MODE: rx & ~RX_CRC_EN,
                Register.CIU_MANUAL_RCV: manual | PARITY_DISABLE,
                Register.CIU_STATUS2: status2 & ~MF_CRYPTO1_ON,
            }
        )
        self._transparent = True

    def leave_transparent_mode(self) -> None:
        """CRC and parity handling back on (what InListPassiveTarget and InDataExchange need)."""
        tx, rx, manual, _ = self._mode_registers()
        self.write_registers(
            {
                Register.CIU_TX_MODE: tx | TX_CRC_EN,
                Register.CIU_RX_MODE: rx | RX_CRC_EN,
                Register.CIU_MANUAL_RCV: manual & ~PARITY_DISABLE,
            }
        )
        self._transparent = False

    def transceive_bits(self, frame: BitFrame) -> BitFrame:
        """One raw frame through InCommunicateThru in transparent mode; SILENCE when the card
        did not answer.

        The chip must be told how many bits of the last byte to send (TxLastBits) and tells
        how many it received (RxLastBits). Written registers are cached, so a tap of
        standard frames costs one round trip per frame. The received bit count is inferred
        for the frames MIFARE Classic uses (a 4-bit ACK/NACK, or whole bytes with parity:
        for n received bytes exactly one of 8n-7..8n is a multiple of 9); anything else is
        read from RxLastBits.
        """
        data, last = frame.to_packed()
        tx_last = last & LAST_BITS_MASK  # 8 valid bits is written as 0
        if self._registers.get(Register.CIU_BIT_FRAMING) != tx_last:
            self.write_registers({Register.CIU_BIT_FRAMING: tx_last})
        try:
            answer = self.communicate_thru(data)
        except CommandFailed as exc:
            if exc.status == Status.TIMEOUT:
                return SILENCE
            raise
        if not answer:
            return SILENCE
        n = len(answer)
        length = 0
        if self.infer_bit_counts:
            multiple_of_9 = 9 * (8 * n // 9)
            if n == 1:
                length = 4
            elif multiple_of_9 >= 8 * n - 7:
                length = multiple_of_9
        if not length:
            (control,) = self.read_registers(Register.CIU_CONTROL)
            length = 8 * (n - 1) + ((control & LAST_BITS_MASK) or 8)
        return BitFrame.from_packed(answer, length - 8 * (n - 1))


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command 0x{command:02X}"


class ChipCryptoClassic:
    """MIFARE Classic through the PN532's Crypto1 engine (InDataExchange).

    The key travels to the reader chip in the authentication command; the chip keeps the
    session. A card NACK or a failed authentication both surface from the chip as a status
    error, after which the chip's session is gone: authenticate again.
    """

    def __init__(self, pn532: Pn532, target: Target) -> None:
        self.pn532 = pn532
        self.target = target
        self.uid = target.uid

    def _exchange(self, data: bytes, what: str) -> bytes:
        try:
            return self.pn532.data_exchange(self.target.tg, data)
        except CommandFailed as exc:
            if exc.status == Status.TIMEOUT:
                raise NoResponseError(f"card did not answer {what}: card removed") from exc
            if exc.status in (Status.MIFARE_AUTH_ERROR, Status.DEP_INVALID_FORMAT):
                # the chip reports a card's 4-bit NACK as "invalid received frame" (0x13)
                detail = describe_status(exc.status)
                raise NackError(0x4, f"card refused {what} ({detail})") from exc
            raise

    def authenticate(self, block: int, key: bytes | int, key_type: str = "A") -> None:
        kt = key_type.upper() if isinstance(key_type, str) else key_type
        if kt not in ("A", "B"):
            raise CodecError(f"key type must be A or B, not {key_type!r}")
        cmd = AUTH_A if kt == "A" else AUTH_B
        key_bytes = key_to_int(key).to_bytes(6, "big")
        try:
            self.pn532.data_exchange(
                self.target.tg, bytes((cmd, block)) + key_bytes + self.uid[-4:]
            )
        except CommandFailed as exc:
            if exc.status in (Status.MIFARE_AUTH_ERROR, Status.TIMEOUT):
                raise AuthenticationError(
                    f"authentication with key {kt} for block {block} failed: wrong key or "
                    f"key type ({describe_status(exc.status)})"
                ) from exc
            raise

    def read(self, block: int) -> bytes:
        data = self._exchange(bytes((READ, block)), f"READ block {block}")
        if len(data) != 16:
            raise FrameFormatError(f"READ of block {block} returned {len(data)} bytes")
        return data

    def write(self, block: int, data: bytes) -> None:
        if len(data) != 16:
            raise CodecError(f"a block has 16 bytes, not {len(data)}")
        self._exchange(bytes((WRITE, block)) + bytes(data), f"WRITE block {block}")

    def _value(self, cmd: int, name: str, block: int, operand: int) -> None:
        self._exchange(
            bytes((cmd, block)) + operand.to_bytes(4, "little", signed=True), f"{name} {block}"
        )

    def increment(self, block: int, amount: int) -> None:
        self._value(INCREMENT, "INCREMENT", block, amount)

    def decrement(self, block: int, amount: int) -> None:
        self._value(DECREMENT, "DECREMENT", block, amount)

    def restore(self, block: int) -> None:
        self._value(RESTORE, "RESTORE", block, 0)

    def transfer(self, block: int) -> None:
        self._exchange(bytes((TRANSFER, block)), f"TRANSFER {block}")

    def halt(self) -> None:
        """HLTA through the chip (the card stays silent, which the chip reports as a
        timeout: that is success here)."""
        try:
            self.pn532.data_exchange(self.target.tg, bytes((HALT, 0)))
        except CommandFailed as exc:
            if exc.status != Status.TIMEOUT:
                raise

    def reactivate(self) -> ChipCryptoClassic:
        """A new session with the same card after a failed authentication: the chip has no
        re-select of one target, so the RF field is cycled (the card powers down and comes
        back ready) and the card listed again, as ``afc card`` does at the office.

        :class:`NoResponseError` if the card left the reader or another one answers.
        """
        self.pn532.rf_field(False)
        self.pn532.rf_field(True)
        targets = self.pn532.list_passive_targets(1)
        if not targets or bytes(targets[0].uid) != bytes(self.uid):
            raise NoResponseError(
                f"card {masked_uid(self.uid)} left the reader during the tap"
            )
        return self.pn532.chip_classic(targets[0])
