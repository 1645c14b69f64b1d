"""``afc card``: personalise, inspect and block cards at the office, on a real or emulated PN532.

The issuing office holds the whole key store (keys A and B of every card are derived from
its masters), so this is the one tool that writes identities. It works through the same
driver, core and purse code as the validators, over any reader URL (``/dev/ttyUSB0``, the
emulator's pty, ``socket://HOST:PORT``).

Key versions: a card's identity block names the generation of master keys its sector and MAC
keys came from (``Identity.key_version``). New cards get the store's current version; a card
is read by trying the versions the store holds, newest first (a failed MIFARE authentication
silences the card, so the card is activated again between tries), which is how cards issued
before an ``afc keys rotate`` keep working here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from firmware.core import card_layout as cl
from firmware.core import classic_layout as layout
from firmware.core.card_layout import CardForged, CardMacs, Identity, PassBlock, PurseRecord
from firmware.core.errors import AuthenticationError, CodecError, CoreError, KeyStoreError
from firmware.core.fares import CardType as FareCardType
from firmware.core.fares import TripRecord
from firmware.core.keys import (
    CARD_KEY_NAMES,
    CLASSIC_KEY_NAME,
    FileKeyStore,
    KeyStore,
    PinnedKeyStore,
    card_key_versions,
)
from firmware.core.mifare import ClassicAccess
from firmware.core.purse import EMPTY_TRIP, TRANSPORT_KEY, Purse, product_of, purse_delta

__all__ = [
    "CARD_KEY_NAMES",
    "CardSpec",
    "CardStation",
    "PinnedKeyStore",
    "card",
    "card_key_versions",
    "inspect_card",
    "issue_card",
]

log = logging.getLogger("afc.card")

PRODUCT_NAMES = {0: "purse", 1: "pass", 2: "free", 3: "top-up", 4: "repair"}
_IDENTITY_FMT = struct.Struct("<IBBHHHBH")  # Identity's block 4, docs/card-layout.md


class CardCommandError(CoreError):
    """A card operation that cannot go ahead: wrong card, no card, bad row. The message says
    what to do at the counter."""


class NoCardPresented(CardCommandError):
    """No card (or not a new one) was put on the reader in time."""


class NotOurCard(CardCommandError):
    """The card answers to neither this system's keys nor the transport keys."""


class CardAlreadyIssued(CardCommandError):
    """The card is personalised already (with this system's keys)."""


# -- keys -------------------------------------------------------------------------------------


def issuing_version(store: KeyStore) -> int:
    """The card key version new cards get: the current one, which both card keys share."""
    versions = {name: store.current_version(name) for name in CARD_KEY_NAMES}
    if len(set(versions.values())) != 1:
        shown = ", ".join(f"{n} v{v}" for n, v in versions.items())
        raise KeyStoreError(
            f"the card keys are at different current versions ({shown}): a card names one "
            "version for both; rotate them together (afc keys rotate classic-sector purse-mac)"
        )
    return versions[CLASSIC_KEY_NAME]


# -- the reader -------------------------------------------------------------------------------


def _card_type(sak: int) -> layout.CardType:
    for card_type in layout.CardType:
        if card_type.sak == sak & 0x18:
            return card_type
    raise CardCommandError(f"card with SAK {sak:02X} is not a MIFARE Classic 1K or 4K")


@dataclass(frozen=True)
class Presented:
    """A card on the reader: its UID and type."""

    uid: bytes
    sak: int

    @property
    def card_type(self) -> layout.CardType:
        return _card_type(self.sak)

    @property
    def masked(self) -> str:
        return "…" + self.uid[-2:].hex().upper()


class CardStation:
    """The office reader: waits for a card, and activates it again whenever a command needs
    a fresh session (after a failed authentication the card stays silent until then)."""

    POLL_S = 0.05

    def __init__(self, pn532: Any, mode: str = "transparent") -> None:
        if mode not in ("chip", "transparent"):
            raise CardCommandError(f"reader mode must be 'chip' or 'transparent', not {mode!r}")
        self.pn532 = pn532
        self.mode = mode

    @classmethod
    @contextlib.contextmanager
    def open(cls, url: str, mode: str = "transparent") -> Iterator[CardStation]:
        from firmware.reader.driver import Pn532

        with Pn532.open(url, response_timeout=2.0) as pn:
            pn.set_max_retries(passive=1)
            yield cls(pn, mode)

    def _list(self) -> Any:
        pn = self.pn532
        pn.rf_field(False)  # power the card down: it comes back in IDLE, ready for REQA
        pn.rf_field(True)
        targets = pn.list_passive_targets(1)
        return targets[0] if targets else None

    def wait(self, timeout: float, *, other_than: bytes | None = None) -> Presented:
        """The card put on the reader within ``timeout`` seconds (one whose UID is not
        ``other_than``: the card issued just before must be taken away first)."""
        deadline = time.monotonic() + timeout
        while True:
            target = self._list()
            if target is not None and target.uid != other_than:
                return Presented(bytes(target.uid), target.sak)
            if time.monotonic() >= deadline:
                what = "a new card" if other_than is not None else "a card"
                raise NoCardPresented(f"no {what} on the reader within {timeout:g} s")
            time.sleep(self.POLL_S)

    def access(self, card: Presented) -> ClassicAccess:
        """A fresh session with ``card`` (activated again); :class:`NoCardPresented` if it
        left the reader or another card took its place."""
        target = self._list()
        if target is None or bytes(target.uid) != card.uid:
            raise NoCardPresented(f"card {card.masked} left the reader: put it back and retry")
        if self.mode == "chip":
            return self.pn532.chip_classic(target)
        return self.pn532.transparent_classic(target)


