"""atheris harness: bit frames into the framing functions (Cython and reference) and a card.

Input: any bytes; the first byte gives the valid bits of the last byte. Only FrameError may
come out of the framing, and the two implementations must agree; the card must answer.
"""

from __future__ import annotations

import random

import _common  # first: puts the repository on sys.path

from firmware.core import classic_layout as layout
from firmware.core.errors import FrameError
from firmware.core.iso14443a import (
    BitFrame,
    decode,
    decode_ref,
    split,
    split_ref,
    strip_crc,
    strip_crc_ref,
)
from simulators.cards import VirtualCard


def _outcome(fn, arg):
    try:
        return fn(arg)
    except FrameError as exc:
        return type(exc)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    if not data:
        return
    body = data[1:]
    try:
        frame = BitFrame.from_packed(body, data[0] % 8 + 1) if body else BitFrame(0, 0)
    except FrameError:
        return
    for fast, ref, arg in ((decode, decode_ref, frame), (split, split_ref, frame),
                           (strip_crc, strip_crc_ref, body)):
        if _outcome(fast, arg) != _outcome(ref, arg):
            raise AssertionError(f"{fast.__name__} and its reference disagree on {arg!r}")
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(len(data)))
    card.reset()
    card.handle(BitFrame(0x26, 7))
    for i in range(0, len(body), 9):
        piece = body[i:i + 9]
        answer = card.handle(BitFrame.from_packed(piece, 8) if piece else BitFrame(0, 0))
        if not isinstance(answer, BitFrame):
            raise AssertionError(f"card answered {answer!r}")


if __name__ == "__main__":
    _common.run(TestOneInput)
