"""The fare engine: every rule and their combinations, tariff validation, the trip record codec,
and the properties the design promises (balance never negative, never charged twice).

Two tariffs are used: the shipped Konya 2025 one, and a synthetic "test city" modelled on
İstanbul's published five-step aktarma prices, with two more networks, passes, a daily cap and
free lines, so that every rule has something to bite on.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.core import tariffs
from firmware.core.errors import CodecError, CoreError
from firmware.core.fares import (
    CLOCK_SKEW_TOLERANCE,
    CardType,
    CardView,
    Decision,
    DurationLimitType,
    FareTable,
    FareTableError,
    PassProduct,
    Reason,
    TripProduct,
    TripRecord,
    ValidatorContext,
    decide,
)

# 2025-09-15 09:00 in Konya (UTC+3), a Monday morning.
NOW = int(datetime(2025, 9, 15, 6, 0, tzinfo=UTC).timestamp())
DAY = 86_400
FAR = NOW + 365 * DAY
MIN = 60

P, PASS, FREE = TripProduct.PURSE, TripProduct.PASS, TripProduct.FREE


def city_dict() -> dict:
    """A fresh copy of the synthetic test-city tariff (mutated by the validation tests)."""
    return {
        "version": 7,
        "name": "Test city",
        "timezone": "Europe/Istanbul",
        "max_balance": 200_000,
        "pass_validity_days": 30,
        "max_riders": 4,
        "fare_media": {"card": {"name": "Kent kart", "fare_media_type": 2}},
        "networks": {
            "city": {"name": "City buses", "line_ids": [1, 2, 3, 4, 5, 6, 7, 8]},
            "express": {"name": "Express", "line_ids": [90, 91]},
            "shuttle": {"name": "Shuttle", "line_ids": [50]},
        },
        "rider_categories": {
            "full": {"name": "Tam", "card_types": ["full"], "is_default_fare_category": True},
            "student": {"name": "Öğrenci", "card_types": ["student"]},
            "social": {"name": "Sosyal", "card_types": ["teacher"]},
            "free": {
                "name": "Ücretsiz",
                "card_types": ["65+", "disabled", "disabled_companion", "free_other"],
                "free": True,
            },
            "staff": {
                "name": "Personel",
                "card_types": ["personnel"],
                "free": True,
                "revalidation": False,
            },
        },
        "fare_products": {
            "city_leg": {
                "name": "City",
                "kind": "leg",
                "fare_media_id": "card",
                "amounts": {"full": 3500, "student": 1708, "social": 2506},
            },
            "express_leg": {
                "name": "Express",
                "kind": "leg",
                "fare_media_id": "card",
                "amounts": {"full": 5196, "student": 1708, "social": 2849},
            },
            "shuttle_leg": {
                "name": "Shuttle",
                "kind": "leg",
                "fare_media_id": "card",
                "amounts": {"full": 1000, "student": 500, "social": 800},
            },
            "t1": {
                "name": "1. aktarma",
                "kind": "transfer",
                "fare_media_id": "card",
                "amounts": {"full": 2606, "student": 849, "social": 1603},
            },
            "t2": {
                "name": "2. aktarma",
                "kind": "transfer",
                "fare_media_id": "card",
                "amounts": {"full": 2002, "student": 804, "social": 1250},
            },
            "t3": {
                "name": "3.-5. aktarma",
                "kind": "transfer",
                "fare_media_id": "card",
                "amounts": {"full": 1302, "student": 702, "social": 849},
            },
            "express_transfer": {
                "name": "Express transfer",
                "kind": "transfer",
                "fare_media_id": "card",
                "amounts": {"full": 1000, "student": 500, "social": 700},
            },
            "monthly": {
                "name": "Mavi kart",
                "kind": "pass",
                "fare_media_id": "card",
                "product_code": 7,
                "networks": ["city"],
                "amounts": {"full": 274_800, "student": 49_400, "social": 170_900},
            },
            "monthly_all": {
                "name": "Mavi kart + express",
                "kind": "pass",
                "fare_media_id": "card",
                "product_code": 8,
                "networks": ["city", "express"],
                "amounts": {"full": 300_000},
            },
        },
        "fare_leg_rules": [
            {"network_id": "city", "fare_product_id": "city_leg"},
            {"network_id": "express", "fare_product_id": "express_leg"},
            {"network_id": "shuttle", "fare_product_id": "shuttle_leg"},
        ],
        "fare_transfer_rules": [
            {
                "name": "aktarma",
                "from_leg_group_id": "city",
                "to_leg_group_id": "city",
                "duration_limit": 7200,
                "duration_limit_type": "journey_start",
                "transfer_count": 5,
                "fare_product_ids": ["t1", "t2", "t3"],
                "free_lines": [8],
            },
            {
                "name": "to express",
                "to_leg_group_id": "express",
                "duration_limit": 1800,
                "duration_limit_type": 1,
                "transfer_count": -1,
                "fare_product_id": "express_transfer",
            },
            {
                "name": "to shuttle",
                "to_leg_group_id": "shuttle",
                "duration_limit": 1800,
                "duration_limit_type": "previous_leg",
                "fare_product_id": "t1",
            },
        ],
        "anti_passback": {"stored_value_seconds": 60, "pass_seconds": 1800, "free_seconds": 900},
        "daily_cap": {"full": 10_000, "student": 3_000},
    }


KONYA = tariffs.load("konya-2025")
CITY = FareTable.from_dict(city_dict())
TABLES = {"konya": KONYA, "city": CITY}


def ride(
    ago: int,
    *,
    line: int = 1,
    validator: int = 100,
    step: int = 0,
    product: TripProduct = P,
    fare: int = 0,
    riders: int = 1,
) -> TripRecord:
    """A trip-log entry ``ago`` seconds before NOW (the card helper numbers the counters)."""
    return TripRecord.make(
        counter=0,
        time=NOW - ago,
        line_id=line,
        validator_id=validator,
        fare=fare,
        transfer_step=step,
        product=product,
        riders=riders,
    )


def card(
    card_type: CardType = CardType.FULL,
    *,
    balance: int = 10_000,
    trips: tuple[TripRecord, ...] = (),
    discount: int | None = FAR,
    expires: int = FAR,
    blocked: bool = False,
    pass_: PassProduct | None = None,
    day_spent: int = 0,
) -> CardView:
    numbered = tuple(replace(t, counter=50 - i) for i, t in enumerate(trips))
    return CardView(
        card_number=1234567,
        card_type=card_type,
        discount_valid_until=None if card_type is CardType.FULL else discount,
        card_expires=expires,
        blocked=blocked,
        balance=balance,
        pass_product=pass_,
        trips=numbered,
        day_spent=day_spent,
    )


def ctx(
    line: int = 2,
    *,
    validator: int = 200,
    group: str | None = None,
    siblings: frozenset[int] = frozenset(),
) -> ValidatorContext:
    if group is None:
        group = {50: "shuttle", 90: "express", 91: "express"}.get(line, "city")
    return ValidatorContext(
        validator_id=validator,
        vehicle_id=4242,
        line_id=line,
        line_group=group,
        direction=0,
        vehicle_validator_ids=siblings,
    )


def konya_ctx(line: int = 2, **kw) -> ValidatorContext:
    return ctx(line, group="merkez", **kw)


PASS_OK = PassProduct(1, NOW - 5 * DAY, NOW + 25 * DAY)
PASS_OLD = PassProduct(1, NOW - 31 * DAY, NOW - DAY)
PASS_SOON = PassProduct(1, NOW + DAY, NOW + 31 * DAY)


def check(d: Decision, c: CardView, at: int, x: ValidatorContext, riders: int) -> None:
    """What every decision must satisfy, whatever the case."""
    if d.accepted:
        assert d.reason.accepted and d.reason is not Reason.DISCOUNT_EXPIRED
        assert d.trip is not None
        assert d.trip.fare == d.fare and d.trip.time == at
        assert d.trip.line_id == x.line_id and d.trip.validator_id == x.validator_id
        assert d.trip.transfer_step == d.transfer_step and d.trip.riders == riders
        assert d.trip.product.name.lower() == d.product
        assert d.trip.counter == ((c.trips[0].counter + 1) & 0xFFFF_FFFF if c.trips else 1)
        assert d.fare <= max(c.balance, 0)
        assert TripRecord.from_bytes(d.trip.to_bytes()) == d.trip
    else:
        assert not d.reason.accepted
        assert (d.fare, d.trip, d.product, d.day_spent) == (0, None, "none", c.day_spent)


def case(case_id: str, table: str, c: CardView, x: ValidatorContext, expect: dict, **kw):
    return pytest.param(
        table,
        c,
        x,
        kw.get("riders", 1),
        kw.get("blacklisted", False),
        kw.get("at", NOW),
        expect,
        id=case_id,
    )


R = Reason
K = konya_ctx
# fmt: off
RULES = [
    # -- card status, card types ---------------------------------------------------------
    case("full", "konya", card(), K(), {"reason": R.OK, "fare": 2250, "product": "purse",
         "discount_applied": "full", "transfer_step": 0, "day_spent": 2250}),
    case("student", "konya", card(CardType.STUDENT), K(),
         {"reason": R.OK, "fare": 900, "discount_applied": "student"}),
    case("teacher", "konya", card(CardType.TEACHER), K(),
         {"reason": R.OK, "fare": 900, "discount_applied": "teacher"}),
    *[
        case(f"free-{t.value}", "konya", card(t, balance=0), K(),
             {"reason": R.OK_FREE, "fare": 0, "product": "free", "notice": None})
        for t in (CardType.SENIOR_65, CardType.DISABLED, CardType.DISABLED_COMPANION,
                  CardType.PERSONNEL, CardType.FREE_OTHER)
    ],
    case("student-discount-expired-pays-full", "konya",
         card(CardType.STUDENT, discount=NOW - 1), K(),
         {"reason": R.OK, "fare": 2250, "discount_applied": "full",
          "notice": R.DISCOUNT_EXPIRED}),
    case("student-discount-ends-now-pays-full", "konya",
         card(CardType.STUDENT, discount=NOW), K(),
         {"reason": R.OK, "fare": 2250, "notice": R.DISCOUNT_EXPIRED}),
    case("student-never-validated-pays-full", "konya", card(CardType.STUDENT, discount=None),
         K(), {"reason": R.OK, "fare": 2250, "discount_applied": "full"}),
    case("senior-discount-expired-pays-full", "konya",
         card(CardType.SENIOR_65, discount=NOW - DAY), K(),
         {"reason": R.OK, "fare": 2250, "product": "purse", "notice": R.DISCOUNT_EXPIRED}),
    case("senior-discount-expired-no-money", "konya",
         card(CardType.SENIOR_65, discount=NOW - DAY, balance=0), K(),
         {"reason": R.INSUFFICIENT_BALANCE, "notice": R.DISCOUNT_EXPIRED}),
    case("staff-without-revalidation-stays-free", "city",
         card(CardType.PERSONNEL, discount=None), ctx(),
         {"reason": R.OK_FREE, "notice": None}),
    case("card-expired", "konya", card(expires=NOW - 1), K(), {"reason": R.CARD_EXPIRED}),
    case("card-expires-now", "konya", card(expires=NOW), K(), {"reason": R.CARD_EXPIRED}),
    case("blocked", "konya", card(blocked=True), K(), {"reason": R.CARD_BLOCKED}),
    case("blacklisted", "konya", card(), K(), {"reason": R.BLACKLISTED}, blacklisted=True),
    case("blacklisted-beats-blocked-and-expired", "konya",
         card(blocked=True, expires=NOW - 1), K(), {"reason": R.BLACKLISTED},
         blacklisted=True),
    case("blocked-beats-expired", "konya", card(blocked=True, expires=NOW - 1), K(),
         {"reason": R.CARD_BLOCKED}),
    case("blocked-free-card", "konya", card(CardType.SENIOR_65, blocked=True), K(),
         {"reason": R.CARD_BLOCKED}),
    case("balance-one-short", "konya", card(balance=2249), K(),
         {"reason": R.INSUFFICIENT_BALANCE}),
    case("balance-exact", "konya", card(balance=2250), K(), {"reason": R.OK, "fare": 2250}),
    case("negative-balance-rejected", "konya", card(balance=-100), K(),
         {"reason": R.INSUFFICIENT_BALANCE}),
    case("line-not-in-tariff", "city", card(), ctx(3, group="nowhere"),
         {"reason": R.LINE_NOT_IN_TARIFF}),
    case("line-not-in-tariff-free-card-rides", "city", card(CardType.SENIOR_65),
         ctx(3, group="nowhere"), {"reason": R.OK_FREE}),
    # -- passes: used first -------------------------------------------------------------------
    case("pass", "konya", card(pass_=PASS_OK), K(),
         {"reason": R.OK_PASS, "fare": 0, "product": "pass", "day_spent": 0}),
    case("pass-no-balance", "konya", card(pass_=PASS_OK, balance=0), K(),
         {"reason": R.OK_PASS}),
    case("pass-starts-now", "konya", card(pass_=PassProduct(1, NOW, NOW + 30 * DAY)), K(),
         {"reason": R.OK_PASS}),
    case("pass-ends-now-purse-pays", "konya", card(pass_=PassProduct(1, NOW - 30 * DAY, NOW)),
         K(), {"reason": R.OK, "fare": 2250, "notice": R.PASS_EXPIRED}),
    case("pass-expired-purse-pays", "konya", card(pass_=PASS_OLD), K(),
         {"reason": R.OK, "fare": 2250, "product": "purse", "notice": R.PASS_EXPIRED}),
    case("pass-expired-no-money", "konya", card(pass_=PASS_OLD, balance=100), K(),
         {"reason": R.PASS_EXPIRED}),
    case("pass-not-yet-valid", "konya", card(pass_=PASS_SOON), K(),
         {"reason": R.OK, "fare": 2250, "notice": None}),
    case("pass-unknown-product", "konya", card(pass_=PassProduct(99, NOW - DAY, FAR)), K(),
         {"reason": R.OK, "fare": 2250}),
    case("pass-not-covering-network", "city", card(pass_=PassProduct(7, NOW - DAY, FAR)),
         ctx(90), {"reason": R.OK, "fare": 5196}),
    case("pass-covering-network", "city", card(pass_=PassProduct(8, NOW - DAY, FAR)),
         ctx(90), {"reason": R.OK_PASS}),
    case("pass-before-free", "konya", card(CardType.SENIOR_65, pass_=PASS_OK), K(),
         {"reason": R.OK_PASS, "product": "pass"}),
    case("student-pass-honoured-after-discount-expiry", "konya",
         card(CardType.STUDENT, discount=NOW - 1, pass_=PASS_OK), K(),
         {"reason": R.OK_PASS, "discount_applied": "full",
          "notice": R.DISCOUNT_EXPIRED}),
    # -- anti-passback ---------------------------------------------------------------------
    case("passback-purse-30s", "konya", card(trips=(ride(30, line=2, validator=200),)), K(),
         {"reason": R.ALREADY_VALIDATED}),
    case("passback-purse-59s", "konya", card(trips=(ride(59, line=2, validator=200),)), K(),
         {"reason": R.ALREADY_VALIDATED}),
    case("passback-over-same-line-pays-again", "konya",
         card(trips=(ride(60, line=2, validator=200),)), K(),
         {"reason": R.OK, "fare": 2250, "transfer_step": 0}),
    case("passback-other-door-same-vehicle", "konya",
         card(trips=(ride(10, line=2, validator=201),)), K(siblings=frozenset({201})),
         {"reason": R.ALREADY_VALIDATED}),
    case("passback-beats-insufficient-balance", "konya",
         card(balance=0, trips=(ride(5, line=2, validator=200),)), K(),
         {"reason": R.ALREADY_VALIDATED}),
    case("passback-beats-riders-check", "konya",
         card(trips=(ride(5, line=2, validator=200),)), K(),
         {"reason": R.ALREADY_VALIDATED}, riders=9),
    case("other-validator-10s-is-a-transfer", "konya",
         card(trips=(ride(10, line=1, validator=100),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350, "transfer_step": 1}),
    case("passback-pass-10min", "konya",
         card(pass_=PASS_OK, trips=(ride(10 * MIN, line=2, validator=200, product=PASS),)),
         K(), {"reason": R.ALREADY_VALIDATED}),
    case("passback-pass-over-after-30min", "konya",
         card(pass_=PASS_OK, trips=(ride(30 * MIN, line=2, validator=200, product=PASS),)),
         K(), {"reason": R.OK_PASS}),
    case("passback-free-10min", "city",
         card(CardType.SENIOR_65, trips=(ride(10 * MIN, line=2, validator=200,
                                              product=FREE),)),
         ctx(), {"reason": R.ALREADY_VALIDATED}),
    case("passback-free-over-after-15min", "city",
         card(CardType.SENIOR_65, trips=(ride(15 * MIN, line=2, validator=200,
                                              product=FREE),)),
         ctx(), {"reason": R.OK_FREE}),
    case("passback-clock-slightly-behind", "konya",
         card(trips=(ride(-120, line=2, validator=200),)), K(),
         {"reason": R.ALREADY_VALIDATED}),
    case("future-stamp-beyond-tolerance-ignored", "konya",
         card(trips=(ride(-(CLOCK_SKEW_TOLERANCE + 1), line=2, validator=200),)), K(),
         {"reason": R.OK, "fare": 2250, "transfer_step": 0}),
    case("top-up-is-not-a-ride", "konya",
         card(trips=(ride(5, line=0, validator=200, product=TripProduct.TOP_UP),
                     ride(2 * MIN, line=1, validator=100))),
         K(), {"reason": R.OK_TRANSFER, "fare": 1350, "transfer_step": 1}),
    case("repair-is-not-a-ride", "konya",
         card(trips=(ride(5, line=2, validator=200, product=TripProduct.REPAIR),)), K(),
         {"reason": R.OK, "fare": 2250}),
    # -- transfers (Konya: one step, 60 min from the first boarding) -----------------------
    case("transfer", "konya", card(trips=(ride(10 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350, "transfer_step": 1}),
    case("transfer-student", "konya", card(CardType.STUDENT, trips=(ride(10 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 540}),
    case("transfer-teacher", "konya", card(CardType.TEACHER, trips=(ride(10 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 540}),
    case("transfer-at-window-end", "konya", card(trips=(ride(60 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350}),
    case("transfer-window-over", "konya", card(trips=(ride(60 * MIN + 1),)), K(),
         {"reason": R.OK, "fare": 2250, "transfer_step": 0}),
    case("transfer-count-exhausted", "konya",
         card(trips=(ride(5 * MIN, line=3, step=1), ride(20 * MIN))), K(),
         {"reason": R.OK, "fare": 2250, "transfer_step": 0}),
    case("same-line-is-not-a-transfer", "konya", card(trips=(ride(10 * MIN, line=2),)), K(),
         {"reason": R.OK, "fare": 2250, "transfer_step": 0}),
    case("transfer-after-discount-expired", "konya",
         card(CardType.STUDENT, discount=NOW - 1, trips=(ride(10 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350, "discount_applied": "full"}),
    case("transfer-from-pass-leg-after-pass-expired", "konya",
         card(pass_=PassProduct(1, NOW - 30 * DAY, NOW - MIN),
              trips=(ride(10 * MIN, product=PASS),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350, "notice": R.PASS_EXPIRED}),
    case("free-card-transfer-step-recorded", "konya",
         card(CardType.SENIOR_65, trips=(ride(10 * MIN, product=FREE),)), K(),
         {"reason": R.OK_FREE, "fare": 0, "transfer_step": 1}),
    case("pass-transfer-step-recorded", "konya",
         card(pass_=PASS_OK, trips=(ride(10 * MIN, product=PASS),)), K(),
         {"reason": R.OK_PASS, "fare": 0, "transfer_step": 1}),
    # -- transfers (test city: five İstanbul steps, free line, other networks) -------------
    *[
        case(f"city-step-{k}", "city", card(trips=(ride(5 * MIN, line=3, step=k - 1),)),
             ctx(), {"reason": R.OK_TRANSFER, "fare": fare, "transfer_step": k})
        for k, fare in ((1, 2606), (2, 2002), (3, 1302), (4, 1302), (5, 1302))
    ],
    case("city-step-6-is-a-new-journey", "city",
         card(trips=(ride(5 * MIN, line=3, step=5),)), ctx(),
         {"reason": R.OK, "fare": 3500, "transfer_step": 0}),
    case("city-student-step-2", "city",
         card(CardType.STUDENT, trips=(ride(5 * MIN, line=3, step=1),)), ctx(),
         {"reason": R.OK_TRANSFER, "fare": 804}),
    case("city-journey-start-within", "city",
         card(trips=(ride(50 * MIN, line=3, step=1), ride(118 * MIN, line=1))), ctx(),
         {"reason": R.OK_TRANSFER, "fare": 2002, "transfer_step": 2}),
    case("city-journey-start-over", "city",
         card(trips=(ride(50 * MIN, line=3, step=1), ride(121 * MIN, line=1))), ctx(),
         {"reason": R.OK, "fare": 3500, "transfer_step": 0}),
    case("city-journey-start-scrolled-off", "city",
         card(trips=(ride(10 * MIN, line=4, step=3), ride(60 * MIN, line=3, step=2),
                     ride(110 * MIN, line=1, step=1))), ctx(),
         {"reason": R.OK_TRANSFER, "fare": 1302, "transfer_step": 4}),
    case("city-free-line", "city", card(trips=(ride(5 * MIN, line=3),)), ctx(8),
         {"reason": R.OK_TRANSFER, "fare": 0, "product": "purse", "transfer_step": 1}),
    case("city-free-line-outside-window", "city", card(trips=(ride(121 * MIN, line=3),)),
         ctx(8), {"reason": R.OK, "fare": 3500}),
    case("city-to-express-previous-leg", "city", card(trips=(ride(29 * MIN, line=3),)),
         ctx(90), {"reason": R.OK_TRANSFER, "fare": 1000}),
    case("city-to-express-window-over", "city", card(trips=(ride(31 * MIN, line=3),)),
         ctx(90), {"reason": R.OK, "fare": 5196}),
    case("express-previous-leg-not-journey-start", "city",
         card(trips=(ride(20 * MIN, line=90, step=1), ride(200 * MIN, line=3))), ctx(91),
         {"reason": R.OK_TRANSFER, "fare": 1000, "transfer_step": 2}),
    case("express-to-city-has-no-rule", "city", card(trips=(ride(5 * MIN, line=90),)), ctx(),
         {"reason": R.OK, "fare": 3500, "transfer_step": 0}),
    case("transfer-never-dearer-than-a-leg", "city", card(trips=(ride(5 * MIN, line=3),)),
         ctx(50), {"reason": R.OK_TRANSFER, "fare": 1000, "transfer_step": 1}),
    # -- extra riders ----------------------------------------------------------------------
    case("riders-3-full", "konya", card(), K(), {"reason": R.OK, "fare": 6750, "riders": 3},
         riders=3),
    case("riders-student-plus-one-full", "konya", card(CardType.STUDENT), K(),
         {"reason": R.OK, "fare": 900 + 2250, "day_spent": 900}, riders=2),
    case("riders-transfer-discount-holder-only", "konya", card(trips=(ride(10 * MIN),)), K(),
         {"reason": R.OK_TRANSFER, "fare": 1350 + 2250, "transfer_step": 1}, riders=2),
    case("riders-max", "konya", card(balance=20_000), K(), {"reason": R.OK, "fare": 5 * 2250},
         riders=5),
    case("riders-over-max", "konya", card(balance=20_000), K(),
         {"reason": R.RIDERS_NOT_ALLOWED}, riders=6),
    case("riders-zero", "konya", card(), K(), {"reason": R.RIDERS_NOT_ALLOWED}, riders=0),
    case("riders-on-pass", "konya", card(pass_=PASS_OK), K(),
         {"reason": R.RIDERS_NOT_ALLOWED}, riders=2),
    case("riders-on-free-card", "konya", card(CardType.SENIOR_65), K(),
         {"reason": R.RIDERS_NOT_ALLOWED}, riders=2),
    case("riders-on-expired-free-card-purse-pays", "konya",
         card(CardType.SENIOR_65, discount=NOW - 1), K(),
         {"reason": R.OK, "fare": 4500, "notice": R.DISCOUNT_EXPIRED}, riders=2),
    case("riders-insufficient", "konya", card(balance=6000), K(),
         {"reason": R.INSUFFICIENT_BALANCE}, riders=3),
    # -- daily cap (test city: full 100 TL, student 30 TL) ---------------------------------
    case("cap-not-reached", "city", card(day_spent=5000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK, "fare": 3500, "day_spent": 8500}),
    case("cap-partly", "city", card(day_spent=8000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 2000, "day_spent": 10_000}),
    case("cap-reached", "city", card(day_spent=10_000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 0, "product": "purse", "day_spent": 10_000}),
    case("cap-reached-zero-balance", "city",
         card(balance=0, day_spent=10_000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 0}),
    case("cap-after-transfer-price", "city",
         card(day_spent=8000, trips=(ride(5 * MIN, line=3),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 2000, "transfer_step": 1}),
    case("cap-day-spent-above-cap", "city", card(day_spent=12_000, trips=(ride(3 * 60 * MIN),)),
         ctx(), {"reason": R.OK_DAILY_CAP, "fare": 0, "day_spent": 12_000}),
    case("day-spent-saturates-at-u16", "konya",
         card(day_spent=65_000, trips=(ride(3 * 60 * MIN),)), K(),
         {"reason": R.OK, "fare": 2250, "day_spent": 0xFFFF}),
    case("cap-student", "city",
         card(CardType.STUDENT, day_spent=2500, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 500, "day_spent": 3000}),
    case("cap-none-for-social", "city",
         card(CardType.TEACHER, day_spent=50_000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK, "fare": 2506}),
    case("cap-resets-next-day", "city", card(day_spent=10_000, trips=(ride(DAY),)), ctx(),
         {"reason": R.OK, "fare": 3500, "day_spent": 3500}),
    case("cap-ignores-day-spent-without-rides", "city", card(day_spent=10_000), ctx(),
         {"reason": R.OK, "fare": 3500, "day_spent": 3500}),
    case("cap-extra-riders-always-pay", "city",
         card(day_spent=10_000, trips=(ride(3 * 60 * MIN),)), ctx(),
         {"reason": R.OK_DAILY_CAP, "fare": 3500, "day_spent": 10_000}, riders=2),
    case("cap-expired-student-uses-full-cap", "city",
         card(CardType.STUDENT, discount=NOW - 1, day_spent=9000, trips=(ride(3 * 60 * MIN),)),
         ctx(), {"reason": R.OK_DAILY_CAP, "fare": 1000, "discount_applied": "full"}),
    case("free-ride-keeps-day-spent", "city",
         card(CardType.SENIOR_65, day_spent=700, trips=(ride(3 * 60 * MIN, product=FREE),)),
         ctx(), {"reason": R.OK_FREE, "day_spent": 700}),
    case("pass-ride-new-day-resets-day-spent", "city",
         card(pass_=PassProduct(7, NOW - DAY, FAR), day_spent=700, trips=(ride(DAY),)),
         ctx(), {"reason": R.OK_PASS, "day_spent": 0}),
]
# fmt: on


@pytest.mark.parametrize(("table", "c", "x", "riders", "blacklisted", "at", "expect"), RULES)
def test_rules(table, c, x, riders, blacklisted, at, expect):
    d = decide(c, TABLES[table], at, x, riders, blacklisted=blacklisted)
    check(d, c, at, x, riders)
    for name, value in expect.items():
        assert getattr(d, name) == value, (name, d)
    assert d.accepted is expect["reason"].accepted


IST = ZoneInfo("Europe/Istanbul")


def local(day: int, hour: int, minute: int) -> int:
    return int(datetime(2025, 9, day, hour, minute, tzinfo=IST).timestamp())


@pytest.mark.parametrize(
    ("last", "now", "reset"),
    [
        (local(15, 23, 59), local(16, 0, 1), True),
        (local(15, 0, 1), local(15, 23, 59), False),
        (local(14, 23, 0), local(15, 2, 0), True),
    ],
    ids=["midnight-in-istanbul", "same-istanbul-day", "after-midnight"],
)
def test_daily_cap_uses_the_istanbul_day(last, now, reset):
    """The cap's day is the local day: 23:59 and 00:01 in Konya are 20:59 and 21:01 UTC."""
    if reset:
        assert CITY.local_date(last) != CITY.local_date(now)
    trip = TripRecord.make(
        counter=1, time=last, line_id=90, validator_id=1, fare=3500, transfer_step=0, product=P
    )
    c = replace(card(), trips=(trip,), day_spent=10_000)
    d = decide(c, CITY, now, ctx(2))  # express → city has no transfer rule: a plain leg
    check(d, c, now, ctx(2), 1)
    if reset:
        assert (d.reason, d.fare, d.day_spent) == (R.OK, 3500, 3500)
    else:
        assert (d.reason, d.fare, d.day_spent) == (R.OK_DAILY_CAP, 0, 10_000)


