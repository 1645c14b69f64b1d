"""``afc demo``: the main job on embedded defaults — a small city's fleet, reconciled.

``afc demo`` runs the ``demo`` fleet scenario (``simulators/fleet/scenarios/demo.toml``):
a local Mosquitto, the reference center, five validators on four buses of two lines and a
bayi terminal behind emulated PN532 readers, one agent per device, a camera site on the
MicroPython unix port, thirty riders through a compressed service day, a cloned card and a
rolled-back card among them, a blacklist delta during the day; SQLite everywhere. It ends
with the reconciliation: every tap and top-up on the cards at the center exactly once,
balances to the kuruş, the clone and the rolled-back card caught. Exit status 1 with the
broken invariant otherwise.

``afc demo --walkthrough`` is the earlier self-demonstration of the validator core: a virtual
MIFARE Classic card is issued with per-card diversified keys, then tapped: selected through
the ISO 14443-3 anticollision loop, authenticated, read, charged a fare with DECREMENT +
TRANSFER, and authenticated again (nested) into a second sector. Every frame on the air is
printed as the reader saw it, ciphertext and plaintext side by side, so a technician can
follow a real tap. It checks its own results and exits non-zero if any step does not come
out as the protocol says it must.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import click

from firmware.core.anticollision import SEL_CODES, Field, select_card
from firmware.core.classic_layout import (
    CardType,
    decode_value_block,
    encode_value_block,
    factory_memory,
    first_block,
    trailer_block,
    transit_trailer,
)
from firmware.core.errors import AuthenticationError
from firmware.core.iso14443a import REQA, WUPA, BitFrame, split
from firmware.core.keys import MemoryKeyStore
from firmware.core.mifare import ClassicReader, ClassicTag, TagNonces, TraceEntry

TRANSPORT_KEY = bytes.fromhex("FFFFFFFFFFFF")
DEMO_UID = bytes.fromhex("045F217A3C5880")  # 7 bytes: two cascade levels
PURSE_SECTOR = 1
SPARE_SECTOR = 2
INITIAL_BALANCE = 5000  # kuruş
FARE = 350  # kuruş


def show_frame(frame: BitFrame) -> str:
    """Bytes on the air in hex; a ``!`` marks a parity bit that is not the plain odd parity
    of the byte as sent: that is what encrypted parity looks like in a sniffer trace."""
    if not frame:
        return "(silence)"
    if frame.length % 9:
        return f"{frame.bits:X} ({frame.length} bits)"
    data, parity = split(frame)
    return " ".join(
        f"{b:02X}{'!' if p != (b.bit_count() + 1) & 1 else ''}"
        for b, p in zip(data, parity, strict=True)
    )


def describe_activation(request: BitFrame, answer: BitFrame) -> tuple[str, str]:
    """Names for an ISO 14443-3 activation exchange (the frames are plain)."""
    if request.length == 7:
        name = {REQA: "REQA", WUPA: "WUPA"}.get(request.bits, "short frame")
        return name, "ATQA" if answer else ""
    data, _ = split(request) if request.length % 9 == 0 else (b"", [])
    if len(data) >= 2 and data[0] in SEL_CODES:
        level = SEL_CODES.index(data[0]) + 1
        if data[1] == 0x70:
            return f"SELECT cascade level {level}", "SAK + CRC_A"
        return f"ANTICOLLISION cascade level {level}", "UID CLn + BCC"
    return "", ""


class Trace:
    """Prints frames as numbered lines: direction, bytes on the air, plaintext, meaning."""

    def __init__(self) -> None:
        self.count = 0

    def line(self, direction: str, frame: BitFrame, plain: bytes | None, note: str) -> None:
        self.count += 1
        onair = show_frame(frame)
        click.echo(f"{self.count:3d} {direction} {onair}")
        plain_hex = plain.hex(" ").upper() if plain is not None else None
        detail = f"= {plain_hex}  " if plain_hex is not None and plain_hex != onair else ""
        if detail or note:
            click.echo(f"        {detail}{note}")

    def entry(self, e: TraceEntry) -> None:
        self.line(e.direction, e.frame, e.plain, e.note)

    def activation(self, air: Field):
        def transceive(frame: BitFrame) -> BitFrame:
            answer = air.transceive(frame)
            req, ans = describe_activation(frame, answer)
            self.line("R>C", frame, None, req)
            self.line("C>R", answer, None, ans)
            return answer

        return transceive


def heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise click.ClickException(f"demo self-check failed: {what}")


@dataclass(frozen=True)
class DemoResult:
    frames: int
    balance: int
    sector_keys: tuple[bytes, bytes]  # for the test that proves they never reach the output


def run_demo(seed: int = 2026) -> DemoResult:
    rng = random.Random(seed)
    card_type = CardType.CLASSIC_1K
    memory = factory_memory(DEMO_UID, card_type)
    card = ClassicTag(DEMO_UID, memory, card_type=card_type, nonces=TagNonces(rng))
    air = Field([card])
    trace = Trace()
    # The operator's key store holds the master keys; the reader only ever sees the
    # per-card sector keys it derives (AN10922), and neither is printed.
    store = MemoryKeyStore({"classic-sector": rng.randbytes(16)})
    key_a = store.classic_key(DEMO_UID, PURSE_SECTOR, "A")
    key_b = store.classic_key(DEMO_UID, PURSE_SECTOR, "B")

    def reader_for(uid: bytes) -> ClassicReader:
        return ClassicReader(
            air.transceive, uid, tracer=trace.entry, nonce=lambda: rng.getrandbits(32)
        )

    click.echo("afc demo: a MIFARE Classic 1K card (7-byte UID) and a reader, in process.")
    click.echo("On-air bytes are shown as sent; '!' marks an encrypted parity bit, '=' the")
    click.echo("plaintext the reader meant or decrypted.")

    heading("1. Select: REQA, anticollision and SELECT over two cascade levels")
    selected = select_card(trace.activation(air))
    click.echo(
        f"    selected UID {selected.uid.hex(':').upper()}, ATQA {selected.atqa.hex().upper()},"
        f" SAK {selected.sak:02X}"
    )
    check(selected.uid == DEMO_UID, "anticollision returned the wrong UID")

    purse = first_block(PURSE_SECTOR, card_type)
    heading(f"2. Issue: purse of {INITIAL_BALANCE / 100:.2f} TL (value block + backup)")
    click.echo(f"    and sector {PURSE_SECTOR}'s transport keys replaced by diversified keys A/B")
    reader = reader_for(selected.uid)
    reader.authenticate(purse, TRANSPORT_KEY, "A")
    reader.write(purse, encode_value_block(INITIAL_BALANCE, purse))
    reader.write(purse + 1, encode_value_block(INITIAL_BALANCE, purse))
    reader.write(trailer_block(PURSE_SECTOR, card_type), transit_trailer(key_a, key_b).to_bytes())
    reader.halt()

    heading(f"3. Tap: wake the card, key A (read + spend), charge a {FARE / 100:.2f} TL fare")
    selected = select_card(air.transceive, wakeup=True)
    reader = reader_for(selected.uid)
    reader.authenticate(purse, key_a, "A")
    before, _ = decode_value_block(reader.read(purse))
    reader.decrement(purse, FARE)
    reader.transfer(purse)
    after, _ = decode_value_block(reader.read(purse))
    click.echo(f"    balance {before / 100:.2f} TL -> {after / 100:.2f} TL")
    check(before - after == FARE, "the purse did not go down by exactly one fare")

    heading(f"4. Nested authentication into sector {SPARE_SECTOR} (transport key) and READ")
    reader.authenticate(first_block(SPARE_SECTOR, card_type), TRANSPORT_KEY, "A")
    reader.read(first_block(SPARE_SECTOR, card_type))
    reader.halt()

    heading("5. A reader with only the old transport key is refused by the purse sector")
    selected = select_card(air.transceive, wakeup=True)
    reader = reader_for(selected.uid)
    try:
        reader.authenticate(purse, TRANSPORT_KEY, "A")
    except AuthenticationError as exc:
        click.echo(f"    refused, as it must be: {exc}")
    else:
        check(False, "the transport key still opens the personalised purse sector")

    stored, _ = decode_value_block(bytes(memory[16 * purse : 16 * purse + 16]))
    check(stored == INITIAL_BALANCE - FARE, "the card memory does not hold the new balance")
    click.echo(f"\nDone: {trace.count} frames on the air; the card holds {stored / 100:.2f} TL.")
    return DemoResult(trace.count, stored, (key_a, key_b))


@click.command()
@click.option("--walkthrough", is_flag=True,
              help="Instead: the annotated frame-by-frame trace of one card issued and tapped.")
@click.option("--seed", default=None, type=int,
              help="Seed (default: the scenario's; the walkthrough's nonces and keys: 2026).")
@click.option("--duration", type=click.FloatRange(20, 3600), default=None,
              help="Real seconds the riders' day takes (default: the demo scenario's).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Run folder (default: a temporary one, removed after a good run).")
@click.option("--keep", is_flag=True, help="Keep the run folder after a good run too.")
def demo(walkthrough: bool, seed: int | None, duration: float | None, workdir: str | None,
         keep: bool) -> None:
    """Run the main job on embedded defaults: a small fleet for a few minutes, ending with
    the reconciliation (every tap and top-up at the center exactly once, balances to the
    kuruş, the injected clone and rolled-back card caught).

    Needs Mosquitto (Debian package 'mosquitto'; scripts/dev installs it) and the camera
    site's MicroPython (scripts/dev setup). '--walkthrough' needs neither: it traces one
    tap frame by frame in process.
    """
    if walkthrough:
        run_demo(2026 if seed is None else seed)
        return
    from tools.fleet_sim_cmd import run_and_report

    overrides: dict = {}
    if seed is not None:
        overrides["seed"] = seed
    if duration is not None:
        overrides["time"] = {"duration_s": duration}
    click.echo("afc demo: a small city's fares and cameras, every part a real process; "
               "the summary and the reconciliation come at the end (about two minutes).")
    run_and_report("demo", workdir=workdir, keep=keep, overrides=overrides)
