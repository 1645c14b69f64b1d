"""Camera-site configuration and its signed config message, on the center's side.

The firmware (``firmware/micropython/afcsite/config.py``) is the authority on what a config
may hold; this module builds configs for rigs and tests, signs the config message exactly as
docs/protocol.md signs JSON messages (``edge_agent.protocol.encode_json_message`` with an
HMAC-SHA256 signer under the site's key) and checks the site's own messages the same way.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from edge_agent.protocol import (
    decode_json_message,
    encode_json_message,
    hmac_json_signer,
    verify_json_signature,
)

from .errors import CameraSimError

KIND = "camera-site"

#: Settings for a rig or a test: everything a few times faster than in the field.
FAST_TIMING = {
    "probe_ms": 300,
    "probe_timeout_ms": 400,
    "sensor_ms": 100,
    "telemetry_ms": 1000,
    "status_ms": 5000,
    "backoff_min_ms": 100,
    "backoff_max_ms": 400,
    "io_timeout_ms": 1000,
    "wdt_ms": 5000,
}
FAST_THRESHOLDS = {
    "slow_ms": 150,
    "clock_skew_ms": 3000,
    "down_after": 2,
    "up_after": 2,
    "degraded_after": 2,
    "temp_high_c": 45,
    "temp_hyst_c": 3,
    "ups_low_pct": 30,
    "probe_parallel": 4,
}


def cfg_topic(device_id: str) -> str:
    """Where the center publishes (retained) one camera site's config message."""
    return f"afc/v1/cfg/{KIND}/{device_id}"


def dev_topic(device_id: str, leaf: str) -> str:
    return f"afc/v1/dev/{device_id}/{leaf}"


def new_key() -> bytes:
    """A fresh per-device HMAC key (32 random bytes)."""
    return secrets.token_bytes(32)


def site_config(
    broker_host: str,
    broker_port: int,
    cameras: Iterable[Mapping[str, Any]],
    *,
    timing: Mapping[str, int] | None = None,
    thresholds: Mapping[str, int] | None = None,
    ring_slots: int = 48,
    fast: bool = True,
) -> dict[str, Any]:
    """A config object for a site (``fast``: rig/test timings, else the firmware defaults)."""
    t = dict(FAST_TIMING if fast else {})
    t.update(timing or {})
    th = dict(FAST_THRESHOLDS if fast else {})
    th.update(thresholds or {})
    return {"broker": {"host": broker_host, "port": broker_port, "keepalive_s": 10},
            "cameras": [dict(c) for c in cameras], "timing": t, "thresholds": th,
            "ring_slots": ring_slots}


def sign_config(device_id: str, key: bytes, version: int, config: Mapping[str, Any], *,
                ts: int | None = None) -> bytes:
    """The signed config message for one site (publish it retained on :func:`cfg_topic`)."""
    if version < 1:
        raise CameraSimError("a config version starts at 1")
    fields = {"t": "cfg", "dev": device_id, "ts": int(time.time() * 1000) if ts is None else ts,
              "version": version, "config": dict(config)}
    return encode_json_message(fields, signer=hmac_json_signer(key))


def open_site_message(payload: bytes, key: bytes) -> dict[str, Any]:
    """A site's status/telemetry/event parsed, its HMAC signature checked (CameraSimError
    when it does not verify)."""
    msg = decode_json_message(payload)
    if not verify_json_signature(msg, hmac_key=key):
        raise CameraSimError(f"message from {msg.get('dev')!r} has a bad or no signature")
    return msg


def flash_files(device_id: str, key: bytes, version: int, config: Mapping[str, Any]
                ) -> dict[str, str]:
    """identity.json and config.json as a provisioning step writes them to flash."""
    return {
        "identity.json": json.dumps({"dev": device_id, "key": key.hex()}),
        "config.json": json.dumps({"version": version, "config": dict(config)}),
    }
