"""The fare engine: one pure function from (card, tariff, time, validator) to a decision.

Why a pure function: the validator must decide in well under a millisecond, offline, and the
same decision must be reproducible later (by the center when it reconciles a journal, by the
tests, by a simulator). So :func:`decide` reads nothing but its arguments, writes nothing, and
returns a :class:`Decision` that says what to write to the card (a :class:`TripRecord`, the new
``day_spent``) and what to show; the card application does the writing.

Why the tariff is data: fares change every year or two by a council decision, and the rules
(who pays what, transfers, passes) differ from city to city. A :class:`FareTable` is loaded
from a versioned TOML bundle in a vocabulary close to GTFS Fares v2 (``fare_media``,
``rider_categories``, ``fare_products``, ``fare_leg_rules``, ``fare_transfer_rules``) so an
operator can read it, and it is validated thoroughly on load so a bad bundle is refused by the
device that receives it rather than discovered by a passenger. ``docs/fares.md`` describes the
vocabulary, the rules in the order :func:`decide` applies them, and the reason codes.

Money is always an integer number of kuruş (1 TL = 100 kuruş); a float anywhere in a tariff is
refused. Times are unix seconds; "the local day" is the calendar day in the tariff's time zone
(Europe/Istanbul for Turkish cities).

Errors: malformed card data or arguments raise :class:`~firmware.core.errors.CodecError`, a bad
tariff raises :class:`FareTableError` (a ``CodecError``), so a caller that catches
:class:`~firmware.core.errors.CoreError` turns any of them into a clean refusal.
"""

from __future__ import annotations

import struct
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import Enum, IntEnum, StrEnum
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import CodecError

__all__ = [
    "CLOCK_SKEW_TOLERANCE",
    "PRODUCT_FREE",
    "PRODUCT_NONE",
    "PRODUCT_PASS",
    "PRODUCT_PURSE",
    "AntiPassback",
    "CardType",
    "CardView",
    "Decision",
    "DurationLimitType",
    "FareLegRule",
    "FareMedia",
    "FareProduct",
    "FareTable",
    "FareTableError",
    "FareTransferRule",
    "Network",
    "PassProduct",
    "Reason",
    "RiderCategory",
    "TripProduct",
    "TripRecord",
    "ValidatorContext",
    "decide",
]

#: A trip on the card stamped more than this many seconds *after* the validator's clock is
#: treated as untrustworthy (a validator with a clock far ahead wrote it) and ignored for
#: anti-passback, transfers and the daily total. Within the tolerance it counts as "just now",
#: so a small clock difference between two validators can never cause a second charge.
CLOCK_SKEW_TOLERANCE: Final = 300

PRODUCT_PURSE: Final = "purse"
PRODUCT_PASS: Final = "pass"
PRODUCT_FREE: Final = "free"
#: ``Decision.product`` of a rejection: nothing was used.
PRODUCT_NONE: Final = "none"

_U8: Final = 0xFF
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_I32_MAX: Final = 0x7FFF_FFFF
_DAY: Final = 86_400


class FareTableError(CodecError):
    """A tariff bundle is malformed; the message names the offending entry."""


# --------------------------------------------------------------------------------------------
# Card types, reason codes
# --------------------------------------------------------------------------------------------


class CardType(StrEnum):
    """The kinds of KONYAKART a person can hold, each stored on the card as a 1-byte code.

    The string value is what a tariff's ``rider_categories.*.card_types`` lists; :attr:`code`
    is the byte on the card. Code 0 is deliberately unused so that a blank (all-zero) identity
    block is never mistaken for a valid full-fare card.
    """

    FULL = "full"
    STUDENT = "student"
    TEACHER = "teacher"
    SENIOR_65 = "65+"
    DISABLED = "disabled"
    DISABLED_COMPANION = "disabled_companion"
    PERSONNEL = "personnel"
    FREE_OTHER = "free_other"

    @property
    def code(self) -> int:
        """The 1-byte code stored on the card."""
        return _CARD_TYPE_CODE[self]

    @classmethod
    def from_code(cls, code: int) -> CardType:
        """The card type for a byte read from a card; an unknown code is a :class:`CodecError`."""
        if isinstance(code, int) and not isinstance(code, bool):
            found = _CARD_TYPE_BY_CODE.get(code)
            if found is not None:
                return found
        raise CodecError(f"unknown card type code {code!r}")


_CARD_TYPE_CODE: Final[Mapping[CardType, int]] = MappingProxyType(
    {
        CardType.FULL: 1,
        CardType.STUDENT: 2,
        CardType.TEACHER: 3,
        CardType.SENIOR_65: 4,
        CardType.DISABLED: 5,
        CardType.DISABLED_COMPANION: 6,
        CardType.PERSONNEL: 7,
        CardType.FREE_OTHER: 8,
    }
)
_CARD_TYPE_BY_CODE: Final[Mapping[int, CardType]] = MappingProxyType(
    {code: card_type for card_type, code in _CARD_TYPE_CODE.items()}
)


class Reason(Enum):
    """Why a tap was accepted or refused, with the two short lines the validator shows.

    ``code`` is stable (it goes into the journal and to the center); ``accepted`` says whether
    a decision with this reason lets the rider board; the messages fit a 20-character line.
    ``DISCOUNT_EXPIRED`` is only ever a :attr:`Decision.notice` (a hint shown beside an
    accepted ride); ``PASS_EXPIRED`` is a notice when the purse paid instead, and the reason
    when the purse could not.
    """

    OK = (0, True, "İyi yolculuklar", "Have a good trip")
    OK_TRANSFER = (1, True, "Aktarma", "Transfer")
    OK_PASS = (2, True, "Abonman geçerli", "Pass valid")
    OK_FREE = (3, True, "Ücretsiz geçiş", "Free ride")
    OK_DAILY_CAP = (4, True, "Günlük tavan doldu", "Daily cap reached")
    ALREADY_VALIDATED = (10, False, "Kart zaten okutuldu", "Already validated")
    INSUFFICIENT_BALANCE = (11, False, "Yetersiz bakiye", "Insufficient balance")
    CARD_EXPIRED = (12, False, "Kartın süresi dolmuş", "Card expired")
    CARD_BLOCKED = (13, False, "Kart kapatılmış", "Card blocked")
    BLACKLISTED = (14, False, "Kart kara listede", "Card blacklisted")
    PASS_EXPIRED = (15, False, "Abonman süresi doldu", "Pass expired")
    UNKNOWN_CARD_TYPE = (16, False, "Geçersiz kart türü", "Unknown card type")
    RIDERS_NOT_ALLOWED = (17, False, "Ek yolcu ödenemez", "No extra riders")
    LINE_NOT_IN_TARIFF = (18, False, "Hat tarifede yok", "Line not in tariff")
    DISCOUNT_EXPIRED = (20, True, "Vize süresi doldu", "Discount expired")

    def __init__(self, code: int, accepted: bool, message_tr: str, message_en: str) -> None:
        self.code = code
        self.accepted = accepted
        self.message_tr = message_tr
        self.message_en = message_en

    def __repr__(self) -> str:
        return f"<Reason.{self.name}: {self.code}>"

    @classmethod
    def from_code(cls, code: int) -> Reason:
        """The reason for a code read back from a journal; unknown → :class:`CodecError`."""
        for reason in cls:
            if reason.code == code:
                return reason
        raise CodecError(f"unknown reason code {code!r}")