def probe(station: CardStation, card: Presented, store: KeyStore) -> int | None:
    """The card key version ``card`` was issued under; None for a blank card (transport
    keys); :class:`NotOurCard` for anything else."""
    block = layout.first_block(cl.IDENTITY_SECTOR, card.card_type)
    for version in card_key_versions(store):
        access = station.access(card)
        key = store.classic_key(card.uid, cl.IDENTITY_SECTOR, "A", key_version=version)
        try:
            access.authenticate(block, key, "A")
            return version
        except AuthenticationError:
            continue
    access = station.access(card)
    try:
        access.authenticate(block, TRANSPORT_KEY, "A")
        return None
    except AuthenticationError:
        pass
    raise NotOurCard(
        f"card {card.masked} answers to none of the store's card key versions "
        f"({', '.join(str(v) for v in card_key_versions(store))}) nor to the transport key: "
        "another system's card, or issued under keys this store does not hold"
    )


# -- what to issue ----------------------------------------------------------------------------


def parse_money(text: str, what: str = "balance") -> int:
    """Kuruş from what an operator types: ``50``, ``50.25`` or ``50,25`` (TL)."""
    try:
        value = Decimal(str(text).strip().replace(",", "."))
    except InvalidOperation:
        raise CardCommandError(f"{what} {text!r} is not an amount in TL (e.g. 50 or 50,25)")\
            from None
    if not value.is_finite() or value < 0 or value != value.quantize(Decimal("0.01")):
        raise CardCommandError(f"{what} {text!r} must be a non-negative amount with at most "
                               "two decimals (TL)")
    return int(value * 100)


