"""The operator commands ``afc keys`` (export-public, rotate), ``afc device``, ``afc journal``
and ``afc fleet``, run as an operator runs them (click's CliRunner) against real files, a
real SQLite device database, the real local CA and a real Mosquitto (TLS with the shipped
ACL where it matters).

Each test checks the effect independently of the command's own report: the key store is
re-read and its KCVs recomputed with ``cryptography``, the agent.toml goes through
``load_settings`` and the TLS context, a provisioned device logs in to the broker, the
journal export is compared with the journal API.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import ssl
import stat
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

import click
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from edge_agent.keys import load_private_key, public_hex
from edge_agent.pki import LocalCa
from edge_agent.settings import load_settings
from edge_agent.tls import client_ssl_context
from firmware.core.keys import FileKeyStore, KeyStore, MemoryKeyStore
from firmware.stores.database import DeviceDatabase, JournalMac
from firmware.stores.errors import JournalTampered
from firmware.stores.journal import canonical_bytes
from simulators.broker import BrokerTls, MosquittoBroker, free_port
from tools import device_cmd
from tools.cli import AfcGroup
from tools.cli import main as afc_main
from tools.device_cmd import AclRule, acl_allows, device, parse_acl
from tools.fleet_cmd import FleetView, fleet
from tools.journal_cmd import journal
from tools.keys_cmd import rotate_store

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "afc.acl"
CENTER_PUBLIC = "ab" * 32
WAIT = 5.0


@click.group(cls=AfcGroup)
def afc() -> None:
    """``afc`` with the groups of this brief, as tools/cli.py will register them."""


for _group in (device, journal, fleet):
    afc.add_command(_group)
for _name, _cmd in afc_main.commands.items():
    afc.add_command(_cmd, _name)


def run(*args: str):
    return CliRunner().invoke(afc, [str(a) for a in args])


def one_line_error(result, text: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.stderr.startswith("afc: error:"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr


def store_keys(path: Path) -> dict[str, dict[int, bytes]]:
    doc = tomllib.loads(path.read_text())
    return {n: {int(v): bytes.fromhex(h) for v, h in e["versions"].items()}
            for n, e in doc["keys"].items()}


def kcv(key: bytes) -> str:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(bytes(16))
    return mac.finalize()[:3].hex().upper()


# -- afc keys ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "keys.toml"
    FileKeyStore.generate(path)
    return path


def test_export_public_gives_names_versions_and_kcvs_never_keys(store):
    result = run("keys", "export-public", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    exported = {e["name"]: e for e in json.loads(result.stdout)["keys"]}
    held = store_keys(store)
    assert set(exported) == set(held) == {"classic-sector", "purse-mac", "journal-mac"}
    for name, versions in held.items():
        assert exported[name]["current"] == 1
        assert exported[name]["versions"] == [{"version": 1, "kcv": kcv(versions[1])}]
    text = run("keys", "export-public", "--store", store).stdout
    for out in (result.stdout, text):
        for versions in held.values():
            for key in versions.values():
                assert key.hex().upper() not in out.upper()
                assert key.hex().upper()[:12] not in out.upper()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
@pytest.mark.parametrize("command", [("keys", "list"), ("keys", "export-public"),
                                     ("keys", "rotate", "journal-mac")])
def test_a_store_readable_by_others_is_refused_with_the_chmod_to_run(store, mode, command):
    store.chmod(mode)
    before = store.read_bytes()
    result = run(*command, "--store", store)
    one_line_error(result, f"Fix: chmod 600 {store}")
    assert f"{mode:04o}" in result.stderr
    assert store.read_bytes() == before
    store.chmod(0o600)
    assert run(*command, "--store", store).exit_code == 0


def test_rotate_adds_a_version_keeps_the_old_ones_and_stays_private(store):
    before = store_keys(store)
    result = run("keys", "rotate", "classic-sector", "purse-mac", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    after = store_keys(store)
    assert out["version"] == 2
    for name in ("classic-sector", "purse-mac"):
        assert after[name][1] == before[name][1]  # cards issued under v1 keep working
        assert len(after[name][2]) == 16 and after[name][2] != before[name][1]
        assert out["kcv"][name] == kcv(after[name][2])
    assert after["journal-mac"] == before["journal-mac"]
    assert after["classic-sector"][2] != after["purse-mac"][2]
    opened = FileKeyStore.open(store)
    assert opened.current_version("classic-sector") == 2
    assert opened.current_version("journal-mac") == 1
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert [p.name for p in store.parent.iterdir() if "rotate" in p.name] == []


def test_rotate_refuses_what_would_break_cards(store):
    before = store.read_bytes()
    one_line_error(run("keys", "rotate", "purse-mac", "--store", store),
                   "rotate them together: afc keys rotate classic-sector purse-mac")
    one_line_error(run("keys", "rotate", "no-such-key", "--store", store),
                   "no key named 'no-such-key'")
    assert store.read_bytes() == before


def test_concurrent_rotations_lose_no_key(store):
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            rotate_store(store, ["journal-mac"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert FileKeyStore.open(store).versions("journal-mac") == [1, 2, 3, 4, 5]


# -- afc device -------------------------------------------------------------------------------


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    folder = tmp_path / "ca"
    result = run("device", "ca", "init", "--ca", folder, "--name", "Test AFC CA",
                 "--center-public", CENTER_PUBLIC)
    assert result.exit_code == 0, result.output
    return folder


def test_provision_writes_a_device_folder_the_agent_accepts(ca_dir, tmp_path):
    out = tmp_path / "BUS-0042-V1"
    result = run("device", "provision", "BUS-0042-V1", "--ca", ca_dir, "--kind", "validator",
                 "--out", out, "--broker", "mqtt.afc.example:8883", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)

    settings = load_settings(out / "agent.toml")
    assert settings.device.id == "BUS-0042-V1" and settings.device.kind == "validator"
    assert (settings.mqtt.host, settings.mqtt.port) == ("mqtt.afc.example", 8883)
    assert settings.identity.center_public == CENTER_PUBLIC
    assert settings.identity.key == out / "device.key"
    assert info["public_key"] == public_hex(load_private_key(settings.identity.key))
    client_ssl_context(settings.mqtt.tls_ca, settings.mqtt.tls_cert, settings.mqtt.tls_key)

    cert = x509.load_pem_x509_certificate((out / "client.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=BUS-0042-V1"
    assert format(cert.serial_number, "x") == info["certificate_serial"]
    ca = LocalCa.load(ca_dir)
    ca.verify((out / "client.pem").read_bytes())
    assert not ca.is_revoked((out / "client.pem").read_bytes())
    for name in ("device.key", "client.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    # the TLS key lives with the device only
    assert not (ca_dir / "devices" / "BUS-0042-V1.key").exists()
    # the ACL is checked, not extended
    checks = {(c["access"], c["topic"]): c["allowed"] for c in info["acl_checks"]}
    assert checks[("write", "afc/v1/dev/BUS-0042-V1/txn")]
    assert checks[("read", "afc/v1/cfg/credit/BUS-0042-V1")]
    assert not checks[("write", "afc/v1/dev/OTHER-DEVICE/txn")]
    assert all(c["ok"] for c in info["acl_checks"])
    assert not (out / "identity.json").exists()


def test_provision_a_camera_site_gets_its_hmac_identity(ca_dir, tmp_path):
    out = tmp_path / "site"
    result = run("device", "provision", "KGYS-0007", "--ca", ca_dir, "--kind", "camera-site",
                 "--out", out)
    assert result.exit_code == 0, result.output
    identity = json.loads((out / "identity.json").read_text())
    assert identity["dev"] == "KGYS-0007" and len(bytes.fromhex(identity["key"])) == 32
    assert stat.S_IMODE((out / "identity.json").stat().st_mode) == 0o600
    assert identity["key"] not in result.stdout
    assert load_settings(out / "agent.toml").device.kind == "camera-site"


def test_provision_refuses_and_changes_nothing(ca_dir, tmp_path):
    out = tmp_path / "dev"
    assert run("device", "provision", "DEV-1", "--ca", ca_dir, "--kind", "topup",
               "--out", out).exit_code == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    index = (ca_dir / "index.json").read_text()
    # the same folder again, another device into it, a device that holds a certificate
    one_line_error(run("device", "provision", "DEV-2", "--ca", ca_dir, "--kind", "topup",
                       "--out", out), "already holds")
    one_line_error(run("device", "provision", "DEV-1", "--ca", ca_dir, "--kind", "topup",
                       "--out", tmp_path / "again"), "already has a valid certificate")
    one_line_error(run("device", "provision", "bad/id", "--ca", ca_dir, "--kind", "topup",
                       "--out", tmp_path / "x"), "is not valid")
    one_line_error(run("device", "provision", "DEV-3", "--ca", ca_dir, "--kind", "topup",
                       "--out", tmp_path / "y", "--broker", "nohostport"), "HOST:PORT")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert (ca_dir / "index.json").read_text() == index
    assert not (tmp_path / "again" / "agent.toml").exists()


def test_provision_needs_the_center_key(tmp_path):
    folder = tmp_path / "ca"
    assert run("device", "ca", "init", "--ca", folder).exit_code == 0
    one_line_error(run("device", "provision", "D", "--ca", folder, "--kind", "validator",
                       "--out", tmp_path / "d"), "no center public key")
    result = run("device", "provision", "D", "--ca", folder, "--kind", "validator",
                 "--out", tmp_path / "d", "--center-public", "cd" * 32)
    assert result.exit_code == 0, result.output
    assert load_settings(tmp_path / "d" / "agent.toml").identity.center_public == "cd" * 32


def test_provision_refuses_a_device_the_acl_quarantines(ca_dir, tmp_path):
    acl = tmp_path / "afc.acl"
    acl.write_text(SHIPPED_ACL.read_text() + "\n# stolen\nuser BUS-9\ntopic deny #\n")
    one_line_error(run("device", "provision", "BUS-9", "--ca", ca_dir, "--kind", "validator",
                       "--out", tmp_path / "b9", "--acl", acl), "quarantined")
    assert not (tmp_path / "b9" / "agent.toml").exists()
    assert run("device", "provision", "BUS-8", "--ca", ca_dir, "--kind", "validator",
               "--out", tmp_path / "b8", "--acl", acl).exit_code == 0
    no_patterns = tmp_path / "users-only.acl"
    no_patterns.write_text("user ingest-1@center\ntopic read afc/v1/dev/+/txn\n")
    one_line_error(run("device", "provision", "BUS-7", "--ca", ca_dir, "--kind", "validator",
                       "--out", tmp_path / "b7", "--acl", no_patterns),
                   "the pattern lines do not match")


def test_acl_evaluation_follows_mosquitto():
    rules = parse_acl(SHIPPED_ACL)
    assert acl_allows(rules, "A", "write", "afc/v1/dev/A/txn")
    assert not acl_allows(rules, "A", "write", "afc/v1/dev/B/txn")
    assert not acl_allows(rules, "A", "read", "afc/v1/dev/B/ack")
    assert acl_allows(rules, "A", "read", "afc/v1/cfg/fares")
    assert not acl_allows(rules, "A", "write", "afc/v1/cfg/fares")
    assert acl_allows(rules, "ingest-1@center", "write", "afc/v1/dev/A/ack")
    assert not acl_allows(rules, "ingest-1@center", "write", "afc/v1/cfg/fares")
    assert acl_allows(rules, "publisher@center", "write", "afc/v1/cfg/fares")
    deny_first = [AclRule(1, "X", "deny", "#", False),
                  AclRule(2, None, "write", "afc/v1/dev/%u/txn", True)]
    assert not acl_allows(deny_first, "X", "write", "afc/v1/dev/X/txn")
    assert acl_allows(deny_first, "Y", "write", "afc/v1/dev/Y/txn")


def test_revoke_puts_the_certificate_on_the_crl_and_replace_reissues(ca_dir, tmp_path):
    out = tmp_path / "d1"
    assert run("device", "provision", "D1", "--ca", ca_dir, "--kind", "validator",
               "--out", out).exit_code == 0
    first = (out / "client.pem").read_bytes()
    result = run("device", "revoke", "D1", "--ca", ca_dir, "--json")
    assert result.exit_code == 0, result.output
    serial = x509.load_pem_x509_certificate(first).serial_number
    assert json.loads(result.stdout)["revoked"] == [format(serial, "x")]
    ca = LocalCa.load(ca_dir)
    assert ca.is_revoked(first)
    # a revoked device is provisioned afresh without --replace
    assert run("device", "provision", "D1", "--ca", ca_dir, "--kind", "validator",
               "--out", tmp_path / "d1b").exit_code == 0
    second = (tmp_path / "d1b" / "client.pem").read_bytes()
    assert not ca.is_revoked(second)
    # --replace revokes the valid one in the same step
    assert run("device", "provision", "D1", "--ca", ca_dir, "--kind", "validator",
               "--out", tmp_path / "d1c", "--replace").exit_code == 0
    assert ca.is_revoked(second)
    assert not ca.is_revoked((tmp_path / "d1c" / "client.pem").read_bytes())
    one_line_error(run("device", "revoke", "NEVER", "--ca", ca_dir), "no device certificate")


def test_a_provisioned_device_logs_in_to_the_real_broker_until_it_is_revoked(ca_dir, tmp_path):
    ca = LocalCa.load(ca_dir)
    ca.issue_server("broker")
    files = ca.export_broker_files(tmp_path / "etc", "broker")
    out = tmp_path / "dev"
    port = free_port()
    assert run("device", "provision", "BUS-5", "--ca", ca_dir, "--kind", "validator", "--out",
               out, "--broker", f"127.0.0.1:{port}").exit_code == 0
    settings = load_settings(out / "agent.toml")
    broker = MosquittoBroker(
        tmp_path / "broker", port=port,
        tls=BrokerTls(files["cafile"], files["certfile"], files["keyfile"]),
        acl_file=SHIPPED_ACL,
        extra_config=f"crlfile {files['crlfile']}\nuse_username_as_clientid true")
    ctx = client_ssl_context(settings.mqtt.tls_ca, settings.mqtt.tls_cert,
                             settings.mqtt.tls_key)
    with broker:
        assert logs_in_and_publishes(settings.mqtt.host, settings.mqtt.port, ctx,
                                     "afc/v1/dev/BUS-5/status")
        assert run("device", "revoke", "BUS-5", "--ca", ca_dir).exit_code == 0
        ca.export_broker_files(tmp_path / "etc", "broker")
        broker.restart()
        assert not logs_in_and_publishes(settings.mqtt.host, settings.mqtt.port, ctx,
                                         "afc/v1/dev/BUS-5/status")
        assert "certificate revoked" in broker.log_tail(50) or "verify failed" in \
            broker.log_tail(50)


def logs_in_and_publishes(host: str, port: int, ctx: ssl.SSLContext, topic: str) -> bool:
    """Whether a TLS client gets a CONNACK 0 and a PUBACK for one QoS 1 message (bounded)."""
    done = threading.Event()
    state: dict[str, object] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        state["connack"] = reason_code.value
        done.set()

    def on_disconnect(c, userdata, flags, reason_code, properties) -> None:
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(host, port)
    except (ssl.SSLError, OSError):
        return False  # refused in the handshake
    client.loop_start()
    try:
        if not done.wait(WAIT) or state.get("connack") != 0:
            return False
        info = client.publish(topic, json.dumps({"v": 1, "dev": "BUS-5", "ts": 1}), qos=1)
        deadline = time.monotonic() + WAIT
        while not info.is_published() and time.monotonic() < deadline:
            time.sleep(0.02)
        return info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


# -- afc journal ------------------------------------------------------------------------------


def tap(db: DeviceDatabase, card: int, t: int) -> None:
    seq = db.journal.intent({"kind": "tap", "time": t, "card_number": card,
                             "uid": card.to_bytes(4, "big"), "counter_before": 1,
                             "counter_after": 2, "balance_before": 5000,
                             "balance_after": 4000, "fare": 1000, "product": 0,
                             "line": "42", "vehicle": "501", "validator_id": "11"})
    db.journal.done(seq, "ok", counter_after=2, balance_after=4000)


@pytest.fixture
def device_db(tmp_path, store) -> Path:
    path = tmp_path / "device.db"
    with DeviceDatabase.open(path, device_id="BUS-501-V1",
                             journal_key=FileKeyStore.open(store)) as db:
        for i in range(3):
            tap(db, 1000 + i, 1_700_000_000_000 + i)
        db.journal.intent({"kind": "tap", "time": 1_700_000_100_000, "card_number": 77,
                           "uid": bytes(4), "counter_before": 5})  # torn: in doubt
        db.journal.event({"kind": "rejection", "time": 1_700_000_200_000,
                          "card_number": 88, "outcome": "declined", "reason": 11})
        db.journal.mark_acked(4)
    return path


def test_journal_inspect_reports_the_device_and_verifies_every_mac(device_db, store):
    result = run("journal", "inspect", "--db", device_db, "--keys", store, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["device_id"] == "BUS-501-V1"
    assert (info["records"], info["first_seq"], info["last_seq"]) == (8, 1, 8)
    assert (info["acked_seq"], info["unacked"]) == (4, 4)
    assert [i["seq"] for i in info["open_intents"]] == [7]
    assert info["open_intents"][0]["card_number"] == 77
    assert (info["mac_ok"], info["mac_bad"], info["mac_by_version"]) == (8, [], {"1": 8})
    assert info["by_kind"] == {"tap": 7, "rejection": 1}
    assert info["by_phase"] == {"intent": 4, "done": 3, "event": 1}
    assert info["by_outcome"] == {"ok": 3, "-": 4, "declined": 1}
    text = run("journal", "inspect", "--db", device_db, "--keys", store).stdout
    assert "device BUS-501-V1" in text and "open intents 1" in text


def test_journal_inspect_and_export_catch_a_record_edited_behind_the_api(device_db, store):
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1") as db:
        db.connection.execute("UPDATE journal SET balance_after = 999999 WHERE seq = 2")
    result = run("journal", "inspect", "--db", device_db, "--keys", store, "--json")
    one_line_error(result, "1 journal record(s) fail MAC verification (seq [2])")
    assert json.loads(result.stdout)["mac_bad"] == [2]
    exported = run("journal", "export", "--db", device_db, "--keys", store, "--format", "json")
    assert exported.exit_code == 1
    rows = json.loads(exported.stdout)
    assert [r["seq"] for r in rows if not r["mac_ok"]] == [2]
    # a store with other keys verifies nothing
    other = device_db.parent / "other.toml"
    FileKeyStore.generate(other)
    assert json.loads(run("journal", "inspect", "--db", device_db, "--keys", other,
                          "--json").stdout)["mac_ok"] == 0


def test_journal_export_csv_and_json_match_the_journal(device_db, store, tmp_path):
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=FileKeyStore.open(store)) as db:
        records = db.journal.records(0, 100)
    result = run("journal", "export", "--db", device_db, "--keys", store, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["seq"]) for r in rows] == [r.seq for r in records]
    for row, rec in zip(rows, records, strict=True):
        assert row["mac"] == rec.mac.hex().upper() and row["mac_ok"] == "True"
        assert row["uid"] == (rec.uid.hex().upper() if rec.uid else "")
        assert row["kind"] == rec.kind and row["device_id"] == "BUS-501-V1"
        assert row["balance_after"] == ("" if rec.balance_after is None
                                        else str(rec.balance_after))
    assert "exported 8 record(s)" in result.stderr

    out = tmp_path / "since4.json"
    result = run("journal", "export", "--db", device_db, "--keys", store, "--format", "json",
                 "--since", "4", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["seq"] for r in data] == [5, 6, 7, 8]
    assert data[0]["link"] is None and data[1]["link"] == 5 and data[1]["key_version"] == 1
    empty = run("journal", "export", "--db", device_db, "--keys", store, "--format", "json",
                "--since", "100")
    assert json.loads(empty.stdout) == []


def test_journal_commands_refuse_what_is_not_a_device_database(tmp_path, store):
    one_line_error(run("journal", "inspect", "--db", tmp_path / "none.db", "--keys", store),
                   "no device database")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    result = run("journal", "inspect", "--db", junk, "--keys", store)
    assert result.exit_code == 1 and result.stderr.startswith("afc: error:")
    assert not (tmp_path / "none.db").exists()


def test_a_journal_written_across_a_journal_key_rotation_still_verifies(device_db, store):
    rotate_store(store, ["journal-mac"])
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=FileKeyStore.open(store)) as db:
        tap(db, 2000, 1_700_000_300_000)
    info = json.loads(run("journal", "inspect", "--db", device_db, "--keys", store,
                          "--json").stdout)
    assert info["mac_bad"] == [] and info["mac_by_version"] == {"1": 8, "2": 2}


def test_the_device_itself_still_verifies_its_journal_after_a_journal_key_rotation(
        device_db, store):
    rotate_store(store, ["journal-mac"])
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=FileKeyStore.open(store)) as db:
        assert db.journal.verify() == []


class CmacCounter(KeyStore):
    """A key store that counts the CMACs computed, by key version (None: the current)."""

    def __init__(self, base: KeyStore) -> None:
        self.base = base
        self.calls: Counter[int | None] = Counter()

    def names(self) -> list[str]:
        return self.base.names()

    def versions(self, name: str) -> list[int]:
        return self.base.versions(name)

    def current_version(self, name: str) -> int:
        return self.base.current_version(name)

    def diversify(self, name, uid, aid, system_id, *, key_version=None) -> bytes:
        return self.base.diversify(name, uid, aid, system_id, key_version=key_version)

    def cmac(self, name, data, *, key_version=None) -> bytes:
        self.calls[key_version] += 1
        return self.base.cmac(name, data, key_version=key_version)


def test_after_a_journal_key_rotation_the_device_settles_its_old_intents_with_the_new_key(
        device_db, store):
    """The torn tap of card 77 (seq 7) was journaled under version 1; after the rotation the
    device still reads it as an open intent, closes it, and MACs new records with version 2
    only. ``afc journal`` and the device agree record by record on the version."""
    rotate_store(store, ["journal-mac"])
    keys = FileKeyStore.open(store)
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1", journal_key=keys) as db:
        (intent,) = db.journal.open_intents()  # verified: JournalTampered otherwise
        assert (intent.seq, intent.card_number) == (7, 77)
        db.journal.done(intent.seq, "not-charged", counter_after=5)
        tap(db, 2000, 1_700_000_300_000)
        records = db.journal.records(0, 100)  # verified as well
        assert db.journal.open_intents() == [] and db.journal.verify() == []
    mac = JournalMac(keys)
    assert mac.versions == (2, 1)
    by_seq = {r.seq: mac.version_of(canonical_bytes(r), r.mac) for r in records}
    assert by_seq == {**dict.fromkeys(range(1, 9), 1), 9: 2, 10: 2, 11: 2}
    exported = run("journal", "export", "--db", device_db, "--keys", store, "--format", "json")
    assert {r["seq"]: r["key_version"] for r in json.loads(exported.stdout)} == by_seq
    # the new records really are under version 2: a store of version 1 alone refuses them
    old_only = MemoryKeyStore({"journal-mac": {1: store_keys(store)["journal-mac"][1]}})
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1", journal_key=old_only) as db:
        assert db.journal.verify() == [9, 10, 11]


def test_after_a_journal_key_rotation_an_edited_record_still_fails(device_db, store):
    rotate_store(store, ["journal-mac"])
    raw = sqlite3.connect(device_db)
    with raw:
        assert raw.execute("UPDATE journal SET fare = fare - 500 WHERE seq = 3").rowcount == 1
        assert raw.execute("SELECT fare FROM journal WHERE seq = 3").fetchone() == (500,)
    raw.close()
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=FileKeyStore.open(store)) as db:
        assert db.journal.verify() == [3]
        with pytest.raises(JournalTampered):
            db.journal.records(0, 100)
    info = json.loads(run("journal", "inspect", "--db", device_db, "--keys", store,
                          "--json").stdout)
    assert info["mac_bad"] == [3] and info["mac_by_version"] == {"1": 7}


def test_verifying_the_journal_costs_one_mac_a_record_of_the_current_key(device_db, store):
    """Current version first: a record of the current key costs one CMAC, as before any
    rotation; only a record of an older key costs more (one per version tried)."""
    rotate_store(store, ["journal-mac"])
    counting = CmacCounter(FileKeyStore.open(store))
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1", journal_key=counting) as db:
        for i in range(4):
            tap(db, 3000 + i, 1_700_000_400_000 + i)  # 8 records under version 2
        counting.calls.clear()
        db.journal.records(8, 100)
        assert counting.calls == {None: 8}
        counting.calls.clear()
        assert db.journal.verify() == []
        assert counting.calls == {None: 16, 1: 8}  # the 8 old records: current, then v1


def test_a_plain_mac_function_verifies_under_its_one_key(device_db, store):
    """A MAC function (a SAM's, say) knows one key: nothing older is tried behind it."""
    keys = FileKeyStore.open(store)
    rotate_store(store, ["journal-mac"])
    rotated = FileKeyStore.open(store)
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=lambda data: rotated.cmac("journal-mac", data)) as db:
        assert db.journal.verify() == list(range(1, 9))
    with DeviceDatabase.open(device_db, device_id="BUS-501-V1",
                             journal_key=lambda data: keys.cmac("journal-mac", data)) as db:
        assert db.journal.verify() == []


