"""The ``afc/v1`` wire protocol, sans-I/O: topics, signed CBOR messages, JSON messages.

This module is the executable form of ``docs/protocol.md``: the agent, the reference center
and the tools build and check every payload here, and nothing here touches a socket, a file
or a clock (times are arguments), so both sides and the tests share one implementation.

Why signed CBOR: a batch of 100 taps must fit in about 4.8 kB with its signature (the wire
budget of DESIGN.md), the center must be able to prove which device sent which record, and a
device must refuse configuration that the center did not sign. Ed25519 over a canonical
re-encoding (with a per-type domain prefix) gives both with one 64-byte signature per message.

Every ``decode_*``/``open_*`` function raises :class:`~edge_agent.errors.ProtocolError` (or a
subclass) for anything it does not accept, garbage included, and never another exception:
receivers log and drop on that one type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import itertools
import json
import operator
import re
import sys
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.stores.journal import (
    KIND_TAP,
    OPTIONAL_INT_FIELDS,
    OPTIONAL_TEXT_FIELDS,
    PHASE_DONE,
    PHASE_EVENT,
    PHASE_INTENT,
    JournalRecord,
)

from .errors import Expired, ProtocolError, SignatureInvalid, UnknownDevice

__all__ = [
    "BUNDLE_KINDS",
    "COMMAND_NAMES",
    "DEV_LEAVES",
    "MAX_BUNDLE_BYTES",
    "MAX_CMD_BYTES",
    "MAX_JSON_BYTES",
    "MAX_TXN_BYTES",
    "PROTOCOL_VERSION",
    "RECORD_FIELDS",
    "Ack",
    "Batch",
    "Bundle",
    "Command",
    "Reply",
    "cfg_topic",
    "check_blacklist_entry",
    "decode_ack",
    "decode_batch",
    "decode_bundle",
    "decode_command",
    "decode_json_message",
    "decode_reply",
    "dev_topic",
    "ed25519_json_signer",
    "encode_ack",
    "encode_batch",
    "encode_batch_columns",
    "encode_bundle",
    "encode_command",
    "encode_json_message",
    "encode_reply",
    "hmac_json_signer",
    "open_message",
    "parse_cfg_topic",
    "parse_dev_topic",
    "peek_batch_range",
    "peek_bundle",
    "record_columns",
    "sign_message",
    "verify_json_signature",
    "wire_bytes_per_txn",
    "wire_sample",
]

PROTOCOL_VERSION = 1
MAX_TXN_BYTES = 1 << 20
MAX_CMD_BYTES = 64 << 10
MAX_JSON_BYTES = 64 << 10
MAX_BUNDLE_BYTES = 64 << 20

#: Most records one batch may carry (the agent sends 100 to a few thousand).
MAX_BATCH_RECORDS = 100_000
#: Decompressed size limits: a small payload must not inflate into a memory exhaustion.
MAX_TXN_BODY_BYTES = 32 << 20
MAX_BUNDLE_BODY_BYTES = 256 << 20

TOPIC_PREFIX = "afc/v1/"
DEV_LEAVES = ("txn", "ack", "telemetry", "event", "status", "cmd", "reply")
BUNDLE_KINDS = ("fares", "blacklist", "blacklist-delta", "actions", "credit", "agent")
COMMAND_NAMES = ("ping", "send-logs", "resync-config", "reboot-app")
MESSAGE_TYPES = ("txn", "ack", "bundle", "cmd", "reply")

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_U64 = 1 << 64
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_UID_SIZES = (4, 7, 10)
_TEXT_MAX = 64
_MAX_DEPTH = 32

PublicKeyFor = Callable[[str], Ed25519PublicKey | None]


# --------------------------------------------------------------------------------------------
# Topics


def _check_device_id(device_id: object, what: str = "device id") -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ProtocolError(
            f"{what} must be 1 to 64 characters A-Z a-z 0-9 . _ -, got {device_id!r}"
        )
    return device_id


def dev_topic(device_id: str, leaf: str) -> str:
    """``afc/v1/dev/{id}/{leaf}``; refuses an id or a leaf a broker ACL would not match."""
    _check_device_id(device_id)
    if leaf not in DEV_LEAVES:
        raise ProtocolError(f"unknown device topic leaf {leaf!r} (one of {', '.join(DEV_LEAVES)})")
    return f"{TOPIC_PREFIX}dev/{device_id}/{leaf}"


def cfg_topic(kind: str, device_id: str | None = None) -> str:
    """``afc/v1/cfg/{kind}`` (the fleet) or ``afc/v1/cfg/{kind}/{id}`` (one device)."""
    if kind not in BUNDLE_KINDS:
        raise ProtocolError(f"unknown bundle kind {kind!r} (one of {', '.join(BUNDLE_KINDS)})")
    if device_id is None:
        return f"{TOPIC_PREFIX}cfg/{kind}"
    return f"{TOPIC_PREFIX}cfg/{kind}/{_check_device_id(device_id)}"


def parse_dev_topic(topic: str) -> tuple[str, str]:
    """``(device_id, leaf)`` of a device topic, or :class:`ProtocolError`."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 5 or parts[0] != "afc" or parts[1] != "v1" or parts[2] != "dev":
        raise ProtocolError(f"not an afc/v1 device topic: {topic!r}")
    device_id, leaf = parts[3], parts[4]
    _check_device_id(device_id)
    if leaf not in DEV_LEAVES:
        raise ProtocolError(f"unknown device topic leaf in {topic!r}")
    return device_id, leaf


def parse_cfg_topic(topic: str) -> tuple[str, str | None]:
    """``(kind, device_id or None)`` of a configuration topic, or :class:`ProtocolError`."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) not in (4, 5) or parts[:3] != ["afc", "v1", "cfg"]:
        raise ProtocolError(f"not an afc/v1 configuration topic: {topic!r}")
    if parts[3] not in BUNDLE_KINDS:
        raise ProtocolError(f"unknown bundle kind in {topic!r}")
    return parts[3], (_check_device_id(parts[4]) if len(parts) == 5 else None)


# --------------------------------------------------------------------------------------------
# Signed CBOR messages


def _domain(t: str) -> bytes:
    return b"afc/v1/" + t.encode("ascii") + b"\x00"


def _canonical(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _check_plain(obj: Any, budget: int) -> None:
    """Refuse anything but plain CBOR data (maps with text keys, arrays, text, bytes, ints,
    floats, bools, null), nesting deeper than 32, shared or cyclic containers (CBOR value
    sharing, tags 28/29) and string references that would expand past ``budget`` bytes.

    Signatures are checked over a canonical re-encoding; without this a tiny payload with
    shared references could expand into gigabytes when re-encoded, and tagged objects
    (dates, decimals) would not re-encode to the bytes that were signed.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, 0)]
    total = 0
    while stack:
        item, depth = stack.pop()
        total += 1
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (dict, list)):
            if depth >= _MAX_DEPTH:
                raise ProtocolError(f"message nested deeper than {_MAX_DEPTH} levels")
            if id(item) in seen:
                raise ProtocolError("message uses shared or cyclic CBOR values")
            seen.add(id(item))
            if isinstance(item, dict):
                for key, value in item.items():
                    if not isinstance(key, str):
                        raise ProtocolError(f"message map key is not text: {key!r:.40}")
                    total += len(key)
                    stack.append((value, depth + 1))
            else:
                stack.extend((value, depth + 1) for value in item)
        elif item is None or isinstance(item, (int, float)):
            pass
        else:
            raise ProtocolError(f"message holds a value of type {type(item).__name__}")
        if total > budget:
            raise ProtocolError("message expands beyond its size limit")


