"""``afc validator`` and ``afc topup``: the device applications on a real or emulated reader."""

from __future__ import annotations

import logging
import signal
import sys
import time
import tomllib
from pathlib import Path

import click

from firmware.core.errors import CoreError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _keys(path: str | None, config: dict):
    from firmware.core.keys import FileKeyStore

    store = path or config.get("keys", {}).get("store")
    if not store:
        raise click.UsageError("no key store: give --keys PATH or [keys] store in the config")
    return FileKeyStore.open(store)


def _clock(db_path: str, clock_file: str | None = None):
    """A GuardedClock whose high-water mark lives beside the database.

    With ``clock_file`` the wall time is read from a test rig's clock file
    (:mod:`simulators.fleet.clock`: a service day faster than real time, one device's clock
    set back while it runs) instead of the system clock, and the mark is saved at every
    reading, since the rig kills and restarts devices at any instant.
    """
    from firmware.apps.clock import GuardedClock

    mark = Path(f"{db_path}.clock")

    def load() -> int | None:
        try:
            return int(mark.read_text().strip())
        except (OSError, ValueError):
            return None

    def save(value: int) -> None:
        tmp = mark.with_suffix(".tmp")
        tmp.write_text(str(value))
        tmp.replace(mark)

    if clock_file is None:
        return GuardedClock(load, save)
    from simulators.fleet.clock import FileClock

    return GuardedClock(load, save, wall=FileClock(clock_file), save_every=1)


_CLOCK_FILE_HELP = ("Read the wall time from a test rig's clock file (simulators.fleet.clock) "
                    "instead of the system clock.")


