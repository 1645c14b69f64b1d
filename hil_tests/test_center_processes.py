"""The reference center as real processes: `afc sim center run` with N ingest worker
processes on a shared subscription and one SQLite store, against a real Mosquitto.

Proves: the workers share the load and store every record exactly once; a worker SIGKILLed
after storing and before acking loses nothing (the retransmission is dropped as a duplicate
and acked, by the other worker or by the restarted one); SIGTERM stops everything cleanly;
status, telemetry and events published while the center is down (killed, and the broker
restarted meanwhile) reach it when it is back, through its monitor's persistent session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import protocol as P
from edge_agent.keys import generate_key_file, load_private_key, public_hex
from simulators.center.devicesim import BatchSender
from simulators.center.errors import CenterError
from simulators.center.mqtt import BrokerAddress
from simulators.center.store import SqliteCenterStore

ROOT = Path(__file__).resolve().parents[1]
DEVICES = {f"KNY-BUS-{i:04d}-V1": Ed25519PrivateKey.generate() for i in range(3)}


class CenterProcess:
    """``afc sim center run`` in a child process; its stderr (and its workers') is read
    line by line so a test can wait, bounded, for what it logs."""

    def __init__(self, broker, tmp_path: Path, workers: int, env: dict[str, str] | None = None):
        self.key_path = tmp_path / "center.key"
        # the same folder again is the same center coming back: same key, same database
        self.key = (load_private_key(self.key_path) if self.key_path.exists()
                    else generate_key_file(self.key_path))
        self.db = tmp_path / "center.db"
        devices = tmp_path / "devices.toml"
        devices.write_text("".join(
            f'[[device]]\nid = "{dev}"\nkind = "validator"\npublic_key = "{public_hex(k)}"\n'
            for dev, k in DEVICES.items()))
        cmd = [sys.executable, "-c",
               "from tools.center_cmd import center; center(prog_name='afc sim center')",
               "run", "--broker", f"{broker.host}:{broker.port}", "--db", str(self.db),
               "--key", str(self.key_path), "--workers", str(workers), "--devices",
               str(devices)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line)

    def wait_for(self, pattern: str, count: int = 1, timeout_s: float = 20.0) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; returns them."""
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while True:
            found = [line for line in self.lines if rx.search(line)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._queue.empty()):
                raise AssertionError(f"no {count} x {pattern!r} in the center's log within "
                                     f"{timeout_s} s:\n" + "".join(self.lines[-30:]))
            with contextlib.suppress(queue.Empty):
                self.lines.append(self._queue.get(timeout=min(remaining, 0.5)))

    def worker_pids(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines
                if (m := re.search(r"ingest worker \d+ started: pid=(\d+)", line))]

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode

    def __enter__(self) -> CenterProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive: reaped by its parent or by init soon
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_two_workers_share_the_load_and_store_every_record_once(mosquitto, tmp_path):
    with CenterProcess(mosquitto, tmp_path, workers=2) as center:
        center.wait_for("ingest subscribed", count=2)
        center.wait_for("center ready")
        samples = {dev: P.wire_sample(500, random.Random(i), device_id=dev)
                   for i, dev in enumerate(DEVICES)}  # 1000 records each

        async def deliver():
            address = BrokerAddress(mosquitto.host, mosquitto.port)
            senders = [BatchSender(address, dev, DEVICES[dev], center.key.public_key())
                       for dev in DEVICES]
            for s in senders:
                await s.__aenter__()
            try:
                for s in senders:
                    await s.send(samples[s.device_id], 50)  # 20 batches per device
                for s in senders:
                    assert (await s.wait_upto(1000, 30)).upto == 1000
            finally:
                for s in senders:
                    await s.__aexit__(None, None, None)

        asyncio.run(deliver())
        pids = center.worker_pids()
        assert center.stop() == 0
    with SqliteCenterStore(center.db) as store:
        for dev in DEVICES:
            assert store.seqs(dev) == list(range(1, 1001))
            assert list(store.records(dev)) == samples[dev]
        per_worker = store.records_per_worker()
    assert sum(per_worker.values()) == 3000
    assert len(per_worker) == 2 and min(per_worker.values()) > 0, per_worker  # both worked
    assert not any(_alive(pid) for pid in pids)  # the workers stopped with the center


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_killed_after_store_before_ack_loses_nothing(mosquitto, tmp_path, workers):
    """Workers SIGKILL themselves once, after storing their 3rd batch and before acking it.
    The device retransmits everything above its ack; the stored batch comes back as a
    duplicate and is acked (by the other worker, or by the supervisor's restarted one)."""
    dev = next(iter(DEVICES))
    records = P.wire_sample(100, random.Random(9), device_id=dev)  # 200 records
    env = {"AFC_CENTER_FAULT": f"kill-before-ack=3:{tmp_path / 'fault.once'}"}
    with CenterProcess(mosquitto, tmp_path, workers=workers, env=env) as center:
        center.wait_for("ingest subscribed", count=workers)
        center.wait_for("center ready")

        async def deliver():
            address = BrokerAddress(mosquitto.host, mosquitto.port)
            async with BatchSender(address, dev, DEVICES[dev], center.key.public_key()) as s:
                await s.send(records, 20)  # 10 batches; one worker dies mid-way
                await asyncio.get_running_loop().run_in_executor(
                    None, center.wait_for, "fault injection: SIGKILL")
                # the killed worker is restarted (or its partner carries on)
                await asyncio.get_running_loop().run_in_executor(
                    None, center.wait_for, "ingest subscribed", workers + 1)
                for attempt in range(5):  # the agent's retransmission, bounded
                    upto = s.upto
                    if upto >= 200:
                        break
                    await s.send([r for r in records if r.seq > upto], 20)
                    try:
                        await s.wait_upto(200, 10)
                    except CenterError:
                        if attempt == 4:
                            raise
                return s.upto

        assert asyncio.run(deliver()) == 200
        assert len(center.wait_for(r"exited with -9")) == 1  # the supervisor saw the kill
        if workers == 1:  # the stored, unacked batch came back: dropped as a duplicate, acked
            center.wait_for(r"new=0 dup=20 ")
        # (with 2 workers the survivor's ack may already cover the killed worker's batches)
        assert center.stop() == 0
    with SqliteCenterStore(center.db) as store:
        assert store.seqs(dev) == list(range(1, 201))
        assert list(store.records(dev)) == records
    assert (tmp_path / "fault.once").exists()


def test_events_published_while_the_center_is_down_arrive_when_it_is_back(tmp_path):
    """The center is SIGKILLed; a device keeps publishing events and telemetry (QoS 1); the
    broker (with persistence) is restarted meanwhile; the center comes back on the same
    database. Its monitor's persistent session gets everything that was published while it
    was away, each event stored once, the newest telemetry kept (issue 5)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_agent.testing import wait_until
    from simulators.broker import MosquittoBroker

    dev = next(iter(DEVICES))
    sign = P.ed25519_json_signer(DEVICES[dev])

    def publish(broker, first_seq: int, n: int) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev)
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            for seq in range(first_seq, first_seq + n):
                for leaf, body in (
                    ("event", {"event": "door-open" if seq % 2 else "door-closed",
                               "severity": "warning", "seq": seq, "detail": {}}),
                    ("telemetry", {"uptime_s": seq, "outbox_depth": 0}),
                ):
                    msg = P.encode_json_message({"dev": dev, "kind": "validator",
                                                 "ts": 1_000 + seq, **body}, signer=sign)
                    client.publish(f"afc/v1/dev/{dev}/{leaf}", msg, qos=1).wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()

    with MosquittoBroker(tmp_path / "broker", persistence=True) as broker:
        with CenterProcess(broker, tmp_path, workers=1) as center:
            center.wait_for("monitor subscribed: client=afc-center-monitor-")
            center.wait_for("center ready")
            publish(broker, 1, 5)  # while it is up
            with SqliteCenterStore(center.db) as store:
                assert wait_until(lambda: len(store.events(dev)) == 5, 20, 0.05)
            center.proc.kill()  # a crash: no clean disconnect
            center.proc.wait(10)
        publish(broker, 6, 20)  # the center is down
        broker.restart()  # ... and the broker restarts meanwhile: its persistence keeps them
        publish(broker, 26, 5)
        with CenterProcess(broker, tmp_path, workers=1) as center:  # the same center is back
            center.wait_for("center ready")
            with SqliteCenterStore(center.db) as store:
                assert wait_until(lambda: len(store.events(dev)) >= 30, 20, 0.05), (
                    f"{len(store.events(dev))} of 30 events; center log:\n"
                    + "".join(center.lines[-20:]))
            assert center.stop() == 0
    with SqliteCenterStore(center.db) as store:
        events = store.events(dev)
        assert sorted(e["seq"] for e in events) == list(range(1, 31))  # each once
        assert all(e["signed"] for e in events)
        (state,) = [s for s in store.device_states() if s.device_id == dev]
        assert state.telemetry_ts == 1_030 and state.telemetry["uptime_s"] == 30