def test_midnight_case_is_one_utc_day():
    utc = [datetime.fromtimestamp(t, UTC).date() for t in (local(15, 23, 59), local(16, 0, 1))]
    assert utc[0] == utc[1]


def test_unknown_card_type_in_tariff():
    data = city_dict()
    data["rider_categories"]["staff"]["card_types"] = ["free_other"]
    data["rider_categories"]["free"]["card_types"] = ["65+", "disabled", "disabled_companion"]
    table = FareTable.from_dict(data)
    c = card(CardType.PERSONNEL)
    d = decide(c, table, NOW, ctx())
    check(d, c, NOW, ctx(), 1)
    assert d.reason is R.UNKNOWN_CARD_TYPE


@pytest.mark.parametrize(
    ("previous", "expected"),
    [((), 1), ((41,), 42), ((0xFFFF_FFFF,), 0)],
    ids=["first-trip", "next", "wraps"],
)
def test_trip_counter(previous, expected):
    trips = tuple(
        TripRecord.make(
            counter=n,
            time=NOW - DAY,
            line_id=1,
            validator_id=1,
            fare=0,
            transfer_step=0,
            product=TripProduct.TOP_UP,
        )
        for n in previous
    )
    d = decide(replace(card(), trips=trips), KONYA, NOW, konya_ctx())
    assert d.trip is not None and d.trip.counter == expected


