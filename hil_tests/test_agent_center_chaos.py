"""The agent and the reference center together, under the chaos issue 5 asks for.

Every part is the real one, as its own process: ``python -m edge_agent`` (the device),
``afc sim center run`` with an ingest worker process (the center), Debian's mosquitto (the
broker), and a TCP link proxy between the agent and the broker that resets connections
mid-publish. While a validator keeps journaling taps, the broker is restarted 10 times, the
link dropped and blackholed, the agent SIGKILLed at random instants; at the end the center
holds every record of the journal exactly once, field for field, and the device has pruned
only what the center stored. Seeded and bounded; ``AFC_SLOW=1`` runs the longer variant.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.keys import generate_key_file, public_hex
from edge_agent.testing import make_device, wait_until, write_taps
from firmware.stores.journal import canonical_bytes
from simulators.broker import MosquittoBroker
from simulators.center.store import SqliteCenterStore
from simulators.fleet.proxy import LinkProxy

REPO = Path(__file__).resolve().parent.parent
DEV = "KNY-BUS-0007-V1"


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("rounds", [
    pytest.param(10, id="ci"),
    pytest.param(40, id="soak", marks=pytest.mark.slow),
])
def test_every_record_reaches_the_center_once_through_restarts_drops_and_kills(
        tmp_path: Path, rounds: int):
    rng = random.Random(20261127 + rounds)
    with MosquittoBroker(tmp_path / "broker", persistence=True) as broker, \
            LinkProxy((broker.host, broker.port), name="bus-7") as link:
        center_key = generate_key_file(tmp_path / "center.key")
        device = make_device(tmp_path / "dev", DEV, "127.0.0.1", link.port,
                             center_key=center_key, sections={
                                 "batch": {"max_records": 40, "window": 4,
                                           "ack_timeout_s": 1.0, "max_age_s": 0.2},
                                 "mqtt": {"keepalive": 5},
                                 "log": {"level": "info"}})
        store = SqliteCenterStore(tmp_path / "center.db")
        store.register_device(DEV, "validator", public_hex(device.key))
        center_log, agent_log = tmp_path / "center.log", tmp_path / "agent.log"
        center = _spawn("-m", "tools.cli", "sim", "center", "run", "--broker",
                        f"{broker.host}:{broker.port}", "--db", str(tmp_path / "center.db"),
                        "--key", str(tmp_path / "center.key"), "--workers", "1",
                        log=center_log)
        agent = _spawn("-m", "edge_agent", "--config", str(device.config), log=agent_log)
        stop = threading.Event()
        written: list[int] = []

        def validator() -> None:  # a bus in service: a tap every ~50 ms
            with device.open_db() as db:
                while not stop.is_set():
                    written.extend(write_taps(db, 1, rng=random.Random(len(written))))
                    stop.wait(0.05)

        tapping = threading.Thread(target=validator, daemon=True)
        tapping.start()
        try:
            for i in range(rounds):
                time.sleep(rng.uniform(0.2, 0.8))
                fault = ("broker", "drop", "blackhole", "kill")[i % 4]
                if fault == "broker":
                    broker.restart(down_for=rng.uniform(0.0, 0.5))
                elif fault == "drop":
                    link.set_state("drop")
                    time.sleep(rng.uniform(0.05, 0.4))
                    link.set_state("up")
                elif fault == "blackhole":
                    link.set_state("blackhole")
                    time.sleep(rng.uniform(0.2, 1.0))
                    link.set_state("up")
                else:
                    _stop(agent, signal.SIGKILL)
                    agent = _spawn("-m", "edge_agent", "--config", str(device.config),
                                   log=agent_log)
                assert center.poll() is None, center_log.read_text()[-2000:]
            # the remaining broker restarts, so CI sees 10 of them whatever the mix
            for _ in range(max(0, 10 - (rounds + 3) // 4)):
                time.sleep(rng.uniform(0.1, 0.4))
                broker.restart()
        finally:
            stop.set()
            tapping.join(10)
        try:
            with device.open_db() as db:
                last = db.journal.last_seq
            delivered = wait_until(lambda: store.upto(DEV) >= last, timeout=90, step=0.2)
            assert delivered, (f"the center has up to {store.upto(DEV)} of {last}; agent log: "
                               f"{agent_log.read_text()[-3000:]}")
            stored = {r.seq: r for r in store.records(DEV)}
            assert sorted(stored) == list(range(1, last + 1)), "missing or extra sequence numbers"
            assert store.record_count(DEV) == last, "a record was stored twice"
            # field for field: the journal's canonical bytes (which the device MACs) agree for
            # every record the device still holds (acked ones may be pruned already)
            with device.open_db() as db:
                for rec in db.journal.records(0, 1_000_000):
                    got = stored[rec.seq]
                    assert canonical_bytes(got) == canonical_bytes(rec), f"record {rec.seq}"
                assert db.journal.acked_seq <= store.upto(DEV)
            assert len(written) > 50, "the validator hardly wrote anything"
        finally:
            _stop(agent)
            _stop(center)
            store.close()
