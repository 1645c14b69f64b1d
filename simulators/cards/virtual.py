"""A virtual MIFARE Classic card: what the reader emulator and the in-process rigs put in
their RF field.

:class:`VirtualCard` wraps the core's :class:`~firmware.core.mifare.ClassicTag` (activation
layer and Classic protocol, access bits enforced) and adds what a test rig needs around it:
a file it was loaded from and saves back to, being in or out of the field, and the faults of
:mod:`.faults`. It satisfies the ``Card`` protocol of :class:`firmware.core.anticollision.Field`
(``handle`` and ``reset``), and ``handle`` always returns a :class:`BitFrame`, never ``None``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path

from firmware.core.classic_layout import BLOCK_SIZE, CardType, factory_memory
from firmware.core.crypto1 import Crypto1
from firmware.core.errors import FrameError
from firmware.core.iso14443a import CASCADE_TAG, SILENCE, BitFrame
from firmware.core.mifare import (
    CardState,
    CipherFactory,
    ClassicTag,
    TagNonces,
    classic_tag_frame,
)

from ..errors import CardFileError
from .faults import CardCounters, CardFaults
from .files import (
    CardImage,
    card_type_for_size,
    check_image,
    check_uid,
    format_for_path,
    load_card_image,
    masked_uid,
    save_card_image,
)

log = logging.getLogger(__name__)

NXP_MANUFACTURER = 0x04
"""UID0 of a 7-byte UID is the manufacturer code (ISO/IEC 7816-6); NXP's is 0x04."""


def random_uid(rng: random.Random, size: int = 4) -> bytes:
    """A random UID a real MIFARE Classic could have.

    4 bytes: any first byte but ``x8`` — 0x88 is the cascade tag, 0x08 announces a random
    per-session ID and the other ``x8`` values are reserved (ISO/IEC 14443-3). 7 bytes: NXP's
    manufacturer byte 0x04 first, and never the cascade tag as the 4th byte.
    """
    if size == 4:
        while True:
            uid = rng.randbytes(4)
            if uid[0] & 0x0F != 0x08:
                return uid
    if size == 7:
        while True:
            uid = bytes([NXP_MANUFACTURER]) + rng.randbytes(6)
            if uid[3] != CASCADE_TAG:
                return uid
    raise CardFileError(f"a MIFARE Classic UID has 4 or 7 bytes, not {size!r}")


