"""``afc sim center run``: the whole reference center in one command.

The main process registers the devices of ``devices.toml``, runs the monitor (status,
telemetry, events, replies), serves reload requests through the publisher, and supervises N
ingest worker processes (``python -m simulators.center.ingest``) that share the
``$share/ingest/...`` subscription and one SQLite store. A worker that dies is restarted
(bounded backoff); stopping the center (SIGTERM/SIGINT) stops the workers with SIGTERM, then
SIGKILL after a bounded wait. Workers also stop by themselves if the center process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge_agent.keys import load_private_key

from .commands import CommandSender
from .errors import CenterError
from .ingest import IngestWorker, Monitor
from .mqtt import BrokerAddress
from .publisher import Publisher
from .store import DEVICE_KINDS, SqliteCenterStore

__all__ = ["CenterService", "load_devices_file"]

log = logging.getLogger("afc.center")


def load_devices_file(path: str | Path) -> list[tuple[str, str, str | None]]:
    """``[[device]]`` tables of ``id``, ``kind`` and ``public_key`` (hex; absent for camera
    sites) as ``(id, kind, key)`` tuples."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CenterError(f"cannot read devices file {path}: {exc}") from None
    out = []
    for i, item in enumerate(data.get("device", [])):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise CenterError(f"{path}: [[device]] #{i + 1} needs id = \"...\"")
        kind = item.get("kind", "validator")
        if kind not in DEVICE_KINDS:
            raise CenterError(f"{path}: device {item['id']}: kind must be one of "
                              f"{', '.join(DEVICE_KINDS)}")
        key = item.get("public_key")
        if key is not None and not isinstance(key, str):
            raise CenterError(f"{path}: device {item['id']}: public_key must be hex text")
        out.append((item["id"], kind, key))
    return out


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0


class CenterService:
    """The center: monitor + publisher + command sender in-process, ingest in N processes
    (``workers=0`` runs one ingest worker in-process instead)."""

    def __init__(
        self,
        address: BrokerAddress,
        db: str | Path,
        key_path: str | Path,
        *,
        workers: int = 1,
        devices_file: str | Path | None = None,
        broker_text: str | None = None,
        log_level: str = "INFO",
    ) -> None:
        if not 0 <= workers <= 64:
            raise CenterError("--workers must be 0..64")
        self.address = address
        self.db = Path(db)
        self.key_path = Path(key_path)
        self.key = load_private_key(key_path)
        self.workers = workers
        self.broker_text = broker_text or f"{address.host}:{address.port}"
        self.log_level = log_level
        self.store = SqliteCenterStore(self.db)
        if devices_file is not None:
            for device_id, kind, key in load_devices_file(devices_file):
                self.store.register_device(device_id, kind, key)
        self.publisher = Publisher(self.store, self.key, self._publish_retained)
        self.commands = CommandSender(self.store, self.key, self._publish)
        self.monitor = Monitor(self.store, address,
                               on_reload_request=self.publisher.on_reload_request,
                               on_reply=self.commands.on_reply)
        self.children: list[_Child] = [_Child(i) for i in range(workers)]
        self.local_worker: IngestWorker | None = None
        self.ready = asyncio.Event()

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self.monitor.client
        if client is None:
            raise CenterError("the center is not connected to the broker")
        await client.publish(topic, payload, qos=1, timeout=10)

    async def _publish_retained(self, topic: str, payload: bytes, retain: bool) -> None:
        client = self.monitor.client
        if client is None:
            raise CenterError("the center is not connected to the broker")
        await client.publish(topic, payload, qos=1, retain=retain, timeout=30)

    # -- worker processes ----------

    async def _spawn(self, child: _Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.center.ingest", "--broker", self.broker_text,
            "--db", str(self.db), "--key", str(self.key_path), "--log-level", self.log_level,
            "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.info("ingest worker %d started: pid=%d", child.index, child.proc.pid)

    async def _supervise(self, child: _Child, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            await self._spawn(child)
            assert child.proc is not None
            waiter = asyncio.create_task(child.proc.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if stop.is_set():
                waiter.cancel()
                await asyncio.gather(waiter, stopper, return_exceptions=True)
                return
            log.warning("ingest worker %d (pid %d) exited with %s; restarting in %.1f s",
                        child.index, child.proc.pid, child.proc.returncode, delay)
            child.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _stop_children(self, timeout_s: float = 10.0) -> None:
        procs = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("ingest worker pid %d ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def worker_pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc and c.proc.returncode is None]

    # -- the whole ----------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then stop everything cleanly."""
        tasks = [asyncio.create_task(self.monitor.run(stop))]
        if self.workers == 0:
            self.local_worker = IngestWorker(self.store, self.key, self.address)
            tasks.append(asyncio.create_task(self.local_worker.run(stop)))
        tasks += [asyncio.create_task(self._supervise(c, stop)) for c in self.children]

        async def mark_ready() -> None:
            await self.monitor.subscribed.wait()
            if self.local_worker is not None:
                await self.local_worker.subscribed.wait()
            self.ready.set()
            log.info("center ready: broker=%s db=%s workers=%d", self.broker_text, self.db,
                     self.workers)

        ready = asyncio.create_task(mark_ready())
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopper}:
                if not task.cancelled() and task.exception() is not None:
                    log.error("center task failed, stopping: %r", task.exception())
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            ready.cancel()
            stop.set()
            await self._stop_children()
            await asyncio.gather(*tasks, ready, return_exceptions=True)
            self.store.close()
            log.info("center stopped")
