"""Virtual MIFARE Classic cards for the simulators and the hardware-in-the-loop rig.

* :class:`VirtualCard` — a 1K/4K card on the air (any ``Field`` or reader emulator takes it),
  created factory-fresh, loaded from or saved to a card file, with faults armed on
  ``card.faults`` and counters in ``card.counters``;
* card files (:mod:`.files`) — our JSON format (``docs/card-files.md``) and raw dumps
  (``.mfd``/``.bin``/``.dump``) as libnfc, mfoc and the Proxmark3 write them;
* :func:`parse_card_spec` — the ``--card SPEC`` strings of the command line.
"""

from __future__ import annotations

from ..errors import CardFileError, SimulatorError
from .faults import MAX_DELAY_S, CardCounters, CardFaults
from .files import (
    EXTENSIONS,
    FORMAT_JSON,
    FORMAT_RAW,
    FORMATS,
    CardImage,
    image_from_json,
    image_from_raw,
    image_to_json,
    image_to_raw,
    load_card_image,
    masked_uid,
    save_card_image,
    uid_from_block0,
)
from .spec import SPEC_FORMS, parse_card_spec, spec_help
from .virtual import NXP_MANUFACTURER, VirtualCard, random_uid

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "FORMAT_JSON",
    "FORMAT_RAW",
    "MAX_DELAY_S",
    "NXP_MANUFACTURER",
    "SPEC_FORMS",
    "CardCounters",
    "CardFaults",
    "CardFileError",
    "CardImage",
    "SimulatorError",
    "VirtualCard",
    "image_from_json",
    "image_from_raw",
    "image_to_json",
    "image_to_raw",
    "load_card_image",
    "masked_uid",
    "parse_card_spec",
    "random_uid",
    "save_card_image",
    "spec_help",
    "uid_from_block0",
]
