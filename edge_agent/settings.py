"""The agent's settings: ``agent.toml``, read with :mod:`tomllib`, with working defaults.

Only ``[device] id`` and ``[identity] center_public`` have no default: the first names the
device, the second is the pinned key every bundle and command must verify against, and
guessing either would be worse than refusing to start. Relative paths are resolved against
the directory of the TOML file, so a device folder can be moved as a whole. Unknown sections
and keys are refused with a message naming them (a typo such as ``max_recods`` would
otherwise be silently ignored in the field).

The center may change a safe subset at run time with a signed ``agent`` bundle:
:data:`REMOTE_SECTIONS` (batching and telemetry); nothing that could cut the device off
(broker address, TLS files, keys) can be changed remotely.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AgentConfigError

__all__ = [
    "REMOTE_SECTIONS",
    "AgentSettings",
    "BatchSettings",
    "DeviceSettings",
    "IdentitySettings",
    "LogSettings",
    "MqttSettings",
    "TelemetrySettings",
    "load_settings",
    "settings_from_dict",
]

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_KINDS = ("validator", "topup", "camera-site", "gateway")
#: Sections the center may override with a signed ``agent`` bundle.
REMOTE_SECTIONS = ("batch", "telemetry")


@dataclass(frozen=True)
class DeviceSettings:
    """``[device]``: who this device is and where its database lives."""

    id: str = ""
    kind: str = "validator"
    db: Path = Path("device.db")


@dataclass(frozen=True)
class IdentitySettings:
    """``[identity]``: the device's Ed25519 key file and the pinned center public key
    (hex of the 32 raw bytes, or a PEM file)."""

    key: Path = Path("device.key")
    center_public: str = ""


@dataclass(frozen=True)
class MqttSettings:
    """``[mqtt]``: broker, protocol, session and reconnection.

    ``session = "persistent"`` keeps the broker-side session (subscriptions and the QoS 1
    acks and commands sent while the link was down) for ``session_expiry_s``; ``"clean"``
    starts afresh at every connection (see docs/agent.md for the trade-off).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    keepalive: int = 30
    client_id: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session: str = "persistent"
    session_expiry_s: int = 3600
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 10.0

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None


@dataclass(frozen=True)
class BatchSettings:
    """``[batch]``: how the outbox is cut into batches and how many may await an ack.

    ``max_records`` 1000 is 500 taps (an intent and a done each), about 11 kB signed; a
    partial batch leaves when its oldest record is ``max_age_s`` old, so in steady
    service batches are small and this only caps the batches of a backlog, where each
    batch costs a signature, an MQTT round trip, an ack and a center transaction: 1000
    rather than 200 cuts that per-record overhead fivefold when a device drains days of
    offline taps. ``window`` batches may be unacknowledged at once; one unacknowledged for
    ``ack_timeout_s`` is sent again (with those after it).
    """

    max_records: int = 1000
    max_bytes: int = 256 * 1024
    max_age_s: float = 2.0
    window: int = 8
    ack_timeout_s: float = 15.0


@dataclass(frozen=True)
class TelemetrySettings:
    """``[telemetry]``: report period and the disk budget of the offline buffer."""

    interval_s: float = 60.0
    buffer_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class LogSettings:
    """``[log]``: the agent's own log file (``send-logs`` reads it) and its level."""

    file: Path | None = None
    level: str = "info"
    max_bytes: int = 1024 * 1024
    backups: int = 2


