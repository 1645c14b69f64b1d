"""Independent PN532 clients against the emulator: drivers we did not write, used unchanged.

The PN532 emulator must be faithful enough that any well-behaved PN532 driver works against
it, not only ours. Three drivers from PyPI, written by different people in different styles,
each drive ``afc sim reader`` on a pseudo-terminal (started with :class:`ReaderEmulatorProcess`)
through pyserial, exactly as they would drive a real PN532 on a UART:

* ``pn532pi`` (the Seeed/Adafruit Arduino driver ported to Python): its HSU interface writes
  every frame in pieces behind a ``55 00 00 55`` wake-up preamble and waits only 10 ms for
  the ACK. GetFirmwareVersion, SAMConfiguration, InListPassiveTarget, and MIFARE Classic
  authenticate / write / read through InDataExchange.
* ``adafruit-circuitpython-pn532`` (Adafruit's CircuitPython driver, which runs on CPython
  through Blinka): whole frames, a long ``55 55 00 ...`` wake-up, fixed-length reads that
  skip leading zeros. Same operations, its own code.
* ``nfcpy``: the most demanding of the three. Its PN532 probe and set-up use extended
  information frames (a 263-byte Diagnose line test), SetSerialBaudrate, SetParameters, seven
  RFConfiguration items, ReadRegister/WriteRegister of CIU registers and PowerDown on close.
  nfcpy has no MIFARE Classic (Crypto1) support, so it only detects the card.

Each case checks what the library reports against the emulator's side of the truth: the UID
of the virtual card (created here with ``simulators.cards``), the bytes written (read back
through the library, and for a card file, from the file the emulator saves on exit), and
that a wrong key fails authentication the way the library reports it.

Every wait is bounded: the libraries' own timeouts are at most about a second per command,
the emulator has 10 s to start, and a SIGALRM limit ends any test after 20 s and the whole
file after 50 s (a normal run takes about 5 s).
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import serial

from firmware.core.classic_layout import CardType
from simulators.cards.virtual import VirtualCard, random_uid
from simulators.rig import ReaderEmulatorProcess

BLOCK = 4  # first data block of sector 1: free for data on a factory-fresh card
TRANSPORT_KEY = bytes.fromhex("FFFFFFFFFFFF")  # key A of a factory-fresh card
WRONG_KEY = bytes.fromhex("A0A1A2A3A4A5")  # a key the card does not hold (the MAD key)
BAUD = 115200
TEST_TIME_LIMIT = 20.0  # seconds per test; a normal run takes under one
FILE_TIME_BUDGET = 50.0  # seconds for all the tests of this file together (normally ~5)
START_TIMEOUT = 10.0  # seconds for the emulator to create its port

# Expected GetFirmwareVersion answer of a PN532 (user manual §7.2.2): IC, Ver, Rev, Support
PN532_IC, PN532_VER, PN532_REV = 0x32, 0x01, 0x06
SUPPORT_ISO14443A = 0x01  # Support bit 0: ISO/IEC 14443 type A (bit 1: type B, bit 2:
# ISO 18092). pn532pi's Pn532FirmwareInfo has bits 0 and 1 swapped, so its own
# iso14443_a flag is not used here.


# -- the emulated card ----------------------------------------------------------------------


@dataclass(frozen=True)
class CardCase:
    """How the card is put on the emulated reader, and how the line is timed."""

    uid_size: int
    from_file: bool  # a JSON card file (checked again after the emulator saved it on exit)
    baud_timing: bool  # the emulator paces its answers like a 115200-baud UART


CARD_CASES = [
    pytest.param(CardCase(4, from_file=True, baud_timing=False), id="1k-uid4-card-file"),
    pytest.param(CardCase(7, from_file=False, baud_timing=True), id="1k-uid7-baud-timing"),
]


@dataclass
class EmulatedCard:
    uid: bytes
    spec: str  # the --card argument
    file: Path | None
    extra_args: list[str]


@pytest.fixture
def card(request: pytest.FixtureRequest, tmp_path: Path) -> EmulatedCard:
    case: CardCase = request.param
    rng = random.Random(secrets.randbits(64))
    extra = ["--verbose"] + (["--baud-timing"] if case.baud_timing else [])
    if case.from_file:
        virtual = VirtualCard.new(CardType.CLASSIC_1K, uid_size=case.uid_size, rng=rng)
        path = virtual.save(tmp_path / "card.json")
        return EmulatedCard(virtual.uid, str(path), path, extra)
    uid = random_uid(rng, case.uid_size)
    return EmulatedCard(uid, f"new:1k:uid={uid.hex()}", None, extra)


@contextlib.contextmanager
def running_emulator(card: EmulatedCard, tmp_path: Path) -> Iterator[ReaderEmulatorProcess]:
    """``afc sim reader`` with this card; its frame log is printed (shown on failure)."""
    emulator = ReaderEmulatorProcess(
        tmp_path / "pn532", [card.spec], extra_args=card.extra_args, start_timeout=START_TIMEOUT
    )
    with emulator:
        try:
            yield emulator
        finally:
            print(f"--- emulator log (card UID {card.uid.hex()}) ---")
            print(emulator.stderr_text()[-20000:])
    assert emulator.proc is not None and emulator.proc.returncode == 0, (
        f"the emulator exited with {emulator.proc.returncode if emulator.proc else None}"
    )


def check_saved_block(card: EmulatedCard, data: bytes) -> None:
    """After the emulator stopped (saving its cards), the card file holds what was written."""
    if card.file is None:
        return
    saved = VirtualCard.from_file(card.file)
    assert saved.uid == card.uid
    assert saved.block(BLOCK) == data, "the write did not reach the card file"


def auth_uid(uid: bytes) -> bytes:
    """The 4 UID bytes a MIFARE Classic authentication uses: the whole UID of a 4-byte card,
    the last 4 bytes of a 7-byte one (NXP AN10927; libnfc and most drivers do the same)."""
    return uid[-4:]


# -- bounded time and a look at the line ---------------------------------------------------


@pytest.fixture(scope="module")
def file_deadline() -> float:
    return time.monotonic() + FILE_TIME_BUDGET


@pytest.fixture(autouse=True)
def time_limit(file_deadline: float) -> Iterator[None]:
    """SIGALRM ends a test that hangs: after TEST_TIME_LIMIT, or when the file's budget is
    spent, whichever comes first (an exception raised in the main thread, where pytest runs
    the test, interrupts any blocking serial read)."""
    limit = min(TEST_TIME_LIMIT, file_deadline - time.monotonic())
    if limit <= 0:
        pytest.fail(f"the {FILE_TIME_BUDGET} s budget of this file is spent")

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"test exceeded its time limit ({limit:.1f} s)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TracingSerial(serial.Serial):
    """A pyserial port that remembers what went each way, to print when a test fails.

    The library under test gets this object where it would get ``serial.Serial``; reads
    and writes go through unchanged."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.trace: list[tuple[str, bytes]] = []
        super().__init__(*args, **kwargs)

    def write(self, data: bytes) -> int | None:
        self._note("host > chip", bytes(data))
        return super().write(data)

    def read(self, size: int = 1) -> bytes:
        data = super().read(size)
        self._note("chip > host", bytes(data))
        return data

    def _note(self, direction: str, data: bytes) -> None:
        if not data:
            return
        if self.trace and self.trace[-1][0] == direction:
            self.trace[-1] = (direction, self.trace[-1][1] + data)
        else:
            self.trace.append((direction, data))

    def dump(self) -> str:
        return "\n".join(f"{d}: {b.hex(' ')}" for d, b in self.trace)