def parse_date(text: str, what: str) -> date:
    try:
        return date.fromisoformat(str(text).strip())
    except ValueError:
        raise CardCommandError(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None


def _card_day(d: date) -> int:
    """Unix time of the start of local day ``d``: stored on the card as that date."""
    return cl.day_start((d - cl.EPOCH).days)


def parse_holder(text: str) -> bytes:
    """The 8-byte holder reference: up to 8 printable ASCII characters (zero-padded), or
    ``hex:`` and 16 hex digits. It points to the holder's file at the office; never put a
    name or an ID number here: the card is readable by anyone who cracks its keys."""
    text = str(text).strip()
    if text.lower().startswith("hex:"):
        try:
            raw = bytes.fromhex(text[4:])
        except ValueError:
            raw = b""
        if len(raw) != 8:
            raise CardCommandError(f"holder {text!r}: hex: needs exactly 16 hex digits")
        return raw
    if not text or len(text) > 8 or not text.isascii() or not text.isprintable():
        raise CardCommandError(
            f"holder {text!r} must be 1 to 8 printable ASCII characters (or hex:16 digits)"
        )
    return text.encode("ascii").ljust(8, b"\0")


def show_holder(raw: bytes) -> str:
    text = raw.rstrip(b"\0")
    if text and text.isascii() and text.decode("ascii").isprintable() and b"\0" not in text:
        return text.decode("ascii")
    return "hex:" + raw.hex().upper()


@dataclass(frozen=True)
class CardSpec:
    """One card to issue: who it is for and what it starts with."""

    card_number: int
    card_type: FareCardType
    expires: date
    discount_until: date | None
    holder: bytes
    balance: int = 0
    issuer: int = 1

    @classmethod
    def build(cls, *, card_number: Any, card_type: Any, expires: Any, holder: Any,
              discount_until: Any = None, balance: Any = None, issuer: Any = None,
              today: date | None = None) -> CardSpec:
        """Validate what an operator gave (command line or a CSV row) before any card is
        touched."""
        try:
            number = int(str(card_number).strip())
        except ValueError:
            raise CardCommandError(f"card number {card_number!r} is not a number") from None
        if not 1 <= number <= 0xFFFFFFFF:
            raise CardCommandError(f"card number {number} must be 1..4294967295 (u32)")
        try:
            ctype = FareCardType(str(card_type).strip())
        except ValueError:
            known = ", ".join(t.value for t in FareCardType)
            raise CardCommandError(f"card type {card_type!r} is unknown (one of: {known})")\
                from None
        exp = parse_date(expires, "expiry")
        today = today or date.today()
        if exp < today:
            raise CardCommandError(f"expiry {exp} is in the past")
        disc: date | None = None
        if discount_until not in (None, ""):
            if ctype is FareCardType.FULL:
                raise CardCommandError("a full-fare card has no discount: leave discount_until "
                                       "empty")
            disc = parse_date(discount_until, "discount end")
            if disc > exp:
                raise CardCommandError(f"discount end {disc} is after the card's expiry {exp}")
        elif ctype is not FareCardType.FULL:
            disc = exp  # no yearly re-validation asked for: the discount lasts the card's life
        kurus = 0 if balance in (None, "") else parse_money(balance)
        if kurus > 0x7FFFFFFF:
            raise CardCommandError("balance does not fit the card's purse")
        try:
            iss = 1 if issuer in (None, "") else int(str(issuer).strip())
        except ValueError:
            raise CardCommandError(f"issuer {issuer!r} is not a number") from None
        if not 1 <= iss <= 255:
            raise CardCommandError(f"issuer {iss} must be 1..255")
        return cls(number, ctype, exp, disc, parse_holder(holder), kurus, iss)

    def identity(self, now: int, key_version: int) -> Identity:
        return Identity(
            card_number=self.card_number,
            card_type=self.card_type.code,
            issuer=self.issuer,
            issued=now,
            expires=_card_day(self.expires),
            discount_until=None if self.discount_until is None else _card_day(self.discount_until),
            key_version=key_version,
            holder_ref=self.holder,
        )


CSV_REQUIRED = ("card_number", "type", "expires", "holder")
CSV_OPTIONAL = ("discount_until", "balance", "issuer")


def read_csv(path: str | Path, today: date | None = None) -> list[CardSpec]:
    """Every row of a batch file, validated; :class:`CardCommandError` naming the line."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise CardCommandError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(row for row in handle if not row.lstrip().startswith("#"))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [f for f in CSV_REQUIRED if f not in fields]
        unknown = [f for f in fields if f not in CSV_REQUIRED + CSV_OPTIONAL]
        if missing or unknown:
            raise CardCommandError(
                f"{path}: the header must name {', '.join(CSV_REQUIRED)} (optional: "
                f"{', '.join(CSV_OPTIONAL)}); "
                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
            )
        specs, seen = [], set()
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.values()):
                continue
            try:
                spec = CardSpec.build(
                    card_number=row["card_number"], card_type=row["type"],
                    expires=row["expires"], holder=row["holder"],
                    discount_until=row.get("discount_until"), balance=row.get("balance"),
                    issuer=row.get("issuer"), today=today)
            except CardCommandError as exc:
                raise CardCommandError(f"{path} line {reader.line_num}: {exc}") from None
            if spec.card_number in seen:
                raise CardCommandError(f"{path} line {reader.line_num}: card number "
                                       f"{spec.card_number} appears twice")
            seen.add(spec.card_number)
            specs.append(spec)
    if not specs:
        raise CardCommandError(f"{path} has no cards to issue")
    return specs


# -- issuing, inspecting, blocking ------------------------------------------------------------


def _tl(kurus: int) -> str:
    sign = "-" if kurus < 0 else ""
    return f"{sign}{abs(kurus) // 100},{abs(kurus) % 100:02d} TL"


def issue_card(station: CardStation, card: Presented, store: KeyStore, spec: CardSpec,
               now: int) -> dict[str, Any]:
    """Personalise the blank ``card`` as ``spec`` under the store's current card keys and
    read it back with a validator's key A to prove it; returns the summary."""
    version = issuing_version(store)
    keys = PinnedKeyStore(store, version)
    access = station.access(card)
    purse = Purse(access, keys, key_type="B", card_type=card.card_type)
    try:
        purse.issue(spec.identity(now, version), balance=spec.balance)
    except AuthenticationError:
        found = probe(station, card, store)
        if found is not None:
            snap = Purse(station.access(card), PinnedKeyStore(store, found),
                         card_type=card.card_type).read()
            raise CardAlreadyIssued(
                f"card {card.masked} is already issued (card number "
                f"{snap.identity.card_number}, key version {found}): put a blank card on the "
                "reader") from None
        raise CardCommandError(
            f"card {card.masked} is only partly personalised (an issue was interrupted): "
            "sector 0 no longer has the transport key; set it aside for the card supplier"
        ) from None
    snap = Purse(station.access(card), keys, key_type="A", card_type=card.card_type).read()
    if snap.identity.card_number != spec.card_number or snap.balance != spec.balance:
        raise CardCommandError(f"card {card.masked} does not read back as written: do not hand "
                               "it out")
    log.info("issued card=%d type=%s uid=%s key_version=%d balance=%d", spec.card_number,
             spec.card_type.value, card.masked, version, spec.balance)
    return {
        "card_number": spec.card_number, "uid": card.uid.hex().upper(),
        "type": spec.card_type.value, "expires": spec.expires.isoformat(),
        "discount_until": spec.discount_until.isoformat() if spec.discount_until else None,
        "holder": show_holder(spec.holder), "balance": spec.balance, "issuer": spec.issuer,
        "key_version": version,
    }


def _day(days: int) -> str | None:
    return None if days == 0 else (cl.EPOCH + timedelta(days=days)).isoformat()


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, cl.LOCAL_TZ).isoformat(timespec="seconds")


