"""Settings for tests/ and hil_tests/: bounded hypothesis runs in CI, longer ones on demand
(AFC_SLOW=1), and the `slow` marker skipped unless AFC_SLOW=1."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("slow", parent=settings.get_profile("default"), max_examples=20_000)
settings.load_profile("slow" if os.environ.get("AFC_SLOW") == "1" else "default")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("AFC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow soak/fuzz run: set AFC_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto on 127.0.0.1 and a free port, stopped after the test."""
    from simulators.broker import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "broker")
    with broker:
        yield broker
