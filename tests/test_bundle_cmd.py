"""``afc bundle build``, ``sign`` (refusing invalid tables) and ``diff``, run as an operator
runs them (click's CliRunner on the real ``afc`` entry point) against real files, real keys
and real device databases.

What a built bundle is worth is checked on the device side, independently of the command's
own report: the signed payload goes through the agent's ``ConfigSync`` (decode against the
pinned key, apply) into a real SQLite ``DeviceDatabase``, and the result is read back from the
stores (blacklist rows, the fare table the validator loads, pending actions, the allowance
the top-up terminal reads).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config_sync import APPLIED, ConfigSync, SyncResult
from edge_agent.keys import generate_key_file, public_hex
from edge_agent.protocol import cfg_topic, decode_bundle
from edge_agent.settings import AgentSettings
from firmware.apps.topup import CreditAllowance
from firmware.core.fares import FareTable
from firmware.stores.database import DeviceDatabase
from tools.bundle_cmd import PROGRESS_MIN_BYTES
from tools.cli import main as afc

ROOT = Path(__file__).resolve().parents[1]
TARIFF = ROOT / "firmware" / "core" / "tariffs" / "konya-2025.toml"
DEV = "KNY-BUS-0042-V1"
DEALER = "bayi-017"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    center = folder / "center.key"
    other = folder / "other.key"
    return {"center": center, "public": public_hex(generate_key_file(center)),
            "other": other, "other_public": public_hex(generate_key_file(other))}


def run(*args: str):
    """``afc ARGS`` as a shell runs it: exit status, stdout, stderr apart."""
    return CliRunner().invoke(afc, [str(a) for a in args], catch_exceptions=False)


def write_csv(path: Path, rows, header=("card_number", "reason", "uid")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def apply(db: DeviceDatabase, payload: bytes, public: str) -> SyncResult:
    """What a device's agent does with a retained bundle: decode, check, apply."""
    from edge_agent.keys import load_public_key

    key = load_public_key(public)
    head = decode_bundle(payload, key, now_ms=time.time_ns() // 1_000_000)
    sync = ConfigSync(db.device_id, key, AgentSettings())
    got = sync.decode(cfg_topic(head.kind, head.target), payload, time.time_ns() // 1_000_000)
    assert not isinstance(got, SyncResult), got
    return sync.apply(db, got)


def device_list(db_path: Path) -> set[tuple[int, int, bytes | None]]:
    """The blacklist in force, read straight from the device file (the view lookups use)."""
    with sqlite3.connect(db_path) as raw:
        return {(c, r, u) for c, r, u in raw.execute(
            "SELECT card_number, reason, uid FROM blacklist")}


@pytest.fixture
def device(tmp_path):
    path = tmp_path / "device.db"
    db = DeviceDatabase.open(path, device_id=DEV)
    yield db, path
    db.close()


# --------------------------------------------------------------------------------------------
# build + sign, accepted by a device


def test_full_blacklist_then_delta_from_two_csvs_gives_exactly_the_new_list(
        tmp_path, keys, device):
    db, db_path = device
    old = {(100, 1, bytes.fromhex("01020304")), (200, 2, None), (300, 1, None),
           (400, 5, bytes.fromhex("0a0b0c0d0e0f10"))}
    new = {(100, 3, bytes.fromhex("01020304")),           # reason changed
           (300, 1, bytes.fromhex("aabbccdd")),           # UID added
           (400, 5, bytes.fromhex("0a0b0c0d0e0f10")),     # unchanged
           (500, 1, None), (2**64 - 1, 7, None)}          # added (the top of u64 too)
    # 200 removed

    def rows(entries):  # unsorted on purpose: build sorts
        return [(c, r, "" if u is None else u.hex()) for c, r, u in sorted(entries,
                                                                           reverse=True)]

    old_csv = write_csv(tmp_path / "old.csv", rows(old))
    new_csv = write_csv(tmp_path / "new.csv", rows(new))
    full = tmp_path / "bl-41.bundle"
    res = run("bundle", "build", "blacklist", "--from", old_csv, "--sign", "--key",
              keys["center"], "--version", 41, "--out", full, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["entries"], summary["version"], summary["signed"]) == (4, 41, True)
    assert apply(db, full.read_bytes(), keys["public"]).outcome == APPLIED
    assert db.blacklist.version == 41 and device_list(db_path) == old

    # The delta from the signed old list (its version is the base) and the new CSV.
    delta = tmp_path / "bl-42.bundle"
    res = run("bundle", "build", "blacklist-delta", "--old", full, "--new", new_csv, "--sign",
              "--key", keys["center"], "--version", 42, "--out", delta, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["base"], summary["add"], summary["remove"]) == (41, 4, 1)
    b = decode_bundle(delta.read_bytes(), db_public(keys), now_ms=0)
    assert b.body["remove"] == [200]
    assert apply(db, delta.read_bytes(), keys["public"]).outcome == APPLIED
    assert db.blacklist.version == 42 and db.blacklist.count == len(new)
    assert device_list(db_path) == {(c if c < 2**63 else c - 2**64, r, u) for c, r, u in new}
    assert db.blacklist.lookup(2**64 - 1).reason == 7 and db.blacklist.lookup(200) is None


def db_public(keys):
    from edge_agent.keys import load_public_key

    return load_public_key(keys["public"])


def test_unsigned_delta_then_sign_keeps_the_base(tmp_path, keys, device):
    db, db_path = device
    old_csv = write_csv(tmp_path / "old.csv", [(1, 1, ""), (2, 1, "")])
    new_csv = write_csv(tmp_path / "new.csv", [(2, 1, ""), (3, 1, "")])
    res = run("bundle", "build", "blacklist", "--from", old_csv, "--sign", "--key",
              keys["center"], "--version", 7, "--out", tmp_path / "full.bundle")
    assert res.exit_code == 0 and "signed version 7" in res.stdout
    body = tmp_path / "delta.json"
    res = run("bundle", "build", "blacklist-delta", "--old", old_csv, "--new", new_csv,
              "--base", 7, "--out", body)
    assert res.exit_code == 0, res.stderr
    assert json.loads(body.read_text()) == {"add": [[3, 1, None]], "remove": [1], "base": 7}
    signed = tmp_path / "delta.bundle"
    res = run("bundle", "sign", "--kind", "blacklist-delta", "--version", 8, "--key",
              keys["center"], "--in", body, "--out", signed)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["base"] == 7
    assert apply(db, (tmp_path / "full.bundle").read_bytes(), keys["public"]).outcome == APPLIED
    assert apply(db, signed.read_bytes(), keys["public"]).outcome == APPLIED
    assert device_list(db_path) == {(2, 1, None), (3, 1, None)}


def test_fare_table_from_toml_and_from_json_load_identically_on_the_device(
        tmp_path, keys, device):
    import tomllib

    db, _ = device
    data = tomllib.loads(TARIFF.read_text(encoding="utf-8"))
    source = tmp_path / "tariff.json"
    source.write_text(json.dumps(data, ensure_ascii=False))
    out = tmp_path / "fares.bundle"
    res = run("bundle", "build", "fares", "--from", source, "--sign", "--key", keys["center"],
              "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["version"] == data["version"]  # the tariff's own version
    assert apply(db, out.read_bytes(), keys["public"]).outcome == APPLIED
    loaded = db.config.fare_table()  # what the validator loads
    assert loaded == FareTable.from_toml(TARIFF)
    assert db.config.version("fares") == data["version"]


def test_actions_and_credit_are_accepted_by_the_real_loaders(tmp_path, keys):
    actions = write_csv(tmp_path / "actions.csv", [
        ("A-1", 100, "topup", "2030-01-01", 5000, "", 1),
        ("A-2", 200, "pass", "2030-01-01T12:00+03:00", "", 1, ""),
    ], header=("action_id", "card_number", "kind", "valid_until", "amount", "product_id",
               "card_seq"))
    out = tmp_path / "actions.bundle"
    res = run("bundle", "build", "actions", "--from", actions, "--sign", "--key",
              keys["center"], "--version", 3, "--out", out)
    assert res.exit_code == 0, res.stderr
    with DeviceDatabase.open(tmp_path / "v.db", device_id=DEV) as db:
        assert apply(db, out.read_bytes(), keys["public"]).outcome == APPLIED
        (a1,) = db.actions.pending_for(100)
        assert (a1.kind, a1.amount, a1.card_seq) == ("topup", 5000, 1)
        (a2,) = db.actions.pending_for(200)
        assert (a2.product_id, a2.valid_until) == (1, 1893488400000)  # 2030-01-01 09:00 UTC

    out = tmp_path / "credit.bundle"
    res = run("bundle", "build", "credit", "--dealer", DEALER, "--amount", "20000,50",
              "--valid-from", "2025-09-01", "--valid-until", "2025-10-01", "--key",
              keys["center"], "--sign", "--version", 5, "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["target"], summary["amount"]) == (DEALER, 2_000_050)
    with DeviceDatabase.open(tmp_path / "b.db", device_id=DEALER) as db:
        assert apply(db, out.read_bytes(), keys["public"]).outcome == APPLIED
        entry = db.config.get("credit")
        allowance = CreditAllowance.from_json(entry.body.decode())  # as TopupTerminal does
        allowance.verify(db_public(keys))
        assert (allowance.dealer_id, allowance.amount) == (DEALER, 2_000_050)
        assert allowance.valid_until - allowance.valid_from == 30 * 86400


def test_credit_csv_builds_one_bundle_per_dealer(tmp_path, keys):
    dealers = write_csv(tmp_path / "dealers.csv", [
        ("bayi-1", "", "100", "2025-09-01", "2025-10-01"),
        ("bayi-2", "alw-x", "250.25", "1756684800", "1759276800"),
    ], header=("dealer_id", "allowance_id", "amount", "valid_from", "valid_until"))
    out = tmp_path / "credit"
    res = run("bundle", "build", "credit", "--from", dealers, "--key", keys["center"],
              "--sign", "--version", 9, "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert [r["target"] for r in json.loads(res.stdout)] == ["bayi-1", "bayi-2"]
    for dealer, amount in (("bayi-1", 10_000), ("bayi-2", 25_025)):
        b = decode_bundle((out / f"credit-{dealer}.bundle").read_bytes(), db_public(keys),
                          now_ms=0, device_id=dealer)
        assert (b.target, b.body["allowance"]["amount"]) == (dealer, amount)


def test_large_blacklist_shows_progress_and_sorts(tmp_path, keys):
    n = 60_000
    rows = [(10**9 - i * 7, i % 5, f"{i:08x}") for i in range(n)]  # descending
    src = write_csv(tmp_path / "big.csv", rows)
    assert src.stat().st_size >= PROGRESS_MIN_BYTES
    out = tmp_path / "big.json"
    res = run("bundle", "build", "blacklist", "--from", src, "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert "reading big.csv" in res.stderr
    cards = [e[0] for e in json.loads(out.read_text())["entries"]]
    assert len(cards) == n and cards == sorted(cards)


# --------------------------------------------------------------------------------------------
# refusals: exit 2, one line naming what to fix, nothing written


def _tariff(tmp_path: Path, edit) -> Path:
    text = TARIFF.read_text(encoding="utf-8")
    path = tmp_path / "tariff.toml"
    path.write_text(edit(text), encoding="utf-8")
    return path


_BINIS = "amounts = { full = 2250, student = 900, teacher = 900 }"
_LEG_RULE = '[[fare_leg_rules]]\nnetwork_id = "merkez"\nfare_product_id = "binis"\n'

FARE_CASES = [
    ("negative price", lambda t: t.replace(_BINIS, _BINIS.replace("2250", "-2250")),
     "fare_products.binis.amounts.full: must not be negative"),
    ("float price", lambda t: t.replace(_BINIS, _BINIS.replace("2250", "22.5")),
     "fare_products.binis.amounts.full: money is an integer number of kuruş"),
    ("unknown product ref", lambda t: t.replace('fare_product_id = "binis"',
                                                'fare_product_id = "binisx"'),
     "fare_leg_rules[0].fare_product_id: unknown fare product 'binisx'"),
    ("overlapping leg rules", lambda t: t + "\n" + _LEG_RULE,
     "fare_leg_rules[1]: overlaps fare_leg_rules[0]"),
    ("overlapping transfer rules", lambda t: t + '\n[[fare_transfer_rules]]\n'
     'to_leg_group_id = "merkez"\nduration_limit = 60\nduration_limit_type = "previous_leg"\n',
     "fare_transfer_rules[1]: overlaps fare_transfer_rules[0]"),
    ("student dearer than full", lambda t: t.replace(_BINIS, _BINIS.replace("900,", "9000,")),
     "rider category 'student' pays 9000, more than the full fare 2250"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in FARE_CASES],
                         ids=[c[0] for c in FARE_CASES])
def test_invalid_fare_table_is_refused_before_signing(tmp_path, keys, edit, message):
    source = _tariff(tmp_path, edit)
    out = tmp_path / "fares.bundle"
    for args in (["bundle", "sign", "--kind", "fares", "--version", 9, "--in", source],
                 ["bundle", "build", "fares", "--from", source, "--sign", "--version", 9]):
        res = run(*args, "--key", keys["center"], "--out", out)
        assert res.exit_code == 2, res.output
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("afc: error: ")
        assert message in res.stderr and str(source) in res.stderr
        assert res.stdout == "" and not out.exists()


def _rows(*rows):
    return "card_number,reason,uid\n" + "".join(f"{r}\n" for r in rows)


ACTION_HEADER = "action_id,card_number,kind,valid_until,amount,product_id,card_seq\n"

# (kind, file name, content, extra args, expected fragment)
INVALID = [
    ("blacklist", "bl.csv", _rows("1,1,01020304", "2,70000,"), [],
     "bl.csv:3: reason code must be 0..65535, got 70000"),
    ("blacklist", "bl.csv", _rows("1,1,010203"), [], "bl.csv:2: a UID must be 4, 7 or 10 bytes"),
    ("blacklist", "bl.csv", _rows("-1,1,"), [], "bl.csv:2: card number out of range: -1"),
    ("blacklist", "bl.csv", _rows(str(2**64), ""), [], "bl.csv:2: card number out of range"),
    ("blacklist", "bl.csv", _rows("12x,1,"), [], "bl.csv:2: card_number and reason must be"),
    ("blacklist", "bl.csv", _rows("5,1,", "6,1,", "5,2,"), [],
     "bl.csv:4: card 5 is listed twice (also "),
    ("blacklist", "bl.json", json.dumps({"entries": [[1, 1, None], [2, 1, "zz"]]}), [],
     "bl.json: entry 2: UID 'zz' is not hex"),
    ("blacklist-delta", "d.json", json.dumps({"add": [], "remove": [1, -4], "base": 3}), [],
     "d.json: remove[1]: card number out of range: -4"),
    ("actions", "a.csv", ACTION_HEADER + "A1,100,topup,2030-01-01,500,,\n"
     "A2,101,topup,2030-01-01,,,\n", [], "a.csv:3: action 'A2': amount must be an integer in 1"),
    ("actions", "a.csv", ACTION_HEADER + "A1,100,pass,2030-01-01,500,1,\n", [],
     "a.csv:2: action 'A1': pass action 'A1' must not carry an amount"),
    ("actions", "a.csv", ACTION_HEADER + "A1,100,refund,2030-01-01,500,,\n", [],
     "a.csv:2: kind must be 'topup' or 'pass'"),
    ("actions", "a.json", json.dumps({"actions": [{"action_id": "A1", "card_number": 1,
                                                   "kind": "topup", "valid_until": 1,
                                                   "amount": 5, "colour": "red"}]}), [],
     "a.json: actions[0]: unknown action field 'colour'"),
    ("agent", "agent.toml", "telemetry_s = 30\n", [],
     "section(s) telemetry_s cannot be set remotely"),
    ("agent", "agent.toml", "[telemetry]\ninterval_s = -5\n", [], "telemetry"),
]


@pytest.mark.parametrize("kind,name,content,extra,message", INVALID,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID)])
def test_sign_refuses_every_invalid_table_with_one_line(tmp_path, keys, kind, name, content,
                                                         extra, message):
    source = tmp_path / name
    source.write_text(content)
    out = tmp_path / "out.bundle"
    out.write_bytes(b"previous")  # an existing output survives a refusal untouched
    version = ["--version", 9] + (["--base", 3] if kind == "blacklist-delta" else [])
    res = run("bundle", "sign", "--kind", kind, *version, "--key", keys["center"], "--in",
              source, "--out", out, *extra)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("afc: error: ") and res.stderr.count("\n") == 1
    assert message in res.stderr, res.stderr
    assert res.stdout == "" and out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    if kind != "blacklist-delta":  # build refuses it the same way (signed or not)
        res = run("bundle", "build", kind, "--from", source, "--out", tmp_path / "b.out")
        assert res.exit_code == 2 and message in res.stderr, res.stderr
        assert not (tmp_path / "b.out").exists()


def test_credit_refusals(tmp_path, keys):
    def build(*extra, key="center"):
        return run("bundle", "build", "credit", "--dealer", DEALER, "--amount", "100",
                   "--key", keys[key], "--out", tmp_path / "c.out", *extra)

    res = build("--valid-from", "2025-10-01", "--valid-until", "2025-09-01")
    assert res.exit_code == 2 and "valid_until after valid_from" in res.stderr
    res = build("--valid-until", "2030-01-01", "--target", "bayi-999", "--sign", "--version", 2)
    assert res.exit_code == 2 and "refuses another dealer's allowance" in res.stderr
    res = build("--valid-until", "next week")
    assert res.exit_code == 2 and "valid_until: 'next week' is neither" in res.stderr
    # every top-up record names its allowance (credit:<id>, 64 characters at most)
    res = build("--valid-until", "2030-01-01", "--allowance-id", "A" * 58)
    assert res.exit_code == 2 and "cannot be journaled" in res.stderr
    assert not (tmp_path / "c.out").exists()
    res = build("--valid-until", "2030-01-01", "--allowance-id", "A" * 57)
    assert res.exit_code == 0, res.stderr
    (tmp_path / "c.out").unlink()
    # An allowance signed by another key: no terminal of this center would take it.
    res = build("--valid-until", "2030-01-01", key="other")
    assert res.exit_code == 0, res.stderr
    res = run("bundle", "sign", "--kind", "credit", "--version", 3, "--key", keys["center"],
              "--in", tmp_path / "c.out", "--out", tmp_path / "c.bundle")
    assert res.exit_code == 2 and "is not signed by the center" in res.stderr
    assert not (tmp_path / "c.bundle").exists()


def test_option_mistakes_are_not_table_refusals(tmp_path, keys):
    """A missing --base is the caller's mistake (exit 1), a missing key file too."""
    body = tmp_path / "d.json"
    body.write_text(json.dumps({"add": [[5, 1, None]], "remove": []}))
    res = run("bundle", "sign", "--kind", "blacklist-delta", "--version", 8, "--key",
              keys["center"], "--in", body, "--out", tmp_path / "d.bundle")
    assert res.exit_code == 1 and "--base" in res.stderr
    res = run("bundle", "sign", "--kind", "fares", "--version", 8, "--key",
              tmp_path / "missing.key", "--in", TARIFF, "--out", tmp_path / "f.bundle")
    assert res.exit_code == 1 and res.stderr.startswith("afc: error: ")
    assert not (tmp_path / "d.bundle").exists() and not (tmp_path / "f.bundle").exists()


# --------------------------------------------------------------------------------------------
# diff


def _sign_fares(tmp_path, keys, name, text, version):
    src = tmp_path / f"{name}.toml"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / f"{name}.bundle"
    res = run("bundle", "build", "fares", "--from", src, "--sign", "--key", keys["center"],
              "--version", version, "--out", out)
    assert res.exit_code == 0, res.stderr
    return out


def test_diff_of_fare_tables(tmp_path, keys):
    base = TARIFF.read_text(encoding="utf-8")
    old = _sign_fares(tmp_path, keys, "old", base, 10)
    changed = base.replace(_BINIS, _BINIS.replace("2250", "2400")).replace(
        "stored_value_seconds = 60", "stored_value_seconds = 90")
    changed = changed.replace('[fare_products.aktarma]', '[fare_products.gece]\nname = "Gece"\n'
                              'kind = "leg"\nfare_media_id = "konyakart"\n'
                              'amounts = { full = 3000 }\n\n[fare_products.aktarma]')
    new = _sign_fares(tmp_path, keys, "new", changed, 11)

    res = run("bundle", "diff", old, new, "--center-public", keys["public"])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert "signature verified" in lines[0] and lines[2] == "version: 10 -> 11"
    assert "~ fare_products.binis: amounts.full 2250 -> 2400" in lines
    assert "~ anti_passback.anti_passback: stored_value_seconds 60 -> 90" in lines
    assert any(ln.startswith("+ fare_products.gece: ") for ln in lines)

    res = run("bundle", "diff", old, new, "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert d["same"] is False and d["header"] == {"version": [10, 11]}
    assert d["a"]["signature"] == "not checked"
    got = {(c["section"], c["id"], c["change"]) for c in d["changes"]["items"]}
    assert got == {("fare_products", "binis", "changed"), ("fare_products", "gece", "added"),
                   ("anti_passback", "anti_passback", "changed")}

    # The same table signed twice (another signing time) is the same; so is its source.
    again = _sign_fares(tmp_path, keys, "again", base, 10)
    res = run("bundle", "diff", old, again)
    assert res.exit_code == 0 and res.stdout.splitlines()[-1] == "same"
    res = run("bundle", "diff", TARIFF, old, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["same"] is True

    # A transfer rule removed is a rule change keyed as the engine keys it.
    start = base.index("[[fare_transfer_rules]]")
    end = base.index("[anti_passback]")
    no_transfer = _sign_fares(tmp_path, keys, "nt", base[:start] + base[end:], 12)
    d = json.loads(run("bundle", "diff", old, no_transfer, "--json").stdout)
    assert [(c["section"], c["id"], c["change"]) for c in d["changes"]["items"]] == [
        ("fare_transfer_rules", "*->merkez", "removed")]


def test_diff_trouble_is_exit_2(tmp_path, keys):
    fares = _sign_fares(tmp_path, keys, "f", TARIFF.read_text(encoding="utf-8"), 3)
    bl = write_csv(tmp_path / "bl.csv", [(1, 1, "")])
    res = run("bundle", "diff", fares, bl)
    assert res.exit_code == 2 and "cannot compare" in res.stderr
    res = run("bundle", "diff", fares, fares, "--center-public", keys["other_public"])
    assert res.exit_code == 2 and "signature does not verify" in res.stderr
    bad = write_csv(tmp_path / "bad.csv", [(1, 1, ""), (1, 2, "")])
    res = run("bundle", "diff", bl, bad)
    assert res.exit_code == 2 and "listed twice" in res.stderr
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"\xa1\x61t\x61x")
    res = run("bundle", "diff", garbage, fares)
    assert res.exit_code == 2 and res.stderr.startswith("afc: error: ")


def test_diff_of_action_lists_and_credit(tmp_path, keys):
    header = ("action_id", "card_number", "kind", "valid_until", "amount", "product_id",
              "card_seq")
    a = write_csv(tmp_path / "a.csv", [("A1", 1, "topup", 5, 500, "", ""),
                                       ("A2", 2, "pass", 5, "", 1, "")], header)
    b = write_csv(tmp_path / "b.csv", [("A1", 1, "topup", 5, 700, "", ""),
                                       ("A3", 3, "pass", 5, "", 1, "")], header)
    d = json.loads(run("bundle", "diff", a, b, "--json").stdout)
    assert d["kind"] == "actions"
    assert {(c["id"], c["change"]) for c in d["changes"]["items"]} == {
        ("A1", "changed"), ("A2", "removed"), ("A3", "added")}
    (changed,) = [c for c in d["changes"]["items"] if c["change"] == "changed"]
    assert changed["fields"] == {"amount": [500, 700]}

    outs = []
    for amount in ("100", "150"):
        out = tmp_path / f"c{amount}.json"
        res = run("bundle", "build", "credit", "--dealer", DEALER, "--amount", amount,
                  "--allowance-id", "alw-1", "--valid-from", "2025-09-01", "--valid-until",
                  "2025-10-01", "--key", keys["center"], "--out", out)
        assert res.exit_code == 0, res.stderr
        outs.append(out)
    res = run("bundle", "diff", *outs)
    assert res.exit_code == 1 and "amount 10000 -> 15000" in res.stdout


def test_diff_of_blacklists_lists_every_change_in_json_and_limits_text(tmp_path, keys):
    old = write_csv(tmp_path / "old.csv", [(i, 1, "") for i in range(100)])
    new = write_csv(tmp_path / "new.csv", [(i, 2 if i == 50 else 1, "")
                                           for i in range(30, 160)])
    res = run("bundle", "diff", old, new, "--limit", 5)
    assert res.exit_code == 1
    assert "blacklist: 100 -> 130 cards (60 added, 30 removed, 1 changed)" in res.stdout
    assert "  ... 55 more (--limit, or --json for all)" in res.stdout
    assert "~ card 50 reason 1 -> reason 2 no uid" in res.stdout
    d = json.loads(run("bundle", "diff", old, new, "--json").stdout)["changes"]
    assert [e["card_number"] for e in d["added"]] == list(range(100, 160))
    assert d["removed"] == list(range(30)) and d["count"] == [100, 130]


_cards = st.dictionaries(st.integers(0, 2**64 - 1), st.integers(0, 3), max_size=25)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=_cards, new=_cards)
def test_diff_of_built_lists_is_exactly_the_symmetric_difference(tmp_path, keys, old, new):
    """build then diff: the cards added are new - old, removed old - new, changed the common
    cards whose reason differs; and the delta built from the same two lists says the same."""
    folder = Path(tempfile_dir(tmp_path))
    bundles = []
    for name, cards, version in (("old", old, 1), ("new", new, 2)):
        src = write_csv(folder / f"{name}.csv", sorted(cards.items(), key=lambda x: -x[0]))
        out = folder / f"{name}.bundle"
        res = run("bundle", "build", "blacklist", "--from", src, "--sign", "--key",
                  keys["center"], "--version", version, "--out", out)
        assert res.exit_code == 0, res.stderr
        bundles.append(out)
    res = run("bundle", "diff", *bundles, "--json", "--center-public", keys["public"])
    assert res.exit_code == 1  # the versions differ, whatever the lists
    whole = json.loads(res.stdout)
    assert whole["header"] == {"version": [1, 2]}
    d = whole["changes"]
    assert sorted(e["card_number"] for e in d["added"]) == sorted(set(new) - set(old))
    assert d["removed"] == sorted(set(old) - set(new))
    assert sorted(c["card_number"] for c in d["changed"]) == sorted(
        c for c in set(old) & set(new) if old[c] != new[c])
    res = run("bundle", "build", "blacklist-delta", "--old", bundles[0], "--new", bundles[1],
              "--out", folder / "delta.json")
    assert res.exit_code == 0, res.stderr
    delta = json.loads((folder / "delta.json").read_text())
    assert sorted(delta["remove"]) == d["removed"] and delta["base"] == 1
    assert sorted(e[0] for e in delta["add"]) == sorted(
        [e["card_number"] for e in d["added"]] + [c["card_number"] for c in d["changed"]])


def tempfile_dir(tmp_path: Path) -> str:
    """A fresh folder per hypothesis example (tmp_path is shared by all of them)."""
    import tempfile

    return tempfile.mkdtemp(dir=tmp_path)


def test_help_lists_the_commands():
    res = run("bundle", "--help")
    assert res.exit_code == 0
    for name in ("build", "sign", "verify", "diff", "publish"):
        assert name in res.stdout
    res = run("bundle", "build", "--help")
    assert res.exit_code == 0 and "blacklist-delta  --old" in res.stdout