# -- afc fleet --------------------------------------------------------------------------------


def msg(dev: str, **fields) -> bytes:
    return json.dumps({"v": 1, "dev": dev, "ts": fields.pop("ts", 1_760_000_000_000),
                       **fields}).encode()


def test_fleet_view_folds_status_telemetry_and_events():
    view = FleetView()
    assert view.feed("afc/v1/dev/BUS-1/status", msg("BUS-1", kind="validator",
                                                    state="online", sw="0.1.0"))
    assert view.feed("afc/v1/dev/BUS-1/telemetry", msg(
        "BUS-1", kind="validator", outbox_depth=12, outbox_age_s=30, reader="ok",
        last_tap_ts=1_759_999_940_000))
    assert view.feed("afc/v1/dev/SITE-1/telemetry", msg(
        "SITE-1", kind="camera-site", cameras={"c1": "up", "c2": "down", "c3": "degraded"},
        door="open"))
    for event, sev, seq in (("reader-lost", "alarm", 1), ("reader-lost", "alarm", 1),
                            ("disk-low", "warning", 2), ("reader-back", "info", 3)):
        assert view.feed("afc/v1/dev/BUS-1/event", msg("BUS-1", event=event, severity=sev,
                                                      seq=seq, detail={}))
    # an older status (a late retained copy) does not overwrite a newer one
    assert view.feed("afc/v1/dev/BUS-1/status", msg("BUS-1", state="offline", ts=1))
    refused = [("afc/v1/dev/BUS-1/status", b"{not json"),
               ("afc/v1/dev/BUS-1/status", msg("BUS-2", state="online")),
               ("afc/v1/dev/BUS-1/status", json.dumps({"v": 2, "dev": "BUS-1",
                                                       "ts": 1}).encode()),
               ("afc/v1/dev/BUS 1/status", msg("BUS 1"))]
    for topic, payload in refused:
        assert not view.feed(topic, payload)
    assert view.rejected == len(refused)
    rows = {r["device"]: r for r in view.rows(now_ms=1_760_000_000_000)}
    bus = rows["BUS-1"]
    assert (bus["state"], bus["sw"], bus["outbox_depth"], bus["last_tap_age_s"]) == (
        "online", "0.1.0", 12, 60)
    assert bus["alarms"] == ["disk-low"] and bus["events"] == 3
    site = rows["SITE-1"]
    assert site["state"] == "unknown"
    assert site["alarms"] == ["camera-degraded:c3", "camera-down:c2", "door-open"]


