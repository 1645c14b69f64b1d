"""``afc device``: the provisioning station — a device's identity, certificate and agent.toml.

A device needs, before it first talks to the broker:

* an Ed25519 key pair (it signs its transaction batches; the center registers the public key),
* an X.509 client certificate whose CN is its device id, from the fleet's local CA
  (:class:`edge_agent.pki.LocalCa`): the broker makes that CN the MQTT user name, and the
  pattern ACL of ``deploy/mosquitto/afc.acl`` then gives the device its own topics and no
  one else's, so no per-device ACL entry is ever written (this command checks the patterns
  cover the device, and that no ``user`` block quarantines it);
* an ``agent.toml`` that :func:`edge_agent.settings.load_settings` accepts, with relative
  paths, so the folder can be copied to the device as a whole.

``afc device revoke`` puts the device's certificates on the CRL; the broker refuses them
once it has the new CRL (docs/broker.md, "Revoking a device").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edge_agent.errors import AgentConfigError
from edge_agent.keys import generate_key_file, load_public_key, public_hex
from edge_agent.pki import IdentityExists, LocalCa, PkiError, check_device_id
from edge_agent.protocol import BUNDLE_KINDS
from firmware.durable import write_file

__all__ = [
    "AclRule",
    "DeviceError",
    "acl_allows",
    "device",
    "device_topic_rights",
    "parse_acl",
    "provision_device",
]

log = logging.getLogger("afc.device")

DEVICE_KINDS = ("validator", "topup", "camera-site")
#: The CA folder remembers the center's public key, so provisioning does not need it typed.
CENTER_PUBLIC_FILE = "center-public.hex"
DEFAULT_BROKER = "127.0.0.1:8883"
#: The shipped ACL, when running from a checkout.
SHIPPED_ACL = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "afc.acl"
INSTALLED_ACL = Path("/etc/mosquitto/afc.acl")

#: What a provisioned folder holds (every name relative to it).
FILES = {
    "agent": "agent.toml",
    "signing_key": "device.key",
    "cert": "client.pem",
    "tls_key": "client.key",
    "ca": "ca.pem",
    "site_identity": "identity.json",
}


class DeviceError(PkiError):
    """Provisioning cannot go ahead: an existing file, a broker address, an ACL that would
    not let the device in. The message names the file or option to fix."""


# -- the ACL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AclRule:
    """One line of a Mosquitto ACL file: ``user`` is None for a pattern line."""

    line: int
    user: str | None
    access: str  # read, write, readwrite, deny
    topic: str
    pattern: bool


_ACCESS = ("read", "write", "readwrite", "deny")


def parse_acl(path: str | os.PathLike[str]) -> list[AclRule]:
    """The rules of a Mosquitto 2.0 ACL file (``user``, ``topic``, ``pattern`` lines).

    ``topic`` lines before any ``user`` line apply to anonymous clients only and are kept
    with ``user=""``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DeviceError(f"cannot read ACL file {path}: {exc.strerror}; give --acl PATH") \
            from None
    rules: list[AclRule] = []
    user = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split(None, 1)
        if words[0] == "user" and len(words) == 2:
            user = words[1].strip()
            continue
        if words[0] in ("topic", "pattern") and len(words) == 2:
            rest = words[1].split(None, 1)
            access, topic = ("readwrite", words[1].strip())
            if rest[0] in _ACCESS and len(rest) == 2:
                access, topic = rest[0], rest[1].strip()
            pattern = words[0] == "pattern"
            rules.append(AclRule(number, None if pattern else user, access, topic, pattern))
            continue
        raise DeviceError(f"{path} line {number}: not an ACL line: {line[:60]!r}")
    return rules


