"""Card files: a virtual card's memory on disk, in our JSON format or as a raw dump.

Two formats, chosen by the file name's extension unless the caller names one:

* ``json`` (``.json``): our own, one 32-hex-digit string per block so that a person can read
  a card and ``diff`` two of them; it also records the card type, the UID and an optional
  label. Documented in ``docs/card-files.md``.
* ``raw`` (``.mfd``, ``.bin``, ``.dump``): the card's EEPROM byte for byte (1024 or 4096
  bytes, block 0 first), as libnfc's ``nfc-mfclassic``, ``mfoc`` and the Proxmark3's
  ``hf mf dump`` write it. Such dumps usually hold the real keys in the sector trailers
  (the tool knew them, or it could not have read the card); they are kept as they are, so a
  dumped card behaves like the original.

Loading checks everything a card needs to be emulated faithfully (size, hex, UID in block 0,
BCC of a 4-byte UID, no cascade tag where the anticollision loop would misread it) and
refuses anything else with a :class:`~simulators.errors.CardFileError` that names the file
and the field. Writing is atomic (temporary file, fsync, rename): a crash in the middle of a
save leaves the old file, never half a card.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.core.classic_layout import BLOCK_SIZE, CardType
from firmware.core.iso14443a import CASCADE_TAG
from firmware.durable import write_file

from ..errors import CardFileError

FORMAT_JSON = "json"
FORMAT_RAW = "raw"
FORMATS = (FORMAT_JSON, FORMAT_RAW)

EXTENSIONS: dict[str, str] = {
    ".json": FORMAT_JSON,
    ".mfd": FORMAT_RAW,
    ".bin": FORMAT_RAW,
    ".dump": FORMAT_RAW,
}
"""File name extension (lower case) → format."""

JSON_FORMAT_NAME = "afc-card"
"""Value of the ``format`` field that marks a JSON file as one of our card files."""

JSON_VERSION = 1
"""The version of the JSON card file format this module reads and writes."""

MAX_FILE_BYTES = 1 << 20
"""Files larger than this are refused unread: a 4K card is 4096 bytes raw, ~10 KB as JSON."""

_JSON_KEYS = frozenset({"format", "version", "card_type", "uid", "label", "blocks"})
_HEX_BLOCK = re.compile(r"[0-9A-Fa-f]{32}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_UID_SIZES = (4, 7)


@dataclass(frozen=True, slots=True)
class CardImage:
    """A card as a file holds it: UID, type, the whole memory, and an optional label.

    Build it through :func:`make_image` (or the loaders), which check that it describes a
    card that can exist; the constructor itself checks nothing.
    """

    uid: bytes
    card_type: CardType
    memory: bytes
    label: str | None = None


def masked_uid(uid: bytes) -> str:
    """The UID for logs: only its last 2 bytes, the rest as ``*`` (a UID identifies a rider)."""
    uid = bytes(uid)
    return "*" * (2 * max(len(uid) - 2, 0)) + uid[-2:].hex().upper()


def bcc(data: bytes) -> int:
    """The BCC of a 4-byte UID: the XOR of its bytes, stored after it in block 0."""
    return data[0] ^ data[1] ^ data[2] ^ data[3]


def card_type_for_size(size: int, source: str) -> CardType:
    """The card type whose memory is ``size`` bytes, or a :class:`CardFileError`."""
    for card_type in CardType:
        if card_type.size_bytes == size:
            return card_type
    sizes = " or ".join(f"{t.size_bytes} ({t.value})" for t in CardType)
    raise CardFileError(
        f"{source}: {size} bytes of card memory; a MIFARE Classic card has {sizes} bytes "
        "(a truncated file, or not a MIFARE Classic dump)"
    )


def check_uid(uid: bytes, source: str) -> None:
    """Refuse a UID the activation layer could not announce unambiguously."""
    if len(uid) not in _UID_SIZES:
        raise CardFileError(
            f"{source}: UID {bytes(uid).hex().upper()} has {len(uid)} bytes; a MIFARE Classic "
            "UID has 4 or 7"
        )
    if len(uid) == 4 and uid[0] == CASCADE_TAG:
        raise CardFileError(
            f"{source}: 4-byte UID {uid.hex().upper()} starts with the cascade tag 0x88, which "
            "ISO/IEC 14443-3 forbids (readers would take it for a longer UID)"
        )
    if len(uid) == 7 and uid[3] == CASCADE_TAG:
        raise CardFileError(
            f"{source}: 7-byte UID {uid.hex().upper()} has the cascade tag 0x88 as its 4th "
            "byte, which ISO/IEC 14443-3 forbids"
        )


def check_image(uid: bytes, card_type: CardType, memory: bytes | bytearray, source: str) -> None:
    """Refuse a UID/memory pair that no real card could have.

    The activation layer takes the UID from here and the Classic layer reads block 0 from
    memory; if they disagree, a reader that reads block 0 (as issuing software does) would
    see a different card than the one it selected, so that is an error, not a warning.
    """
    if not isinstance(card_type, CardType):
        raise CardFileError(f"{source}: card type must be a CardType, not {card_type!r}")
    check_uid(uid, source)
    if len(memory) != card_type.size_bytes:
        raise CardFileError(
            f"{source}: {len(memory) // BLOCK_SIZE} blocks of memory "
            f"({len(memory)} bytes); a {card_type.value} card has {card_type.blocks} "
            f"({card_type.size_bytes} bytes)"
        )
    start = bytes(memory[: len(uid)])
    if start != uid:
        raise CardFileError(
            f"{source}: block 0 starts with {start.hex().upper()}, but the UID is "
            f"{bytes(uid).hex().upper()}; block 0 of a MIFARE Classic card begins with its UID"
        )
    if len(uid) == 4 and memory[4] != bcc(uid):
        raise CardFileError(
            f"{source}: byte 4 of block 0 is 0x{memory[4]:02X}, but the BCC of UID "
            f"{bytes(uid).hex().upper()} (XOR of its bytes) is 0x{bcc(uid):02X}"
        )


def make_image(
    uid: bytes,
    card_type: CardType,
    memory: bytes | bytearray,
    label: str | None = None,
    source: str = "card",
) -> CardImage:
    """A checked :class:`CardImage` (see :func:`check_image`)."""
    uid = bytes(uid)
    check_image(uid, card_type, memory, source)
    if label is not None and not isinstance(label, str):
        raise CardFileError(f"{source}: label must be a string, not {type(label).__name__}")
    return CardImage(uid, card_type, bytes(memory), label)


def uid_from_block0(block0: bytes, uid_size: int | None = None) -> bytes:
    """The UID a raw dump's block 0 holds.

    A 4-byte NUID is followed by its BCC, so byte 4 equal to the XOR of bytes 0..3 means a
    4-byte UID, and anything else a 7-byte one. That test alone misreads about 1 in 256
    7-byte UIDs (the 5th UID byte happens to equal the XOR), so a match is overruled when
    block 0 has the 7-byte manufacturer layout (SAK at byte 7, a 7-byte ATQA 44 00 or 42 00
    at bytes 8..9, as our factory cards and NXP's have) rather than the 4-byte one.
    ``uid_size`` settles the question for a dump whose block 0 is ambiguous anyway.
    """
    if uid_size is not None:
        if uid_size not in _UID_SIZES:
            raise CardFileError(f"UID size must be 4 or 7, not {uid_size!r}")
        return bytes(block0[:uid_size])
    if block0[4] != bcc(block0):
        return bytes(block0[:7])
    seven_layout = block0[7] in {t.sak for t in CardType} and any(
        block0[8:10] == t.atqa(7).to_bytes(2, "little") for t in CardType
    )
    four_layout = any(
        block0[5:8] == bytes([t.sak]) + t.atqa(4).to_bytes(2, "little") for t in CardType
    )
    if seven_layout and not four_layout:
        return bytes(block0[:7])
    return bytes(block0[:4])


def format_for_path(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The card file format for ``path``: ``format`` if given, else by extension."""
    if format is not None:
        if format not in FORMATS:
            raise CardFileError(
                f"unknown card file format {format!r}; use one of: {', '.join(FORMATS)}"
            )
        return format
    suffix = Path(path).suffix.lower()
    try:
        return EXTENSIONS[suffix]
    except KeyError:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in EXTENSIONS.items())
        raise CardFileError(
            f"{path}: cannot tell the card file format from the extension {suffix or '(none)'!r};"
            f" use one of {known}, or name the format explicitly"
        ) from None