def sign_message(fields: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Sign ``fields`` (which must hold ``t``) as a CBOR message; adds ``v`` and ``sig``.

    The signature covers ``b"afc/v1/" + t + b"\\x00" + canonical_cbor(message without sig)``.
    """
    msg = dict(fields)
    t = msg.get("t")
    if t not in MESSAGE_TYPES:
        raise ProtocolError(f"message type must be one of {', '.join(MESSAGE_TYPES)}, got {t!r}")
    if "sig" in msg:
        raise ProtocolError("fields to sign already hold a 'sig'")
    msg["v"] = PROTOCOL_VERSION
    _check_plain(msg, 1 << 40)
    msg["sig"] = key.sign(_domain(t) + _canonical(msg))
    return _canonical(msg)


def open_message(
    payload: bytes,
    expected_t: str,
    key: Ed25519PublicKey | PublicKeyFor,
    *,
    max_bytes: int,
) -> dict[str, Any]:
    """Check and open a signed CBOR message; returns its fields without ``sig``.

    Checks, in order: size, CBOR, a map of plain data, ``v``, ``t``, ``dev`` (a valid device
    id when present; required when ``key`` is a per-device lookup, which returns None for an
    unknown device), then the signature. Raises :class:`ProtocolError`,
    :class:`UnknownDevice` or :class:`SignatureInvalid`.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise ProtocolError(f"{expected_t} message of {len(payload)} bytes exceeds {max_bytes}")
    if not payload:
        raise ProtocolError(f"empty {expected_t} message")
    msg = _loads(payload, f"{expected_t} message")
    if not isinstance(msg, dict):
        raise ProtocolError(f"{expected_t} message is not a CBOR map")
    _check_plain(msg, 2 * max_bytes + 4096)
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{expected_t} message has protocol version {v!r:.20}, this side speaks "
            f"{PROTOCOL_VERSION}: upgrade the older side"
        )
    if msg.get("t") != expected_t:
        raise ProtocolError(f"expected a {expected_t!r} message, got type {msg.get('t')!r:.40}")
    sig = msg.pop("sig", None)
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise ProtocolError(f"{expected_t} message has no 64-byte Ed25519 'sig'")
    dev = msg.get("dev")
    if dev is not None:
        _check_device_id(dev, f"{expected_t} message 'dev'")
    if isinstance(key, Ed25519PublicKey):
        public: Ed25519PublicKey | None = key
    else:
        if dev is None:
            raise ProtocolError(f"{expected_t} message has no 'dev' field")
        public = key(dev)
        if public is None:
            raise UnknownDevice(f"{expected_t} message from unknown device {dev!r}")
    try:
        public.verify(sig, _domain(expected_t) + _canonical(msg))
    except InvalidSignature:
        who = f" from {dev!r}" if dev is not None else ""
        raise SignatureInvalid(
            f"{expected_t} message{who}: signature does not verify (forged, corrupted, or "
            f"signed with a key other than the one pinned here)"
        ) from None
    except Exception as exc:  # a value canonical CBOR cannot re-encode
        raise ProtocolError(f"{expected_t} message cannot be re-encoded: {exc!s:.80}") from None
    return msg


# -- field readers: each names the field and the message in its error ------------------------


def _int(
    msg: Mapping[str, Any],
    name: str,
    what: str,
    lo: int = _I64_MIN,
    hi: int = _I64_MAX,
    *,
    optional: bool = False,
) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what} field {name!r} must be an integer in {lo}..{hi}")
    return value


def _text(
    msg: Mapping[str, Any], name: str, what: str, *, optional: bool = False, limit: int = 256
) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ProtocolError(f"{what} field {name!r} must be text of 1 to {limit} characters")
    return value


def _map(msg: Mapping[str, Any], name: str, what: str, *, optional: bool = False) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} field {name!r} must be a map")
    return value


def _inflate(data: Any, limit: int, what: str) -> bytes:
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what} body must be bytes")
    try:
        d = zlib.decompressobj(wbits=-15)
        out = d.decompress(data, limit)
        if not d.eof:
            # output pending beyond the limit (input may be consumed already), or truncated
            if d.decompress(d.unconsumed_tail, 1):
                raise ProtocolError(f"{what} body inflates beyond {limit} bytes")
            raise ProtocolError(f"{what} body is truncated DEFLATE data")
    except zlib.error as exc:
        raise ProtocolError(f"{what} body is not valid DEFLATE data: {exc}") from None
    if d.unused_data:
        raise ProtocolError(f"{what} body has bytes after its DEFLATE stream")
    return out


def _loads(data: bytes, what: str) -> Any:
    """One CBOR item filling ``data`` exactly; trailing bytes are refused."""
    try:
        stream = io.BytesIO(data)
        obj = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several types on garbage; all mean "malformed"
        raise ProtocolError(f"{what} is not valid CBOR: {exc!s:.120}") from None
    if stream.tell() != len(data):
        raise ProtocolError(f"{what} has bytes after its CBOR item")
    return obj


