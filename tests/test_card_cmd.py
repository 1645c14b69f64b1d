"""``afc card issue|inspect|block`` through the real driver and the PN532 emulator on a pty.

Every command runs as an operator runs it (click's CliRunner, reader URL = the emulator's
pty); the cards are then read back independently, in process, with a validator's key A, so a
test never trusts the command's own report of what it wrote. Includes the key rotation
proof: cards issued before and after ``afc keys rotate`` both stay readable.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from firmware.apps.cards import FieldCardSource
from firmware.apps.clock import GuardedClock
from firmware.apps.ui import RecordingUi
from firmware.apps.validator import Validator, ValidatorConfig
from firmware.core import card_layout as cl
from firmware.core import classic_layout as layout
from firmware.core import tariffs
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import MAC_AID, MAC_SYSTEM
from firmware.core.errors import AuthenticationError
from firmware.core.fares import CardType
from firmware.core.keys import FileKeyStore, MemoryKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import CardSnapshot, Purse
from firmware.stores.database import DeviceDatabase
from simulators.cards import VirtualCard
from simulators.pn532.server import Pn532Server
from tools.card_cmd import PinnedKeyStore, card, card_key_versions, read_csv
from tools.cli import AfcGroup
from tools.cli import main as afc_main

TODAY = date.today()
EXPIRES = (TODAY + timedelta(days=5 * 365)).isoformat()
DISCOUNT = (TODAY + timedelta(days=200)).isoformat()


@click.group(cls=AfcGroup)
def afc() -> None:
    """``afc`` with the card group, as tools/cli.py will register it."""


afc.add_command(card)


def run(*args: str):
    return CliRunner().invoke(afc, list(args))


def blank(seed: int, uid_size: int = 4) -> VirtualCard:
    return VirtualCard.new(layout.CardType.CLASSIC_1K, uid_size=uid_size,
                           rng=random.Random(seed))


class Rig:
    """The emulator on a pty in this process, with a control socket."""

    def __init__(self, tmp: Path, cards: list[VirtualCard]) -> None:
        self.cards = cards
        self.control_path = str(tmp / "pn532.ctl")
        self.server = Pn532Server(cards=cards, port=tmp / "pn532", control=self.control_path)
        self.url = self.server.url

    def only(self, number: int) -> None:
        """Exactly card ``number`` (1-based) on the reader."""
        self.server.control("remove all")
        self.server.control(f"place {number}")

    def call(self, fn):
        return self.server.call(fn)


@pytest.fixture
def rig(tmp_path) -> Iterator:
    made: list[Rig] = []

    def start(*cards: VirtualCard) -> Rig:
        folder = tmp_path / f"rig{len(made)}"
        folder.mkdir()
        r = Rig(folder, list(cards))
        r.server.start()
        made.append(r)
        return r

    yield start
    for r in made:
        r.server.stop()
        r.server.join(5.0)
        r.server.close()


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "keys.toml"
    FileKeyStore.generate(path)
    return path


def read_back(vcard: VirtualCard, keys, version: int | None = None) -> CardSnapshot:
    """The card as a validator reads it (key A), in process, independent of the command."""
    air = Field([vcard])
    air.reset()
    selected = select_card(air.transceive)
    rng = random.Random(5)
    reader = ClassicReader(air.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))
    view = keys if version is None else PinnedKeyStore(keys, version)
    return Purse(reader, view).read()


def issue_args(rig: Rig, store: Path, number: int, *extra: str) -> list[str]:
    return ["card", "issue", "--reader", rig.url, "--keys", str(store), "--number", str(number),
            "--expires", EXPIRES, "--holder", f"OF-{number}", "--card-wait", "3", *extra]


# -- issue ------------------------------------------------------------------------------------


def test_issue_then_inspect_a_student_card(rig, store):
    r = rig(blank(1))
    result = run(*issue_args(r, store, 4711, "--type", "student", "--discount-until", DISCOUNT,
                             "--balance", "50,25", "--json"))
    assert result.exit_code == 0, result.output
    issued = json.loads(result.stdout)
    assert issued[0]["card_number"] == 4711 and issued[0]["key_version"] == 1

    keys = FileKeyStore.open(store)
    snap = read_back(r.cards[0], keys)
    ident = snap.identity
    assert (ident.card_number, ident.card_type, ident.key_version) == (4711,
                                                                       CardType.STUDENT.code, 1)
    assert snap.balance == 5025 and snap.counter == 0 and not snap.blocked
    assert ident.holder_ref == b"OF-4711\0"
    # the dates printed on the card are inclusive; the engine's ends are the next midnight
    assert ident.expires == cl.day_start((date.fromisoformat(EXPIRES) - cl.EPOCH).days + 1)
    assert ident.discount_until == cl.day_start(
        (date.fromisoformat(DISCOUNT) - cl.EPOCH).days + 1)

    result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    app = report["application"]
    assert report["key_version"] == 1 and report["verdict"]["state"] == "consistent"
    assert app["identity"]["type"] == "student" and app["identity"]["expires"] == EXPIRES
    assert app["identity"]["discount_until"] == DISCOUNT
    assert app["purse"]["record"]["balance"] == 5025 and app["trips"] == []
    checks = [c for s in report["sectors"] for c in s["checks"]] + app["purse"]["checks"]
    assert checks and all(c["ok"] for c in checks)
    assert len(report["sectors"]) == 16 and all(s["readable"] for s in report["sectors"])


def test_inspect_never_shows_key_material(rig, store):
    r = rig(blank(2))
    assert run(*issue_args(r, store, 12, "--type", "full", "--balance", "5")).exit_code == 0
    keys = FileKeyStore.open(store)
    uid = r.cards[0].uid
    secrets = [keys.classic_key(uid, s, kt) for s in range(4) for kt in "AB"]
    secrets += [keys.diversify("purse-mac", uid, MAC_AID, system)
                for system in MAC_SYSTEM.values()]
    secrets += [bytes.fromhex(v) for line in store.read_text().splitlines()
                if line[:1].isdigit() for v in [line.split('"')[1]]]
    outputs = [run("card", "inspect", "--reader", r.url, "--keys", str(store), *flag).stdout
               for flag in ((), ("--json",))]
    for text in outputs:
        for key in secrets:
            assert key.hex().upper() not in text.upper()


def test_issue_refuses_a_card_that_is_already_issued(rig, store):
    r = rig(blank(3))
    assert run(*issue_args(r, store, 100, "--type", "full")).exit_code == 0
    before = bytes(r.cards[0].memory)
    result = run(*issue_args(r, store, 101, "--type", "full"))
    assert result.exit_code == 1
    assert result.stderr.startswith("afc: error:") and result.stderr.count("\n") == 1
    assert "already issued (card number 100, key version 1)" in result.stderr
    assert bytes(r.cards[0].memory) == before


def test_issue_refuses_a_card_of_another_system(rig, store, tmp_path):
    other = tmp_path / "other.toml"
    FileKeyStore.generate(other)
    r = rig(blank(4))
    assert run(*issue_args(r, other, 5, "--type", "full")).exit_code == 0
    for args in (issue_args(r, store, 6, "--type", "full"),
                 ["card", "inspect", "--reader", r.url, "--keys", str(store)]):
        result = run(*args)
        assert result.exit_code == 1
        assert "answers to none of the store's card key versions" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--type", "pensioner"), "card type 'pensioner' is unknown"),
    (("--type", "full", "--discount-until", DISCOUNT), "a full-fare card has no discount"),
    (("--type", "student", "--balance", "12.345"), "at most two decimals"),
    (("--type", "student", "--balance", "5000"), "above the tariff's maximum"),
    (("--type", "full", "--holder", "Ahmet Yılmaz"), "printable ASCII"),
])
def test_bad_card_specs_are_refused_before_the_card_is_touched(rig, store, args, message):
    r = rig(blank(5))
    before = bytes(r.cards[0].memory)
    result = run(*issue_args(r, store, 7, *args))
    assert result.exit_code != 0
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert bytes(r.cards[0].memory) == before


def test_issue_in_chip_crypto_mode(rig, store):
    r = rig(blank(6, uid_size=7))
    result = run(*issue_args(r, store, 66, "--type", "65+", "--mode", "chip"))
    assert result.exit_code == 0, result.output
    snap = read_back(r.cards[0], FileKeyStore.open(store))
    assert snap.identity.card_type == CardType.SENIOR_65.code
    # without --discount-until the discount lasts the card's life
    assert snap.identity.discount_until == snap.identity.expires
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--mode", "chip")
    assert result.exit_code == 0 and "verdict: consistent" in result.stdout


# -- batch ------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("card_number,type,expires,discount_until,holder,balance\n"
                    + "".join(row + "\n" for row in rows))
    return path


def test_batch_issue_from_csv_places_each_card_through_the_emulator(rig, store, tmp_path):
    cards = [blank(10 + i) for i in range(3)]
    r = rig(*cards)
    batch = write_csv(tmp_path / "batch.csv", [
        f"2001,student,{EXPIRES},{DISCOUNT},OF-2001,10",
        f"2002,teacher,{EXPIRES},,OF-2002,",
        "# a comment line",
        f"2003,disabled,{EXPIRES},,hex:0102030405060708,0",
    ])
    result = run("card", "issue", "--reader", r.url, "--keys", str(store), "--csv", str(batch),
                 "--emulator-control", r.control_path, "--card-wait", "3", "--json")
    assert result.exit_code == 0, result.output
    issued = json.loads(result.stdout)
    assert [i["card_number"] for i in issued] == [2001, 2002, 2003]
    assert "issuing" in result.stderr  # the progress bar's label
    keys = FileKeyStore.open(store)
    snaps = [read_back(c, keys) for c in cards]
    assert [s.identity.card_number for s in snaps] == [2001, 2002, 2003]
    assert [s.balance for s in snaps] == [1000, 0, 0]
    assert snaps[2].identity.holder_ref == bytes(range(1, 9))
    assert len({c.uid for c in cards}) == 3


def test_batch_with_a_bad_row_touches_no_card(rig, store, tmp_path):
    cards = [blank(20 + i) for i in range(2)]
    r = rig(*cards)
    before = [bytes(c.memory) for c in cards]
    batch = write_csv(tmp_path / "bad.csv", [f"3001,student,{EXPIRES},,OF-1,5",
                                             "3002,student,not-a-date,,OF-2,5"])
    result = run("card", "issue", "--reader", r.url, "--keys", str(store), "--csv", str(batch),
                 "--emulator-control", r.control_path)
    assert result.exit_code == 1
    assert "line 3" in result.stderr and "not a date" in result.stderr
    assert [bytes(c.memory) for c in cards] == before


def test_read_csv_refuses_duplicates_and_unknown_columns(tmp_path):
    dup = write_csv(tmp_path / "dup.csv", [f"1,full,{EXPIRES},,A,1", f"1,full,{EXPIRES},,B,1"])
    with pytest.raises(Exception, match="appears twice"):
        read_csv(dup)
    odd = tmp_path / "odd.csv"
    odd.write_text("card_number,type,expires,holder,name\n1,full,2030-01-01,A,Ali\n")
    with pytest.raises(Exception, match="unknown name"):
        read_csv(odd)


# -- inspect finds what is wrong --------------------------------------------------------------


def _issued(rig, store, seed: int, balance: str = "20") -> Rig:
    r = rig(blank(seed))
    assert run(*issue_args(r, store, 500 + seed, "--type", "full", "--balance",
                           balance)).exit_code == 0
    return r


def test_inspect_reports_a_forged_balance(rig, store):
    r = _issued(rig, store, 30)
    card0 = r.cards[0]

    def forge() -> None:  # a cloner who cracked the keys writes 500 TL into both value blocks
        for block in (cl.BLOCK_PURSE, cl.BLOCK_BACKUP):
            card0.memory[16 * block:16 * block + 16] = layout.encode_value_block(50_000, 8)

    r.call(forge)
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["verdict"]["state"] == "forged"
    checks = {c["check"]: c["ok"] for c in report["application"]["purse"]["checks"]}
    assert checks["purse value block (8)"] and checks["purse record MAC (10)"]
    assert not checks["purse and backup agree with the record"]
    assert "fails inspection" in result.stderr


def test_inspect_reports_a_broken_value_block_and_a_rewritten_trailer(rig, store):
    r = _issued(rig, store, 31)
    card0 = r.cards[0]
    keys = FileKeyStore.open(store)

    def damage() -> None:
        card0.memory[16 * cl.BLOCK_BACKUP + 4] ^= 0x01  # one cell of the inverted copy
        # sector 1 re-keyed with transport-like access bits (keys kept)
        trailer = layout.SectorTrailer(keys.classic_key(card0.uid, 1, "A"),
                                       layout.TRANSPORT_ACCESS, 0x69,
                                       keys.classic_key(card0.uid, 1, "B"))
        card0.memory[16 * 7:16 * 8] = trailer.to_bytes()

    r.call(damage)
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store))
    assert result.exit_code == 1
    assert "BAD backup value block (9)" in result.stdout
    assert "BAD access as issued" in result.stdout


def test_inspect_a_blank_card(rig, store):
    r = rig(blank(32))
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["blank"] and report["verdict"]["state"] == "blank"
    assert all(s["readable"] for s in report["sectors"])


def test_inspect_shows_the_trip_log(rig, store, tmp_path):
    r = _issued(rig, store, 33, balance="30")
    keys = FileKeyStore.open(store)
    validator, db = _validator(tmp_path, keys)
    with db:
        out = validator.tap(_field_access(r.cards[0]))
    assert out.accepted
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--json")
    assert result.exit_code == 0, result.output
    trips = json.loads(result.stdout)["application"]["trips"]
    assert len(trips) == 1 and trips[0]["state"] == "committed"
    assert trips[0]["counter"] == 1 and trips[0]["purse_delta"] == -out.fare
    assert trips[0]["line"] == 42 and trips[0]["validator"] == 11


# -- block ------------------------------------------------------------------------------------


def test_block_checks_the_number_then_blocks_for_good(rig, store, tmp_path):
    r = _issued(rig, store, 40)
    number = 540
    result = run("card", "block", "--reader", r.url, "--keys", str(store), "--number", "999")
    assert result.exit_code == 1 and "is card 540, not 999" in result.stderr
    keys = FileKeyStore.open(store)
    assert not read_back(r.cards[0], keys).blocked

    result = run("card", "block", "--reader", r.url, "--keys", str(store), "--number",
                 str(number))
    assert result.exit_code == 0 and f"blocked card {number}" in result.stdout
    assert read_back(r.cards[0], keys).blocked
    validator, db = _validator(tmp_path, keys)
    with db:
        out = validator.tap(_field_access(r.cards[0]))
    assert not out.accepted and out.fare == 0
    again = run("card", "block", "--reader", r.url, "--keys", str(store))
    assert again.exit_code == 0 and "blocked already" in again.stdout


# -- key rotation -----------------------------------------------------------------------------


def _validator(tmp_path: Path, keys) -> tuple[Validator, DeviceDatabase]:
    config = ValidatorConfig("bus-42-v1", 11, 42, 42, "merkez")
    db = DeviceDatabase.open(tmp_path / f"v{time.monotonic_ns()}.db", device_id="bus-42-v1",
                             journal_key=keys)
    saved: list[int] = []
    clock = GuardedClock(lambda: saved[-1] if saved else None, saved.append)
    source = FieldCardSource(Field([]))
    return Validator(config, source, db, keys, tariffs.load("konya-2025"), RecordingUi(),
                     clock), db


def _field_access(vcard: VirtualCard) -> ClassicReader:
    air = Field([vcard])
    air.reset()
    vcard.place()
    selected = select_card(air.transceive)
    rng = random.Random(8)
    return ClassicReader(air.transceive, selected.uid, nonce=lambda: rng.getrandbits(32))


@pytest.fixture
def rotated(rig, store):
    """Card 1 issued under key version 1, then ``afc keys rotate``, card 2 under version 2."""
    old, new = blank(50), blank(51)
    r = rig(old, new)
    r.only(1)
    assert run(*issue_args(r, store, 7001, "--type", "full", "--balance", "50")).exit_code == 0
    rotated = CliRunner().invoke(afc_main, ["keys", "rotate", "classic-sector", "purse-mac",
                                            "--store", str(store)])
    assert rotated.exit_code == 0, rotated.output
    assert "to version 2" in rotated.stdout
    r.only(2)
    assert run(*issue_args(r, store, 7002, "--type", "full", "--balance", "50")).exit_code == 0
    return r, old, new


def test_cards_carry_their_key_version_and_both_stay_readable_after_rotation(rotated, store):
    r, old, new = rotated
    keys = FileKeyStore.open(store)
    assert card_key_versions(keys) == [2, 1]
    assert read_back(old, keys, version=1).identity.key_version == 1
    assert read_back(new, keys).identity.key_version == 2
    # the new keys really are new: the old card does not open with them
    with pytest.raises(AuthenticationError):
        read_back(old, keys)
    for number, expect in ((1, (7001, 1)), (2, (7002, 2))):
        r.only(number)
        result = run("card", "inspect", "--reader", r.url, "--keys", str(store), "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert (report["application"]["identity"]["card_number"],
                report["key_version"]) == expect
        assert report["verdict"]["state"] == "consistent"


FULL_FARE = tariffs.load("konya-2025").leg_fare("merkez", "full")


def test_a_validator_reads_cards_of_both_key_versions_after_rotation(rotated, store, tmp_path):
    _, old, new = rotated
    keys = FileKeyStore.open(store)
    validator, db = _validator(tmp_path, keys)
    with db:
        out = validator.tap(_field_access(new))
        assert out.accepted and out.key_version is None, out
        out = validator.tap(_field_access(old))
        assert out.accepted and out.key_version == 1, out
        assert out.balance == 5000 - FULL_FARE
        validator.finish_tap()  # the loop's next idle moment: the ride's done record
        assert db.journal.verify() == [] and db.journal.open_intents() == []
    # the old card was charged under its own version and stays there: never re-keyed mid-tap
    assert read_back(old, keys, version=1).balance == 5000 - FULL_FARE
    with pytest.raises(AuthenticationError):
        read_back(old, keys)
    assert read_back(new, keys).balance == 5000 - FULL_FARE


@pytest.mark.parametrize("mode", ["chip", "transparent"])
def test_a_validator_on_the_pn532_reads_both_key_versions_after_rotation(rotated, store,
                                                                          tmp_path, mode):
    """The same through the real driver and the emulator: a failed authentication silences
    the card, and the validator activates it again the way each reader mode needs (the
    chip's RF field cycled and the card listed again; or WUPA/SELECT over the raw frames)."""
    from firmware.apps.cards import Pn532CardSource
    from firmware.reader.driver import Pn532

    r, old, new = rotated
    keys = FileKeyStore.open(store)
    config = ValidatorConfig("bus-42-v1", 11, 42, 42, "merkez")
    saved: list[int] = []
    clock = GuardedClock(lambda: saved[-1] if saved else None, saved.append)
    with Pn532.open(r.url, response_timeout=2.0) as pn, \
            DeviceDatabase.open(tmp_path / "v.db", device_id="bus-42-v1",
                                journal_key=keys) as db:
        pn.set_max_retries(passive=1)
        validator = Validator(config, Pn532CardSource(pn, mode), db, keys,
                              tariffs.load("konya-2025"), RecordingUi(), clock)
        for number, version in ((1, 1), (2, None)):
            r.only(number)
            out = validator.poll()
            assert out is not None and out.accepted, (mode, number, out)
            assert out.key_version == version and out.balance == 5000 - FULL_FARE
    assert r.call(lambda: read_back(old, keys, version=1)).balance == 5000 - FULL_FARE
    assert r.call(lambda: read_back(new, keys)).balance == 5000 - FULL_FARE


def test_a_pinned_store_is_what_a_card_of_an_older_version_needs():
    base = MemoryKeyStore({"classic-sector": {1: bytes(16), 2: bytes(range(16))},
                           "purse-mac": {1: bytes(16), 2: bytes(range(16))},
                           "journal-mac": bytes(16)})
    pinned = PinnedKeyStore(base, 1)
    uid = bytes.fromhex("01020304")
    assert pinned.current_version("classic-sector") == 1
    assert pinned.classic_key(uid, 1, "A") == base.classic_key(uid, 1, "A", key_version=1)
    assert pinned.classic_key(uid, 1, "A") != base.classic_key(uid, 1, "A")
    assert pinned.current_version("journal-mac") == 1
    with pytest.raises(Exception, match="no version 3"):
        PinnedKeyStore(base, 3)
    assert "v1" in repr(pinned) and bytes(range(16)).hex() not in repr(pinned)


def test_inspect_flags_a_manufacturer_block_that_does_not_match_the_uid(rig, store):
    """A 'magic' clone has a writable block 0: one written by hand often carries a UID or BCC
    that is not the one the card answers anticollision with."""
    r = _issued(rig, store, 34)
    card0 = r.cards[0]
    r.call(lambda: card0.memory.__setitem__(4, card0.memory[4] ^ 0xFF))  # the BCC
    result = run("card", "inspect", "--reader", r.url, "--keys", str(store))
    assert result.exit_code == 1
    assert "BAD manufacturer block" in result.stdout and "magic" in result.stdout
