"""``afc sim``: emulated hardware for test rigs, CI and demos.

``afc sim reader`` serves the PN532 emulator (:mod:`simulators.pn532`) on a pseudo-terminal
or a TCP port, with virtual cards on it, until SIGINT/SIGTERM; then it writes the cards that
came from files back to their files, so a rig can inspect what the validator did to them.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from firmware.core.errors import CoreError

logger = logging.getLogger("afc.sim")


@click.group()
def sim() -> None:
    """Emulated hardware: a PN532 reader with virtual MIFARE Classic cards.

    Run the validator, the top-up terminal or your own driver against it exactly as against
    a reader on a serial port, with no reader and no card on the desk.
    """


@sim.command("reader")
@click.option(
    "--port",
    metavar="PATH",
    help="Create a symlink at PATH to the emulator's pseudo-terminal (removed on exit). "
    "Without --port and --listen the pty path is printed on stdout.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve TCP instead of a pty, one client at a time, for socket://HOST:PORT URLs "
    "(port 0 picks a free one; the URL is printed on stdout).",
)
@click.option(
    "--card",
    "specs",
    multiple=True,
    metavar="SPEC",
    help="A virtual card: a card file (.json, .mfd/.bin/.dump), new:1k, new:4k, new:1k:7 "
    "(7-byte UID) or new:1k:uid=HEX. Repeat for more cards; numbered 1, 2, ... in order.",
)
@click.option(
    "--control",
    metavar="PATH|PORT|-",
    help="Control channel: a Unix socket PATH, a TCP PORT (or HOST:PORT) on 127.0.0.1, or "
    "'-' for stdin/stdout. One command per line: help, list, place N, remove N, add SPEC, "
    "fault N tear-after K, fault N clear, status, shutdown.",
)
@click.option(
    "--baud-timing",
    is_flag=True,
    help="Send answers no faster than a 115200-baud line (10 bits per byte).",
)
@click.option(
    "--absent",
    is_flag=True,
    help="Start with the cards off the reader (place them with the control channel).",
)
@click.option("-v", "--verbose", count=True, help="Log every frame on the line (-v).")
def reader(
    port: str | None,
    listen: str | None,
    specs: tuple[str, ...],
    control: str | None,
    baud_timing: bool,
    absent: bool,
    verbose: int,
) -> None:
    """Emulate a PN532 reader (HSU framing, 115200 8N1) with virtual cards on it.

    Both of the validator's modes work: chip crypto (InDataExchange, the emulated chip
    runs Crypto1) and transparent (InCommunicateThru with parity and CRC off, the host
    runs Crypto1 bit for bit). Runs until SIGINT or SIGTERM, then saves every card that
    was loaded from a file back to that file and exits 0.

    \b
    Examples:
      afc sim reader --port /tmp/pn532 --card new:1k --card cards/student.json
      afc sim reader --listen 127.0.0.1:4532 --card new:4k --control /tmp/pn532.ctl
      afc sim reader --card new:1k:7       # prints the pty path, e.g. /dev/pts/5

    \b
    Connecting from Python (pyserial):
      import serial
      line = serial.serial_for_url("/tmp/pn532", baudrate=115200, timeout=0.1)
      # or serial.serial_for_url("socket://127.0.0.1:4532", timeout=0.1)
      line.write(bytes.fromhex("55 55 00 00 00 00 FF 02 FE D4 02 2A 00"))
      line.read(6 + 13)   # ACK, then D5 03 32 01 06 07: a PN532 v1.6

    \b
    Control channel (e.g. printf 'place 1\\n' | nc -U /tmp/pn532.ctl):
      list                      cards with their UID and state
      place N|all, remove N|all put a card on / take it off the reader
      fault N tear-after K      the card leaves the field at its K-th frame from now
      fault N clear             disarm card N's faults
      add SPEC, status, help, quit, shutdown
    Every reply ends with a line 'ok ...' or 'error: ...'. See docs/pn532-emulator.md.
    """
    try:  # lazy: only this command needs the simulators
        from simulators.cards import parse_card_spec
        from simulators.pn532 import Pn532Emulator, Pn532Server, ServerError, parse_listen
    except ImportError as exc:
        raise click.ClickException(
            f"the simulators are not installed ({exc}): run 'pip install -e .' in the checkout"
        ) from exc

    _configure_logging(verbose)
    if port is not None and listen is not None:
        raise click.UsageError("give --port or --listen, not both")
    cards = [parse_card_spec(spec) for spec in specs]
    address = parse_listen(listen) if listen is not None else None
    emulator = Pn532Emulator([] if absent else cards)
    try:
        server = Pn532Server(
            emulator,
            cards=cards,
            port=port,
            listen=address,
            control=control,
            baud_timing=baud_timing,
            card_factory=parse_card_spec,
        )
    except OSError as exc:
        raise ServerError(f"cannot serve the reader emulator: {exc}") from exc

    if port is None:
        click.echo(server.url)
        sys.stdout.flush()
    logger.info(
        "PN532 emulator on %s with %d card(s)%s",
        server.url,
        len(cards),
        f", control on {server.control_address}" if server.control_address else "",
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _save_cards(server.cards)


def _save_cards(cards: list[object]) -> None:
    """Write every card that came from a file back to it; all are tried before failing."""
    failures = []
    for card in cards:
        if getattr(card, "path", None) is None:
            continue
        try:
            saved = card.save()  # type: ignore[attr-defined]
            logger.info("card saved to %s", saved)
        except (CoreError, OSError) as exc:
            failures.append(f"{card.path}: {exc}")  # type: ignore[attr-defined]
    if failures:
        raise CoreError("could not save card file(s): " + "; ".join(failures))


def _configure_logging(verbose: int) -> None:
    """Log lines on stderr (stdout carries the pty path or URL for scripts), for this
    command's loggers only, so an embedding process keeps its own logging setup."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("afc sim reader: %(levelname)s %(message)s"))
    for name in ("simulators", "afc.sim"):
        log = logging.getLogger(name)
        if not log.handlers:
            log.addHandler(handler)
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