def _check(name: str, ok: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail}


def _access_report(trailer: bytes, expected: layout.AccessConditions | None) -> dict[str, Any]:
    """The decoded access bits of a trailer (never its key fields)."""
    out: dict[str, Any] = {"access_bytes": trailer[6:9].hex().upper(), "gpb": trailer[9]}
    try:
        conds = layout.decode_access_bits(trailer[6:9])
    except CodecError as exc:
        out["checks"] = [_check("access bits", False, str(exc))]
        return out
    out["conditions"] = [f"{c:03b}" for c in conds]
    checks = [_check("access bits", True, "inverted copies consistent")]
    if expected is not None:
        same = tuple(conds) == tuple(expected)
        want = " ".join(f"{c:03b}" for c in expected)
        checks.append(_check("access as issued", same,
                             "" if same else f"expected {want}: the sector was re-keyed"))
    out["checks"] = checks
    return out


def _expected_access(sector: int, issued: bool) -> layout.AccessConditions | None:
    if not issued:
        return layout.TRANSPORT_ACCESS
    if sector in cl.APP_SECTORS:
        trailer = cl.sector_trailer(sector, bytes(6), bytes(6))
    elif sector == 0:
        trailer = cl.mad_trailer(bytes(6))
    else:
        return layout.TRANSPORT_ACCESS
    return layout.SectorTrailer.from_bytes(trailer).access


def _value(raw: bytes) -> dict[str, Any]:
    try:
        vb = layout.decode_value_block(raw)
    except CodecError as exc:
        return {"value": None, "addr": None, "check": _check("value block", False, str(exc))}
    return {"value": vb.value, "addr": vb.addr,
            "check": _check("value block", True, "value and address copies agree")}


def _trip(raw: bytes) -> dict[str, Any] | None:
    if not any(raw):
        return None
    try:
        trip = TripRecord.from_bytes(raw)
    except CodecError as exc:
        return {"error": str(exc), "hex": raw.hex().upper()}
    return {
        "counter": trip.counter, "time": _iso(trip.time), "line": trip.line_id,
        "validator": trip.validator_id, "fare": trip.fare, "transfer_step": trip.transfer_step,
        "product": PRODUCT_NAMES.get(product_of(trip), str(product_of(trip))),
        "riders": (trip.flags >> 4) + 1, "purse_delta": purse_delta(trip),
    }


def _decode_application(uid: bytes, blocks: Mapping[int, bytes], keys: KeyStore
                        ) -> dict[str, Any]:
    """Every application block decoded on its own, each with its own validity check, so a
    forged or torn card shows *where* it is wrong (Purse.read gives only the first error)."""
    macs = CardMacs(keys, uid)
    app: dict[str, Any] = {}
    b4, b5, b6 = blocks[4], blocks[5], blocks[6]
    number, ctype, issuer, issued, expires, discount, kv, actions = _IDENTITY_FMT.unpack(b4[:15])
    try:
        type_name = FareCardType.from_code(ctype).value
    except CodecError:
        type_name = f"unknown code {ctype}"
    id_ok = macs.check("identity", b4 + b5[:8], b5[8:16])
    app["identity"] = {
        "card_number": number, "type": type_name, "issuer": issuer, "issued": _day(issued),
        "expires": _day(expires), "discount_until": _day(discount), "key_version": kv,
        "actions_applied": actions, "holder": show_holder(b5[:8]),
        "check": _check("identity MAC", id_ok, "" if id_ok else "type or dates were altered"),
    }
    try:
        pass_block = PassBlock.parse(b6, macs)
        app["pass"] = None if pass_block is None else {
            "product": pass_block.product_id, "valid_from": _iso(pass_block.valid_from),
            "valid_until": _iso(pass_block.valid_until), "check": _check("pass MAC", True)}
    except CardForged as exc:
        app["pass"] = {"check": _check("pass MAC", False, str(exc))}
    purse, backup = _value(blocks[8]), _value(blocks[9])
    record, tag = PurseRecord.parse(blocks[10])
    trips = [_trip(blocks[b]) for b in cl.BLOCK_TRIPS]
    committed = EMPTY_TRIP if record.counter == 0 else next(
        (blocks[b] for b, t in zip(cl.BLOCK_TRIPS, trips, strict=True)
         if t is not None and t.get("counter") == record.counter), None)
    rec_ok = committed is not None and record.verifies(macs, tag, committed)
    app["purse"] = {
        "value": purse["value"], "backup": backup["value"],
        "record": {"counter": record.counter, "balance": record.balance,
                   "day_spent": record.day_spent},
        "checks": [
            {**purse["check"], "check": "purse value block (8)"},
            {**backup["check"], "check": "backup value block (9)"},
            _check("purse record MAC (10)", rec_ok,
                   "" if rec_ok else "the record does not match its trip log entry: edited or "
                   "restored from an older dump"),
            _check("purse and backup agree with the record",
                   purse["value"] == backup["value"] == record.balance,
                   f"purse {purse['value']}, backup {backup['value']}, record {record.balance}"),
        ],
    }
    for trip in trips:
        if trip is not None and "counter" in trip:
            c = trip["counter"]
            trip["state"] = ("committed" if c <= record.counter else
                             "pending" if c == record.counter + 1 else "unexpected")
    app["trips"] = sorted((t for t in trips if t is not None),
                          key=lambda t: -t.get("counter", -1))
    status = _value(blocks[14])
    app["status"] = {"value": status["value"],
                     "blocked": status["value"] is None or status["value"] < cl.STATUS_ACTIVE,
                     "check": {**status["check"], "check": "status value block (14)"}}
    return app


