"""The reader emulator's control protocol: one text command per line, a few reply lines.

A test rig, a scenario runner or a person at a terminal moves cards on and off the emulated
reader and arms faults on them while a validator talks to the reader. The protocol is a line
protocol on purpose: ``nc -U``, ``socat`` or a three-line Python client speak it, and a log
of it reads like a test script.

Every command gets zero or more information lines and then exactly one status line, either
``ok`` (maybe followed by a short message) or ``error: <why>``. Cards are numbered from 1 in
the order they were given (``--card`` options first, then ``add``)::

    help                       the command list
    list                       one "card N ..." line per card
    status                     the chip's state in one line
    place N|all                put card N (or every card) on the reader
    remove N|all               take card N (or every card) off the reader
    add SPEC                   load another card (a card spec); it starts off the reader
    fault N VERB [ARG...]      arm a fault on card N: card.faults.VERB(ARG...), VERB with
                               dashes for underscores, ARGs as numbers, true/false or
                               key=value keywords: "fault 1 tear-after 3",
                               "fault 1 tear-after 1 answer=false",
                               "fault 1 tear-in-write commit=true", "fault 1 clear"
    faults N                   the faults armed on card N, one line each
    quit                       close this control connection
    shutdown                   stop the emulator (card files are saved as on SIGTERM)

Cards without a ``faults`` attribute answer ``error: unsupported``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware.core.anticollision import Card
from firmware.core.errors import CoreError

from .emulator import Pn532Emulator

logger = logging.getLogger(__name__)

MAX_LINE = 4096  # longer control lines are refused (and the connection closed)

HELP = (
    "help | list | status | place N|all | remove N|all | add SPEC | "
    "fault N VERB [ARG...] | faults N | quit | shutdown"
)

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_WORD = re.compile(r"[a-z][a-z0-9_]*")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass
class Reply:
    """What a control command produced: information lines, the status line, and whether
    the connection should close / the server stop."""

    lines: list[str] = field(default_factory=list)
    close: bool = False
    shutdown: bool = False

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def parse_value(word: str) -> object:
    """A control-line argument as the fault API wants it: int, float, bool or the string."""
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    return _BOOLS.get(word.lower(), word)


class ControlHandler:
    """Runs control commands against one emulator and its list of known cards.

    ``card_factory`` turns a card spec into a card for ``add`` (the CLI passes
    ``simulators.cards.parse_card_spec``); without one, ``add`` is refused. It must be
    called from the thread that owns the emulator (the server's loop does).
    """

    def __init__(
        self,
        emulator: Pn532Emulator,
        cards: list[Card],
        *,
        card_factory: Callable[[str], Card] | None = None,
    ) -> None:
        self.emulator = emulator
        self.cards = cards
        self.card_factory = card_factory

    def handle(self, line: str) -> Reply:
        """Run one command line; never raises (bad input is an ``error:`` reply)."""
        words = line.split()
        if not words:
            return Reply(["error: empty command (try 'help')"])
        verb, args = words[0].lower(), words[1:]
        try:
            handler = getattr(self, f"_cmd_{verb}", None)
            if handler is None:
                return Reply([f"error: unknown command {verb!r} (try 'help')"])
            return handler(args)
        except _Refused as exc:
            return Reply([f"error: {exc}"])
        except (CoreError, ValueError, TypeError) as exc:
            return Reply([f"error: {exc}"])

    # -- commands ---------------------------------------------------------------------------

    def _cmd_help(self, args: list[str]) -> Reply:
        return Reply([HELP, "ok"])

    def _cmd_list(self, args: list[str]) -> Reply:
        _arity(args, 0, "list")
        lines = [self._describe(i, c) for i, c in enumerate(self.cards, start=1)]
        return Reply([*lines, f"ok {len(self.cards)} card(s)"])

    def _cmd_status(self, args: list[str]) -> Reply:
        _arity(args, 0, "status")
        st = self.emulator.status()
        targets = ",".join(f"{tg}:{uid}" for tg, uid in st["targets"]) or "-"  # type: ignore[attr-defined]
        return Reply(
            [
                f"ok asleep={int(bool(st['asleep']))} rf={int(bool(st['rf']))} "
                f"pending={int(bool(st['pending']))} cards_in_field={st['cards']} "
                f"targets={targets} crypto1={int(bool(st['crypto1']))} "
                f"last_error=0x{st['last_error']:02X}"
            ]
        )

    def _cmd_place(self, args: list[str]) -> Reply:
        _arity(args, 1, "place N|all")
        for card in self._select(args[0]):
            self.emulator.place_card(card)
        return Reply(["ok"])

    def _cmd_remove(self, args: list[str]) -> Reply:
        _arity(args, 1, "remove N|all")
        for card in self._select(args[0]):
            self.emulator.remove_card(card)
        return Reply(["ok"])

    def _cmd_add(self, args: list[str]) -> Reply:
        if len(args) != 1:
            raise _Refused("usage: add SPEC (one card spec, no spaces)")
        if self.card_factory is None:
            raise _Refused("this emulator cannot load cards (no card factory)")
        self.cards.append(self.card_factory(args[0]))
        return Reply([f"ok card {len(self.cards)}"])

    def _cmd_fault(self, args: list[str]) -> Reply:
        if len(args) < 2:
            raise _Refused("usage: fault N VERB [ARG...]")
        (card,) = self._select(args[0], allow_all=False)
        faults = getattr(card, "faults", None)
        verb = args[1].lower().replace("-", "_")
        method = getattr(faults, verb, None) if _WORD.fullmatch(verb) else None
        if faults is None or not callable(method):
            raise _Refused(f"unsupported: card {args[0]} has no fault {args[1]!r}")
        positional: list[object] = []
        keywords: dict[str, object] = {}
        for word in args[2:]:
            key, sep, value = word.partition("=")
            if sep:
                keywords[key.replace("-", "_")] = parse_value(value)
            else:
                positional.append(parse_value(word))
        result = method(*positional, **keywords)
        logger.info("control: card %s fault %s armed", args[0], " ".join(args[1:]))
        if isinstance(result, list | tuple):
            return Reply([*(str(x) for x in result), "ok"])
        return Reply(["ok" if result is None else f"ok {result}"])

    def _cmd_faults(self, args: list[str]) -> Reply:
        _arity(args, 1, "faults N")
        (card,) = self._select(args[0], allow_all=False)
        describe = getattr(getattr(card, "faults", None), "describe", None)
        if not callable(describe):
            raise _Refused(f"unsupported: card {args[0]} has no faults")
        return Reply([*(str(x) for x in describe()), "ok"])

    def _cmd_quit(self, args: list[str]) -> Reply:
        return Reply(["ok bye"], close=True)

    def _cmd_shutdown(self, args: list[str]) -> Reply:
        return Reply(["ok shutting down"], close=True, shutdown=True)

    # -- helpers ----------------------------------------------------------------------------

    def _select(self, which: str, *, allow_all: bool = True) -> list[Card]:
        if allow_all and which.lower() == "all":
            return list(self.cards)
        if not _INT.fullmatch(which) or not 1 <= int(which) <= len(self.cards):
            raise _Refused(f"no card {which!r} (cards are numbered 1..{len(self.cards)})")
        return [self.cards[int(which) - 1]]

    def _describe(self, number: int, card: Card) -> str:
        in_field = any(c is card for c in self.emulator.cards)
        if not in_field:
            state = "removed"
        elif getattr(card, "in_field", True):
            state = "placed"
        else:
            state = "torn"  # on the reader but out of the field after a tear fault
        uid = getattr(card, "uid", b"")
        card_type = getattr(card, "card_type", None)
        if card_type is None:  # a bare ClassicTag keeps it on its Classic layer
            card_type = getattr(getattr(card, "card", None), "card_type", None)
        kind = getattr(card_type, "value", "?")
        path = getattr(card, "path", None)
        extra = f" file={path}" if path else ""
        return f"card {number} uid={bytes(uid).hex().upper()} type={kind} state={state}{extra}"


class _Refused(Exception):
    """A control command that cannot run as given."""


def _arity(args: list[str], n: int, usage: str) -> None:
    if len(args) != n:
        raise _Refused(f"usage: {usage}")