def test_decide_rejects_bad_arguments():
    with pytest.raises(CodecError, match="now"):
        decide(card(), KONYA, -1, konya_ctx())
    with pytest.raises(CodecError, match="now"):
        decide(card(), KONYA, 1 << 32, konya_ctx())
    with pytest.raises(CodecError, match="riders"):
        decide(card(), KONYA, NOW, konya_ctx(), True)


# ---------------------------------------------------------------------------------------------
# Tariff loading and validation
# ---------------------------------------------------------------------------------------------


def test_konya_tariff_has_the_published_figures():
    t = KONYA
    assert t.version == 2025082701 and t.timezone == "Europe/Istanbul" and t.currency == "TRY"
    assert t.leg_fare("merkez", "full") == 2250  # 22,50 TL
    assert t.leg_fare("merkez", "student") == 900  # 9 TL
    monthly = t.pass_product(1)
    assert monthly is not None and monthly.kind == "pass"
    assert (monthly.amounts["full"], monthly.amounts["student"]) == (140_000, 35_000)
    assert t.pass_validity_days == 30
    for free_type in (CardType.SENIOR_65, CardType.DISABLED):
        category = t.category_for(free_type)
        assert category is not None and category.free
    assert t.default_category.category_id == "full"
    assert tariffs.available() == ["konya-2025"]


