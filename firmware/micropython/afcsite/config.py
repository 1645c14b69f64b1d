"""Identity and configuration on flash, and the signed config message that replaces it.

``identity.json`` (written once, at provisioning; never sent, never logged)::

    {"dev": "site-0042", "key": "<64 hex digits: the per-device HMAC-SHA256 key>"}

``config.json`` (replaced atomically by a config message)::

    {"version": 3, "config": {"broker": {...}, "cameras": [...], "timing": {...},
                              "thresholds": {...}, "ring_slots": 48}}

The config message (topic ``afc/v1/cfg/camera-site/{dev}``, retained, QoS 1) is the JSON
object ``{"v": 1, "t": "cfg", "dev", "ts", "version", "config", "sig"}``, signed
``hmac-sha256`` like every JSON message of docs/protocol.md. It is applied only if it parses,
is addressed to this device, carries a valid signature, a version greater than the one in
force, and a config that validates; anything else is a ``cfg-rejected`` event and the old
config stays. The same version again (the retained copy, seen at every reconnect) is ignored.

Every number is an integer (signed JSON carries no floats); unknown keys are refused, so a
misspelt setting is reported instead of silently ignored.
"""

import json
import os

from afcsite.errors import ConfigError, ConfigRejected, EncodeError

IDENTITY = "identity.json"
CONFIG = "config.json"
MAX_CAMERAS = 16
MAX_MESSAGE = 4096
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"

# section -> {key: (default, min, max)}; a default of None for a text/null field
_TIMING = {
    "probe_ms": (10000, 100, 3600000),
    "probe_timeout_ms": (2000, 50, 60000),
    "sensor_ms": (1000, 50, 600000),
    "telemetry_ms": (60000, 100, 86400000),
    "status_ms": (300000, 100, 86400000),
    "backoff_min_ms": (1000, 50, 600000),
    "backoff_max_ms": (60000, 50, 3600000),
    "io_timeout_ms": (5000, 100, 60000),
    "wdt_ms": (30000, 1000, 600000),
}
_THRESHOLDS = {
    "slow_ms": (1000, 1, 60000),
    "clock_skew_ms": (3000, 0, 86400000),
    "down_after": (3, 1, 100),
    "up_after": (2, 1, 100),
    "degraded_after": (2, 1, 100),
    "temp_high_c": (45, -40, 125),
    "temp_hyst_c": (3, 0, 50),
    "ups_low_pct": (30, 0, 100),
    "probe_parallel": (4, 1, 8),
}
_BROKER_INTS = {"port": (1883, 1, 65535), "keepalive_s": (30, 5, 3600)}
_CAMERA_INTS = {"rtsp_port": (554, 1, 65535), "onvif_port": (80, 1, 65535)}


def valid_id(s, most=64):
    if not isinstance(s, str) or not 1 <= len(s) <= most:
        return False
    return all(c in _ID_CHARS for c in s)


def _valid_ipv4(s):
    if not isinstance(s, str):
        return False
    parts = s.split(".")
    if len(parts) != 4:
        return False
    return all(p and len(p) <= 3 and p.isdigit() and int(p) <= 255 for p in parts)


def _int_field(where, obj, key, spec):
    default, lo, hi = spec
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError("%s.%s must be an integer" % (where, key))
    if not lo <= v <= hi:
        raise ConfigError("%s.%s = %d is outside %d..%d" % (where, key, v, lo, hi))
    return v


def _section(where, obj, ints, texts=()):
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise ConfigError("%s must be an object" % where)
    for k in obj:
        if k not in ints and k not in texts:
            raise ConfigError("%s has an unknown setting %r" % (where, k))
    out = {}
    for k in ints:
        out[k] = _int_field(where, obj, k, ints[k])
    return out


def _text(where, v, most, nullable=False):
    if v is None and nullable:
        return None
    if not isinstance(v, str) or not 1 <= len(v) <= most:
        raise ConfigError("%s must be text of 1..%d characters" % (where, most))
    for c in v:
        if ord(c) < 0x21 or ord(c) > 0x7E:
            raise ConfigError("%s holds a space or a non-printable character" % where)
    return v


