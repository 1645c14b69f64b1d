"""``afc journal``: read a device database's journal, verify its MACs, export it.

For the IT department auditing a device (a dealer's top-up terminal, a validator taken off a
bus): who the database belongs to, how far the center has acknowledged it, which taps are
still in doubt, and whether every record is exactly what the device wrote (AES-CMAC under the
``journal-mac`` key; every version the key store holds is tried, so a journal written before
a key rotation still verifies).

The database is opened read-only (SQLite ``mode=ro``): inspecting a copy, or the live file of
a running device, changes no record (SQLite may still create its -wal/-shm files beside it).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from firmware.core.keys import FileKeyStore, KeyStore
from firmware.stores._sql import Conn
from firmware.stores.database import JournalMac
from firmware.stores.errors import StoreError, wrap_sqlite_error
from firmware.stores.journal import Journal, JournalRecord, canonical_bytes

__all__ = ["JournalAudit", "journal", "open_journal", "verify_record"]

#: Records read per query: bounds memory on a journal of millions of records.
PAGE = 10_000
EXPORT_FIELDS = (
    "seq", "phase", "kind", "link", "time", "card_number", "uid", "counter_before",
    "counter_after", "balance_before", "balance_after", "fare", "product", "line", "vehicle",
    "validator_id", "outcome", "reason", "action_id", "device_id", "mac", "mac_ok",
    "key_version",
)


class JournalError(StoreError):
    """The journal cannot be read as asked (no such file, not a device database)."""


@contextmanager
def open_journal(path: str | Path) -> Iterator[tuple[Journal, str]]:
    """The journal of the database at ``path``, read-only, and its device id."""
    path = Path(path)
    if not path.is_file():
        raise JournalError(f"no device database at {path}")
    try:
        raw = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise wrap_sqlite_error(exc, f"open {path}") from exc
    conn = Conn(raw, None)
    try:
        try:
            row = raw.execute("SELECT value FROM meta WHERE key = 'device_id'").fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"{path} is not a device database ({exc})") from None
        if row is None:
            raise JournalError(f"{path} has no device id: not a device database")
        device_id = str(row[0])
        yield Journal(conn, device_id, None), device_id
    finally:
        conn.close()


def verify_record(mac: JournalMac, record: JournalRecord) -> int | None:
    """The ``journal-mac`` version whose MAC the record carries, or None if none does: what
    the device's own journal accepts (:class:`~firmware.stores.database.JournalMac`)."""
    try:
        data = canonical_bytes(record)
    except (ValueError, TypeError, AttributeError, struct.error):
        return None  # a field of the wrong type, put there behind the device's back
    return mac.version_of(data, record.mac)


def iter_records(j: Journal, since: int = 0) -> Iterator[JournalRecord]:
    """Every record with ``seq > since``, oldest first, a page at a time."""
    while True:
        page = j.records(since, PAGE, verify=False)
        if not page:
            return
        yield from page
        since = page[-1].seq


@dataclass
class JournalAudit:
    """What ``afc journal inspect`` reports."""

    db: str
    device_id: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_seq_issued: int = 0
    acked_seq: int = 0
    unacked: int = 0
    open_intents: list[dict[str, Any]] = field(default_factory=list)
    mac_ok: int = 0
    mac_bad: list[int] = field(default_factory=list)
    mac_by_version: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    by_phase: dict[str, int] = field(default_factory=dict)
    by_outcome: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        lines = [
            f"device {self.device_id}  ({self.db})",
            f"records {self.records}  seq {self.first_seq}..{self.last_seq}  "
            f"(last issued {self.last_seq_issued})",
            f"acked up to {self.acked_seq}  not yet acked {self.unacked}",
            f"MACs: {self.mac_ok} verify"
            + (f" (by key version: {_counts({f'v{k}': n for k, n in self.mac_by_version.items()})})"
               if self.mac_by_version else "")
            + (f"; {len(self.mac_bad)} FAIL: seq {self.mac_bad[:20]}" if self.mac_bad else ""),
            f"open intents {len(self.open_intents)}"
            + "".join(f"\n  seq {i['seq']} {i['kind']} card {i['card_number']}"
                      for i in self.open_intents[:20]),
            "by kind: " + _counts(self.by_kind),
            "by phase: " + _counts(self.by_phase),
            "by outcome: " + _counts(self.by_outcome),
        ]
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "-"


