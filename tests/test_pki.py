"""The local CA (edge_agent.pki) and the client TLS context (edge_agent.tls), without a broker.

What the broker relies on is checked on the certificates themselves: who signed them, the
CN (the ACL's user name), the key usages that stop a device certificate from serving as a
broker's and the reverse, key file modes, the CRL. hil_tests/test_broker_tls_acl.py then
shows mosquitto enforcing all of it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import multiprocessing
import os
import re
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import AgentConfigError, AgentError, KeyFileError
from edge_agent.pki import (
    CENTER_SUFFIX,
    DEVICE_ID_RE,
    IdentityExists,
    InvalidIdentity,
    LocalCa,
    NotIssued,
    PkiError,
    check_device_id,
)
from edge_agent.tls import client_ssl_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> LocalCa:
    return LocalCa.create(tmp_path_factory.mktemp("ca"), "AFC test CA", valid_days=3650)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _eku(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- the CA itself ----------------------------------------------------------------------------


def test_create_writes_a_p256_ca_with_a_private_key_and_an_empty_crl(ca):
    assert _mode(ca.dir / "ca.key") == 0o600
    cert = _cert(ca.ca_path)
    assert _cn(cert) == "AFC test CA" and cert.issuer == cert.subject
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(cert.public_key()) and len(crl) == 0
    assert ca.crl_next_update() > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)


def test_create_refuses_a_folder_that_holds_a_ca(ca):
    before = (ca.dir / "ca.key").read_bytes()
    with pytest.raises(IdentityExists, match="holds a CA already"):
        LocalCa.create(ca.dir, "another")
    assert (ca.dir / "ca.key").read_bytes() == before


def test_load_gives_the_same_ca_and_checks_the_key(ca, tmp_path):
    again = LocalCa.load(ca.dir)
    assert again.cert == ca.cert and again.name == ca.name
    with pytest.raises(PkiError, match="no CA in"):
        LocalCa.load(tmp_path)

    other = LocalCa.create(tmp_path / "other", "other")
    os.chmod(other.dir / "ca.key", 0o644)
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 0644\): chmod 600"):
        LocalCa.load(other.dir)
    os.chmod(other.dir / "ca.key", 0o600)
    # a key from another CA under this certificate
    (other.dir / "ca.key").write_bytes((ca.dir / "ca.key").read_bytes())
    with pytest.raises(KeyFileError, match="is not the key of"):
        LocalCa.load(other.dir)


def test_a_passphrase_protects_the_ca_key(tmp_path):
    LocalCa.create(tmp_path, "locked", passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "ca.key").read_bytes()
    with pytest.raises(KeyFileError, match="encrypted: give the CA passphrase"):
        LocalCa.load(tmp_path)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        LocalCa.load(tmp_path, passphrase=b"wrong")
    ca = LocalCa.load(tmp_path, passphrase=b"correct horse")
    cert_path, _ = ca.issue_device("V-1")
    ca.verify(cert_path.read_bytes())


def test_a_damaged_index_is_reported_not_guessed(tmp_path):
    ca = LocalCa.create(tmp_path, "x")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(PkiError, match=r"index\.json is damaged"):
        ca.issue_device("V-1")
    (tmp_path / "index.json").unlink()
    with pytest.raises(PkiError, match=r"index\.json is missing"):
        LocalCa.load(tmp_path)


# -- devices -------------------------------------------------------------------------------------


def test_a_device_certificate_is_a_client_certificate_named_by_the_device_id(ca):
    cert_path, key_path = ca.issue_device("BUS-0042.v1_a")
    assert _mode(key_path) == 0o600
    cert = ca.verify(cert_path.read_bytes())
    assert _cn(cert) == "BUS-0042.v1_a"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # cannot serve as a broker
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    entry = next(e for e in ca.issued() if e.cn == "BUS-0042.v1_a")
    assert entry.role == "device" and entry.serial == cert.serial_number
    assert entry.revoked_at is None


def test_a_second_certificate_for_a_device_is_refused_and_nothing_is_overwritten(ca):
    cert_path, key_path = ca.issue_device("DUP-1")
    before = (cert_path.read_bytes(), key_path.read_bytes())
    with pytest.raises(IdentityExists, match="already has a valid certificate"):
        ca.issue_device("DUP-1")
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_replace_revokes_the_old_certificate(ca):
    cert_path, key_path = ca.issue_device("REPL-1")
    old = _cert(cert_path)
    ca.issue_device("REPL-1", replace=True)
    new = _cert(cert_path)
    assert new.serial_number != old.serial_number
    assert ca.is_revoked(old.public_bytes(serialization.Encoding.PEM))
    assert not ca.is_revoked(new.public_bytes(serialization.Encoding.PEM))
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == new.public_key().public_numbers()
    assert _mode(key_path) == 0o600
    valid = [e for e in ca.issued() if e.cn == "REPL-1" and e.revoked_at is None]
    assert [e.serial for e in valid] == [new.serial_number]


def test_files_left_without_an_index_entry_are_not_overwritten(tmp_path):
    ca = LocalCa.create(tmp_path, "x")
    cert_path, key_path = ca.paths("device", "ORPHAN")
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"a key from a crashed run")
    with pytest.raises(IdentityExists, match="not overwritten"):
        ca.issue_device("ORPHAN")
    assert key_path.read_bytes() == b"a key from a crashed run"
    ca.issue_device("ORPHAN", replace=True)
    assert ca.verify(cert_path.read_bytes())


@pytest.mark.parametrize("bad", ["", "a" * 65, "bus 1", "bus/1", "bus+1", "bus#1", "bus@center",
                                 "ünlü", "a\x00b", None, 42])
def test_device_ids_outside_the_protocol_rule_are_refused(ca, bad):
    with pytest.raises(InvalidIdentity, match="1-64 characters"):
        ca.issue_device(bad)


@given(st.text(max_size=70))
def test_the_device_id_rule_is_the_protocol_rule(text):
    """docs/protocol.md: 1-64 characters A-Z a-z 0-9 . _ - (and nothing a topic or an ACL
    pattern would treat specially, nor the '@' of center identities)."""
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    expected = 1 <= len(text) <= 64 and set(text) <= allowed
    if expected:
        assert check_device_id(text) == text
        assert not set(text) & set("/+#@$")
    else:
        with pytest.raises(InvalidIdentity):
            check_device_id(text)
    assert bool(DEVICE_ID_RE.fullmatch(text)) == expected


def test_a_certificate_may_not_outlive_the_ca(tmp_path):
    ca = LocalCa.create(tmp_path, "short", valid_days=30)
    with pytest.raises(PkiError, match="would outlive the CA"):
        ca.issue_device("V-1", valid_days=31)
    with pytest.raises(PkiError, match="at least one day"):
        ca.issue_device("V-1", valid_days=0)
    cert_path, _ = ca.issue_device("V-1", valid_days=30)
    assert _cert(cert_path).not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_two_processes_issuing_the_same_device_one_wins(tmp_path):
    LocalCa.create(tmp_path, "race")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_issue_in_child, [str(tmp_path)] * 4, chunksize=1)
    assert sorted(results) == ["exists", "exists", "exists", "ok"]
    ca = LocalCa.load(tmp_path)
    entries = [e for e in ca.issued() if e.cn == "RACE-1"]
    assert len(entries) == 1
    assert _cert(ca.paths("device", "RACE-1")[0]).serial_number == entries[0].serial


def _issue_in_child(folder: str) -> str:
    try:
        LocalCa.load(folder).issue_device("RACE-1")
    except IdentityExists:
        return "exists"
    return "ok"


# -- center and broker -------------------------------------------------------------------------


def test_center_clients_are_named_outside_the_device_id_alphabet(ca):
    cert_path, key_path = ca.issue_center("ingest-1")
    cert = ca.verify(cert_path.read_bytes())
    assert _cn(cert) == "ingest-1@center" and cert_path.name == "ingest-1@center.pem"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(key_path) == 0o600
    assert not DEVICE_ID_RE.fullmatch(_cn(cert)) and CENTER_SUFFIX == "@center"
    for bad in ("", "Ingest", "ingest@center", "a/b", "-x", "x" * 33):
        with pytest.raises(InvalidIdentity, match="center client name"):
            ca.issue_center(bad)


def test_a_server_certificate_names_the_hosts_clients_dial(ca):
    cert_path, key_path = ca.issue_server("mqtt.afc.example",
                                          hosts=["127.0.0.1", "::1", "mqtt.afc.example"])
    cert = ca.verify(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.afc.example"]
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]  # cannot log in as a client
    assert _mode(key_path) == 0o600
    with pytest.raises(InvalidIdentity, match="neither an IP address nor a DNS name"):
        ca.issue_server("bad-host", hosts=["exa mple"])
    with pytest.raises(InvalidIdentity, match="at least one host"):
        ca.issue_server("no-host", hosts=[])


def test_export_broker_files(ca, tmp_path):
    ca.issue_server("broker-x")
    files = ca.export_broker_files(tmp_path / "etc", "broker-x")
    assert sorted(files) == ["cafile", "certfile", "crlfile", "keyfile"]
    assert files["cafile"].read_bytes() == ca.ca_path.read_bytes()
    assert files["crlfile"].read_bytes() == ca.crl_path.read_bytes()
    assert _mode(files["keyfile"]) == 0o600 and _mode(files["certfile"]) == 0o644
    assert not (tmp_path / "etc" / "ca.key").exists()
    with pytest.raises(NotIssued, match="issue it with issue_server"):
        ca.export_broker_files(tmp_path / "etc", "never-issued")
    with pytest.raises(PkiError, match="does not exist"):
        ca.export_broker_files(tmp_path / "etc", "broker-x", owner="no-such-user-here")


# -- revocation --------------------------------------------------------------------------------


def test_revoke_puts_every_valid_certificate_of_the_device_on_the_crl(ca):
    cert_path, _ = ca.issue_device("STOLEN-1")
    pem = cert_path.read_bytes()
    bystander, _ = ca.issue_device("HONEST-1")
    serials = ca.revoke("STOLEN-1")
    assert serials == [_cert(cert_path).serial_number]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(serials[0]) is not None
    assert ca.is_revoked(pem) and not ca.is_revoked(bystander.read_bytes())
    assert ca.revoke("STOLEN-1") == []  # again: nothing more to revoke, the CRL keeps it
    assert ca.is_revoked(pem)
    # re-issuing would overwrite the revoked certificate's files: only with replace
    with pytest.raises(IdentityExists, match="not overwritten"):
        ca.issue_device("STOLEN-1")
    ca.issue_device("STOLEN-1", replace=True)
    assert not ca.is_revoked(cert_path.read_bytes())
    with pytest.raises(NotIssued, match="was ever issued"):
        ca.revoke("NEVER-SEEN")
    with pytest.raises(InvalidIdentity):
        ca.revoke("bad/id")


def test_refresh_crl_moves_next_update_and_keeps_the_list(tmp_path):
    ca = LocalCa.create(tmp_path, "x")
    ca.issue_device("R-1")
    ca.revoke("R-1")
    first = ca.crl_next_update()
    assert ca.refresh_crl(valid_days=400) == ca.crl_next_update() > first
    assert len(x509.load_pem_x509_crl(ca.crl_path.read_bytes())) == 1


def test_verify_refuses_a_certificate_of_another_ca(ca, tmp_path):
    other = LocalCa.create(tmp_path, "other")
    cert_path, _ = other.issue_device("A")
    with pytest.raises(PkiError, match="was not issued by CA AFC test CA"):
        ca.verify(cert_path.read_bytes())


def test_pki_errors_are_agent_errors():
    assert issubclass(PkiError, AgentError)
    for cls in (IdentityExists, InvalidIdentity, NotIssued):
        assert issubclass(cls, PkiError)


def test_logs_name_what_was_issued_and_never_a_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="edge_agent.pki")
    ca = LocalCa.create(tmp_path, "x")
    _, key_path = ca.issue_device("LOG-1")
    ca.revoke("LOG-1")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "cn=LOG-1" in text and "revoked" in text
    secret = key_path.read_text()
    assert "PRIVATE KEY" not in text
    assert not any(line in text for line in secret.splitlines()[1:-1])


def test_index_is_plain_json_for_an_operator(ca):
    data = json.loads((ca.dir / "index.json").read_text())
    assert data["v"] == 1 and data["ca"] == "AFC test CA"
    assert all(re.fullmatch(r"[0-9a-f]+", e["serial"]) for e in data["certificates"])


# -- the client TLS context -------------------------------------------------------------------


def test_client_context_pins_the_ca_and_checks_the_broker_name(ca):
    cert_path, key_path = ca.issue_device("CTX-1")
    ctx = client_ssl_context(ca.ca_path, cert_path, key_path)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # only our CA is trusted: no system store
    cas = ctx.get_ca_certs()
    assert len(cas) == 1 and dict(x[0] for x in cas[0]["subject"])["commonName"] == ca.name


def test_client_context_refuses_unsafe_or_wrong_files(ca, tmp_path):
    cert_path, key_path = ca.issue_device("CTX-2")
    _, other_key = ca.issue_device("CTX-3")
    os.chmod(key_path, 0o640)
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 0640\): chmod 600"):
        client_ssl_context(ca.ca_path, cert_path, key_path)
    os.chmod(key_path, 0o600)
    with pytest.raises(KeyFileError, match="does not belong to certificate"):
        client_ssl_context(ca.ca_path, cert_path, other_key)
    with pytest.raises(AgentConfigError, match="does not exist"):
        client_ssl_context(tmp_path / "missing.pem", cert_path, key_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(AgentConfigError, match="is not a PEM certificate"):
        client_ssl_context(garbage, cert_path, key_path)
    with pytest.raises(AgentConfigError, match="cannot be loaded"):
        client_ssl_context(ca.ca_path, garbage, key_path)