@pytest.fixture
def broker_with_fleet(tmp_path):
    with MosquittoBroker(tmp_path / "broker") as broker:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        now = int(time.time() * 1000)
        retained = [
            ("afc/v1/dev/BUS-1/status", msg("BUS-1", kind="validator", state="online",
                                            sw="0.1.0", ts=now)),
            ("afc/v1/dev/BUS-2/status", msg("BUS-2", kind="validator", state="offline",
                                            ts=now)),
            ("afc/v1/dev/BUS-1/telemetry", msg("BUS-1", kind="validator", outbox_depth=4,
                                               outbox_age_s=9, reader="lost",
                                               last_tap_ts=now - 5_000, ts=now)),
            ("afc/v1/dev/SITE-1/status", msg("SITE-1", kind="camera-site", state="online",
                                             ts=now)),
            ("afc/v1/dev/SITE-1/event", msg("SITE-1", event="camera-down", severity="alarm",
                                            seq=3, detail={"camera": "c2"}, ts=now)),
            ("afc/v1/dev/BUS-3/status", b"\xff garbage"),
        ]
        for topic, payload in retained:
            # retained here only so the test needs no timing: the tool does not care
            pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(WAIT)
        pub.disconnect()
        pub.loop_stop()
        yield broker


def test_fleet_status_lists_devices_and_camera_sites(broker_with_fleet):
    b = broker_with_fleet
    result = run("fleet", "status", "--broker", f"{b.host}:{b.port}", "--collect-s", "0.5",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["device"]: r for r in data["devices"]}
    assert set(rows) == {"BUS-1", "BUS-2", "SITE-1"} and data["rejected"] == 1
    assert (rows["BUS-1"]["state"], rows["BUS-1"]["outbox_depth"]) == ("online", 4)
    assert rows["BUS-1"]["alarms"] == ["reader-lost"]
    assert rows["BUS-2"]["state"] == "offline"
    assert rows["SITE-1"]["alarms"] == ["camera-down:c2"]
    text = run("fleet", "status", "--broker", f"{b.host}:{b.port}", "--collect-s", "0.5")
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "KIND", "STATE"]
    assert any(line.startswith("BUS-1") and "reader-lost" in line for line in lines)
    assert "3 device(s), 2 online, 2 with alarms; 1 message(s) refused" in text.stdout


