"""``afc bundle``: build, sign, verify, diff and publish configuration bundles.

A bundle is what devices apply to their database: a fare table, a blacklist (full or
delta), an action list, a dealer credit allowance, agent settings. Devices apply one only if
it verifies against the center key they pin and its version is newer than theirs, so an
operator signs with the center key and always raises the version.

A table a device would refuse must never be signed: once published (retained) every device
downloads it, refuses it and raises an alarm, and the fleet keeps the old table. So ``sign``
(and ``build --sign``) check a table three ways before anything is written: the operator's
file row by row (so the error names the row), the protocol's encoder, and then the signed
payload exactly as a device takes it: decoded by :class:`~edge_agent.config_sync.ConfigSync`
against the key's public half and applied to a scratch device database in a temporary
folder through the real stores (the fare table through ``FareTable``, actions through the
action list, the credit allowance through the top-up terminal's own reader). There is no
second validator here to drift from the devices'. A refusal is one line on stderr naming
the field or the row, exit status 2, and no output file.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import itertools
import json
import logging
import re
import sys
import tempfile
import time
import tomllib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from operator import itemgetter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import cbor2
import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent import protocol
from edge_agent.errors import ProtocolError
from edge_agent.keys import load_private_key, load_public_key
from edge_agent.protocol import (
    BUNDLE_KINDS,
    MAX_BUNDLE_BYTES,
    Bundle,
    cfg_topic,
    decode_bundle,
    encode_bundle,
)
from firmware.core.errors import CoreError
from firmware.durable import write_file
from simulators.center.errors import CenterError

__all__ = [
    "BundleRefused",
    "BundleSourceError",
    "Source",
    "bundle",
    "device_check",
    "diff_bodies",
    "parse_time",
    "read_body",
    "read_source",
    "seal",
    "tariff_toml",
]

Entry = tuple[int, int, bytes | None]

#: Operator times without a zone are Konya's (the tariff's and the top-up terminal's zone).
LOCAL_TZ = ZoneInfo("Europe/Istanbul")
#: Source files from this size on get a progress bar on stderr while they are read.
PROGRESS_MIN_BYTES = 1 << 20
#: Changed items listed per section in the human-readable diff (``--limit``).
DEFAULT_DIFF_LIMIT = 20
_CHECK_DEVICE = "afc-bundle-check"
_ACTION_COLUMNS = ("action_id", "card_number", "kind", "valid_until", "amount", "product_id",
                   "card_seq")
_CREDIT_COLUMNS = ("dealer_id", "allowance_id", "amount", "valid_from", "valid_until")


class BundleRefused(click.ClickException):
    """A table a device would refuse (or two inputs ``diff`` cannot compare): exit status 2,
    one line, nothing written. The message names the file, row or field to fix."""

    exit_code = 2

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


class BundleSourceError(CenterError):
    """An operator's source file (CSV, JSON, TOML) holds something no device would accept;
    the message starts with ``file:line`` or ``file: entry N``."""


# --------------------------------------------------------------------------------------------
# Reading operator sources


@dataclass
class Source:
    """A bundle body read from an operator's file, with where each item came from (so a
    refusal found later, on the scratch device, can still name the row) and, for a delta,
    the base version the file names."""

    kind: str
    body: dict[str, Any]
    path: str
    locations: Sequence[str] = field(default_factory=list)
    base: int | None = None


def _uid(value: Any, where: str) -> bytes | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise BundleSourceError(f"{where}: a UID must be hex text or empty")
    try:
        return bytes.fromhex(value.replace(":", ""))
    except ValueError:
        raise BundleSourceError(f"{where}: UID {value!r} is not hex") from None


def _checked_entry(entry: Entry, where: str) -> Entry:
    """The protocol's own entry rule (u64 card, u16 reason, 4/7/10-byte UID), the one every
    device decoder and store applies, run per row so the refusal can name the row."""
    try:
        return protocol.check_blacklist_entry(entry, where)
    except ProtocolError as exc:
        raise BundleSourceError(str(exc)) from None


def _entries(items: Any, where: str) -> tuple[list[Entry], list[str]]:
    if not isinstance(items, list):
        raise BundleSourceError(f"{where}: entries must be a list of [card_number, reason, "
                                "uid_hex]")
    out, locations = [], []
    for i, item in enumerate(items):
        at = f"{where}: entry {i + 1}"
        if isinstance(item, dict):
            item = [item.get("card_number"), item.get("reason", 0), item.get("uid")]
        if not isinstance(item, list) or len(item) not in (2, 3):
            raise BundleSourceError(f"{at} must be [card_number, reason, uid_hex]")
        uid = _uid(item[2] if len(item) == 3 else None, at)
        out.append(_checked_entry((item[0], item[1], uid), at))
        locations.append(at)
    return out, locations


@contextlib.contextmanager
def _lines(path: Path, label: str) -> Iterator[Iterator[str]]:
    """The file's lines as text, with a progress bar on stderr for a large file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size < PROGRESS_MIN_BYTES:
            yield (raw.decode("utf-8") for raw in fh)
            return
        with click.progressbar(length=size, label=label, file=sys.stderr,
                               show_percent=True) as bar:

            def gen() -> Iterator[str]:
                done = 0
                for n, raw in enumerate(fh, 1):
                    done += len(raw)
                    if n % 65536 == 0:
                        bar.update(done - bar.pos)
                    yield raw.decode("utf-8")
                bar.update(done - bar.pos)

            yield gen()


class _Rows(Sequence[str]):
    """``file:line`` of each entry, kept as line numbers (a million strings would cost
    ~100 MB for a message that is shown at most once)."""

    def __init__(self, path: Path, lines: array) -> None:
        self._path, self._lines = path, lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [f"{self._path}:{n}" for n in self._lines[i]]
        return f"{self._path}:{self._lines[i]}"