def _sector_key(sector: int, uid: bytes, keys: KeyStore | None) -> tuple[bytes, str]:
    if keys is not None and sector in cl.APP_SECTORS:
        return keys.classic_key(uid, sector, "A"), f"A v{keys.current_version(CLASSIC_KEY_NAME)}"
    if keys is not None and sector == 0:
        return cl.MAD_KEY_A, "A (public MAD key)"
    return TRANSPORT_KEY, "A (transport)"


def inspect_card(station: CardStation, card: Presented, store: KeyStore) -> dict[str, Any]:
    """Read every sector of ``card`` with the keys it should have and check everything:
    access bits, value block redundancy, MACs, the MAD, the purse state, the trip log.

    Never reports a key: trailers are shown by their access bytes alone.
    """
    ctype = card.card_type
    version = probe(station, card, store)
    keys = None if version is None else PinnedKeyStore(store, version)
    report: dict[str, Any] = {
        "uid": card.uid.hex().upper(), "card_type": ctype.value,
        "key_version": version, "blank": version is None, "sectors": [],
    }
    blocks: dict[int, bytes] = {}
    access = station.access(card)
    for sector in range(ctype.sectors):
        key, key_name = _sector_key(sector, card.uid, keys)
        entry: dict[str, Any] = {"sector": sector, "key": key_name}
        try:
            access.authenticate(layout.first_block(sector, ctype), key, "A")
        except AuthenticationError:
            entry["readable"] = False
            entry["checks"] = [_check("authentication", False,
                                      "refused: the sector has keys this system does not hold")]
            report["sectors"].append(entry)
            access = station.access(card)
            continue
        entry["readable"] = True
        data = []
        for block in layout.sector_blocks(sector, ctype):
            raw = access.read(block)
            if layout.is_trailer(block, ctype):
                entry["trailer"] = _access_report(raw, _expected_access(sector, keys is not None))
            else:
                blocks[block] = raw
                data.append({"block": block, "hex": raw.hex().upper()})
        entry["blocks"] = data
        checks = list(entry.get("trailer", {}).pop("checks", []))
        if sector == 0:
            checks.append(_manufacturer_check(card.uid, blocks[0]))
            if keys is not None:
                try:
                    mad = cl.decode_mad(blocks[1] + blocks[2])
                    ok = all(mad.get(s) == cl.APP_AID for s in cl.APP_SECTORS)
                    checks.append(_check("MAD", ok, "" if ok else f"AIDs {mad}"))
                except CodecError as exc:
                    checks.append(_check("MAD", False, str(exc)))
        elif sector not in cl.APP_SECTORS:
            used = any(any(d) for d in (blocks[b] for b in layout.sector_blocks(sector, ctype)
                                        if b in blocks))
            checks.append(_check("unused sector", not used, "holds data" if used else "empty"))
        entry["checks"] = checks
        report["sectors"].append(entry)
    if keys is not None:
        if all(b in blocks for b in (4, 5, 6, 8, 9, 10, 12, 13, 14)):
            report["application"] = _decode_application(card.uid, blocks, keys)
        try:
            snap = Purse(station.access(card), keys, card_type=ctype).read()
            report["verdict"] = {"ok": True, "state": snap.state.value,
                                 "balance": snap.balance, "blocked": snap.blocked}
        except CardForged as exc:
            report["verdict"] = {"ok": False, "state": "forged", "detail": str(exc)}
        except CoreError as exc:
            report["verdict"] = {"ok": False, "state": "unreadable", "detail": str(exc)}
    else:
        report["verdict"] = {"ok": True, "state": "blank"}
    return report


def _manufacturer_check(uid: bytes, block0: bytes) -> dict[str, Any]:
    if len(uid) == 4:
        bcc = uid[0] ^ uid[1] ^ uid[2] ^ uid[3]
        ok = block0[:4] == uid and block0[4] == bcc
        return _check("manufacturer block", ok, "" if ok else "UID/BCC do not match the "
                      "anticollision UID: a 'magic' card with a rewritten block 0?")
    ok = block0[:7] == uid
    return _check("manufacturer block", ok, "" if ok else "UID does not match block 0")


