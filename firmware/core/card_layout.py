"""The KONYAKART-style card application on MIFARE Classic: where everything lives, and MACs.

Pure encoding and decoding of the application's blocks (see ``docs/card-layout.md`` for the
byte-level map). The tear-safe update protocol that writes them lives in :mod:`.purse`.

Layout (1K and 4K alike; only sectors 0–3 are used)::

    sector 0  block 1-2  MAD v1: sectors 1..3 -> our AID
    sector 1  block 4    identity: card number, type, issuer, dates, key version
              block 5    holder reference + identity MAC
              block 6    monthly pass (product, valid from/until) + pass MAC
    sector 2  block 8    purse: balance in kuruş (value block)
              block 9    purse backup (value block): tear recovery
              block 10   purse record: transaction counter, balance, day spend, MAC
    sector 3  block 12   trip log entry (ring of two)
              block 13   trip log entry
              block 14   status (value block): 1 = in service, 0 = blocked (one-way for key A)

Keys: every sector has its own per-card diversified keys (AN10922, :mod:`.keys`). Validators
hold key A, which reads everything, spends (DECREMENT/TRANSFER/RESTORE on the purse), writes
the purse record and trip log, and can only *decrement* the status block: it can block a card
and never unblock it, and it can never add value. Top-up terminals and the issuing office
hold key B, which also writes identity and pass and may INCREMENT.

MACs (AES-CMAC, truncated) use per-card keys diversified from the key store's ``purse-mac``
master, so a forger who cracked a card's Crypto1 keys still cannot produce a purse, pass or
identity that verifies, and a cracked card teaches nothing about another card.
"""

from __future__ import annotations

import functools
import hmac
import struct
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from . import classic_layout as layout
from .errors import CodecError
from .keys import PURSE_MAC_KEY_NAME, KeyedCmac, KeyStore

# MAD application identifier this project uses for the fare application on sectors 1..3.
# (A production deployment registers its own AID with NXP; see docs/card-layout.md.)
APP_AID = 0x4B43  # "KC"
MAD_INFO_BYTE = 0x01  # the card publisher sector: the first application sector
MAD_KEY_A = bytes.fromhex("A0A1A2A3A4A5")  # the public MAD key (NXP AN10787)
MAD_ACCESS = bytes.fromhex("787788")
MAD_GPB = 0xC1  # DA (MAD available), multi-application card, MAD version 1

IDENTITY_SECTOR, PURSE_SECTOR, TRIP_SECTOR = 1, 2, 3
APP_SECTORS = (IDENTITY_SECTOR, PURSE_SECTOR, TRIP_SECTOR)
BLOCK_IDENTITY, BLOCK_HOLDER, BLOCK_PASS = 4, 5, 6
BLOCK_PURSE, BLOCK_BACKUP, BLOCK_RECORD = 8, 9, 10
BLOCK_TRIPS = (12, 13)
BLOCK_STATUS = 14

STATUS_ACTIVE = 1
EPOCH = date(2000, 1, 1)
MAC_AID = b"KCM"  # AN10922 AID field for the MAC keys
MAC_SYSTEM = {"identity": b"AFC-MAC-ID", "pass": b"AFC-MAC-PASS", "purse": b"AFC-MAC-PURSE"}
RECORD_MAC_LEN = 6
IDENTITY_MAC_LEN = 8
PASS_MAC_LEN = 7


LOCAL_TZ = ZoneInfo("Europe/Istanbul")  # card dates are the dates printed on the card


def day_number(ts: int) -> int:
    """Days since 2000-01-01 of the local date of a unix time: how dates are stored."""
    return (datetime.fromtimestamp(ts, LOCAL_TZ).date() - EPOCH).days


@functools.lru_cache(maxsize=4096)
def day_start(days: int) -> int:
    """The unix time of local midnight at the start of stored day ``days``.

    Cached: a pure function of the day number, asked for the same few dates (a card's
    issue, expiry and discount dates) at every tap."""
    d = EPOCH + timedelta(days=days)
    return int(datetime(d.year, d.month, d.day, tzinfo=LOCAL_TZ).timestamp())


def _u16_day(ts: int | None, what: str) -> int:
    if ts is None:
        return 0
    d = day_number(ts)
    if not 0 <= d <= 0xFFFF:
        raise CodecError(f"{what} {ts} is outside the card's date range")
    return d


# -- MAD --------------------------------------------------------------------------------------