def audit(db: str | Path, store: KeyStore) -> JournalAudit:
    """Read the whole journal once: counts, range, open intents, MAC of every record."""
    mac = JournalMac(store)
    by_kind: Counter[str] = Counter()
    by_phase: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    with open_journal(db) as (j, device_id):
        result = JournalAudit(str(db), device_id, last_seq_issued=j.last_seq,
                              acked_seq=j.acked_seq)
        for rec in iter_records(j):
            result.records += 1
            if result.first_seq is None:
                result.first_seq = rec.seq
            result.last_seq = rec.seq
            if rec.seq > result.acked_seq:
                result.unacked += 1
            by_kind[rec.kind] += 1
            by_phase[rec.phase] += 1
            by_outcome[rec.outcome or "-"] += 1
            version = verify_record(mac, rec)
            if version is None:
                result.mac_bad.append(rec.seq)
            else:
                result.mac_ok += 1
                by_version[str(version)] += 1
        result.open_intents = [
            {"seq": r.seq, "kind": r.kind, "card_number": r.card_number, "time": r.time}
            for r in j.open_intents(verify=False)
        ]
    result.by_kind = dict(by_kind.most_common())
    result.by_phase = dict(by_phase.most_common())
    result.by_outcome = dict(by_outcome.most_common())
    result.mac_by_version = dict(sorted(by_version.items()))
    return result


def _row(rec: JournalRecord, version: int | None) -> dict[str, Any]:
    row = {name: getattr(rec, name) for name in EXPORT_FIELDS[:-2]}
    row["uid"] = rec.uid.hex().upper() if isinstance(rec.uid, bytes) else rec.uid
    row["mac"] = rec.mac.hex().upper() if isinstance(rec.mac, bytes) else rec.mac
    row["mac_ok"] = version is not None
    row["key_version"] = version
    return row


def export(db: str | Path, store: KeyStore, out: TextIO, fmt: str, since: int = 0
           ) -> tuple[int, list[int]]:
    """Write every record after ``since`` as CSV or JSON (an array, one object per record,
    written as it is read); returns (records written, seqs whose MAC fails)."""
    mac = JournalMac(store)
    count, bad = 0, []
    with open_journal(db) as (j, _device_id):
        writer = csv.DictWriter(out, EXPORT_FIELDS, lineterminator="\n") if fmt == "csv" \
            else None
        if writer is not None:
            writer.writeheader()
        else:
            out.write("[")
        for rec in iter_records(j, since):
            version = verify_record(mac, rec)
            if version is None:
                bad.append(rec.seq)
            row = _row(rec, version)
            if writer is not None:
                writer.writerow(row)
            else:
                out.write(("\n  " if count == 0 else ",\n  ") + json.dumps(row))
            count += 1
        if writer is None:
            out.write("\n]\n" if count else "]\n")
    return count, bad


class JournalTamperedError(JournalError):
    """Records whose MAC verifies under no key version: edited outside the device."""


def _fail_on_bad(bad: list[int]) -> None:
    if bad:
        raise JournalTamperedError(
            f"{len(bad)} journal record(s) fail MAC verification (seq {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}): edited outside the device, or the wrong "
            "key store")


_DB_HELP = "The device database (read-only; a copy or the live file)."
_KEYS_HELP = "Key store holding the device's journal-mac key (every version is tried)."


@click.group()
def journal() -> None:
    """Inspect and export a device's transaction journal, with MAC verification.

    \b
      afc journal inspect --db /var/lib/afc/device.db --keys /etc/afc/keys.toml
      afc journal export --db device.db --keys keys.toml --format csv --out taps.csv
    Exit status 1 (after the report or the export) when a record's MAC fails.
    """


@journal.command()
@click.option("--db", required=True, metavar="PATH", help=_DB_HELP)
@click.option("--keys", "keys_path", required=True, metavar="PATH", help=_KEYS_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def inspect(db: str, keys_path: str, as_json: bool) -> None:
    """Device id, sequence range, acknowledged mark, open intents (taps in doubt), counts by
    kind/phase/outcome, and the MAC check of every record."""
    result = audit(db, FileKeyStore.open(keys_path))
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.to_text())
    _fail_on_bad(result.mac_bad)


@journal.command("export")
@click.option("--db", required=True, metavar="PATH", help=_DB_HELP)
@click.option("--keys", "keys_path", required=True, metavar="PATH", help=_KEYS_HELP)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
@click.option("--since", type=click.IntRange(0), default=0, show_default=True, metavar="SEQ",
              help="Only records with a sequence number above SEQ.")
@click.option("--out", metavar="FILE", help="Write here instead of standard output.")
def export_cmd(db: str, keys_path: str, fmt: str, since: int, out: str | None) -> None:
    """Export the journal (every field, UID and MAC in hex, mac_ok and the key version that
    verified it) as CSV or a JSON array; a summary goes to stderr."""
    store = FileKeyStore.open(keys_path)
    if out is None:
        count, bad = export(db, store, sys.stdout, fmt, since)
    else:
        target = Path(out)
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            count, bad = export(db, store, handle, fmt, since)
        tmp.replace(target)  # complete or not at all
    click.echo(f"exported {count} record(s)" + (f" to {out}" if out else "")
               + (f"; {len(bad)} fail MAC verification" if bad else ""), err=True)
    _fail_on_bad(bad)


if __name__ == "__main__":  # python -m tools.journal_cmd journal ... (until it is registered)
    from tools.cli import AfcGroup

    AfcGroup(name="afc", commands={"journal": journal})(prog_name="afc")