def topic_matches(sub: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest), as the broker applies it."""
    s, t = sub.split("/"), topic.split("/")
    for i, level in enumerate(s):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(s) == len(t)


def acl_allows(rules: Iterable[AclRule], username: str, access: str, topic: str,
               client_id: str | None = None) -> bool:
    """Whether Mosquitto 2.0's default ACL check lets ``username`` ``access`` ``topic``.

    The user's own ``topic`` lines first, then the patterns (``%u`` and ``%c`` substituted);
    within each, the first matching line decides: ``deny`` refuses, a line whose access
    covers the request grants; nothing matching refuses.
    """
    client_id = username if client_id is None else client_id
    rules = list(rules)
    groups = ([r for r in rules if not r.pattern and r.user == username],
              [r for r in rules if r.pattern])
    for group in groups:
        for rule in group:
            filt = rule.topic
            if rule.pattern:
                filt = filt.replace("%u", username).replace("%c", client_id)
            if not topic_matches(filt, topic):
                continue
            if rule.access == "deny":
                return False
            if access in rule.access:  # "read"/"write" are both in "readwrite"
                return True
    return False


def device_topic_rights(device_id: str) -> list[tuple[str, str, bool]]:
    """The (access, topic, must_be_allowed) a device needs and must not have
    (docs/protocol.md, docs/broker.md)."""
    dev = f"afc/v1/dev/{device_id}"
    other = "afc/v1/dev/OTHER-DEVICE"
    need = [("write", f"{dev}/{leaf}", True)
            for leaf in ("txn", "telemetry", "event", "status", "reply")]
    need += [("read", f"{dev}/{leaf}", True) for leaf in ("ack", "cmd")]
    need += [("read", f"afc/v1/cfg/{kind}", True) for kind in BUNDLE_KINDS]
    need += [("read", f"afc/v1/cfg/{kind}/{device_id}", True)
             for kind in (*BUNDLE_KINDS, "camera-site")]
    refuse = [("write", f"{other}/txn", False), ("read", f"{other}/ack", False),
              ("read", "afc/v1/cfg/credit/OTHER-DEVICE", False),
              ("write", f"{dev}/ack", False), ("write", f"{dev}/cmd", False),
              ("write", "afc/v1/cfg/blacklist", False)]
    return need + refuse


def check_acl(path: Path, device_id: str) -> list[dict[str, Any]]:
    """Evaluate the ACL for the device; :class:`DeviceError` if it would not work."""
    rules = parse_acl(path)
    results = []
    for access, topic, expected in device_topic_rights(device_id):
        allowed = acl_allows(rules, device_id, access, topic)
        results.append({"access": access, "topic": topic, "allowed": allowed,
                        "ok": allowed == expected})
    bad = [r for r in results if not r["ok"]]
    if bad:
        quarantined = any(not r.pattern and r.user == device_id and r.access == "deny"
                          for r in rules)
        why = (f"a 'user {device_id}' block denies it (quarantined: remove that block and "
               "reload the broker)") if quarantined else "the pattern lines do not match"
        shown = "; ".join(f"{r['access']} {r['topic']} is "
                          f"{'allowed' if r['allowed'] else 'refused'}" for r in bad[:4])
        raise DeviceError(f"ACL {path} does not fit device {device_id}: {why}: {shown}")
    return results


def default_acl() -> Path:
    return SHIPPED_ACL if SHIPPED_ACL.is_file() else INSTALLED_ACL


# -- files ------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file complete or not at all, ``mode`` set before any byte is written;
    never over an existing file."""
    try:
        write_file(path, data, mode=mode, replace=False)
    except FileExistsError:
        raise DeviceError(f"{path} exists already: not overwritten") from None


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DeviceError(f"--broker {text!r}: give HOST:PORT, e.g. mqtt.afc.example:8883")
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host):
        raise DeviceError(f"--broker {text!r}: {host!r} is not a host name or IP address")
    return host, int(port)


