"""The test broker harness: a real mosquitto that starts, serves, restarts and stops."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest

from simulators.broker import BrokerError, MosquittoBroker


def _roundtrip(broker: MosquittoBroker, topic: str) -> bytes:
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="harness")
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        time.sleep(0.1)
        client.publish(topic, b"hello", qos=1).wait_for_publish(timeout=5)
        for _ in range(50):
            if got:
                break
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else b""


def test_broker_serves_and_restarts_on_the_same_port(mosquitto):
    assert _roundtrip(mosquitto, "afc/v1/test") == b"hello"
    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.port == port and mosquitto.running
    assert _roundtrip(mosquitto, "afc/v1/test") == b"hello"
    assert "listener" in mosquitto.config_text() and "127.0.0.1" in mosquitto.config_text()


def test_a_broken_config_is_reported_with_the_log(tmp_path):
    broker = MosquittoBroker(tmp_path, extra_config="no_such_option 1")
    with pytest.raises(BrokerError, match="exited at start"):
        broker.start(timeout=5)
    assert not broker.running