@contextlib.contextmanager
def printed_trace(line: TracingSerial, library: str) -> Iterator[None]:
    try:
        yield
    finally:
        print(f"--- the line as {library} saw it ---")
        print(line.dump())
        with contextlib.suppress(Exception):
            line.close()


def import_or_skip(what: str, importer):
    try:
        return importer()
    except Exception as exc:  # an import that fails in any way: ImportError, Blinka's errors
        pytest.skip(
            f"{what} does not import here ({type(exc).__name__}: {exc}); it is a dev "
            "dependency: pip install -e '.[dev]'"
        )


# -- pn532pi ------------------------------------------------------------------------------


@pytest.fixture
def pn532pi(monkeypatch: pytest.MonkeyPatch):
    def load():
        from pn532pi.interfaces import pn532hsu
        from pn532pi.nfc import pn532

        return pn532hsu, pn532

    pn532hsu, pn532 = import_or_skip("pn532pi", load)
    # pn532pi waits 10 ms for each ACK (its Arduino ancestor's figure). A real PN532 ACKs
    # within about a millisecond, and so does the emulator, but it runs here as a separate
    # Python process on a shared CI machine where scheduling alone can take longer. 100 ms
    # is what nfcpy allows; the protocol is untouched.
    monkeypatch.setattr(pn532hsu, "PN532_ACK_WAIT_TIME", 100)
    return pn532hsu, pn532


