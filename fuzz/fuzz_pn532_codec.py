"""atheris harness: PN532 byte streams into the host codec, the chip codec and the emulator.

Input: any bytes. The first byte picks how the rest is cut into chunks. Must never raise.
"""

from __future__ import annotations

import random

import _common  # first: puts the repository on sys.path

from firmware.core import classic_layout as layout
from firmware.reader.codec import Pn532Codec
from simulators.cards import VirtualCard
from simulators.pn532.emulator import Pn532Emulator

_CARD_IMAGE = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(1))


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    if not data:
        return
    step = data[0] % 31 + 1
    body = data[1:]
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    for codec in (Pn532Codec.for_host(), Pn532Codec.for_chip()):
        for chunk in chunks:
            codec.feed(chunk)
            codec.events()
    card = VirtualCard(_CARD_IMAGE.uid, bytes(_CARD_IMAGE.memory), rng=random.Random(2))
    rng = random.Random(3)
    chip = Pn532Emulator([card], nonce=lambda: rng.getrandbits(32))
    for chunk in chunks:
        chip.receive(chunk)
        chip.poll()
    if chip.internal_errors:
        raise AssertionError(f"emulator internal errors: {chip.internal_errors}")


if __name__ == "__main__":
    _common.run(TestOneInput)
