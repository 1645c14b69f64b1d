"""Test and benchmark fixtures for the agent: a device folder and a minimal acking peer.

:func:`make_device` writes what a provisioned device has (key file, ``agent.toml``, device
database) into a folder; :class:`AckingPeer` is the smallest center that speaks
``docs/protocol.md``: it verifies batches with :mod:`edge_agent.protocol`, keeps the records
in a dict, and answers with the signed cumulative ack, so the agent can be tested against a
real broker before (and independently of) the reference center in ``simulators/center``.
The peer also records every other device message and publishes bundles and commands.

Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from firmware.core.keys import MemoryKeyStore
from firmware.stores import DeviceDatabase

from . import protocol
from .errors import ProtocolError
from .keys import generate_key_file, public_hex

__all__ = [
    "JOURNAL_KEY",
    "AckingPeer",
    "AgentThread",
    "Device",
    "make_device",
    "wait_until",
    "write_taps",
]

JOURNAL_KEY = bytes(range(16))


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@dataclass
class Device:
    """A provisioned device folder."""

    device_id: str
    folder: Path
    config: Path
    db_path: Path
    key: Ed25519PrivateKey
    center_key: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def open_db(self) -> DeviceDatabase:
        """The device database as the validator opens it (with the journal MAC key)."""
        return DeviceDatabase.open(
            self.db_path, device_id=self.device_id,
            journal_key=MemoryKeyStore({"journal-mac": JOURNAL_KEY}),
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_device(
    folder: Path,
    device_id: str,
    host: str,
    port: int,
    *,
    center_key: Ed25519PrivateKey | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> Device:
    """Provision a device in ``folder``: key file, ``agent.toml`` and database.

    ``sections`` adds or overrides settings (``{"batch": {"window": 2}}``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = generate_key_file(folder / "device.key")
    center_key = center_key or Ed25519PrivateKey.generate()
    config: dict[str, dict[str, Any]] = {
        "device": {"id": device_id, "kind": "validator", "db": "device.db"},
        "identity": {"key": "device.key", "center_public": public_hex(center_key)},
        "mqtt": {"host": host, "port": port, "keepalive": 10, "backoff_initial_s": 0.05,
                 "backoff_max_s": 1.0, "connect_timeout_s": 5.0},
        "batch": {"max_age_s": 0.2, "ack_timeout_s": 3.0},
        "telemetry": {"interval_s": 3600.0},
        "log": {"file": "agent.log", "level": "debug"},
    }
    for name, values in (sections or {}).items():
        config.setdefault(name, {}).update(values)
    text = []
    for name, values in config.items():
        text.append(f"[{name}]")
        text += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        text.append("")
    path = folder / "agent.toml"
    path.write_text("\n".join(text))
    device = Device(device_id, folder, path, folder / "device.db", key, center_key)
    device.open_db().close()
    return device


def write_taps(db: DeviceDatabase, n: int, *, rng: random.Random | None = None,
               start_ms: int | None = None, step_ms: int = 1000) -> list[int]:
    """Journal ``n`` taps as the validator does (intent, then done), ``step_ms`` apart;
    returns the done records' seqs."""
    rng = rng or random.Random(1)
    now = start_ms if start_ms is not None else int(time.time() * 1000)
    out = []
    for i in range(n):
        card = rng.randrange(10_000_000, 99_999_999)
        balance = rng.randint(2250, 100_000)
        counter = rng.randint(1, 3000)
        seq = db.journal.intent({
            "kind": "tap", "time": now + i * step_ms, "card_number": card,
            "uid": rng.randbytes(4), "counter_before": counter, "counter_after": counter + 1,
            "balance_before": balance, "balance_after": balance - 2250, "fare": 2250,
            "product": 0, "line": "48", "vehicle": "42 KY 042", "validator_id": "V1",
        })
        out.append(db.journal.done(seq, "ok", counter_after=counter + 1,
                                   balance_after=balance - 2250))
    return out


@dataclass
class _Stored:
    records: dict[int, Any] = field(default_factory=dict)
    upto: int = 0


class AckingPeer:
    """A minimal center on a real broker: stores verified batches, acks cumulatively.

    ``acking`` can be switched off (records are still stored: the agent must not prune on
    PUBACK alone). ``messages`` collects every other device message by leaf
    (``telemetry``, ``event``, ``status``, ``reply``) as ``(topic, payload)``.
    """

    def __init__(self, host: str, port: int, center_key: Ed25519PrivateKey,
                 devices: dict[str, Ed25519PublicKey], *, client_id: str = "test-center",
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.center_key = center_key
        self.devices = dict(devices)
        self.acking = True
        self.ack_delay_s = 0.0  # a slow center: each ack waits this long (stalls the peer)
        self.stored: dict[str, _Stored] = defaultdict(_Stored)
        self.batches: list[tuple[str, int, int]] = []
        self.arrival: dict[str, list[int]] = defaultdict(list)  # seqs in first-stored order
        self.duplicates = 0
        self.refused: list[str] = []
        self.messages: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        if tls_context is not None:
            self._client.tls_set_context(tls_context)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> AckingPeer:
        self._client.reconnect_delay_set(0.05, 0.5)
        self._client.connect_async(self.host, self.port, keepalive=10)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise RuntimeError(f"test center could not connect to {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> AckingPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any = None) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):  # acks are small: do not let Nagle hold them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe([("afc/v1/dev/+/txn", 1), ("afc/v1/dev/+/telemetry", 1),
                          ("afc/v1/dev/+/event", 1), ("afc/v1/dev/+/status", 1),
                          ("afc/v1/dev/+/reply", 1)])
        self._connected.set()

    # -- ingest -----------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, leaf = protocol.parse_dev_topic(message.topic)
        except ProtocolError as exc:
            self.refused.append(str(exc))
            return
        if leaf != "txn":
            with self._lock:
                self.messages[leaf].append((message.topic, bytes(message.payload)))
            return
        try:
            batch = protocol.decode_batch(bytes(message.payload), self.devices.get,
                                          topic_device=device_id)
        except ProtocolError as exc:
            self.refused.append(str(exc))
            return
        with self._lock:
            store = self.stored[device_id]
            self.batches.append((device_id, batch.first, batch.last))
            for rec in batch.records:
                if rec.seq in store.records:
                    self.duplicates += 1
                    if store.records[rec.seq] != rec:
                        self.refused.append(f"record {device_id}/{rec.seq} changed on resend")
                else:
                    store.records[rec.seq] = rec
                    self.arrival[device_id].append(rec.seq)
            while store.upto + 1 in store.records:
                store.upto += 1
            upto = store.upto
        if self.acking:
            if self.ack_delay_s:
                time.sleep(self.ack_delay_s)
            self.ack(device_id, upto)

    def ack(self, device_id: str, upto: int, *, bad: Iterable[tuple[int, int]] = ()) -> None:
        """Publish a signed cumulative ack (also usable to send forged/odd acks in tests)."""
        payload = protocol.encode_ack(
            protocol.Ack(device_id, upto, int(time.time() * 1000), tuple(bad)), self.center_key
        )
        self._client.publish(protocol.dev_topic(device_id, "ack"), payload, qos=1)

    # -- outgoing ------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def bundle(self, bundle: protocol.Bundle, *, key: Ed25519PrivateKey | None = None,
               device_id: str | None = None, retain: bool = True) -> bytes:
        """Sign and publish a bundle on its topic (retained, like the center does)."""
        payload = protocol.encode_bundle(bundle, key or self.center_key)
        self.publish(protocol.cfg_topic(bundle.kind, device_id), payload, retain=retain)
        return payload

    def command(self, device_id: str, name: str, nonce: int, *, args: dict | None = None,
                cmd_id: str | None = None, expires_in_ms: int = 60_000,
                key: Ed25519PrivateKey | None = None) -> bytes:
        now = int(time.time() * 1000)
        cmd = protocol.Command(device_id, cmd_id or f"c{nonce}", name, args or {}, nonce, now,
                               now + expires_in_ms)
        payload = protocol.encode_command(cmd, key or self.center_key)
        self.publish(protocol.dev_topic(device_id, "cmd"), payload)
        return payload

    # -- inspection ----------------------------------------------------------------------------

    def upto(self, device_id: str) -> int:
        with self._lock:
            return self.stored[device_id].upto

    def count(self, device_id: str) -> int:
        with self._lock:
            return len(self.stored[device_id].records)

    def seqs(self, device_id: str) -> list[int]:
        with self._lock:
            return sorted(self.stored[device_id].records)

    def leaf(self, leaf: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages[leaf])