def _deflate(data: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    return c.compress(data) + c.flush()


def _load_body(data: bytes, limit: int, what: str, *, check_plain: bool = True) -> Any:
    obj = _loads(_inflate(data, limit, what), f"{what} body")
    if check_plain:  # batch bodies skip it: their decoder checks every column's types itself
        _check_plain(obj, 2 * limit)
    return obj


# --------------------------------------------------------------------------------------------
# Transaction batches


#: The fields of a journal record that travel, in :class:`JournalRecord` order: all but the
#: device-local ``mac`` and the ``device_id`` (the batch's). A :class:`Batch` holds one
#: column per field.
RECORD_FIELDS = tuple(
    f.name for f in dataclasses.fields(JournalRecord) if f.name not in ("device_id", "mac")
)


class Batch:
    """A verified batch: records oldest first, ``device_id`` set, ``mac`` empty.

    A decoded batch keeps its records as columns (one list per name of
    :data:`RECORD_FIELDS`, record order): the center stores rows straight from the columns,
    and building one frozen :class:`JournalRecord` per record would cost it more CPU than
    decoding and verifying the batch. :attr:`records` builds them on first use; a batch made
    from records (tests) gives its columns from them. Immutable, like the records.
    """

    __slots__ = ("_columns", "_records", "device_id", "first", "last", "ts")

    device_id: str
    first: int
    last: int
    ts: int
    _records: tuple[JournalRecord, ...] | None
    _columns: Mapping[str, Sequence[Any]] | None

    def __init__(
        self,
        device_id: str,
        first: int,
        last: int,
        ts: int,
        records: Sequence[JournalRecord] | None = None,
        *,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        if (records is None) == (columns is None):
            raise TypeError("a Batch is made from records or from columns (one of the two)")
        if columns is not None and set(columns) != set(RECORD_FIELDS):
            raise TypeError(f"a Batch's columns are exactly {', '.join(RECORD_FIELDS)}")
        init = object.__setattr__
        init(self, "device_id", device_id)
        init(self, "first", first)
        init(self, "last", last)
        init(self, "ts", ts)
        init(self, "_records", None if records is None else tuple(records))
        init(self, "_columns", columns)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Batch is immutable (cannot set {name!r})")

    @property
    def count(self) -> int:
        """How many records the batch holds."""
        if self._records is not None:
            return len(self._records)
        assert self._columns is not None
        return len(self._columns["seq"])

    @property
    def records(self) -> tuple[JournalRecord, ...]:
        """The records as :class:`JournalRecord` objects (built once, on first use)."""
        if self._records is None:
            assert self._columns is not None
            dev = self.device_id
            records = tuple(
                JournalRecord(*values, device_id=dev)
                for values in zip(*(self._columns[name] for name in RECORD_FIELDS), strict=True)
            )
            object.__setattr__(self, "_records", records)
            return records
        return self._records

    def column(self, name: str) -> Sequence[Any]:
        """Field ``name`` (one of :data:`RECORD_FIELDS`) of every record, oldest first."""
        if name not in RECORD_FIELDS:
            raise KeyError(f"no record column {name!r}")
        if self._columns is not None:
            return self._columns[name]
        assert self._records is not None
        return [getattr(rec, name) for rec in self._records]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.device_id, self.first, self.last, self.ts, self.records) == (
            other.device_id, other.first, other.last, other.ts, other.records
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Batch(device_id={self.device_id!r}, first={self.first}, last={self.last}, "
                f"ts={self.ts}, count={self.count})")


# Fields a done record usually copies from its intent (journal.done's defaults and the
# planned counter/balance): coded as one bit each in the record's "eq" mask.
_REF_FIELDS = ("kind", "time", "card_number", "uid", "action_id", "counter_after", "balance_after")
_FLAG = {name: 1 << bit for bit, name in enumerate(_REF_FIELDS)}
# Text fields coded as indexes into the body's string table ("S"); 0 is None.
_DICT_COLS = (
    ("phase", "ph"),
    ("kind", "k"),
    ("outcome", "o"),
    ("line", "ln"),
    ("vehicle", "vh"),
    ("validator_id", "vi"),
    ("action_id", "ai"),
)
_PLAIN_COLS = (
    ("card_number", "cn"),
    ("uid", "u"),
    ("counter_before", "cb"),
    ("balance_before", "bb"),
    ("fare", "f"),
    ("product", "p"),
    ("reason", "r"),
)
_PHASES = (PHASE_INTENT, PHASE_DONE, PHASE_EVENT)
_NoneType = type(None)
_ONLY_INT = frozenset((int,))


def _check_record(rec: JournalRecord) -> None:
    """The journal's own validity rules (firmware/stores/journal.py), one record at a time,
    as ProtocolError naming the record and the field. Text must be plain ``str``: the batch
    encoder relies on exact types (equality, the string table)."""

    def bad(msg: str) -> ProtocolError:
        return ProtocolError(f"record seq {rec.seq!r:.24}: {msg}")

    if type(rec.seq) is not int or not 1 <= rec.seq <= _I64_MAX:
        raise bad("seq must be a positive 64-bit integer")
    if type(rec.phase) is not str or rec.phase not in _PHASES:
        raise bad(f"unknown phase {rec.phase!r:.40}")
    for name in ("kind", "outcome"):
        value = getattr(rec, name)
        if (value is not None or name == "kind") and (
            type(value) is not str or not _TOKEN_RE.fullmatch(value)
        ):
            raise bad(f"{name} must be a token of 1 to 32 characters a-z 0-9 -")
    for name in ("time", "link", *OPTIONAL_INT_FIELDS):
        value = getattr(rec, name)
        if (value is not None or name == "time") and (
            type(value) is not int or not _I64_MIN <= value <= _I64_MAX
        ):
            raise bad(f"{name} must be a 64-bit integer")
    if rec.card_number is not None and (
        type(rec.card_number) is not int or not 0 <= rec.card_number < _U64
    ):
        raise bad("card_number must be an unsigned 64-bit integer")
    if rec.uid is not None and (type(rec.uid) is not bytes or len(rec.uid) not in _UID_SIZES):
        raise bad("uid must be 4, 7 or 10 bytes")
    for name in OPTIONAL_TEXT_FIELDS:
        value = getattr(rec, name)
        if value is not None and (
            type(value) is not str or not 0 < len(value) <= _TEXT_MAX or not value.isprintable()
        ):
            raise bad(f"{name} must be printable text of 1 to {_TEXT_MAX} characters")


def _check_records_one_by_one(device_id: str, records: Sequence[JournalRecord]) -> None:
    """Find and report the first bad record (the column checks only say *that* one is)."""
    prev = 0
    for rec in records:
        _check_record(rec)
        if type(rec.device_id) is not str or rec.device_id not in ("", device_id):
            raise ProtocolError(f"record seq {rec.seq} belongs to device {rec.device_id!r:.80}")
        if rec.seq <= prev:
            raise ProtocolError(f"batch records out of order at seq {rec.seq}")
        prev = rec.seq


def record_columns(records: Sequence[JournalRecord]) -> dict[str, list[Any]]:
    """The columns :func:`encode_batch_columns` takes, from record objects: one list per
    field of :data:`RECORD_FIELDS` plus ``device_id``, in record order. (One comprehension
    per field: about half the cost of one attrgetter call per record.)"""
    return {
        "seq": [r.seq for r in records],
        "phase": [r.phase for r in records],
        "kind": [r.kind for r in records],
        "outcome": [r.outcome for r in records],
        "time": [r.time for r in records],
        "link": [r.link for r in records],
        "card_number": [r.card_number for r in records],
        "uid": [r.uid for r in records],
        "counter_before": [r.counter_before for r in records],
        "counter_after": [r.counter_after for r in records],
        "balance_before": [r.balance_before for r in records],
        "balance_after": [r.balance_after for r in records],
        "fare": [r.fare for r in records],
        "product": [r.product for r in records],
        "reason": [r.reason for r in records],
        "line": [r.line for r in records],
        "vehicle": [r.vehicle for r in records],
        "validator_id": [r.validator_id for r in records],
        "action_id": [r.action_id for r in records],
        "device_id": [r.device_id for r in records],
    }


def _ints_ok(values: list[Any], lo: int, hi: int, *, nullable: bool) -> bool:
    """Every value is an ``int`` (not a bool) in ``lo..hi``, or None if ``nullable``."""
    types = set(map(type, values))
    if nullable and _NoneType in types:
        types.discard(_NoneType)
        values = list(filter(None, values))  # drops the Nones (and zeros: in every range here)
        assert lo <= 0 <= hi, "nullable integer columns here all admit 0"
    if not types <= _ONLY_INT:
        return False
    return not values or (lo <= min(values) and max(values) <= hi)


def _texts_ok(values: list[Any], ok: Callable[[str], Any], *, nullable: bool) -> bool:
    """Every value is a plain ``str`` that ``ok`` accepts, or None if ``nullable``. The
    types are checked before the values are deduplicated, so nothing that merely compares
    equal to good text can hide behind it."""
    types = set(map(type, values))
    if not types <= ({str, _NoneType} if nullable else {str}):
        return False
    return all(ok(v) for v in set(values) if v is not None)


def _is_token(value: str) -> bool:
    return _TOKEN_RE.fullmatch(value) is not None


def _is_text(value: str) -> bool:
    return 0 < len(value) <= _TEXT_MAX and value.isprintable()


def _columns_ok(c: Mapping[str, list[Any]], device_id: str) -> bool:
    """The rules of :func:`_check_record` (and the batch's: one device, increasing seq),
    checked a column at a time; False if any record breaks one. A ``device_id`` column is
    optional (a device's own journal holds no other device's records)."""
    seqs = c["seq"]
    uids = c["uid"]
    if not (
        _ints_ok(seqs, 1, _I64_MAX, nullable=False)
        and all(map(operator.lt, seqs, itertools.islice(seqs, 1, None)))
        and _texts_ok(c["phase"], _PHASES.__contains__, nullable=False)
        and _texts_ok(c["kind"], _is_token, nullable=False)
        and _texts_ok(c["outcome"], _is_token, nullable=True)
        and _ints_ok(c["time"], _I64_MIN, _I64_MAX, nullable=False)
        and _ints_ok(c["card_number"], 0, _U64 - 1, nullable=True)
        and all(_ints_ok(c[name], _I64_MIN, _I64_MAX, nullable=True)
                for name in ("link", *OPTIONAL_INT_FIELDS))
        and all(_texts_ok(c[name], _is_text, nullable=True) for name in OPTIONAL_TEXT_FIELDS)
        and ("device_id" not in c
             or _texts_ok(c["device_id"], ("", device_id).__contains__, nullable=False))
    ):
        return False
    types = set(map(type, uids))
    if not types <= {bytes, _NoneType}:
        return False
    present = [u for u in uids if u is not None] if _NoneType in types else uids
    return set(map(len, present)) <= set(_UID_SIZES)


_NO_BASE = object()  # equal to nothing: the "linked record" of a record without one


def _masks(c: Mapping[str, list[Any]], bases: list[int], n: int) -> list[int]:
    """Each record's "eq" mask: bit k set when field k of :data:`_REF_FIELDS` equals the
    linked record's (``bases``: its index, or ``n`` for none). A done record usually
    copies all seven fields from its intent, so whole rows are compared first (in C) and
    only the records that differ somewhere are compared field by field."""
    if all(b == n for b in bases):
        return [0] * n
    rows = list(zip(*(c[name] for name in _REF_FIELDS), strict=True))
    rows.append(_NO_BASE)  # type: ignore[arg-type]
    same = list(map(operator.eq, rows, map(rows.__getitem__, bases)))
    full = (1 << len(_REF_FIELDS)) - 1
    masks = [full if s else 0 for s in same]
    for i, b in enumerate(bases):
        if b != n and not same[i]:
            row, base = rows[i], rows[b]
            masks[i] = sum(1 << k for k in range(len(_REF_FIELDS)) if row[k] == base[k])
    return masks


def _encode_columns(c: Mapping[str, list[Any]]) -> dict[str, Any]:
    """The columnar body (docs/protocol.md, "Batch body") of checked record columns.

    Column by column, with the same result, byte for byte once canonically encoded, as
    coding the records one at a time: each record's mask compares it with the earlier
    record its ``link`` names, a masked field has no entry in its column, and the string
    table numbers each text in order of first use (record by record, columns in
    :data:`_DICT_COLS` order).
    """
    seqs, links, times = c["seq"], c["link"], c["time"]
    n = len(seqs)
    unit = 1 if any(map(operator.mod, times, itertools.repeat(1000))) else 1000
    # the linked record: the earlier record of the batch whose seq is the link (n: none)
    position = dict(zip(seqs, range(n), strict=True))
    bases = [
        n if link is None or link >= seq else position.get(link, n)
        for seq, link in zip(seqs, links, strict=True)
    ]
    masks = _masks(c, bases, n)
    # per flag, which records keep an entry in the flag's column (None: all of them); flags
    # set on the same records share one list (a done record usually copies all seven)
    distinct = set(masks)
    keep: dict[str, list[bool] | None] = {}
    by_pattern: dict[frozenset[int], list[bool]] = {}
    for name, flag in _FLAG.items():
        dropped = frozenset(m for m in distinct if m & flag)
        if not dropped:
            keep[name] = None
        else:
            if dropped not in by_pattern:
                by_pattern[dropped] = list(map(operator.not_, map(dropped.__contains__, masks)))
            keep[name] = by_pattern[dropped]

    def kept(name: str, values: Sequence[Any]) -> list[Any]:
        k = keep.get(name)
        return values if k is None else list(itertools.compress(values, k))

    # string table: every text in order of first use (record, then column position)
    first_uses: list[tuple[int, int, str]] = []
    text_cols: list[tuple[str, list[Any], set[Any]]] = []
    for pos, (name, key) in enumerate(_DICT_COLS):
        values = kept(name, c[name])
        where = range(n) if keep.get(name) is None else kept(name, range(n))
        present = set(values)
        present.discard(None)
        if len(present) <= 16:  # the usual case: a few texts, found early by index()
            first_uses.extend((where[values.index(v)], pos, v) for v in present)
        else:
            first = dict(zip(reversed(values), reversed(where), strict=True))  # value -> first
            first.pop(None, None)
            first_uses.extend((i, pos, value) for value, i in first.items())
        text_cols.append((key, values, present))
    first_uses.sort(key=operator.itemgetter(0, 1))
    table: dict[str | None, int] = {}
    for _, _, value in first_uses:
        if value not in table:
            table[value] = len(table) + 1
    strings = list(table)
    table[None] = 0
    index_of = table.__getitem__

    body: dict[str, Any] = {"n": n, "tu": unit, "S": strings}
    body["sq"] = list(map(operator.sub, seqs, [0, *seqs[:-1]]))
    body["lk"] = [None if link is None else seq - link
                  for seq, link in zip(seqs, links, strict=True)]
    body["eq"] = masks
    for key, values, present in text_cols:
        if not present:
            body[key] = [0] * len(values)
        elif len(present) == 1 and None not in values:
            body[key] = [index_of(next(iter(present)))] * len(values)
        else:
            body[key] = list(map(index_of, values))
    deltas = list(map(operator.sub, times, [0, *times[:-1]]))
    if unit != 1:
        deltas = [d // unit for d in deltas]
    body["t"] = kept("time", deltas)
    for name, key in _PLAIN_COLS:
        body[key] = kept(name, c[name])
    body["ca"] = kept("counter_after", [
        a if a is None or b is None else a - b
        for a, b in zip(c["counter_after"], c["counter_before"], strict=True)
    ])
    body["ba"] = kept("balance_after", [
        a if a is None or b is None else a - b + (f or 0)
        for a, b, f in zip(c["balance_after"], c["balance_before"], c["fare"], strict=True)
    ])
    return body


_MISSING = object()


def _int_column(body: Mapping[str, Any], name: str, lo: int, hi: int, *, nullable: bool) -> list:
    """A received column of integers, checked in bulk (types, then the range)."""
    values = body.get(name)
    if not isinstance(values, list):
        raise ProtocolError(f"batch body column {name!r} is missing or not an array")
    if not _ints_ok(values, lo, hi, nullable=nullable):
        bad = next(x for x in values if (x is not None or not nullable) and (
            type(x) is not int or not lo <= x <= hi))
        raise ProtocolError(f"batch body column {name!r} holds {bad!r:.30}, not an integer "
                            f"in {lo}..{hi}")
    return values


def _text_column(
    body: Mapping[str, Any], name: str, table: list[str | None], field_name: str
) -> list[str | None]:
    """A received string-index column resolved through the table; each distinct string is
    checked once against the journal's rule for ``field_name``."""
    indexes = _int_column(body, name, 0, len(table) - 1, nullable=False)
    for index in set(indexes):
        value = table[index]
        if field_name == "phase":
            ok = value in _PHASES
        elif field_name in ("kind", "outcome"):
            ok = (value is None and field_name == "outcome") or (
                value is not None and _TOKEN_RE.fullmatch(value) is not None
            )
        else:
            ok = value is None or (len(value) <= _TEXT_MAX and value.isprintable())
        if not ok:
            raise ProtocolError(f"batch body: {value!r:.40} is not a valid {field_name}")
    return list(map(table.__getitem__, indexes))


class _Copies:
    """Which records of a received batch copy a field from their linked record, for each
    flag of the "eq" mask: flags set on the same records (usually all seven on every done
    record) share one plan. A plan maps each record to the entry of the field's column that
    holds its value: its own, or (copied) its linked record's, resolved through chains."""

    def __init__(self, masks: list[int], bases: list[int]) -> None:
        self._masks = masks
        self._bases = bases
        self._distinct = set(masks)
        self._plans: dict[frozenset[int], tuple[list[bool], int, list[int]]] = {}

    def plan(self, flag: int) -> tuple[list[bool], int, list[int]] | None:
        """``(keep, need, source)`` for ``flag``, or None if no record copies it."""
        copying = frozenset(m for m in self._distinct if m & flag)
        if not copying:
            return None
        if copying not in self._plans:
            masks, bases = self._masks, self._bases
            keep = list(map(operator.not_, map(copying.__contains__, masks)))
            source = list(map(operator.sub, itertools.accumulate(keep), itertools.repeat(1)))
            for i in itertools.compress(range(len(masks)), map(copying.__contains__, masks)):
                source[i] = source[bases[i]]  # an earlier record: already resolved
            self._plans[copying] = (keep, sum(keep), source)
        return self._plans[copying]

    def check_length(self, values: list, flag: int, name: str) -> None:
        """A received column must have an entry for each record that does not copy
        ``flag`` (``flag`` 0: for every record)."""
        plan = self.plan(flag) if flag else None
        need = len(self._masks) if plan is None else plan[1]
        if len(values) != need:
            raise ProtocolError(f"batch body column {name!r} has {len(values)} entries, its "
                                f"records need {need}")

    def expand(self, values: list, flag: int, name: str) -> list:
        """A received column (entries only for the records that do not copy ``flag``) as
        one value per record, the copies filled in. ``flag`` 0: a column of every record."""
        self.check_length(values, flag, name)
        plan = self.plan(flag) if flag else None
        return values if plan is None else list(map(values.__getitem__, plan[2]))

    def kept(self, values: list, flag: int) -> list:
        """``values`` (one per record) of the records that do not copy ``flag``."""
        plan = self.plan(flag)
        return values if plan is None else list(itertools.compress(values, plan[0]))


def _check_range(values: list, name: str) -> None:
    present = [v for v in values if v is not None]
    if present and (min(present) < _I64_MIN or max(present) > _I64_MAX):
        raise ProtocolError(f"batch body: {name} out of 64-bit range")


def _decode_columns(body: Any, n: int) -> dict[str, list[Any]]:
    """Inverse of :func:`_encode_columns`: the record columns (:data:`RECORD_FIELDS`) of a
    received body. Every column is checked in bulk (types, ranges, lengths), then the
    deltas and copies are undone a column at a time."""
    if not isinstance(body, dict) or body.get("n") != n:
        raise ProtocolError("batch body is not a map of columns for the batch's record count")
    unit = body.get("tu")
    if type(unit) is not int or unit not in (1, 1000):
        raise ProtocolError("batch body time unit must be 1 or 1000")
    strings = body.get("S")
    if not isinstance(strings, list) or not all(
        type(s) is str and 0 < len(s) <= _TEXT_MAX for s in strings
    ):
        raise ProtocolError("batch body string table must be an array of short text")
    table: list[str | None] = [None, *strings]
    big = 1 << 66  # deltas of 64-bit values; the rebuilt values are range-checked
    sq = _int_column(body, "sq", 1, big, nullable=False)
    lk = _int_column(body, "lk", -big, big, nullable=True)
    masks = _int_column(body, "eq", 0, (1 << len(_REF_FIELDS)) - 1, nullable=False)
    if not len(sq) == len(lk) == len(masks) == n:
        raise ProtocolError(f"batch body columns sq, lk, eq must have {n} entries")

    seqs = list(itertools.accumulate(sq))
    if seqs[-1] > _I64_MAX:
        raise ProtocolError("batch body: seq out of 64-bit range")
    links = [None if d is None else s - d for s, d in zip(seqs, lk, strict=True)]
    _check_range(links, "link")
    # the records that copy fields, and from which earlier record of the batch
    bases = [-1] * n
    if any(masks):
        index = dict(zip(seqs, range(n), strict=True))
        for i in itertools.compress(range(n), masks):
            j = index.get(links[i], -1)
            if not 0 <= j < i:
                raise ProtocolError(
                    f"batch record {seqs[i]}: copies fields from a record not in the batch"
                )
            bases[i] = j
    copies = _Copies(masks, bases)

    uids = body.get("u")
    if not isinstance(uids, list) or not set(map(type, uids)) <= {bytes, _NoneType} or not (
        set(map(len, filter(None, uids))) <= set(_UID_SIZES)
    ) or b"" in uids:
        raise ProtocolError("batch body column 'u' must hold 4, 7 or 10-byte UIDs or null")
    full: dict[str, list] = {}
    for name, key in _DICT_COLS:
        full[name] = copies.expand(_text_column(body, key, table, name), _FLAG.get(name, 0),
                                   key)
    full["uid"] = copies.expand(uids, _FLAG["uid"], "u")
    full["card_number"] = copies.expand(_int_column(body, "cn", 0, _U64 - 1, nullable=True),
                                        _FLAG["card_number"], "cn")
    for name, key in (("counter_before", "cb"), ("balance_before", "bb"), ("fare", "f"),
                      ("product", "p"), ("reason", "r")):
        full[name] = copies.expand(
            _int_column(body, key, _I64_MIN, _I64_MAX, nullable=True), 0, key)
    cb, bb, fare = full["counter_before"], full["balance_before"], full["fare"]
    # counter_after and balance_after: undo the difference on the records' own entries,
    # then copy
    caflag, baflag = _FLAG["counter_after"], _FLAG["balance_after"]
    ca = _int_column(body, "ca", -big, big, nullable=True)
    ba = _int_column(body, "ba", -big, big, nullable=True)
    copies.check_length(ca, caflag, "ca")
    copies.check_length(ba, baflag, "ba")
    ca = [a if a is None or b is None else a + b
          for a, b in zip(ca, copies.kept(cb, caflag), strict=True)]
    ba = [a if a is None or b is None else a + b - (f or 0)
          for a, b, f in zip(ba, copies.kept(bb, baflag), copies.kept(fare, baflag),
                             strict=True)]
    full["counter_after"] = copies.expand(ca, caflag, "ca")
    full["balance_after"] = copies.expand(ba, baflag, "ba")

    # time: a running sum of the deltas, restarting from the linked record's time where
    # copied (so a record after a copy continues from the copied time)
    t_deltas = _int_column(body, "t", -big, big, nullable=False)
    tflag = _FLAG["time"]
    if any(m & tflag for m in masks):
        times = [0] * n
        t_it = iter(t_deltas)
        prev = 0
        try:
            for i, m in enumerate(masks):
                if m & tflag:
                    prev = times[bases[i]]
                else:
                    prev += next(t_it) * unit
                times[i] = prev
        except StopIteration:
            raise ProtocolError(
                "batch body column 't' is shorter than its records need") from None
        if next(t_it, _MISSING) is not _MISSING:
            raise ProtocolError("batch body column 't' is longer than its records need")
    else:
        if len(t_deltas) != n:
            raise ProtocolError(f"batch body column 't' must have {n} entries")
        times = list(itertools.accumulate(t_deltas if unit == 1 else
                                          [d * unit for d in t_deltas]))
    full["time"] = times
    for name in ("time", "counter_after", "balance_after"):
        _check_range(full[name], name)
    if None in full["kind"]:
        raise ProtocolError("batch body: a record has no kind")
    full["seq"], full["link"] = seqs, links
    return {name: full[name] for name in RECORD_FIELDS}


def encode_batch(
    device_id: str, records: Sequence[JournalRecord], key: Ed25519PrivateKey, *, ts: int
) -> bytes:
    """Sign ``records`` (oldest first, increasing seq) as one ``txn`` message.

    Every field but ``mac`` travels; a record's ``device_id`` must be ``device_id`` (or empty).
    Raises :class:`ProtocolError` for an empty batch, records out of order or invalid.
    """
    return encode_batch_columns(device_id, record_columns(records), key, ts=ts)


def encode_batch_columns(
    device_id: str, columns: Mapping[str, Sequence[Any]], key: Ed25519PrivateKey, *, ts: int
) -> bytes:
    """:func:`encode_batch` of records given as columns: a list per field of
    :data:`RECORD_FIELDS` (other keys, such as the journal's ``mac``, are ignored; a
    ``device_id`` column is checked when present), all of one length, record order.

    The records are checked a column at a time (the journal's rules, increasing seq); if
    any fails they are checked one by one, so the :class:`ProtocolError` names the first
    bad record and field: a bad record never reaches the wire. The columns are not changed.
    """
    _check_device_id(device_id)
    missing = [name for name in RECORD_FIELDS if name not in columns]
    if missing:
        raise ProtocolError(f"batch columns lack {', '.join(missing)}")
    c = {name: columns[name] for name in (*RECORD_FIELDS, "device_id") if name in columns}
    if not all(type(col) is list for col in c.values()):
        c = {name: list(col) for name, col in c.items()}
    n = len(c["seq"])
    if not n:
        raise ProtocolError("a batch needs at least one record")
    if n > MAX_BATCH_RECORDS:
        raise ProtocolError(f"a batch holds at most {MAX_BATCH_RECORDS} records")
    if any(len(col) != n for col in c.values()):
        raise ProtocolError("batch columns are not all of the same length")
    if not _columns_ok(c, device_id):
        names = list(c)
        records = [
            JournalRecord(**dict(zip(names, values, strict=True)))
            for values in zip(*c.values(), strict=True)
        ]
        _check_records_one_by_one(device_id, records)
        raise ProtocolError(  # the column checks and the record checks disagree: refuse
            f"records {records[0].seq!r:.24}..{records[-1].seq!r:.24} refused by the batch "
            "checks")
    body = _deflate(_canonical(_encode_columns(c)))
    msg = {
        "t": "txn",
        "dev": device_id,
        "ts": ts,
        "first": c["seq"][0],
        "last": c["seq"][-1],
        "n": n,
        "z": "deflate",
        "body": body,
    }
    return sign_message(msg, key)


def decode_batch(
    payload: bytes, public_key_for: PublicKeyFor, *, topic_device: str | None = None
) -> Batch:
    """Verify and decode a ``txn`` message; ``topic_device`` must match its ``dev``."""
    msg = open_message(payload, "txn", public_key_for, max_bytes=MAX_TXN_BYTES)
    dev = msg["dev"]
    if topic_device is not None and dev != topic_device:
        raise ProtocolError(f"batch from {dev!r} published on the topic of {topic_device!r}")
    what = f"batch from {dev!r}"
    ts = _int(msg, "ts", what)
    n = _int(msg, "n", what, 1, MAX_BATCH_RECORDS)
    first = _int(msg, "first", what, 1)
    last = _int(msg, "last", what, 1)
    if msg.get("z") != "deflate":
        raise ProtocolError(f"{what}: unknown compression {msg.get('z')!r:.20}")
    body = _load_body(msg.get("body"), MAX_TXN_BODY_BYTES, what, check_plain=False)
    columns = _decode_columns(body, n)
    seqs = columns["seq"]
    if seqs[0] != first or seqs[-1] != last:
        raise ProtocolError(f"{what}: first/last do not match its records")
    return Batch(dev, first, last, ts, columns=columns)


def peek_batch_range(payload: bytes) -> tuple[int, int] | None:
    """``(first, last)`` as a batch *claims* them, without verifying anything; None if the
    payload does not even say. Only for telling a device which of its batches was refused
    (the ack's ``bad``): never trust these numbers for anything else."""
    try:
        msg = _loads(bytes(payload[:MAX_TXN_BYTES]), "batch")
    except (ProtocolError, TypeError):
        return None
    if not isinstance(msg, dict):
        return None
    first, last = msg.get("first"), msg.get("last")
    if type(first) is int and type(last) is int and 0 < first <= last <= _I64_MAX:
        return first, last
    return None


# --------------------------------------------------------------------------------------------
# Acks


@dataclass(frozen=True)
class Ack:
    """The center's cumulative ack: every record of ``device_id`` with seq <= ``upto`` is
    stored; ``bad`` lists ``(first, last)`` of batches it refused."""

    device_id: str
    upto: int
    ts: int
    bad: tuple[tuple[int, int], ...] = ()


def encode_ack(ack: Ack, center_key: Ed25519PrivateKey) -> bytes:
    """Sign an ``ack`` message."""
    _check_device_id(ack.device_id)
    msg: dict[str, Any] = {"t": "ack", "dev": ack.device_id, "upto": ack.upto, "ts": ack.ts}
    if ack.bad:
        msg["bad"] = [[int(a), int(b)] for a, b in ack.bad]
    return sign_message(msg, center_key)


def decode_ack(payload: bytes, center_public: Ed25519PublicKey, *, device_id: str) -> Ack:
    """Verify an ``ack`` against the pinned center key; it must be for ``device_id``."""
    msg = open_message(payload, "ack", center_public, max_bytes=MAX_CMD_BYTES)
    if msg.get("dev") != device_id:
        raise ProtocolError(f"ack for device {msg.get('dev')!r:.70}, this is {device_id!r}")
    upto = _int(msg, "upto", "ack", 0)
    ts = _int(msg, "ts", "ack")
    bad_raw = msg.get("bad", [])
    bad: list[tuple[int, int]] = []
    if not isinstance(bad_raw, list):
        raise ProtocolError("ack field 'bad' must be an array of [first, last]")
    for item in bad_raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(type(x) is int and 0 <= x <= _I64_MAX for x in item)
        ):
            raise ProtocolError("ack field 'bad' must be an array of [first, last]")
        bad.append((item[0], item[1]))
    return Ack(device_id, upto, ts, tuple(bad))


# --------------------------------------------------------------------------------------------
# Bundles


@dataclass(frozen=True)
class Bundle:
    """A configuration bundle; ``body`` is the decoded object described in docs/protocol.md."""

    kind: str
    version: int
    body: Any
    ts: int
    base: int | None = None
    target: str | None = None
    expires: int | None = None


def _le(arr: array) -> bytes:
    if sys.byteorder == "big":
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


def _from_le(typecode: str, data: Any, what: str) -> array:
    arr = array(typecode)
    if not isinstance(data, bytes) or len(data) % arr.itemsize:
        raise ProtocolError(f"{what} must be bytes of {arr.itemsize}-byte items")
    arr.frombytes(data)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def _pack_cards(cards: Sequence[int]) -> bytes:
    """Card numbers as little-endian u64 deltas modulo 2**64: sorted lists compress to about
    one or two bytes per card."""
    prev = 0
    deltas = []
    for card in cards:
        deltas.append((card - prev) % _U64)
        prev = card
    return _le(array("Q", deltas))


def _unpack_cards(data: Any, what: str) -> list[int]:
    deltas = _from_le("Q", data, what)
    mask = _U64 - 1
    return [x & mask for x in itertools.accumulate(deltas, operator.add)]


def check_blacklist_entry(entry: Any, what: str) -> tuple[int, int, bytes | None]:
    """One blacklist entry as every device decoder takes it: ``(card number u64, reason
    u16, UID of 4, 7 or 10 bytes or None)``; :class:`ProtocolError` naming ``what``."""
    return _check_entry(entry, what)


def _check_entry(entry: Any, what: str) -> tuple[int, int, bytes | None]:
    try:
        number, reason, uid = entry
    except (TypeError, ValueError):
        raise ProtocolError(f"{what}: an entry must be [card_number, reason, uid]") from None
    if type(number) is not int or not 0 <= number < _U64:
        raise ProtocolError(f"{what}: card number out of range: {number!r:.30}")
    if type(reason) is not int or not 0 <= reason <= 0xFFFF:
        raise ProtocolError(f"{what}: reason code must be 0..65535, got {reason!r:.30}")
    if uid is not None and (type(uid) is not bytes or len(uid) not in _UID_SIZES):
        raise ProtocolError(f"{what}: a UID must be 4, 7 or 10 bytes")
    return number, reason, uid


def _pack_entries(entries: Any, what: str) -> dict[str, Any]:
    if not isinstance(entries, (list, tuple)):
        raise ProtocolError(f"{what}: entries must be a list")
    checked = [_check_entry(e, what) for e in entries]
    return {
        "cd": _pack_cards([e[0] for e in checked]),
        "rs": _le(array("H", [e[1] for e in checked])),
        "ul": bytes(0 if e[2] is None else len(e[2]) for e in checked),
        "ub": b"".join(e[2] for e in checked if e[2] is not None),
    }


def _unpack_entries(cols: Any, what: str) -> list[tuple[int, int, bytes | None]]:
    if not isinstance(cols, dict):
        raise ProtocolError(f"{what}: entries must be a map of columns")
    cards = _unpack_cards(cols.get("cd"), f"{what} card column")
    reasons = _from_le("H", cols.get("rs"), f"{what} reason column")
    lens = cols.get("ul")
    blob = cols.get("ub")
    if not isinstance(lens, bytes) or not isinstance(blob, bytes):
        raise ProtocolError(f"{what}: UID columns must be bytes")
    if not len(cards) == len(reasons) == len(lens):
        raise ProtocolError(f"{what}: columns of different lengths")
    if not set(lens) <= {0, *_UID_SIZES} or sum(lens) != len(blob):
        raise ProtocolError(f"{what}: UID lengths must be 0, 4, 7 or 10 and match the UID bytes")
    uids: list[bytes | None] = []
    append = uids.append
    pos = 0
    for n in lens:
        if n:
            append(blob[pos : pos + n])
            pos += n
        else:
            append(None)
    return list(zip(cards, reasons, uids, strict=True))


_ACTION_FIELDS = ("action_id", "card_number", "kind", "valid_until", "amount", "product_id",
                  "card_seq")


def _check_action(action: Any) -> dict[str, Any]:
    what = "actions bundle"
    if not isinstance(action, Mapping) or set(action) - set(_ACTION_FIELDS):
        raise ProtocolError(f"{what}: an action must be a map of {', '.join(_ACTION_FIELDS)}")
    out = {name: action.get(name) for name in _ACTION_FIELDS}
    _text(out, "action_id", what, limit=_TEXT_MAX)
    _int(out, "card_number", what, 0, _U64 - 1)
    if out["kind"] not in ("topup", "pass"):
        raise ProtocolError(f"{what}: action kind must be 'topup' or 'pass'")
    _int(out, "valid_until", what)
    for name in ("amount", "product_id", "card_seq"):
        _int(out, name, what, optional=True)
    return out


_CREDIT_FIELDS = {"dealer_id": str, "allowance_id": str, "amount": int, "valid_from": int,
                  "valid_until": int, "signature": str}


def _body_to_wire(kind: str, body: Any) -> Any:
    """Validate a bundle body and give the form that travels (columnar for blacklists)."""
    what = f"{kind} bundle"
    if not isinstance(body, Mapping):
        raise ProtocolError(f"{what}: body must be a map")
    if kind == "fares":
        _text(body, "name", what)
        _text(body, "toml", what, limit=16 << 20)
        return {"name": body["name"], "toml": body["toml"]}
    if kind == "blacklist":
        return {"entries": _pack_entries(body.get("entries"), what)}
    if kind == "blacklist-delta":
        remove = body.get("remove", [])
        if not isinstance(remove, (list, tuple)) or not all(
            type(n) is int and 0 <= n < _U64 for n in remove
        ):
            raise ProtocolError(f"{what}: 'remove' must be a list of card numbers")
        return {"add": _pack_entries(body.get("add", []), what), "remove": _pack_cards(remove)}
    if kind == "actions":
        actions = body.get("actions")
        if not isinstance(actions, (list, tuple)):
            raise ProtocolError(f"{what}: 'actions' must be a list")
        return {"actions": [_check_action(a) for a in actions]}
    if kind == "credit":
        allowance = _map(body, "allowance", what)
        return {"allowance": _check_credit(allowance)}
    if kind == "agent":
        settings = _map(body, "settings", what)
        return {"settings": dict(settings)}
    raise ProtocolError(f"unknown bundle kind {kind!r}")


def _check_credit(allowance: Mapping[str, Any]) -> dict[str, Any]:
    for name, typ in _CREDIT_FIELDS.items():
        value = allowance.get(name)
        if type(value) is not typ:
            raise ProtocolError(f"credit bundle: allowance field {name!r} must be {typ.__name__}")
    return {name: allowance[name] for name in _CREDIT_FIELDS}


def _body_from_wire(kind: str, wire: Any) -> Any:
    what = f"{kind} bundle"
    if not isinstance(wire, dict):
        raise ProtocolError(f"{what}: body must be a map")
    if kind == "blacklist":
        return {"entries": _unpack_entries(wire.get("entries"), what)}
    if kind == "blacklist-delta":
        return {
            "add": _unpack_entries(wire.get("add"), what),
            "remove": _unpack_cards(wire.get("remove"), f"{what} remove column"),
        }
    return _body_to_wire(kind, wire)  # the other kinds travel as they are: validate only


def encode_bundle(bundle: Bundle, center_key: Ed25519PrivateKey) -> bytes:
    """Validate and sign a bundle (``base`` required exactly for ``blacklist-delta``)."""
    _check_bundle_header(bundle.kind, bundle.version, bundle.base, bundle.target, bundle.expires)
    wire = _body_to_wire(bundle.kind, bundle.body)
    if bundle.kind in ("agent", "actions", "credit", "fares"):
        _check_plain(wire, MAX_BUNDLE_BODY_BYTES)  # plain data only, as receivers demand
    body = _deflate(_canonical(wire), 6)
    msg: dict[str, Any] = {
        "t": "bundle",
        "kind": bundle.kind,
        "version": bundle.version,
        "ts": bundle.ts,
        "z": "deflate",
        "body": body,
    }
    for name in ("base", "target", "expires"):
        if getattr(bundle, name) is not None:
            msg[name] = getattr(bundle, name)
    payload = sign_message(msg, center_key)
    if len(payload) > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"{bundle.kind} bundle of {len(payload)} bytes exceeds the limit")
    return payload


def _check_bundle_header(
    kind: Any, version: Any, base: Any, target: Any, expires: Any
) -> None:
    if kind not in BUNDLE_KINDS:
        raise ProtocolError(f"unknown bundle kind {kind!r:.40} (one of {', '.join(BUNDLE_KINDS)})")
    if type(version) is not int or not 1 <= version <= _I64_MAX:
        raise ProtocolError(f"{kind} bundle version must be a positive integer")
    if kind == "blacklist-delta":
        if type(base) is not int or not 0 <= base < version:
            raise ProtocolError("a blacklist-delta needs a 'base' version below its own")
    elif base is not None:
        raise ProtocolError(f"a {kind} bundle has no 'base'")
    if target is not None:
        _check_device_id(target, "bundle target")
    if expires is not None and type(expires) is not int:
        raise ProtocolError("bundle 'expires' must be Unix milliseconds")


def decode_bundle(
    payload: bytes, center_public: Ed25519PublicKey, *, now_ms: int, device_id: str | None = None
) -> Bundle:
    """Verify and decode a bundle. :class:`Expired` past ``expires``; :class:`ProtocolError`
    if it targets a device other than ``device_id`` (None: accept any target)."""
    msg = open_message(payload, "bundle", center_public, max_bytes=MAX_BUNDLE_BYTES)
    kind, version, base, target, expires, ts = _bundle_header(msg)
    if target is not None and device_id is not None and target != device_id:
        raise ProtocolError(f"{kind} bundle {version} is for device {target!r}, not {device_id!r}")
    if expires is not None and now_ms > expires:
        raise Expired(f"{kind} bundle {version} expired at {expires} (now {now_ms})")
    return Bundle(kind, version, _bundle_body(msg, kind), ts, base, target, expires)


def peek_bundle(payload: bytes) -> Bundle:
    """Decode a signed bundle WITHOUT verifying its signature, target or expiry: for tools
    that show or compare bundles when no center key is at hand (``afc bundle diff``). Never
    the way to apply one: devices use :func:`decode_bundle`."""
    if len(payload) > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"bundle of {len(payload)} bytes is over {MAX_BUNDLE_BYTES}")
    msg = _loads(payload, "bundle")
    if not isinstance(msg, dict) or msg.get("t") != "bundle":
        raise ProtocolError("not a signed bundle")
    kind, version, base, target, expires, ts = _bundle_header(msg)
    return Bundle(kind, version, _bundle_body(msg, kind), ts, base, target, expires)