def validate(cfg):
    """A checked copy of a config object with defaults filled in; ConfigError names the
    first bad field."""
    if not isinstance(cfg, dict):
        raise ConfigError("config must be an object")
    for k in cfg:
        if k not in ("broker", "cameras", "timing", "thresholds", "ring_slots"):
            raise ConfigError("config has an unknown setting %r" % k)
    b = cfg.get("broker")
    if not isinstance(b, dict):
        raise ConfigError("config.broker must be an object with at least 'host'")
    broker = _section("broker", b, _BROKER_INTS, ("host", "user", "password"))
    broker["host"] = _text("broker.host", b.get("host"), 64)
    broker["user"] = _text("broker.user", b.get("user"), 64, True)
    broker["password"] = _text("broker.password", b.get("password"), 128, True)
    cams = cfg.get("cameras", [])
    if not isinstance(cams, list) or len(cams) > MAX_CAMERAS:
        raise ConfigError("config.cameras must be a list of at most %d cameras" % MAX_CAMERAS)
    cameras = []
    seen = []
    for i in range(len(cams)):
        c = cams[i]
        where = "cameras[%d]" % i
        if not isinstance(c, dict):
            raise ConfigError(where + " must be an object")
        cam = _section(where, c, _CAMERA_INTS, ("id", "host", "onvif_path"))
        if not valid_id(c.get("id"), 16):
            raise ConfigError(where + ".id must be 1..16 of A-Z a-z 0-9 . _ -")
        if c["id"] in seen:
            raise ConfigError(where + ".id %r is used twice" % c["id"])
        seen.append(c["id"])
        cam["id"] = c["id"]
        if not _valid_ipv4(c.get("host")):
            raise ConfigError(where + ".host must be an IPv4 address such as 10.20.0.11")
        cam["host"] = c["host"]
        path = _text(where + ".onvif_path", c.get("onvif_path", "/onvif/device_service"), 64)
        if path[0] != "/":
            raise ConfigError(where + ".onvif_path must start with /")
        cam["onvif_path"] = path
        cameras.append(cam)
    timing = _section("timing", cfg.get("timing"), _TIMING)
    if timing["backoff_max_ms"] < timing["backoff_min_ms"]:
        raise ConfigError("timing.backoff_max_ms is below timing.backoff_min_ms")
    thresholds = _section("thresholds", cfg.get("thresholds"), _THRESHOLDS)
    slots = _int_field("config", cfg, "ring_slots", (48, 4, 512))
    return {"broker": broker, "cameras": cameras, "timing": timing,
            "thresholds": thresholds, "ring_slots": slots}


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        raise ConfigError("%s is missing on flash (%s): provision the device" % (what, path))
    except ValueError:
        raise ConfigError("%s (%s) is not valid JSON" % (what, path))


def load_identity(flash):
    """``(device_id, key_bytes)`` from identity.json."""
    from binascii import unhexlify

    ident = _read_json(flash + IDENTITY, IDENTITY)
    if not isinstance(ident, dict) or not valid_id(ident.get("dev")):
        raise ConfigError(IDENTITY + ": 'dev' must be 1..64 of A-Z a-z 0-9 . _ -")
    key = ident.get("key")
    try:
        raw = unhexlify(key) if isinstance(key, str) else b""
    except ValueError:
        raw = b""
    if len(raw) < 16:
        raise ConfigError(IDENTITY + ": 'key' must be at least 32 hex digits (16 bytes)")
    return ident["dev"], raw


def load(flash):
    """``(version, config)`` in force: config.json, or the previous one if it is damaged
    (a power cut while replacing it)."""
    err = None
    for name in (CONFIG, CONFIG + ".prev"):
        try:
            doc = _read_json(flash + name, name)
            if not isinstance(doc, dict):
                raise ConfigError(name + " must be an object")
            version = doc.get("version", 0)
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise ConfigError(name + ": 'version' must be a whole number")
            return version, validate(doc.get("config"))
        except ConfigError as e:
            err = err or e
    raise err


def save(flash, version, cfg):
    """Replace config.json atomically: write a new file, keep the old one as .prev, rename."""
    path = flash + CONFIG
    tmp = path + ".new"
    with open(tmp, "w") as f:
        json.dump({"version": version, "config": cfg}, f)
    try:
        os.remove(path + ".prev")
    except OSError:
        pass
    try:
        os.rename(path, path + ".prev")
    except OSError:
        pass
    os.rename(tmp, path)


def check_message(payload, dev, encoder, current_version):
    """The ``(version, config)`` of a config message, or ConfigRejected with the reason.

    Returns None for the retained copy of the version already in force.
    """
    if payload is None or len(payload) > MAX_MESSAGE:
        raise ConfigRejected("too-large", "over %d bytes" % MAX_MESSAGE)
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeError):
        raise ConfigRejected("bad-json")
    if not isinstance(msg, dict):
        raise ConfigRejected("bad-json", "not an object")
    try:
        good = encoder.verify(msg)
    except EncodeError as e:
        raise ConfigRejected("invalid-config", str(e))
    if not good:
        raise ConfigRejected("bad-signature")
    if msg.get("v") != 1 or msg.get("t") != "cfg":
        raise ConfigRejected("bad-type", "expected v 1 and t 'cfg'")
    if msg.get("dev") != dev:
        raise ConfigRejected("wrong-device")
    version = msg.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigRejected("bad-version")
    if version == current_version:
        return None
    if version < current_version:
        raise ConfigRejected("stale-version", "%d < %d" % (version, current_version))
    try:
        cfg = validate(msg.get("config"))
    except ConfigError as e:
        raise ConfigRejected("invalid-config", str(e))
    return version, cfg