def test_pass_for_and_top_up_room():
    loaded = NOW + 3600 + 17
    p = KONYA.pass_for(1, loaded)
    assert (p.product_id, p.valid_from, p.valid_until) == (1, loaded, loaded + 30 * DAY)
    assert p.is_valid_at(loaded + 30 * DAY - 1) and not p.is_valid_at(loaded + 30 * DAY)
    with pytest.raises(FareTableError, match="product_code 9"):
        KONYA.pass_for(9, NOW)
    assert KONYA.top_up_room(0) == KONYA.max_balance
    assert KONYA.top_up_room(KONYA.max_balance + 5) == 0


def test_from_toml_sources(tmp_path):
    path = tmp_path / "t.toml"
    raw = resources.files(tariffs).joinpath("konya-2025.toml").read_bytes()
    path.write_bytes(raw)
    assert FareTable.from_toml(path) == KONYA
    assert FareTable.from_toml(str(path)) == KONYA
    assert FareTable.from_toml(raw) == KONYA
    assert FareTable.from_toml(raw.decode()) == KONYA


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("version = ", "not valid TOML"),
        (b"\xff\xfe", "not UTF-8"),
        ("/nonexistent/tariff.toml", "cannot read tariff"),
        ('version = 1\nname = "x"', "missing required key"),
    ],
    ids=["bad-toml", "bad-utf8", "missing-file", "incomplete"],
)
def test_from_toml_errors(source, message):
    with pytest.raises(FareTableError, match=message):
        FareTable.from_toml(source)


