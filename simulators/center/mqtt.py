"""Connecting the center's processes to the broker: addresses, clients, bounded reconnects.

Session choice (documented here because every center client makes it):

- **Ingest workers, command and publishing clients use clean sessions** (MQTT 5
  ``clean_start`` with no session expiry; 3.1.1 ``clean_session``). Correctness of the
  transaction path never rests on the broker keeping messages for the center: a device keeps
  every record until an application-level ack, and retransmits what was not acked. A
  persistent session would be harmful on a shared subscription: Mosquitto keeps distributing
  a share group's messages to a disconnected persistent member, so a dead worker would sit on
  batches until it came back instead of another worker taking them.
- **The monitor uses a persistent session** (``persistent=True``): a fixed client id per
  center (from the center database, :meth:`~.store.CenterStore.center_id`), MQTT 5
  ``clean_start=False`` with a session expiry interval (3.1.1: ``clean_session=False``) and
  QoS 1 subscriptions. Status, telemetry and events have no application-level ack and no
  retransmission, so without it whatever devices published while the center was down (a
  restart, an upgrade) was lost; now the broker queues it (QoS 1 only, up to its
  ``max_queued_messages``, 1000 per client by default in Mosquitto) and delivers it when the
  monitor reconnects, and with broker persistence also across a broker restart. The monitor
  stores idempotently (events by ``seq``, telemetry newest-``ts``-wins), so a replay is
  harmless.

MQTT 5 is used when the broker speaks it, else 3.1.1 (the shared subscription syntax
``$share/<group>/<filter>`` is the same for Mosquitto 2 in both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .errors import CenterError

__all__ = [
    "DEFAULT_SESSION_EXPIRY_S",
    "BrokerAddress",
    "connect",
    "parse_broker",
    "reconnecting",
]

log = logging.getLogger("afc.center.mqtt")

#: How long the broker keeps the monitor's session (and queues for it) while it is away.
DEFAULT_SESSION_EXPIRY_S = 7 * 86400


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: ssl.SSLContext | None = None


def parse_broker(text: str) -> BrokerAddress:
    """``HOST:PORT`` (or ``HOST``, port 1883) as a :class:`BrokerAddress`."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "1883"
    try:
        port = int(port_text)
    except ValueError:
        raise CenterError(
            f"broker address {text!r} must be HOST:PORT, e.g. 127.0.0.1:1883"
        ) from None
    if not host or not 0 < port < 65536:
        raise CenterError(f"broker address {text!r} must be HOST:PORT, e.g. 127.0.0.1:1883")
    return BrokerAddress(host, port)


def _client(
    address: BrokerAddress,
    identifier: str,
    protocol: aiomqtt.ProtocolVersion,
    session_expiry_s: int | None = None,
) -> aiomqtt.Client:
    persistent = session_expiry_s is not None
    kwargs: dict = {
        "identifier": identifier,
        "protocol": protocol,
        "keepalive": 30,
        "timeout": 10,
        "tls_context": address.tls,
        "max_queued_incoming_messages": 10_000,
    }
    if protocol == aiomqtt.ProtocolVersion.V5:
        kwargs["clean_start"] = not persistent
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
            kwargs["properties"] = properties
    else:
        kwargs["clean_session"] = not persistent
    return aiomqtt.Client(address.host, address.port, **kwargs)


@asynccontextmanager
async def connect(
    address: BrokerAddress, identifier: str, *, session_expiry_s: int | None = None
) -> AsyncIterator[aiomqtt.Client]:
    """A connected client (MQTT 5, or 3.1.1 when the broker refuses 5). With
    ``session_expiry_s`` the session is persistent: the broker keeps it, subscriptions and
    QoS 1 messages queued for it, for that long after a disconnect (3.1.1: until the same id
    connects with a clean session)."""
    client = _client(address, identifier, aiomqtt.ProtocolVersion.V5, session_expiry_s)
    try:
        await client.__aenter__()
    except aiomqtt.MqttCodeError as exc:
        if "protocol" not in str(exc).lower():
            raise
        log.info("broker refuses MQTT 5 (%s); using 3.1.1", exc)
        client = _client(address, identifier, aiomqtt.ProtocolVersion.V311, session_expiry_s)
        await client.__aenter__()
    try:
        yield client
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


def client_id(role: str) -> str:
    """A unique client id per process: two workers must never kick each other off."""
    return f"afc-center-{role}-{os.getpid()}-{random.getrandbits(24):06x}"


async def reconnecting(
    address: BrokerAddress,
    role: str,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    stop: asyncio.Event,
    *,
    max_delay_s: float = 5.0,
    identifier: str | None = None,
    session_expiry_s: int | None = None,
) -> None:
    """Run ``session(client)`` while connected, reconnecting with capped exponential backoff
    and jitter until ``stop`` is set. Each wait is bounded by ``max_delay_s``.

    ``identifier`` fixes the client id (a persistent session is found again by its id; the
    default is a new unique id per connection); ``session_expiry_s`` makes the session
    persistent (see :func:`connect`)."""
    delay = 0.1
    while not stop.is_set():
        try:
            async with connect(address, identifier or client_id(role),
                               session_expiry_s=session_expiry_s) as client:
                delay = 0.1
                log.info("%s connected to %s:%d", role, address.host, address.port)
                task = asyncio.create_task(session(client))
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (task, stopper):
                        t.cancel()
                    await asyncio.gather(task, stopper, return_exceptions=True)
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except aiomqtt.MqttError as exc:
            if stop.is_set():
                break
            log.warning("%s: broker %s:%d unreachable or lost (%s); retrying in %.1f s",
                        role, address.host, address.port, exc, delay)
        if stop.is_set():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, max_delay_s)