def _bundle_header(msg: Mapping[str, Any]) -> tuple[Any, ...]:
    kind, version = msg.get("kind"), msg.get("version")
    base, target, expires = msg.get("base"), msg.get("target"), msg.get("expires")
    _check_bundle_header(kind, version, base, target, expires)
    return kind, version, base, target, expires, _int(msg, "ts", f"{kind} bundle")


def _bundle_body(msg: Mapping[str, Any], kind: str) -> Any:
    if msg.get("z") != "deflate":
        raise ProtocolError(f"{kind} bundle: unknown compression {msg.get('z')!r:.20}")
    wire = _load_body(msg.get("body"), MAX_BUNDLE_BODY_BYTES, f"{kind} bundle")
    return _body_from_wire(kind, wire)


# --------------------------------------------------------------------------------------------
# Commands and replies


@dataclass(frozen=True)
class Command:
    """A signed request from the center; ``nonce`` strictly increases per device."""

    device_id: str
    id: str
    name: str
    args: Mapping[str, Any]
    nonce: int
    ts: int
    expires: int


def encode_command(cmd: Command, center_key: Ed25519PrivateKey) -> bytes:
    """Sign a ``cmd`` message."""
    _check_device_id(cmd.device_id)
    msg = {
        "t": "cmd",
        "dev": cmd.device_id,
        "id": cmd.id,
        "name": cmd.name,
        "args": dict(cmd.args),
        "nonce": cmd.nonce,
        "ts": cmd.ts,
        "expires": cmd.expires,
    }
    _check_command_fields(msg)
    return sign_message(msg, center_key)