def agent_toml(device_id: str, kind: str, host: str, port: int, center_public: str) -> str:
    """The agent configuration of a freshly provisioned device (paths relative to it)."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    return "\n".join([
        f"# agent.toml of {device_id}, written by 'afc device provision' on {today}.",
        "# Paths are relative to this file: copy the whole folder to the device.",
        "",
        "[device]",
        f"id = {_toml_str(device_id)}",
        f"kind = {_toml_str(kind)}",
        'db = "device.db"',
        "",
        "[identity]",
        f"key = {_toml_str(FILES['signing_key'])}",
        f"center_public = {_toml_str(center_public)}",
        "",
        "[mqtt]",
        f"host = {_toml_str(host)}",
        f"port = {port}",
        f"tls_ca = {_toml_str(FILES['ca'])}",
        f"tls_cert = {_toml_str(FILES['cert'])}",
        f"tls_key = {_toml_str(FILES['tls_key'])}",
        "",
    ])


def _passphrase(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise DeviceError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    if not data:
        raise DeviceError(f"passphrase file {path} is empty")
    return data


def center_public_for(ca_dir: Path, given: str | None) -> str:
    """The center's public key as 64 hex digits: given (hex or PEM file), or the one the CA
    folder recorded at 'ca init'."""
    if given:
        return public_hex(load_public_key(given))
    recorded = ca_dir / CENTER_PUBLIC_FILE
    if recorded.is_file():
        return public_hex(load_public_key(recorded.read_text().strip()))
    raise DeviceError(
        "no center public key: give --center-public HEX (what 'afc sim center keygen' printed), "
        f"or record it once with 'afc device ca init --center-public' ({recorded})"
    )


@dataclass(frozen=True)
class Provisioned:
    device_id: str
    kind: str
    out: Path
    public_key: str
    serial: int
    not_after: dt.datetime
    acl: Path
    acl_results: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device_id, "kind": self.kind, "out": str(self.out),
            "public_key": self.public_key, "certificate_serial": format(self.serial, "x"),
            "certificate_not_after": self.not_after.isoformat(),
            "files": {k: str(self.out / v) for k, v in FILES.items()
                      if (self.out / v).exists()},
            "acl": str(self.acl), "acl_checks": self.acl_results,
        }


@contextlib.contextmanager
def _cleanup_on_error(paths: list[Path]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise


def provision_device(ca: LocalCa, device_id: str, kind: str, out: str | os.PathLike[str], *,
                     broker: str = DEFAULT_BROKER, center_public: str,
                     acl: str | os.PathLike[str] | None = None, valid_days: int = 825,
                     replace: bool = False) -> Provisioned:
    """Everything a device needs, in folder ``out``; checked before it is returned.

    The ACL is checked first and every target file must be new, so a refusal leaves
    nothing behind; the device's TLS key is moved out of the CA folder (only the device
    keeps it). ``replace`` re-provisions a device that holds a valid certificate (lost or
    stolen device): the old certificate is revoked in the same step.
    """
    from edge_agent.settings import load_settings
    from edge_agent.tls import client_ssl_context

    check_device_id(device_id)
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"kind must be one of {', '.join(DEVICE_KINDS)}, not {kind!r}")
    host, port = parse_broker(broker)
    acl_path = Path(acl) if acl is not None else default_acl()
    acl_results = check_acl(acl_path, device_id)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    targets = {k: folder / v for k, v in FILES.items()
               if k != "site_identity" or kind == "camera-site"}
    existing = [str(p) for p in targets.values() if os.path.lexists(p)]
    if existing:
        raise DeviceError(f"{folder} already holds {', '.join(existing)}: provision into an "
                          "empty folder (nothing was changed)")
    written: list[Path] = []
    with _cleanup_on_error(written):
        now = dt.datetime.now(dt.UTC)
        # a device whose certificates were all revoked is provisioned afresh without
        # --replace: its old files in the CA folder are then just history
        held = any(e.cn == device_id and e.role == "device" and e.valid_at(now)
                   for e in ca.issued())
        try:
            cert_src, key_src = ca.issue_device(device_id, valid_days,
                                                replace=replace or not held)
        except IdentityExists as exc:
            raise DeviceError(f"{exc}. A device that lost its key: 'afc device provision "
                              f"{device_id} --replace' (revokes the old certificate)") from None
        written.append(targets["signing_key"])
        signing = generate_key_file(targets["signing_key"])
        for key, src, mode in (("cert", cert_src, 0o644), ("tls_key", key_src, 0o600),
                               ("ca", ca.ca_path, 0o644)):
            written.append(targets[key])
            _write_new(targets[key], src.read_bytes(), mode)
        # the TLS key now lives only with the device
        key_src.unlink()
        if kind == "camera-site":
            identity = {"dev": device_id, "key": secrets.token_hex(32)}
            written.append(targets["site_identity"])
            _write_new(targets["site_identity"], json.dumps(identity).encode(), 0o600)
        written.append(targets["agent"])
        _write_new(targets["agent"], agent_toml(device_id, kind, host, port,
                                                center_public).encode(), 0o644)
        settings = load_settings(targets["agent"])  # what the device will run with
        client_ssl_context(settings.mqtt.tls_ca, settings.mqtt.tls_cert, settings.mqtt.tls_key)
        if settings.device.id != device_id or settings.mqtt.port != port:
            raise AgentConfigError(f"{targets['agent']} does not read back as written")
    entry = next(e for e in reversed(ca.issued()) if e.cn == device_id and e.role == "device")
    log.info("provisioned device=%s kind=%s serial=%x out=%s", device_id, kind, entry.serial,
             folder)
    return Provisioned(device_id, kind, folder, public_hex(signing), entry.serial,
                       entry.not_after, acl_path, acl_results)


# -- the commands -----------------------------------------------------------------------------

_CA_HELP = "The CA folder (see 'afc device ca init'); keep it on the provisioning station."
_PASS_HELP = "File holding the CA key's passphrase (first line), if the CA key is encrypted."


@click.group()
def device() -> None:
    """Provision devices: identity key, client certificate, agent.toml; revoke them.

    \b
    Once per fleet:
      afc device ca init --ca /srv/afc-ca --name "Konya AFC CA" --center-public HEX
    Per device:
      afc device provision KNY-BUS-0042-V1 --ca /srv/afc-ca --kind validator \\
          --out ./KNY-BUS-0042-V1 --broker mqtt.afc.example:8883
      afc sim center register --device KNY-BUS-0042-V1 --public-key <printed key> ...
    A stolen device:
      afc device revoke KNY-BUS-0042-V1 --ca /srv/afc-ca     (then reload the broker)
    See docs/broker.md for the broker side.
    """


@device.group()
def ca() -> None:
    """The fleet's certificate authority (edge_agent.pki.LocalCa)."""


