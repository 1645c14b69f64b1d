"""``afc agent``: the store-and-forward edge agent (asyncio + aiomqtt, MQTT 5 or 3.1.1).

One process per device owns the uplink. It forwards the device journal as signed
transaction batches and prunes records only on the center's signed cumulative ack; forwards
the events the applications raise; reports telemetry (buffered on disk while offline);
applies signed configuration bundles; and answers signed commands. docs/agent.md describes
the behaviour, the settings and the failure policy; docs/protocol.md the wire contract.

Structure. The event loop runs the MQTT connection and the bookkeeping; two single-thread
executors own the device database (SQLite connections are per thread): one for the
outbox, events, acks and commands, one for configuration bundles (a million-entry blacklist
takes seconds to apply and must not hold acks back). The connection loop reconnects with
exponential backoff and full jitter. Per connection, tasks read incoming messages, send
batches, forward events, flush buffered telemetry and run commands; if any fails (the link
dropped) all stop and the loop reconnects, starting again from what the journal says.
Agent-wide tasks (acks, configuration, telemetry) outlive connections.

Nothing the agent keeps in memory matters after a crash: the journal's acked mark, the event
log, the uplink buffer and the durable command nonce are all on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware.stores import KIND_AGENT, DeviceDatabase, StoreError
from firmware.stores.errors import InvalidRecord

from . import protocol
from .commands import ACTION_REBOOT, ACTION_RESYNC, EXIT_REBOOT, Commands
from .config_sync import REJECTED, ConfigSync, SyncResult
from .errors import AgentConfigError, AgentError, Expired, ProtocolError, ReplayRejected
from .keys import load_private_key, load_public_key
from .outbox import BatchReader, OutgoingBatch, Waiting, Window
from .settings import AgentSettings
from .telemetry import HealthSampler, device_facts, software_version, telemetry_fields
from .uplink_queue import CLASS_TELEMETRY, UplinkQueue, UplinkQueueError

__all__ = ["EXIT_ERROR", "EXIT_NOT_DRAINED", "EXIT_OK", "EXIT_REBOOT", "Agent", "DbWorker"]

log = logging.getLogger("afc.agent")

EXIT_OK = 0
EXIT_ERROR = 1
#: ``--once`` could not drain everything within its time limit.
EXIT_NOT_DRAINED = 2

T = TypeVar("T")

#: Incoming messages buffered between the network and the agent's handlers; beyond it paho
#: drops (a flood of garbage cannot grow memory). Acks are cumulative, bundles retained and
#: commands retried, so a drop costs a delay, never data.
_INCOMING_LIMIT = 1000
_CMD_QUEUE = 16
_CFG_QUEUE = 64
_POLL_S = 0.2
_EVENT_CHUNK = 50
_PRUNE_EVERY = 2000
_SUPERVISOR_LIMIT = 20


def _now_ms() -> int:
    return int(time.time() * 1000)


def _checkpoint() -> bool:
    """True, or CancelledError if this task was asked to stop.

    Each task loop checks it: aiomqtt waits with ``asyncio.wait_for``, which on Python 3.11
    can swallow a cancellation racing with a PUBACK; the request stays visible in
    ``Task.cancelling()``, and the loop honours it at its next turn instead of running on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return True