@dataclass(frozen=True)
class AgentSettings:
    """Everything in ``agent.toml``; build with :func:`load_settings`."""

    device: DeviceSettings = field(default_factory=DeviceSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.device.id

    @property
    def queue_path(self) -> Path:
        """The agent's telemetry buffer: an SQLite file next to the device database."""
        db = self.device.db
        return db.with_name(db.stem + "-uplink.db")

    @property
    def log_path(self) -> Path:
        """The agent's log file (defaults to ``agent.log`` next to the device database)."""
        return self.log.file or self.device.db.with_name("agent.log")

    def with_remote(self, overrides: Mapping[str, Any]) -> AgentSettings:
        """These settings with a center's ``agent`` bundle applied (only
        :data:`REMOTE_SECTIONS`; anything else is :class:`AgentConfigError`)."""
        if not isinstance(overrides, Mapping):
            raise AgentConfigError("agent settings bundle: 'settings' must be a table")
        bad = sorted(set(overrides) - set(REMOTE_SECTIONS))
        if bad:
            raise AgentConfigError(
                f"agent settings bundle: section(s) {', '.join(bad)} cannot be set remotely "
                f"(allowed: {', '.join(REMOTE_SECTIONS)})"
            )
        changes = {}
        for name, values in overrides.items():
            current = getattr(self, name)
            merged = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
            if not isinstance(values, Mapping):
                raise AgentConfigError(f"agent settings bundle: [{name}] must be a table")
            merged.update(_section(name, values, type(current), base=None))
            changes[name] = type(current)(**merged)
            _check_section(name, changes[name])
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type] = {
    "device": DeviceSettings,
    "identity": IdentitySettings,
    "mqtt": MqttSettings,
    "batch": BatchSettings,
    "telemetry": TelemetrySettings,
    "log": LogSettings,
}
_PATH_FIELDS = {
    ("device", "db"),
    ("identity", "key"),
    ("mqtt", "tls_ca"),
    ("mqtt", "tls_cert"),
    ("mqtt", "tls_key"),
    ("log", "file"),
}


