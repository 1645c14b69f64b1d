"""``afc bundle``: sign, verify and publish configuration bundles.

A bundle is what devices apply to their database: a fare table, a blacklist (full or
delta), an action list, a dealer credit allowance, agent settings. Devices apply one only if
it verifies against the center key they pin and its version is newer than theirs, so an
operator signs with the center key and always raises the version.
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import click

from edge_agent.errors import ProtocolError
from edge_agent.keys import load_private_key, load_public_key
from edge_agent.protocol import (
    BUNDLE_KINDS,
    MAX_BUNDLE_BYTES,
    Bundle,
    cfg_topic,
    decode_bundle,
    encode_bundle,
)
from simulators.center.errors import CenterError

__all__ = ["bundle", "read_body"]


def _uid(value: Any, where: str) -> bytes | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise CenterError(f"{where}: a UID must be hex text or empty")
    try:
        return bytes.fromhex(value.replace(":", ""))
    except ValueError:
        raise CenterError(f"{where}: UID {value!r} is not hex") from None


def _entries(items: Any, where: str) -> list[tuple[int, int, bytes | None]]:
    if not isinstance(items, list):
        raise CenterError(f"{where}: entries must be a list of [card_number, reason, uid_hex]")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = [item.get("card_number"), item.get("reason", 0), item.get("uid")]
        if not isinstance(item, list) or len(item) not in (2, 3):
            raise CenterError(f"{where}: entry {i + 1} must be [card_number, reason, uid_hex]")
        uid = _uid(item[2] if len(item) == 3 else None, f"{where} entry {i + 1}")
        out.append((item[0], item[1], uid))
    return out


def _blacklist_csv(path: Path) -> list[tuple[int, int, bytes | None]]:
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), 1):
            if not row or row[0].strip().startswith("#") or row[0].strip() == "card_number":
                continue
            try:
                card = int(row[0])
                reason = int(row[1]) if len(row) > 1 and row[1].strip() else 0
            except ValueError:
                raise CenterError(f"{path}:{line_no}: card_number and reason must be "
                                  "integers") from None
            uid = _uid(row[2].strip() if len(row) > 2 else None, f"{path}:{line_no}")
            out.append((card, reason, uid))
    return out


def read_body(kind: str, path: str | Path) -> Any:
    """A bundle body from an operator's file (see ``afc bundle sign --help``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CenterError(f"cannot read {path}: {exc}") from None
    if kind == "fares":
        from firmware.core.fares import FareTable

        FareTable.from_toml(text)  # refuse a tariff the devices would refuse
        name = tomllib.loads(text).get("name") or path.stem
        return {"name": str(name), "toml": text}
    if kind == "blacklist" and path.suffix.lower() == ".csv":
        return {"entries": _blacklist_csv(path)}
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CenterError(f"{path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise CenterError(f"{path} must hold an object")
    if kind == "blacklist":
        return {"entries": _entries(data.get("entries"), str(path))}
    if kind == "blacklist-delta":
        remove = data.get("remove", [])
        if not isinstance(remove, list):
            raise CenterError(f"{path}: 'remove' must be a list of card numbers")
        return {"add": _entries(data.get("add", []), str(path)), "remove": remove}
    if kind == "actions":
        return {"actions": data.get("actions")}
    if kind == "credit":
        return {"allowance": data.get("allowance", data)}
    return {"settings": data.get("settings", data)}


def _summary(b: Bundle, size: int) -> dict[str, Any]:
    body = b.body
    counts = {
        "blacklist": lambda: {"entries": len(body["entries"])},
        "blacklist-delta": lambda: {"add": len(body["add"]), "remove": len(body["remove"])},
        "actions": lambda: {"actions": len(body["actions"])},
        "fares": lambda: {"name": body["name"]},
        "credit": lambda: {"allowance_id": body["allowance"]["allowance_id"]},
        "agent": lambda: {"settings": sorted(body["settings"])},
    }[b.kind]()
    return {"kind": b.kind, "version": b.version, "base": b.base, "target": b.target,
            "expires": b.expires, "ts": b.ts, "bytes": size, "topic": cfg_topic(b.kind, b.target),
            **counts}


@click.group()
def bundle() -> None:
    """Sign, verify and publish configuration bundles (docs/protocol.md, "Bundle").

    \b
    Typical use:
      afc bundle sign --kind fares --version 2025082701 --key center.key \\
          --in konya-2025.toml --out fares.bundle
      afc bundle verify --center-public <hex> --in fares.bundle
      afc bundle publish --broker 127.0.0.1:1883 --in fares.bundle
    Devices apply a bundle only if it verifies against the center key they pin and its
    version is newer than theirs: always raise --version.
    """


@bundle.command("sign")
@click.option("--kind", type=click.Choice(BUNDLE_KINDS), required=True)
@click.option("--version", "version", type=click.IntRange(1), required=True,
              help="Must be newer than the version devices hold (rollback is refused). "
              "Full blacklists and their deltas share one version sequence.")
@click.option("--base", type=click.IntRange(0), default=None,
              help="blacklist-delta only: the version this delta applies on.")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The center's Ed25519 private key file (mode 0600).")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="fares: the tariff TOML. blacklist: CSV 'card_number,reason,uid_hex' or "
              'JSON {"entries": [[card, reason, "uid hex" or null], ...]}. blacklist-delta: '
              'JSON {"add": [...], "remove": [card, ...]}. actions: JSON {"actions": [...]}. '
              "credit: the allowance JSON. agent: settings as TOML or JSON.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the signed bundle (binary CBOR).")