def pn532pi_on(pn532hsu, path: Path):
    """pn532pi's own HSU interface on a device path.

    ``Pn532Hsu.__init__`` only accepts the Raspberry Pi's ``/dev/serial0`` or
    ``/dev/serial1``; this subclass changes nothing but the path. Wake-up, framing, ACK and
    response parsing are the library's own code."""

    class Pn532HsuOnPath(pn532hsu.Pn532Hsu):
        def __init__(self, port: str) -> None:
            # like the original: a closed port that begin() opens
            self._serial = TracingSerial(baudrate=BAUD, timeout=0.1)
            self._serial.port = port
            self.command = 0

    return Pn532HsuOnPath(str(path))


@pytest.mark.parametrize("card", CARD_CASES, indirect=True)
def test_pn532pi_detects_authenticates_writes_and_reads(
    pn532pi, card: EmulatedCard, tmp_path: Path
) -> None:
    pn532hsu, pn532 = pn532pi
    data = secrets.token_bytes(16)
    with running_emulator(card, tmp_path) as emulator:
        interface = pn532pi_on(pn532hsu, emulator.port)
        with printed_trace(interface._serial, "pn532pi"):
            nfc = pn532.Pn532(interface)
            nfc.begin()

            info = nfc.getFirmwareInfo()
            assert (info.ic_version, info.fw_major, info.fw_minor) == (
                PN532_IC,
                PN532_VER,
                PN532_REV,
            ), info
            assert info.support_opts & SUPPORT_ISO14443A, info
            assert nfc.SAMConfig()

            found, uid = nfc.readPassiveTargetID(pn532.PN532_MIFARE_ISO14443A_106KBPS, 1000)
            assert found, "pn532pi found no card"
            assert bytes(uid) == card.uid

            key_a = 0  # pn532pi: 0 = key A, 1 = key B
            assert nfc.mifareclassic_AuthenticateBlock(
                bytearray(auth_uid(uid)), BLOCK, key_a, bytearray(TRANSPORT_KEY)
            ), "authentication with the transport key failed"
            assert nfc.mifareclassic_WriteDataBlock(BLOCK, bytearray(data))
            ok, read = nfc.mifareclassic_ReadDataBlock(BLOCK)
            assert ok, "read after write failed"
            assert bytes(read) == data

            # a wrong key: pn532pi reports False (the chip's status byte is not 00), and the
            # card, no longer authenticated, does not let the next read through
            assert not nfc.mifareclassic_AuthenticateBlock(
                bytearray(auth_uid(uid)), BLOCK, key_a, bytearray(WRONG_KEY)
            ), "authentication with a wrong key succeeded"
            ok, _ = nfc.mifareclassic_ReadDataBlock(BLOCK)
            assert not ok, "a read went through after a failed authentication"
    check_saved_block(card, data)


# -- adafruit-circuitpython-pn532 ---------------------------------------------------------


@pytest.fixture
def adafruit_pn532():
    def load():
        from adafruit_pn532 import adafruit_pn532 as core
        from adafruit_pn532.uart import PN532_UART

        return core, PN532_UART

    return import_or_skip("adafruit-circuitpython-pn532", load)


