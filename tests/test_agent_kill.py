"""The agent as a real process (``python -m edge_agent``): SIGKILL at random instants loses
nothing, SIGTERM shuts down cleanly, and the exit statuses and one-line errors of
``afc agent`` hold. Against a real Mosquitto and the minimal acking center."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.commands import EXIT_REBOOT
from edge_agent.testing import AckingPeer, make_device, wait_until, write_taps
from simulators.broker import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
DEV = "bus-0042-v1"


def start(device, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "--config", str(device.config), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the agent did not exit within {timeout} s: {err.decode()[-2000:]}")
    return proc.returncode, err.decode(errors="replace")


def reconfigure_batches(device) -> None:
    """Small batches, one in flight: many acks, many instants to be killed at."""
    text = device.config.read_text()
    text = text.replace("[batch]\n", "[batch]\nmax_records = 20\nwindow = 1\n", 1)
    text = text.replace("max_records = 50\n", "").replace("window = 4\n", "")
    device.config.write_text(text)


def statuses(peer: AckingPeer) -> list[str]:
    return [json.loads(p)["state"] for _, p in peer.leaf("status") if p]


@pytest.fixture
def broker(tmp_path: Path):
    """Mosquitto with TCP_NODELAY (as docs/agent.md recommends): one ack round trip is a
    few milliseconds instead of Nagle's ~40 ms, so many kills fit in the test's time."""
    with MosquittoBroker(tmp_path / "broker", extra_config="set_tcp_nodelay true") as b:
        yield b


@pytest.fixture
def device(tmp_path: Path, broker: MosquittoBroker):
    return make_device(tmp_path / "dev", DEV, broker.host, broker.port, sections={
        "batch": {"max_records": 50, "window": 4, "ack_timeout_s": 1.0},
        "log": {"level": "info"},
    })


@pytest.fixture
def peer(device, broker: MosquittoBroker):
    with AckingPeer(broker.host, broker.port, device.center_key,
                    {DEV: device.public}) as center:
        yield center


@pytest.mark.parametrize("rounds", [8, pytest.param(50, marks=pytest.mark.slow)])
def test_sigkill_at_random_instants_loses_nothing(device, peer, rounds: int) -> None:
    rng = random.Random(42)
    reconfigure_batches(device)
    peer.ack_delay_s = 0.01  # a slow center: the delivery spans the kills
    with device.open_db() as db:
        write_taps(db, 1000, rng=rng)  # 2000 records before the first start
        expected = {r.seq: dataclasses.replace(r, mac=b"")
                    for r in db.journal.records(0, 10_000, verify=False)}
    kills = 0
    for _ in range(rounds):
        before = peer.upto(DEV)
        proc = start(device)
        # kill it somewhere in the middle of the delivery: after some progress, at a random
        # extra delay (it may be reading, publishing, recording an ack or pruning)
        wait_until(lambda b=before: peer.upto(DEV) > b, timeout=20)
        time.sleep(rng.uniform(0, 0.15))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills += 1
        with device.open_db() as db:  # the validator keeps journaling meanwhile
            write_taps(db, 25, rng=rng)
    peer.ack_delay_s = 0.0
    code, err = finish(start(device, "--once", "--timeout", "60"))
    assert code == 0, err[-2000:]
    with device.open_db() as db:
        last = db.journal.last_seq
        assert db.journal.acked_seq == last and not db.journal.records(0, 10, verify=False)
    assert kills == rounds and last == 2000 + kills * 50
    assert peer.seqs(DEV) == list(range(1, last + 1))  # nothing lost, each stored once
    assert not peer.refused  # a redelivered record is byte-identical to the first copy
    with peer._lock:
        stored = dict(peer.stored[DEV].records)
    assert all(stored[seq] == rec for seq, rec in expected.items())
    # the broker told the center about each ungraceful exit (last will, retained)
    assert "offline" in statuses(peer)


def test_sigterm_shuts_down_cleanly(device, peer) -> None:
    with device.open_db() as db:
        write_taps(db, 20)
    proc = start(device)
    assert wait_until(lambda: peer.upto(DEV) == 40)
    assert wait_until(lambda: "online" in statuses(peer))
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, 30)
    assert code == 0, err[-2000:]
    assert wait_until(lambda: statuses(peer)[-1] == "offline")
    assert "clean shutdown" in (device.folder / "agent.log").read_text()


def test_reboot_app_exits_with_the_restart_status(device, peer) -> None:
    proc = start(device)
    assert wait_until(lambda: "online" in statuses(peer))
    peer.command(DEV, "reboot-app", 1)
    code, err = finish(proc, 30)
    assert code == EXIT_REBOOT, err[-2000:]


def test_once_without_a_center_fails_with_a_reason(device) -> None:
    with device.open_db() as db:
        write_taps(db, 10)
    code, err = finish(start(device, "--once", "--timeout", "2"), 30)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("afc: error: outbox not drained within 2 s: 20 record(s) "
                           "unacknowledged"), err[-2000:]


def test_once_with_nothing_to_send_and_no_broker(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker")  # never started: nothing listens
    device = make_device(tmp_path / "dev", DEV, broker.host, broker.port)
    code, err = finish(start(device, "--once", "--timeout", "1.5"), 30)
    assert code == 2 and "broker not reachable" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[batch]", "[batch]\nmax_recods = 5"), "unknown setting"),
        (lambda t: t.replace('key = "device.key"', 'key = "missing.key"'), "missing.key"),
        (lambda t: t + "\n[nonsense\n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_a_one_line_error(device, edit, message: str) -> None:
    device.config.write_text(edit(device.config.read_text()))
    code, err = finish(start(device), 30)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("afc: error: ") and message in lines[0]


def test_key_readable_by_others_refused(device) -> None:
    (device.folder / "device.key").chmod(0o644)
    code, err = finish(start(device), 30)
    assert code == 1 and "chmod 600" in err