class VirtualCard:
    """A MIFARE Classic 1K/4K card on the air, with its file and its faults.

    ``memory`` is copied; :attr:`memory` is then the live EEPROM the card reads and writes.
    ``rng`` seeds everything random the card does (its nonces and the faults' choices), so
    a seeded card replays the same session bit for bit. ``path``/``file_format`` are where
    :meth:`save` writes by default.

    Being out of the field is a state of the card, not of the field it was placed in: after
    a tear the card hears nothing and says nothing (:data:`SILENCE`) until :meth:`place` or
    :meth:`reset` (the field's power cycle, which ``Field.reset`` and ``Field.remove`` call)
    brings it back, powered up afresh in IDLE.
    """

    def __init__(
        self,
        uid: bytes,
        memory: bytes | bytearray,
        *,
        card_type: CardType | None = None,
        rng: random.Random | None = None,
        label: str | None = None,
        path: str | os.PathLike[str] | None = None,
        file_format: str | None = None,
        cipher_factory: CipherFactory = Crypto1,
    ) -> None:
        uid = bytes(uid)
        memory = bytearray(memory)
        if card_type is None:
            card_type = card_type_for_size(len(memory), "virtual card")
        check_image(uid, card_type, memory, "virtual card")
        self._rng = rng if rng is not None else random.Random()
        nonce_rng = random.Random(self._rng.getrandbits(64))
        fault_rng = random.Random(self._rng.getrandbits(64))
        self._tag = ClassicTag(
            uid,
            memory,
            card_type=card_type,
            cipher_factory=cipher_factory,
            nonces=TagNonces(nonce_rng),
        )
        self._card_type = card_type
        self._lock = threading.RLock()
        self.faults = CardFaults(fault_rng, self._lock)
        self.counters = CardCounters()
        self._in_field = True
        self.label = label
        self.path: Path | None = Path(path) if path is not None else None
        self.file_format = file_format

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        card_type: CardType = CardType.CLASSIC_1K,
        uid: bytes | None = None,
        uid_size: int = 4,
        rng: random.Random | None = None,
        *,
        label: str | None = None,
    ) -> VirtualCard:
        """A factory-fresh card (transport keys FFFFFFFFFFFF, zeros): ``uid``, or a random
        UID of ``uid_size`` bytes (see :func:`random_uid`)."""
        rng = rng if rng is not None else random.Random()
        if uid is None:
            uid = random_uid(rng, uid_size)
        uid = bytes(uid)
        check_uid(uid, "new card")  # before factory_memory, for this package's error type
        if not isinstance(card_type, CardType):
            raise CardFileError(f"new card: card type must be a CardType, not {card_type!r}")
        memory = factory_memory(uid, card_type)
        return cls(uid, memory, card_type=card_type, rng=rng, label=label)

    @classmethod
    def from_image(
        cls,
        image: CardImage,
        *,
        rng: random.Random | None = None,
        path: str | os.PathLike[str] | None = None,
        file_format: str | None = None,
    ) -> VirtualCard:
        """A card from a checked :class:`CardImage`."""
        return cls(
            image.uid,
            image.memory,
            card_type=image.card_type,
            rng=rng,
            label=image.label,
            path=path,
            file_format=file_format,
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        uid_size: int | None = None,
        rng: random.Random | None = None,
    ) -> VirtualCard:
        """Load a card file (JSON or raw dump, by extension unless ``format`` says), check
        it, and remember the path so :meth:`save` writes back there."""
        path = Path(path).expanduser()
        fmt = format_for_path(path, format)
        image = load_card_image(path, fmt, uid_size)
        card = cls.from_image(image, rng=rng, path=path, file_format=fmt)
        log.debug("loaded card %s from %s (%s)", masked_uid(card.uid), path, fmt)
        return card

    # -- the card's identity and memory -----------------------------------------------------

    @property
    def uid(self) -> bytes:
        """The UID (4 or 7 bytes) the card answers anticollision with."""
        return self._tag.uid

    @property
    def card_type(self) -> CardType:
        """1K or 4K: fixes the memory size, the sector layout, ATQA and SAK."""
        return self._card_type

    @property
    def memory(self) -> bytearray:
        """The live EEPROM, block 0 first; tests may read it (and poke it) directly."""
        return self._tag.memory

    @property
    def atqa(self) -> bytes:
        """The ATQA as sent on the air, low byte first (``04 00`` for a 1K with a 4-byte UID),
        i.e. what :attr:`SelectedCard.atqa` shows."""
        return self._tag.selector.atqa

    @property
    def sak(self) -> int:
        """The SAK of the final SELECT: 0x08 for a 1K, 0x18 for a 4K."""
        return self._tag.selector.sak

    @property
    def tag(self) -> ClassicTag:
        """The core card model underneath, for tests that inspect protocol state."""
        return self._tag

    @property
    def in_field(self) -> bool:
        """Whether the card is in the field (not torn or removed)."""
        return self._in_field

    def block(self, n: int) -> bytes:
        """A copy of block ``n`` of the memory (no access control: this is the test's view)."""
        if not 0 <= n < self._card_type.blocks:
            raise CardFileError(
                f"block {n} is out of range for a {self._card_type.value} card "
                f"(0..{self._card_type.blocks - 1})"
            )
        return bytes(self.memory[BLOCK_SIZE * n : BLOCK_SIZE * (n + 1)])

    def image(self) -> CardImage:
        """A snapshot of the card as a file would hold it."""
        with self._lock:
            return CardImage(self.uid, self._card_type, bytes(self.memory), self.label)

    # -- persistence --------------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str] | None = None, *, format: str | None = None
    ) -> Path:
        """Write the card atomically: to ``path`` (then remembered for the next save), or
        back to the file it came from. Returns the path written."""
        if path is None:
            if self.path is None:
                raise CardFileError("this card was not loaded from a file: give save() a path")
            target, fmt = self.path, format or self.file_format
        else:
            target = Path(path).expanduser()
            fmt = format
        fmt = save_card_image(self.image(), target, fmt)
        self.path, self.file_format = target, fmt
        log.debug("saved card %s to %s (%s)", masked_uid(self.uid), target, fmt)
        return target

    # -- in and out of the field ----------------------------------------------------------------

    def place(self) -> None:
        """Put the card (back) in the field: it powers up in IDLE."""
        with self._lock:
            self._tag.reset()
            self._in_field = True
            self.faults._on_power_cycle()

    def remove(self) -> None:
        """Take the card out of the field now (it loses power and its session)."""
        with self._lock:
            self._leave()

    def reset(self) -> None:
        """Power cycle (``Card`` protocol): the field was switched off and on, or the card
        left and came back. The card is in the field again, in IDLE."""
        self.place()

    def _leave(self) -> None:
        self._tag.reset()
        self._in_field = False
        self.faults._on_power_cycle()

    # -- the air -----------------------------------------------------------------------------

    def handle(self, frame: BitFrame) -> BitFrame:
        """Consume one reader frame and answer it (``SILENCE`` for no answer), with the
        armed faults applied. A slow-answer delay is slept outside the card's lock."""
        if not isinstance(frame, BitFrame):
            raise FrameError(f"a card handles BitFrames, not {type(frame).__name__}")
        with self._lock:
            faults = self.faults
            if (
                self._in_field
                and faults._tear_countdown is None
                and faults._write_countdown is None
                and not faults._tear_on_data
                and faults._flip_countdown is None
                and not faults._noise_probability
                and not faults._slow_seconds
            ):
                # No fault armed: _handle's fault hooks would change nothing (no tear, no
                # lost answer, no flipped bit, no random draw, no delay), so skip them.
                counters = self.counters
                counters.frames += 1
                # the tag's C path (a frame in an open session, a plain AUTH), else the tag itself
                answer = classic_tag_frame(self._tag, frame)
                if answer is None:
                    answer = self._tag.handle(frame)
                if answer.length <= 0:  # ``not answer``
                    return SILENCE
                counters.answers += 1
                return answer
            answer, delay = self._handle(frame)
        if delay:
            time.sleep(delay)
        return answer

    def _handle(self, frame: BitFrame) -> tuple[BitFrame, float]:
        counters = self.counters
        if not self._in_field:
            counters.ignored += 1
            return SILENCE, 0.0
        counters.frames += 1
        card = self._tag.card
        was_pending = card.state is CardState.WRITE_PENDING
        answer = self._tag.handle(frame)
        # A frame that arrives while the card waits for WRITE data is the data phase only if
        # the Classic layer took it (the card is then AUTHENTICATED again); the activation
        # layer may have claimed it instead (HLTA, WUPA, SELECT), which ends the session.
        waiting = card.state is CardState.WRITE_PENDING
        tear, deliver = self.faults._on_frame(
            write_acked=waiting and not was_pending,
            data_taken=was_pending and card.state is CardState.AUTHENTICATED,
            waiting=waiting,
        )
        if tear:
            self._leave()
            counters.tears += 1
            log.info(
                "card %s torn at frame %d (%s)",
                masked_uid(self.uid),
                counters.frames,
                "answer sent" if deliver and answer else "no answer",
            )
        if not deliver and answer:
            counters.lost_answers += 1
            answer = SILENCE
        if not answer:
            return SILENCE, 0.0
        answer, flipped = self.faults._corrupt(answer)
        counters.bits_flipped += flipped
        counters.answers += 1
        delay = self.faults._delay()
        if delay:
            counters.delayed += 1
        return answer, delay

    def __repr__(self) -> str:
        where = "in field" if self._in_field else "out of field"
        return f"<VirtualCard {self._card_type.value} uid={masked_uid(self.uid)} {where}>"
