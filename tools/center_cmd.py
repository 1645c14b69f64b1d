"""``afc sim center``: run the reference center, register devices, reconcile, show status.

Errors are the core's own (:class:`~simulators.center.errors.CenterError`,
:class:`~edge_agent.errors.AgentError`), which ``afc`` prints as one line with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import TYPE_CHECKING

import click

from edge_agent.keys import generate_key_file, load_private_key, load_public_key, public_hex
from simulators.center.errors import CenterError
from simulators.center.store import DEVICE_KINDS, SqliteCenterStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from simulators.center.mqtt import BrokerAddress

__all__ = ["center"]

_BROKER_HELP = "Broker as HOST:PORT, e.g. 127.0.0.1:1883."
_DB_HELP = "The center's SQLite database (created if missing; WAL mode, one file)."


@click.group()
def center() -> None:
    """The reference center: ingest, configuration publisher, commands, reconciliation.

    \b
    A first run on a lab machine:
      afc sim center keygen --out center.key       # the center's Ed25519 key (mode 0600)
      afc sim center register --db center.db --device KNY-BUS-0042-V1 \\
          --kind validator --public-key <the device's public key hex>
      afc sim center run --broker 127.0.0.1:1883 --db center.db --key center.key
    then, while devices deliver: 'afc sim center status' and 'afc sim center report'.
    Devices pin the center's public key ('afc sim center keygen' prints it).
    See docs/protocol.md for the topics and messages.
    """


@center.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the new private key (PKCS#8 PEM, mode 0600). An existing "
              "file is never overwritten.")
def keygen(out: str) -> None:
    """Create an Ed25519 key pair (for the center or a device) and print its public key.

    The public key (64 hex digits) is what devices pin (center key) or what the center
    registers (device key). The private key never leaves the file.
    """
    key = generate_key_file(out)
    click.echo(public_hex(key))


@center.command("register")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--device", "device_id", required=True, help="Device id (its MQTT topic name).")
@click.option("--public-key", "public_key", default=None,
              help="The device's Ed25519 public key: 64 hex digits or a PEM file. Omit it for "
              "a camera site (no Ed25519; its JSON may be HMAC-signed).")
@click.option("--kind", type=click.Choice(DEVICE_KINDS), default="validator", show_default=True,
              help="What the device is.")
def register(db: str, device_id: str, public_key: str | None, kind: str) -> None:
    """Add a device to the registry, or replace its key (key rotation).

    Batches from a device that is not registered are logged and never acked: register a
    device before it delivers, or its records wait in its outbox until you do.
    """
    from edge_agent.protocol import dev_topic

    dev_topic(device_id, "txn")  # validates the id as the broker and devices will
    key_hex = public_hex(load_public_key(public_key)) if public_key else None
    with SqliteCenterStore(db) as store:
        store.register_device(device_id, kind, key_hex)
    click.echo(f"registered {device_id} ({kind})")


@center.command("run")
@click.option("--broker", required=True, help=_BROKER_HELP)
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The center's Ed25519 private key file (mode 0600): signs acks, bundles and "
              "commands.")
@click.option("--workers", type=click.IntRange(0, 64), default=1, show_default=True,
              help="Ingest worker processes sharing $share/ingest/afc/v1/dev/+/txn and the "
              "database; 0 runs one ingest worker inside this process.")
@click.option("--devices", "devices_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="A devices.toml to register at start: [[device]] tables with "
              "id, kind and public_key (hex).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              default="INFO", show_default=True)
def run(broker: str, db: str, key_path: str, workers: int, devices_file: str | None,
        log_level: str) -> None:
    """Run the center until SIGTERM or SIGINT (Ctrl-C), then stop cleanly.

    Batches are verified against the registered device keys, stored exactly once, and only
    then acked; status, telemetry and events are kept for 'status'; a device's reload
    request gets the full bundle republished. Logs go to stderr, one line per event, with
    the device id and sequence numbers.
    """
    from simulators.center.mqtt import parse_broker
    from simulators.center.service import CenterService

    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    address = parse_broker(broker)

    async def serve() -> None:
        service = CenterService(address, db, key_path, workers=workers,
                                devices_file=devices_file, broker_text=broker,
                                log_level=log_level)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(serve())


@center.command("status")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON array, one object per device.")
@click.option("--stale-s", type=click.IntRange(1), default=300, show_default=True,
              help="A device not heard from for this long is shown offline.")
def status(db: str, as_json: bool, stale_s: int) -> None:
    """Devices and camera sites: online/offline, last telemetry, open alarms."""
    from simulators.center.status import fleet_status, format_status, status_json

    with SqliteCenterStore(db) as store:
        entries = fleet_status(store, stale_s=stale_s)
    if as_json:
        click.echo(json.dumps(status_json(entries), indent=2, ensure_ascii=False))
    else:
        click.echo(format_status(entries))


@center.command("report")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option("--min-travel-s", type=click.IntRange(1), default=120, show_default=True,
              help="The same card at two vehicles closer in time than this is a suspected "
              "clone.")
@click.option("--daily-limit-tl", type=click.IntRange(0), default=50_000, show_default=True,
              help="Dealers' per-day top-up limit in TL where the allowance in force records "
              "none (the terminals' [dealer] daily_limit).")
def report(db: str, as_json: bool, min_travel_s: int, daily_limit_tl: int) -> None:
    """Reconcile: gaps in each device's sequence, and per card counter and balance
    continuity across all devices; suspected clones with a proposed blacklist delta;
    per dealer, top-ups not matched by the credit the center issued (no allowance, another
    dealer's, outside its validity, over its amount, over the per-day limit) and batches
    refused at ingest.

    Exit status is 0 even with findings: the report is for an operator to read.
    """
    from simulators.center.report import build_report

    with SqliteCenterStore(db) as store:
        result = build_report(store, min_travel_s=min_travel_s,
                              default_daily_limit=daily_limit_tl * 100)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.to_text())


@center.group("allowance")
def allowance() -> None:
    """Dealer credit allowances the center issued (what 'report' checks top-ups against).

    \b
      afc sim center allowance issue --db center.db --key center.key --dealer bayi-017 \\
          --id A-2026-07 --amount-tl 20000 --valid-days 30 --daily-limit-tl 5000 \\
          --broker 127.0.0.1:1883
      afc sim center allowance register --db center.db --key center.key --in credit.bundle
      afc sim center allowance list --db center.db
    """


def _when(text: str | None, default: int) -> int:
    import datetime as dt

    if text is None:
        return default
    if text.isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: Unix seconds or ISO 8601 "
                                 "(2026-07-01T00:00+03:00)") from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{text!r}: give the UTC offset, e.g. +03:00")
    return int(moment.timestamp())


@allowance.command("issue")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The center's private key file: signs the allowance and its bundle.")
@click.option("--dealer", "dealer_id", required=True, help="The dealer terminal's device id.")
@click.option("--id", "allowance_id", required=True, help="A new allowance id (never reused).")
@click.option("--amount-tl", type=click.IntRange(0), required=True,
              help="Credit the dealer may load, in TL.")
@click.option("--valid-from", default=None, help="Unix seconds or ISO 8601; default now.")
@click.option("--valid-days", type=click.IntRange(1, 3660), default=30, show_default=True)
@click.option("--daily-limit-tl", type=click.IntRange(0), default=None,
              help="The dealer's per-day limit in TL, for the report (the terminal has its "
              "own in its configuration).")
@click.option("--broker", default=None, help=_BROKER_HELP + " Publish the bundle retained for "
              "the dealer; without it, write it with --out.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the signed credit bundle here.")
def allowance_issue(db: str, key_path: str, dealer_id: str, allowance_id: str,
                    amount_tl: int, valid_from: str | None, valid_days: int,
                    daily_limit_tl: int | None, broker: str | None,
                    out_path: str | None) -> None:
    """Sign a credit allowance and its bundle for one dealer, record it, publish it."""
    import time
    from pathlib import Path

    from simulators.center.publisher import Publisher

    if broker is None and out_path is None:
        raise click.UsageError("give --broker (publish) or --out (write the bundle), or both")
    key = load_private_key(key_path)
    start = _when(valid_from, int(time.time()))
    daily = None if daily_limit_tl is None else daily_limit_tl * 100
    with SqliteCenterStore(db) as store:
        if any(a.allowance_id == allowance_id for a in store.allowances()):
            raise CenterError(f"allowance {allowance_id} was issued already: give the new "
                              "grant a new --id")
        payload = Publisher(store, key, None).sign_allowance(
            dealer_id, allowance_id, amount_tl * 100, start, start + valid_days * 86400,
            daily_limit=daily)
        if out_path is not None:
            Path(out_path).write_bytes(payload)
        if broker is not None:
            from simulators.center.mqtt import parse_broker

            asyncio.run(_publish_retained(parse_broker(broker), store, key, payload))
    click.echo(json.dumps({"allowance_id": allowance_id, "dealer_id": dealer_id,
                           "amount": amount_tl * 100, "valid_from": start,
                           "valid_until": start + valid_days * 86400, "daily_limit": daily,
                           "published": broker is not None, "out": out_path}))


async def _publish_retained(address: BrokerAddress, store: SqliteCenterStore,
                            key: Ed25519PrivateKey, payload: bytes) -> None:
    from simulators.center.mqtt import client_id, connect
    from simulators.center.publisher import Publisher

    async with connect(address, client_id("allowance")) as client:
        async def publish(topic: str, data: bytes, retain: bool) -> None:
            await client.publish(topic, data, qos=1, retain=retain, timeout=30)

        await Publisher(store, key, publish).publish_payload(payload)


@allowance.command("register")
@click.option("--db", required=True, type=click.Path(dir_okay=False), help=_DB_HELP)
@click.option("--key", "key_path", default=None, type=click.Path(dir_okay=False),
              help="The center's private key file (its public half checks the signatures).")
@click.option("--center-public", default=None,
              help="Or the center's public key: 64 hex digits or a PEM file.")
@click.option("--in", "in_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A signed credit bundle (afc bundle sign --kind credit) or an allowance "
              "JSON file as a terminal without an agent reads it.")
@click.option("--daily-limit-tl", type=click.IntRange(0), default=None,
              help="The dealer's per-day limit in TL, for the report.")
def allowance_register(db: str, key_path: str | None, center_public: str | None,
                       in_path: str, daily_limit_tl: int | None) -> None:
    """Record an allowance issued outside the publisher (signed with this center's key)."""
    from simulators.center.dealer import register_allowance_file

    if (key_path is None) == (center_public is None):
        raise click.UsageError("give exactly one of --key and --center-public")
    public = (load_private_key(key_path).public_key() if key_path is not None
              else load_public_key(center_public))
    with SqliteCenterStore(db) as store:
        info = register_allowance_file(
            store, in_path, public,
            daily_limit=None if daily_limit_tl is None else daily_limit_tl * 100)
    click.echo(f"recorded allowance {info.allowance_id} of dealer {info.dealer_id}: "
               f"{info.amount} kuruş, valid {info.valid_from}..{info.valid_until}")


@allowance.command("list")
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--dealer", "dealer_id", default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def allowance_list(db: str, dealer_id: str | None, as_json: bool) -> None:
    """The allowances the center issued, oldest first."""
    from dataclasses import asdict

    with SqliteCenterStore(db) as store:
        items = store.allowances(dealer_id)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in asdict(a).items() if k != "signature_hex"}
                               for a in items], indent=2))
        return
    for a in items:
        click.echo(f"{a.allowance_id}  dealer {a.dealer_id}  {a.amount} kuruş  "
                   f"valid {a.valid_from}..{a.valid_until}  daily limit "
                   f"{a.daily_limit if a.daily_limit is not None else '-'}  ({a.source}, "
                   f"bundle {a.bundle_version if a.bundle_version is not None else '-'})")
    if not items:
        click.echo("no allowances issued")


