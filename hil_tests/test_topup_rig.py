"""`afc topup` as a process, on `afc sim reader` over a pty: the bayi terminal as deployed."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware.apps.topup import CreditAllowance
from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, masked_uid, select_card
from firmware.core.card_layout import Identity
from firmware.core.keys import FileKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import PRODUCT_TOPUP, Purse, purse_delta
from firmware.stores.database import DeviceDatabase
from simulators.cards import VirtualCard
from simulators.rig import ReaderEmulatorProcess

DEALER = "bayi-017"


def issue_card(path, keys, *, balance: int, now: int) -> tuple[int, bytes]:
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(17))
    field = Field([card])
    selected = select_card(field.transceive)
    number = 8_017_001
    Purse(ClassicReader(field.transceive, selected.uid), keys, key_type="B").issue(
        Identity(number, 1, 1, now - 86400, now + 86400 * 3650, None, 1, b"HILTOPUP"),
        balance=balance,
    )
    card.save(path)
    return number, card.uid


def read_card(path, keys):
    card = VirtualCard.from_file(path)
    field = Field([card])
    selected = select_card(field.transceive)
    return Purse(ClassicReader(field.transceive, selected.uid), keys, key_type="A").read()


def test_afc_topup_loads_a_card_through_the_emulated_reader(tmp_path):
    now = int(time.time())  # `afc topup` runs on the wall clock
    keys = FileKeyStore.generate(tmp_path / "keys.toml",
                                 names=("classic-sector", "purse-mac", "journal-mac"))
    card_file = tmp_path / "card.json"
    number, uid = issue_card(card_file, keys, balance=10_000, now=now)

    center = Ed25519PrivateKey.generate()
    unsigned = CreditAllowance(DEALER, "A-HIL-1", 100_000, now - 3600, now + 86400, b"")
    allowance = replace(unsigned, signature=center.sign(unsigned.signed_bytes()))
    (tmp_path / "allowance.json").write_text(allowance.to_json())
    center_hex = center.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    config = tmp_path / "topup.toml"
    config.write_text(
        f'[device]\nid = "{DEALER}"\nterminal_id = 9017\n'
        f'[dealer]\nallowance = "{tmp_path / "allowance.json"}"\n'
        f'center_public_key = "{center_hex}"\ndaily_limit = 500\n'
        f'[keys]\nstore = "{tmp_path / "keys.toml"}"\n'
    )
    db_path = tmp_path / "bayi.db"
    with ReaderEmulatorProcess(tmp_path / "pn532", [str(card_file)]) as emulator:
        result = subprocess.run(
            [sys.executable, "-m", "tools.cli", "topup", "--reader", str(emulator.port),
             "--db", str(db_path), "--config", str(config), "--card-wait", "10"],
            input="credit\nload inf\nload 25\ncredit\nquit\n",
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "credit left: 1000,00 TL" in out and "credit left: 975,00 TL" in out
    assert "error:" in result.stderr  # "load inf" is refused, and the terminal carries on
    assert f"Kart / Card  {number}  ({masked_uid(uid)})" in out
    assert "Yükleme / Top-up  25,00 TL" in out and "Bakiye / Balance  125,00 TL" in out
    assert uid.hex().upper() not in out.upper()

    # the emulator saved the card when it stopped: exactly one load of 25 TL, by key A
    snap = read_card(card_file, keys)
    assert (snap.balance, snap.counter) == (12_500, 1)
    assert purse_delta(snap.newest_trip) == 2_500 and snap.newest_trip.validator_id == 9017
    with DeviceDatabase.open(db_path, device_id=DEALER, journal_key=keys) as db:
        records = db.journal.records(0, 10)
        assert [(r.phase, r.card_number, r.product, r.balance_after) for r in records] == [
            ("intent", number, PRODUCT_TOPUP, 12_500), ("done", number, PRODUCT_TOPUP, 12_500)
        ]
        assert f"İşlem no / Ref  {records[0].seq}" in out
        assert db.journal.verify() == [] and db.journal.open_intents() == []
