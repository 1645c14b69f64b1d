"""TLS with client certificates and the per-device ACL, against a real Mosquitto.

Issue 5's check "a device cannot publish as another or read another's acks", and everything
around it, with the PKI of :mod:`edge_agent.pki`, the client context of
:mod:`edge_agent.tls` and the shipped ``deploy/mosquitto/afc.acl`` / ``afc.conf``:

* a device publishes on its own topics and the center (shared subscription) receives;
* a device publishing as another device, or forging center messages (acks, commands,
  bundles), is refused: MQTT 5 PUBACK reason 0x87, MQTT 3.1.1 silently dropped; nothing
  reaches any subscriber and no retained message is left behind;
* a device subscribing to another device's ack, cmd or per-device bundle (or to wide
  wildcards) receives nothing: not live, not retained. Mosquitto 2.0 grants such SUBSCRIBEs
  (its ACL file is not consulted for subscriptions; it filters every delivery instead), so
  the tests assert on what is delivered and record what the SUBACK said;
* a device cannot take over another device's session by using its client id;
* no certificate, a certificate from another CA, a broker certificate used as a client
  certificate, a revoked certificate, plaintext on the TLS port: refused at the TLS layer;
  a device refuses a broker it does not pin, or one whose certificate names another host;
* revocation takes effect on restart, and on reload (SIGHUP) for new connections; an
  expired CRL locks every client out (why docs/broker.md says to re-sign it on time);
* the shipped ``afc.conf`` is accepted by mosquitto and enforces all of this.

"Nothing received" is never a sleep: after the refused message the same publisher sends a
sentinel that the observer may receive; MQTT keeps one publisher's messages in order towards
one subscriber, so the refused one would have arrived first. Every wait is bounded and a
SIGALRM ends any test after 30 s.

As root (CI containers), mosquitto drops to the ``mosquitto`` user before it reads its TLS
files, so the broker's files live in a world-traversable temporary folder and its key is
handed to that user, exactly as in production (docs/broker.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edge_agent.pki import LocalCa
from edge_agent.tls import client_ssl_context
from simulators.broker import BrokerTls, MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]
ACL_FILE = ROOT / "deploy" / "mosquitto" / "afc.acl"
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "afc.conf"
#: What afc.conf sets on its listener beyond what BrokerTls writes.
LISTENER_EXTRA = "use_username_as_clientid true\ntls_version tlsv1.2"
WAIT = 5.0  # seconds for any one expected event
TEST_TIME_LIMIT = 30.0
NOT_AUTHORIZED = 0x87
#: PUBACK reasons of a publish the broker took: success, "no matching subscribers" (MQTT 5).
ACCEPTED = (0x00, 0x10)


def _broker_owner() -> str | None:
    """The user mosquitto runs as after dropping root, if it will drop at all."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:  # pragma: no cover - Debian's package creates it
        return None
    return "mosquitto"


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- the PKI ---------------------------------------------------------------------------------


@dataclass
class Pki:
    root: Path
    ca: LocalCa
    other_ca: LocalCa  # a CA the broker does not trust

    def creds(self, device_id: str) -> tuple[Path, Path]:
        path = self.ca.paths("device", device_id)
        if not path[0].exists():
            self.ca.issue_device(device_id)
        return path

    def center(self, name: str) -> tuple[Path, Path]:
        path = self.ca.paths("center", f"{name}@center")
        if not path[0].exists():
            self.ca.issue_center(name)
        return path

    def ctx(self, creds: tuple[Path, Path]) -> ssl.SSLContext:
        return client_ssl_context(self.ca.ca_path, *creds)

    def broker_files(self, server: str = "broker") -> dict[str, Path]:
        dest = Path(tempfile.mkdtemp(prefix="etc-", dir=self.root))
        dest.chmod(0o755)
        return self.ca.export_broker_files(dest, server, owner=_broker_owner())


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    root = Path(tempfile.mkdtemp(prefix="afc-tls-acl-"))
    root.chmod(0o755)  # mosquitto (dropped to its own user) must reach its files in here
    try:
        ca = LocalCa.create(root / "ca", "AFC test CA")
        ca.issue_server("broker")
        ca.issue_server("elsewhere", hosts=["broker.example.net"])
        other = LocalCa.create(root / "other-ca", "Someone else's CA")
        other.issue_device("A")
        yield Pki(root, ca, other)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _harness_broker(pki: Pki, workdir: Path, server: str = "broker") -> MosquittoBroker:
    files = pki.broker_files(server)
    return MosquittoBroker(
        workdir,
        tls=BrokerTls(files["cafile"], files["certfile"], files["keyfile"]),
        acl_file=ACL_FILE,
        extra_config=f"crlfile {files['crlfile']}\n{LISTENER_EXTRA}",
    )


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[MosquittoBroker]:
    with _harness_broker(pki, tmp_path / "broker") as running:
        yield running


