"""Card spec strings: how an operator names a virtual card on the command line
(``afc sim reader --card SPEC``).

A spec is either the path of a card file, or ``new:`` and a description of a factory-fresh
card. Keeping the grammar here (and its help text in :data:`SPEC_FORMS`) lets every tool
that takes a card accept the same strings and print the same help when one is wrong.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from firmware.core.classic_layout import CardType

from ..errors import CardFileError
from .virtual import VirtualCard

SPEC_FORMS = (
    "PATH                 a card file: .json, or a raw dump .mfd/.bin/.dump",
    "new:1k, new:4k       a factory-fresh card with a random 4-byte UID",
    "new:1k:7, new:4k:7   the same with a random 7-byte UID (new:1k:4 = new:1k)",
    "new:1k:uid=0A0B0C0D  a factory-fresh card with this UID (8 or 14 hex digits)",
)
"""The accepted forms, one per line, for help texts and error messages."""

_TYPES = {
    "1k": CardType.CLASSIC_1K,
    "4k": CardType.CLASSIC_4K,
    **{t.value: t for t in CardType},
}
_NEW = "new:"
_HEX = re.compile(r"[0-9A-Fa-f]+")


def spec_help() -> str:
    """The accepted spec forms as an indented block, for ``--help`` and errors."""
    return "\n".join(f"  {form}" for form in SPEC_FORMS)


def _bad(spec: str, why: str) -> CardFileError:
    return CardFileError(f"bad card spec {spec!r}: {why}; accepted forms:\n{spec_help()}")


def parse_card_spec(spec: str, rng: random.Random | None = None) -> VirtualCard:
    """The virtual card ``spec`` names (see :data:`SPEC_FORMS`).

    A spec starting with ``new:`` (any case) describes a new card; anything else is a path.
    A card file literally named ``new:...`` is reached as ``./new:...``. A card loaded from a
    file remembers its path, so ``card.save()`` writes back there. ``rng`` seeds the card.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty")
    spec = spec.strip()
    if spec[: len(_NEW)].lower() == _NEW:
        return _parse_new(spec, rng)
    path = Path(spec).expanduser()
    if not path.is_file():
        why = "is a directory, not a card file" if path.is_dir() else "no such card file"
        raise _bad(spec, why)
    return VirtualCard.from_file(path, rng=rng)


def _parse_new(spec: str, rng: random.Random | None) -> VirtualCard:
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise _bad(spec, "the card type is missing after 'new:' (1k or 4k)")
    card_type = _TYPES.get(parts[0].lower())
    if card_type is None:
        raise _bad(spec, f"unknown card type {parts[0]!r} (1k or 4k)")
    uid_size: int | None = None
    uid: bytes | None = None
    for option in parts[1:]:
        key, sep, value = option.partition("=")
        key = key.strip().lower()
        if not sep and key in ("4", "7"):
            if uid_size is not None:
                raise _bad(spec, "the UID size is given twice")
            uid_size = int(key)
        elif sep and key == "uid":
            if uid is not None:
                raise _bad(spec, "the UID is given twice")
            value = value.strip()
            if not _HEX.fullmatch(value) or len(value) not in (8, 14):
                raise _bad(spec, f"uid={value!r} is not 8 or 14 hex digits (a 4- or 7-byte UID)")
            uid = bytes.fromhex(value)
        else:
            raise _bad(spec, f"unknown option {option!r} (4, 7 or uid=HEX)")
    if uid is not None and uid_size is not None and uid_size != len(uid):
        raise _bad(spec, f"UID size {uid_size} does not match the {len(uid)}-byte uid= given")
    try:
        return VirtualCard.new(card_type, uid, uid_size or 4, rng)
    except CardFileError as exc:
        raise _bad(spec, str(exc)) from None
