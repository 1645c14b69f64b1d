"""``afc bench agent``: the agent against a real Mosquitto and the reference center.

Everything runs as it does on a device and in the center: the agent is ``python -m
edge_agent`` in its own process (so its memory and CPU are its own), the center is ``afc sim
center run`` with one ingest worker process, the broker is Debian's mosquitto on loopback.
The figures, with the budgets of DESIGN.md where it sets one:

- ``drain_100k_s``: a backlog of 100,000 journal records (50,000 taps) delivered with
  ``--once``, from the agent's start until it exits with every record acknowledged and
  stored (<= 10 s);
- ``wire_bytes_per_txn``: signed ``txn`` payload bytes per tap in batches of 100 taps (<= 48);
- ``rss_idle_mb``: the agent's resident memory with the 100k backlog and no broker (<= 60);
- ``rss_drain_mb``: its peak resident memory during the drain (<= 60);
- ``cpu_s_per_hour_at_1hz``: its CPU seconds per hour while a validator journals one tap a
  second, measured over a window and scaled to an hour (no budget).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from firmware.stores.database import DeviceDatabase
from simulators.broker import MosquittoBroker, free_port
from simulators.center.store import SqliteCenterStore

from . import protocol
from .keys import generate_key_file, public_hex
from .testing import make_device, wait_until

DEVICE_ID = "KNY-BUS-0042-V1"


class BenchError(RuntimeError):
    """The benchmark could not run as set up (a process died, records went missing)."""


def _fill_journal(db: DeviceDatabase, taps: int, rng: random.Random, start_ms: int) -> None:
    """Journal ``taps`` realistic taps (intent + done each) through the journal's own API,
    as a validator would have over days offline; the syncs are batched since no card waits."""
    samples = protocol.wire_sample(taps, rng, device_id=DEVICE_ID, start_ms=start_ms)
    with db.deferred_sync():
        for intent, done in zip(samples[::2], samples[1::2], strict=True):
            fields = {name: getattr(intent, name) for name in (
                "kind", "time", "card_number", "uid", "counter_before", "counter_after",
                "balance_before", "balance_after", "fare", "product", "line", "vehicle",
                "validator_id", "reason", "action_id")}
            seq = db.journal.intent(fields)
            db.journal.done(seq, done.outcome or "ok", counter_after=done.counter_after,
                            balance_after=done.balance_after)


def _agent(config: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "--config", str(config), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / (1024 * 1024)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bench_agent(workdir: str | os.PathLike[str], *, taps: int = 50_000,
                cpu_window_s: float = 30.0, seed: int = 20261127) -> dict[str, Any]:
    """Run the whole measurement in ``workdir``; returns the figures (see the module doc)."""
    work = Path(workdir)
    rng = random.Random(seed)
    figures: dict[str, Any] = {}
    with MosquittoBroker(work / "broker") as broker:
        center_key = generate_key_file(work / "center.key")
        device = make_device(work / "device", DEVICE_ID, broker.host, broker.port,
                             center_key=center_key,
                             sections={"batch": {"max_age_s": 2.0, "ack_timeout_s": 15.0},
                                       "telemetry": {"interval_s": 60.0},
                                       "log": {"level": "info"}})
        with device.open_db() as db:
            _fill_journal(db, taps, rng, int(time.time() * 1000) - 7 * 86_400_000)
            backlog = db.journal.last_seq - db.journal.acked_seq
        center_db = work / "center.db"
        store = SqliteCenterStore(center_db)
        store.register_device(DEVICE_ID, "validator", public_hex(device.key))
        center = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "sim", "center", "run", "--broker",
             f"{broker.host}:{broker.port}", "--db", str(center_db), "--key",
             str(work / "center.key"), "--workers", "1", "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            # idle: the backlog waits, the uplink is down (nothing listens on the port)
            offline = device.folder / "agent-offline.toml"
            offline.write_text(device.config.read_text().replace(
                f"port = {broker.port}", f"port = {free_port()}"))
            idle = _agent(offline)
            try:
                time.sleep(4.0)
                if idle.poll() is not None:
                    raise BenchError(f"the agent exited while offline: {idle.stderr.read()!r}")
                p = psutil.Process(idle.pid)
                samples = []
                for _ in range(10):
                    samples.append(_rss_mb(p))
                    time.sleep(0.1)
                figures["rss_idle_mb"] = max(samples)
            finally:
                _stop(idle)
            if center.poll() is not None:
                raise BenchError(f"the center exited: {center.stderr.read()!r}")

            # the drain: --once exits when the center has acknowledged everything
            peak = 0.0
            t0 = time.perf_counter()
            drain = _agent(device.config, "--once", "--timeout", "120")
            p = psutil.Process(drain.pid)
            while drain.poll() is None:
                try:
                    peak = max(peak, _rss_mb(p))
                except psutil.Error:
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            if drain.returncode != 0:
                raise BenchError(f"the drain failed ({drain.returncode}): "
                                 f"{drain.stderr.read().decode(errors='replace')[-400:]}")
            stored = store.record_count(DEVICE_ID)
            if stored != backlog:
                raise BenchError(f"the center stored {stored} of {backlog} records")
            figures["drain_100k_s"] = elapsed * 100_000 / backlog
            figures["rss_drain_mb"] = peak

            # steady state: one tap a second while the agent is connected
            steady = _agent(device.config)
            stop = threading.Event()

            def validator() -> None:
                with device.open_db() as vdb:
                    while not stop.wait(1.0):
                        _fill_journal(vdb, 1, rng, int(time.time() * 1000))

            writer = threading.Thread(target=validator, daemon=True)
            try:
                p = psutil.Process(steady.pid)
                time.sleep(3.0)  # connected, settled
                before = p.cpu_times()
                writer.start()
                time.sleep(cpu_window_s)
                after = p.cpu_times()
                cpu = (after.user - before.user) + (after.system - before.system)
                figures["cpu_s_per_hour_at_1hz"] = cpu * 3600 / cpu_window_s
            finally:
                stop.set()
                writer.join(5)
                _stop(steady)
            wait_until(lambda: store.upto(DEVICE_ID) >= backlog, timeout=5)
        finally:
            _stop(center)
            store.close()
    figures["wire_bytes_per_txn"] = protocol.wire_bytes_per_txn(random.Random(seed))
    return figures
