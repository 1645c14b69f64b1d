"""What a rider or a dealer sees and hears: two display lines, an LED, a buzzer.

Applications talk to :class:`Ui` only, so the same loop drives a console in the lab, a
character LCD on a validator, or a recording UI in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Protocol, TextIO


class Signal(StrEnum):
    """Outcome classes with their own LED colour and beep pattern."""

    OK = "ok"  # green, one short beep
    INFO = "info"  # amber: accepted with a remark (expired discount, low balance)
    REJECT = "reject"  # red, two long beeps
    OUT_OF_SERVICE = "out_of_service"  # red steady, no beep


class Ui(Protocol):
    def show(self, line1: str, line2: str = "", signal: Signal = Signal.OK) -> None: ...


class ConsoleUi:
    """Prints the two display lines, prefixed with the LED colour, to a text stream."""

    COLOURS: ClassVar[dict[Signal, str]] = {
        Signal.OK: "GREEN", Signal.INFO: "AMBER", Signal.REJECT: "RED",
        Signal.OUT_OF_SERVICE: "RED",
    }

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, line1: str, line2: str = "", signal: Signal = Signal.OK) -> None:
        beep = {Signal.OK: "beep", Signal.INFO: "beep", Signal.REJECT: "beep-beep"}.get(signal, "")
        self.out.write(f"[{self.COLOURS[signal]:5}] {line1:<20} | {line2:<20} {beep}\n")
        self.out.flush()


@dataclass
class RecordingUi:
    """Keeps what was shown (for tests and the HIL reconciliation)."""

    shown: list[tuple[str, str, Signal]] = field(default_factory=list)

    def show(self, line1: str, line2: str = "", signal: Signal = Signal.OK) -> None:
        self.shown.append((line1, line2, signal))

    @property
    def last(self) -> tuple[str, str, Signal]:
        return self.shown[-1]