@ca.command("init")
@click.option("--ca", "ca_dir", required=True, metavar="DIR", help="Folder for the new CA.")
@click.option("--name", default="AFC fleet CA", show_default=True, help="The CA's name (CN).")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True,
              help="CA validity in days.")
@click.option("--center-public", metavar="HEX|PEM",
              help="The center's Ed25519 public key, recorded for every later provisioning.")
@click.option("--passphrase-file", metavar="PATH", help="Encrypt the CA key with the "
              "passphrase in this file (first line).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def ca_init(ca_dir: str, name: str, days: int, center_public: str | None,
            passphrase_file: str | None, as_json: bool) -> None:
    """Create the fleet's CA: ca.pem (give it to the broker and every device), ca.key
    (mode 0600; never leaves this folder), an empty CRL and the index of certificates."""
    center_hex = public_hex(load_public_key(center_public)) if center_public else None
    created = LocalCa.create(ca_dir, name, days, passphrase=_passphrase(passphrase_file))
    if center_hex:
        _write_new(created.dir / CENTER_PUBLIC_FILE, (center_hex + "\n").encode(), 0o644)
    info = {"ca": str(created.dir), "name": created.name, "ca_cert": str(created.ca_path),
            "crl": str(created.crl_path),
            "not_after": created.cert.not_valid_after_utc.isoformat(),
            "center_public": center_hex}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"created CA {created.name!r} in {created.dir} (valid until "
                   f"{created.cert.not_valid_after_utc:%Y-%m-%d})"
                   + (f"; center key {center_hex[:16]}… recorded" if center_hex else ""))


@device.command()
@click.argument("device_id", metavar="ID")
@click.option("--ca", "ca_dir", required=True, metavar="DIR", help=_CA_HELP)
@click.option("--kind", type=click.Choice(DEVICE_KINDS), required=True, help="What it is.")
@click.option("--out", required=True, metavar="DIR",
              help="Folder to write the device's files into (new or empty).")
