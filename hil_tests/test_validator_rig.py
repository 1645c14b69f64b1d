"""`afc validator` as a process, on `afc sim reader` over a pty: the device as deployed."""

from __future__ import annotations

import random
import subprocess
import sys

from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import Identity
from firmware.core.keys import FileKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import Purse
from firmware.stores.database import DeviceDatabase
from simulators.cards import VirtualCard
from simulators.rig import ReaderEmulatorProcess

NOW = 1_767_258_000


def issue_card(path, keys, *, balance: int, seed: int) -> int:
    card = VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(seed))
    field = Field([card])
    selected = select_card(field.transceive)
    purse = Purse(ClassicReader(field.transceive, selected.uid), keys, key_type="B")
    number = 7_000_000 + seed
    purse.issue(Identity(number, 1, 1, NOW - 86400, NOW + 86400 * 3650, None, 1, b"HILTEST0"),
                balance=balance)
    card.save(path)
    return number


def read_balance(path, keys) -> tuple[int, int]:
    card = VirtualCard.from_file(path)
    field = Field([card])
    selected = select_card(field.transceive)
    snap = Purse(ClassicReader(field.transceive, selected.uid), keys).read()
    return snap.balance, snap.counter


def test_afc_validator_charges_a_card_through_the_emulated_reader(tmp_path):
    keys = FileKeyStore.generate(tmp_path / "keys.toml",
                                 names=("classic-sector", "purse-mac", "journal-mac"))
    card_file = tmp_path / "card.json"
    number = issue_card(card_file, keys, balance=10_000, seed=1)
    config = tmp_path / "validator.toml"
    config.write_text(
        '[device]\nid = "bus-42-v1"\nvalidator_id = 421\nvehicle_id = 42\nline_id = 41\n'
        'line_group = "merkez"\n[reader]\nmode = "transparent"\n'
        f'[keys]\nstore = "{tmp_path / "keys.toml"}"\n'
    )
    db_path = tmp_path / "v.db"
    with ReaderEmulatorProcess(tmp_path / "pn532", [str(card_file)]) as emulator:
        result = subprocess.run(
            [sys.executable, "-m", "tools.cli", "validator", "--reader", str(emulator.port),
             "--db", str(db_path), "--config", str(config), "--max-taps", "1"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "22,50 TL" in result.stdout and "77,50 TL" in result.stdout
    # the emulator saved the card back on exit: the purse shows exactly one fare
    assert read_balance(card_file, keys) == (10_000 - 2250, 1)
    with DeviceDatabase.open(db_path, device_id="bus-42-v1", journal_key=keys) as db:
        records = db.journal.records(0, 10)
        assert [(r.phase, r.card_number, r.balance_after) for r in records] == [
            ("intent", number, 7750), ("done", number, 7750)
        ]
        assert db.journal.verify() == []
        assert db.journal.open_intents() == []
