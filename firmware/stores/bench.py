"""Benchmarks of the device database, called by ``afc bench`` (figures end in their unit).

Measured, never asserted in tests: DESIGN.md's budgets on the project's 2-core machine are a
full 1M-entry blacklist in <= 5 s, a 10k delta in <= 0.2 s and a lookup p99 <= 50 us.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

from firmware.core.keys import MemoryKeyStore

from .database import JOURNAL_MAC_KEY_NAME, DeviceDatabase

__all__ = ["bench_blacklist", "bench_journal", "make_blacklist"]

#: KONYAKART-style card numbers: 16 decimal digits.
_CARD_LO = 10**15
_CARD_HI = 10**16


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile, as the other benchmarks of the project compute it."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_blacklist(
    n: int, rng: random.Random, *, uid_share: float = 0.2
) -> list[tuple[int, int, bytes | None]]:
    """``n`` distinct random card numbers, sorted as the center sends a full list, with
    reason codes and, for ``uid_share`` of them, a 4- or 7-byte UID."""
    numbers: set[int] = set()
    while len(numbers) < n:
        numbers.update(rng.randrange(_CARD_LO, _CARD_HI) for _ in range(n - len(numbers)))
    entries = []
    for number in sorted(numbers):
        uid = None
        if rng.random() < uid_share:
            uid = rng.randbytes(4 if rng.random() < 0.7 else 7)
        entries.append((number, rng.randrange(1, 12), uid))
    return entries


def bench_blacklist(
    tmpdir: str | os.PathLike[str],
    *,
    entries: int = 1_000_000,
    delta: int = 10_000,
    lookups: int = 200_000,
    unsorted: bool = False,
    seed: int = 20261127,
) -> dict[str, float]:
    """Time a full load, deltas and lookups of the blacklist in a fresh database in ``tmpdir``.

    * ``blacklist_full_1m_s``: ``load_full`` of ``entries`` random 16-digit card numbers (20%
      with a UID), sorted as the center sends them, into a database holding a previous list
      of the same size (the swap and the clearing of the old list are included). With
      ``unsorted=True`` also ``blacklist_full_1m_unsorted_s``, the same list shuffled.
    * ``blacklist_delta_10k_s``: best of 3 deltas, each removing ``delta/2`` listed cards and
      adding ``delta/2`` new ones (best-of, because interference only slows a run down).
    * ``blacklist_lookup_p99_us`` (and ``_p50_us``): ``lookups`` single lookups through
      :meth:`Blacklist.lookup`, half listed and half absent numbers in random order, each
      timed alone; nearest-rank percentiles.
    """
    rng = random.Random(seed)
    path = Path(tmpdir) / "bench-blacklist.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    figures: dict[str, float] = {}
    listed = make_blacklist(entries, rng)
    with DeviceDatabase.open(path, device_id="bench") as db:
        bl = db.blacklist
        bl.load_full(1, make_blacklist(entries, random.Random(seed + 1)))  # the list to replace
        start = time.perf_counter()
        bl.load_full(2, listed)
        figures["blacklist_full_1m_s"] = time.perf_counter() - start
        version = 2
        if unsorted:
            shuffled = list(listed)
            rng.shuffle(shuffled)
            start = time.perf_counter()
            bl.load_full(3, shuffled)
            figures["blacklist_full_1m_unsorted_s"] = time.perf_counter() - start
            version = 3
            del shuffled

        present = [e[0] for e in listed]
        delta_times = []
        for _ in range(3):
            gone = rng.sample(present, min(delta // 2, len(present)))
            new = [(rng.randrange(_CARD_LO, _CARD_HI), 5, None) for _ in range(delta - len(gone))]
            start = time.perf_counter()
            bl.apply_delta(version, version + 1, add=new, remove=gone)
            delta_times.append(time.perf_counter() - start)
            version += 1
            gone_set = set(gone)
            present = [n for n in present if n not in gone_set] + [e[0] for e in new]
        figures["blacklist_delta_10k_s"] = min(delta_times)

        probes = rng.sample(present, min(lookups // 2, len(present)))
        probes += [rng.randrange(_CARD_LO, _CARD_HI) for _ in range(lookups - len(probes))]
        rng.shuffle(probes)
        lookup = bl.lookup
        clock = time.perf_counter_ns
        for number in probes[:1000]:  # warm the page cache and the statement cache
            lookup(number)
        samples = []
        hits = 0
        for number in probes:
            t0 = clock()
            found = lookup(number)
            samples.append(clock() - t0)
            hits += found is not None
        figures["blacklist_lookup_p50_us"] = _percentile(samples, 50) / 1000
        figures["blacklist_lookup_p99_us"] = _percentile(samples, 99) / 1000
        figures["blacklist_lookup_hit_ratio"] = hits / len(probes)
        figures["blacklist_db_mb"] = (
            db.storage_stats()["page_count"] * db.storage_stats()["page_size"] / 1e6
        )
    return figures


def bench_journal(
    tmpdir: str | os.PathLike[str], *, taps: int = 2000, seed: int = 20261127
) -> dict[str, float]:
    """Time intent + done pairs (one tap's journal work, two fsynced commits) and measure the
    bytes a tap appends to the WAL.

    ``journal_tap_p50_us``/``_p99_us``: intent() then done() for ``taps`` taps of random
    cards, with automatic checkpoints off so ``journal_wal_bytes_per_tap`` is the WAL's
    growth divided by the taps (every byte SQLite writes before a checkpoint; a checkpoint
    later writes each changed page once more to the main file).
    """
    rng = random.Random(seed)
    path = Path(tmpdir) / "bench-journal.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    keys = MemoryKeyStore({JOURNAL_MAC_KEY_NAME: rng.randbytes(16)})
    cards = [rng.randrange(_CARD_LO, _CARD_HI) for _ in range(500)]
    with DeviceDatabase.open(path, device_id="bench", journal_key=keys, wal_autocheckpoint=0) as db:
        journal = db.journal
        db.checkpoint("TRUNCATE")
        wal_before = db.storage_stats()["wal_bytes"]
        samples = []
        for i in range(taps):
            card = rng.choice(cards)
            t0 = time.perf_counter_ns()
            seq = journal.intent(
                {
                    "kind": "tap",
                    "time": 1_790_000_000_000 + i * 1000,
                    "card_number": card,
                    "uid": card.to_bytes(8, "big")[:4],
                    "counter_before": i,
                    "balance_before": 10_000,
                    "fare": 2_000,
                    "product": 1,
                    "line": "41",
                    "vehicle": "42 KON 123",
                    "validator_id": "V1",
                }
            )
            journal.done(seq, "ok", counter_after=i + 1, balance_after=8_000)
            samples.append(time.perf_counter_ns() - t0)
        wal_after = db.storage_stats()["wal_bytes"]
    return {
        "journal_tap_p50_us": statistics.median(samples) / 1000,
        "journal_tap_p99_us": _percentile(samples, 99) / 1000,
        "journal_wal_bytes_per_tap": (wal_after - wal_before) / taps,
    }