def _set(path: str, value):
    """A mutation setting ``a.b[0].c`` in the tariff dict (value ``...`` deletes the key)."""

    def mutate(data: dict) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        node = data
        for part in parents:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        key = int(last[1:-1]) if last.startswith("[") else last
        if value is ...:
            del node[key]
        else:
            node[key] = value

    return mutate


def _append(path: str, value):
    def mutate(data: dict) -> None:
        node = data
        for part in path.split("."):
            node = node[part]
        node.append(value)

    return mutate


# fmt: off
INVALID = [
    ("unknown-top-level-key", _set("fare", 1), "unknown key 'fare'"),
    ("missing-version", _set("version", ...), "missing required key 'version'"),
    ("version-zero", _set("version", 0), "version: must be in"),
    ("version-string", _set("version", "7"), "version: must be an integer"),
    ("bad-timezone", _set("timezone", "Mars/Olympus"), "unknown time zone"),
    ("bad-currency", _set("currency", "tl"), "currency"),
    ("max-balance-float", _set("max_balance", 2000.0), "max_balance: money is an integer"),
    ("max-balance-zero", _set("max_balance", 0), "max_balance: must be positive"),
    ("max-riders-17", _set("max_riders", 17), "max_riders: must be in 1..16"),
    ("pass-days-zero", _set("pass_validity_days", 0), "pass_validity_days"),
    ("no-fare-media", _set("fare_media", {}), "fare_media: at least one"),
    ("fare-media-type", _set("fare_media.card.fare_media_type", 9), "fare_media.card"),
    ("no-networks", _set("networks", {}), "networks: at least one"),
    ("line-in-two-networks", _set("networks.express.line_ids", [90, 1]),
     "line 1 is already in network 'city'"),
    ("line-id-too-big", _set("networks.express.line_ids", [70_000]), "line_ids[0]"),
    ("unknown-card-type", _set("rider_categories.student.card_types", ["pupil"]),
     "unknown card type 'pupil'"),
    ("card-type-twice", _set("rider_categories.student.card_types", ["student", "teacher"]),
     "'teacher' is already in rider category"),
    ("category-without-types", _set("rider_categories.student.card_types", []),
     "at least one card type"),
    ("no-default-category", _set("rider_categories.full.is_default_fare_category", False),
     "exactly one category"),
    ("two-default-categories", _set("rider_categories.social.is_default_fare_category", True),
     "exactly one category"),
    ("default-category-free", _set("rider_categories.full.free", True), "cannot be free"),
    ("category-unknown-key", _set("rider_categories.full.discount", 50), "unknown key"),
    ("free-not-bool", _set("rider_categories.free.free", "yes"), "must be true or false"),
    ("negative-fare", _set("fare_products.city_leg.amounts.student", -1),
     "fare_products.city_leg.amounts.student: must not be negative"),
    ("float-fare", _set("fare_products.city_leg.amounts.full", 35.0),
     "fare_products.city_leg.amounts.full: money is an integer number of kuruş"),
    ("bool-fare", _set("fare_products.city_leg.amounts.full", True), "must be an integer"),
    ("fare-for-unknown-category", _set("fare_products.city_leg.amounts.pupil", 100),
     "unknown rider category 'pupil'"),
    ("missing-fare-for-category", _set("fare_products.city_leg.amounts.social", ...),
     "missing fare for rider category 'social'"),
    ("discount-dearer-than-full", _set("fare_products.city_leg.amounts.student", 3501),
     "more than the full fare"),
    ("bad-product-kind", _set("fare_products.city_leg.kind", "ticket"), "kind: must be one of"),
    ("unknown-fare-media", _set("fare_products.t1.fare_media_id", "paper"),
     "unknown fare medium 'paper'"),
    ("pass-code-taken", _set("fare_products.monthly_all.product_code", 7),
     "product_code: 7 is already used"),
    ("pass-code-zero", _set("fare_products.monthly.product_code", 0), "product_code"),
    ("pass-unknown-network", _set("fare_products.monthly.networks", ["metro"]),
     "unknown network 'metro'"),
    ("pass-no-network", _set("fare_products.monthly.networks", []), "at least one network"),
    ("leg-product-with-pass-keys", _set("fare_products.city_leg.product_code", 3),
     "unknown key 'product_code'"),
    ("leg-rule-unknown-network", _set("fare_leg_rules[0].network_id", "metro"),
     "fare_leg_rules[0].network_id: unknown network"),
    ("leg-rule-unknown-product", _set("fare_leg_rules[0].fare_product_id", "nope"),
     "unknown fare product 'nope'"),
    ("leg-rule-pass-product", _set("fare_leg_rules[0].fare_product_id", "monthly"),
     "a leg rule needs a leg product"),
    ("leg-rules-overlap", _append("fare_leg_rules",
                                  {"network_id": "city", "fare_product_id": "shuttle_leg"}),
     "fare_leg_rules[3]: overlaps fare_leg_rules[0]"),
    ("leg-rules-overlap-category", _append("fare_leg_rules", {
        "network_id": "city", "fare_product_id": "city_leg", "rider_category_id": "full"}),
     None),
    ("leg-rule-two-leg-groups", _append("fare_leg_rules", {
        "network_id": "city", "fare_product_id": "city_leg", "rider_category_id": "student",
        "leg_group_id": "other"}), "one network belongs to one leg group"),
    ("network-without-fare", _set("fare_leg_rules", [{"network_id": "city",
                                                       "fare_product_id": "city_leg"}]),
     "no fare_leg_rules entry for network 'express'"),
    ("transfer-rules-overlap", _append("fare_transfer_rules", {
        "to_leg_group_id": "express", "duration_limit": 60, "duration_limit_type": 1}),
     "fare_transfer_rules[3]: overlaps fare_transfer_rules[1]"),
    ("transfer-unknown-leg-group", _set("fare_transfer_rules[0].to_leg_group_id", "metro"),
     "unknown leg group 'metro'"),
    ("transfer-steps-beyond-count", _set("fare_transfer_rules[0].transfer_count", 2),
     "3 step prices but transfer_count is 2"),
    ("transfer-count-zero", _set("fare_transfer_rules[0].transfer_count", 0), "transfer_count"),
    ("transfer-duration-type-gtfs-0", _set("fare_transfer_rules[0].duration_limit_type", 0),
     "GTFS types 0, 2 and 3"),
    ("transfer-duration-type-list", _set("fare_transfer_rules[0].duration_limit_type", [1]),
     "duration_limit_type"),
    ("transfer-no-duration", _set("fare_transfer_rules[0].duration_limit", ...),
     "missing required key 'duration_limit'"),
    ("transfer-negative-duration", _set("fare_transfer_rules[0].duration_limit", -5),
     "duration_limit"),
    ("transfer-type-1", _set("fare_transfer_rules[0].fare_transfer_type", 1),
     "fare_transfer_type: only 0"),
    ("transfer-step-leg-product", _set("fare_transfer_rules[0].fare_product_ids",
                                       ["t1", "city_leg"]), "not transfer"),
    ("transfer-step-missing-category", _set("fare_products.t2.amounts.social", ...),
     "fare_products.t2.amounts: missing fare for rider category 'social'"),
    ("transfer-empty-steps", _set("fare_transfer_rules[0].fare_product_ids", []),
     "must not be empty"),
    ("transfer-both-product-keys", _set("fare_transfer_rules[0].fare_product_id", "t1"),
     "not both"),
    ("transfer-free-line-bad", _set("fare_transfer_rules[0].free_lines", ["8"]),
     "free_lines[0]"),
    ("anti-passback-zero", _set("anti_passback.stored_value_seconds", 0),
     "anti_passback.stored_value_seconds"),
    ("anti-passback-missing", _set("anti_passback.pass_seconds", ...),
     "missing required key 'pass_seconds'"),
    ("cap-unknown-category", _set("daily_cap.pupil", 100), "daily_cap.pupil: unknown rider"),
    ("cap-free-category", _set("daily_cap.free", 100), "is free, a cap is moot"),
    ("cap-zero", _set("daily_cap.full", 0), "must be positive"),
    ("cap-above-u16", _set("daily_cap.full", 70_000), "daily_cap.full: must be in 0..65535"),
    ("cap-float", _set("daily_cap.full", 100.5), "daily_cap.full: money is an integer"),
    ("fare-overflows-trip-record", _set("fare_products.express_leg.amounts.full", 20_000),
     "exceed the 65535 kuruş"),
    ("table-not-a-table", _set("networks", ["city"]), "networks: must be a table"),
]
# fmt: on


