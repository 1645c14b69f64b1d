"""``afc demo``: the main job on embedded defaults.

For now the main job is a self-demonstration of the validator core: a virtual MIFARE Classic
card is issued with per-card diversified keys, then tapped: selected through the ISO 14443-3
anticollision loop, authenticated, read, charged a fare with DECREMENT + TRANSFER, and
authenticated again (nested) for a second sector. Every frame on the air is printed as the
reader saw it, ciphertext and plaintext side by side, so a technician can follow a real tap.
"""

from __future__ import annotations

import click

from firmware.core.anticollision import CardSelector, Field, select_card
from firmware.core.classic_layout import (
    CardType,
    SectorTrailer,
    decode_value_block,
    encode_value_block,
    factory_memory,
    first_block,
    transit_trailer,
)
from firmware.core.errors import AuthenticationError
from firmware.core.iso14443a import BitFrame, split
from firmware.core.keys import classic_sector_key
from firmware.core.mifare import ClassicCard, ClassicReader, ClassicTag, TraceEntry

# A demo master key: the key store of a real deployment holds this; never a constant.
DEMO_MASTER = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
TRANSPORT_KEY = bytes.fromhex("FFFFFFFFFFFF")
PURSE_SECTOR = 1
LOG_SECTOR = 2


def show_frame(frame: BitFrame) -> str:
    """Bytes on the air in hex; a ``!`` marks a parity bit that is not the plain odd parity
    of the byte as sent (what encrypted parity looks like in a Proxmark trace)."""
    if not frame:
        return "(silence)"
    if frame.length % 9:
        return f"{frame.bits:0{(frame.length + 3) // 4}X} ({frame.length} bits)"
    data, parity = split(frame)
    return " ".join(
        f"{b:02X}{'!' if p != (b.bit_count() + 1) & 1 else ''}"
        for b, p in zip(data, parity, strict=True)
    )


class Printer:
    def __init__(self) -> None:
        self.count = 0

    def line(self, direction: str, onair: str, plain: str, note: str) -> None:
        self.count += 1
        click.echo(f"{self.count:3d} {direction}  {onair:<54} {plain:<36} {note}")

    def entry(self, e: TraceEntry) -> None:
        plain = e.plain.hex(" ").upper() if e.plain is not None else ""
        self.line(e.direction, show_frame(e.frame), plain, e.note)

    def heading(self, text: str) -> None:
        click.echo()
        click.secho(text, bold=True)


def run_demo() -> None:
    card_type = CardType.CLASSIC_1K
    uid = bytes.fromhex("045F217A3C5880")  # a 7-byte UID: two cascade levels
    memory = factory_memory(uid, card_type)
    card = ClassicTag(uid, memory, card_type=card_type)
    air = Field([card])
    out = Printer()

    key_a = classic_sector_key(DEMO_MASTER, uid, PURSE_SECTOR, "A")
    key_b = classic_sector_key(DEMO_MASTER, uid, PURSE_SECTOR, "B")

    def traced(frame: BitFrame) -> BitFrame:
        answer = air.transceive(frame)
        return answer

    out.heading("1. Select: REQA, anticollision and SELECT over two cascade levels")

    def select_traced(frame: BitFrame) -> BitFrame:
        answer = air.transceive(frame)
        out.line("R>C", show_frame(frame), "", "")
        out.line("C>R", show_frame(answer), "", "")
        return answer

    selected = select_card(select_traced)
    click.echo(
        f"    selected UID {selected.uid.hex(':').upper()}  ATQA {selected.atqa.hex().upper()}"
        f"  SAK {selected.sak:02X}"
    )

    reader = ClassicReader(traced, selected.uid, tracer=out.entry)

    out.heading(
        f"2. Issue: transport key -> per-card keys for sector {PURSE_SECTOR}, purse 50.00 TL"
    )
    purse_block = first_block(PURSE_SECTOR, card_type)
    reader.authenticate(purse_block, TRANSPORT_KEY, "A")
    reader.write(purse_block, encode_value_block(5000, purse_block))
    reader.write(purse_block + 1, encode_value_block(5000, purse_block))
    trailer = transit_trailer(key_a, key_b)
    reader.write(purse_block + 3, trailer.to_bytes())
    reader.halt()
    card_after_halt = select_card(air.transceive, wakeup=True)
    reader = ClassicReader(traced, card_after_halt.uid, tracer=out.entry)

    out.heading("3. Tap: authenticate with diversified key A, read the purse, charge 3.50 TL")
    reader.authenticate(purse_block, key_b, "B")
    value, _ = decode_value_block(reader.read(purse_block))
    click.echo(f"    balance before: {value / 100:.2f} TL")
    reader.decrement(purse_block, 350)
    reader.transfer(purse_block)
    value, _ = decode_value_block(reader.read(purse_block))
    click.echo(f"    balance after:  {value / 100:.2f} TL")

    out.heading(f"4. Nested authentication into sector {LOG_SECTOR} (transport key), read")
    reader.authenticate(first_block(LOG_SECTOR, card_type), TRANSPORT_KEY, "A")
    reader.read(first_block(LOG_SECTOR, card_type))
    reader.halt()

    out.heading("5. A cloned-key attempt: the old transport key no longer opens the purse")
    select_card(air.transceive, wakeup=True)
    reader = ClassicReader(traced, uid, tracer=out.entry)
    try:
        reader.authenticate(purse_block, TRANSPORT_KEY, "A")
    except AuthenticationError as exc:
        click.echo(f"    refused as expected: {exc}")
    else:  # pragma: no cover - would be a security bug
        raise click.ClickException("the transport key still opens the purse sector")
    trailer_now = SectorTrailer.from_bytes(
        bytes(memory[16 * (purse_block + 3) : 16 * (purse_block + 4)])
    )
    click.echo(f"\nDone: {out.count} frames; sector {PURSE_SECTOR} access {trailer_now.access}.")
    _ = (ClassicCard, CardSelector)


@click.command()
def demo() -> None:
    """Run the self-demonstration of the validator core (an annotated trace of a tap)."""
    run_demo()