def test_fleet_status_watch_reprints_a_bounded_number_of_times(broker_with_fleet):
    b = broker_with_fleet
    result = run("fleet", "status", "--broker", f"{b.host}:{b.port}", "--collect-s", "0.3",
                 "--watch", "--interval", "0.1", "--count", "3", "--json")
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 3 and all(len(r["devices"]) == 3 for r in reports)


def test_fleet_status_against_no_broker_is_a_one_line_error():
    port = free_port()
    one_line_error(run("fleet", "status", "--broker", f"127.0.0.1:{port}", "--collect-s",
                       "0.1"), "cannot reach the broker")
    one_line_error(run("fleet", "status", "--broker", "127.0.0.1"), "HOST:PORT")
    one_line_error(run("fleet", "status", "--broker", f"127.0.0.1:{port}", "--tls-ca", "x"),
                   "TLS needs --tls-ca, --tls-cert and --tls-key together")


def test_fleet_status_over_tls_with_a_center_certificate(ca_dir, tmp_path):
    ca = LocalCa.load(ca_dir)
    ca.issue_server("broker")
    files = ca.export_broker_files(tmp_path / "etc", "broker")
    monitor_cert, monitor_key = ca.issue_center("ingest-1")
    dev_out = tmp_path / "dev"
    with MosquittoBroker(tmp_path / "broker",
                         tls=BrokerTls(files["cafile"], files["certfile"], files["keyfile"]),
                         acl_file=SHIPPED_ACL,
                         extra_config="use_username_as_clientid true") as broker:
        assert run("device", "provision", "BUS-5", "--ca", ca_dir, "--kind", "validator",
                   "--out", dev_out, "--broker", f"127.0.0.1:{broker.port}").exit_code == 0
        settings = load_settings(dev_out / "agent.toml")
        ctx = client_ssl_context(settings.mqtt.tls_ca, settings.mqtt.tls_cert,
                                 settings.mqtt.tls_key)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.tls_set_context(ctx)
        client.connect(broker.host, broker.port)
        client.loop_start()
        client.publish("afc/v1/dev/BUS-5/status", msg("BUS-5", kind="validator",
                                                      state="online"),
                       qos=1, retain=True).wait_for_publish(WAIT)
        client.disconnect()
        client.loop_stop()
        result = run("fleet", "status", "--broker", f"127.0.0.1:{broker.port}",
                     "--tls-ca", ca.ca_path, "--tls-cert", monitor_cert, "--tls-key",
                     monitor_key, "--collect-s", "0.5", "--json")
        assert result.exit_code == 0, result.output
        assert [r["device"] for r in json.loads(result.stdout)["devices"]] == ["BUS-5"]


def test_device_module_exposes_the_group():
    assert isinstance(device_cmd.device, click.Group)
    assert {"provision", "revoke", "ca"} <= set(device_cmd.device.commands)
    assert os.fspath(device_cmd.default_acl()).endswith("afc.acl")


@pytest.mark.parametrize("args", [
    ("keys", "export-public"), ("keys", "rotate"), ("device",), ("device", "ca", "init"),
    ("device", "provision"), ("device", "revoke"), ("journal",), ("journal", "inspect"),
    ("journal", "export"), ("fleet",), ("fleet", "status"),
])
def test_every_command_has_help(args):
    result = run(*args, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout, args
