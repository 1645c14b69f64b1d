"""Remote commands: a signed request with the next per-device nonce, and its signed reply.

The device accepts a command only if it verifies against the pinned center key, is for this
device, has not expired, and carries a nonce greater than the last one it accepted (kept
durably): a captured command replayed later, or to another device, does nothing. The reply
is signed by the device and verified against its registered key. Waiting is bounded: a
device that is offline simply does not answer, and :meth:`CommandSender.send` raises
:class:`CommandTimeout` after ``timeout_s``; the command stays valid until ``expires``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import ProtocolError
from edge_agent.protocol import Command, Reply, decode_reply, dev_topic, encode_command

from .errors import CenterError
from .mqtt import BrokerAddress, client_id, connect
from .store import CenterStore, now_ms

__all__ = ["CommandSender", "CommandTimeout", "send_command"]

log = logging.getLogger("afc.center.commands")


class CommandTimeout(CenterError):
    """The device did not reply in time (offline, busy, or it refused the command)."""


class CommandSender:
    """Sends commands through ``publish(topic, payload)`` and matches replies handed to
    :meth:`on_reply` (by the center's monitor, or by :func:`send_command`'s own client)."""

    def __init__(
        self,
        store: CenterStore,
        center_key: Ed25519PrivateKey,
        publish: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self.store = store
        self.center_key = center_key
        self._publish = publish
        self._waiting: dict[tuple[str, str], asyncio.Future[Reply]] = {}

    def build(
        self, device_id: str, name: str, args: Mapping[str, Any] | None = None, *,
        ttl_s: float = 60.0,
    ) -> tuple[Command, bytes]:
        """A signed command with the next nonce (recorded in the store)."""
        now = now_ms()
        cmd = Command(device_id, uuid.uuid4().hex[:16], name, dict(args or {}),
                      self.store.next_nonce(device_id, now), now, now + int(ttl_s * 1000))
        payload = encode_command(cmd, self.center_key)
        self.store.add_command(cmd)
        return cmd, payload

    async def send(
        self,
        device_id: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float = 10.0,
        ttl_s: float = 60.0,
    ) -> Reply:
        """Send a command and wait (at most ``timeout_s``) for the device's reply."""
        cmd, payload = self.build(device_id, name, args, ttl_s=ttl_s)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[(device_id, cmd.id)] = future
        try:
            await self._publish(dev_topic(device_id, "cmd"), payload)
            log.info("command sent: dev=%s id=%s name=%s nonce=%d", device_id, cmd.id, name,
                     cmd.nonce)
            try:
                return await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                raise CommandTimeout(
                    f"device {device_id} did not answer command {name!r} ({cmd.id}) within "
                    f"{timeout_s:g} s: is it online (afc sim center status)?"
                ) from None
        finally:
            self._waiting.pop((device_id, cmd.id), None)

    def on_reply(self, reply: Reply) -> None:
        """A verified reply arrived: wake its sender, if one is waiting."""
        future = self._waiting.get((reply.device_id, reply.id))
        if future is not None and not future.done():
            future.set_result(reply)


async def send_command(
    address: BrokerAddress,
    store: CenterStore,
    center_key: Ed25519PrivateKey,
    device_id: str,
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 10.0,
    ttl_s: float = 60.0,
) -> Reply:
    """One command over a connection of its own (for the CLI and tests): subscribes to the
    device's reply topic first, so the reply cannot be missed."""
    async with connect(address, client_id("cmd")) as client:
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1, timeout=10)

        sender = CommandSender(store, center_key, publish)
        await client.subscribe(dev_topic(device_id, "reply"), qos=1)

        async def read_replies() -> None:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    reply = decode_reply(payload, store.public_key)
                except ProtocolError as exc:
                    log.warning("reply refused: dev=%s: %s", device_id, exc)
                    continue
                if reply.device_id != device_id:
                    continue
                store.record_reply(reply)
                sender.on_reply(reply)

        reader = asyncio.create_task(read_replies())
        try:
            return await sender.send(device_id, name, args, timeout_s=timeout_s, ttl_s=ttl_s)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