@pytest.mark.parametrize(
    ("mutate", "message"), [pytest.param(m, msg, id=i) for i, m, msg in INVALID]
)
def test_invalid_tariffs(mutate, message):
    data = copy.deepcopy(city_dict())
    mutate(data)
    if message is None:  # a category-specific leg rule beside a general one is allowed
        FareTable.from_dict(data)
        return
    with pytest.raises(FareTableError) as exc:
        FareTable.from_dict(data)
    assert message in str(exc.value)
    assert isinstance(exc.value, CodecError) and isinstance(exc.value, CoreError)


def test_category_specific_leg_rule_wins():
    data = city_dict()
    data["fare_products"]["cheap"] = {
        "name": "Student city",
        "kind": "leg",
        "fare_media_id": "card",
        "amounts": {"student": 1},
    }
    data["fare_leg_rules"].append(
        {"network_id": "city", "fare_product_id": "cheap", "rider_category_id": "student"}
    )
    table = FareTable.from_dict(data)
    assert table.leg_fare("city", "student") == 1
    assert table.leg_fare("city", "full") == 3500


def test_transfer_rule_specificity():
    rule = CITY.transfer_rule_for("city", "city")
    assert rule is not None and rule.name == "aktarma"
    assert rule.duration_limit_type is DurationLimitType.JOURNEY_START
    express = CITY.transfer_rule_for("shuttle", "express")
    assert express is not None and express.name == "to express"
    assert express.duration_limit_type is DurationLimitType.PREVIOUS_LEG  # GTFS 1
    assert CITY.transfer_rule_for("express", "city") is None


