"""``python -m simulators.fleet.device --faults FILE -- validator ARGS``.

Runs the real ``afc validator`` command (:mod:`tools.apps_cmd`, the same code path, the same
options, ``--clock-file`` for the fleet's simulated wall clock included) in this process with
one thing a fleet rig needs and a device must never offer: **a disk that fills up**. When the
faults file says ``{"disk_full": true}`` the validator's own database connection gets
``PRAGMA max_page_count`` = its current size (the store's fault hook, as
``tests/test_stores.py`` provokes a full disk) and a filler table then takes the free pages and
the room left in the last ones, as a log file filling the disk would: the next journal write
fails with ``SQLITE_FULL``. ``false`` drops the filler and lifts the limit. Both happen on the
validator's thread, between two polls, never mid-tap.

Nothing else is changed: the reader, the database, the keys, the clock, the journal and the
loop are those of the command. (Bayi terminals need no fault and run ``afc topup`` itself.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("afc.fleet.device")

#: SQLite's default max_page_count (the "no limit" value to go back to).
UNLIMITED_PAGES = 1073741823


class _FaultFile:
    """The faults file, re-read when its modification time changes."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._mtime: int | None = None
        self.state: dict[str, object] = {}

    def changed(self) -> bool:
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        try:
            self.state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False  # being replaced: look again at the next poll
        self._mtime = mtime
        return True


def _fill(raw, device_id: str) -> int:
    """Take every free byte the database may still use: pages on the free list and room in
    the last pages. Blobs halve in size at each SQLITE_FULL, so it ends in a few dozen
    statements whatever the free space. Returns the bytes taken."""
    import sqlite3

    taken, size = 0, 1 << 16
    for _ in range(10_000):  # bounded; ends far sooner (size halves on every failure)
        if size < 32:
            break
        try:
            raw.execute("INSERT INTO fleet_disk_filler (b) VALUES (zeroblob(?))", (size,))
            taken += size
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc).lower():
                raise
            size //= 2
    log.warning("dev=%s fault: disk full (%d bytes of free space taken)", device_id, taken)
    return taken


def _install_faults(faults_path: str) -> None:
    import sqlite3

    from firmware.apps.validator import Validator
    from firmware.core.errors import CoreError

    faults = _FaultFile(faults_path)
    poll = Validator.poll

    def poll_with_faults(self: Validator):
        if faults.changed():
            full = bool(faults.state.get("disk_full"))
            try:
                raw = self.db.connection
                if full:
                    raw.execute("CREATE TABLE IF NOT EXISTS fleet_disk_filler (b BLOB)")
                    pages = raw.execute("PRAGMA page_count").fetchone()[0]
                    raw.execute(f"PRAGMA max_page_count = {int(pages)}")
                    _fill(raw, self.config.device_id)
                else:
                    raw.execute("DROP TABLE IF EXISTS fleet_disk_filler")
                    raw.execute(f"PRAGMA max_page_count = {UNLIMITED_PAGES}")
                    log.warning("dev=%s fault: disk space back", self.config.device_id)
            except (CoreError, OSError, ValueError, sqlite3.Error) as exc:
                log.error("dev=%s could not inject the disk fault: %s",
                          self.config.device_id, exc)
        return poll(self)

    Validator.poll = poll_with_faults


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulators.fleet.device",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", required=True, help="the faults file of this device (JSON)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="validator and its options, after --")
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] != ["validator"]:
        parser.error("give the command after --: validator ...")
    _install_faults(args.faults)
    from tools.cli import main as afc

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.argv = ["afc", *command]
    afc(command, prog_name="afc")


if __name__ == "__main__":
    main()