def crc8_mad(data: bytes) -> int:
    """CRC-8 of the MIFARE Application Directory (polynomial x^8+x^4+x^3+x^2+1, preset 0xC7)."""
    crc = 0xC7
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1D) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_mad(aids: dict[int, int]) -> bytes:
    """Blocks 1 and 2 of sector 0 (32 bytes) for a 1K MAD v1: ``aids`` maps sector -> AID."""
    body = bytearray(31)
    body[0] = MAD_INFO_BYTE
    for sector, aid in aids.items():
        if not 1 <= sector <= 15:
            raise CodecError(f"MAD v1 covers sectors 1..15, not {sector}")
        body[1 + 2 * (sector - 1) : 3 + 2 * (sector - 1)] = aid.to_bytes(2, "little")
    return bytes((crc8_mad(bytes(body)),)) + bytes(body)


def decode_mad(blocks: bytes) -> dict[int, int]:
    """The sector -> AID map of a MAD v1 (blocks 1-2); :class:`CodecError` on a bad CRC."""
    if len(blocks) != 32:
        raise CodecError(f"a MAD v1 is 32 bytes (blocks 1 and 2), not {len(blocks)}")
    if crc8_mad(blocks[1:]) != blocks[0]:
        raise CodecError("MAD CRC mismatch: sector 0 is corrupt or not a MAD")
    out = {}
    for sector in range(1, 16):
        aid = int.from_bytes(blocks[1 + 2 * sector - 1 : 1 + 2 * sector + 1], "little")
        if aid:
            out[sector] = aid
    return out


# -- MAC keys ---------------------------------------------------------------------------------


class CardMacs:
    """The three MACs of one card, with per-card keys derived once per tap, each on its first
    use (a card without a pass never needs the pass key).

    The key store never hands out the master: it diversifies it for this UID (AN10922), and
    the derived keys live only as long as this object (one tap).
    """

    __slots__ = ("_cmacs", "_key_name", "_store", "uid")

    def __init__(self, store: KeyStore, uid: bytes, *, key_name: str = PURSE_MAC_KEY_NAME):
        self.uid = bytes(uid)
        self._store = store
        self._key_name = key_name
        # each key's CMAC state (a tap MACs with the purse key twice)
        self._cmacs: dict[str, KeyedCmac] = {}

    def __repr__(self) -> str:
        return f"CardMacs(uid=…{self.uid[-2:].hex().upper()})"

    def mac(self, kind: str, data: bytes, length: int) -> bytes:
        cmac = self._cmacs.get(kind)
        if cmac is None:
            key = self._store.diversify(self._key_name, self.uid, MAC_AID, MAC_SYSTEM[kind])
            cmac = self._cmacs[kind] = KeyedCmac(key)
        return cmac(self.uid + data)[:length]

    def check(self, kind: str, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(kind, data, len(tag)), tag)


# -- sector 1: identity and pass --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the card is: written once by the issuing office (key B)."""

    card_number: int  # u32, printed on the card
    card_type: int  # the fare engine's CardType code
    issuer: int  # u8: 1 = KONYAKART office, 2.. = other issuing points
    issued: int  # unix time
    expires: int  # unix time (exclusive): the card itself; stored as its local date
    discount_until: int | None  # unix time (exclusive) of the yearly re-validation; None: none
    key_version: int  # u8: which generation of master keys this card's keys came from
    holder_ref: bytes  # 8 bytes: reference to the holder's file at the office (not personal data)
    actions_applied: int = 0  # u16: the highest center action number this card has received

    _FMT = struct.Struct("<IBBHHHBH")  # 15 bytes, then 1 reserved

    def blocks(self, macs: CardMacs) -> tuple[bytes, bytes]:
        """Blocks 4 and 5."""
        if len(self.holder_ref) != 8:
            raise CodecError("holder reference must be 8 bytes")
        try:
            b4 = self._FMT.pack(
                self.card_number,
                self.card_type,
                self.issuer,
                _u16_day(self.issued, "issue date"),
                _u16_day(self.expires, "expiry date"),
                _u16_day(self.discount_until, "discount end"),
                self.key_version,
                self.actions_applied,
            ) + bytes(1)
        except struct.error as exc:
            raise CodecError(f"identity field out of range: {exc}") from None
        tag = macs.mac("identity", b4 + self.holder_ref, IDENTITY_MAC_LEN)
        return b4, self.holder_ref + tag

    @classmethod
    def parse(cls, b4: bytes, b5: bytes, macs: CardMacs) -> Identity:
        """Decode blocks 4 and 5; :class:`CardForged` when the MAC does not verify."""
        if len(b4) != 16 or len(b5) != 16:
            raise CodecError("identity blocks are 16 bytes each")
        if not macs.check("identity", b4 + b5[:8], b5[8:16]):
            raise CardForged("identity MAC does not verify: card type or dates were altered")
        number, ctype, issuer, issued, expires, discount, kv, actions = cls._FMT.unpack(b4[:15])
        # "valid until" dates are inclusive on the card and exclusive (next local midnight)
        # for the fare engine
        return cls(
            number, ctype, issuer, day_start(issued), day_start(expires + 1),
            day_start(discount + 1) if discount else None, kv, bytes(b5[:8]), actions,
        )