def _check_command_fields(msg: Mapping[str, Any]) -> None:
    what = "command"
    _text(msg, "id", what, limit=_TEXT_MAX)
    name = msg.get("name")
    if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
        raise ProtocolError("command name must be a token such as 'ping'")
    _map(msg, "args", what)
    _int(msg, "nonce", what, 1)
    _int(msg, "ts", what)
    _int(msg, "expires", what)


def decode_command(
    payload: bytes, center_public: Ed25519PublicKey, *, device_id: str, now_ms: int
) -> Command:
    """Verify a command for ``device_id``; :class:`Expired` past its ``expires``. The nonce
    is returned, not judged: the agent compares it with the last one it accepted."""
    msg = open_message(payload, "cmd", center_public, max_bytes=MAX_CMD_BYTES)
    if msg.get("dev") != device_id:
        raise ProtocolError(f"command for device {msg.get('dev')!r:.70}, this is {device_id!r}")
    _check_command_fields(msg)
    if now_ms > msg["expires"]:
        raise Expired(f"command {msg['id']!r} expired at {msg['expires']} (now {now_ms})")
    return Command(
        device_id, msg["id"], msg["name"], msg["args"], msg["nonce"], msg["ts"], msg["expires"]
    )


@dataclass(frozen=True)
class Reply:
    """A device's signed answer to command ``id``."""

    device_id: str
    id: str
    ok: bool
    ts: int
    result: Mapping[str, Any] | None = None
    error: str | None = None