def _section(
    name: str, values: Mapping[str, Any], cls: type, base: Path | None
) -> dict[str, Any]:
    """Type-check one section's values against the dataclass's defaults."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AgentConfigError(
            f"[{name}]: unknown setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    out: dict[str, Any] = {}
    defaults = cls()
    for key, value in values.items():
        default = getattr(defaults, key)
        where = f"[{name}] {key}"
        if (name, key) in _PATH_FIELDS:
            if not isinstance(value, str):
                raise AgentConfigError(f"{where} must be a path (a string)")
            if value == "":
                out[key] = default
                continue
            path = Path(os.path.expanduser(value))
            if base is not None and not path.is_absolute():
                path = base / path
            out[key] = path
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise AgentConfigError(f"{where} must be true or false")
            out[key] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise AgentConfigError(f"{where} must be an integer, got {value!r}")
            out[key] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AgentConfigError(f"{where} must be a number, got {value!r}")
            try:
                out[key] = float(value)
            except OverflowError:  # an integer beyond a float's range (TOML allows it)
                raise AgentConfigError(f"{where} must be a number in range") from None
        else:
            if not isinstance(value, str):
                raise AgentConfigError(f"{where} must be a string, got {value!r}")
            out[key] = value
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AgentConfigError(message)


def _check_section(name: str, s: Any) -> None:
    """Range checks: every value here bounds a loop, a buffer or a wait."""
    if name == "device":
        _require(
            bool(_DEVICE_ID_RE.fullmatch(s.id)),
            "[device] id must be 1 to 64 characters A-Z, a-z, 0-9, '.', '_', '-' "
            f"(got {s.id!r})",
        )
        _require(s.kind in DEVICE_KINDS, f"[device] kind must be one of {DEVICE_KINDS}")
    elif name == "identity":
        _require(
            bool(s.center_public),
            "[identity] center_public is required: the center's Ed25519 public key (hex) or "
            "a PEM file; every bundle and command is checked against it",
        )
    elif name == "mqtt":
        _require(bool(s.host), "[mqtt] host must not be empty")
        _require(1 <= s.port <= 65535, "[mqtt] port must be 1..65535")
        _require(s.protocol in ("5", "3.1.1"), '[mqtt] protocol must be "5" or "3.1.1"')
        _require(5 <= s.keepalive <= 3600, "[mqtt] keepalive must be 5..3600 seconds")
        _require(s.session in ("persistent", "clean"), '[mqtt] session must be "persistent" '
                 'or "clean"')
        _require(0 <= s.session_expiry_s <= 30 * 86400, "[mqtt] session_expiry_s must be "
                 "0..2592000")
        _require(0.01 <= s.backoff_initial_s <= s.backoff_max_s <= 3600,
                 "[mqtt] need 0.01 <= backoff_initial_s <= backoff_max_s <= 3600")
        _require(0.5 <= s.connect_timeout_s <= 120, "[mqtt] connect_timeout_s must be 0.5..120")
        _require(len(s.client_id) <= 128, "[mqtt] client_id may not exceed 128 characters")
        _require(
            s.tls_ca is not None or (s.tls_cert is None and s.tls_key is None),
            "[mqtt] tls_cert/tls_key need tls_ca (the CA that signed the broker's certificate)",
        )
        _require(
            (s.tls_cert is None) == (s.tls_key is None),
            "[mqtt] tls_cert and tls_key go together (the device's client certificate)",
        )
    elif name == "batch":
        _require(1 <= s.max_records <= 10_000, "[batch] max_records must be 1..10000")
        _require(1024 <= s.max_bytes <= 1 << 20, "[batch] max_bytes must be 1024..1048576")
        _require(0 <= s.max_age_s <= 3600, "[batch] max_age_s must be 0..3600 seconds")
        _require(1 <= s.window <= 64, "[batch] window must be 1..64 batches")
        _require(0.2 <= s.ack_timeout_s <= 3600, "[batch] ack_timeout_s must be 0.2..3600")
    elif name == "telemetry":
        _require(0.1 <= s.interval_s <= 86400, "[telemetry] interval_s must be 0.1..86400")
        _require(16 * 1024 <= s.buffer_bytes <= 1 << 30,
                 "[telemetry] buffer_bytes must be 16384..1073741824")
    elif name == "log":
        _require(s.level.lower() in ("debug", "info", "warning", "error"),
                 "[log] level must be debug, info, warning or error")
        _require(16 * 1024 <= s.max_bytes <= 1 << 30, "[log] max_bytes must be 16384..1 GiB")
        _require(0 <= s.backups <= 20, "[log] backups must be 0..20")


def settings_from_dict(data: Mapping[str, Any], *, base: Path | None = None) -> AgentSettings:
    """Build and validate settings from a parsed TOML document; paths relative to ``base``."""
    if not isinstance(data, Mapping):
        raise AgentConfigError("agent settings must be a TOML table")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise AgentConfigError(
            f"unknown section(s) [{'], ['.join(unknown)}] "
            f"(known: {', '.join(_SECTIONS)})"
        )
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, Mapping):
            raise AgentConfigError(f"[{name}] must be a table")
        section = cls(**_section(name, values, cls, base))
        if name == "device" and base is not None and not section.db.is_absolute():
            section = dataclasses.replace(section, db=base / section.db)
        if name == "identity" and base is not None and not section.key.is_absolute():
            section = dataclasses.replace(section, key=base / section.key)
        if (
            name == "identity"
            and base is not None
            and section.center_public
            and not re.fullmatch(r"[0-9a-fA-F]{64}", section.center_public)
            and not Path(section.center_public).is_absolute()
        ):
            section = dataclasses.replace(
                section, center_public=str(base / section.center_public)
            )
        _check_section(name, section)
        built[name] = section
    return AgentSettings(**built)


def load_settings(path: str | os.PathLike[str]) -> AgentSettings:
    """Read and validate ``agent.toml``; any problem is one :class:`AgentConfigError`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgentConfigError(f"agent config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"cannot read agent config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"agent config {path} is not valid TOML: {exc}") from None
    try:
        settings = settings_from_dict(data, base=path.resolve().parent)
    except AgentConfigError as exc:
        raise AgentConfigError(f"{path}: {exc}") from None
    return dataclasses.replace(settings, source=path)