class AgentThread:
    """An :class:`~edge_agent.agent.Agent` running in its own thread and event loop, for
    tests that drive the broker, the peer and the database from the test thread."""

    def __init__(self, config: str | os.PathLike[str], *, once: bool = False,
                 timeout_s: float = 60.0, log_file: bool = False) -> None:
        from .agent import Agent
        from .settings import load_settings

        settings = load_settings(config)
        self.agent = Agent(settings)
        self._log_handler: logging.Handler | None = None
        if log_file:  # what `afc agent` sets up: the file send-logs reads
            from .logfile import open_log_handler

            self._log_handler = open_log_handler(settings.log_path, 1 << 20, 1)
            afc = logging.getLogger("afc")
            afc.addHandler(self._log_handler)
            if afc.getEffectiveLevel() > logging.INFO:
                afc.setLevel(logging.INFO)
        self._once = once
        self._timeout = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._main, name="agent", daemon=True)

    def _main(self) -> None:
        async def run() -> int:
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            return await self.agent.run(once=self._once, timeout_s=self._timeout)

        self.exit_code = asyncio.run(run())

    def start(self) -> AgentThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the agent's event loop did not start")
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ask for a clean shutdown and wait (bounded) for the run loop to return."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.agent.request_stop)
        self._thread.join(timeout)
        if self._log_handler is not None:
            logging.getLogger("afc").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._thread.is_alive():
            raise RuntimeError(f"the agent did not stop within {timeout} s")
        return self.exit_code

    def join(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return None if self._thread.is_alive() else self.exit_code

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> AgentThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