def test_transfer_rule_tie_prefers_the_destination():
    """(city → any) and (any → express) both match city → express: the destination rule wins."""
    data = city_dict()
    data["fare_transfer_rules"].insert(
        0,
        {
            "name": "from city",
            "from_leg_group_id": "city",
            "duration_limit": 60,
            "duration_limit_type": "previous_leg",
        },
    )
    table = FareTable.from_dict(data)
    picked = table.transfer_rule_for("city", "express")
    assert picked is not None and picked.name == "to express"
    from_city = table.transfer_rule_for("city", "shuttle")
    assert from_city is not None and from_city.name == "to shuttle"
    assert table.transfer_rule_for("city", None) is not None
    free = table.transfer_rule_for("city", "nowhere")
    assert free is not None and free.name == "from city" and free.step_product_ids == ()


# ---------------------------------------------------------------------------------------------
# Card types, reasons, the trip record
# ---------------------------------------------------------------------------------------------


def test_card_type_codes():
    codes = [t.code for t in CardType]
    assert len(set(codes)) == len(codes) and 0 not in codes and all(0 < c < 256 for c in codes)
    for t in CardType:
        assert CardType.from_code(t.code) is t
    assert CardType.SENIOR_65.value == "65+"


@pytest.mark.parametrize("code", [0, 9, 255, -1, True, "1", None], ids=repr)
def test_card_type_unknown_code(code):
    with pytest.raises(CodecError, match="unknown card type"):
        CardType.from_code(code)


def test_reasons():
    codes = [r.code for r in Reason]
    assert len(set(codes)) == len(codes)
    for r in Reason:
        assert Reason.from_code(r.code) is r
        for message in (r.message_tr, r.message_en):
            assert 0 < len(message) <= 20, (r, message)  # one line of the 2×20 display
    assert Reason.CARD_EXPIRED.message_tr == "Kartın süresi dolmuş"
    assert {r for r in Reason if r.accepted} == {
        R.OK,
        R.OK_TRANSFER,
        R.OK_PASS,
        R.OK_FREE,
        R.OK_DAILY_CAP,
        R.DISCOUNT_EXPIRED,
    }
    with pytest.raises(CodecError):
        Reason.from_code(99)


def test_trip_record_layout():
    trip = TripRecord.make(
        counter=0x01020304,
        time=0x0A0B0C0D,
        line_id=0x1122,
        validator_id=0x3344,
        fare=2250,
        transfer_step=2,
        product=TripProduct.PURSE,
        riders=3,
    )
    raw = trip.to_bytes()
    assert raw == bytes.fromhex("04030201 0d0c0b0a 2211 4433 ca08 02 20")
    assert len(raw) == TripRecord.SIZE == 16
    assert (trip.product, trip.riders, trip.is_ride) == (TripProduct.PURSE, 3, True)
    assert not TripRecord.from_bytes(raw[:-1] + b"\x03").is_ride  # top-up


trip_records = st.builds(
    TripRecord.make,
    counter=st.integers(0, 0xFFFF_FFFF),
    time=st.integers(0, 0xFFFF_FFFF),
    line_id=st.integers(0, 0xFFFF),
    validator_id=st.integers(0, 0xFFFF),
    fare=st.integers(0, 0xFFFF),
    transfer_step=st.integers(0, 0xFF),
    product=st.sampled_from(TripProduct),
    riders=st.integers(1, 16),
)


@given(trip_records)
def test_trip_record_round_trip(trip):
    raw = trip.to_bytes()
    assert len(raw) == 16
    assert TripRecord.from_bytes(raw) == trip
    assert TripRecord.from_bytes(bytearray(raw)) == trip
    assert TripRecord.from_bytes(memoryview(raw)) == trip


@given(st.binary(min_size=16, max_size=16))
def test_trip_record_any_16_bytes(raw):
    """Any 16 bytes either parse to a record that packs back to them, or give a CodecError."""
    try:
        trip = TripRecord.from_bytes(raw)
    except CodecError:
        assert raw[15] & 0x0F > max(TripProduct)
    else:
        assert trip.to_bytes() == raw


@pytest.mark.parametrize(
    "raw",
    [b"", bytes(15), bytes(17), "0" * 16, None, bytes(15) + b"\x0f"],
    ids=["empty", "short", "long", "str", "none", "bad-product"],
)
def test_trip_record_bad_bytes(raw):
    with pytest.raises(CodecError):
        TripRecord.from_bytes(raw)


@pytest.mark.parametrize(
    "field, value",
    [
        ("counter", -1),
        ("time", 1 << 32),
        ("line_id", 1 << 16),
        ("validator_id", -1),
        ("fare", 70_000),
        ("transfer_step", 256),
        ("flags", 256),
        ("flags", 0x05),
        ("fare", 1.5),
        ("counter", True),
    ],
)
def test_trip_record_out_of_range(field, value):
    good = dict(counter=1, time=2, line_id=3, validator_id=4, fare=5, transfer_step=0, flags=0)
    with pytest.raises(CodecError):
        TripRecord(**{**good, field: value})