@click.option("--broker", default=DEFAULT_BROKER, show_default=True, metavar="HOST:PORT",
              help="The broker's TLS listener as the device dials it (must be in the "
              "broker certificate's SAN).")
@click.option("--center-public", metavar="HEX|PEM",
              help="The center's Ed25519 public key (default: the one recorded in the CA).")
@click.option("--acl", metavar="PATH", help="Broker ACL file to check the device against "
              "(default: deploy/mosquitto/afc.acl, else /etc/mosquitto/afc.acl).")
@click.option("--days", type=click.IntRange(1, 36500), default=825, show_default=True,
              help="Certificate validity in days.")
@click.option("--replace", is_flag=True, help="Re-provision a device that holds a valid "
              "certificate: the old one is revoked.")
@click.option("--passphrase-file", metavar="PATH", help=_PASS_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def provision(device_id: str, ca_dir: str, kind: str, out: str, broker: str,
              center_public: str | None, acl: str | None, days: int, replace: bool,
              passphrase_file: str | None, as_json: bool) -> None:
    """Provision device ID: Ed25519 signing key, TLS client certificate (CN = ID), the CA
    certificate, agent.toml (and for a camera site its HMAC identity.json), all in --out.

    No ACL entry is written: the broker's pattern ACL gives every device its own topics
    (the CN is the MQTT user name). The command checks that the ACL file grants this
    device what it needs and nothing of another device's, and prints the result. Then
    register the printed public key with the center.
    """
    authority = LocalCa.load(ca_dir, passphrase=_passphrase(passphrase_file))
    center_hex = center_public_for(authority.dir, center_public)
    result = provision_device(authority, device_id, kind, out, broker=broker,
                              center_public=center_hex, acl=acl, valid_days=days,
                              replace=replace)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"provisioned {device_id} ({kind}) in {result.out}")
    click.echo(f"  certificate serial {result.serial:x}, valid until "
               f"{result.not_after:%Y-%m-%d}; CA {authority.name!r}")
    click.echo(f"  signing public key {result.public_key}")
    click.echo(f"  ACL {result.acl}: covered by its patterns (no entry to add):")
    for r in result.acl_results:
        state = "granted" if r["allowed"] else "refused"
        click.echo(f"    {r['access']:5} {r['topic']}  {state}")
    click.echo(f"next: afc sim center register --device {device_id} --kind {kind}"
               + ("" if kind == "camera-site" else f" --public-key {result.public_key}")
               + " --db CENTER_DB")


@device.command()
@click.argument("device_id", metavar="ID")
@click.option("--ca", "ca_dir", required=True, metavar="DIR", help=_CA_HELP)
@click.option("--passphrase-file", metavar="PATH", help=_PASS_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def revoke(device_id: str, ca_dir: str, passphrase_file: str | None, as_json: bool) -> None:
    """Revoke every valid certificate of device ID and rewrite the CA's crl.pem.

    The broker refuses the device once it has the new CRL: copy crl.pem to its crlfile
    and reload it (SIGHUP). A connection open before the reload stays up until it ends;
    to cut it at once quarantine the id in the ACL (docs/broker.md).
    """
    authority = LocalCa.load(ca_dir, passphrase=_passphrase(passphrase_file))
    serials = authority.revoke(device_id)
    info = {"device": device_id, "revoked": [format(s, "x") for s in serials],
            "crl": str(authority.crl_path),
            "crl_next_update": authority.crl_next_update().isoformat()}
    if as_json:
        click.echo(json.dumps(info))
        return
    if serials:
        click.echo(f"revoked {device_id}: serial(s) {', '.join(info['revoked'])}")
    else:
        click.echo(f"{device_id} had no valid certificate (already revoked)")
    click.echo(f"CRL {authority.crl_path} updated; copy it to the broker's crlfile and "
               "reload mosquitto")


if __name__ == "__main__":  # python -m tools.device_cmd device ... (until it is registered)
    from tools.cli import AfcGroup

    AfcGroup(name="afc", commands={"device": device})(prog_name="afc")
