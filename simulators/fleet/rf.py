"""The RF world of the fleet: every reader's PN532 emulator and every rider's card.

Each validator and bayi terminal is a real process talking to its own emulated PN532 over
its own pseudo-terminal. The emulators (:class:`simulators.pn532.Pn532Server`, the code
``afc sim reader`` runs) live here, in the orchestrator, each on its own thread, because
the cards must travel: a rider taps a card on bus 1's front door, then on bus 2 after a
transfer, then at a bayi. A card is one :class:`~simulators.cards.VirtualCard` object that
is placed in one reader's field at a time, exactly as a physical card moves between readers;
``afc sim reader`` processes could not share it (each keeps its own copy until it exits).

Faults that need the air: a *power cut mid-write* (the validator is killed at the n-th card
command that changes the card's memory, from inside the card, so the cut lands between two
commands of the tear-safe update), a *clone* (a second card with the same memory and UID)
and a *rollback* (a card's memory written back from an earlier dump).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from firmware.core.anticollision import Field, select_card
from firmware.core.keys import KeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import CardSnapshot, Purse
from simulators.cards import VirtualCard
from simulators.pn532 import Pn532Emulator, Pn532Server

from .errors import FleetError

__all__ = ["RfWorld", "read_snapshot"]

log = logging.getLogger("afc.fleet.rf")


def read_snapshot(card: VirtualCard, keys: KeyStore) -> CardSnapshot:
    """Read a card (not on any reader) in process with key A, as a validator would."""
    field = Field([card])
    field.reset()  # the card powers up afresh (it may have been halted by its last reader)
    selected = select_card(field.transceive)
    return Purse(ClassicReader(field.transceive, selected.uid), keys).read()


class RfWorld:
    """Readers (emulators on ptys) and the cards that move between them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.readers: dict[str, Pn532Server] = {}
        self._where: dict[int, str] = {}  # id(card) -> reader holding it
        self._lock = threading.Lock()
        self.rx: dict[str, int] = {}  # host writes each reader received (its host is alive)

    def add_reader(self, name: str) -> str:
        """Start an emulated PN532 for device ``name``; returns its pty path (a symlink)."""
        port = self.workdir / f"{name}.pn532"
        emulator = Pn532Emulator([])
        self.rx[name] = 0
        receive = emulator.receive

        def counting(data: bytes) -> bytes:  # the host's polls show it is alive
            self.rx[name] += 1
            return receive(data)

        emulator.receive = counting  # type: ignore[method-assign]
        server = Pn532Server(emulator, port=port)
        server.start()
        self.readers[name] = server
        return str(port)

    def wait_polls(self, name: str, polls: int, timeout: float, *,
                   since: int | None = None) -> bool:
        """Wait (bounded) until reader ``name`` received ``polls`` more host writes than
        ``since`` (default: now): its host is running and has looked at the field again."""
        target = (self.rx[name] if since is None else since) + polls
        deadline = time.monotonic() + timeout
        while self.rx[name] < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        for server in self.readers.values():
            server.stop()
        for name, server in self.readers.items():
            if not server.join(5.0):
                log.warning("reader emulator %s did not stop in time", name)
            server.close()

    def internal_errors(self) -> dict[str, int]:
        """Emulator handler bugs caught at the boundary (must stay 0)."""
        return {n: s.emulator.internal_errors for n, s in self.readers.items()
                if s.emulator.internal_errors}

    # -- cards in and out of fields -------------------------------------------------------

    def place(self, reader: str, card: VirtualCard) -> None:
        with self._lock:
            held = self._where.get(id(card))
            if held is not None and held != reader:
                raise FleetError(f"card {card!r} is still on reader {held}")
            self._where[id(card)] = reader
        self.readers[reader].place(card)

    def remove(self, reader: str, card: VirtualCard) -> None:
        self.readers[reader].remove(card)
        with self._lock:
            if self._where.get(id(card)) == reader:
                del self._where[id(card)]

    def where(self, card: VirtualCard) -> str | None:
        with self._lock:
            return self._where.get(id(card))

    # -- faults in the air ----------------------------------------------------------------

    @staticmethod
    def arm_power_cut(card: VirtualCard, nth_write: int, cut: Callable[[], None]) -> None:
        """Call ``cut`` (which kills the reader's host) right after the card executed the
        ``nth_write``-th command from now that changed its memory, before its answer goes
        out: the host dies between two commands of its update, the card keeps what it
        has. Disarms itself after firing."""
        original = card.handle
        state = {"writes": 0}

        def handle(frame):  # the card's air interface, observed
            before = bytes(card.memory)
            answer = original(frame)
            if bytes(card.memory) != before:
                state["writes"] += 1
                if state["writes"] == nth_write:
                    del card.handle  # back to the class method: disarmed
                    cut()
            return answer

        card.handle = handle  # type: ignore[method-assign]

    @staticmethod
    def disarm(card: VirtualCard) -> None:
        if "handle" in vars(card):
            del card.handle

    @staticmethod
    def clone(card: VirtualCard, label: str) -> VirtualCard:
        """A second card with the same UID and memory (what a card-cloning tool makes)."""
        return VirtualCard(card.uid, bytes(card.memory), card_type=card.card_type, label=label)

    @staticmethod
    def dump(card: VirtualCard) -> bytes:
        return bytes(card.memory)

    @staticmethod
    def write_back(card: VirtualCard, image: bytes) -> None:
        """Write an earlier dump back onto the card (a rolled-back purse)."""
        card.memory[:] = image
