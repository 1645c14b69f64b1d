"""atheris harness: an issued card whose application blocks are overwritten by the input,
read by Purse.read and decoded by ``afc card inspect``. Only CoreError may come out.

Input: up to 9 x 16 bytes for blocks 4, 5, 6, 8, 9, 10, 12, 13, 14 (a short input changes
the first blocks only), then 3 x 16 bytes for the trailers of sectors 1-3.
"""

from __future__ import annotations

import contextlib
import random

import _common  # first: puts the repository on sys.path

from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity
from firmware.core.errors import CoreError
from firmware.core.keys import MemoryKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import Purse
from simulators.cards import VirtualCard
from tools.card_cmd import _decode_application

KEYS = MemoryKeyStore({"classic-sector": bytes(range(16)), "purse-mac": bytes(range(1, 17))})
BLOCKS = (4, 5, 6, 8, 9, 10, 12, 13, 14, 7, 11, 15)


def _reader(card: VirtualCard) -> ClassicReader:
    air = Field([card])
    air.reset()
    selected = select_card(air.transceive)
    rng = random.Random(4)
    return ClassicReader(air.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))


def _issued() -> VirtualCard:
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(9))
    Purse(_reader(card), KEYS, key_type="B").issue(
        Identity(1, 1, 1, 1_767_000_000, 1_900_000_000, None, 1, b"FUZZFUZZ"), balance=100)
    return card


_ISSUED = _issued()


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    memory = bytearray(_ISSUED.memory)
    for n, block in enumerate(BLOCKS):
        piece = data[16 * n:16 * n + 16]
        if len(piece) < 16:
            break
        memory[16 * block:16 * block + 16] = piece
    card = VirtualCard(_ISSUED.uid, memory, rng=random.Random(5))
    with contextlib.suppress(CoreError):
        Purse(_reader(card), KEYS).read()
    raw = {b: bytes(memory[16 * b:16 * b + 16]) for b in BLOCKS[:9]}
    with contextlib.suppress(CoreError):
        _decode_application(_ISSUED.uid, raw, KEYS)


if __name__ == "__main__":
    _common.run(TestOneInput)