def block_card(station: CardStation, card: Presented, store: KeyStore,
               expect_number: int | None) -> dict[str, Any]:
    """Block ``card`` (status block decremented: no validator can undo it)."""
    version = probe(station, card, store)
    if version is None:
        raise CardCommandError(f"card {card.masked} is blank: nothing to block")
    keys = PinnedKeyStore(store, version)
    try:
        snap = Purse(station.access(card), keys, card_type=card.card_type).read()
        number = snap.identity.card_number
        already = snap.blocked
    except CardForged as exc:
        number, already = None, False
        log.warning("blocking forged card uid=%s: %s", card.masked, exc)
    if expect_number is not None and number != expect_number:
        raise CardCommandError(f"the card on the reader is card {number}, not {expect_number}: "
                               "nothing was changed")
    if not already:
        purse = Purse(station.access(card), keys, card_type=card.card_type)
        purse.block_card()
    status = _value(_read_block(station, card, keys, cl.BLOCK_STATUS))
    blocked = status["value"] is not None and status["value"] < cl.STATUS_ACTIVE
    if not blocked:
        raise CardCommandError(f"card {card.masked} could not be blocked: its status block "
                               "did not change")
    log.info("blocked card=%s uid=%s", number, card.masked)
    return {"card_number": number, "uid": card.uid.hex().upper(), "blocked": True,
            "was_blocked": already}


def _read_block(station: CardStation, card: Presented, keys: KeyStore, block: int) -> bytes:
    access = station.access(card)
    sector = layout.sector_of(block, card.card_type)
    access.authenticate(layout.first_block(sector, card.card_type),
                        keys.classic_key(card.uid, sector, "A"), "A")
    return access.read(block)


# -- the emulator's control channel -----------------------------------------------------------