def encode_reply(reply: Reply, device_key: Ed25519PrivateKey) -> bytes:
    """Sign a ``reply`` message with the device's key."""
    _check_device_id(reply.device_id)
    msg: dict[str, Any] = {
        "t": "reply",
        "dev": reply.device_id,
        "id": reply.id,
        "ok": bool(reply.ok),
        "ts": reply.ts,
    }
    if reply.result is not None:
        msg["result"] = dict(reply.result)
    if reply.error is not None:
        msg["error"] = reply.error
    _check_reply_fields(msg)
    return sign_message(msg, device_key)


def _check_reply_fields(msg: Mapping[str, Any]) -> None:
    _text(msg, "id", "reply", limit=_TEXT_MAX)
    if type(msg.get("ok")) is not bool:
        raise ProtocolError("reply field 'ok' must be a boolean")
    _int(msg, "ts", "reply")
    _map(msg, "result", "reply", optional=True)
    _text(msg, "error", "reply", optional=True, limit=4096)


def decode_reply(payload: bytes, public_key_for: Ed25519PublicKey | PublicKeyFor) -> Reply:
    """Verify a device's ``reply`` against its registered key."""
    msg = open_message(payload, "reply", public_key_for, max_bytes=MAX_CMD_BYTES)
    if "dev" not in msg:
        raise ProtocolError("reply has no 'dev' field")
    _check_reply_fields(msg)
    return Reply(
        msg["dev"], msg["id"], msg["ok"], msg["ts"], msg.get("result"), msg.get("error")
    )