# --------------------------------------------------------------------------------------------
# Card-side records
# --------------------------------------------------------------------------------------------


class TripProduct(IntEnum):
    """The low nibble of :attr:`TripRecord.flags`: what paid for (or what was) this entry."""

    PURSE = 0
    PASS = 1
    FREE = 2
    TOP_UP = 3
    REPAIR = 4


_RIDE_PRODUCTS: Final = frozenset({TripProduct.PURSE, TripProduct.PASS, TripProduct.FREE})
_TRIP_STRUCT: Final = struct.Struct("<IIHHHBB")
_TRIP_FIELDS: Final = (
    ("counter", 32),
    ("time", 32),
    ("line_id", 16),
    ("validator_id", 16),
    ("fare", 16),
    ("transfer_step", 8),
    ("flags", 8),
)


#: The product nibbles a trip record may carry (:class:`TripProduct` values).
_TRIP_PRODUCT_CODES = frozenset(p.value for p in TripProduct)


def _check_uint(owner: str, name: str, value: object, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise CodecError(
            f"{owner}.{name} must be an integer in 0..{(1 << bits) - 1}, got {value!r}"
        )


@dataclass(frozen=True, slots=True)
class TripRecord:
    """One entry of the card's trip log, exactly 16 bytes on the card (little-endian).

    Layout: ``counter`` u32 (card transaction counter after this entry), ``time`` u32 (unix
    seconds), ``line_id`` u16, ``validator_id`` u16, ``fare`` u16 (kuruş taken from the purse,
    0 for pass/free), ``transfer_step`` u8 (0 = started a journey, k = k-th transfer),
    ``flags`` u8 (low nibble :class:`TripProduct`, high nibble riders − 1).

    The log is the engine's only memory: anti-passback, transfers and the daily total are all
    derived from it, which is why a top-up or a repair writes an entry too (so the counter
    sequence has no holes) but is never mistaken for a ride.
    """

    counter: int
    time: int
    line_id: int
    validator_id: int
    fare: int
    transfer_step: int
    flags: int

    SIZE: ClassVar[int] = _TRIP_STRUCT.size

    def __post_init__(self) -> None:
        # One expression for the common case (four records are built on every tap); the
        # field walk below only runs to name what is wrong.
        c, t, li, vi, f, ts, fl = (
            self.counter, self.time, self.line_id, self.validator_id, self.fare,
            self.transfer_step, self.flags,
        )
        if (
            type(c) is int and type(t) is int and type(li) is int and type(vi) is int
            and type(f) is int and type(ts) is int and type(fl) is int
            and 0 <= c <= 0xFFFFFFFF and 0 <= t <= 0xFFFFFFFF and 0 <= li <= 0xFFFF
            and 0 <= vi <= 0xFFFF and 0 <= f <= 0xFFFF and 0 <= ts <= 0xFF and 0 <= fl <= 0xFF
            and fl & 0x0F in _TRIP_PRODUCT_CODES
        ):
            return
        for name, bits in _TRIP_FIELDS:
            _check_uint("TripRecord", name, getattr(self, name), bits)
        if self.flags & 0x0F not in _TRIP_PRODUCT_CODES:
            raise CodecError(f"TripRecord.flags: unknown product nibble {self.flags & 0x0F}")

    @classmethod
    def make(
        cls,
        *,
        counter: int,
        time: int,
        line_id: int,
        validator_id: int,
        fare: int,
        transfer_step: int,
        product: TripProduct,
        riders: int = 1,
    ) -> TripRecord:
        """Build a record from its meaning rather than its packed ``flags`` byte."""
        if isinstance(riders, bool) or not isinstance(riders, int) or not 1 <= riders <= 16:
            raise CodecError(f"TripRecord riders must be 1..16, got {riders!r}")
        return cls(
            counter=counter,
            time=time,
            line_id=line_id,
            validator_id=validator_id,
            fare=fare,
            transfer_step=transfer_step,
            flags=(riders - 1) << 4 | TripProduct(product),
        )

    @property
    def product(self) -> TripProduct:
        """What paid for this entry (or that it was a top-up or a repair)."""
        return TripProduct(self.flags & 0x0F)

    @property
    def riders(self) -> int:
        """How many people this tap paid for (the holder plus extra riders)."""
        return (self.flags >> 4) + 1

    @property
    def is_ride(self) -> bool:
        """True for a boarding (purse, pass or free); False for a top-up or a repair."""
        return self.product in _RIDE_PRODUCTS

    def to_bytes(self) -> bytes:
        """The 16 bytes the card layer stores as-is."""
        return _TRIP_STRUCT.pack(
            self.counter,
            self.time,
            self.line_id,
            self.validator_id,
            self.fare,
            self.transfer_step,
            self.flags,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TripRecord:
        """Parse 16 bytes from the card; bad length or product → :class:`CodecError`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"a trip record is bytes, got {type(data).__name__}")
        raw = bytes(data)
        if len(raw) != cls.SIZE:
            raise CodecError(f"a trip record is {cls.SIZE} bytes, got {len(raw)}")
        return cls(*_TRIP_STRUCT.unpack(raw))


@dataclass(frozen=True, slots=True)
class PassProduct:
    """A monthly pass ("abonman") loaded on the card: valid for ``valid_from <= t < valid_until``.

    ``product_id`` is the tariff's ``fare_products.<id>.product_code`` (one byte on the card).
    """

    product_id: int
    valid_from: int
    valid_until: int

    def __post_init__(self) -> None:
        _check_uint("PassProduct", "product_id", self.product_id, 8)
        _check_uint("PassProduct", "valid_from", self.valid_from, 32)
        _check_uint("PassProduct", "valid_until", self.valid_until, 32)
        if self.valid_until < self.valid_from:
            raise CodecError("PassProduct.valid_until is before valid_from")

    def is_valid_at(self, now: int) -> bool:
        """True while the pass is in its validity period."""
        return self.valid_from <= now < self.valid_until


@dataclass(frozen=True, slots=True)
class CardView:
    """What the validator read from a card, already authenticated and decoded.

    ``discount_valid_until`` is the end of the yearly re-validation ("vize") of a discounted or
    free card (None for a full card, or a card never validated); ``trips`` is newest first;
    ``day_spent`` is what the holder's own fares added up to on the local day of the newest
    *ride* in ``trips`` (top-ups and repairs leave it unchanged).
    """

    card_number: int
    card_type: CardType
    discount_valid_until: int | None
    card_expires: int
    blocked: bool
    balance: int
    pass_product: PassProduct | None
    trips: tuple[TripRecord, ...]
    day_spent: int

    def __post_init__(self) -> None:
        if not isinstance(self.card_type, CardType):
            raise CodecError(f"CardView.card_type must be a CardType, got {self.card_type!r}")
        if not isinstance(self.trips, tuple) or not all(
            isinstance(trip, TripRecord) for trip in self.trips
        ):
            raise CodecError("CardView.trips must be a tuple of TripRecord, newest first")
        for name in ("card_expires", "balance", "day_spent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CodecError(f"CardView.{name} must be an integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ValidatorContext:
    """Where the tap happens: which validator, on which vehicle, running which line.

    ``line_group`` is the tariff network the line belongs to (``networks.<id>``), configured
    on the validator with its line. ``vehicle_validator_ids`` lists the *other* validators on
    the same vehicle (front and middle doors): anti-passback treats a tap on any of them as a
    tap on this one, so a rider who taps at both doors is not charged twice.
    ``direction`` is recorded by the validator for the journal; the fare does not depend on it.
    """

    validator_id: int
    vehicle_id: int
    line_id: int
    line_group: str
    direction: int
    vehicle_validator_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        _check_uint("ValidatorContext", "validator_id", self.validator_id, 16)
        _check_uint("ValidatorContext", "vehicle_id", self.vehicle_id, 32)
        _check_uint("ValidatorContext", "line_id", self.line_id, 16)
        _check_uint("ValidatorContext", "direction", self.direction, 8)
        if not isinstance(self.line_group, str) or not self.line_group:
            raise CodecError("ValidatorContext.line_group must be a non-empty string")
        if not isinstance(self.vehicle_validator_ids, frozenset):
            raise CodecError("ValidatorContext.vehicle_validator_ids must be a frozenset")
        for other in self.vehicle_validator_ids:
            _check_uint("ValidatorContext", "vehicle_validator_ids[]", other, 16)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one tap, and exactly what the card application must write.

    On acceptance write ``trip`` to the trip log, take ``fare`` from the purse and store
    ``day_spent``. A rejection (``accepted`` False, including ``ALREADY_VALIDATED``) charges 0,
    has ``trip=None`` and must write nothing. ``notice`` is a second, informational message
    for the display (``DISCOUNT_EXPIRED``, ``PASS_EXPIRED``) on an accepted ride.
    """

    accepted: bool
    reason: Reason
    fare: int
    product: str
    transfer_step: int
    riders: int
    discount_applied: str
    trip: TripRecord | None
    day_spent: int
    notice: Reason | None = None


# --------------------------------------------------------------------------------------------
# The tariff
# --------------------------------------------------------------------------------------------


class DurationLimitType(StrEnum):
    """Where a transfer window is measured from.

    ``PREVIOUS_LEG`` is GTFS ``duration_limit_type = 1`` (from the boarding validation of the
    current leg to that of the next) — the only GTFS type a tap-on-only bus system can evaluate.
    ``JOURNEY_START`` (an extension) measures every transfer from the journey's first boarding,
    as Turkish cities usually publish their aktarma windows.
    """

    PREVIOUS_LEG = "previous_leg"
    JOURNEY_START = "journey_start"


@dataclass(frozen=True, slots=True)
class FareMedia:
    """GTFS ``fare_media``: what the fare is paid with (``fare_media_type`` 2 = transit card)."""

    fare_media_id: str
    name: str
    fare_media_type: int


@dataclass(frozen=True, slots=True)
class Network:
    """A line group (GTFS network). ``line_ids`` lets the engine tell which network an earlier
    leg in the trip log was on (the card records the line, not its network)."""

    network_id: str
    name: str
    line_ids: frozenset[int]


@dataclass(frozen=True, slots=True)
class RiderCategory:
    """GTFS ``rider_categories``: who pays which amount.

    ``free`` categories ride at no charge; ``revalidation`` categories need a current
    ``discount_valid_until`` on the card, and without one fall back to the default category.
    """

    category_id: str
    name: str
    card_types: frozenset[CardType]
    is_default: bool
    free: bool
    revalidation: bool


@dataclass(frozen=True, slots=True)
class FareProduct:
    """GTFS ``fare_products``: a priced product, amounts in kuruş per rider category.

    ``kind`` is ``leg`` (a boarding), ``transfer`` (one step of a transfer sequence) or ``pass``
    (abonman: ``product_code`` is the byte on the card, ``networks`` the line groups it covers).
    """

    product_id: str
    name: str
    kind: str
    fare_media_id: str
    amounts: Mapping[str, int]
    product_code: int | None = None
    networks: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class FareLegRule:
    """GTFS ``fare_leg_rules``: a boarding on ``network_id`` costs ``fare_product_id``.

    With ``rider_category_id`` the rule applies to that category only and wins over a rule
    without one.
    """

    network_id: str
    leg_group_id: str
    rider_category_id: str | None
    fare_product_id: str


@dataclass(frozen=True, slots=True)
class FareTransferRule:
    """GTFS ``fare_transfer_rules``: boarding another line within the window costs less.

    ``step_product_ids[k-1]`` prices the k-th transfer (the last one repeats); no products
    means free transfers. ``transfer_count`` is -1 for no limit. A boarding on one of
    ``free_lines`` within the window is free at any step. Transferring to the line of the
    previous leg is never a transfer.
    """

    name: str
    from_leg_group_id: str | None
    to_leg_group_id: str | None
    duration_limit: int
    duration_limit_type: DurationLimitType
    transfer_count: int
    step_product_ids: tuple[str, ...]
    free_lines: frozenset[int]


@dataclass(frozen=True, slots=True)
class AntiPassback:
    """Seconds during which a second tap at the same validator (or vehicle) is refused as
    "already validated", by the product the previous tap used: a stored-value double tap is an
    accident and needs a short lock; a pass or a free card handed back to a friend needs a long
    one."""

    stored_value_seconds: int
    pass_seconds: int
    free_seconds: int

    def seconds_for(self, product: TripProduct) -> int:
        """The lock-out after a ride paid with ``product``."""
        if product is TripProduct.PASS:
            return self.pass_seconds
        if product is TripProduct.FREE:
            return self.free_seconds
        return self.stored_value_seconds


@dataclass(frozen=True)
class FareTable:
    """A validated tariff. Build it with :meth:`from_toml` or :meth:`from_dict`, never directly.

    The public fields mirror the bundle; the private ones are lookup tables derived on load so
    that :func:`decide` does dictionary look-ups only.
    """

    version: int
    name: str
    timezone: str
    currency: str
    max_balance: int
    pass_validity_days: int
    max_riders: int
    fare_media: Mapping[str, FareMedia]
    networks: Mapping[str, Network]
    rider_categories: Mapping[str, RiderCategory]
    fare_products: Mapping[str, FareProduct]
    fare_leg_rules: tuple[FareLegRule, ...]
    fare_transfer_rules: tuple[FareTransferRule, ...]
    anti_passback: AntiPassback
    daily_cap: Mapping[str, int]
    _tz: ZoneInfo = field(repr=False, compare=False)
    _default: RiderCategory = field(repr=False, compare=False)
    _category_by_type: Mapping[CardType, RiderCategory] = field(repr=False, compare=False)
    _leg_fare: Mapping[tuple[str, str], int] = field(repr=False, compare=False)
    _leg_group: Mapping[str, str] = field(repr=False, compare=False)
    _network_of_line: Mapping[int, str] = field(repr=False, compare=False)
    _pass_by_code: Mapping[int, FareProduct] = field(repr=False, compare=False)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path_or_text: str | bytes | PathLike[str]) -> FareTable:
        """Load a tariff from a TOML file or TOML text.

        A :class:`os.PathLike` is a file; ``bytes`` are UTF-8 TOML text; a ``str`` is TOML text
        if it contains a newline or ``=``, otherwise a file path.
        """
        if isinstance(path_or_text, bytes):
            try:
                text = path_or_text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FareTableError(f"tariff is not UTF-8: {exc}") from None
        elif isinstance(path_or_text, str) and ("\n" in path_or_text or "=" in path_or_text):
            text = path_or_text
        else:
            path = Path(path_or_text)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise FareTableError(f"cannot read tariff {path}: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FareTableError(f"tariff is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FareTable:
        """Validate a parsed bundle and build the table; any problem → :class:`FareTableError`."""
        return _build_table(data)

    # -- look-ups ---------------------------------------------------------------------------

    @property
    def default_category(self) -> RiderCategory:
        """The full-fare category, which an expired discount falls back to."""
        return self._default

    def category_for(self, card_type: CardType) -> RiderCategory | None:
        """The rider category of a card type, or None when this tariff does not know it."""
        return self._category_by_type.get(card_type)

    def leg_fare(self, network_id: str, category_id: str) -> int | None:
        """Kuruş for one boarding on ``network_id`` in ``category_id``; None if not sold."""
        return self._leg_fare.get((network_id, category_id))

    def leg_group_of(self, network_id: str) -> str | None:
        """The leg group (for transfer rules) of a network, None for an unknown network."""
        return self._leg_group.get(network_id)

    def network_of_line(self, line_id: int) -> str | None:
        """The network a line belongs to, when the tariff lists its lines."""
        return self._network_of_line.get(line_id)

    def pass_product(self, product_code: int) -> FareProduct | None:
        """The pass product stored on cards as ``product_code``."""
        return self._pass_by_code.get(product_code)

    def local_date(self, unix_time: int) -> date:
        """The calendar day of ``unix_time`` in the tariff's time zone."""
        return datetime.fromtimestamp(unix_time, self._tz).date()

    def pass_for(self, product_code: int, loaded_at: int) -> PassProduct:
        """The pass a top-up terminal writes: valid ``pass_validity_days`` from the moment of
        loading (Konya: "dolum yaptırdığınız gün ve saat itibarı ile 30 gün")."""
        if self.pass_product(product_code) is None:
            raise FareTableError(f"no pass product with product_code {product_code}")
        until = loaded_at + self.pass_validity_days * _DAY
        return PassProduct(product_code, loaded_at, min(until, _U32))

    def top_up_room(self, balance: int) -> int:
        """The most a top-up terminal may add to ``balance`` without passing ``max_balance``."""
        return max(0, self.max_balance - balance)

    def transfer_rule_for(
        self, from_group: str | None, to_group: str | None
    ) -> FareTransferRule | None:
        """The most specific transfer rule between two leg groups (an empty side matches any;
        on a tie the rule naming the destination wins)."""
        best: FareTransferRule | None = None
        best_rank = -1
        for rule in self.fare_transfer_rules:
            if rule.from_leg_group_id is not None and rule.from_leg_group_id != from_group:
                continue
            if rule.to_leg_group_id is not None and rule.to_leg_group_id != to_group:
                continue
            rank = (2 if rule.to_leg_group_id is not None else 0) + (
                1 if rule.from_leg_group_id is not None else 0
            )
            if rank > best_rank:
                best, best_rank = rule, rank
        return best


# --------------------------------------------------------------------------------------------
# Validation of a bundle
# --------------------------------------------------------------------------------------------


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FareTableError(f"{where}: must be a table, got {type(value).__name__}")
    return value


def _keys(
    value: Mapping[str, Any], where: str, required: Iterable[str], optional: Iterable[str] = ()
) -> None:
    required = tuple(required)
    allowed = set(required) | set(optional)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise FareTableError(f"{where}: unknown key {unknown[0]!r} (allowed: {sorted(allowed)})")
    for key in required:
        if key not in value:
            raise FareTableError(f"{where}: missing required key {key!r}")


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a float" if isinstance(value, float) else type(value).__name__
        raise FareTableError(f"{where}: must be an integer, got {kind} {value!r}")
    if not lo <= value <= hi:
        raise FareTableError(f"{where}: must be in {lo}..{hi}, got {value}")
    return value


def _money(value: object, where: str, hi: int = _I32_MAX) -> int:
    if isinstance(value, float):
        raise FareTableError(f"{where}: money is an integer number of kuruş, got a float {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise FareTableError(f"{where}: must not be negative, got {value}")
    return _int(value, where, 0, hi)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FareTableError(f"{where}: must be a non-empty string")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise FareTableError(f"{where}: must be true or false")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise FareTableError(f"{where}: must be an array")
    return value


def _ref(value: object, where: str, known: Mapping[str, Any], what: str) -> str:
    ident = _str(value, where)
    if ident not in known:
        raise FareTableError(f"{where}: unknown {what} {ident!r}")
    return ident


_TOP_REQUIRED: Final = (
    "version",
    "name",
    "timezone",
    "max_balance",
    "pass_validity_days",
    "fare_media",
    "networks",
    "rider_categories",
    "fare_products",
    "fare_leg_rules",
    "anti_passback",
)
_TOP_OPTIONAL: Final = ("currency", "max_riders", "fare_transfer_rules", "daily_cap")
_PRODUCT_KINDS: Final = ("leg", "transfer", "pass")


def _build_table(data: Mapping[str, Any]) -> FareTable:
    data = _table(data, "tariff")
    _keys(data, "tariff", _TOP_REQUIRED, _TOP_OPTIONAL)
    version = _int(data["version"], "version", 1, _U32)
    name = _str(data["name"], "name")
    tz_name = _str(data["timezone"], "timezone")
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FareTableError(f"timezone: unknown time zone {tz_name!r} ({exc})") from None
    currency = _str(data.get("currency", "TRY"), "currency")
    if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
        raise FareTableError(f"currency: must be an ISO 4217 code like 'TRY', got {currency!r}")
    max_balance = _money(data["max_balance"], "max_balance")
    if max_balance == 0:
        raise FareTableError("max_balance: must be positive")
    pass_days = _int(data["pass_validity_days"], "pass_validity_days", 1, 366)
    max_riders = _int(data.get("max_riders", 1), "max_riders", 1, 16)

    media = _parse_media(_table(data["fare_media"], "fare_media"))
    networks, network_of_line = _parse_networks(_table(data["networks"], "networks"))
    categories, by_type = _parse_categories(_table(data["rider_categories"], "rider_categories"))
    products, pass_by_code = _parse_products(
        _table(data["fare_products"], "fare_products"), media, categories, networks
    )
    leg_rules, leg_fare, leg_group = _parse_leg_rules(
        _list(data["fare_leg_rules"], "fare_leg_rules"), networks, categories, products
    )
    transfer_rules = _parse_transfer_rules(
        _list(data.get("fare_transfer_rules", []), "fare_transfer_rules"),
        set(leg_group.values()),
        categories,
        products,
    )
    anti_passback = _parse_anti_passback(_table(data["anti_passback"], "anti_passback"))
    daily_cap = _parse_daily_cap(_table(data.get("daily_cap", {}), "daily_cap"), categories)

    # The trip record stores the fare of one tap in 16 bits: the dearest possible tap (the
    # dearest leg for the holder plus every extra rider at full fare) must fit.
    default_id = next(c.category_id for c in categories.values() if c.is_default)
    for network_id in networks:
        full = leg_fare.get((network_id, default_id))
        if full is not None and full * max_riders > _U16:
            raise FareTableError(
                f"fare_leg_rules: network {network_id!r}: {max_riders} riders at {full} kuruş "
                f"exceed the {_U16} kuruş a trip record can hold"
            )

    return FareTable(
        version=version,
        name=name,
        timezone=tz_name,
        currency=currency,
        max_balance=max_balance,
        pass_validity_days=pass_days,
        max_riders=max_riders,
        fare_media=MappingProxyType(media),
        networks=MappingProxyType(networks),
        rider_categories=MappingProxyType(categories),
        fare_products=MappingProxyType(products),
        fare_leg_rules=leg_rules,
        fare_transfer_rules=transfer_rules,
        anti_passback=anti_passback,
        daily_cap=MappingProxyType(daily_cap),
        _tz=tz,
        _default=categories[default_id],
        _category_by_type=MappingProxyType(by_type),
        _leg_fare=MappingProxyType(leg_fare),
        _leg_group=MappingProxyType(leg_group),
        _network_of_line=MappingProxyType(network_of_line),
        _pass_by_code=MappingProxyType(pass_by_code),
    )


def _parse_media(raw: Mapping[str, Any]) -> dict[str, FareMedia]:
    if not raw:
        raise FareTableError("fare_media: at least one fare medium is required")
    media = {}
    for media_id, entry in raw.items():
        where = f"fare_media.{media_id}"
        entry = _table(entry, where)
        _keys(entry, where, ("name", "fare_media_type"))
        media[media_id] = FareMedia(
            media_id,
            _str(entry["name"], f"{where}.name"),
            _int(entry["fare_media_type"], f"{where}.fare_media_type", 0, 4),
        )
    return media


def _parse_networks(raw: Mapping[str, Any]) -> tuple[dict[str, Network], dict[int, str]]:
    if not raw:
        raise FareTableError("networks: at least one network (line group) is required")
    networks: dict[str, Network] = {}
    network_of_line: dict[int, str] = {}
    for network_id, entry in raw.items():
        where = f"networks.{network_id}"
        entry = _table(entry, where)
        _keys(entry, where, ("name",), ("line_ids",))
        lines = set()
        for i, line in enumerate(_list(entry.get("line_ids", []), f"{where}.line_ids")):
            line_id = _int(line, f"{where}.line_ids[{i}]", 0, _U16)
            other = network_of_line.get(line_id)
            if other is not None:
                raise FareTableError(
                    f"{where}.line_ids: line {line_id} is already in network {other!r}"
                )
            network_of_line[line_id] = network_id
            lines.add(line_id)
        networks[network_id] = Network(
            network_id, _str(entry["name"], f"{where}.name"), frozenset(lines)
        )
    return networks, network_of_line


def _parse_categories(
    raw: Mapping[str, Any],
) -> tuple[dict[str, RiderCategory], dict[CardType, RiderCategory]]:
    categories: dict[str, RiderCategory] = {}
    by_type: dict[CardType, RiderCategory] = {}
    for category_id, entry in raw.items():
        where = f"rider_categories.{category_id}"
        entry = _table(entry, where)
        _keys(
            entry,
            where,
            ("name", "card_types"),
            ("is_default_fare_category", "free", "revalidation"),
        )
        is_default = _bool(
            entry.get("is_default_fare_category", False), f"{where}.is_default_fare_category"
        )
        free = _bool(entry.get("free", False), f"{where}.free")
        revalidation = _bool(entry.get("revalidation", not is_default), f"{where}.revalidation")
        if is_default and free:
            raise FareTableError(f"{where}: the default fare category cannot be free")
        if is_default and revalidation:
            raise FareTableError(
                f"{where}: the default fare category cannot require revalidation "
                "(it is what an expired discount falls back to)"
            )
        types = set()
        for i, value in enumerate(_list(entry["card_types"], f"{where}.card_types")):
            try:
                card_type = CardType(value)
            except ValueError:
                raise FareTableError(
                    f"{where}.card_types[{i}]: unknown card type {value!r} "
                    f"(known: {[t.value for t in CardType]})"
                ) from None
            if card_type in by_type:
                raise FareTableError(
                    f"{where}.card_types: {card_type.value!r} is already in "
                    f"rider category {by_type[card_type].category_id!r}"
                )
            types.add(card_type)
        if not types:
            raise FareTableError(f"{where}.card_types: must list at least one card type")
        category = RiderCategory(
            category_id,
            _str(entry["name"], f"{where}.name"),
            frozenset(types),
            is_default,
            free,
            revalidation,
        )
        categories[category_id] = category
        for card_type in types:
            by_type[card_type] = category
    defaults = [c.category_id for c in categories.values() if c.is_default]
    if len(defaults) != 1:
        raise FareTableError(
            "rider_categories: exactly one category must have is_default_fare_category = true, "
            f"found {defaults}"
        )
    return categories, by_type


def _parse_products(
    raw: Mapping[str, Any],
    media: Mapping[str, FareMedia],
    categories: Mapping[str, RiderCategory],
    networks: Mapping[str, Network],
) -> tuple[dict[str, FareProduct], dict[int, FareProduct]]:
    products: dict[str, FareProduct] = {}
    pass_by_code: dict[int, FareProduct] = {}
    for product_id, entry in raw.items():
        where = f"fare_products.{product_id}"
        entry = _table(entry, where)
        kind = entry.get("kind")
        if kind not in _PRODUCT_KINDS:
            raise FareTableError(
                f"{where}.kind: must be one of {list(_PRODUCT_KINDS)}, got {kind!r}"
            )
        if kind == "pass":
            _keys(
                entry,
                where,
                ("name", "kind", "fare_media_id", "amounts", "product_code", "networks"),
            )
        else:
            _keys(entry, where, ("name", "kind", "fare_media_id", "amounts"))
        amounts = {}
        for category_id, amount in _table(entry["amounts"], f"{where}.amounts").items():
            if category_id not in categories:
                raise FareTableError(f"{where}.amounts: unknown rider category {category_id!r}")
            amounts[category_id] = _money(amount, f"{where}.amounts.{category_id}")
        code = None
        covered: frozenset[str] = frozenset()
        if kind == "pass":
            code = _int(entry["product_code"], f"{where}.product_code", 1, _U8)
            if code in pass_by_code:
                raise FareTableError(
                    f"{where}.product_code: {code} is already used by "
                    f"{pass_by_code[code].product_id!r}"
                )
            covered = frozenset(
                _ref(n, f"{where}.networks[{i}]", networks, "network")
                for i, n in enumerate(_list(entry["networks"], f"{where}.networks"))
            )
            if not covered:
                raise FareTableError(f"{where}.networks: a pass must cover at least one network")
        product = FareProduct(
            product_id,
            _str(entry["name"], f"{where}.name"),
            kind,
            _ref(entry["fare_media_id"], f"{where}.fare_media_id", media, "fare medium"),
            MappingProxyType(amounts),
            code,
            covered,
        )
        products[product_id] = product
        if code is not None:
            pass_by_code[code] = product
    return products, pass_by_code


def _parse_leg_rules(
    raw: list[Any],
    networks: Mapping[str, Network],
    categories: Mapping[str, RiderCategory],
    products: Mapping[str, FareProduct],
) -> tuple[tuple[FareLegRule, ...], dict[tuple[str, str], int], dict[str, str]]:
    rules: list[FareLegRule] = []
    seen: dict[tuple[str, str | None], int] = {}
    leg_group: dict[str, str] = {}
    for i, entry in enumerate(raw):
        where = f"fare_leg_rules[{i}]"
        entry = _table(entry, where)
        _keys(
            entry, where, ("network_id", "fare_product_id"), ("leg_group_id", "rider_category_id")
        )
        network_id = _ref(entry["network_id"], f"{where}.network_id", networks, "network")
        product_id = _ref(
            entry["fare_product_id"], f"{where}.fare_product_id", products, "fare product"
        )
        if products[product_id].kind != "leg":
            raise FareTableError(
                f"{where}.fare_product_id: {product_id!r} is a {products[product_id].kind} "
                "product, a leg rule needs a leg product"
            )
        category_id = entry.get("rider_category_id")
        if category_id is not None:
            category_id = _ref(
                category_id, f"{where}.rider_category_id", categories, "rider category"
            )
        group = _str(entry.get("leg_group_id", network_id), f"{where}.leg_group_id")
        if leg_group.setdefault(network_id, group) != group:
            raise FareTableError(
                f"{where}.leg_group_id: network {network_id!r} is already in leg group "
                f"{leg_group[network_id]!r}; one network belongs to one leg group"
            )
        key = (network_id, category_id)
        if key in seen:
            who = f"rider category {category_id!r}" if category_id else "all rider categories"
            raise FareTableError(
                f"{where}: overlaps fare_leg_rules[{seen[key]}] (network {network_id!r}, {who})"
            )
        seen[key] = i
        rules.append(FareLegRule(network_id, group, category_id, product_id))

    for network_id in networks:
        if network_id not in leg_group:
            raise FareTableError(
                f"networks.{network_id}: no fare_leg_rules entry for network {network_id!r}"
            )

    # Resolve (network, category) → amount, and insist every non-free category can pay.
    leg_fare: dict[tuple[str, str], int] = {}
    default_id = next(c.category_id for c in categories.values() if c.is_default)
    for network_id in leg_group:
        for category in categories.values():
            rule_index = seen.get((network_id, category.category_id), seen.get((network_id, None)))
            if rule_index is None:
                if category.free:
                    continue
                raise FareTableError(
                    f"fare_leg_rules: no fare for rider category {category.category_id!r} "
                    f"on network {network_id!r}"
                )
            product = products[rules[rule_index].fare_product_id]
            amount = product.amounts.get(category.category_id)
            if amount is None:
                if category.free:
                    continue
                raise FareTableError(
                    f"fare_products.{product.product_id}.amounts: missing fare for rider "
                    f"category {category.category_id!r} (used on network {network_id!r})"
                )
            leg_fare[(network_id, category.category_id)] = amount
        full = leg_fare[(network_id, default_id)]
        for (net, category_id), amount in leg_fare.items():
            if net == network_id and amount > full:
                raise FareTableError(
                    f"fare_leg_rules: on network {network_id!r} rider category "
                    f"{category_id!r} pays {amount}, more than the full fare {full}"
                )
    return tuple(rules), leg_fare, leg_group


def _parse_transfer_rules(
    raw: list[Any],
    leg_groups: set[str],
    categories: Mapping[str, RiderCategory],
    products: Mapping[str, FareProduct],
) -> tuple[FareTransferRule, ...]:
    rules: list[FareTransferRule] = []
    seen: dict[tuple[str | None, str | None], int] = {}
    payers = [c.category_id for c in categories.values() if not c.free]
    for i, entry in enumerate(raw):
        where = f"fare_transfer_rules[{i}]"
        entry = _table(entry, where)
        _keys(
            entry,
            where,
            ("duration_limit", "duration_limit_type"),
            (
                "name",
                "from_leg_group_id",
                "to_leg_group_id",
                "transfer_count",
                "fare_product_id",
                "fare_product_ids",
                "free_lines",
                "fare_transfer_type",
            ),
        )
        groups: list[str | None] = []
        for side in ("from_leg_group_id", "to_leg_group_id"):
            value = entry.get(side)
            if value is not None:
                value = _str(value, f"{where}.{side}")
                if value not in leg_groups:
                    raise FareTableError(f"{where}.{side}: unknown leg group {value!r}")
            groups.append(value)
        key = (groups[0], groups[1])
        if key in seen:
            raise FareTableError(
                f"{where}: overlaps fare_transfer_rules[{seen[key]}] "
                f"(from {groups[0] or 'any'} to {groups[1] or 'any'})"
            )
        seen[key] = i
        duration = _int(entry["duration_limit"], f"{where}.duration_limit", 1, 86_400)
        limit_type = entry["duration_limit_type"]
        if limit_type == 1 and not isinstance(limit_type, bool):
            limit_type = DurationLimitType.PREVIOUS_LEG.value
        if (
            not isinstance(limit_type, str)
            or limit_type not in DurationLimitType._value2member_map_
        ):
            raise FareTableError(
                f"{where}.duration_limit_type: must be 'previous_leg' (GTFS 1) or "
                f"'journey_start', got {limit_type!r} (validators only see boardings, so GTFS "
                "types 0, 2 and 3 cannot be evaluated)"
            )
        transfer_type = entry.get("fare_transfer_type", 0)
        if transfer_type != 0 or isinstance(transfer_type, bool):
            raise FareTableError(
                f"{where}.fare_transfer_type: only 0 (A + AB: the transfer leg costs the "
                f"transfer product) is supported, got {transfer_type!r}"
            )
        count = _int(entry.get("transfer_count", 1), f"{where}.transfer_count", -1, _U8)
        if count == 0:
            raise FareTableError(f"{where}.transfer_count: must be -1 (no limit) or 1..255")
        if "fare_product_id" in entry and "fare_product_ids" in entry:
            raise FareTableError(
                f"{where}: give fare_product_id (one price) or fare_product_ids (steps), not both"
            )
        if "fare_product_ids" in entry:
            step_ids = _list(entry["fare_product_ids"], f"{where}.fare_product_ids")
            if not step_ids:
                raise FareTableError(f"{where}.fare_product_ids: must not be empty")
        elif "fare_product_id" in entry:
            step_ids = [entry["fare_product_id"]]
        else:
            step_ids = []
        steps = []
        for k, step_id in enumerate(step_ids):
            at = f"{where}.fare_product_ids[{k}]"
            step_id = _ref(step_id, at, products, "fare product")
            product = products[step_id]
            if product.kind != "transfer":
                raise FareTableError(f"{at}: {step_id!r} is a {product.kind} product, not transfer")
            for category_id in payers:
                if category_id not in product.amounts:
                    raise FareTableError(
                        f"fare_products.{step_id}.amounts: missing fare for rider category "
                        f"{category_id!r} (transfer step {k + 1} of {where})"
                    )
            steps.append(step_id)
        if count != -1 and len(steps) > count:
            raise FareTableError(f"{where}: {len(steps)} step prices but transfer_count is {count}")
        free_lines = frozenset(
            _int(line, f"{where}.free_lines[{j}]", 0, _U16)
            for j, line in enumerate(_list(entry.get("free_lines", []), f"{where}.free_lines"))
        )
        rules.append(
            FareTransferRule(
                _str(entry.get("name", where), f"{where}.name"),
                groups[0],
                groups[1],
                duration,
                DurationLimitType(limit_type),
                count,
                tuple(steps),
                free_lines,
            )
        )
    return tuple(rules)


def _parse_anti_passback(raw: Mapping[str, Any]) -> AntiPassback:
    _keys(raw, "anti_passback", ("stored_value_seconds", "pass_seconds"), ("free_seconds",))
    stored = _int(raw["stored_value_seconds"], "anti_passback.stored_value_seconds", 1, _DAY)
    passes = _int(raw["pass_seconds"], "anti_passback.pass_seconds", 1, _DAY)
    free = _int(raw.get("free_seconds", passes), "anti_passback.free_seconds", 1, _DAY)
    return AntiPassback(stored, passes, free)


def _parse_daily_cap(
    raw: Mapping[str, Any], categories: Mapping[str, RiderCategory]
) -> dict[str, int]:
    caps = {}
    for category_id, cap in raw.items():
        where = f"daily_cap.{category_id}"
        if category_id not in categories:
            raise FareTableError(f"{where}: unknown rider category {category_id!r}")
        if categories[category_id].free:
            raise FareTableError(f"{where}: rider category {category_id!r} is free, a cap is moot")
        caps[category_id] = _money(cap, where, _U16)
        if caps[category_id] == 0:
            raise FareTableError(f"{where}: must be positive (leave the category out for no cap)")
    return caps


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def _rides(card: CardView, now: int) -> list[TripRecord]:
    """The card's rides, newest first, without top-ups, repairs and untrustworthy stamps."""
    return [trip for trip in card.trips if trip.is_ride and trip.time - now <= CLOCK_SKEW_TOLERANCE]


def _journey_start(rides: list[TripRecord]) -> int:
    """When the journey of the newest ride began.

    Follows the steps k, k-1, … 0 back through the log. The log holds only a few entries, so
    the first boarding of a long journey may have scrolled off; then the oldest leg still
    visible stands in for it, which errs in the rider's favour by at most the legs lost.
    """
    start = rides[0].time
    expected = rides[0].transfer_step
    for ride in rides[1:]:
        if expected == 0 or ride.transfer_step != expected - 1 or ride.time > start:
            break
        start, expected = ride.time, expected - 1
    return start


def _transfer(
    rides: list[TripRecord], table: FareTable, now: int, ctx: ValidatorContext
) -> tuple[int, FareTransferRule | None]:
    """The transfer step this boarding is (0 = starts a journey) and the rule that priced it."""
    if not rides:
        return 0, None
    prev = rides[0]
    if prev.line_id == ctx.line_id:  # riding the same line again is never a transfer
        return 0, None
    prev_network = table.network_of_line(prev.line_id)
    prev_group = table.leg_group_of(prev_network) if prev_network is not None else None
    rule = table.transfer_rule_for(prev_group, table.leg_group_of(ctx.line_group))
    if rule is None:
        return 0, None
    if rule.duration_limit_type is DurationLimitType.PREVIOUS_LEG:
        since = prev.time
    else:
        since = _journey_start(rides)
    if now - since > rule.duration_limit:
        return 0, None
    step = prev.transfer_step + 1
    if rule.transfer_count != -1 and step > rule.transfer_count:
        return 0, None
    return min(step, _U8), rule


def _step_price(
    rule: FareTransferRule, step: int, table: FareTable, category: str, line_id: int
) -> int:
    if line_id in rule.free_lines or not rule.step_product_ids:
        return 0
    product_id = rule.step_product_ids[min(step, len(rule.step_product_ids)) - 1]
    return table.fare_products[product_id].amounts[category]


def _reject(
    reason: Reason,
    card: CardView,
    riders: int,
    category: str = "",
    notice: Reason | None = None,
) -> Decision:
    return Decision(
        accepted=False,
        reason=reason,
        fare=0,
        product=PRODUCT_NONE,
        transfer_step=0,
        riders=riders,
        discount_applied=category,
        trip=None,
        day_spent=card.day_spent,
        notice=notice,
    )


def decide(
    card: CardView,
    table: FareTable,
    now: int,
    ctx: ValidatorContext,
    riders: int = 1,
    *,
    blacklisted: bool = False,
) -> Decision:
    """Decide one tap. Pure: the same arguments always give the same decision.

    The rules, in order (``docs/fares.md`` has the long version):

    1. blacklisted → ``BLACKLISTED``; blocked → ``CARD_BLOCKED``; ``now >= card_expires`` →
       ``CARD_EXPIRED``; card type not in the tariff → ``UNKNOWN_CARD_TYPE``.
    2. Anti-passback: the newest ride was at this validator (or another one on this vehicle)
       less than the lock-out for the product it used ago → ``ALREADY_VALIDATED``, nothing
       charged or written.
    3. ``riders`` outside 1..``max_riders`` → ``RIDERS_NOT_ALLOWED``.
    4. Rider category: a discount not re-validated (``discount_valid_until`` passed or absent)
       falls back to the default (full) category, with notice ``DISCOUNT_EXPIRED``.
    5. Product, in priority order: a valid pass covering this line group (``OK_PASS``), then a
       free category (``OK_FREE``), then the purse. Pass and free cannot pay for extra riders
       (``RIDERS_NOT_ALLOWED``).
    6. Purse: the leg fare of the category on this line group (``LINE_NOT_IN_TARIFF`` if none);
       a transfer step k within the window prices the holder at min(step k price, leg fare)
       (``OK_TRANSFER``); the daily cap then limits the holder's fare to ``cap − day_spent``
       (``OK_DAILY_CAP``); each extra rider pays the full leg fare, no transfer price, no cap.
       Balance short → ``INSUFFICIENT_BALANCE`` (``PASS_EXPIRED`` if an expired pass is why).
    """
    _check_uint("decide", "now", now, 32)
    if blacklisted:
        return _reject(Reason.BLACKLISTED, card, riders)
    if card.blocked:
        return _reject(Reason.CARD_BLOCKED, card, riders)
    if now >= card.card_expires:
        return _reject(Reason.CARD_EXPIRED, card, riders)
    holder = table.category_for(card.card_type)
    if holder is None:
        return _reject(Reason.UNKNOWN_CARD_TYPE, card, riders)

    rides = _rides(card, now)
    prev = rides[0] if rides else None
    if (
        prev is not None
        and (
            prev.validator_id == ctx.validator_id or prev.validator_id in ctx.vehicle_validator_ids
        )
        and max(0, now - prev.time) < table.anti_passback.seconds_for(prev.product)
    ):
        return _reject(Reason.ALREADY_VALIDATED, card, riders, holder.category_id)

    if isinstance(riders, bool) or not isinstance(riders, int):
        raise CodecError(f"decide: riders must be an integer, got {riders!r}")
    if not 1 <= riders <= table.max_riders:
        return _reject(Reason.RIDERS_NOT_ALLOWED, card, riders, holder.category_id)

    category, notice = holder, None
    if holder.revalidation and (
        card.discount_valid_until is None or now >= card.discount_valid_until
    ):
        category, notice = table._default, Reason.DISCOUNT_EXPIRED

    pass_product = card.pass_product
    pass_covers = False
    pass_expired = False
    if pass_product is not None:
        priced = table.pass_product(pass_product.product_id)
        if priced is not None and ctx.line_group in priced.networks:
            pass_covers = pass_product.is_valid_at(now)
            pass_expired = now >= pass_product.valid_until

    step, rule = _transfer(rides, table, now, ctx)
    same_day = prev is not None and table.local_date(prev.time) == table.local_date(now)
    spent_before = card.day_spent if same_day else 0

    if pass_covers or category.free:
        if riders > 1:
            return _reject(Reason.RIDERS_NOT_ALLOWED, card, riders, category.category_id)
        product = TripProduct.PASS if pass_covers else TripProduct.FREE
        reason = Reason.OK_PASS if pass_covers else Reason.OK_FREE
        holder_fare = total = 0
    else:
        product = TripProduct.PURSE
        leg = table.leg_fare(ctx.line_group, category.category_id)
        full_leg = table.leg_fare(ctx.line_group, table._default.category_id)
        if leg is None or full_leg is None:
            return _reject(Reason.LINE_NOT_IN_TARIFF, card, riders, category.category_id)
        holder_fare, reason = leg, Reason.OK
        if rule is not None:
            price = _step_price(rule, step, table, category.category_id, ctx.line_id)
            holder_fare, reason = min(leg, price), Reason.OK_TRANSFER
        cap = table.daily_cap.get(category.category_id)
        if cap is not None:
            capped = max(0, min(holder_fare, cap - spent_before))
            if capped < holder_fare:
                holder_fare, reason = capped, Reason.OK_DAILY_CAP
        total = holder_fare + (riders - 1) * full_leg
        if total > card.balance:
            if pass_expired:
                return _reject(Reason.PASS_EXPIRED, card, riders, category.category_id, notice)
            return _reject(Reason.INSUFFICIENT_BALANCE, card, riders, category.category_id, notice)
        if pass_expired and notice is None:
            notice = Reason.PASS_EXPIRED

    counter = (card.trips[0].counter + 1) & _U32 if card.trips else 1
    trip = TripRecord.make(
        counter=counter,
        time=now,
        line_id=ctx.line_id,
        validator_id=ctx.validator_id,
        fare=total,
        transfer_step=step,
        product=product,
        riders=riders,
    )
    return Decision(
        accepted=True,
        reason=reason,
        fare=total,
        product={
            TripProduct.PURSE: PRODUCT_PURSE,
            TripProduct.PASS: PRODUCT_PASS,
            TripProduct.FREE: PRODUCT_FREE,
        }[product],
        transfer_step=step,
        riders=riders,
        discount_applied=category.category_id,
        trip=trip,
        # u16 on the card; only a daily cap reads it and caps are at most 0xFFFF.
        day_spent=min(spent_before + holder_fare, _U16),
        notice=notice,
    )
