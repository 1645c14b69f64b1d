"""A small local certificate authority for the broker, the devices and the center.

Why a PKI of our own: the broker (Mosquitto) authenticates every client by its TLS client
certificate and uses the certificate's CN as the MQTT user name (``use_identity_as_username``);
the ACL (``deploy/mosquitto/afc.acl``) then ties user ``X`` to the topics
``afc/v1/dev/X/...``. So a device's identity on the broker *is* the CN this module writes, and
the only way to get one is from the CA kept here. Nothing but ``cryptography`` is used: no
``openssl`` command line, no OpenSSL config files.

Algorithms: ECDSA on P-256 with SHA-256 for every key and signature. Mosquitto 2.0.11 on
OpenSSL 3 (Debian 12) also accepts Ed25519 certificates, but many MQTT/TLS stacks that a field
device or a camera-site microcontroller carries (mbedTLS, older OpenSSL, Java) do not, while
P-256 works everywhere.

Layout of a CA folder (every file written atomically, keys mode 0600)::

    ca.pem  ca.key          the CA (ca.pem goes to every device and to the broker's cafile)
    crl.pem                 the revocation list (the broker's crlfile); written at creation
    index.json              every certificate issued: serial, CN, role, expiry, revocation
    server/<name>.pem .key  broker certificates (serverAuth, SAN = the hosts clients dial)
    devices/<id>.pem .key   device certificates (clientAuth, CN = device id)
    center/<cn>.pem .key    center clients (clientAuth, CN = ``<name>@center``)

Center identities end in ``@center``: ``@`` is outside the device id alphabet
(``docs/protocol.md``), so no device can ever be issued a certificate that the broker would
take for a center client, whatever its id. Issue 7's ``afc device provision`` builds on
:meth:`LocalCa.issue_device`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.durable import write_file

from .errors import AgentError, KeyFileError

__all__ = [
    "CENTER_SUFFIX",
    "DEVICE_ID_RE",
    "IdentityExists",
    "InvalidIdentity",
    "IssuedCert",
    "LocalCa",
    "NotIssued",
    "PkiError",
    "check_device_id",
]

log = logging.getLogger(__name__)

#: The device id rule of ``docs/protocol.md`` (the same as the device database's).
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Center client CNs are ``<name>@center``; ``<name>`` follows this rule.
CENTER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
CENTER_SUFFIX = "@center"
#: A broker certificate's name (a file name and the CN): DNS-like.
SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")

DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 825
DEFAULT_SERVER_DAYS = 825
DEFAULT_CENTER_DAYS = 825
#: How long a CRL stays valid. OpenSSL refuses *every* client once the broker's CRL is past
#: its nextUpdate, so it is long, and :meth:`LocalCa.refresh_crl` re-signs it (monthly, from
#: cron): see docs/broker.md.
DEFAULT_CRL_DAYS = 365
#: Certificates start this long before "now": a device whose clock is a little behind the
#: broker's (no RTC, NTP not yet synced) still accepts a certificate issued a minute ago.
BACKDATE = dt.timedelta(hours=1)

ROLE_SERVER = "server"
ROLE_DEVICE = "device"
ROLE_CENTER = "center"
_ROLE_DIRS = {ROLE_SERVER: "server", ROLE_DEVICE: "devices", ROLE_CENTER: "center"}


class PkiError(AgentError):
    """The local CA cannot do what was asked: a missing or damaged CA folder, a bad name."""


class InvalidIdentity(PkiError):
    """A device id, center name or host that cannot go into a certificate."""


class IdentityExists(PkiError):
    """A valid certificate for this name exists already; nothing was overwritten."""


class NotIssued(PkiError):
    """No certificate was ever issued to this name (nothing to revoke)."""


@dataclass(frozen=True)
class IssuedCert:
    """One entry of the CA's index: what was issued to whom, and whether it still counts."""

    serial: int
    cn: str
    role: str
    not_after: dt.datetime
    revoked_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": format(self.serial, "x"),
            "cn": self.cn,
            "role": self.role,
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IssuedCert:
        revoked = obj.get("revoked_at")
        return cls(
            serial=int(obj["serial"], 16),
            cn=str(obj["cn"]),
            role=str(obj["role"]),
            not_after=dt.datetime.fromisoformat(obj["not_after"]),
            revoked_at=dt.datetime.fromisoformat(revoked) if revoked else None,
        )

    def valid_at(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and self.not_after > now


def check_device_id(device_id: str) -> str:
    """``device_id`` if it satisfies the protocol's rule, else :class:`InvalidIdentity`."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidIdentity(
            f"device id {device_id!r} is not valid: use 1-64 characters A-Z a-z 0-9 . _ - "
            "(docs/protocol.md)")
    return device_id


def center_cn(name: str) -> str:
    """The CN of center client ``name`` (``ingest`` -> ``ingest@center``)."""
    if not isinstance(name, str) or not CENTER_NAME_RE.fullmatch(name):
        raise InvalidIdentity(
            f"center client name {name!r} is not valid: use 1-32 characters a-z 0-9 - "
            "starting with a letter or digit (the CN becomes NAME@center)")
    return name + CENTER_SUFFIX


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool,
                  owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, rename.

    ``mode`` (and ``owner``, a (uid, gid)) are set on the temporary file before any byte is
    written, so a key never exists on disk with wider permissions or the wrong owner.
    Without ``overwrite`` an existing file is an error (the final link is made with
    ``os.link``, which refuses an existing target, so two provisioning runs racing cannot
    both win).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_file(path, data, mode=mode, replace=overwrite, owner=owner)
    except FileExistsError:
        raise IdentityExists(f"{path} exists already: not overwritten") from None


def _check_key_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:04o}): chmod 600 {path}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class LocalCa:
    """A CA folder: issue broker, device and center certificates; revoke them with a CRL.

    Every change takes an exclusive ``flock`` on ``<dir>/.lock``, so two provisioning
    processes on one station cannot hand out the same name twice or lose an index entry.
    """

    def __init__(self, directory: Path, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey) -> None:
        self.dir = directory
        self.cert = cert
        self._key = key

    # -- files ----------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The CA certificate: a device's and the broker's ``cafile``."""
        return self.dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        """The revocation list: the broker's ``crlfile``."""
        return self.dir / "crl.pem"

    @property
    def name(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def paths(self, role: str, cn: str) -> tuple[Path, Path]:
        """(certificate, key) file of ``cn`` issued in ``role``."""
        folder = self.dir / _ROLE_DIRS[role]
        return folder / f"{cn}.pem", folder / f"{cn}.key"

    # -- create / load --------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], name: str,
               valid_days: int = DEFAULT_CA_DAYS, *,
               passphrase: bytes | None = None) -> LocalCa:
        """A new CA in ``directory`` (created; must not hold a CA already).

        ``passphrase`` encrypts ``ca.key`` at rest (the CA only signs during provisioning,
        so an operator can type it); without it the key is protected by mode 0600 alone.
        """
        if not name or len(name) > 64:
            raise InvalidIdentity("CA name must be 1-64 characters")
        if valid_days < 1:
            raise PkiError("CA validity must be at least one day")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "ca.pem").exists() or (folder / "ca.key").exists():
            raise IdentityExists(f"{folder} holds a CA already: load it, or choose an empty "
                                 "folder")
        key = _new_key()
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        with _locked(folder):
            _write_atomic(folder / "ca.key", _key_pem(key, passphrase), mode=0o600,
                          overwrite=False)
            _write_atomic(folder / "ca.pem", _cert_pem(cert), mode=0o644, overwrite=False)
            ca = cls(folder, cert, key)
            ca._save_index([])
            ca._write_crl([])
        log.info("pki: CA %r created in %s", name, folder)
        return ca

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *,
             passphrase: bytes | None = None) -> LocalCa:
        """The CA in ``directory``; refuses a key readable by others or not matching."""
        folder = Path(directory)
        cert_path, key_path = folder / "ca.pem", folder / "ca.key"
        if not cert_path.is_file() or not key_path.is_file():
            raise PkiError(f"no CA in {folder} (ca.pem and ca.key expected): create one with "
                           "LocalCa.create")
        _check_key_mode(key_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise PkiError(f"{cert_path} is not a PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase)
        except TypeError:
            raise KeyFileError(f"{key_path} is encrypted: give the CA passphrase") from None
        except ValueError:
            raise KeyFileError(f"{key_path} cannot be read: damaged file or wrong "
                               "passphrase") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
                key.public_key().public_numbers() != cert.public_key().public_numbers()):
            raise KeyFileError(f"{key_path} is not the key of {cert_path}")
        if not (folder / "index.json").is_file():
            raise PkiError(f"{folder}/index.json is missing: the CA folder is incomplete")
        return cls(folder, cert, key)

    # -- issuing --------------------------------------------------------------------------

    def issue_server(self, name: str, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                     valid_days: int = DEFAULT_SERVER_DAYS, *,
                     replace: bool = False) -> tuple[Path, Path]:
        """A broker certificate: CN ``name``, SAN = ``hosts`` (IP addresses and DNS names).

        Clients check the host they dial against the SAN (:mod:`edge_agent.tls`), so list
        every name and address devices use for the broker.
        """
        if not isinstance(name, str) or not SERVER_NAME_RE.fullmatch(name):
            raise InvalidIdentity(f"server name {name!r} is not valid: use a DNS-like name")
        if not hosts:
            raise InvalidIdentity("a server certificate needs at least one host name or IP")
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})", host or ""):
                    raise InvalidIdentity(f"host {host!r} is neither an IP address nor a "
                                          "DNS name") from None
                sans.append(x509.DNSName(host))
        return self._issue(ROLE_SERVER, name, valid_days, replace=replace,
                           eku=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)

    def issue_device(self, device_id: str, valid_days: int = DEFAULT_DEVICE_DAYS, *,
                     replace: bool = False) -> tuple[Path, Path]:
        """A device's client certificate, CN = ``device_id``: (cert path, key path).

        Refuses (:class:`IdentityExists`) while the device holds a valid certificate; with
        ``replace`` the old one is revoked first (re-provisioning after a lost key), so a
        device never has two certificates that the broker accepts.
        """
        check_device_id(device_id)
        return self._issue(ROLE_DEVICE, device_id, valid_days, replace=replace,
                           eku=ExtendedKeyUsageOID.CLIENT_AUTH)

    def issue_center(self, name: str, valid_days: int = DEFAULT_CENTER_DAYS, *,
                     replace: bool = False) -> tuple[Path, Path]:
        """A center client certificate, CN ``<name>@center`` (``ingest-1``, ``publisher``).

        The ACL grants rights by that CN, so every name used here needs a ``user`` block in
        ``deploy/mosquitto/afc.acl`` (shipped: ``ingest-1``, ``ingest-2``, ``publisher``).
        One certificate per process: the broker makes the CN the client id.
        """
        cn = center_cn(name)
        return self._issue(ROLE_CENTER, cn, valid_days, replace=replace,
                           eku=ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(self, role: str, cn: str, valid_days: int, *, replace: bool,
               eku: x509.ObjectIdentifier,
               sans: list[x509.GeneralName] | None = None) -> tuple[Path, Path]:
        if valid_days < 1:
            raise PkiError("certificate validity must be at least one day")
        now = _now()
        not_after = now + dt.timedelta(days=valid_days)
        ca_end = self.cert.not_valid_after_utc
        if not_after > ca_end:
            raise PkiError(f"{role} certificate {cn!r} would outlive the CA (CA valid until "
                           f"{ca_end:%Y-%m-%d}): shorten valid_days or renew the CA")
        cert_path, key_path = self.paths(role, cn)
        with _locked(self.dir):
            index = self._load_index()
            current = [e for e in index if e.cn == cn and e.role == role and e.valid_at(now)]
            if current and not replace:
                raise IdentityExists(
                    f"{role} {cn!r} already has a valid certificate (serial "
                    f"{current[0].serial:x}, until {current[0].not_after:%Y-%m-%d}): revoke it "
                    "first or re-issue with replace")
            if not replace and (cert_path.exists() or key_path.exists()):
                raise IdentityExists(f"{cert_path} or its key exists already: not overwritten")
            key = _new_key()
            serial = x509.random_serial_number()
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(now - BACKDATE)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans),
                                                critical=False)
            cert = builder.sign(self._key, hashes.SHA256())
            superseded = [e.serial for e in current]
            if superseded:
                index = [IssuedCert(e.serial, e.cn, e.role, e.not_after, now)
                         if e.serial in superseded else e for e in index]
            index.append(IssuedCert(serial, cn, role, not_after))
            # Key first: a crash between the two leaves a key without a certificate, which
            # a re-run with replace cleans up; never a certificate without its key.
            _write_atomic(key_path, _key_pem(key), mode=0o600, overwrite=replace)
            _write_atomic(cert_path, _cert_pem(cert), mode=0o644, overwrite=replace)
            self._save_index(index)
            if superseded:
                self._write_crl(index)
        log.info("pki: issued role=%s cn=%s serial=%x not_after=%s superseded=%s", role, cn,
                 serial, not_after.isoformat(), [format(s, "x") for s in superseded])
        return cert_path, key_path

    # -- revocation -----------------------------------------------------------------------

    def revoke(self, device_id: str, *, role: str = ROLE_DEVICE) -> list[int]:
        """Revoke every valid certificate of ``device_id`` and rewrite ``crl.pem``.

        Returns the serials revoked. The broker reads its ``crlfile`` at start: restart it
        (or reload, see docs/broker.md) to refuse the device. ``role`` revokes a center
        client (CN ``name@center``) or a broker certificate instead.
        """
        cn = check_device_id(device_id) if role == ROLE_DEVICE else device_id
        now = _now()
        with _locked(self.dir):
            index = self._load_index()
            if not any(e.cn == cn and e.role == role for e in index):
                raise NotIssued(f"no {role} certificate was ever issued to {cn!r}")
            serials = [e.serial for e in index
                       if e.cn == cn and e.role == role and e.revoked_at is None]
            index = [IssuedCert(e.serial, e.cn, e.role, e.not_after, now)
                     if e.serial in serials else e for e in index]
            self._save_index(index)
            self._write_crl(index)
        log.warning("pki: revoked role=%s cn=%s serials=%s", role, cn,
                    [format(s, "x") for s in serials])
        return serials

    def refresh_crl(self, valid_days: int = DEFAULT_CRL_DAYS) -> dt.datetime:
        """Re-sign ``crl.pem`` with a new nextUpdate (returned). Run it well before the
        current one passes: an expired CRL makes the broker refuse every client."""
        with _locked(self.dir):
            return self._write_crl(self._load_index(), valid_days)

    def crl_next_update(self) -> dt.datetime:
        """When the current CRL expires: monitor it (docs/broker.md)."""
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        next_update = crl.next_update_utc
        if next_update is None:  # pragma: no cover - we always write one
            raise PkiError(f"{self.crl_path} has no nextUpdate")
        return next_update

    def issued(self) -> list[IssuedCert]:
        """Every certificate in the index, oldest first."""
        return self._load_index()

    def is_revoked(self, cert_pem: bytes) -> bool:
        """Whether the certificate is on this CA's current CRL (signature checked)."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        if not crl.is_signature_valid(self.cert.public_key()):
            raise PkiError(f"{self.crl_path} is not signed by this CA")
        return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    def verify(self, cert_pem: bytes) -> x509.Certificate:
        """The certificate if this CA signed it (signature and issuer), else PkiError."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PkiError(f"certificate {cert.subject.rfc4514_string()} was not issued by "
                           f"CA {self.name}: {exc or 'bad signature'}") from None
        return cert

    def export_broker_files(self, dest: str | os.PathLike[str], server_name: str, *,
                            owner: str | None = None) -> dict[str, Path]:
        """Copy what the broker needs into ``dest`` (e.g. ``/etc/mosquitto/afc``).

        Writes ``ca.pem``, ``crl.pem``, ``server.pem`` and ``server.key`` (0600) and returns
        them by their mosquitto option names (``cafile``, ``crlfile``, ``certfile``,
        ``keyfile``). The CA key never leaves the CA folder. Run it again after
        :meth:`revoke` (then reload the broker). Mosquitto started as root reads these after
        dropping to its ``user`` (``mosquitto`` on Debian), so pass ``owner="mosquitto"``
        when running as root: the key is then chowned to that user.
        """
        cert_src, key_src = self.paths(ROLE_SERVER, server_name)
        if not cert_src.is_file() or not key_src.is_file():
            raise NotIssued(f"no server certificate {server_name!r} in {self.dir}: issue it "
                            "with issue_server first")
        key_owner: tuple[int, int] | None = None
        if owner is not None:
            try:
                entry = pwd.getpwnam(owner)
            except KeyError:
                raise PkiError(f"user {owner!r} does not exist on this machine") from None
            if os.geteuid() not in (0, entry.pw_uid):
                raise PkiError(f"only root can hand the broker key to user {owner!r}: run as "
                               "root or without owner")
            key_owner = (entry.pw_uid, entry.pw_gid)
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
        out = {"cafile": folder / "ca.pem", "crlfile": folder / "crl.pem",
               "certfile": folder / "server.pem", "keyfile": folder / "server.key"}
        with _locked(self.dir):
            _write_atomic(out["cafile"], self.ca_path.read_bytes(), mode=0o644, overwrite=True)
            _write_atomic(out["crlfile"], self.crl_path.read_bytes(), mode=0o644,
                          overwrite=True)
            _write_atomic(out["certfile"], cert_src.read_bytes(), mode=0o644, overwrite=True)
            _write_atomic(out["keyfile"], key_src.read_bytes(), mode=0o600, overwrite=True,
                          owner=key_owner)
        return out

    # -- internals ------------------------------------------------------------------------

    def _write_crl(self, index: list[IssuedCert],
                   valid_days: int = DEFAULT_CRL_DAYS) -> dt.datetime:
        now = _now()
        next_update = now + dt.timedelta(days=valid_days)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(next_update)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
        )
        for entry in index:
            # Expired certificates stay listed: cheap, and a broker whose clock is wrong
            # still refuses them.
            if entry.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(entry.revoked_at)
                    .build())
        crl = builder.sign(self._key, hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM),
                      mode=0o644, overwrite=True)
        return next_update

    def _load_index(self) -> list[IssuedCert]:
        path = self.dir / "index.json"
        try:
            data = json.loads(path.read_text())
            return [IssuedCert.from_json(e) for e in data["certificates"]]
        except FileNotFoundError:
            raise PkiError(f"{path} is missing: the CA folder is incomplete") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{path} is damaged ({exc}): restore it from the CA backup") from None

    def _save_index(self, index: list[IssuedCert]) -> None:
        data = {"v": 1, "ca": self.name, "certificates": [e.to_json() for e in index]}
        _write_atomic(self.dir / "index.json",
                      (json.dumps(data, indent=1) + "\n").encode(), mode=0o644,
                      overwrite=True)

    def __repr__(self) -> str:
        return f"<LocalCa {self.name!r} in {self.dir}>"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the CA folder for one change (blocks while another holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
