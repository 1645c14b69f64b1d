"""``afc sim center``: run the reference center, register devices, reconcile, show status.

Errors are the core's own (:class:`~simulators.center.errors.CenterError`,
:class:`~edge_agent.errors.AgentError`), which ``afc`` prints as one line with exit status 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import click

from edge_agent.keys import generate_key_file, load_private_key, load_public_key, public_hex
from simulators.center.errors import CenterError
from simulators.center.store import DEVICE_KINDS, SqliteCenterStore

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
def report(db: str, as_json: bool, min_travel_s: int) -> None:
    """Reconcile: gaps in each device's sequence, and per card counter and balance
    continuity across all devices; suspected clones with a proposed blacklist delta.

    Exit status is 0 even with findings: the report is for an operator to read.
    """
    from simulators.center.report import build_report

    with SqliteCenterStore(db) as store:
        result = build_report(store, min_travel_s=min_travel_s)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.to_text())


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