# -- raw dumps ------------------------------------------------------------------------------


def image_from_raw(data: bytes, source: str = "raw dump", uid_size: int | None = None) -> CardImage:
    """Parse a raw dump (1024 or 4096 bytes); the UID comes from block 0."""
    card_type = card_type_for_size(len(data), source)
    uid = uid_from_block0(data[:BLOCK_SIZE], uid_size)
    return make_image(uid, card_type, data, None, source)


def image_to_raw(image: CardImage) -> bytes:
    """The raw dump of ``image``: its memory, block 0 first (the label is not kept)."""
    return bytes(image.memory)


# -- JSON -----------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CardFileError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _hex_field(value: object, field: str, source: str) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise CardFileError(
            f"{source}: {field} must be a string of hex digits (pairs of 0-9, A-F), got {value!r}"
        )
    return bytes.fromhex(value)


def image_from_json(text: str | bytes, source: str = "JSON card") -> CardImage:
    """Parse our JSON card file format (see ``docs/card-files.md``), checking every field."""
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except CardFileError as exc:
        raise CardFileError(f"{source}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise CardFileError(f"{source}: not valid JSON: {exc}") from None
    except RecursionError:
        raise CardFileError(f"{source}: not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise CardFileError(f"{source}: a card file is a JSON object, not {type(doc).__name__}")
    unknown = sorted(set(doc) - _JSON_KEYS)
    if unknown:
        raise CardFileError(
            f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; a version "
            f"{JSON_VERSION} card file has {', '.join(sorted(_JSON_KEYS))}"
        )
    missing = sorted(_JSON_KEYS - {"label"} - set(doc))
    if missing:
        raise CardFileError(f"{source}: missing field(s) {', '.join(map(repr, missing))}")
    if doc["format"] != JSON_FORMAT_NAME:
        raise CardFileError(
            f"{source}: field 'format' is {doc['format']!r}, expected {JSON_FORMAT_NAME!r}"
        )
    version = doc["version"]
    if type(version) is not int or version != JSON_VERSION:
        raise CardFileError(
            f"{source}: card file version {version!r} is not supported (this program reads "
            f"version {JSON_VERSION})"
        )
    types = {t.value: t for t in CardType}
    card_type = types.get(doc["card_type"]) if isinstance(doc["card_type"], str) else None
    if card_type is None:
        raise CardFileError(
            f"{source}: card_type {doc['card_type']!r} is not one of {', '.join(types)}"
        )
    uid = _hex_field(doc["uid"], "uid", source)
    label = doc.get("label")
    if label is not None and not isinstance(label, str):
        raise CardFileError(f"{source}: label must be a string, not {type(label).__name__}")
    blocks = doc["blocks"]
    if not isinstance(blocks, list):
        raise CardFileError(f"{source}: blocks must be a list of hex strings")
    if len(blocks) != card_type.blocks:
        raise CardFileError(
            f"{source}: {len(blocks)} blocks given; a {card_type.value} card has {card_type.blocks}"
        )
    memory = bytearray()
    for i, block in enumerate(blocks):
        if not isinstance(block, str) or not _HEX_BLOCK.fullmatch(block):
            raise CardFileError(
                f"{source}: block {i} must be a string of exactly 32 hex digits (16 bytes), "
                f"got {block!r}"
            )
        memory += bytes.fromhex(block)
    return make_image(uid, card_type, memory, label, source)


def image_to_json(image: CardImage) -> str:
    """``image`` in our JSON format: one block per line, upper-case hex, newline at the end."""
    doc: dict[str, Any] = {
        "format": JSON_FORMAT_NAME,
        "version": JSON_VERSION,
        "card_type": image.card_type.value,
        "uid": image.uid.hex().upper(),
    }
    if image.label is not None:
        doc["label"] = image.label
    doc["blocks"] = [
        image.memory[i : i + BLOCK_SIZE].hex().upper()
        for i in range(0, len(image.memory), BLOCK_SIZE)
    ]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# -- files ----------------------------------------------------------------------------------


def load_card_image(
    path: str | os.PathLike[str], format: str | None = None, uid_size: int | None = None
) -> CardImage:
    """Read and check a card file; ``format`` overrides the extension, ``uid_size`` the UID
    size a raw dump's block 0 suggests."""
    path = Path(path).expanduser()
    fmt = format_for_path(path, format)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CardFileError(f"{path}: no such card file") from None
    except OSError as exc:
        raise CardFileError(f"{path}: cannot read card file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CardFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes; no card file is that big")
    if fmt == FORMAT_RAW:
        return image_from_raw(data, str(path), uid_size)
    return image_from_json(data, str(path))


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` and
    fsyncs the directory. The file gets mode 0600: dumps hold keys.
    """
    write_file(path, data)


def save_card_image(
    image: CardImage, path: str | os.PathLike[str], format: str | None = None
) -> str:
    """Write ``image`` atomically; returns the format used (``format`` or by extension)."""
    path = Path(path).expanduser()
    fmt = format_for_path(path, format)
    data = image_to_raw(image) if fmt == FORMAT_RAW else image_to_json(image).encode()
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise CardFileError(f"{path}: cannot write card file: {exc.strerror or exc}") from None
    return fmt
