"""Where an application gets its cards from: a PN532 (real or emulated) or an in-process field.

Both give a :class:`~firmware.core.mifare.ClassicAccess` for the card in the field, so the
validator and top-up loops, the benchmarks and the tests run the same code whatever the
hardware. The validator must not process a card again while it is still lying on the reader:
:class:`CardSource` implementations report a card once per arrival.
"""

from __future__ import annotations

import os
from typing import Protocol

from firmware.core.anticollision import Field, select_card
from firmware.core.errors import CoreError
from firmware.core.mifare import ClassicAccess, ClassicReader


class CardSource(Protocol):
    def next_card(self) -> ClassicAccess | None:
        """The card that just arrived in the field, or None (no card, or the same card as
        before still lying there)."""

    def forget(self) -> None:
        """Forget the last card, so that it counts as a new arrival (it was tapped again)."""


class FieldCardSource:
    """Cards in an in-process RF field (virtual cards), with host Crypto1: the benchmark's
    and the unit tests' reader."""

    def __init__(self, field: Field, *, nonce=None) -> None:
        self.field = field
        self._nonce = nonce or (lambda: int.from_bytes(os.urandom(4), "big"))

    def next_card(self) -> ClassicAccess | None:
        self.field.reset()  # every call is a fresh arrival of whatever is in the field
        try:
            selected = select_card(self.field.transceive)
        except CoreError:
            return None
        return ClassicReader(self.field.transceive, selected.uid, nonce=self._nonce)

    def forget(self) -> None:
        pass


class Pn532CardSource:
    """Cards through a PN532 in chip-crypto or transparent mode.

    A card is reported when it arrives; while it stays on the reader (selected again at the
    next poll with the same UID) it is not reported again. Cycling the RF field between
    polls powers the card down, so a card left on the reader comes back in IDLE and is seen
    again as "still there" rather than lost.
    """

    def __init__(self, pn532, mode: str = "transparent") -> None:
        if mode not in ("chip", "transparent"):
            raise ValueError(f"mode must be 'chip' or 'transparent', not {mode!r}")
        self.pn532 = pn532
        self.mode = mode
        self._present: bytes | None = None

    def next_card(self) -> ClassicAccess | None:
        pn = self.pn532
        pn.rf_field(False)
        pn.rf_field(True)
        targets = pn.list_passive_targets(1)
        if not targets:
            self._present = None
            return None
        target = targets[0]
        if target.uid == self._present:
            return None
        self._present = target.uid
        if self.mode == "chip":
            return pn.chip_classic(target)
        return pn.transparent_classic(target)

    def forget(self) -> None:
        self._present = None
