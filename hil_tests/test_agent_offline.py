"""A device offline for a simulated week, then back: the agent process (``python -m
edge_agent``) runs the whole time, the journal fills with a week of taps, telemetry piles up
in the bounded buffer and an alarm waits in the event log; when the broker and the center
appear, every record is delivered once and in order, the alarm arrives, the buffered
telemetry arrives oldest first with its drop count, and the journal empties.

Real Mosquitto, real processes, the minimal acking center of edge_agent.testing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.testing import AckingPeer, make_device, wait_until, write_taps
from simulators.broker import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
DEV = "KNY-BUS-0042-V1"
WEEK_MS = 7 * 24 * 3600 * 1000


def _buffered(path: Path) -> tuple[int, int]:
    """(telemetry reports buffered, reports dropped so far) read from the agent's file."""
    if not path.exists():
        return 0, 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT count(*) FROM queue").fetchone()[0]
        dropped = conn.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(rows), int(dropped[0])
    except sqlite3.Error:
        return 0, 0
    finally:
        conn.close()


def _newest_report(path: Path) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT payload FROM queue ORDER BY id DESC LIMIT 1").fetchone()
        return {} if row is None else json.loads(row[0])
    except (sqlite3.Error, ValueError):
        return {}
    finally:
        conn.close()


def test_offline_week_then_everything_once_and_in_order(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker", extra_config="set_tcp_nodelay true")
    device = make_device(tmp_path / "dev", DEV, broker.host, broker.port, sections={
        "telemetry": {"interval_s": 0.2, "buffer_bytes": 16384},
        "batch": {"ack_timeout_s": 15.0},
        "log": {"level": "info"},
    })
    taps = 7 * 24 * 60 // 2  # a week, a tap every 2 minutes on average
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "--config", str(device.config)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # the week offline: the validator journals, an alarm is raised, telemetry piles up
        start = int(time.time() * 1000) - WEEK_MS
        with device.open_db() as db:
            write_taps(db, taps, rng=random.Random(3), start_ms=start,
                       step_ms=WEEK_MS // taps)
            alarm = db.events.raise_event("out-of-service", "alarm", {"why": "offline test"})
            last = db.journal.last_seq
        queue = device.folder / "device-uplink.db"
        assert wait_until(lambda: _buffered(queue)[1] > 0, timeout=30)
        # a report taken after the week: the whole journal waits, a week old
        assert wait_until(lambda: _newest_report(queue).get("outbox_depth") == last)
        assert queue.stat().st_size < 1 << 20  # bounded by the 16 KiB budget (plus SQLite)
        assert agent.poll() is None

        # back online
        with broker, AckingPeer(broker.host, broker.port, device.center_key,
                                {DEV: device.key.public_key()}) as center:
            def delivered() -> bool:
                with device.open_db() as db:
                    return db.journal.acked_seq == last and db.events.count == 0

            assert wait_until(delivered, timeout=60)
            assert wait_until(lambda: _buffered(queue)[0] <= 1, timeout=30)
            seqs = center.seqs(DEV)
            arrival = list(center.arrival[DEV])
            telemetry = [json.loads(p) for _, p in center.leaf("telemetry")]
            events = [json.loads(p) for _, p in center.leaf("event")]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            _, err = agent.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            _, err = agent.communicate(timeout=10)
    assert agent.returncode == 0, err.decode()[-2000:]
    assert last == 2 * taps and seqs == list(range(1, last + 1))  # each record once
    assert arrival == sorted(arrival)  # and in order
    with device.open_db() as db:
        assert not db.journal.records(0, 10, verify=False)  # pruned after the acks
    assert [e["seq"] for e in events if e["event"] == "out-of-service"] == [alarm]
    times = [t["ts"] for t in telemetry]
    assert times == sorted(times)
    assert any(t.get("telemetry_dropped", 0) > 0 for t in telemetry)
    backlog = [t for t in telemetry if t.get("outbox_depth") == last]
    assert backlog and backlog[0]["outbox_age_s"] >= WEEK_MS // 1000 - 60