async def _cancel_all(tasks: list[asyncio.Task[Any]], device_id: str,
                      timeout: float = 10.0) -> None:
    """Cancel tasks and wait for them, bounded: a task that will not end is reported."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
    for task in stuck:
        log.error("dev=%s task %s did not stop within %.0f s", device_id, task.get_name(),
                  timeout)


class DbWorker:
    """A device database connection owned by one thread; :meth:`call` runs ``fn(db, ...)``
    there. SQLite connections are per thread, and a slow call (a blacklist load) only
    delays the calls queued behind it on the same worker."""

    def __init__(self, settings: AgentSettings, name: str) -> None:
        self._path = settings.device.db
        self._device_id = settings.device.id
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: DeviceDatabase | None = None

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._db is None:
            self._db = DeviceDatabase.open(self._path, device_id=self._device_id)
        return fn(self._db, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args)

    async def submit(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function (no database) in this worker's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, lambda: fn(*args))

    def close(self) -> None:
        """Close the connection in its thread and stop the thread (waits for queued calls)."""

        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with contextlib.suppress(RuntimeError):
            self._exec.submit(_close)
        self._exec.shutdown(wait=True)


class Agent:
    """The edge agent of one device; :meth:`run` it in an event loop.

    ``settings`` come from ``agent.toml`` (:func:`~edge_agent.settings.load_settings`); the
    center's ``agent`` bundle, when one was applied, overrides the batching and telemetry
    sections at start and whenever a new one arrives.
    """

    def __init__(self, settings: AgentSettings) -> None:
        self.base_settings = settings
        self.settings = settings
        self.device_id = settings.device.id
        self._key = load_private_key(settings.identity.key)
        try:
            self._center = load_public_key(settings.identity.center_public)
        except AgentError as exc:
            raise AgentConfigError(f"[identity] center_public: {exc}") from None
        self._signer = protocol.ed25519_json_signer(self._key)
        self.exit_code = EXIT_OK
        self.failure: str | None = None
        self._topics = {
            leaf: protocol.dev_topic(self.device_id, leaf)
            for leaf in ("txn", "ack", "telemetry", "event", "status", "cmd", "reply")
        }
        self._cfg_filters = ["afc/v1/cfg/+", f"afc/v1/cfg/+/{self.device_id}"]
        self.stats: dict[str, int] = {
            "batches_sent": 0, "records_sent": 0, "acks": 0, "acks_ignored": 0,
            "retransmissions": 0, "events_sent": 0, "telemetry_sent": 0, "connections": 0,
            "rejected": 0, "commands": 0, "bundles": 0,
        }
        self.clock_offset_ms: int | None = None
        self.connected = False
        # Created in run(): they belong to its event loop.
        self._stop: asyncio.Event
        self._client: aiomqtt.Client | None = None

    # ------------------------------------------------------------------------------------------
    # life cycle

    def request_stop(self, code: int | None = None) -> None:
        """Ask :meth:`run` to shut down cleanly (signal handlers call this)."""
        if code is not None:
            self.exit_code = code
        if hasattr(self, "_stop"):
            self._stop.set()

    async def run(self, *, once: bool = False, timeout_s: float = 60.0) -> int:
        """Run until stopped (SIGTERM, ``reboot-app``) or, with ``once``, until the outbox,
        the events and the buffered telemetry are delivered (or ``timeout_s`` passes).

        Returns the exit status: :data:`EXIT_OK`, :data:`EXIT_REBOOT`,
        :data:`EXIT_NOT_DRAINED` (``failure`` says why) or :data:`EXIT_ERROR`.
        """
        self._once = once
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._send_wake = asyncio.Event()
        self._events_wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._cfg_queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(_CFG_QUEUE)
        self._cfg_busy = False
        self._ack_candidates: set[int] = set()
        self._bad_reported: set[tuple[int, int]] = set()
        self._rejections_logged: dict[str, float] = {}
        self._db = DbWorker(self.settings, "afc-agent-db")
        self._cfg_db = DbWorker(self.settings, "afc-agent-cfg")
        self._queue: UplinkQueue | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            acked, last, remote = await self._db.call(_startup_state)
            if remote is not None:
                self._apply_remote_settings(remote, at_start=True)
            self._acked = acked
            self._pruned = acked
            self._window = Window(self.settings.batch, acked)
            self._reader = BatchReader(self.device_id, self._key, self.settings.batch)
            self._sync = ConfigSync(
                self.device_id, self._center, self.base_settings,
                on_agent_settings=self._remote_settings_threadsafe,
            )
            self._commands = Commands(
                self.device_id, self._center, self._key, self.settings.log_path,
                status=self._ping_status,
            )
            self._queue = UplinkQueue.open(
                self.settings.queue_path, self.settings.telemetry.buffer_bytes
            )
            self._once_target = last
            log.info(
                "dev=%s agent %s starting: outbox acked to %d of %d, broker %s:%d MQTT %s "
                "%s session%s", self.device_id, software_version(), acked, last,
                self.settings.mqtt.host, self.settings.mqtt.port, self.settings.mqtt.protocol,
                self.settings.mqtt.session, " (--once)" if once else "",
            )
            tasks = [
                asyncio.create_task(self._supervise("acks", self._ack_applier)),
                asyncio.create_task(self._supervise("config", self._config_worker)),
            ]
            if not once:
                tasks.append(asyncio.create_task(self._supervise("telemetry", self._telemetry)))
            else:
                tasks.append(asyncio.create_task(self._once_watch(timeout_s)))
            await self._connection_loop()
        except (StoreError, UplinkQueueError, AgentConfigError) as exc:
            self.exit_code = EXIT_ERROR
            self.failure = str(exc)
            log.error("dev=%s agent cannot run: %s", self.device_id, exc)
        finally:
            log.debug("dev=%s shutting down: agent tasks", self.device_id)
            await _cancel_all(tasks, self.device_id)
            log.debug("dev=%s shutting down: database", self.device_id)
            with contextlib.suppress(Exception):
                if hasattr(self, "_reader"):
                    await self._db.call(self._reader.flush_last_tap)
            self._db.close()
            self._cfg_db.close()
            if self._queue is not None:
                self._queue.close()
        log.info("dev=%s agent stopped (exit %d)%s", self.device_id, self.exit_code,
                 f": {self.failure}" if self.failure else "")
        return self.exit_code

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Keep an agent-wide task alive: log a failure, back off, restart; give up (exit 1)
        after repeated failures rather than spin."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - started > 60:
                    failures = 0  # it ran fine for a while: count this failure afresh
                failures += 1
                log.exception("dev=%s %s task failed (%d): %s", self.device_id, name,
                              failures, exc)
                if failures >= _SUPERVISOR_LIMIT:
                    self.failure = f"{name} task keeps failing: {exc}"
                    self.request_stop(EXIT_ERROR)
                    return
                await self._sleep(min(30.0, 0.1 * 2**failures))

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; returns True if stopped."""
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._stop.wait()
            return True
        except TimeoutError:
            return False

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with the event, and the task would then never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()
        event.clear()

    # ------------------------------------------------------------------------------------------
    # settings from the center

    def _remote_settings_threadsafe(self, overrides: Mapping[str, Any]) -> None:
        self._loop_call(self._apply_remote_settings, dict(overrides))

    def _loop_call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(fn, *args)

    def _apply_remote_settings(self, overrides: Mapping[str, Any], at_start: bool = False
                               ) -> None:
        try:
            settings = self.base_settings.with_remote(overrides)
        except AgentConfigError as exc:
            log.warning("dev=%s stored agent settings ignored: %s", self.device_id, exc)
            return
        self.settings = settings
        if not at_start:
            self._window.settings = settings.batch
            self._reader.settings = settings.batch
            if self._queue is not None:
                self._queue.budget_bytes = settings.telemetry.buffer_bytes
        log.info("dev=%s center settings in force: batch %s, telemetry %s", self.device_id,
                 settings.batch, settings.telemetry)

    # ------------------------------------------------------------------------------------------
    # connection

    def _properties(self, packet: int, **values: Any) -> Properties | None:
        if self.settings.mqtt.protocol != "5":
            return None
        props = Properties(packet)
        for name, value in values.items():
            setattr(props, name, value)
        return props

    def _json(self, fields: Mapping[str, Any]) -> bytes:
        return protocol.encode_json_message(fields, signer=self._signer)

    def _status_payload(self, state: str) -> bytes:
        return self._json({
            "dev": self.device_id, "ts": _now_ms(), "kind": self.settings.device.kind,
            "state": state, "sw": software_version(), "mqtt": self.settings.mqtt.protocol,
        })

    def _make_client(self) -> aiomqtt.Client:
        m = self.settings.mqtt
        v5 = m.protocol == "5"
        persistent = m.session == "persistent"
        tls_context = None
        if m.tls_ca is not None:
            from .tls import client_ssl_context

            if m.tls_cert is None or m.tls_key is None:
                raise AgentConfigError("[mqtt] TLS needs tls_cert and tls_key (client "
                                       "certificate) besides tls_ca")
            tls_context = client_ssl_context(m.tls_ca, m.tls_cert, m.tls_key)
        will = aiomqtt.Will(self._topics["status"], self._status_payload("offline"), qos=1,
                            retain=True)
        kwargs: dict[str, Any] = {}
        if v5:
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V5
            kwargs["clean_start"] = not persistent
            kwargs["properties"] = self._properties(
                PacketTypes.CONNECT, SessionExpiryInterval=m.session_expiry_s if persistent else 0
            )
        else:
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V311
            kwargs["clean_session"] = not persistent
        client = aiomqtt.Client(
            m.host, m.port, identifier=self.settings.client_id, keepalive=m.keepalive,
            will=will, timeout=m.connect_timeout_s, tls_context=tls_context,
            max_queued_incoming_messages=_INCOMING_LIMIT,
            max_inflight_messages=self.settings.batch.window + 20,
            logger=logging.getLogger("afc.agent.mqtt"),
            # Small messages both ways (batches out, acks and PUBACKs back): Nagle's
            # algorithm would hold each PUBACK for the peer's delayed ACK (~40 ms a round).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            **kwargs,
        )
        client.pending_calls_threshold = 10_000
        return client

    async def _connection_loop(self) -> None:
        """Connect, run a session, back off with full jitter, again; until stopped."""
        m = self.settings.mqtt
        attempt = 0
        unexpected = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                client = self._make_client()
                async with client:
                    self.stats["connections"] += 1
                    log.info("dev=%s connected to %s:%d", self.device_id, m.host, m.port)
                    await self._session(client)
                unexpected = 0
            except aiomqtt.MqttError as exc:
                log.warning("dev=%s broker link lost or refused: %s", self.device_id, exc)
            except (AgentConfigError, UplinkQueueError):
                raise
            except Exception as exc:  # a bug or an unforeseen input: log, reconnect, bounded
                unexpected += 1
                log.exception("dev=%s session failed unexpectedly (%d): %s", self.device_id,
                              unexpected, exc)
                if unexpected >= _SUPERVISOR_LIMIT:
                    self.failure = f"session keeps failing: {exc}"
                    self.exit_code = EXIT_ERROR
                    return
            finally:
                self._client = None
                self.connected = False
            if self._stop.is_set():
                break
            if time.monotonic() - started > 30:
                attempt = 0  # the link was up for a while: start the backoff afresh
            cap = min(m.backoff_max_s, m.backoff_initial_s * 2 ** min(attempt, 30))
            delay = random.uniform(0, cap)  # full jitter: a fleet does not reconnect in step
            attempt += 1
            log.info("dev=%s reconnecting in %.2f s (attempt %d)", self.device_id, delay, attempt)
            if await self._sleep(delay):
                break

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: subscribe, announce, run the per-connection tasks until one ends
        (the link dropped) or the agent stops; then say goodbye if stopping."""
        await self._subscribe(client, [self._topics["ack"], self._topics["cmd"]])
        await self._subscribe(client, self._cfg_filters)
        await client.publish(self._topics["status"], self._status_payload("online"), qos=1,
                             retain=True)
        self._window.reset(self._acked)
        self._client = client
        self.connected = True
        cmd_queue: asyncio.Queue[bytes] = asyncio.Queue(_CMD_QUEUE)
        publishes: set[asyncio.Task[None]] = set()
        tasks = [
            asyncio.create_task(self._dispatch(client, cmd_queue)),
            asyncio.create_task(self._sender(client, publishes)),
            asyncio.create_task(self._events(client)),
            asyncio.create_task(self._flusher(client)),
            asyncio.create_task(self._command_worker(client, cmd_queue)),
        ]
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            log.debug("dev=%s session ending (%s)", self.device_id,
                      "stop" if stopper in done else "link")
        finally:
            await _cancel_all([*tasks, stopper, *publishes], self.device_id)
            self._client = None
            self.connected = False
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if self._stop.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self._topics["status"], self._status_payload("offline"),
                                     qos=1, retain=True, timeout=5)
            log.info("dev=%s clean shutdown: offline status published", self.device_id)

    async def _subscribe(self, client: aiomqtt.Client, filters: list[str]) -> None:
        """Subscribe QoS 1; a filter the broker refuses (its ACL) is logged as an error: the
        agent still runs, but acks, commands or bundles will not arrive until it is fixed."""
        granted = await client.subscribe([(f, 1) for f in filters])
        for topic, code in zip(filters, granted, strict=False):
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log.error("dev=%s the broker refused the subscription to %s (code %d): check "
                          "its ACL for this device", self.device_id, topic, value)

    # ------------------------------------------------------------------------------------------
    # incoming

    async def _dispatch(self, client: aiomqtt.Client, cmd_queue: asyncio.Queue[bytes]) -> None:
        """Route incoming messages; nothing here blocks or raises on bad input."""
        async for message in client.messages:
            _checkpoint()
            topic = str(message.topic)
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            payload = bytes(payload)
            if topic == self._topics["ack"]:
                self._on_ack(payload)
            elif topic == self._topics["cmd"]:
                try:
                    cmd_queue.put_nowait(payload)
                except asyncio.QueueFull:
                    self._reject("cmd", "command queue full: command dropped")
            elif topic.startswith("afc/v1/cfg/"):
                try:
                    self._cfg_queue.put_nowait((topic, payload))
                except asyncio.QueueFull:
                    self._reject("cfg", f"configuration queue full: {topic} dropped (a "
                                 "resync-config command fetches it again)")
            else:
                self._reject("topic", f"message on unexpected topic {topic[:120]!r} ignored")

    def _reject(self, what: str, message: str) -> None:
        """Log a refused input; at most one line per kind per 10 s under a flood."""
        self.stats["rejected"] += 1
        now = time.monotonic()
        if now - self._rejections_logged.get(what, -1e9) >= 10:
            self._rejections_logged[what] = now
            log.warning("dev=%s %s (%d refused so far)", self.device_id, message,
                        self.stats["rejected"])

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = protocol.decode_ack(payload, self._center, device_id=self.device_id)
        except ProtocolError as exc:
            self._reject("ack", f"ack refused: {exc}")
            return
        self.stats["acks"] += 1
        self.clock_offset_ms = ack.ts - _now_ms()
        for rng in ack.bad:
            if rng not in self._bad_reported and len(self._bad_reported) < 1000:
                self._bad_reported.add(rng)
                log.error("dev=%s center refused batch %d..%d (signature or format): check "
                          "the device key registered at the center", self.device_id, *rng)
        if ack.upto > self._acked:
            # Kept as candidates, not just the maximum: a (signed but wrong) ack for a seq
            # never issued must not hide a good one that arrived behind it.
            self._ack_candidates.add(ack.upto)
            if len(self._ack_candidates) > 64:
                self._ack_candidates.discard(min(self._ack_candidates))
            self._ack_wake.set()

    async def _ack_applier(self) -> None:
        """Apply the newest ack to the journal (coalescing bursts), then prune."""
        while _checkpoint():
            await self._ack_wake.wait()
            self._ack_wake.clear()
            self._ack_candidates = {t for t in self._ack_candidates if t > self._acked}
            if not self._ack_candidates:
                continue
            target = max(self._ack_candidates)
            prune = target - self._pruned >= _PRUNE_EVERY
            try:
                acked, pruned = await self._db.call(_apply_ack, target, prune)
            except InvalidRecord as exc:
                self.stats["acks_ignored"] += 1
                log.warning("dev=%s ack for seq %d ignored: %s", self.device_id, target, exc)
                self._ack_candidates.discard(target)
                self._ack_wake.set()  # the next candidate, if any
                continue
            except StoreError as exc:
                log.warning("dev=%s ack %d not recorded yet: %s", self.device_id, target, exc)
                if await self._sleep(1.0):
                    return
                self._ack_wake.set()
                continue
            self._acked = acked
            if pruned is not None:
                self._pruned = pruned
            self._window.acknowledged(acked)
            self._send_wake.set()

    async def _config_worker(self) -> None:
        """Decode and apply bundles one at a time, in the configuration thread."""
        while _checkpoint():
            topic, payload = await self._cfg_queue.get()
            self._cfg_busy = True
            try:
                now = _now_ms()
                decoded = await self._cfg_db.submit(self._sync.decode, topic, payload, now)
                if isinstance(decoded, SyncResult):
                    if decoded.outcome == REJECTED:
                        self.stats["rejected"] += 1
                        await self._cfg_db.call(self._sync.report_rejection, topic, decoded)
                else:
                    self.stats["bundles"] += 1
                    await self._cfg_db.call(self._sync.apply, decoded)
                self._events_wake.set()
            except StoreError as exc:
                log.warning("dev=%s bundle on %s not handled: %s", self.device_id, topic, exc)
            finally:
                self._cfg_busy = False

    async def _command_worker(self, client: aiomqtt.Client, queue: asyncio.Queue[bytes]
                              ) -> None:
        while _checkpoint():
            payload = await queue.get()
            now = _now_ms()
            try:
                cmd = self._commands.decode(payload, now)
            except Expired as exc:
                self._reject("cmd", f"command refused: {exc}")
                continue
            except ProtocolError as exc:
                self._reject("cmd", f"command refused: {exc}")
                continue
            try:
                await self._db.call(Commands.accept, cmd)
            except ReplayRejected as exc:
                self._reject("cmd-replay", str(exc))
                await client.publish(self._topics["reply"],
                                     self._commands.refusal(cmd, str(exc), _now_ms()), qos=1)
                continue
            except StoreError as exc:
                log.warning("dev=%s command %s not run: %s", self.device_id, cmd.id, exc)
                continue
            self.stats["commands"] += 1
            log.info("dev=%s command %s %r accepted (nonce %d)", self.device_id, cmd.name,
                     cmd.id, cmd.nonce)
            result = await asyncio.to_thread(self._commands.run, cmd, _now_ms())
            await client.publish(self._topics["reply"], self._commands.encode(result.reply),
                                 qos=1, properties=self._properties(
                                     PacketTypes.PUBLISH, MessageExpiryInterval=300))
            if result.action == ACTION_RESYNC:
                await self._resync(client)
            elif result.action == ACTION_REBOOT:
                log.warning("dev=%s reboot-app requested by the center: exiting with %d",
                            self.device_id, EXIT_REBOOT)
                self.request_stop(EXIT_REBOOT)

    async def _resync(self, client: aiomqtt.Client) -> None:
        """Subscribe to the configuration topics again: the broker resends every retained
        bundle and each is checked again from scratch."""
        await client.unsubscribe(self._cfg_filters)
        await self._cfg_db.submit(self._sync.forget)
        await self._subscribe(client, self._cfg_filters)
        log.info("dev=%s configuration resync: subscribed again", self.device_id)

    def _ping_status(self) -> dict[str, Any]:
        return {
            "sw": software_version(), "acked": self._acked, "connected": self.connected,
            "stats": dict(self.stats),
        }

    # ------------------------------------------------------------------------------------------
    # outgoing

    async def _sender(self, client: aiomqtt.Client, publishes: set[asyncio.Task[None]]) -> None:
        """Cut the outbox into batches and publish them, keeping ``window`` in flight."""
        window = self._window
        props = None
        while _checkpoint():
            now = time.monotonic()
            if window.timed_out(now):
                dropped = window.go_back()
                self.stats["retransmissions"] += 1
                log.warning("dev=%s no ack within %.1f s: sending again from seq %d (%d "
                            "batch(es) in flight)", self.device_id,
                            window.settings.ack_timeout_s, window.acked + 1, dropped)
            sleep = _POLL_S
            if window.can_send():
                force = self._once or window.waited_enough(now)
                try:
                    batch = await self._db.call(
                        self._reader.next_batch, window.sent_upto, _now_ms(), force
                    )
                except StoreError as exc:
                    log.warning("dev=%s outbox read failed: %s", self.device_id, exc)
                    batch = None
                    sleep = 1.0
                except ProtocolError as exc:
                    # A journal record the codec refuses: never skipped (transactions are
                    # not dropped); a technician must look. Retried slowly.
                    self._reject("outbox", f"outbox record after seq {window.sent_upto} "
                                 f"cannot be encoded: {exc}")
                    batch = None
                    sleep = 5.0
                if isinstance(batch, OutgoingBatch):
                    window.sent(batch.first, batch.last, time.monotonic())
                    props = self._properties(
                        PacketTypes.PUBLISH, ContentType="application/cbor",
                        UserProperty=[("first", str(batch.first)), ("last", str(batch.last))],
                    )
                    task = asyncio.create_task(
                        self._publish_quietly(client, self._topics["txn"], batch.payload, props)
                    )
                    publishes.add(task)
                    task.add_done_callback(publishes.discard)
                    self.stats["batches_sent"] += 1
                    self.stats["records_sent"] += batch.count
                    log.debug("dev=%s batch %d..%d sent (%d bytes)", self.device_id,
                              batch.first, batch.last, len(batch.payload))
                    continue
                if isinstance(batch, Waiting):
                    sleep = min(sleep, max(0.01, window.note_waiting(time.monotonic())))
            deadline = window.next_deadline(time.monotonic())
            if deadline is not None:
                sleep = min(sleep, deadline) if window.can_send() else deadline
            await self._wait(self._send_wake, sleep)

    async def _publish_quietly(self, client: aiomqtt.Client, topic: str, payload: bytes,
                               props: Properties | None) -> None:
        """Publish a batch and wait for its PUBACK; a failure is only logged: the ack
        timeout (not the PUBACK) decides what is sent again."""
        try:
            await client.publish(topic, payload, qos=1, properties=props,
                                 timeout=self.settings.batch.ack_timeout_s)
        except aiomqtt.MqttError as exc:
            log.debug("dev=%s batch publish not confirmed: %s", self.device_id, exc)

    async def _events(self, client: aiomqtt.Client) -> None:
        """Forward the device's events (QoS 1) and delete each once the broker has it."""
        topic = self._topics["event"]
        while _checkpoint():
            try:
                events = await self._db.call(_pending_events, _EVENT_CHUNK)
            except StoreError as exc:
                log.warning("dev=%s event log read failed: %s", self.device_id, exc)
                await self._wait(self._events_wake, 1.0)
                continue
            if not events:
                await self._wait(self._events_wake, 1.0)
                continue
            payloads = []
            for ev in events:
                payloads.append(self._json({
                    "dev": self.device_id, "ts": ev.time, "kind": self.settings.device.kind,
                    "event": ev.event, "severity": ev.severity, "seq": ev.seq,
                    "detail": ev.detail,
                }))
            await asyncio.gather(*(client.publish(topic, p, qos=1) for p in payloads))
            await self._db.call(_delete_events, [ev.seq for ev in events])
            self.stats["events_sent"] += len(events)

    async def _flusher(self, client: aiomqtt.Client) -> None:
        """Send buffered telemetry, oldest first, QoS 1; delete once the broker has it."""
        assert self._queue is not None
        while _checkpoint():
            batch = self._queue.peek(_EVENT_CHUNK)
            if not batch:
                await self._wait(self._flush_wake, 1.0)
                continue
            await asyncio.gather(*(
                client.publish(m.topic, m.payload, qos=max(1, m.qos), properties=self._ttl())
                for m in batch
            ))
            self._queue.delete(m.id for m in batch)
            self.stats["telemetry_sent"] += len(batch)

    def _ttl(self) -> Properties | None:
        # Telemetry older than a day is history, not health: let the broker drop it.
        return self._properties(PacketTypes.PUBLISH, MessageExpiryInterval=86400,
                                ContentType="application/json")

    async def _telemetry(self) -> None:
        """Every ``interval_s``: sample health, publish live (QoS 0) when connected and
        nothing is buffered, else buffer it (the flusher sends it later, QoS 1)."""
        sampler = HealthSampler(self.settings.device.db.parent)
        first = True
        while _checkpoint():
            interval = self.settings.telemetry.interval_s
            if await self._sleep(min(interval, 1.0) if first else interval):
                return
            first = False
            now = _now_ms()
            try:
                facts = await self._db.call(device_facts, now)
            except StoreError as exc:
                log.warning("dev=%s telemetry without database facts: %s", self.device_id, exc)
                facts = {}
            assert self._queue is not None
            fields = telemetry_fields(
                device_id=self.device_id, kind=self.settings.device.kind, now_ms=now,
                health=sampler.sample(), facts=facts, clock_offset_ms=self.clock_offset_ms,
                dropped=self._queue.take_dropped(),
                extra={"connected": self.connected, "retransmissions":
                       self.stats["retransmissions"]},
            )
            payload = self._json(fields)
            client = self._client
            if client is not None and self._queue.count() == 0:
                try:
                    await client.publish(self._topics["telemetry"], payload, qos=0,
                                         properties=self._ttl(), timeout=5)
                    self.stats["telemetry_sent"] += 1
                    continue
                except aiomqtt.MqttError as exc:
                    log.info("dev=%s telemetry buffered: %s", self.device_id, exc)
            try:
                self._queue.put(CLASS_TELEMETRY, self._topics["telemetry"], payload, qos=1,
                                created=now)
            except UplinkQueueError as exc:
                log.warning("dev=%s telemetry lost: %s", self.device_id, exc)
            self._flush_wake.set()

    # ------------------------------------------------------------------------------------------
    # --once

    async def _once_watch(self, timeout_s: float) -> None:
        """Stop when everything is delivered, or fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._acked >= self._once_target and self.connected:
                try:
                    events, depth = await self._db.call(_pending_counts)
                except StoreError:
                    events, depth = 1, 0
                queued = self._queue.count() if self._queue is not None else 0
                idle = self._cfg_queue.empty() and not self._cfg_busy
                if events == 0 and queued == 0 and idle:
                    log.info("dev=%s --once: outbox delivered to seq %d; %d record(s) written "
                             "since", self.device_id, self._acked, depth)
                    self.request_stop(EXIT_OK)
                    return
            await self._sleep(0.1)
        try:
            events, _ = await self._db.call(_pending_counts)
        except StoreError:
            events = -1
        queued = self._queue.count() if self._queue is not None else 0
        missing = max(self._once_target - self._acked, 0)
        link = "connected" if self.connected else "broker not reachable"
        self.failure = (
            f"outbox not drained within {timeout_s:g} s: {missing} record(s) unacknowledged, "
            f"{events} event(s) and {queued} telemetry message(s) pending ({link}; is the "
            f"center running?)"
        )
        self.request_stop(EXIT_NOT_DRAINED)


# ----------------------------------------------------------------------------------------------
# database-thread helpers (run by DbWorker.call with the thread's DeviceDatabase)


def _startup_state(db: DeviceDatabase) -> tuple[int, int, dict[str, Any] | None]:
    remote = None
    entry = db.config.get(KIND_AGENT)
    if entry is not None:
        try:
            value = json.loads(entry.body)
            remote = value if isinstance(value, dict) else None
        except ValueError:
            log.warning("stored agent settings version %d are not JSON: ignored", entry.version)
    return db.journal.acked_seq, db.journal.last_seq, remote


def _apply_ack(db: DeviceDatabase, upto: int, prune: bool) -> tuple[int, int | None]:
    """Record the center's ack and, now and then (or when all is acked), prune."""
    acked = db.journal.mark_acked(upto)
    if prune or acked >= db.journal.last_seq:
        db.journal.prune_acked()
        return acked, acked
    return acked, None


def _pending_events(db: DeviceDatabase, limit: int) -> list[Any]:
    return db.events.pending(limit)


def _delete_events(db: DeviceDatabase, seqs: list[int]) -> int:
    return db.events.delete(seqs)


def _pending_counts(db: DeviceDatabase) -> tuple[int, int]:
    return db.events.count, max(db.journal.last_seq - db.journal.acked_seq, 0)