def emulator_control(address: str, line: str, timeout: float = 5.0) -> list[str]:
    """Send one line to a reader emulator's control channel (a Unix socket path or
    ``HOST:PORT``) and return its reply lines (docs/pn532-emulator.md)."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "/" not in address:
        family, target = socket.AF_INET, (host or "127.0.0.1", int(port))
    else:
        family, target = socket.AF_UNIX, address
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.sendall(line.encode() + b"\n")
            buf = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
                lines = buf.decode(errors="replace").splitlines()
                if buf.endswith(b"\n") and lines and lines[-1].startswith(("ok", "error")):
                    break
    except OSError as exc:
        raise CardCommandError(f"emulator control {address}: {exc}") from None
    lines = buf.decode(errors="replace").splitlines()
    if not lines or not lines[-1].startswith("ok"):
        raise CardCommandError(f"emulator control {address}: {line!r} failed: "
                               f"{lines[-1] if lines else 'no answer'}")
    return lines


# -- the commands -----------------------------------------------------------------------------


def _store(path: str) -> FileKeyStore:
    return FileKeyStore.open(path)


def _reader_options(fn: Any) -> Any:
    fn = click.option("--mode", type=click.Choice(["transparent", "chip"]),
                      default="transparent", show_default=True,
                      help="MIFARE Classic mode: host Crypto1 (transparent) or the PN532's.")(fn)
    fn = click.option("--keys", "keys_path", required=True, metavar="PATH",
                      help="Key store with the card keys (see 'afc keys generate').")(fn)
    fn = click.option("--reader", "reader_url", required=True, metavar="URL",
                      help="Reader URL: /dev/ttyUSB0, an emulator pty, socket://HOST:PORT.")(fn)
    return click.option("--card-wait", type=click.FloatRange(0.1, 3600), default=30.0,
                        show_default=True, help="Seconds to wait for a card.")(fn)


@click.group()
def card() -> None:
    """Personalise, inspect and block cards on a PN532 reader (real or emulated).

    \b
    A lab run on the emulator:
      afc keys generate --store keys.toml
      afc sim reader --port /tmp/pn532 --card new:1k --control /tmp/pn532.ctl &
      afc card issue --reader /tmp/pn532 --keys keys.toml --number 1001 --type student \\
          --expires 2030-08-31 --discount-until 2026-09-30 --holder OF-00017 --balance 50
      afc card inspect --reader /tmp/pn532 --keys keys.toml
    See docs/card-layout.md for what is on a card.
    """


@card.command(short_help="Personalise blank cards (one, or a CSV batch).")
@_reader_options
@click.option("--number", "card_number", metavar="N", help="Card number (printed on the card).")
@click.option("--type", "card_type", metavar="TYPE",
              help="full, student, teacher, 65+, disabled, disabled_companion, personnel, "
              "free_other.")
@click.option("--expires", metavar="YYYY-MM-DD", help="Last day the card is valid.")
@click.option("--discount-until", metavar="YYYY-MM-DD",
              help="Last day of the discount (yearly re-validation); default: the expiry.")
@click.option("--holder", metavar="REF", help="Holder reference: 1-8 ASCII characters or "
              "hex:16 digits, pointing to the file at the office (no personal data).")
@click.option("--balance", default="0", show_default=True, metavar="TL",
              help="Initial balance in TL (50, 50.25 or 50,25).")
@click.option("--issuer", default=1, show_default=True, type=click.IntRange(1, 255),
              help="Issuing point (1 = the KONYAKART office).")
@click.option("--csv", "csv_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Batch: one card per row, columns card_number,type,expires,holder and "
              "optionally discount_until,balance,issuer.")
@click.option("--emulator-control", metavar="SOCKET|HOST:PORT",
              help="Batch on the emulator: place card FIRST+i for row i through its control "
              "channel instead of waiting for an operator.")
@click.option("--first-card", default=1, show_default=True, type=click.IntRange(1),
              help="With --emulator-control: the emulator card number of the first row.")
@click.option("--tariff", default="konya-2025", show_default=True,
              help="Tariff whose maximum balance applies (a shipped name or a TOML path).")
@click.option("--json", "as_json", is_flag=True, help="JSON: one object per card, in a list.")
def issue(reader_url: str, keys_path: str, mode: str, card_wait: float, card_number: str | None,
          card_type: str | None, expires: str | None, discount_until: str | None,
          holder: str | None, balance: str, issuer: int, csv_path: str | None,
          emulator_control: str | None, first_card: int, tariff: str, as_json: bool) -> None:
    """Personalise blank cards: MAD, identity (number, type, dates, holder reference, key
    version), purse with the initial balance, empty trip log, per-card keys and access bits.

    Every card is read back with a validator's key A before it counts as issued. A batch
    (--csv) is checked row by row before the first card is touched; cards are then
    presented one after another (a new UID each time), with a progress bar on stderr.

    \b
    Example CSV:
      card_number,type,expires,discount_until,holder,balance
      1001,student,2030-08-31,2026-09-30,OF-00017,50
      1002,65+,2032-12-31,,OF-00018,0
    """
    from firmware.apps.validator import load_tariff

    store = _store(keys_path)
    issuing_version(store)
    table = load_tariff(tariff)
    if csv_path is not None:
        given = [n for n, v in (("--number", card_number), ("--type", card_type),
                                ("--expires", expires), ("--holder", holder)) if v is not None]
        if given:
            raise click.UsageError(f"--csv takes the cards from the file; drop {', '.join(given)}")
        specs = read_csv(csv_path)
    else:
        missing = [n for n, v in (("--number", card_number), ("--type", card_type),
                                  ("--expires", expires), ("--holder", holder)) if v is None]
        if missing:
            raise click.UsageError(f"give {', '.join(missing)} (or --csv FILE)")
        if emulator_control:
            raise click.UsageError("--emulator-control goes with --csv")
        specs = [CardSpec.build(card_number=card_number, card_type=card_type, expires=expires,
                                holder=holder, discount_until=discount_until, balance=balance,
                                issuer=issuer)]
    for spec in specs:
        if spec.balance > table.max_balance:
            raise CardCommandError(f"card {spec.card_number}: balance {_tl(spec.balance)} is "
                                   f"above the tariff's maximum {_tl(table.max_balance)}")
    results = []
    with CardStation.open(reader_url, mode) as station:
        previous: bytes | None = None
        batch = len(specs) > 1 or csv_path is not None
        bar = click.progressbar(specs, label="issuing", file=sys.stderr,
                                show_pos=True) if batch else contextlib.nullcontext(specs)
        with bar as rows:
            for i, spec in enumerate(rows):
                if emulator_control:
                    emulator_control_place(emulator_control, first_card + i)
                elif batch:
                    click.echo(f"\nput card {i + 1}/{len(specs)} (number {spec.card_number}) on "
                               "the reader", err=True)
                presented = station.wait(card_wait, other_than=previous)
                try:
                    result = issue_card(station, presented, store, spec, int(time.time()))
                except CardCommandError as exc:
                    if results:
                        done = ", ".join(str(r["card_number"]) for r in results)
                        raise CardCommandError(f"{exc} (issued before the stop: {done})") \
                            from None
                    raise
                results.append(result)
                previous = presented.uid
                if not as_json:
                    click.echo(_issued_line(result))
    if as_json:
        click.echo(json.dumps(results, indent=2))


def emulator_control_place(address: str, number: int) -> None:
    """Take every card off the emulated reader and put card ``number`` on it."""
    emulator_control(address, "remove all")
    emulator_control(address, f"place {number}")


def _issued_line(r: Mapping[str, Any]) -> str:
    disc = f" discount until {r['discount_until']}" if r["discount_until"] else ""
    return (f"issued card {r['card_number']} ({r['type']}, expires {r['expires']}{disc}, "
            f"holder {r['holder']}, key v{r['key_version']}) balance {_tl(r['balance'])}")


@card.command(short_help="Decode and check every sector of a card.")
@_reader_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def inspect(reader_url: str, keys_path: str, mode: str, card_wait: float, as_json: bool) -> None:
    """Read the card on the reader and check it: access bits of every sector, value block
    redundancy, identity/pass/purse MACs, the MAD, the purse state (torn update, forged),
    the trip log. Keys are never shown (trailers by their access bytes only).

    Exit status 0 when the card is sound (or blank), 1 with a one-line error after the
    report when a check fails.
    """
    store = _store(keys_path)
    with CardStation.open(reader_url, mode) as station:
        presented = station.wait(card_wait)
        report = inspect_card(station, presented, store)
    failed = [c for c in _all_checks(report) if not c["ok"]]
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(format_report(report))
    if failed or not report["verdict"]["ok"]:
        what = report["verdict"].get("detail") or failed[0]["check"]
        raise CardCommandError(f"card {report['uid']} fails inspection: {what}")


def _all_checks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    checks = [c for s in report["sectors"] for c in s.get("checks", [])]
    app = report.get("application")
    if app:
        checks.append(app["identity"]["check"])
        if app["pass"] is not None:
            checks.append(app["pass"]["check"])
        checks += app["purse"]["checks"]
        checks.append(app["status"]["check"])
    return checks


def format_report(report: Mapping[str, Any]) -> str:
    """The inspection as text for the counter: one line per check, ✓ or ✗."""
    mark = {True: "ok ", False: "BAD"}
    version = report["key_version"]
    lines = [f"card UID {report['uid']}  {report['card_type']}  "
             + ("blank (transport keys)" if version is None else f"key version {version}")]
    app = report.get("application")
    if app:
        ident = app["identity"]
        lines.append(f"  card {ident['card_number']}  type {ident['type']}  issuer "
                     f"{ident['issuer']}  issued {ident['issued']}  expires {ident['expires']}"
                     f"  discount until {ident['discount_until'] or '-'}  holder "
                     f"{ident['holder']}  actions applied {ident['actions_applied']}")
        purse = app["purse"]
        rec = purse["record"]
        lines.append(f"  purse {_tl(rec['balance'])}  counter {rec['counter']}  day spent "
                     f"{_tl(rec['day_spent'])}  status "
                     f"{'BLOCKED' if app['status']['blocked'] else 'in service'}")
        if app["pass"] and "product" in app["pass"]:
            p = app["pass"]
            lines.append(f"  pass product {p['product']}  {p['valid_from']} .. {p['valid_until']}")
        for trip in app["trips"]:
            if "counter" in trip:
                lines.append(f"  trip #{trip['counter']} {trip['state']}: {trip['time']}  "
                             f"{trip['product']}  line {trip['line']}  validator "
                             f"{trip['validator']}  {_tl(trip['purse_delta'])}")
            else:
                lines.append(f"  trip entry unreadable: {trip['error']}")
    for sector in report["sectors"]:
        checks = sector.get("checks", [])
        head = f"  sector {sector['sector']:2d} key {sector['key']}"
        if sector.get("trailer"):
            head += f"  access {sector['trailer']['access_bytes']}"
        if all(c["ok"] for c in checks):  # a clean sector: one line
            lines.append(f"{head}  ok: {', '.join(c['check'] for c in checks)}")
            continue
        lines.append(head)
        for c in checks:
            lines.append(f"    {mark[c['ok']]} {c['check']}" + (f": {c['detail']}"
                                                               if c["detail"] else ""))
    if app:
        for c in [app["identity"]["check"], *([app["pass"]["check"]] if app["pass"] else []),
                  *app["purse"]["checks"], app["status"]["check"]]:
            lines.append(f"  {mark[c['ok']]} {c['check']}" + (f": {c['detail']}"
                                                             if c["detail"] else ""))
    verdict = report["verdict"]
    lines.append(f"verdict: {verdict['state']}" + (f" ({verdict['detail']})"
                                                    if verdict.get("detail") else ""))
    return "\n".join(lines)


@card.command(short_help="Block the card on the reader.")
@_reader_options
@click.option("--number", "expect_number", type=int, metavar="N",
              help="Only block if the card on the reader is card N (a safety check).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def block(reader_url: str, keys_path: str, mode: str, card_wait: float,
          expect_number: int | None, as_json: bool) -> None:
    """Block the card on the reader: its status block is decremented, which a validator's
    key A can never undo; every validator then refuses it. Also blocks a forged card.
    Blacklist the card number as well ('afc bundle'), for readers the card never meets
    at the office."""
    store = _store(keys_path)
    with CardStation.open(reader_url, mode) as station:
        presented = station.wait(card_wait)
        result = block_card(station, presented, store, expect_number)
    if as_json:
        click.echo(json.dumps(result))
    else:
        note = " (it was blocked already)" if result["was_blocked"] else ""
        click.echo(f"blocked card {result['card_number']}{note}")



if __name__ == "__main__":  # python -m tools.card_cmd card ... (until `afc card` is registered)
    from tools.cli import AfcGroup

    AfcGroup(name="afc", commands={"card": card})(prog_name="afc")