def _read_config(path: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(f"cannot read configuration {path}: {exc}") from exc


@click.command()
@click.option("--reader", "reader_url", required=True,
              help="Reader URL: /dev/ttyUSB0, a pty path, socket://HOST:PORT.")
@click.option("--db", "db_path", required=True, help="The device database (created if new).")
@click.option("--config", "config_path", required=True, help="Validator TOML configuration.")
@click.option("--keys", "keys_path", help="Key store (default: [keys] store in the config).")
@click.option("--mode", type=click.Choice(["chip", "transparent"]), default=None,
              help="MIFARE Classic mode (default: [reader] mode, else transparent).")
@click.option("--max-taps", type=int, default=0, help="Stop after this many taps (tests).")
@click.option("--clock-file", metavar="PATH", help=_CLOCK_FILE_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level (to stderr).")
def validator(reader_url, db_path, config_path, keys_path, mode, max_taps, clock_file,
              verbose) -> None:
    """The on-bus validator loop: poll the reader, decide offline, write the card, journal.

    \b
    Configuration (TOML):
      [device]  id = "bus-0042-v1"   validator_id = 421   vehicle_id = 42
                line_id = 41         line_group = "merkez"   direction = 0
                other_validators = [422]      # the other doors of the same bus
      [reader]  mode = "transparent"          # or "chip"
      [tariff]  name = "konya-2025"           # a shipped tariff, or a TOML path
      [keys]    store = "/etc/afc/keys.toml"  # classic-sector, purse-mac, journal-mac
    \b
    Example (with `afc sim reader --port /tmp/pn532 --card card.json` running):
      afc validator --reader /tmp/pn532 --db /var/lib/afc/v.db --config validator.toml
    Runs until SIGINT/SIGTERM; each tap prints the two display lines.
    """
    from firmware.apps.cards import Pn532CardSource
    from firmware.apps.ui import ConsoleUi
    from firmware.apps.validator import Validator, ValidatorConfig, load_tariff
    from firmware.reader.driver import Pn532
    from firmware.reader.errors import ReaderError
    from firmware.stores.database import DeviceDatabase

    _setup_logging(verbose)
    raw = _read_config(config_path)
    config = ValidatorConfig.from_toml(config_path)
    keys = _keys(keys_path, raw)
    table = load_tariff(config.tariff)
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    taps = {"n": 0}
    with (
        DeviceDatabase.open(db_path, device_id=config.device_id, journal_key=keys) as db,
        Pn532.open(reader_url) as pn,
    ):
        pn.set_max_retries(passive=1)
        clock = _clock(db_path, clock_file)
        # the center's fare bundle, once the agent applied one, wins over the packaged table
        table = db.config.fare_table() or table
        app = Validator(config, Pn532CardSource(pn, mode or config.reader_mode), db, keys,
                        table, ConsoleUi(sys.stdout), clock)
        while not stop["now"]:
            try:
                outcome = app.poll()
                app.note_reader(True)
            except ReaderError as exc:
                app.note_reader(False, str(exc))
                outcome = None
                time.sleep(0.2)
            except CoreError as exc:
                logging.getLogger("afc.validator").warning("%s", exc)
                outcome = None
                time.sleep(0.2)
            if outcome is None:
                app.housekeeping()
                time.sleep(0.05)
                continue
            taps["n"] += 1
            if max_taps and taps["n"] >= max_taps:
                break
        try:
            app.finish_tap()  # the last ride's done record, if no idle moment came since
        except CoreError as exc:  # its intent stays open: settled at the card's next tap
            logging.getLogger("afc.validator").error("last done record not written: %s", exc)
        clock.flush()


@click.command()
@click.option("--reader", "reader_url", required=True, help="Reader URL (as for validator).")
@click.option("--db", "db_path", required=True, help="The terminal's database.")
@click.option("--config", "config_path", required=True, help="Terminal TOML configuration.")
@click.option("--keys", "keys_path", help="Key store (default: [keys] store in the config).")
@click.option("--card-wait", default=30.0, show_default=True,
              help="Seconds to wait for a card after a command.")
@click.option("--clock-file", metavar="PATH", help=_CLOCK_FILE_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level (to stderr).")
def topup(reader_url, db_path, config_path, keys_path, card_wait, clock_file, verbose) -> None:
    """The bayi top-up terminal: the dealer types commands, the customer's card is loaded.

    \b
    Commands on standard input, one per line:
      load 50        load 50,00 TL (also 50.25 / 50,25)
      pass 1         sell monthly pass product 1 (the price follows the card's category)
      credit         show the dealer's remaining credit
      quit
    Each load prints a receipt. Loads are refused above the dealer's signed credit
    allowance ([dealer] allowance file, issued by the center), the daily limit, or the
    card's maximum balance.
    \b
    Configuration (TOML):
      [device]  id = "bayi-017"   terminal_id = 9017
      [dealer]  allowance = "/var/lib/afc/allowance.json"   daily_limit = 50000 (TL)
                center_public_key = "hex of the center's Ed25519 public key"
      [tariff]  name = "konya-2025"
      [keys]    store = "/etc/afc/keys.toml"
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from firmware.apps.cards import Pn532CardSource
    from firmware.apps.topup import TopupRefused, TopupTerminal, load_allowance
    from firmware.apps.ui import ConsoleUi
    from firmware.apps.validator import load_tariff, tl
    from firmware.reader.driver import Pn532
    from firmware.stores.database import DeviceDatabase

    _setup_logging(verbose)
    raw = _read_config(config_path)
    device, dealer = raw.get("device", {}), raw.get("dealer", {})
    if "id" not in device or "terminal_id" not in device:
        raise click.UsageError("[device] needs id and terminal_id")
    keys = _keys(keys_path, raw)
    table = load_tariff(raw.get("tariff", {}).get("name", "konya-2025"))
    center_key = None
    if dealer.get("center_public_key"):
        center_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(dealer["center_public_key"]))
    clock = _clock(db_path, clock_file)
    with (
        DeviceDatabase.open(db_path, device_id=str(device["id"]), journal_key=keys) as db,
        Pn532.open(reader_url) as pn,
    ):
        pn.set_max_retries(passive=1)
        terminal = TopupTerminal(
            int(device["terminal_id"]), db, keys, table, ConsoleUi(sys.stderr),
            allowance=load_allowance(dealer.get("allowance")), center_key=center_key,
            daily_limit=int(dealer.get("daily_limit", 50_000)) * 100,
        )
        source = Pn532CardSource(pn, "transparent")
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd = words[0].lower()
            if cmd == "quit":
                break
            try:
                if cmd == "credit":
                    click.echo(f"credit left: {tl(terminal.credit_left(clock.now()))}")
                    continue
                if cmd not in ("load", "pass") or len(words) != 2:
                    click.echo("error: commands are 'load AMOUNT', 'pass PRODUCT', 'credit', "
                               "'quit'", err=True)
                    continue
                source.forget()
                deadline = time.monotonic() + card_wait
                access = None
                while access is None and time.monotonic() < deadline:
                    access = source.next_card()
                    if access is None:
                        time.sleep(0.05)
                if access is None:
                    click.echo("error: no card on the reader", err=True)
                    continue
                now = clock.now()
                if cmd == "load":
                    kurus = round(float(words[1].replace(",", ".")) * 100)
                    receipt = terminal.load(access, kurus, now)
                else:
                    receipt = terminal.sell_pass(access, int(words[1]), now)
                click.echo(receipt.text())
                click.echo("")
            except (TopupRefused, CoreError, ValueError, OverflowError) as exc:
                # OverflowError: "load inf" / "load 1e999" (round() of an infinite float)
                click.echo(f"error: {exc}", err=True)
        clock.flush()