@click.option("--target", default=None, help="Device id, for a bundle meant for one device.")
@click.option("--expires-in-s", type=click.IntRange(1), default=None,
              help="Devices refuse the bundle after this many seconds.")
def sign(kind: str, version: int, base: int | None, key_path: str, in_path: str,
         out_path: str, target: str | None, expires_in_s: int | None) -> None:
    """Sign a bundle with the center key; prints a summary (JSON)."""
    key = load_private_key(key_path)
    body = read_body(kind, in_path)
    now = time.time_ns() // 1_000_000
    expires = None if expires_in_s is None else now + expires_in_s * 1000
    b = Bundle(kind, version, body, now, base, target, expires)
    payload = encode_bundle(b, key)
    Path(out_path).write_bytes(payload)
    click.echo(json.dumps(_summary(b, len(payload))))


@bundle.command("verify")
@click.option("--center-public", required=True,
              help="The center's public key: 64 hex digits or a PEM file.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--device", "device_id", default=None,
              help="Also check the bundle is for this device (or for the whole fleet).")
def verify(center_public: str, in_path: str, device_id: str | None) -> None:
    """Check a bundle's signature, expiry and contents as a device would; prints a summary.

    Exit status 1 with the reason if a device would refuse it (the version check against a
    device's current version is the device's own).
    """
    payload = _read_payload(in_path)
    b = decode_bundle(payload, load_public_key(center_public),
                      now_ms=time.time_ns() // 1_000_000, device_id=device_id)
    click.echo(json.dumps({"valid": True, **_summary(b, len(payload))}))


def _read_payload(path: str) -> bytes:
    data = Path(path).read_bytes()
    if len(data) > MAX_BUNDLE_BYTES:
        raise ProtocolError(f"{path}: {len(data)} bytes is more than a bundle may be")
    return data


def _topic_of(payload: bytes) -> str:
    """The topic a signed bundle belongs on, read from its (unverified) header."""
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:  # any garbage: cbor2 raises several types
        raise ProtocolError(f"not a bundle: {exc!s:.80}") from None
    if not isinstance(msg, dict) or msg.get("t") != "bundle":
        raise ProtocolError("not a bundle")
    return cfg_topic(msg.get("kind"), msg.get("target"))


@bundle.command("publish")
@click.option("--broker", required=True, help="Broker as HOST:PORT, e.g. 127.0.0.1:1883.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--center-public", default=None,
              help="Verify against this key before publishing (recommended).")
def publish(broker: str, in_path: str, center_public: str | None) -> None:
    """Publish a signed bundle retained on afc/v1/cfg/KIND[/DEVICE], QoS 1.

    Retained: every device gets it on connect, also one that was offline when it was sent.
    Publishing an older version is harmless (devices refuse rollbacks) but replaces the
    retained message, so newly connecting devices would miss the newer one: publish the
    newest.
    """
    from simulators.center.mqtt import client_id, connect, parse_broker

    payload = _read_payload(in_path)
    if center_public is not None:
        decode_bundle(payload, load_public_key(center_public), now_ms=time.time_ns() // 1_000_000)
    topic = _topic_of(payload)
    address = parse_broker(broker)

    async def send() -> None:
        async with connect(address, client_id("bundle")) as client:
            await client.publish(topic, payload, qos=1, retain=True, timeout=30)

    try:
        asyncio.run(send())
    except aiomqtt.MqttError as exc:
        raise CenterError(f"cannot publish to {broker}: {exc}") from None
    click.echo(f"published {len(payload)} bytes retained on {topic}")