def _blacklist_csv(path: Path) -> tuple[list[Entry], Sequence[str]]:
    """``card_number,reason,uid_hex`` rows; a header row and ``#`` comments are skipped.

    The loop runs a million times for a full list: the common row takes the inline path;
    anything unusual goes through the protocol's rule (:func:`_checked_entry`), which also
    words the refusal.
    """
    out: list[Entry] = []
    append = out.append
    lines = array("L")
    mark = lines.append
    u64 = 1 << 64
    try:
        with _lines(path, f"reading {path.name}") as text:
            for line_no, row in enumerate(csv.reader(text), 1):
                if not row:
                    continue
                first = row[0].strip()
                if first.startswith("#") or first == "card_number":
                    continue
                at = f"{path}:{line_no}"
                if len(row) > 3:
                    raise BundleSourceError(f"{at}: expected card_number,reason,uid_hex, got "
                                            f"{len(row)} columns")
                try:
                    card = int(first)
                    reason = int(row[1]) if len(row) > 1 and row[1].strip() else 0
                except ValueError:
                    raise BundleSourceError(f"{at}: card_number and reason must be "
                                            "integers") from None
                uid_text = row[2].strip() if len(row) > 2 else ""
                uid = None
                if uid_text:
                    try:
                        uid = bytes.fromhex(uid_text)
                    except ValueError:
                        uid = _uid(uid_text, at)  # "aa:bb:.." or the error naming the row
                if (0 <= card < u64 and 0 <= reason <= 0xFFFF
                        and (uid is None or len(uid) in (4, 7, 10))):
                    append((card, reason, uid))
                else:
                    append(_checked_entry((card, reason, uid), at))
                mark(line_no)
    except UnicodeDecodeError as exc:
        raise BundleSourceError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return out, _Rows(path, lines)


def _sorted_unique(entries: list[Entry], locations: Sequence[str]
                   ) -> tuple[list[Entry], Sequence[str]]:
    """Entries in card order (what compresses best on the wire and loads fastest); a card
    listed twice is refused: the rows may disagree on the reason, and which one a device
    keeps would be an accident of file order."""
    cards = [e[0] for e in entries]
    if all(x < y for x, y in itertools.pairwise(cards)):  # the usual export: in order
        return entries, locations
    order = sorted(range(len(entries)), key=cards.__getitem__)
    for a, b in itertools.pairwise(order):
        if entries[a][0] == entries[b][0]:
            first, second = sorted((a, b))
            raise BundleSourceError(f"{locations[second]}: card {entries[a][0]} is listed "
                                    f"twice (also {locations[first]})")
    return [entries[i] for i in order], [locations[i] for i in order]  # only when unsorted


