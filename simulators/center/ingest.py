"""Ingest: verify, deduplicate, store durably, *then* ack; and the monitor of device health.

:class:`IngestWorker` subscribes ``$share/ingest/afc/v1/dev/+/txn`` (QoS 1), so N workers in
N processes split the batches between them on any broker with shared subscriptions. For each
batch: parse the topic, verify the signature against the registered device key, store every
record in one transaction keyed ``(device_id, seq)`` (duplicates dropped), and only after the
commit publish the signed cumulative ack (``upto`` = the device's contiguous stored
high-water mark) on ``afc/v1/dev/{id}/ack``, QoS 1.

What is *not* acked: a batch from an unknown device, with a bad signature, malformed, or that
the database could not store (busy, disk full). Each is logged with the device and range; a
refused batch of a known device is reported as a ``bad`` range in that device's next ack.
A worker killed between the commit and the ack publishes nothing; the device retransmits
after its timeout, every record is then a duplicate, and the ack goes out: exactly-once
storage and an eventual ack with no coordination between workers.

:class:`Monitor` (a plain subscription: one per center) stores status, telemetry and events
of devices and camera sites and verifies signed command replies; on a ``cfg-reload-request``
event it asks the publisher to republish the full bundle of that kind. Its MQTT session is
persistent (a fixed client id per center, MQTT 5 ``clean_start=False`` with a session expiry,
QoS 1 subscriptions: :mod:`.mqtt`), so what devices publish while the center is down is
queued by the broker and delivered when it is back; storing is idempotent (events keyed by
``seq``, telemetry kept only when newer), so a replay changes nothing.

Run one worker as a process: ``python -m simulators.center.ingest --broker H:P --db F --key K``
(``afc sim center run`` starts and supervises them).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import ProtocolError, SignatureInvalid, UnknownDevice
from edge_agent.protocol import (
    Ack,
    Batch,
    Reply,
    decode_batch,
    decode_json_message,
    decode_reply,
    dev_topic,
    encode_ack,
    parse_dev_topic,
    peek_batch_range,
    verify_json_signature,
)
from firmware.core.errors import CoreError

from .errors import CenterError
from .mqtt import DEFAULT_SESSION_EXPIRY_S, BrokerAddress, reconnecting
from .store import CenterStore, now_ms

__all__ = ["INGEST_TOPIC", "IngestStats", "IngestWorker", "Monitor", "main"]

log = logging.getLogger("afc.center.ingest")

INGEST_GROUP = "ingest"
INGEST_TOPIC = f"$share/{INGEST_GROUP}/afc/v1/dev/+/txn"
MONITOR_TOPICS = tuple(f"afc/v1/dev/+/{leaf}" for leaf in ("status", "telemetry", "event",
                                                           "reply"))


#: Most batches stored in one transaction (those already received when a group starts).
GROUP_MAX = 64


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


@dataclass
class IngestStats:
    """Counters of one worker, for logs and tests."""

    batches: int = 0
    records_new: int = 0
    duplicates: int = 0
    acks: int = 0
    refused: int = 0
    store_errors: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


class IngestWorker:
    """One ingest worker. ``store`` is used from one background thread only (SQLite calls
    block; the event loop keeps serving the MQTT connection meanwhile)."""

    def __init__(
        self,
        store: CenterStore,
        center_key: Ed25519PrivateKey,
        address: BrokerAddress,
        *,
        topic: str = INGEST_TOPIC,
    ) -> None:
        self.store = store
        self.center_key = center_key
        self.address = address
        self.topic = topic
        self.stats = IngestStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "afc-ingest-store")
        self.subscribed = asyncio.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Fault injection for the chaos tests: "kill-before-ack=N[:MARKER]" makes this
        # process SIGKILL itself after storing its Nth batch, before the ack is published;
        # with MARKER, only if that file does not exist yet (it is created first): one shot
        # across restarts and processes.
        fault = os.environ.get("AFC_CENTER_FAULT", "")
        self._kill_before_ack: int | None = None
        self._kill_marker: str | None = None
        if fault.startswith("kill-before-ack="):
            count, _, marker = fault.partition("=")[2].partition(":")
            self._kill_before_ack = int(count)
            self._kill_marker = marker or None

    # -- the sans-MQTT core: payload in, ack out ----------

    def verify(self, topic: str, payload: bytes) -> Batch | None:
        """A verified batch, or None (refused: logged, counted, noted for the device's next
        ack when the device is known). Never raises for bad input."""
        try:
            dev, leaf = parse_dev_topic(topic)
            if leaf != "txn":
                raise ProtocolError(f"not a txn topic: {topic!r}")
        except ProtocolError as exc:
            self.stats.refuse("topic")
            log.warning("batch refused: topic=%r: %s", topic[:120], exc)
            return None
        try:
            try:
                return decode_batch(payload, self.store.public_key, topic_device=dev)
            except (SignatureInvalid, UnknownDevice):
                # the key may have been registered or rotated since it was cached
                self.store.forget_key_cache()
                return decode_batch(payload, self.store.public_key, topic_device=dev)
        except UnknownDevice as exc:
            self.stats.refuse("unknown-device")
            log.warning("batch refused: dev=%s: %s (register it: afc sim center register)",
                        dev, exc)
            return None
        except ProtocolError as exc:
            self.stats.refuse(type(exc).__name__)
            claimed = peek_batch_range(payload)
            log.warning("batch refused: dev=%s range=%s bytes=%d: %s", dev, claimed,
                        len(payload), exc)
            if claimed is not None:
                try:
                    if self.store.device(dev) is not None:
                        self.store.note_bad_batch(dev, claimed[0], claimed[1], str(exc))
                except CenterError as err:
                    log.error("dev=%s: cannot note the refused batch: %s", dev, err)
            return None

    def store_group(self, batches: list[Batch]) -> list[tuple[str, bytes]]:
        """Store verified batches in one transaction (group commit), then build one ack per
        device with its mark after all of them. A group the store refuses is retried batch
        by batch, so one bad batch cannot hold back the others."""
        if not batches:
            return []
        try:
            results = self.store.store_batches(batches, worker=self.name)
        except CenterError as exc:
            if len(batches) > 1:
                log.warning("group of %d batches not stored (%s); storing one by one",
                            len(batches), exc)
                return [ack for b in batches for ack in self.store_group([b])]
            b = batches[0]
            self.stats.store_errors += 1
            log.error("batch not stored, not acked: dev=%s first=%d last=%d: %s "
                      "(the device will retransmit)", b.device_id, b.first, b.last, exc)
            return []
        marks: dict[str, int] = {}
        for batch, result in zip(batches, results, strict=True):
            self.stats.batches += 1
            self.stats.records_new += result.new
            self.stats.duplicates += result.duplicates
            marks[batch.device_id] = result.upto
            log.info("batch stored: dev=%s first=%d last=%d new=%d dup=%d upto=%d",
                     batch.device_id, batch.first, batch.last, result.new, result.duplicates,
                     result.upto)
        acks = []
        for dev, upto in marks.items():
            try:
                bad = self.store.take_bad_ranges(dev)
            except CenterError as exc:
                log.error("dev=%s: refused ranges not reported: %s", dev, exc)
                bad = []
            acks.append((dev_topic(dev, "ack"),
                         encode_ack(Ack(dev, upto, now_ms(), tuple(bad)), self.center_key)))
        return acks

    def process_group(self, items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Messages of the txn topic in, ``(ack topic, ack payload)`` out, after storing."""
        batches = [b for topic, payload in items if (b := self.verify(topic, payload))]
        return self.store_group(batches)

    def process(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """One message: its ack after the batch is durably stored, or None."""
        acks = self.process_group([(topic, payload)])
        return acks[0] if acks else None

    # -- MQTT ----------

    def _arm_fault(self) -> bool:
        if self._kill_marker is None:
            return True
        try:
            with open(self._kill_marker, "x"):
                return True
        except FileExistsError:
            return False

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topic, qos=1)
        self.subscribed.set()
        log.info("ingest subscribed: %s worker=%s", self.topic, self.name)
        loop = asyncio.get_running_loop()
        messages = client.messages
        async for message in messages:
            group = [message]
            while len(messages) and len(group) < GROUP_MAX:  # already received: no waiting
                group.append(await anext(messages))
            items = [(m.topic.value, _payload_bytes(m.payload)) for m in group]
            acks = await loop.run_in_executor(self._executor, self.process_group, items)
            limit = self._kill_before_ack
            if acks and limit is not None and self.stats.batches >= limit and self._arm_fault():
                log.warning("fault injection: SIGKILL after storing, before the ack")
                os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.gather(*(client.publish(t, p, qos=1, timeout=10) for t, p in acks))
            self.stats.acks += len(acks)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, reconnecting (bounded backoff) when the broker goes."""
        try:
            await reconnecting(self.address, "ingest", self._session, stop)
        finally:
            self.subscribed.clear()
            self._executor.shutdown(wait=True)


ReloadHandler = Callable[[str, dict[str, Any]], Awaitable[None]]
ReplyHandler = Callable[[Reply], None]


class Monitor:
    """Stores status/telemetry/events and command replies (one per center).

    ``persistent`` (the default) keeps one MQTT session per center across restarts, under
    the client id ``identifier`` (default ``afc-center-monitor-<center id>``, from the
    store), which the broker keeps ``session_expiry_s`` after a disconnect. Two monitors
    with one id would take the session from each other: run one monitor per center database.
    """

    def __init__(
        self,
        store: CenterStore,
        address: BrokerAddress,
        *,
        on_reload_request: ReloadHandler | None = None,
        on_reply: ReplyHandler | None = None,
        persistent: bool = True,
        identifier: str | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        self.store = store
        self.address = address
        self.persistent = persistent
        self.identifier = identifier or (f"afc-center-monitor-{store.center_id()}"
                                         if persistent else None)
        self.session_expiry_s = session_expiry_s
        self.on_reload_request = on_reload_request
        self.on_reply = on_reply
        self.refused = 0
        self.stored = 0
        self.subscribed = asyncio.Event()
        self.client: aiomqtt.Client | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "afc-monitor-store")

    def process(self, topic: str, payload: bytes) -> dict[str, Any] | Reply | None:
        """Store one message; returns what was stored (None if refused). Never raises for bad
        input."""
        try:
            dev, leaf = parse_dev_topic(topic)
            if leaf == "reply":
                reply = decode_reply(payload, self.store.public_key)
                if reply.device_id != dev:
                    raise ProtocolError(f"reply from {reply.device_id!r} on {dev!r}'s topic")
                self.store.record_reply(reply)
                self.stored += 1
                log.info("reply: dev=%s id=%s ok=%s", dev, reply.id, reply.ok)
                return reply
            if leaf not in ("status", "telemetry", "event"):
                raise ProtocolError(f"the monitor does not read {leaf!r}")
            msg = decode_json_message(payload)
            if msg["dev"] != dev:
                raise ProtocolError(f"message from {msg['dev']!r} on {dev!r}'s topic")
            seq = msg.get("seq")
            if type(seq) is int and not 0 <= seq < 1 << 63:
                # JSON integers have no bound; the events table's seq is SQLite's 64 bits
                raise ProtocolError(f"{leaf} seq {seq} is not in 0..2**63-1")
            signed = False
            if "sig" in msg:
                key = self.store.public_key(dev)
                if key is not None:
                    if not verify_json_signature(msg, public_key=key):
                        raise ProtocolError("JSON signature does not verify")
                    signed = True
            if not self.store.record_json(leaf, msg, signed=signed):
                log.debug("duplicate %s: dev=%s seq=%s ts=%s", leaf, dev, msg.get("seq"),
                          msg.get("ts"))
                return None
            self.stored += 1
            if leaf == "event":
                log.info("event: dev=%s seq=%s %s (%s)", dev, msg.get("seq"), msg.get("event"),
                         msg.get("severity"))
            return msg
        except ProtocolError as exc:
            self.refused += 1
            log.warning("monitor refused: topic=%r bytes=%d: %s", topic[:120], len(payload), exc)
        except CenterError as exc:
            self.refused += 1
            log.error("monitor could not store: topic=%r: %s", topic[:120], exc)
        return None

    async def _session(self, client: aiomqtt.Client) -> None:
        self.client = client
        # (a resumed session still has these subscriptions: subscribing again is harmless,
        # and needed when the broker lost the session, e.g. after it expired)
        for topic in MONITOR_TOPICS:
            await client.subscribe(topic, qos=1)
        self.subscribed.set()
        log.info("monitor subscribed: client=%s session=%s", self.identifier or "(clean)",
                 f"persistent, expiry {self.session_expiry_s} s" if self.persistent
                 else "clean")
        async for message in client.messages:
            out = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.process, message.topic.value,
                _payload_bytes(message.payload),
            )
            if isinstance(out, Reply):
                if self.on_reply is not None:
                    self.on_reply(out)
            elif (
                isinstance(out, dict)
                and out.get("event") == "cfg-reload-request"
                and self.on_reload_request is not None
            ):
                detail = out.get("detail") if isinstance(out.get("detail"), dict) else {}
                try:
                    await self.on_reload_request(out["dev"], detail)
                except (CenterError, ProtocolError, aiomqtt.MqttError) as exc:
                    log.error("reload request of dev=%s not served: %s", out["dev"], exc)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await reconnecting(
                self.address, "monitor", self._session, stop, identifier=self.identifier,
                session_expiry_s=self.session_expiry_s if self.persistent else None,
            )
        finally:
            self.client = None
            self.subscribed.clear()
            self._executor.shutdown(wait=True)


# -- the worker process --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of one ingest worker process (started by ``afc sim center run``)."""
    from edge_agent.keys import load_private_key

    from .mqtt import parse_broker
    from .store import SqliteCenterStore

    parser = argparse.ArgumentParser(prog="python -m simulators.center.ingest")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process (the center) is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    try:
        key = load_private_key(args.key)
        address = parse_broker(args.broker)
        store = SqliteCenterStore(args.db)
    except CoreError as exc:  # a bad key file, broker address or database
        print(f"ingest worker: error: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def watch_parent() -> None:
            while not stop.is_set():
                if args.parent_pid is not None and os.getppid() != args.parent_pid:
                    log.warning("the center process %d is gone; stopping", args.parent_pid)
                    stop.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

        watcher = asyncio.create_task(watch_parent())
        await IngestWorker(store, key, address).run(stop)
        await watcher

    try:
        asyncio.run(serve())
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