@pytest.mark.parametrize("riders", [0, 17, True])
def test_trip_record_make_riders(riders):
    with pytest.raises(CodecError):
        TripRecord.make(
            counter=1,
            time=1,
            line_id=1,
            validator_id=1,
            fare=0,
            transfer_step=0,
            product=TripProduct.PURSE,
            riders=riders,
        )


def test_other_records_validate():
    with pytest.raises(CodecError):
        PassProduct(256, 0, 1)
    with pytest.raises(CodecError):
        PassProduct(1, 10, 9)
    with pytest.raises(CodecError):
        ValidatorContext(1 << 16, 1, 1, "city", 0)
    with pytest.raises(CodecError):
        ValidatorContext(1, 1, 1, "", 0)
    with pytest.raises(CodecError):
        ValidatorContext(1, 1, 1, "city", 0, frozenset({70_000}))
    with pytest.raises(CodecError):
        replace(card(), card_type="full")
    with pytest.raises(CodecError):
        replace(card(), trips=[])
    with pytest.raises(CodecError):
        replace(card(), balance=1.5)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

LINES = [1, 2, 3, 8, 50, 90, 91]
VALIDATORS = [100, 200, 201]


@st.composite
def trip_logs(draw) -> tuple[TripRecord, ...]:
    """Up to three log entries, newest first, times going back from about NOW."""
    entries = []
    t = NOW + draw(st.sampled_from([0, 0, 0, 100, CLOCK_SKEW_TOLERANCE + 1]))
    for i in range(draw(st.integers(0, 3))):
        t -= draw(st.sampled_from([0, 5, 59, 60, 600, 1799, 1800, 3600, 7201, DAY]))
        entries.append(
            TripRecord.make(
                counter=100 - i,
                time=max(t, 0),
                line_id=draw(st.sampled_from(LINES)),
                validator_id=draw(st.sampled_from(VALIDATORS)),
                fare=draw(st.integers(0, 6000)),
                transfer_step=draw(st.integers(0, 6)),
                product=draw(st.sampled_from(TripProduct)),
                riders=draw(st.integers(1, 4)),
            )
        )
    return tuple(entries)


times_near_now = st.integers(NOW - 2 * DAY, NOW + 2 * DAY)
cards = st.builds(
    CardView,
    card_number=st.integers(0, 2**32 - 1),
    card_type=st.sampled_from(CardType),
    discount_valid_until=st.none() | times_near_now,
    card_expires=st.one_of(st.just(FAR), times_near_now),
    blocked=st.booleans(),
    balance=st.integers(0, 20_000),
    pass_product=st.none()
    | st.builds(
        lambda code, start, length: PassProduct(code, start, start + length),
        st.sampled_from([1, 7, 8, 99]),
        st.integers(NOW - 40 * DAY, NOW + DAY),
        st.integers(0, 30 * DAY),
    ),
    trips=trip_logs(),
    day_spent=st.integers(0, 12_000),
)


@st.composite
def contexts(draw) -> tuple[str, ValidatorContext]:
    table = draw(st.sampled_from(sorted(TABLES)))
    line = draw(st.sampled_from(LINES))
    if table == "konya":
        group = draw(st.sampled_from(["merkez", "merkez", "nowhere"]))
    else:
        group = {50: "shuttle", 90: "express", 91: "express"}.get(line, "city")
        group = draw(st.sampled_from([group, group, "nowhere"]))
    validator = draw(st.sampled_from(VALIDATORS))
    siblings = frozenset(draw(st.sets(st.sampled_from(VALIDATORS))) - {validator})
    return table, ValidatorContext(validator, 7, line, group, 0, siblings)


def apply(c: CardView, d: Decision) -> CardView:
    """What the card application does with an accepted decision."""
    assert d.trip is not None
    return replace(
        c, balance=c.balance - d.fare, trips=(d.trip, *c.trips[:2]), day_spent=d.day_spent
    )


@given(
    c=cards,
    tx=contexts(),
    now=st.integers(NOW, NOW + 600),
    riders=st.integers(0, 6),
    blacklisted=st.booleans(),
)
def test_property_never_negative_never_above_full_fare(c, tx, now, riders, blacklisted):
    name, x = tx
    table = TABLES[name]
    d = decide(c, table, now, x, riders, blacklisted=blacklisted)
    check(d, c, now, x, riders)
    assert d.fare >= 0 and c.balance - d.fare >= 0
    full = table.leg_fare(x.line_group, table.default_category.category_id)
    assert d.fare <= (full or 0) * max(riders, 0)
    if d.accepted:
        assert d.day_spent >= 0
        if d.product != "purse":
            assert d.fare == 0 and riders == 1


@given(
    c=cards,
    tx=contexts(),
    now=st.integers(NOW, NOW + 600),
    riders=st.integers(1, 4),
    again=st.integers(0, 59),
    where=st.sampled_from(["same", "sibling"]),
)
def test_property_never_charged_twice_for_one_boarding(c, tx, now, riders, again, where):
    """Tap, write what the decision says, tap again at once at the same validator (or the other
    door of the same vehicle): refused, nothing charged, nothing to write."""
    name, x = tx
    table = TABLES[name]
    first = decide(c, table, now, x, riders)
    if not first.accepted:
        return
    after = apply(c, first)
    assert after.balance >= 0
    retap_ctx = x
    if where == "sibling":
        retap_ctx = replace(x, validator_id=999, vehicle_validator_ids=frozenset({x.validator_id}))
    second = decide(after, table, now + again, retap_ctx, riders)
    check(second, after, now + again, retap_ctx, riders)
    assert not second.accepted and second.fare == 0 and second.trip is None
    if now + again < after.card_expires:
        assert second.reason is Reason.ALREADY_VALIDATED


@given(
    c=cards,
    taps=st.lists(
        st.tuples(
            st.sampled_from([0, 10, 61, 300, 1000, 1801, 4000, 8000]),
            st.sampled_from(LINES),
            st.sampled_from(VALIDATORS),
            st.integers(1, 3),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_property_a_day_of_riding(c, taps):
    """A run of taps on the test city: the purse only ever falls by what decisions charged,
    never below zero, and the daily cap holds for the holder's own fares."""
    c = replace(c, blocked=False, card_expires=FAR, trips=(), day_spent=0)
    now = NOW
    for delay, line, validator, riders in taps:
        now += delay
        x = ctx(line, validator=validator)
        d = decide(c, CITY, now, x, riders)
        check(d, c, now, x, riders)
        if d.accepted:
            before = c.balance
            c = apply(c, d)
            assert c.balance == before - d.fare >= 0
            cap = CITY.daily_cap.get(d.discount_applied)
            if cap is not None and d.product == "purse":
                assert d.day_spent <= cap