def _int_field(value: Any, name: str, where: str, *, optional: bool = False) -> int | None:
    if value is None or value == "":
        if optional:
            return None
        raise BundleSourceError(f"{where}: {name} is required")
    if isinstance(value, bool):
        raise BundleSourceError(f"{where}: {name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise BundleSourceError(f"{where}: {name} must be an integer, got {value!r}") from None


def parse_time(value: Any, where: str, *, unit_ms: bool) -> int:
    """An operator's time: an integer (Unix ms or s, as the field has it), an ISO date
    (midnight) or date-time; without a zone it is Konya's time."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        when = (datetime.fromisoformat(text) if "T" in text or " " in text
                else datetime.combine(date.fromisoformat(text), datetime.min.time()))
    except ValueError:
        raise BundleSourceError(f"{where}: {value!r} is neither Unix "
                                f"{'milliseconds' if unit_ms else 'seconds'} nor an ISO date "
                                "or date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=LOCAL_TZ)
    seconds = when.timestamp()
    return int(seconds * 1000) if unit_ms else int(seconds)


def _action(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(_ACTION_COLUMNS))
    if unknown:
        raise BundleSourceError(f"{where}: unknown action field {unknown[0]!r} (known: "
                                f"{', '.join(_ACTION_COLUMNS)})")
    action_id = raw.get("action_id")
    if not isinstance(action_id, str) or not action_id.strip():
        raise BundleSourceError(f"{where}: action_id is required")
    kind = raw.get("kind")
    if kind not in ("topup", "pass"):
        raise BundleSourceError(f"{where}: kind must be 'topup' or 'pass', got {kind!r}")
    if raw.get("valid_until") in (None, ""):
        raise BundleSourceError(f"{where}: valid_until is required")
    return {
        "action_id": action_id.strip(),
        "card_number": _int_field(raw.get("card_number"), "card_number", where),
        "kind": kind,
        "valid_until": parse_time(raw["valid_until"], f"{where}: valid_until", unit_ms=True),
        "amount": _int_field(raw.get("amount"), "amount", where, optional=True),
        "product_id": _int_field(raw.get("product_id"), "product_id", where, optional=True),
        "card_seq": _int_field(raw.get("card_seq"), "card_seq", where, optional=True),
    }


def _csv_dicts(path: Path, columns: Sequence[str], required: Sequence[str]
               ) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV with a header line, as ``(file:line, {column: text})``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CenterError(f"cannot read {path}: {exc}") from None
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), 1)
            if r and not r[0].strip().startswith("#")]
    if not rows:
        raise BundleSourceError(f"{path}: no header line ({','.join(columns)})")
    header_line, header = rows[0]
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in columns]
    if unknown:
        raise BundleSourceError(f"{path}:{header_line}: unknown column {unknown[0]!r} "
                                f"(known: {', '.join(columns)})")
    missing = [c for c in required if c not in header]
    if missing:
        raise BundleSourceError(f"{path}:{header_line}: missing column {missing[0]!r}")
    for line_no, row in rows[1:]:
        if len(row) > len(header):
            raise BundleSourceError(f"{path}:{line_no}: {len(row)} columns, the header has "
                                    f"{len(header)}")
        yield f"{path}:{line_no}", {h: v.strip() for h, v in zip(header, row, strict=False)}


def _actions_source(path: Path, data: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if data is None:
        items = list(_csv_dicts(path, _ACTION_COLUMNS, ("action_id", "card_number", "kind",
                                                         "valid_until")))
        return [_action(r, at) for at, r in items], [at for at, _ in items]
    actions = data.get("actions") if isinstance(data, dict) else data
    if not isinstance(actions, list):
        raise BundleSourceError(f"{path}: expected {{\"actions\": [...]}} or a list of actions")
    out, where = [], []
    for i, raw in enumerate(actions):
        at = f"{path}: actions[{i}]"
        if not isinstance(raw, dict):
            raise BundleSourceError(f"{at}: an action must be an object")
        out.append(_action(raw, at))
        where.append(at)
    return out, where


def _load_structured(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise BundleSourceError(f"{path} is not valid {path.suffix[1:] or 'JSON'}: "
                                f"{exc}") from None


def _fares_source(path: Path, text: str) -> dict[str, Any]:
    from firmware.core.fares import FareTable, FareTableError

    try:
        if path.suffix.lower() == ".json":
            data = _load_structured(path, text)
            FareTable.from_dict(data)  # the field-by-field message, from the JSON itself
            text = tariff_toml(data, str(path))
        table = FareTable.from_toml(text)  # what ConfigStore.put and the validator load
    except FareTableError as exc:
        raise BundleSourceError(f"{path}: {exc}") from None
    return {"name": str(table.name), "toml": text}


def read_source(kind: str, path: str | Path) -> Source:
    """A bundle body from an operator's file (see ``afc bundle sign --help``), checked row by
    row: :class:`BundleSourceError` names the row of the first problem."""
    if kind not in BUNDLE_KINDS:
        raise BundleSourceError(f"unknown bundle kind {kind!r} (one of {', '.join(BUNDLE_KINDS)})")
    path = Path(path)
    suffix = path.suffix.lower()
    if kind == "blacklist" and suffix == ".csv":
        try:
            entries, where = _blacklist_csv(path)
        except OSError as exc:
            raise CenterError(f"cannot read {path}: {exc}") from None
        entries, where = _sorted_unique(entries, where)
        return Source(kind, {"entries": entries}, str(path), where)
    if kind == "actions" and suffix == ".csv":
        actions, where = _actions_source(path, None)
        return Source(kind, {"actions": actions}, str(path), where)
    if kind == "credit" and suffix == ".csv":
        raise BundleSourceError(f"{path}: a credit CSV (one allowance per dealer) is read by "
                                "'afc bundle build credit --from', which signs each allowance")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CenterError(f"cannot read {path}: {exc}") from None
    if kind == "fares":
        return Source(kind, _fares_source(path, text), str(path))
    data = _load_structured(path, text)
    if kind == "actions":
        actions, where = _actions_source(path, data)
        return Source(kind, {"actions": actions}, str(path), where)
    if not isinstance(data, dict):
        raise BundleSourceError(f"{path} must hold an object")
    if kind == "blacklist":
        entries, where = _entries(data.get("entries"), str(path))
        entries, where = _sorted_unique(entries, where)
        return Source(kind, {"entries": entries}, str(path), where)
    if kind == "blacklist-delta":
        add, where = _entries(data.get("add", []), f"{path} add")
        remove = data.get("remove", [])
        if not isinstance(remove, list):
            raise BundleSourceError(f"{path}: 'remove' must be a list of card numbers")
        for i, card in enumerate(remove):
            if type(card) is not int or not 0 <= card < 1 << 64:
                raise BundleSourceError(f"{path}: remove[{i}]: card number out of range: "
                                        f"{card!r:.30}")
        base = data.get("base")
        if base is not None and (type(base) is not int or base < 0):
            raise BundleSourceError(f"{path}: 'base' must be a version number")
        return Source(kind, {"add": add, "remove": remove}, str(path), where, base)
    if kind == "credit":
        return Source(kind, {"allowance": data.get("allowance", data)}, str(path))
    return Source(kind, {"settings": data.get("settings", data)}, str(path))


def read_body(kind: str, path: str | Path) -> Any:
    """A bundle body from an operator's file (see ``afc bundle sign --help``)."""
    return read_source(kind, path).body


# -- a tariff given as JSON travels as TOML (devices load TOML) ------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v, f'{where}.{k}')}"
                          for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    kind = "null" if value is None else type(value).__name__
    raise BundleSourceError(f"{where}: a tariff cannot hold {kind} (TOML has integers, text, "
                            "true/false, arrays and tables)")


def _toml_table(data: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    for key, value in data.items():
        if not isinstance(value, dict) and not is_table_array(value):
            out.append(f"{_toml_key(key)} = {_toml_value(value, prefix + key)}")
    for key, value in data.items():
        name = prefix + _toml_key(key)
        if isinstance(value, dict):
            out.extend(["", f"[{name}]"])
            _toml_table(value, name + ".", out)
        elif is_table_array(value):
            for item in value:
                out.extend(["", f"[[{name}]]"])
                for k, v in item.items():
                    out.append(f"{_toml_key(k)} = {_toml_value(v, f'{name}.{k}')}")


def tariff_toml(data: Any, where: str = "tariff") -> str:
    """TOML text of a tariff given as JSON, checked to read back as exactly ``data``."""
    if not isinstance(data, dict):
        raise BundleSourceError(f"{where}: a tariff must be an object")
    out: list[str] = [f"# Written by 'afc bundle build fares' from {Path(where).name}"]
    _toml_table(data, "", out)
    text = "\n".join(out) + "\n"
    try:
        same = tomllib.loads(text) == data
    except tomllib.TOMLDecodeError:
        same = False
    if not same:  # a key or text TOML cannot carry the way JSON did
        raise BundleSourceError(f"{where}: this tariff cannot be written as TOML unchanged; "
                                "give it as TOML")
    return text


# --------------------------------------------------------------------------------------------
# Signing, with the device's own check first


@contextlib.contextmanager
def _quiet_devices() -> Iterator[None]:
    """The scratch device logs its refusals as a device would; the operator gets one line
    from us instead, not the device's log on stderr."""
    logger = logging.getLogger("afc")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def device_check(payload: bytes, center_public: Ed25519PublicKey,
                 locations: Sequence[str] = ()) -> Bundle:
    """Take ``payload`` as a device does, on a scratch device database; return the bundle.

    Decoded and applied by the agent's :class:`~edge_agent.config_sync.ConfigSync` (a delta
    on a list at its base version), so every rule a device applies is applied here; a credit
    allowance is then read and verified by the top-up terminal's own
    :class:`~firmware.apps.topup.CreditAllowance`. :class:`BundleRefused` with the device's
    reason (and the row, via ``locations``, for an action list) if a device would refuse it.
    """
    from edge_agent.config_sync import APPLIED, ConfigSync, SyncResult
    from edge_agent.settings import AgentSettings
    from firmware.apps.topup import CreditAllowance
    from firmware.stores.database import DeviceDatabase

    head = cbor2.loads(payload)
    kind, target, base = head.get("kind"), head.get("target"), head.get("base")
    device = target or _CHECK_DEVICE
    sync = ConfigSync(device, center_public, AgentSettings())
    with (_quiet_devices(), tempfile.TemporaryDirectory(prefix="afc-bundle-check-") as tmp,
          contextlib.closing(DeviceDatabase.open(Path(tmp) / "device.db",
                                                 device_id=device)) as db):
        if kind == "blacklist-delta" and base:
            db.blacklist.load_full(base, [])  # the device holds the list the delta is on
        got = sync.decode(cfg_topic(kind, target), payload, _now_ms())
        if isinstance(got, SyncResult):
            raise BundleRefused(f"a device would refuse this {kind} bundle: {got.reason}")
        result = sync.apply(db, got)
        if result.outcome != APPLIED:
            where = _locate_action(db, got.bundle) if kind == "actions" and locations else None
            if where is not None:
                raise BundleRefused(f"{locations[where[0]]}: {where[1]}")
            raise BundleRefused(f"a device would refuse this {kind} bundle: {result.reason}")
        if kind == "credit":
            entry = db.config.get("credit")
            assert entry is not None  # applied just above
            try:
                CreditAllowance.from_json(entry.body.decode("utf-8")).check_usable(
                    center_public)
            except CoreError as exc:
                raise BundleRefused(f"a top-up terminal would refuse this allowance: {exc}"
                                    ) from None
        return got.bundle


def _locate_action(db: Any, b: Bundle) -> tuple[int, str] | None:
    """The first action the device's action list refuses on its own, and why."""
    from firmware.stores.errors import StoreError

    version = b.version
    for i, action in enumerate(b.body["actions"]):
        version += 1
        try:
            db.actions.replace_all(version, [action])
        except StoreError as exc:
            return i, f"action {action.get('action_id')!r}: {exc}"
    return None


def _check_header(kind: str, version: int, base: int | None, target: str | None) -> None:
    """Options that do not fit the kind: the caller's mistake, not the table's (exit 1)."""
    if kind == "blacklist-delta":
        if base is None or not 0 <= base < version:
            raise ProtocolError("a blacklist-delta needs --base, the version it applies on "
                                f"(below its own {version})")
    elif base is not None:
        raise ProtocolError(f"a {kind} bundle has no --base")
    cfg_topic(kind, target)  # a valid device id


def _credit_target(body: Mapping[str, Any], target: str | None) -> str:
    """A credit bundle goes to the dealer's terminal only: a fleet-wide one would replace
    every terminal's allowance with one that is not theirs."""
    allowance = body.get("allowance")
    dealer = allowance.get("dealer_id") if isinstance(allowance, Mapping) else None
    if not isinstance(dealer, str):
        raise BundleRefused("credit allowance field 'dealer_id' must be the dealer's device id")
    if target is not None and target != dealer:
        raise BundleRefused(f"credit allowance is for dealer {dealer!r} but --target is "
                            f"{target!r}: a terminal refuses another dealer's allowance")
    return dealer


def seal(source: Source, key: Ed25519PrivateKey, version: int, *, base: int | None = None,
         target: str | None = None, expires_in_s: int | None = None) -> tuple[Bundle, bytes]:
    """Sign ``source`` after every check a device makes (:func:`device_check`)."""
    kind = source.kind
    if base is None and kind == "blacklist-delta":
        base = source.base
    _check_header(kind, version, base, target)
    if kind == "credit":
        target = _credit_target(source.body, target)
    now = _now_ms()
    expires = None if expires_in_s is None else now + expires_in_s * 1000
    b = Bundle(kind, version, source.body, now, base, target, expires)
    try:
        payload = encode_bundle(b, key)
    except ProtocolError as exc:
        raise BundleRefused(f"{source.path}: {exc}") from None
    device_check(payload, key.public_key(), source.locations)
    return b, payload


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Problems in a table (not in the options or files) leave as :class:`BundleRefused`."""
    from firmware.core.fares import FareTableError

    try:
        yield
    except (BundleSourceError, FareTableError) as exc:
        raise BundleRefused(exc) from None


def _summary(b: Bundle, size: int) -> dict[str, Any]:
    body = b.body
    counts = {
        "blacklist": lambda: {"entries": len(body["entries"])},
        "blacklist-delta": lambda: {"add": len(body["add"]), "remove": len(body["remove"])},
        "actions": lambda: {"actions": len(body["actions"])},
        "fares": lambda: {"name": body["name"]},
        "credit": lambda: {"allowance_id": body["allowance"]["allowance_id"]},
        "agent": lambda: {"settings": sorted(body["settings"])},
    }[b.kind]()
    return {"kind": b.kind, "version": b.version, "base": b.base, "target": b.target,
            "expires": b.expires, "ts": b.ts, "bytes": size, "topic": cfg_topic(b.kind, b.target),
            **counts}


@click.group()
def bundle() -> None:
    """Build, sign, verify, diff and publish configuration bundles (docs/protocol.md).

    \b
    Typical use:
      afc bundle build fares --from konya-2025.toml --sign --key center.key --out fares.bundle
      afc bundle build blacklist-delta --old v41.csv --new today.csv --base 41 \\
          --sign --key center.key --version 42 --out bl-42.bundle
      afc bundle diff fares-old.bundle fares.bundle
      afc bundle verify --center-public <hex> --in fares.bundle
      afc bundle publish --broker 127.0.0.1:1883 --in fares.bundle
    Devices apply a bundle only if it verifies against the center key they pin and its
    version is newer than theirs: always raise --version. A table a device would refuse is
    never signed (exit status 2, nothing written).
    """


@bundle.command("sign")
@click.option("--kind", type=click.Choice(BUNDLE_KINDS), required=True)
@click.option("--version", "version", type=click.IntRange(1), required=True,
              help="Must be newer than the version devices hold (rollback is refused). "
              "Full blacklists and their deltas share one version sequence.")
@click.option("--base", type=click.IntRange(0), default=None,
              help="blacklist-delta only: the version this delta applies on (default: the "
              "'base' in the file, as 'build' writes it).")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The center's Ed25519 private key file (mode 0600).")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="fares: the tariff TOML (or JSON). blacklist: CSV 'card_number,reason,uid_hex'"
              ' or JSON {"entries": [[card, reason, "uid hex" or null], ...]}. blacklist-delta: '
              'JSON {"add": [...], "remove": [card, ...], "base": N}. actions: JSON '
              '{"actions": [...]} or CSV with a header. credit: the allowance JSON. agent: '
              "settings as TOML or JSON.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the signed bundle (binary CBOR).")
@click.option("--target", default=None, help="Device id, for a bundle meant for one device "
              "(credit: the dealer's, the default).")
@click.option("--expires-in-s", type=click.IntRange(1), default=None,
              help="Devices refuse the bundle after this many seconds.")
def sign(kind: str, version: int, base: int | None, key_path: str, in_path: str,
         out_path: str, target: str | None, expires_in_s: int | None) -> None:
    """Sign a bundle with the center key; prints a summary (JSON).

    The table is first checked as a device would check it (decoded and applied to a scratch
    device database): a table a device would refuse is not signed, exit status 2, with the
    file, row or field to fix, and --out is not written.
    """
    key = load_private_key(key_path)
    with _refusals():
        source = read_source(kind, in_path)
        b, payload = seal(source, key, version, base=base, target=target,
                          expires_in_s=expires_in_s)
    write_file(out_path, payload)
    click.echo(json.dumps(_summary(b, len(payload))))


# --------------------------------------------------------------------------------------------
# build


def _delta(old: Sequence[Entry], new: Sequence[Entry]) -> tuple[list[Entry], list[int]]:
    """``(add, remove)`` taking the sorted list ``old`` to the sorted list ``new``: cards new
    or with another reason or UID are added (a device replaces a listed card's entry), cards
    gone are removed. Applied on ``old`` as a device applies it, gives exactly ``new``."""
    add: list[Entry] = []
    remove: list[int] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if j == len(new) or (i < len(old) and old[i][0] < new[j][0]):
            remove.append(old[i][0])
            i += 1
        elif i == len(old) or new[j][0] < old[i][0]:
            add.append(new[j])
            j += 1
        else:
            if old[i] != new[j]:
                add.append(new[j])
            i += 1
            j += 1
    return add, remove


def _blacklist_side(path: str, public: Ed25519PublicKey | None) -> tuple[list[Entry], int | None]:
    """A full list from a CSV, a JSON body or a signed full-list bundle (then its version)."""
    p = Path(path)
    if _is_signed(p):
        b = _read_signed(p, public)
        if b.kind != "blacklist":
            raise BundleRefused(f"{path} is a {b.kind} bundle; a delta is built from two full "
                                "blacklists")
        return sorted(b.body["entries"], key=itemgetter(0)), b.version
    return read_source("blacklist", p).body["entries"], None


def _credit_sources(key: Ed25519PrivateKey, from_path: str | None, options: dict[str, Any]
                    ) -> list[Source]:
    """Allowances from the options or a CSV (one per dealer), signed by the center key as
    the top-up terminal demands (``CreditAllowance.verify``)."""
    from firmware.apps.topup import CreditAllowance

    if from_path is not None and Path(from_path).suffix.lower() != ".csv":
        source = read_source("credit", from_path)
        return [source]
    if from_path is not None:
        rows = list(_csv_dicts(Path(from_path), _CREDIT_COLUMNS, _CREDIT_COLUMNS))
        if not rows:
            raise BundleSourceError(f"{from_path}: no allowance rows")
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("dealer", "amount", "valid_until")
                   if options.get(n) is None]
        if missing:
            raise click.UsageError(f"credit needs --from CSV or {', '.join(missing)}")
        rows = [("options", {
            "dealer_id": options["dealer"], "amount": options["amount"],
            "allowance_id": options.get("allowance_id") or "",
            "valid_from": options.get("valid_from") or str(int(time.time())),
            "valid_until": options["valid_until"]})]
    out = []
    seen: dict[str, str] = {}
    for at, row in rows:
        dealer = row["dealer_id"]
        try:
            cfg_topic("credit", dealer)
        except ProtocolError:
            raise BundleSourceError(f"{at}: dealer_id {dealer!r} is not a device id") from None
        if dealer in seen:
            raise BundleSourceError(f"{at}: dealer {dealer} already has an allowance at "
                                    f"{seen[dealer]} (one allowance per dealer and bundle)")
        seen[dealer] = at
        try:
            kurus = Decimal(row["amount"].replace(",", ".")) * 100
        except InvalidOperation:
            raise BundleSourceError(f"{at}: amount {row['amount']!r} is not a TL amount") from None
        if kurus != kurus.to_integral_value() or kurus < 0:
            raise BundleSourceError(f"{at}: amount must be TL with at most 2 decimals, >= 0")
        valid_from = parse_time(row["valid_from"], f"{at}: valid_from", unit_ms=False)
        valid_until = parse_time(row["valid_until"], f"{at}: valid_until", unit_ms=False)
        allowance_id = row.get("allowance_id") or (
            f"alw-{dealer}-{datetime.fromtimestamp(valid_from, LOCAL_TZ):%Y%m%d}")
        unsigned = CreditAllowance(dealer, allowance_id, int(kurus), valid_from, valid_until,
                                   b"")
        signed = dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_bytes()))
        out.append(Source("credit", {"allowance": json.loads(signed.to_json())}, at))
    return out


def _unsigned_file(source: Source, base: int | None) -> bytes:
    """The unsigned body as ``afc bundle sign --in`` reads it."""
    body = source.body
    if source.kind == "fares":
        return body["toml"].encode("utf-8")

    def entries(items: Iterable[Entry]) -> list[list[Any]]:
        return [[c, r, None if u is None else u.hex()] for c, r, u in items]

    if source.kind == "blacklist":
        data: dict[str, Any] = {"entries": entries(body["entries"])}
    elif source.kind == "blacklist-delta":
        data = {"add": entries(body["add"]), "remove": body["remove"]}
        if base is not None:
            data["base"] = base
    else:
        data = dict(body)
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _counts(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    if kind == "blacklist":
        return {"entries": len(body["entries"])}
    if kind == "blacklist-delta":
        return {"add": len(body["add"]), "remove": len(body["remove"])}
    if kind == "actions":
        return {"actions": len(body["actions"])}
    if kind == "fares":
        return {"name": body["name"]}
    if kind == "credit":
        a = body["allowance"]
        return {"dealer_id": a["dealer_id"], "allowance_id": a["allowance_id"],
                "amount": a["amount"]}
    return {"settings": sorted(body["settings"])}


@bundle.command("build")
@click.argument("kind", type=click.Choice(BUNDLE_KINDS))
@click.option("--from", "from_path", type=click.Path(exists=True, dir_okay=False),
              help="fares: tariff TOML or JSON. blacklist: CSV or JSON. actions: CSV or JSON. "
              "credit: CSV 'dealer_id,allowance_id,amount,valid_from,valid_until' (amount in "
              "TL) or an allowance JSON. agent: settings TOML or JSON.")
@click.option("--old", "old_path", type=click.Path(exists=True, dir_okay=False),
              help="blacklist-delta: the full list the devices hold (CSV, JSON or its signed "
              "bundle, whose version is then the default --base).")
@click.option("--new", "new_path", type=click.Path(exists=True, dir_okay=False),
              help="blacklist-delta: the full list wanted (CSV, JSON or a signed bundle).")
@click.option("--dealer", help="credit: the dealer terminal's device id.")
@click.option("--allowance-id", help="credit: default alw-DEALER-YYYYMMDD.")
@click.option("--amount", help="credit: TL, at most 2 decimals (the allowance holds kuruş).")
@click.option("--valid-from", help="credit: ISO date/date-time (Konya time) or Unix s; "
              "default now.")
@click.option("--valid-until", help="credit: end of validity, exclusive (same forms).")
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="The signed bundle, or with no --sign the unsigned body as 'sign --in' "
              "reads it. A folder for a credit CSV (one file per dealer).")
@click.option("--sign", "do_sign", is_flag=True, help="Sign in the same step (needs --key).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False),
              help="The center's Ed25519 private key (also signs a credit allowance itself).")
@click.option("--version", "version", type=click.IntRange(1), default=None,
              help="With --sign. fares: default the tariff's own version.")
@click.option("--base", type=click.IntRange(0), default=None,
              help="blacklist-delta: the version --old was published as.")
@click.option("--target", default=None, help="Device id, for a bundle meant for one device.")
@click.option("--expires-in-s", type=click.IntRange(1), default=None,
              help="With --sign: devices refuse the bundle after this many seconds.")
@click.option("--center-public", default=None,
              help="Verify signed --old/--new bundles against this key (default: --key's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def build(kind: str, from_path: str | None, old_path: str | None, new_path: str | None,
          dealer: str | None, allowance_id: str | None, amount: str | None,
          valid_from: str | None, valid_until: str | None, out_path: str, do_sign: bool,
          key_path: str | None, version: int | None, base: int | None, target: str | None,
          expires_in_s: int | None, center_public: str | None, as_json: bool) -> None:
    """Build a bundle body from operator sources, checked as a device checks it.

    \b
      fares            --from tariff.toml|.json
      blacklist        --from list.csv|.json        (sorted; a card listed twice is refused)
      blacklist-delta  --old held.csv --new wanted.csv --base N   (adds, removals)
      actions          --from actions.csv|.json     (CSV header: action_id,card_number,kind,
                                                     valid_until,amount,product_id,card_seq)
      credit           --dealer ID --amount TL --valid-until DATE [--valid-from DATE]
                       or --from dealers.csv (one bundle per dealer, --out a folder)
      agent            --from settings.toml|.json
    Without --sign, writes the unsigned body for 'afc bundle sign --in'; with --sign --key
    --version, the signed bundle. Exit status 2 with the row or field if a device would
    refuse the table; nothing is written then.
    """
    key = load_private_key(key_path) if key_path else None
    if do_sign and (key is None or (version is None and kind != "fares")):
        raise click.UsageError("--sign needs --key and --version")
    if kind == "credit" and key is None:
        raise click.UsageError("credit needs --key: the allowance itself is signed by the "
                               "center key")
    if kind == "blacklist-delta" and (old_path is None or new_path is None):
        raise click.UsageError("blacklist-delta needs --old and --new")
    if kind not in ("blacklist-delta", "credit") and from_path is None:
        raise click.UsageError(f"{kind} needs --from")
    public = (load_public_key(center_public) if center_public
              else key.public_key() if key is not None else None)
    with _refusals():
        if kind == "blacklist-delta":
            assert old_path is not None and new_path is not None
            old, old_version = _blacklist_side(old_path, public)
            new, _ = _blacklist_side(new_path, public)
            base = base if base is not None else old_version
            add, remove = _delta(old, new)
            sources = [Source(kind, {"add": add, "remove": remove}, new_path, base=base)]
            extra: dict[str, Any] = {"old_entries": len(old), "new_entries": len(new)}
        elif kind == "credit":
            assert key is not None
            sources = _credit_sources(key, from_path, {
                "dealer": dealer, "allowance_id": allowance_id, "amount": amount,
                "valid_from": valid_from, "valid_until": valid_until})
            extra = {}
        else:
            assert from_path is not None
            sources = [read_source(kind, from_path)]
            extra = {}
        many = len(sources) > 1 or (kind == "credit" and from_path is not None
                                    and Path(from_path).suffix.lower() == ".csv")
        out_dir = Path(out_path)
        results = []
        outputs: list[tuple[Path, bytes]] = []
        # Unsigned output is checked the same way, signed by a throw-away key (a credit
        # allowance: by the center key, which its inner signature must verify against).
        check_key = key if key is not None else Ed25519PrivateKey.generate()
        if kind == "blacklist-delta" and base is None:
            raise click.UsageError("blacklist-delta needs --base (or a signed --old)")
        for source in sources:  # every one checked before any file is written
            if kind == "fares" and version is None:
                version = tomllib.loads(source.body["toml"])["version"]
            check_version = version or (base + 1 if base is not None else 1)
            b, payload = seal(source, check_key, check_version, base=base, target=target,
                              expires_in_s=expires_in_s)
            summary: dict[str, Any] = {**_summary(b, len(payload)), **_counts(kind, b.body),
                                       "signed": do_sign, **extra}
            if do_sign:
                data = payload
            else:
                data = _unsigned_file(source, base)
                for name in ("version", "ts", "expires", "topic"):
                    summary.pop(name)
            name = (f"credit-{source.body['allowance']['dealer_id']}"
                    f"{'.bundle' if do_sign else '.json'}") if many else None
            dest = out_dir / name if name else Path(out_path)
            outputs.append((dest, data))
            results.append({**summary, "out": str(dest), "bytes": len(data)})
    if many:
        out_dir.mkdir(parents=True, exist_ok=True)
    for dest, data in outputs:
        write_file(dest, data)
    if as_json:
        click.echo(json.dumps(results if many else results[0]))
        return
    for r in results:
        what = ", ".join(f"{k} {r[k]}" for k in ("entries", "add", "remove", "actions", "name",
                                                   "dealer_id", "allowance_id", "amount",
                                                   "settings") if k in r)
        state = (f"signed version {r['version']}" + (f" on base {r['base']}" if r.get("base")
                 is not None else "") if r["signed"] else "unsigned body")
        click.echo(f"{r['kind']}: {what}; {state}; {r['bytes']} bytes -> {r['out']}")


# --------------------------------------------------------------------------------------------
# verify, publish


@bundle.command("verify")
@click.option("--center-public", required=True,
              help="The center's public key: 64 hex digits or a PEM file.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--device", "device_id", default=None,
              help="Also check the bundle is for this device (or for the whole fleet).")
def verify(center_public: str, in_path: str, device_id: str | None) -> None:
    """Check a bundle's signature, expiry and contents as a device would; prints a summary.

    Exit status 1 with the reason if a device would refuse it (the version check against a
    device's current version is the device's own).
    """
    payload = _read_payload(in_path)
    b = decode_bundle(payload, load_public_key(center_public),
                      now_ms=time.time_ns() // 1_000_000, device_id=device_id)
    click.echo(json.dumps({"valid": True, **_summary(b, len(payload))}))


def _read_payload(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    if len(data) > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"{path}: {len(data)} bytes is more than a bundle may be")
    return data


def _topic_of(payload: bytes) -> str:
    """The topic a signed bundle belongs on, read from its (unverified) header."""
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:  # any garbage: cbor2 raises several types
        raise ProtocolError(f"not a bundle: {exc!s:.80}") from None
    if not isinstance(msg, dict) or msg.get("t") != "bundle":
        raise ProtocolError("not a bundle")
    return cfg_topic(msg.get("kind"), msg.get("target"))


@bundle.command("publish")
@click.option("--broker", required=True, help="Broker as HOST:PORT, e.g. 127.0.0.1:1883.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--center-public", default=None,
              help="Verify against this key before publishing (recommended).")
def publish(broker: str, in_path: str, center_public: str | None) -> None:
    """Publish a signed bundle retained on afc/v1/cfg/KIND[/DEVICE], QoS 1.

    Retained: every device gets it on connect, also one that was offline when it was sent.
    Publishing an older version is harmless (devices refuse rollbacks) but replaces the
    retained message, so newly connecting devices would miss the newer one: publish the
    newest.
    """
    from simulators.center.mqtt import client_id, connect, parse_broker

    payload = _read_payload(in_path)
    if center_public is not None:
        decode_bundle(payload, load_public_key(center_public), now_ms=time.time_ns() // 1_000_000)
    topic = _topic_of(payload)
    address = parse_broker(broker)

    async def send() -> None:
        async with connect(address, client_id("bundle")) as client:
            await client.publish(topic, payload, qos=1, retain=True, timeout=30)

    try:
        asyncio.run(send())
    except aiomqtt.MqttError as exc:
        raise CenterError(f"cannot publish to {broker}: {exc}") from None
    click.echo(f"published {len(payload)} bytes retained on {topic}")


# --------------------------------------------------------------------------------------------
# diff


def _is_signed(path: Path) -> bool:
    """A signed bundle is a CBOR map (first byte 0xa0..0xbf); operator files are text."""
    try:
        with path.open("rb") as fh:
            first = fh.read(1)
    except OSError as exc:
        raise CenterError(f"cannot read {path}: {exc}") from None
    return bool(first) and 0xA0 <= first[0] <= 0xBF


def _read_signed(path: Path, public: Ed25519PublicKey | None) -> Bundle:
    """A signed bundle, verified when a key is given, else only decoded (``diff`` then says
    the signature was not checked). Expiry is not held against it: it is being read, not
    applied."""
    payload = _read_payload(path)
    try:
        if public is not None:
            return decode_bundle(payload, public, now_ms=0)
        return protocol.peek_bundle(payload)
    except ProtocolError as exc:
        raise BundleRefused(f"{path}: {exc}") from None


_KIND_BY_KEY = {"entries": "blacklist", "add": "blacklist-delta", "remove": "blacklist-delta",
                "actions": "actions", "allowance": "credit", "settings": "agent",
                "fare_products": "fares", "dealer_id": "credit"}


def _guess_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines()
                      if ln.strip() and not ln.startswith("#")), "")
        return "actions" if first.startswith("action_id") else "blacklist"
    if suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            return "fares"
        return "fares" if "fare_products" in data else "agent"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, list):
        return "actions"
    for key in data if isinstance(data, dict) else ():
        if key in _KIND_BY_KEY:
            return _KIND_BY_KEY[key]
    raise BundleRefused(f"{path}: cannot tell what kind of bundle body this is; give --kind")


@dataclass
class _Side:
    path: str
    kind: str
    body: dict[str, Any]
    bundle: Bundle | None = None
    verified: bool = False


def _side(path: str, kind: str | None, public: Ed25519PublicKey | None) -> _Side:
    p = Path(path)
    if _is_signed(p):
        b = _read_signed(p, public)
        return _Side(path, b.kind, b.body, b, public is not None)
    kind = kind or _guess_kind(p)
    return _Side(path, kind, read_source(kind, p).body)


def _plain(value: Any) -> Any:
    """Dataclasses, enums, mappings and sets of the fare engine as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _keyed_changes(section: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict]:
    """Items of one section added, removed or changed (with the fields that changed)."""
    out: list[dict[str, Any]] = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            out.append({"section": section, "id": key, "change": "removed", "old": a[key]})
        elif key not in a:
            out.append({"section": section, "id": key, "change": "added", "new": b[key]})
        elif a[key] != b[key]:
            fa, fb = _flat(a[key]), _flat(b[key])
            fields = {f: [fa.get(f), fb.get(f)] for f in sorted(set(fa) | set(fb))
                      if fa.get(f) != fb.get(f)}
            out.append({"section": section, "id": key, "change": "changed", "fields": fields})
    return out


def _fares_items(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A tariff as sections of items keyed the way the fare engine keys them (so two rules
    the engine would call overlapping have the same key), defaults filled in."""
    from firmware.core.fares import FareTable

    t = FareTable.from_toml(body["toml"])
    scalars = {name: getattr(t, name) for name in ("version", "name", "timezone", "currency",
                                                   "max_balance", "pass_validity_days",
                                                   "max_riders")}
    legs = {f"{r.network_id}/{r.rider_category_id or '*'}": _plain(r) for r in t.fare_leg_rules}
    transfers = {f"{r.from_leg_group_id or '*'}->{r.to_leg_group_id or '*'}": _plain(r)
                 for r in t.fare_transfer_rules}
    return {
        "tariff": {k: {"value": v} for k, v in scalars.items()},
        "fare_media": _plain(t.fare_media),
        "networks": _plain(t.networks),
        "rider_categories": _plain(t.rider_categories),
        "fare_products": _plain(t.fare_products),
        "fare_leg_rules": legs,
        "fare_transfer_rules": transfers,
        "anti_passback": {"anti_passback": _plain(t.anti_passback)},
        "daily_cap": {k: {"cap": v} for k, v in t.daily_cap.items()},
    }


def _entry_json(e: Entry) -> dict[str, Any]:
    return {"card_number": e[0], "reason": e[1], "uid": None if e[2] is None else e[2].hex()}


def _entries_diff(a: Sequence[Entry], b: Sequence[Entry]) -> dict[str, Any]:
    sa, sb = sorted(a, key=itemgetter(0)), sorted(b, key=itemgetter(0))
    add, remove = _delta(sa, sb)
    old = dict((e[0], e) for e in sa) if add else {}
    added = [e for e in add if e[0] not in old]
    changed = [{"card_number": e[0], "old": _entry_json(old[e[0]]), "new": _entry_json(e)}
               for e in add if e[0] in old]
    return {"count": [len(sa), len(sb)], "added": [_entry_json(e) for e in added],
            "removed": remove, "changed": changed}


def diff_bodies(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from body ``a`` to body ``b`` of one kind (decoded bodies, as
    :func:`read_body` gives them or a device decodes them)."""
    if kind == "blacklist":
        return _entries_diff(a["entries"], b["entries"])
    if kind == "blacklist-delta":
        return {"add": _entries_diff(a["add"], b["add"]),
                "remove": {"added": sorted(set(b["remove"]) - set(a["remove"])),
                           "removed": sorted(set(a["remove"]) - set(b["remove"]))}}
    if kind == "fares":
        ia, ib = _fares_items(a), _fares_items(b)
        return {"items": [c for s in ia for c in _keyed_changes(s, ia[s], ib[s])]}
    if kind == "actions":
        ka = {x["action_id"]: x for x in a["actions"]}
        kb = {x["action_id"]: x for x in b["actions"]}
        return {"items": _keyed_changes("actions", ka, kb)}
    if kind == "credit":
        return {"items": _keyed_changes("credit", {"allowance": dict(a["allowance"])},
                                        {"allowance": dict(b["allowance"])})}
    return {"items": _keyed_changes("agent", {"settings": _plain(a["settings"])},
                                    {"settings": _plain(b["settings"])})}


def _has_changes(kind: str, d: Mapping[str, Any]) -> bool:
    if kind == "blacklist":
        return bool(d["added"] or d["removed"] or d["changed"])
    if kind == "blacklist-delta":
        return _has_changes("blacklist", d["add"]) or bool(d["remove"]["added"]
                                                           or d["remove"]["removed"])
    return bool(d["items"])


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 100 else text[:97] + "..."


def _entries_lines(d: Mapping[str, Any], limit: int, label: str) -> list[str]:
    lines = [f"{label}: {d['count'][0]} -> {d['count'][1]} cards ({len(d['added'])} added, "
             f"{len(d['removed'])} removed, {len(d['changed'])} changed)"]

    def show(items: Sequence[Any], fmt: Callable[[Any], str]) -> None:
        lines.extend(fmt(x) for x in items[:limit])
        if len(items) > limit:
            lines.append(f"  ... {len(items) - limit} more (--limit, or --json for all)")

    def entry(e: Mapping[str, Any]) -> str:
        return f"card {e['card_number']} reason {e['reason']}" + (
            f" uid {e['uid']}" if e["uid"] else "")

    show(d["added"], lambda e: "+ " + entry(e))
    show(d["removed"], lambda c: f"- card {c}")
    show(d["changed"], lambda c: f"~ {entry(c['old'])} -> reason {c['new']['reason']}"
         + (f" uid {c['new']['uid']}" if c["new"]["uid"] else " no uid"))
    return lines


def _human(kind: str, d: Mapping[str, Any], limit: int) -> list[str]:
    if kind == "blacklist":
        return _entries_lines(d, limit, "blacklist")
    if kind == "blacklist-delta":
        lines = _entries_lines(d["add"], limit, "delta adds")
        r = d["remove"]
        lines.append(f"delta removals: {len(r['added'])} more, {len(r['removed'])} fewer")
        lines.extend(f"+ remove card {c}" for c in r["added"][:limit])
        lines.extend(f"- remove card {c}" for c in r["removed"][:limit])
        return lines
    lines = []
    for c in d["items"][:limit * 10]:
        name = f"{c['section']}.{c['id']}"
        if c["change"] == "added":
            lines.append(f"+ {name}: {_short(c['new'])}")
        elif c["change"] == "removed":
            lines.append(f"- {name}: {_short(c['old'])}")
        else:
            parts = "; ".join(f"{f or 'value'} {_short(v[0])} -> {_short(v[1])}"
                              for f, v in c["fields"].items())
            lines.append(f"~ {name}: {parts}")
    if len(d["items"]) > limit * 10:
        lines.append(f"... {len(d['items']) - limit * 10} more (--json for all)")
    return lines


_HEADER = ("kind", "version", "base", "target", "expires")


@bundle.command("diff")
@click.argument("a_path", metavar="A", type=click.Path(exists=True, dir_okay=False))
@click.argument("b_path", metavar="B", type=click.Path(exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(BUNDLE_KINDS), default=None,
              help="Kind of unsigned bodies (guessed from the file otherwise).")
@click.option("--center-public", default=None,
              help="Verify signed bundles against this key (else they are only decoded).")
@click.option("--limit", type=click.IntRange(1), default=DEFAULT_DIFF_LIMIT, show_default=True,
              help="Cards listed per group in the text output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def diff(ctx: click.Context, a_path: str, b_path: str, kind: str | None,
         center_public: str | None, limit: int, as_json: bool) -> None:
    """What changed from bundle A to bundle B: signed bundles or unsigned bodies of one kind.

    Fare tables: products, prices, categories, networks and rules added, removed or changed
    (rules keyed as the fare engine keys them). Blacklists: cards added, removed, changed,
    and the counts. Action lists: by action id. Credit, agent settings: by field. For signed
    bundles the header too (version, base, target, expiry; not the signing time).

    Exit status as diff(1): 0 the same, 1 different, 2 trouble (unreadable, invalid, or
    not comparable).
    """
    try:
        public = load_public_key(center_public) if center_public else None
        with _refusals():
            a, b = _side(a_path, kind, public), _side(b_path, kind, public)
            if a.kind != b.kind:
                raise BundleRefused(f"cannot compare {a_path} (kind {a.kind}) with {b_path} "
                                    f"(kind {b.kind})")
            changes = diff_bodies(a.kind, a.body, b.body)
    except (CoreError, OSError, UnicodeDecodeError) as exc:  # trouble (2), never "different"
        raise BundleRefused(exc) from None
    header = {}
    if a.bundle is not None and b.bundle is not None:
        header = {f: [getattr(a.bundle, f), getattr(b.bundle, f)] for f in _HEADER
                  if getattr(a.bundle, f) != getattr(b.bundle, f)}
    different = bool(header) or _has_changes(a.kind, changes)
    if as_json:
        def side(s: _Side) -> dict[str, Any]:
            info: dict[str, Any] = {"path": s.path, "signed": s.bundle is not None}
            if s.bundle is not None:
                info.update({f: getattr(s.bundle, f) for f in (*_HEADER, "ts")},
                            signature="verified" if s.verified else "not checked")
            return info

        click.echo(json.dumps({"kind": a.kind, "same": not different, "a": side(a),
                               "b": side(b), "header": header, "changes": changes}))
    else:
        for s, mark in ((a, "---"), (b, "+++")):
            what = (f"{s.kind} version {s.bundle.version}, signature "
                    f"{'verified' if s.verified else 'not checked'}") if s.bundle else (
                f"{s.kind} body, unsigned")
            click.echo(f"{mark} {s.path} ({what})")
        for f, (old, new) in header.items():
            click.echo(f"{f}: {old} -> {new}")
        for line in _human(a.kind, changes, limit):
            click.echo(line)
        if not different:
            click.echo("same")
    ctx.exit(1 if different else 0)