# --------------------------------------------------------------------------------------------
# JSON messages (status, telemetry, event)


def _json_canonical(msg: Mapping[str, Any]) -> bytes:
    """The signed form: compact JSON, keys sorted, UTF-8 (non-ASCII not escaped)."""
    unsigned = {k: v for k, v in msg.items() if k != "sig"}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def encode_json_message(
    fields: Mapping[str, Any], *, signer: Callable[[bytes], str] | None = None
) -> bytes:
    """A status/telemetry/event payload: ``fields`` plus ``v``, optionally signed.

    ``signer`` gets the canonical bytes and returns the ``sig`` text (see
    :func:`ed25519_json_signer`, :func:`hmac_json_signer`).
    """
    if "sig" in fields:
        raise ProtocolError("fields to encode already hold a 'sig'")
    msg = dict(fields)
    msg["v"] = PROTOCOL_VERSION
    try:
        canonical = _json_canonical(msg)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"JSON message cannot be encoded: {exc}") from None
    if signer is None:
        return canonical
    msg["sig"] = signer(canonical)
    return _json_canonical_with_sig(msg)


def _json_canonical_with_sig(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_json_message(payload: bytes, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a JSON message: an object with ``v`` 1, a valid ``dev`` and an integer ``ts``.

    The signature is not checked here (see :func:`verify_json_signature`): camera sites and
    devices without a configured key send unsigned status.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError(f"JSON message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        msg = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a UTF-8 JSON message: {exc!s:.120}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("JSON message is not an object")
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"JSON message has protocol version {v!r:.20}, expected 1")
    _check_device_id(msg.get("dev"), "JSON message 'dev'")
    _int(msg, "ts", "JSON message")
    kind = msg.get("kind")
    if kind is not None and (not isinstance(kind, str) or not _TOKEN_RE.fullmatch(kind)):
        raise ProtocolError("JSON message 'kind' must be a token such as 'validator'")
    sig = msg.get("sig")
    if sig is not None and not isinstance(sig, str):
        raise ProtocolError("JSON message 'sig' must be text")
    return msg


def ed25519_json_signer(key: Ed25519PrivateKey) -> Callable[[bytes], str]:
    """A signer for :func:`encode_json_message`: ``"ed25519:<hex>"``."""
    return lambda data: "ed25519:" + key.sign(data).hex()


def hmac_json_signer(hmac_key: bytes) -> Callable[[bytes], str]:
    """A signer for :func:`encode_json_message` as a camera-site MCU signs:
    ``"hmac-sha256:<hex>"``."""
    return lambda data: "hmac-sha256:" + hmac.new(hmac_key, data, hashlib.sha256).hexdigest()


def verify_json_signature(
    msg: Mapping[str, Any],
    *,
    public_key: Ed25519PublicKey | None = None,
    hmac_key: bytes | None = None,
) -> bool:
    """True if ``msg['sig']`` verifies with the key given for its scheme; False otherwise
    (no signature, another scheme, no key for it, malformed or wrong signature)."""
    sig = msg.get("sig")
    if not isinstance(sig, str) or ":" not in sig:
        return False
    scheme, _, hex_sig = sig.partition(":")
    try:
        raw = bytes.fromhex(hex_sig)
        data = _json_canonical(msg)
    except (ValueError, TypeError):
        return False
    if scheme == "ed25519" and public_key is not None:
        try:
            public_key.verify(raw, data)
        except InvalidSignature:
            return False
        return True
    if scheme == "hmac-sha256" and hmac_key is not None:
        expected = hmac.new(hmac_key, data, hashlib.sha256).digest()
        return hmac.compare_digest(expected, raw)
    return False


# --------------------------------------------------------------------------------------------
# A realistic sample for the wire budget (tests and ``afc bench agent``)

#: Konya 2025 tariff fares in kuruş (firmware/core/tariffs/konya-2025.toml): full leg,
#: full transfer, student/teacher leg and transfer, free; weighted roughly as riders are.
_SAMPLE_FARES = ((2250, 0, 0), (1350, 0, 1), (900, 0, 0), (540, 0, 1), (0, 0, 3))
_SAMPLE_WEIGHTS = (55, 12, 20, 5, 8)


def wire_sample(
    n_taps: int,
    rng: Any,
    *,
    device_id: str = "KNY-BUS-0042-V1",
    first_seq: int = 1,
    start_ms: int = 1_760_000_000_000,
) -> list[JournalRecord]:
    """``n_taps`` realistic taps as the validator journals them (intent + done each):
    issued card numbers below 10**8, random 4-byte UIDs, balances 0..100000 kuruş, Konya
    fares, taps a few seconds apart in bursts at stops, the bus switching between 3 lines.

    ``rng`` is a :class:`random.Random`; the same seed gives the same records.
    """
    records: list[JournalRecord] = []
    seq = first_seq
    now_s = start_ms // 1000
    lines = ("48", "64", "R1")
    line = lines[0]
    for i in range(n_taps):
        now_s += rng.randint(1, 4) if rng.random() < 0.85 else rng.randint(60, 300)
        if i and rng.random() < 0.01:
            line = rng.choice(lines)
        fare, product, reason = rng.choices(_SAMPLE_FARES, _SAMPLE_WEIGHTS)[0]
        card = rng.randrange(10_000_000, 99_999_999)
        uid = rng.randbytes(4)
        counter = rng.randint(1, 3000)
        balance = rng.randint(fare, 100_000)
        common = {"time": now_s * 1000, "card_number": card, "uid": uid, "device_id": device_id}
        intent = JournalRecord(
            kind=KIND_TAP, seq=seq, phase=PHASE_INTENT, counter_before=counter,
            counter_after=counter + 1, balance_before=balance, balance_after=balance - fare,
            fare=fare, product=product, reason=reason, line=line, vehicle="42 KY 042",
            validator_id="V1", **common,
        )
        done = JournalRecord(
            kind=KIND_TAP, seq=seq + 1, phase=PHASE_DONE, link=seq, counter_after=counter + 1,
            balance_after=balance - fare, outcome="ok", **common,
        )
        records += (intent, done)
        seq += 2
    return records


def wire_bytes_per_txn(rng: Any, *, batches: int = 10, taps_per_batch: int = 100) -> float:
    """The wire budget figure (DESIGN.md, <= 48): whole signed ``txn`` payload bytes per
    transaction (one tap = intent + done) for ``batches`` batches of realistic taps, with a
    fresh device key. ``afc bench agent`` reports it as ``wire_bytes_per_txn``."""
    key = Ed25519PrivateKey.generate()
    total = 0
    seq = 1
    for _ in range(batches):
        records = wire_sample(taps_per_batch, rng, first_seq=seq)
        seq = records[-1].seq + 1
        total += len(encode_batch(records[0].device_id, records, key,
                                  ts=records[-1].time))
    return total / (batches * taps_per_batch)
