"""``afc fleet status``: the fleet as the broker sees it, without the center.

Subscribes to ``afc/v1/dev/+/status``, ``.../telemetry`` and ``.../event`` (docs/protocol.md).
Status is retained, so every device that ever connected is listed at once, online or offline
(its last will); telemetry and events arrive as devices send them, so the table fills in over
the collection window (``--collect-s``) or, with ``--watch``, keeps updating.

Bad payloads (not JSON, another protocol version, a ``dev`` that is not the topic's device)
are counted and shown, never a crash: the broker is shared with every device, and a
misbehaving one must not take the operator's view down.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import click
import paho.mqtt.client as mqtt

from edge_agent.errors import AgentError, ProtocolError
from edge_agent.protocol import decode_json_message, parse_dev_topic

__all__ = ["FleetView", "collect", "fleet"]

TOPICS = ("afc/v1/dev/+/status", "afc/v1/dev/+/telemetry", "afc/v1/dev/+/event")
#: An event that ends the alarm another one raised (docs/protocol.md event tokens).
CLEARS = {
    "reader-back": "reader-lost",
    "in-service": "out-of-service",
    "door-closed": "door-open",
    "camera-up": "camera-down",
    "mains-back": "mains-lost",
}
#: Events kept per device (the newest), to bound memory on a noisy device.
MAX_EVENTS = 50


class FleetError(AgentError):
    """The broker cannot be reached or refused this client (address, TLS files, ACL)."""


@dataclass
class DeviceView:
    """What the broker told us about one device."""

    device_id: str
    kind: str | None = None
    state: str | None = None
    sw: str | None = None
    status_ts: int | None = None
    telemetry: dict[str, Any] = field(default_factory=dict)
    telemetry_ts: int | None = None
    alarms: dict[str, str] = field(default_factory=dict)  # alarm key -> severity
    events: list[dict[str, Any]] = field(default_factory=list)
    last_event_seq: int | None = None


class FleetView:
    """The collected state: feed it messages, read rows. Pure (no I/O): tested directly."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceView] = {}
        self.rejected = 0
        self.last_rejection = ""
        self._lock = threading.Lock()

    def feed(self, topic: str, payload: bytes) -> bool:
        """Take one message; False (and counted) if it was refused."""
        try:
            device_id, leaf = parse_dev_topic(topic)
            msg = decode_json_message(payload)
            if msg["dev"] != device_id:
                raise ProtocolError(f"payload names device {msg['dev']!r} on {device_id}'s topic")
        except ProtocolError as exc:
            with self._lock:
                self.rejected += 1
                self.last_rejection = f"{topic}: {exc}"[:200]
            return False
        with self._lock:
            view = self.devices.setdefault(device_id, DeviceView(device_id))
            if isinstance(msg.get("kind"), str):
                view.kind = msg["kind"]
            if leaf == "status":
                self._status(view, msg)
            elif leaf == "telemetry":
                self._telemetry(view, msg)
            elif leaf == "event":
                self._event(view, msg)
        return True

    @staticmethod
    def _status(view: DeviceView, msg: Mapping[str, Any]) -> None:
        if view.status_ts is not None and msg["ts"] < view.status_ts:
            return  # an older status overtaken by a newer one
        state = msg.get("state")
        view.state = state if state in ("online", "offline") else "unknown"
        view.sw = str(msg["sw"]) if "sw" in msg else view.sw
        view.status_ts = msg["ts"]

    @staticmethod
    def _telemetry(view: DeviceView, msg: Mapping[str, Any]) -> None:
        if view.telemetry_ts is not None and msg["ts"] < view.telemetry_ts:
            return
        view.telemetry = dict(msg)
        view.telemetry_ts = msg["ts"]

    @staticmethod
    def _event(view: DeviceView, msg: Mapping[str, Any]) -> None:
        name = msg.get("event")
        if not isinstance(name, str):
            return
        seq = msg.get("seq")
        if isinstance(seq, int) and any(e.get("seq") == seq for e in view.events):
            return  # a QoS 1 duplicate
        view.events.append({"event": name, "severity": msg.get("severity"), "seq": seq,
                            "ts": msg["ts"], "detail": msg.get("detail")})
        del view.events[:-MAX_EVENTS]
        if isinstance(seq, int):
            view.last_event_seq = max(seq, view.last_event_seq or 0)
        detail = msg.get("detail")
        camera = detail.get("camera") if isinstance(detail, dict) else None
        key = f"{name}:{camera}" if camera else name
        if name in CLEARS:
            cleared = CLEARS[name]
            view.alarms.pop(f"{cleared}:{camera}" if camera else cleared, None)
        elif msg.get("severity") in ("warning", "alarm"):
            view.alarms[key] = str(msg["severity"])

    def rows(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        """One dict per device, sorted by id: what the table and ``--json`` show."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            return [self._row(v, now_ms) for _, v in sorted(self.devices.items())]

    @staticmethod
    def _row(v: DeviceView, now_ms: int) -> dict[str, Any]:
        t = v.telemetry
        alarms = dict(v.alarms)
        if t.get("reader") == "lost":
            alarms.setdefault("reader-lost", "alarm")
        cameras = t.get("cameras") if isinstance(t.get("cameras"), dict) else None
        if cameras:
            for cam, state in cameras.items():
                if state in ("down", "degraded"):
                    alarms.setdefault(f"camera-{state}:{cam}", "alarm" if state == "down"
                                      else "warning")
        if t.get("door") == "open":
            alarms.setdefault("door-open", "alarm")
        if t.get("power") == "ups":
            alarms.setdefault("mains-lost", "alarm")
        last_tap = t.get("last_tap_ts") if isinstance(t.get("last_tap_ts"), int) else None
        return {
            "device": v.device_id,
            "kind": v.kind,
            "state": v.state or "unknown",
            "sw": v.sw,
            "status_ts": v.status_ts,
            "telemetry_ts": v.telemetry_ts,
            "outbox_depth": t.get("outbox_depth"),
            "outbox_age_s": t.get("outbox_age_s"),
            "last_tap_ts": last_tap,
            "last_tap_age_s": None if last_tap is None else max(0, (now_ms - last_tap) // 1000),
            "reader": t.get("reader"),
            "cameras": cameras,
            "alarms": sorted(alarms),
            "events": len(v.events),
        }


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def format_table(rows: list[dict[str, Any]], rejected: int = 0) -> str:
    """The rows as an aligned text table."""
    head = ("DEVICE", "KIND", "STATE", "OUTBOX", "OLDEST", "LAST TAP", "READER", "CAMERAS",
            "ALARMS")
    body = []
    for r in rows:
        cams = r["cameras"]
        cam_text = "-" if not cams else (
            f"{sum(1 for s in cams.values() if s == 'up')}/{len(cams)} up")
        body.append((
            r["device"], r["kind"] or "-", r["state"],
            "-" if r["outbox_depth"] is None else str(r["outbox_depth"]),
            "-" if r["outbox_age_s"] is None else f"{r['outbox_age_s']}s",
            _age(r["last_tap_age_s"]), r["reader"] or "-", cam_text,
            ", ".join(r["alarms"]) or "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in (head, *body)]
    online = sum(1 for r in rows if r["state"] == "online")
    alarmed = sum(1 for r in rows if r["alarms"])
    lines.append(f"{len(rows)} device(s), {online} online, {alarmed} with alarms"
                 + (f"; {rejected} message(s) refused" if rejected else ""))
    return "\n".join(lines)


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FleetError(f"--broker {text!r}: give HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


@contextlib.contextmanager
def connected(broker: str, view: FleetView, *, tls: ssl.SSLContext | None = None,
              timeout: float = 10.0) -> Iterator[mqtt.Client]:
    """A paho client subscribed to the fleet topics, feeding ``view`` from its thread."""
    host, port = parse_broker(broker)
    done = threading.Event()
    outcome: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"afc-fleet-{os.getpid()}", protocol=mqtt.MQTTv5)
    if tls is not None:
        client.tls_set_context(tls)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        outcome["rc"] = reason_code
        if not reason_code.is_failure:
            for topic in TOPICS:
                c.subscribe(topic, qos=1)
        done.set()

    def on_message(c, userdata, message) -> None:
        view.feed(message.topic, message.payload)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_timeout = timeout
    try:
        client.connect(host, port, keepalive=30, clean_start=True)
    except (OSError, ssl.SSLError) as exc:
        raise FleetError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise FleetError(f"the broker at {host}:{port} did not answer the connection in "
                             f"{timeout:g} s")
        if outcome["rc"].is_failure:
            raise FleetError(f"the broker at {host}:{port} refused the connection: "
                             f"{outcome['rc']} (certificate or ACL?)")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def collect(broker: str, seconds: float, *, tls: ssl.SSLContext | None = None,
            view: FleetView | None = None) -> FleetView:
    """Listen for ``seconds`` and return what arrived (retained status comes at once)."""
    view = view or FleetView()
    with connected(broker, view, tls=tls):
        time.sleep(seconds)
    return view


@click.group()
def fleet() -> None:
    """The fleet as the broker sees it: devices and camera sites, live."""


@fleet.command()
@click.option("--broker", required=True, metavar="HOST:PORT", help="The MQTT broker.")
@click.option("--tls-ca", metavar="PATH", help="CA certificate of the broker (TLS).")
@click.option("--tls-cert", metavar="PATH", help="Client certificate (TLS, with --tls-key).")
@click.option("--tls-key", metavar="PATH", help="Client key (mode 0600).")
@click.option("--collect-s", type=click.FloatRange(0.1, 3600), default=3.0, show_default=True,
              help="How long to listen before printing (telemetry arrives at each device's "
              "interval; status at once).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@click.option("--watch", is_flag=True, help="Keep listening and reprint every --interval.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="With --watch: seconds between reprints.")
@click.option("--count", type=click.IntRange(0), default=0, show_default=True,
              help="With --watch: stop after this many reprints (0: until Ctrl-C).")
def status(broker: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
           collect_s: float, as_json: bool, watch: bool, interval: float, count: int) -> None:
    """A table of devices and camera sites: online, outbox depth and age, last tap, reader,
    cameras, alarms (from events and the latest telemetry).

    With TLS the client certificate needs read rights on afc/v1/dev/+/status, telemetry
    and event (an operator certificate with its own ACL user block).
    """
    ctx = None
    if tls_ca or tls_cert or tls_key:
        if not (tls_ca and tls_cert and tls_key):
            raise click.UsageError("TLS needs --tls-ca, --tls-cert and --tls-key together")
        from edge_agent.tls import client_ssl_context

        ctx = client_ssl_context(tls_ca, tls_cert, tls_key)
    view = FleetView()

    def show() -> None:
        rows = view.rows()
        if as_json:
            click.echo(json.dumps({"devices": rows, "rejected": view.rejected}, indent=None
                                  if watch else 2))
        else:
            if watch and click.get_text_stream("stdout").isatty():
                click.clear()
            click.echo(format_table(rows, view.rejected))

    with connected(broker, view, tls=ctx):
        time.sleep(collect_s)
        show()
        shown = 1
        while watch and (count == 0 or shown < count):
            time.sleep(interval)
            show()
            shown += 1


if __name__ == "__main__":  # python -m tools.fleet_cmd fleet ... (until it is registered)
    from tools.cli import AfcGroup

    AfcGroup(name="afc", commands={"fleet": fleet})(prog_name="afc")