@dataclass(frozen=True, slots=True)
class PassBlock:
    """The monthly pass ("abonman") loaded by a top-up terminal (key B)."""

    product_id: int  # u8; 0 = no pass
    valid_from: int  # unix time
    valid_until: int  # unix time

    _FMT = struct.Struct("<BII")  # 9 bytes, then the MAC

    def block(self, macs: CardMacs) -> bytes:
        try:
            body = self._FMT.pack(self.product_id, self.valid_from, self.valid_until)
        except struct.error as exc:
            raise CodecError(f"pass field out of range: {exc}") from None
        return body + macs.mac("pass", body, PASS_MAC_LEN)

    @classmethod
    def parse(cls, b6: bytes, macs: CardMacs) -> PassBlock | None:
        """None for an empty pass block (all zero); :class:`CardForged` on a bad MAC."""
        if len(b6) != 16:
            raise CodecError("the pass block is 16 bytes")
        if not any(b6):
            return None
        if not macs.check("pass", b6[:9], b6[9:16]):
            raise CardForged("pass MAC does not verify: the pass was altered")
        product, start, until = cls._FMT.unpack(b6[:9])
        return None if product == 0 else cls(product, start, until)


# -- sector 2: the purse record ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurseRecord:
    """Block 10: the state the purse value blocks must agree with, under a MAC.

    ``counter`` counts every change of the purse and trip log (taps, top-ups, repairs) and
    never goes down; the MAC binds it to the balance, the day's spend and the newest trip log
    entry, so restoring an old purse, or editing one, does not verify.
    """

    counter: int  # u32
    balance: int  # i32, kuruş
    day_spent: int  # u16, kuruş spent on the local day of the newest trip

    _FMT = struct.Struct("<IiH")  # 10 bytes, then a 6-byte MAC

    def block(self, macs: CardMacs, newest_trip: bytes) -> bytes:
        try:
            body = self._FMT.pack(self.counter, self.balance, self.day_spent)
        except struct.error as exc:
            raise CodecError(f"purse record field out of range: {exc}") from None
        return body + macs.mac("purse", body + newest_trip, RECORD_MAC_LEN)

    @classmethod
    def parse(cls, b10: bytes) -> tuple[PurseRecord, bytes]:
        """The record and its MAC; the MAC is checked by the caller, who knows the trip."""
        if len(b10) != 16:
            raise CodecError("the purse record is 16 bytes")
        counter, balance, spent = cls._FMT.unpack(b10[:10])
        return cls(counter, balance, spent), bytes(b10[10:16])

    def verifies(self, macs: CardMacs, tag: bytes, newest_trip: bytes) -> bool:
        body = self._FMT.pack(self.counter, self.balance, self.day_spent)
        return macs.check("purse", body + newest_trip, tag)


# -- trailers ---------------------------------------------------------------------------------


def sector_trailer(sector: int, key_a: bytes, key_b: bytes) -> bytes:
    """The trailer of an application sector: access conditions per block as described in
    the module docstring (trailer condition 011: only key B changes keys and access bits)."""
    R = layout.BlockRole
    conditions = {
        # identity, holder+MAC, pass: read A|B, write B
        IDENTITY_SECTOR: (R.DATA.value, R.DATA.value, R.DATA.value),
        # purse, backup: value blocks (decrement/transfer/restore A|B, increment B);
        # record: read/write A|B (000)
        PURSE_SECTOR: (R.VALUE.value, R.VALUE.value, 0b000),
        # two trip entries read/write A|B, status: value (decrement with A, increment only B)
        TRIP_SECTOR: (0b000, 0b000, R.VALUE.value),
    }[sector]
    access = layout.AccessConditions(*conditions, layout.TRANSIT_TRAILER_CONDITION)
    return layout.SectorTrailer(key_a, access, 0x69, key_b).to_bytes()


def mad_trailer(key_b: bytes) -> bytes:
    """Sector 0's trailer: the public MAD key A, the issuer's key B, MAD access bits."""
    return MAD_KEY_A + MAD_ACCESS + bytes((MAD_GPB,)) + key_b


class CardForged(CodecError):
    """A MAC on the card does not verify: the card was edited by someone without the MAC key
    (or restored from a dump made under other keys). The card is blocked."""
