"""A minimal device uplink for exercising the center: publish batches, collect acks.

This is *not* the edge agent (no outbox, no retransmission policy, no telemetry): it is the
smallest honest client of ``docs/protocol.md`` (real MQTT, real signatures via
:mod:`edge_agent.protocol`), so center tests, benchmarks and the demo can drive ingest
without depending on the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from types import TracebackType

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import ProtocolError
from edge_agent.protocol import Ack, decode_ack, dev_topic, encode_batch
from firmware.stores.journal import JournalRecord

from .errors import CenterError
from .mqtt import BrokerAddress, client_id, connect

__all__ = ["BatchSender"]

log = logging.getLogger("afc.center.devicesim")


class BatchSender:
    """``async with BatchSender(address, dev, key, center_public) as s: await s.send(...)``"""

    def __init__(
        self,
        address: BrokerAddress,
        device_id: str,
        key: Ed25519PrivateKey,
        center_public: Ed25519PublicKey,
    ) -> None:
        self.address = address
        self.device_id = device_id
        self.key = key
        self.center_public = center_public
        self.acks: list[Ack] = []
        self.refused_acks = 0
        self.bytes_sent = 0
        self._changed = asyncio.Condition()
        self._stack = contextlib.AsyncExitStack()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def upto(self) -> int:
        return max((a.upto for a in self.acks), default=0)

    async def __aenter__(self) -> BatchSender:
        self._client = await self._stack.enter_async_context(
            connect(self.address, client_id(f"dev-{self.device_id}"))
        )
        await self._client.subscribe(dev_topic(self.device_id, "ack"), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._stack.aclose()

    async def _read(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                ack = decode_ack(payload, self.center_public, device_id=self.device_id)
            except ProtocolError as exc:
                self.refused_acks += 1
                log.warning("dev=%s: ack refused: %s", self.device_id, exc)
                continue
            async with self._changed:
                self.acks.append(ack)
                self._changed.notify_all()

    async def send_payload(self, payload: bytes, topic_device: str | None = None) -> None:
        """Publish raw bytes on (by default) this device's txn topic, QoS 1."""
        assert self._client is not None
        await self._client.publish(dev_topic(topic_device or self.device_id, "txn"), payload,
                                   qos=1, timeout=10)
        self.bytes_sent += len(payload)

    async def send(self, records: Sequence[JournalRecord], batch_size: int = 100) -> int:
        """Sign and publish ``records`` in batches; returns the last seq sent."""
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            payload = encode_batch(self.device_id, chunk, self.key, ts=time.time_ns() // 10**6)
            await self.send_payload(payload)
        return records[-1].seq if records else 0

    async def wait_upto(self, upto: int, timeout_s: float = 10.0) -> Ack:
        """Wait (bounded) until an ack covers ``upto``; returns it."""
        async def covered() -> Ack:
            async with self._changed:
                await self._changed.wait_for(lambda: self.upto >= upto)
                return max(self.acks, key=lambda a: a.upto)

        try:
            return await asyncio.wait_for(covered(), timeout_s)
        except TimeoutError:
            raise CenterError(f"dev={self.device_id}: no ack up to {upto} within {timeout_s} s "
                              f"(acked up to {self.upto})") from None

    async def wait_acks(self, count: int, timeout_s: float = 10.0) -> list[Ack]:
        """Wait (bounded) until at least ``count`` acks arrived."""
        async def enough() -> list[Ack]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.acks) >= count)
                return list(self.acks)

        try:
            return await asyncio.wait_for(enough(), timeout_s)
        except TimeoutError:
            raise CenterError(f"dev={self.device_id}: {len(self.acks)} acks, expected {count} "
                              f"within {timeout_s} s") from None