@center.command("cmd")
@click.option("--broker", required=True, help=_BROKER_HELP)
@click.option("--db", required=True, type=click.Path(exists=True, dir_okay=False), help=_DB_HELP)
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="The center's private key file.")
@click.option("--device", "device_id", required=True)
@click.option("--name", required=True,
              help="ping, send-logs, resync-config or reboot-app.")
@click.option("--args", "args_json", default="{}", show_default=True,
              help='Arguments as a JSON object, e.g. \'{"since": 1760000000000}\'.')
@click.option("--timeout-s", type=click.FloatRange(0.1, 600), default=10, show_default=True)
def cmd(broker: str, db: str, key_path: str, device_id: str, name: str, args_json: str,
        timeout_s: float) -> None:
    """Send a signed command and print the device's signed reply (JSON)."""
    from simulators.center.commands import send_command
    from simulators.center.mqtt import parse_broker

    try:
        args = json.loads(args_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    if not isinstance(args, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--args")
    key = load_private_key(key_path)
    with SqliteCenterStore(db) as store:
        if store.public_key(device_id) is None:
            raise CenterError(f"device {device_id} is not registered with a public key: its "
                              "reply could not be verified")
        reply = asyncio.run(send_command(parse_broker(broker), store, key, device_id, name,
                                         args, timeout_s=timeout_s))
    click.echo(json.dumps({"device": reply.device_id, "id": reply.id, "ok": reply.ok,
                           "result": reply.result, "error": reply.error}, default=repr))