@pytest.mark.parametrize("card", CARD_CASES, indirect=True)
def test_adafruit_pn532_detects_authenticates_writes_and_reads(
    adafruit_pn532, card: EmulatedCard, tmp_path: Path
) -> None:
    core, PN532_UART = adafruit_pn532
    data = secrets.token_bytes(16)
    with running_emulator(card, tmp_path) as emulator:
        # PN532_UART takes any UART object with read/write/in_waiting/reset_input_buffer:
        # a pyserial port is one, so the library is used exactly as published
        line = TracingSerial(str(emulator.port), BAUD, timeout=0.1)
        with printed_trace(line, "adafruit-circuitpython-pn532"):
            reader = PN532_UART(line)  # wakes the chip, SAMConfiguration, firmware version

            ic, ver, rev, support = reader.firmware_version
            assert (ic, ver, rev) == (PN532_IC, PN532_VER, PN532_REV)
            assert support & SUPPORT_ISO14443A
            sam = reader.call_function(0x14, params=[0x01, 0x14, 0x01])  # SAMConfiguration
            assert sam is not None and len(sam) == 0, sam

            uid = reader.read_passive_target(timeout=1.0)
            assert uid is not None, "adafruit-circuitpython-pn532 found no card"
            assert bytes(uid) == card.uid

            assert reader.mifare_classic_authenticate_block(
                auth_uid(bytes(uid)), BLOCK, core.MIFARE_CMD_AUTH_A, TRANSPORT_KEY
            ), "authentication with the transport key failed"
            assert reader.mifare_classic_write_block(BLOCK, data)
            assert bytes(reader.mifare_classic_read_block(BLOCK) or b"") == data

            assert not reader.mifare_classic_authenticate_block(
                auth_uid(bytes(uid)), BLOCK, core.MIFARE_CMD_AUTH_A, WRONG_KEY
            ), "authentication with a wrong key succeeded"
            assert reader.mifare_classic_read_block(BLOCK) is None, (
                "a read went through after a failed authentication"
            )

            # the card is still there: a new activation and the right key work again
            assert bytes(reader.read_passive_target(timeout=1.0) or b"") == card.uid
            assert reader.mifare_classic_authenticate_block(
                auth_uid(bytes(uid)), BLOCK, core.MIFARE_CMD_AUTH_A, TRANSPORT_KEY
            )
            assert bytes(reader.mifare_classic_read_block(BLOCK) or b"") == data
    check_saved_block(card, data)


# -- nfcpy ----------------------------------------------------------------------------------


@pytest.fixture
def nfcpy(caplog: pytest.LogCaptureFixture):
    def load():
        import nfc
        import nfc.clf
        import nfc.clf.pn532
        import nfc.clf.transport

        return nfc

    nfc = import_or_skip("nfcpy", load)
    caplog.set_level(logging.DEBUG - 1, logger="nfc")  # nfcpy logs every frame at this level
    return nfc


@pytest.mark.parametrize("card", CARD_CASES, indirect=True)
def test_nfcpy_detects_the_card(nfcpy, card: EmulatedCard, tmp_path: Path) -> None:
    nfc = nfcpy
    with running_emulator(card, tmp_path) as emulator:
        # nfcpy's "tty:NAME:pn532" paths only name devices directly under /dev (NAME may
        # not contain '/'), so it cannot name a pty's symlink. nfc.clf.device.connect()
        # does exactly these two calls for such a path: the TTY transport on the device,
        # then the PN532 driver's init (probe, SAMConfiguration, baud rate, line test,
        # RF set-up). Nothing of the driver is replaced.
        transport = nfc.clf.transport.TTY(str(emulator.port))
        try:
            device = nfc.clf.pn532.init(transport)
        except BaseException:
            transport.close()
            raise
        clf = nfc.ContactlessFrontend()
        clf.device = device
        try:
            assert device.chipset_name == f"PN5{PN532_IC:02x}v{PN532_VER}.{PN532_REV}"
            ic, ver, rev, support = device.chipset.get_firmware_version()
            assert (ic, ver, rev) == (PN532_IC, PN532_VER, PN532_REV)
            assert support & SUPPORT_ISO14443A

            target = clf.sense(nfc.clf.RemoteTarget("106A"), iterations=3, interval=0.1)
            assert target is not None, "nfcpy sensed no type A target"
            assert bytes(target.sdd_res) == card.uid
            # SAK 08 (MIFARE Classic 1K); ATQA 0004 or 0044 (single or double size UID),
            # which nfcpy shows low byte first
            assert bytes(target.sel_res) == b"\x08"
            assert bytes(target.sens_res) == (b"\x04\x00" if len(card.uid) == 4 else b"\x44\x00")
        finally:
            clf.close()  # SetSerialBaudrate 115200 and PowerDown, as on a real reader