# -- an MQTT client that reports every acknowledgement ---------------------------------------


class Client:
    """paho in a background loop, with bounded waits for CONNACK, SUBACK, PUBACK, messages."""

    def __init__(self, broker: MosquittoBroker, ctx: ssl.SSLContext, client_id: str = "",
                 *, v5: bool = True, clean: bool = True) -> None:
        self.v5 = v5
        self._cond = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.connack: int | None = None
        self.disconnected = False
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=protocol, **kwargs)
        self.mqtt.tls_set_context(ctx)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_message = self._on_message
        self.mqtt.on_disconnect = self._on_disconnect
        if v5:
            self.mqtt.connect(broker.host, broker.port, clean_start=clean)
        else:
            self.mqtt.connect(broker.host, broker.port)
        self.mqtt.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnected, "CONNACK")
        assert self.connack == 0, f"connection refused: {self.connack}"

    # callbacks (paho's thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.connack = reason_code.value
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self.pubacks[mid] = reason_code.value
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.disconnected = True
            self._cond.notify_all()

    # bounded waits
    def _wait(self, predicate, what: str, timeout: float = WAIT):
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"no {what} within {timeout} s")
            return predicate()

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        rc, mid = self.mqtt.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait(lambda: self.subacks.get(mid), f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (0 for MQTT 3.1.1)."""
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def wait_for(self, topic: str, payload: bytes) -> None:
        self._wait(lambda: any(t == topic and p == payload for t, p, _ in self.messages),
                   f"message {payload!r} on {topic}")

    def received(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return [(t, p) for t, p, _ in self.messages]

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@contextlib.contextmanager
def clients(*made: Client) -> Iterator[None]:
    try:
        yield
    finally:
        for client in made:
            client.close()


# -- a bare MQTT CONNECT, to see exactly where a refused client is stopped -------------------


def raw_connect(broker: MosquittoBroker, ctx: ssl.SSLContext | None,
                client_id: str = "probe") -> str:
    """Send an MQTT 3.1.1 CONNECT and read the CONNACK.

    Returns ``"accepted"``, ``"connack <rc>"``, ``"tls: <OpenSSL reason>"`` when TLS stopped
    it (the handshake, or the alert TLS 1.3 sends after it for a client certificate), or
    ``"closed"`` when the broker hung up.
    """
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
    packet = b"\x10" + bytes([len(var)]) + var
    sock = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=broker.host)
        sock.sendall(packet)
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return "closed"
            data += chunk
        if data[0] != 0x20:
            return f"unexpected {data.hex()}"
        return "accepted" if data[3] == 0 else f"connack {data[3]}"
    except ssl.SSLError as exc:
        return f"tls: {exc.reason or exc}"
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    finally:
        sock.close()


def bare_tls_context(pki: Pki, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A context that verifies the broker but may present any (or no) client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.ca_path)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


# -- publishing: own topics only ---------------------------------------------------------------


def test_a_device_publishes_its_own_transactions_and_the_center_receives_them(pki, broker):
    center = Client(broker, pki.ctx(pki.center("ingest-1")))
    device = Client(broker, pki.ctx(pki.creds("A")))
    with clients(center, device):
        assert center.subscribe("$share/ingest/afc/v1/dev/+/txn") == [1]
        assert center.subscribe("afc/v1/dev/+/status") == [1]
        assert device.publish("afc/v1/dev/A/txn", b"batch-1") in ACCEPTED
        assert device.publish("afc/v1/dev/A/status", b'{"state":"online"}', retain=True) in ACCEPTED
        center.wait_for("afc/v1/dev/A/txn", b"batch-1")
        center.wait_for("afc/v1/dev/A/status", b'{"state":"online"}')
        # and the center's ack reaches the device
        assert device.subscribe("afc/v1/dev/A/ack") == [1]
        assert center.publish("afc/v1/dev/A/ack", b"ack-1") in ACCEPTED
        device.wait_for("afc/v1/dev/A/ack", b"ack-1")


def test_a_device_cannot_publish_as_another_or_forge_center_messages_mqtt5(pki, broker):
    center = Client(broker, pki.ctx(pki.center("ingest-1")))
    publisher = Client(broker, pki.ctx(pki.center("publisher")))
    attacker = Client(broker, pki.ctx(pki.creds("A")))
    victim = Client(broker, pki.ctx(pki.creds("B")))
    with clients(center, publisher, attacker, victim):
        for leaf in ("txn", "telemetry", "event", "status", "reply"):
            assert center.subscribe(f"afc/v1/dev/+/{leaf}") == [1]
        for leaf in ("ack", "cmd"):
            assert victim.subscribe(f"afc/v1/dev/B/{leaf}") == [1]
            assert attacker.subscribe(f"afc/v1/dev/A/{leaf}") == [1]
        for topic in ("afc/v1/cfg/+", "afc/v1/cfg/+/B"):
            assert victim.subscribe(topic) == [1]

        forged = {
            # as another device
            "afc/v1/dev/B/txn": False, "afc/v1/dev/B/telemetry": False,
            "afc/v1/dev/B/event": False, "afc/v1/dev/B/status": True,
            "afc/v1/dev/B/reply": False,
            # as the center: acks and commands (even for itself), bundles
            "afc/v1/dev/A/ack": False, "afc/v1/dev/B/ack": False,
            "afc/v1/dev/B/cmd": False, "afc/v1/cfg/fares": True,
            "afc/v1/cfg/credit/B": True, "afc/v1/cfg/credit/A": True,
            # off the protocol's map entirely
            "afc/v1/other": False, "$SYS/broker/uptime": False,
        }
        for topic, retain in forged.items():
            assert attacker.publish(topic, b"forged", retain=retain) == NOT_AUTHORIZED, topic

        # sentinels: the attacker's own txn reaches the center; the center's and the
        # publisher's real messages reach the victim after anything forged would have
        assert attacker.publish("afc/v1/dev/A/txn", b"sentinel") in ACCEPTED
        center.wait_for("afc/v1/dev/A/txn", b"sentinel")
        assert center.publish("afc/v1/dev/B/ack", b"real-ack") in ACCEPTED
        victim.wait_for("afc/v1/dev/B/ack", b"real-ack")
        assert publisher.publish("afc/v1/cfg/credit/B", b"real-credit", retain=True) in ACCEPTED
        victim.wait_for("afc/v1/cfg/credit/B", b"real-credit")

        assert b"forged" not in [p for _, p in center.received()]
        assert b"forged" not in [p for _, p in victim.received()]
        assert b"forged" not in [p for _, p in attacker.received()]

        # nothing forged was retained: a fresh subscriber gets the real bundle only, and
        # B's status topic holds nothing (A's own retained status arrives after it would)
        assert attacker.publish("afc/v1/dev/A/status", b"A-online", retain=True) in ACCEPTED
        late = Client(broker, pki.ctx(pki.center("publisher")))
        with clients(late):
            late.subscribe("afc/v1/dev/B/status")
            late.subscribe("afc/v1/dev/A/status")
            late.wait_for("afc/v1/dev/A/status", b"A-online")
            assert ("afc/v1/dev/B/status", b"forged") not in late.received()
            assert late.received() == [("afc/v1/dev/A/status", b"A-online")]
            fresh_b = Client(broker, pki.ctx(pki.creds("B")))
            with clients(fresh_b):
                fresh_b.subscribe("afc/v1/cfg/fares")
                fresh_b.subscribe("afc/v1/cfg/+/B")
                fresh_b.wait_for("afc/v1/cfg/credit/B", b"real-credit")
                assert fresh_b.received() == [("afc/v1/cfg/credit/B", b"real-credit")]


def test_with_mqtt311_a_forged_publish_is_acknowledged_but_dropped(pki, broker):
    center = Client(broker, pki.ctx(pki.center("ingest-1")))
    attacker = Client(broker, pki.ctx(pki.creds("A")), v5=False)
    with clients(center, attacker):
        assert center.subscribe("afc/v1/dev/+/txn") == [1]
        # MQTT 3.1.1 has no reason code: the broker PUBACKs and drops the message
        assert attacker.publish("afc/v1/dev/B/txn", b"forged") in ACCEPTED
        assert attacker.publish("afc/v1/dev/A/txn", b"sentinel") in ACCEPTED
        center.wait_for("afc/v1/dev/A/txn", b"sentinel")
        assert center.received() == [("afc/v1/dev/A/txn", b"sentinel")]


def test_center_roles_are_separated(pki, broker):
    """Ingest acks but cannot publish bundles or commands; the publisher the reverse;
    neither can put words in a device's mouth."""
    ingest = Client(broker, pki.ctx(pki.center("ingest-1")))
    publisher = Client(broker, pki.ctx(pki.center("publisher")))
    with clients(ingest, publisher):
        for topic in ("afc/v1/cfg/fares", "afc/v1/cfg/credit/A", "afc/v1/dev/A/cmd",
                      "afc/v1/dev/A/txn", "afc/v1/dev/A/status"):
            assert ingest.publish(topic, b"x") == NOT_AUTHORIZED, topic
        for topic in ("afc/v1/dev/A/ack", "afc/v1/dev/A/txn", "afc/v1/dev/A/event",
                      "afc/v1/dev/A/reply"):
            assert publisher.publish(topic, b"x") == NOT_AUTHORIZED, topic
        assert ingest.publish("afc/v1/dev/A/ack", b"ack") in ACCEPTED
        assert publisher.publish("afc/v1/cfg/fares", b"bundle", retain=True) in ACCEPTED
        assert publisher.publish("afc/v1/cfg/credit/A", b"bundle", retain=True) in ACCEPTED
        assert publisher.publish("afc/v1/dev/A/cmd", b"cmd") in ACCEPTED


# -- reading: own topics and the fleet's bundles only -------------------------------------------


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_a_device_cannot_read_another_devices_acks_commands_or_bundles(pki, broker, v5):
    center = Client(broker, pki.ctx(pki.center("ingest-1")))
    publisher = Client(broker, pki.ctx(pki.center("publisher")))
    with clients(center, publisher):
        # retained before anyone subscribes: B's private bundle and a fleet bundle
        assert publisher.publish("afc/v1/cfg/credit/B", b"B-credit", retain=True) in ACCEPTED
        assert publisher.publish("afc/v1/cfg/fares", b"fleet-fares", retain=True) in ACCEPTED

        snoop = Client(broker, pki.ctx(pki.creds("A")), v5=v5)
        with clients(snoop):
            filters = ["afc/v1/dev/B/ack", "afc/v1/dev/B/cmd", "afc/v1/cfg/+/B",
                       "afc/v1/cfg/+/+", "afc/v1/dev/+/ack", "afc/v1/dev/+/txn", "afc/v1/cfg/#",
                       "afc/v1/#", "#"]
            subacks = {f: snoop.subscribe(f) for f in filters}
            # Mosquitto 2.0 grants these (it does not check SUBSCRIBE against the ACL file);
            # a broker that does would answer 0x80 / 0x87. Either way: nothing may arrive.
            assert all(len(codes) == 1 for codes in subacks.values()), subacks

            # live traffic for B, then the same kinds for A (the sentinels)
            assert center.publish("afc/v1/dev/B/ack", b"B-ack") in ACCEPTED
            assert publisher.publish("afc/v1/dev/B/cmd", b"B-cmd") in ACCEPTED
            assert publisher.publish("afc/v1/cfg/credit/B", b"B-credit-2", retain=True) in ACCEPTED
            assert center.publish("afc/v1/dev/A/ack", b"A-ack") in ACCEPTED
            assert publisher.publish("afc/v1/dev/B/cmd", b"B-cmd-2") in ACCEPTED
            assert publisher.publish("afc/v1/dev/A/cmd", b"A-cmd") in ACCEPTED
            assert publisher.publish("afc/v1/cfg/credit/A", b"A-credit", retain=True) in ACCEPTED
            for topic, payload in (("afc/v1/dev/A/ack", b"A-ack"),
                                   ("afc/v1/dev/A/cmd", b"A-cmd"),
                                   ("afc/v1/cfg/credit/A", b"A-credit"),
                                   ("afc/v1/cfg/fares", b"fleet-fares")):
                snoop.wait_for(topic, payload)
            got = snoop.received()
            assert {t for t, _ in got} <= {"afc/v1/dev/A/ack", "afc/v1/dev/A/cmd",
                                           "afc/v1/cfg/credit/A", "afc/v1/cfg/fares"}, got

        # positive control: B itself gets its own retained bundle
        owner = Client(broker, pki.ctx(pki.creds("B")), v5=v5)
        with clients(owner):
            owner.subscribe("afc/v1/cfg/+/B")
            owner.wait_for("afc/v1/cfg/credit/B", b"B-credit-2")


def test_a_device_cannot_take_over_another_devices_session(pki, broker):
    """use_username_as_clientid: the client id a device asks for is replaced by its CN."""
    publisher = Client(broker, pki.ctx(pki.center("publisher")))
    victim = Client(broker, pki.ctx(pki.creds("B")), "B", clean=False)
    with clients(publisher, victim):
        assert victim.subscribe("afc/v1/dev/B/cmd") == [1]
        thief = Client(broker, pki.ctx(pki.creds("A")), "B", clean=False)
        with clients(thief):
            # the victim was not kicked off: its next publish is acknowledged ...
            assert victim.publish("afc/v1/dev/B/txn", b"still-here") in ACCEPTED
            assert not victim.disconnected
            # ... and its commands still reach it, not the thief
            assert publisher.publish("afc/v1/dev/B/cmd", b"cmd-for-B") in ACCEPTED
            victim.wait_for("afc/v1/dev/B/cmd", b"cmd-for-B")
            assert thief.publish("afc/v1/dev/A/txn", b"sentinel") in ACCEPTED
            assert thief.received() == []
        log = broker.log_path.read_text(errors="replace")
        assert re.search(r"New client connected from \S+ as A \(.*u'A'\)", log), log[-2000:]


# -- the TLS layer: who gets in --------------------------------------------------------------------


def test_a_device_with_its_certificate_is_accepted(pki, broker):
    assert raw_connect(broker, pki.ctx(pki.creds("A"))) == "accepted"
    assert raw_connect(broker, bare_tls_context(pki, pki.creds("A"))) == "accepted"


def refused(broker: MosquittoBroker, ctx: ssl.SSLContext | None,
            expect: str = "certificate verify failed") -> tuple[str, str]:
    """Connect once; return (what the client saw, what the broker logged meanwhile).

    The client sees a TLS alert or only the connection end, depending on the case and on
    timing (mosquitto may hang up before its alert is read); the broker's log says why, so
    this waits (bounded) for ``expect`` to appear there.
    """
    before = broker.log_path.stat().st_size
    result = raw_connect(broker, ctx)
    log = ""
    for _ in range(100):
        with broker.log_path.open("rb") as fh:
            fh.seek(before)
            log = fh.read().decode(errors="replace")
        if result == "accepted" or expect in log:
            break
        threading.Event().wait(0.02)
    return result, log


VERIFY_FAILED = "certificate verify failed"


@pytest.mark.parametrize("case", ["no-certificate", "other-ca", "server-cert-as-client",
                                  "plaintext"])
def test_clients_without_a_valid_device_certificate_are_refused(pki, broker, case):
    if case == "no-certificate":
        result, log = refused(broker, bare_tls_context(pki, None),
                              "peer did not return a certificate")
        # TLS 1.3: the broker's "certificate required" alert comes after the handshake (or
        # the client only sees the connection end, depending on timing)
        assert result.startswith("tls:"), result
        assert "peer did not return a certificate" in log, log
    elif case == "other-ca":
        result, log = refused(broker, bare_tls_context(pki, pki.other_ca.paths("device", "A")))
        assert result.startswith("tls:"), result
        assert VERIFY_FAILED in log, log
    elif case == "server-cert-as-client":
        # a stolen broker key cannot log in: its certificate is for serverAuth only
        result, log = refused(broker, bare_tls_context(pki, pki.ca.paths("server", "broker")))
        assert result.startswith("tls:"), result
        assert VERIFY_FAILED in log, log
    else:
        result, log = refused(broker, None, "wrong version number")
        assert result == "closed", result
        assert "wrong version number" in log, log  # a TLS record was expected
    # the same broker still takes a proper device (the refusal was about the client)
    assert raw_connect(broker, pki.ctx(pki.creds("A"))) == "accepted"


def test_a_device_refuses_a_broker_it_does_not_pin(pki, tmp_path):
    # the broker's certificate is ours but names another host: hostname check fails
    with _harness_broker(pki, tmp_path / "elsewhere", server="elsewhere") as elsewhere, \
            pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        raw_connect_strict(elsewhere, pki.ctx(pki.creds("A")))
    # a broker with a certificate from another CA
    pki.other_ca.issue_server("impostor", replace=True)
    files = pki.other_ca.export_broker_files(
        Path(tempfile.mkdtemp(prefix="etc-", dir=pki.root)), "impostor",
        owner=_broker_owner())
    files["cafile"].parent.chmod(0o755)
    impostor = MosquittoBroker(tmp_path / "impostor", tls=BrokerTls(
        files["cafile"], files["certfile"], files["keyfile"]))
    with impostor, pytest.raises(ssl.SSLCertVerificationError, match=VERIFY_FAILED):
        raw_connect_strict(impostor, pki.ctx(pki.creds("A")))


def raw_connect_strict(broker: MosquittoBroker, ctx: ssl.SSLContext) -> None:
    """Only the TLS handshake, letting the client's verification error propagate."""
    with socket.create_connection((broker.host, broker.port), timeout=WAIT) as sock, \
            ctx.wrap_socket(sock, server_hostname=broker.host):
        pass


def test_tls12_is_enough_and_tls13_is_used_when_possible(pki, broker):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = pki.ctx(pki.creds("A"))
        ctx.maximum_version = version
        with socket.create_connection((broker.host, broker.port), timeout=WAIT) as sock, \
                ctx.wrap_socket(sock, server_hostname=broker.host) as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                     ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


# -- revocation ----------------------------------------------------------------------------------


def test_a_revoked_device_is_refused_after_the_broker_restarts(pki, tmp_path):
    device = pki.creds("R1")
    with _harness_broker(pki, tmp_path / "b") as broker:
        assert raw_connect(broker, pki.ctx(device)) == "accepted"
        assert pki.ca.revoke("R1")
        # the broker reads its own copy of the CRL: install it, restart
        files = pki.broker_files()
        broker.extra_config = f"crlfile {files['crlfile']}\n{LISTENER_EXTRA}"
        broker.restart()
        # the only change is the CRL: the same certificate that got in a moment ago is out
        result, log = refused(broker, pki.ctx(device))
        assert result.startswith("tls:") and VERIFY_FAILED in log, (result, log)
        assert raw_connect(broker, pki.ctx(pki.creds("A"))) == "accepted"


def _mosquitto_pid(broker: MosquittoBroker) -> int:
    """The pid of the mosquitto running ``broker``'s config (found by its command line)."""
    config = str(broker.config_path)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if config in (proc.info["cmdline"] or []):
            return int(proc.info["pid"])
    raise AssertionError(f"no mosquitto process runs {config}")


def test_reload_applies_a_new_crl_to_new_connections(pki):
    device = pki.creds("R2")
    files = pki.broker_files()
    # the reload re-reads mosquitto.conf as the mosquitto user: keep it where it can
    workdir = Path(tempfile.mkdtemp(prefix="broker-", dir=pki.root))
    workdir.chmod(0o755)
    broker = MosquittoBroker(workdir, tls=BrokerTls(
        files["cafile"], files["certfile"], files["keyfile"]), acl_file=ACL_FILE,
        extra_config=f"crlfile {files['crlfile']}\n{LISTENER_EXTRA}")
    with broker:
        center = Client(broker, pki.ctx(pki.center("ingest-1")))
        connected = Client(broker, pki.ctx(device))
        with clients(center, connected):
            center.subscribe("afc/v1/dev/+/txn")
            pki.ca.revoke("R2")
            pki.ca.export_broker_files(files["cafile"].parent, "broker",
                                       owner=_broker_owner())
            _reload(broker)
            log = broker.log_path.read_text(errors="replace")
            assert "Unable to open config file" not in log, log[-2000:]
            # the TLS session opened before the revocation lives on until it ends (its next
            # packet is handled after the reload): why docs/broker.md says to restart the
            # broker, or quarantine the id in the ACL, to cut it off at once
            assert connected.publish("afc/v1/dev/R2/txn", b"still-open") in ACCEPTED
            center.wait_for("afc/v1/dev/R2/txn", b"still-open")
            # a new connection with the revoked certificate is refused
            result, log = refused(broker, pki.ctx(device))
            assert result.startswith("tls:") and VERIFY_FAILED in log, (result, log)
            assert raw_connect(broker, pki.ctx(pki.creds("A"))) == "accepted"


def _reload(broker: MosquittoBroker) -> None:
    """SIGHUP, then wait (bounded) for mosquitto to log that it reloaded."""
    seen = broker.log_path.read_text(errors="replace").count("Reloading config.")
    os.kill(_mosquitto_pid(broker), signal.SIGHUP)
    for _ in range(250):
        if broker.log_path.read_text(errors="replace").count("Reloading config.") > seen:
            return
        threading.Event().wait(0.02)
    raise AssertionError("mosquitto did not reload within 5 s")


def test_quarantine_in_the_acl_cuts_off_an_open_session_on_reload(pki):
    """The immediate measure for a stolen device: deny its id everything, reload."""
    files = pki.broker_files()
    workdir = Path(tempfile.mkdtemp(prefix="broker-", dir=pki.root))
    workdir.chmod(0o755)
    acl = workdir / "afc.acl"
    acl.write_text(ACL_FILE.read_text())
    acl.chmod(0o644)
    broker = MosquittoBroker(workdir, tls=BrokerTls(
        files["cafile"], files["certfile"], files["keyfile"]), acl_file=acl,
        extra_config=f"crlfile {files['crlfile']}\n{LISTENER_EXTRA}")
    with broker:
        center = Client(broker, pki.ctx(pki.center("ingest-1")))
        stolen = Client(broker, pki.ctx(pki.creds("Q1")))
        with clients(center, stolen):
            center.subscribe("afc/v1/dev/+/txn")
            assert stolen.subscribe("afc/v1/dev/Q1/ack") == [1]
            assert stolen.publish("afc/v1/dev/Q1/txn", b"before") in ACCEPTED
            center.wait_for("afc/v1/dev/Q1/txn", b"before")
            with acl.open("a") as fh:
                fh.write("\n# quarantined: stolen bus validator\nuser Q1\ntopic deny #\n")
            _reload(broker)
            assert stolen.publish("afc/v1/dev/Q1/txn", b"after") == NOT_AUTHORIZED
            assert center.publish("afc/v1/dev/Q1/ack", b"ack-after") in ACCEPTED
            assert center.publish("afc/v1/dev/Q1/txn", b"x") == NOT_AUTHORIZED  # center: read
            other = Client(broker, pki.ctx(pki.creds("A")))
            with clients(other):
                assert other.publish("afc/v1/dev/A/txn", b"sentinel") in ACCEPTED
                center.wait_for("afc/v1/dev/A/txn", b"sentinel")
            assert b"after" not in [p for _, p in center.received()]
            # the broker answers this only after it handled the ack above, on the same
            # socket: had the ack been delivered, it would be in received() by now
            assert stolen.publish("afc/v1/dev/Q1/status", b"x") == NOT_AUTHORIZED
            assert stolen.received() == []


def test_an_expired_crl_locks_every_client_out(pki, tmp_path):
    """Why the CRL must be re-signed before its nextUpdate (docs/broker.md)."""
    files = pki.broker_files()
    key = serialization.load_pem_private_key((pki.ca.dir / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(pki.ca.cert.subject)
           .last_update(now - dt.timedelta(days=2))
           .next_update(now - dt.timedelta(days=1))
           .sign(key, hashes.SHA256()))
    files["crlfile"].write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    broker = MosquittoBroker(tmp_path / "b", tls=BrokerTls(
        files["cafile"], files["certfile"], files["keyfile"]), acl_file=ACL_FILE,
        extra_config=f"crlfile {files['crlfile']}\n{LISTENER_EXTRA}")
    with broker:
        result, log = refused(broker, pki.ctx(pki.creds("A")))
        assert result.startswith("tls:") and VERIFY_FAILED in log, (result, log)
        # the same files with the CA's current CRL: the device gets in
        assert pki.ca.crl_next_update() > now + dt.timedelta(days=300)
        pki.ca.export_broker_files(files["cafile"].parent, "broker", owner=_broker_owner())
        broker.restart()
        assert raw_connect(broker, pki.ctx(pki.creds("A"))) == "accepted"


# -- the agent's client library --------------------------------------------------------------------


def test_aiomqtt_with_the_agent_context_round_trip(pki, broker):
    """The agent's path: aiomqtt + client_ssl_context, MQTT 5, publish and receive."""
    center = Client(broker, pki.ctx(pki.center("ingest-1")))

    async def device() -> bytes:
        async with aiomqtt.Client(broker.host, broker.port, identifier="ignored-by-broker",
                                  protocol=aiomqtt.ProtocolVersion.V5,
                                  tls_context=pki.ctx(pki.creds("A")), timeout=WAIT) as cl:
            await cl.subscribe("afc/v1/dev/A/ack", qos=1)
            await cl.publish("afc/v1/dev/A/txn", b"aio-batch", qos=1)
            async with asyncio.timeout(WAIT):
                async for message in cl.messages:
                    return bytes(message.payload)
        raise AssertionError("no ack")

    with clients(center):
        center.subscribe("afc/v1/dev/+/txn")
        center_thread = threading.Thread(target=lambda: (
            center.wait_for("afc/v1/dev/A/txn", b"aio-batch"),
            center.publish("afc/v1/dev/A/ack", b"aio-ack")), daemon=True)
        center_thread.start()
        assert asyncio.run(device()) == b"aio-ack"
        center_thread.join(WAIT)
        assert not center_thread.is_alive()


# -- the shipped configuration -------------------------------------------------------------------


class ShippedBroker(MosquittoBroker):
    """deploy/mosquitto/afc.conf, every path moved into ``workdir``, the listener to a free
    port on 127.0.0.1; the harness's start/stop/log handling unchanged."""

    PATH_OPTIONS = ("cafile", "certfile", "keyfile", "crlfile", "acl_file",
                    "persistence_location", "pid_file", "log_dest")

    def __init__(self, workdir: Path, files: dict[str, Path], var: Path) -> None:
        super().__init__(workdir)
        self.files = files
        self.var = var  # must be reachable by the mosquitto user (pid, log, persistence)
        owner = _broker_owner()
        if owner:
            entry = pwd.getpwnam(owner)
            os.chown(self.var, entry.pw_uid, entry.pw_gid)

    def config_text(self) -> str:
        out = []
        listeners = 0
        for line in SHIPPED_CONF.read_text().splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                out.append(line)
                continue
            option = words[0]
            if option == "listener":
                assert words[1:] == ["8883"], line
                out.append(f"listener {self.port} {self.host}")
                listeners += 1
            elif option in ("cafile", "certfile", "keyfile", "crlfile"):
                out.append(f"{option} {self.files[option]}")
            elif option == "acl_file":
                out.append(f"acl_file {ACL_FILE}")
            elif option == "persistence_location":
                out.append(f"persistence_location {self.var}/")
            elif option == "pid_file":
                out.append(f"pid_file {self.var}/mosquitto.pid")
            elif option == "log_dest":
                assert words[1] == "file", line
                out.append(f"log_dest file {self.var}/mosquitto.log")
            else:
                assert not any(w.startswith("/") for w in words[1:]), \
                    f"a path the test does not move: {line}"
                out.append(line)
        assert listeners == 1
        out.insert(0, "log_dest stderr")  # into the harness's log as well
        return "\n".join(out) + "\n"


def test_the_shipped_config_is_accepted_and_enforces_the_acl(pki, tmp_path):
    text = SHIPPED_CONF.read_text()
    for required in ("require_certificate true", "use_identity_as_username true",
                     "use_username_as_clientid true", "allow_anonymous false",
                     "per_listener_settings false", "crlfile ", "acl_file ", "max_packet_size",
                     "persistence true", "tls_version tlsv1.2"):
        assert required in text, required
    var = Path(tempfile.mkdtemp(prefix="var-", dir=pki.root))
    broker = ShippedBroker(tmp_path / "shipped", pki.broker_files(), var)
    with broker:
        center = Client(broker, pki.ctx(pki.center("ingest-2")))
        publisher = Client(broker, pki.ctx(pki.center("publisher")))
        device = Client(broker, pki.ctx(pki.creds("A")), "B")  # asks for B's client id
        with clients(center, publisher, device):
            center.subscribe("$share/ingest/afc/v1/dev/+/txn")
            assert device.publish("afc/v1/dev/B/txn", b"forged") == NOT_AUTHORIZED
            assert device.publish("afc/v1/dev/A/txn", b"own") in ACCEPTED
            center.wait_for("afc/v1/dev/A/txn", b"own")
            assert center.received() == [("afc/v1/dev/A/txn", b"own")]
            # a full-size blacklist bundle (about 9.6 MB for 1M cards with UIDs) fits
            device.subscribe("afc/v1/cfg/+")
            bundle = os.urandom(12 << 20)
            assert publisher.publish("afc/v1/cfg/blacklist", bundle, retain=True) in ACCEPTED
            device.wait_for("afc/v1/cfg/blacklist", bundle)
        # a packet over max_packet_size costs the sender its connection, nothing is stored
        big = Client(broker, pki.ctx(pki.center("publisher")))
        with clients(big):
            big.mqtt.publish("afc/v1/cfg/fares", os.urandom((16 << 20) + 1), qos=1)
            big._wait(lambda: big.disconnected, "disconnect after an oversize packet")
        log = broker.log_path.read_text(errors="replace")
        assert re.search(r"New client connected from \S+ as A \(.*u'A'\)", log), log[-2000:]
    assert (broker.var / "mosquitto.db").exists()  # persistence written on stop
