"""Faults on the reader rig, through the real pty: tears at every command boundary of a
write sequence, a card pulled mid-command, and a serial line that garbles and cuts frames."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from firmware.core.errors import CoreError, NoResponseError
from firmware.reader.driver import Pn532
from simulators.rig import ReaderEmulatorProcess

FF = bytes.fromhex("FFFFFFFFFFFF")
MODES = ["chip", "transparent"]
# after selection, a write sequence is: AUTH, {nr}{ar}, WRITE 4, data, WRITE 5, data
SEQUENCE_FRAMES = 6


@pytest.fixture
def rig(tmp_path):
    control = str(tmp_path / "ctl")
    port = tmp_path / "pn532"
    with (
        ReaderEmulatorProcess(port, ["new:1k"], control=control) as emulator,
        Pn532.open(str(port), response_timeout=2.0) as pn,
    ):
        pn.set_max_retries(passive=1)
        yield emulator, pn


def fresh_tap(pn: Pn532, mode: str):
    pn.rf_field(False)  # the card leaves and re-enters the field: powered up, IDLE
    pn.rf_field(True)
    target = pn.select()
    return pn.chip_classic(target) if mode == "chip" else pn.transparent_classic(target)


def read_blocks(pn: Pn532, mode: str) -> tuple[bytes, bytes]:
    card = fresh_tap(pn, mode)
    card.authenticate(4, FF, "A")
    return card.read(4), card.read(5)


@pytest.mark.parametrize("mode", MODES)
def test_tear_at_every_command_boundary_of_a_write_sequence(rig, mode):
    emulator, pn = rig
    round_no = 0
    for k in range(1, SEQUENCE_FRAMES + 1):
        for answer in (True, False):
            round_no += 1
            old4, old5 = read_blocks(pn, mode)
            new4, new5 = bytes([round_no]) * 16, bytes([round_no + 100]) * 16
            card = fresh_tap(pn, mode)
            emulator.control(f"fault 1 tear-after {k} answer={str(answer).lower()}")
            completed = False
            with pytest.raises(CoreError):
                card.authenticate(4, FF, "A")
                card.write(4, new4)
                card.write(5, new5)
                completed = True
                card.read(4)  # the last frame answered: the tear hits here
            emulator.control("fault 1 clear")
            got4, got5 = read_blocks(pn, mode)
            # each block is all old or all new, and the writes land in order
            assert got4 in (old4, new4), (k, answer)
            assert got5 in (old5, new5), (k, answer)
            if got5 == new5:
                assert got4 == new4
            # the card processes its k-th frame before it is torn: a write's data frame
            # (frames 4 and 6) lands even when its ACK is lost
            assert (got4 == new4) == (k >= 4), (k, answer)
            assert (got5 == new5) == (k >= 6), (k, answer)
            # the sequence only completes when the tear comes after the last ACK
            assert completed == (k == SEQUENCE_FRAMES and answer), (k, answer)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("commit", [True, False])
def test_tear_between_the_two_phases_of_a_write(rig, mode, commit):
    emulator, pn = rig
    old4, _ = read_blocks(pn, mode)
    card = fresh_tap(pn, mode)
    card.authenticate(4, FF, "A")
    emulator.control(f"fault 1 tear-in-write commit={str(commit).lower()}")
    with pytest.raises(NoResponseError):
        card.write(4, b"half-written blk")
    emulator.control("fault 1 clear")
    got4, _ = read_blocks(pn, mode)
    assert got4 == (b"half-written blk" if commit else old4)


@pytest.mark.parametrize("mode", MODES)
def test_card_removed_mid_session_then_back(rig, mode):
    emulator, pn = rig
    card = fresh_tap(pn, mode)
    card.authenticate(4, FF, "A")
    emulator.control("remove 1")
    with pytest.raises(NoResponseError):
        card.read(4)
    assert pn.list_passive_targets() == []
    emulator.control("place 1")
    card = fresh_tap(pn, mode)
    card.authenticate(4, FF, "A")
    assert card.read(4) == bytes(16)


def test_host_garbage_and_truncated_frames_on_the_line(rig):
    _, pn = rig
    pn.transport.write(b"\x12\x34garbage\x00\xff\x07")  # noise, then a frame cut short
    assert pn.firmware_version()[0] == 0x32
    pn.transport.write(b"\x00\x00\xff\x05\xfb\xd4\x4a")  # a truncated InListPassiveTarget
    assert pn.firmware_version()[0] == 0x32
    assert len(pn.select().uid) == 4


class GarblingProxy:
    """A TCP proxy between the driver and the emulator that damages the chip's answers on
    request: the way a noisy cable does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.prefix_garbage = b""
        self.cut_next_frame = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(10)
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream, timeout=10)
        for sock in (client, server):
            sock.settimeout(0.05)

        def pump(src, dst, chip_to_host):
            while not self.stopped.is_set():
                try:
                    data = src.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if chip_to_host and self.prefix_garbage:
                    data, self.prefix_garbage = self.prefix_garbage + data, b""
                if chip_to_host and self.cut_next_frame and len(data) > 8:
                    self.cut_next_frame = False
                    data = data[: len(data) - 3]  # lose the tail: DCS and postamble
                try:
                    dst.sendall(data)
                except OSError:
                    return

        t = threading.Thread(target=pump, args=(server, client, True), daemon=True)
        t.start()
        pump(client, server, False)
        t.join(2)
        client.close()
        server.close()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def tcp_emulator():
    """`afc sim reader --listen` on a free loopback port (for pyserial's socket:// URLs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "sim", "reader", "--listen", f"127.0.0.1:{port}",
         "--card", "new:1k"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "emulator exited at start"
                assert time.monotonic() < deadline, "emulator did not listen in time"
                time.sleep(0.05)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def test_driver_resynchronises_on_chip_side_garbage_and_cut_frames(tcp_emulator):
    proxy = GarblingProxy(tcp_emulator)
    try:
        with Pn532.open(f"socket://127.0.0.1:{proxy.port}", response_timeout=2.0) as pn:
            proxy.prefix_garbage = b"\x13\x37noise\x00\xff\x03"  # noise with a false start
            assert pn.firmware_version()[0] == 0x32
            proxy.cut_next_frame = True  # a response loses its tail: the driver NACKs
            assert pn.firmware_version()[0] == 0x32
            assert not proxy.cut_next_frame
            pn.set_max_retries(passive=1)
            assert len(pn.select().uid) == 4
    finally:
        proxy.close()
