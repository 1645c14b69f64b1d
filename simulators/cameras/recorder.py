"""A plain MQTT subscriber that records what camera sites publish (tests, the rig's console).

It is a center's eye view without the center: every message on ``afc/v1/#`` with its topic,
QoS and retain flag, its JSON parsed and (given the site's key) its signature checked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from .errors import CameraSimError
from .siteconfig import open_site_message


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def leaf(self) -> str:
        return self.topic.rsplit("/", 1)[-1]

    def json(self) -> dict[str, Any]:
        return json.loads(self.payload)


class Recorder:
    """Subscribes to ``topic`` on a broker and keeps every message (bounded).

    ``persistent``: a session the broker keeps (and queues QoS 1 messages for) while the
    recorder is cut off, as a center's subscriber does; with a broker that persists sessions,
    nothing a site published during a broker restart escapes the recorder.
    """

    def __init__(self, host: str, port: int, *, topic: str = "afc/v1/#",
                 client_id: str = "afc-recorder", max_messages: int = 100_000,
                 persistent: bool = False) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.max_messages = max_messages
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=not persistent)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            if len(self.messages) < self.max_messages:
                self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos,
                                              bool(msg.retain)))
            self._cond.notify_all()

    def start(self, timeout: float = 10.0) -> Recorder:
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise CameraSimError(f"recorder could not subscribe at {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise CameraSimError(f"could not publish on {topic} within 10 s "
                                 f"(broker {self.host}:{self.port})")

    # -- queries --------------------------------------------------------------------------

    def snapshot(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 10.0, *,
                 since: int = 0) -> Received:
        """The first message (index >= ``since``) for which ``predicate`` is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[since:]:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = ", ".join(f"{m.leaf}" for m in self.messages[since:][-10:])
                    raise CameraSimError(f"no such message within {timeout} s (last: {seen})")
                self._cond.wait(min(left, 0.2))

    def events(self, key: bytes | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Event messages in arrival order, signatures checked when ``key`` is given."""
        out = []
        for m in self.snapshot()[since:]:
            if m.leaf == "event":
                out.append(open_site_message(m.payload, key) if key else m.json())
        return out

    def wait_event(self, name: str, timeout: float = 10.0, *, since: int = 0,
                   where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The first event ``name`` (and matching ``where``) received after ``since``."""
        def match(m: Received) -> bool:
            if m.leaf != "event":
                return False
            ev = m.json()
            return ev.get("event") == name and (where is None or where(ev))

        return self.wait_for(match, timeout, since=since).json()
