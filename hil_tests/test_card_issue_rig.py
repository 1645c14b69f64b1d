"""The issuing office as deployed: ``afc card`` processes on ``afc sim reader`` over a pty.

Blank cards are card files given to the emulator process; a batch file is issued with the
emulator's control socket placing each card in turn; every card is inspected by a second
process; the emulator saves the cards when it stops, and they are then read back in this
process with a validator's key A. Finally ``afc validator`` (a process too) charges one of
the office's cards: what the office issues, a bus accepts. Nothing any of these processes
prints or logs (the validator at debug level) holds a master, sector or MAC key.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import date, timedelta

from firmware.core import classic_layout as layout
from firmware.core.anticollision import Field, select_card
from firmware.core.card_layout import MAC_AID, MAC_SYSTEM
from firmware.core.fares import CardType
from firmware.core.keys import FileKeyStore
from firmware.core.mifare import ClassicReader
from firmware.core.purse import Purse
from firmware.stores.database import DeviceDatabase
from simulators.cards import VirtualCard
from simulators.rig import ReaderEmulatorProcess

EXPIRES = (date.today() + timedelta(days=4 * 365)).isoformat()
DISCOUNT = (date.today() + timedelta(days=300)).isoformat()
TIMEOUT = 60


def card_cmd(*args: str) -> subprocess.CompletedProcess:
    # `python -m tools.card_cmd` until tools/cli.py registers the group as `afc card`
    return subprocess.run([sys.executable, "-m", "tools.card_cmd", "card", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def read_card(path, keys):
    vcard = VirtualCard.from_file(path)
    air = Field([vcard])
    selected = select_card(air.transceive)
    return Purse(ClassicReader(air.transceive, selected.uid), keys).read()


def key_material(keys_path, keys, uids) -> list[str]:
    """Every secret of this run as hex: master keys, per-card sector keys and MAC keys."""
    secrets = [line.split('"')[1] for line in keys_path.read_text().splitlines()
               if line[:1].isdigit()]
    for uid in uids:
        secrets += [keys.classic_key(uid, s, kt).hex() for s in range(4) for kt in "AB"]
        secrets += [keys.diversify("purse-mac", uid, MAC_AID, system).hex()
                    for system in MAC_SYSTEM.values()]
    return [s.upper() for s in secrets]


def test_office_issues_a_batch_inspects_it_and_a_validator_accepts_a_card(tmp_path):
    keys_path = tmp_path / "keys.toml"
    keys = FileKeyStore.generate(keys_path)
    files = []
    for i in range(3):
        path = tmp_path / f"blank-{i}.json"
        VirtualCard.new(layout.CardType.CLASSIC_1K, rng=random.Random(100 + i)).save(path)
        files.append(path)
    batch = tmp_path / "batch.csv"
    batch.write_text(
        "card_number,type,expires,discount_until,holder,balance\n"
        f"9001,student,{EXPIRES},{DISCOUNT},OF-9001,100\n"
        f"9002,teacher,{EXPIRES},,OF-9002,25.50\n"
        f"9003,full,{EXPIRES},,OF-9003,0\n"
    )
    control = str(tmp_path / "pn532.ctl")
    logs: list[str] = []  # every line any process of this run wrote
    with ReaderEmulatorProcess(tmp_path / "pn532", [str(p) for p in files],
                               control=control) as emulator:
        result = card_cmd("issue", "--reader", emulator.url, "--keys", str(keys_path),
                          "--csv", str(batch), "--emulator-control", control,
                          "--card-wait", "10")
        assert result.returncode == 0, result.stderr
        logs += [result.stdout, result.stderr]
        assert result.stdout.count("issued card") == 3
        assert "issued card 9002 (teacher" in result.stdout

        reports = []
        for number in (1, 2, 3):
            emulator.control("remove all")
            emulator.control(f"place {number}")
            inspected = card_cmd("inspect", "--reader", emulator.url, "--keys", str(keys_path),
                                 "--json", "--card-wait", "10")
            assert inspected.returncode == 0, inspected.stderr
            logs += [inspected.stdout, inspected.stderr]
            reports.append(json.loads(inspected.stdout))
        assert [r["application"]["identity"]["card_number"] for r in reports] == [
            9001, 9002, 9003]
        assert [r["application"]["purse"]["record"]["balance"] for r in reports] == [
            10_000, 2_550, 0]
        assert all(r["verdict"]["state"] == "consistent" for r in reports)

        emulator.control("remove all")
        emulator.control("place 2")
        blocked = card_cmd("block", "--reader", emulator.url, "--keys", str(keys_path),
                           "--number", "9002", "--card-wait", "10")
        assert blocked.returncode == 0, blocked.stderr
        logs += [blocked.stdout, blocked.stderr]
    logs.append(emulator.stderr_text())
    # the emulator saved the cards on exit
    snaps = [read_card(p, keys) for p in files]
    assert [s.identity.card_number for s in snaps] == [9001, 9002, 9003]
    assert snaps[0].identity.card_type == CardType.STUDENT.code
    assert [s.blocked for s in snaps] == [False, True, False]

    config = tmp_path / "validator.toml"
    config.write_text(
        '[device]\nid = "bus-9-v1"\nvalidator_id = 91\nvehicle_id = 9\nline_id = 41\n'
        'line_group = "merkez"\n[reader]\nmode = "transparent"\n'
        f'[keys]\nstore = "{keys_path}"\n'
    )
    with ReaderEmulatorProcess(tmp_path / "bus", [str(files[0])]) as emulator:
        ride = subprocess.run(
            [sys.executable, "-m", "tools.cli", "validator", "--reader", str(emulator.port),
             "--db", str(tmp_path / "v.db"), "--config", str(config), "--max-taps", "1",
             "--verbose"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert ride.returncode == 0, ride.stderr
        logs += [ride.stdout, ride.stderr]
    logs.append(emulator.stderr_text())
    after = read_card(files[0], keys)
    assert after.counter == 1 and 0 < 10_000 - after.balance < 10_000
    with DeviceDatabase.open(tmp_path / "v.db", device_id="bus-9-v1", journal_key=keys) as db:
        records = db.journal.records(0, 10)
        assert [(r.phase, r.card_number) for r in records] == [("intent", 9001),
                                                               ("done", 9001)]
        assert records[1].balance_after == after.balance

    # no secret in anything any process printed or logged (the validator at debug level)
    everything = "\n".join(logs).upper()
    assert "AFC SIM READER: INFO" in everything  # the logs were captured
    for secret in key_material(keys_path, keys, [s.uid for s in snaps]):
        assert secret not in everything
