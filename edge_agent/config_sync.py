"""Configuration sync: signed, retained bundles from the center applied to the device database.

The agent subscribes to ``afc/v1/cfg/+`` (the fleet) and ``afc/v1/cfg/+/{id}`` (this device).
For each message :class:`ConfigSync`:

1. checks the topic (a known kind; the device part, if any, is this device) and decodes the
   bundle with :func:`~edge_agent.protocol.decode_bundle` against the **pinned center key**
   (forged, expired, malformed or aimed at another device: refused);
2. checks the bundle's kind matches the topic's (a valid bundle replayed on another topic is
   refused) and that its version is **newer** than the one in force (rollback refused);
3. applies it atomically through the store that owns it: ``blacklist`` (full list),
   ``blacklist-delta`` (the overlay; its ``base`` must be the version in force), ``actions``,
   and, in the ``config`` store, ``fares`` (the tariff must load), ``credit`` and ``agent``
   (only the sections the center may change, :data:`~edge_agent.settings.REMOTE_SECTIONS`);
4. records the result as a device event: ``cfg-applied``, ``cfg-rejected`` (reason given) or,
   for a delta whose base is not the version in force, ``cfg-reload-request`` with the kind
   to reload (``blacklist``) and the version held; the center answers with a full bundle.

Retained bundles arrive again at every (re)subscription. A bundle whose version is the one
in force is the normal case and is ignored silently, and so is one the delta chain has
superseded (the retained full list the deltas in force build on, an old retained delta). An
identical payload is recognised by its hash before any signature work (a million-entry
blacklist is not decoded again at every reconnection). A stale or bad bundle is reported once
per process, not at every reconnection.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.stores import (
    KIND_AGENT,
    KIND_CREDIT,
    KIND_FARES,
    DeltaChainBroken,
    DeviceDatabase,
    StaleVersion,
    StoreError,
)
from firmware.stores.errors import InvalidRecord, StoreUnavailable

from . import protocol
from .errors import AgentConfigError, Expired, ProtocolError, SignatureInvalid
from .settings import AgentSettings

__all__ = [
    "EVENT_APPLIED",
    "EVENT_REJECTED",
    "EVENT_RELOAD",
    "ConfigSync",
    "Incoming",
    "SyncResult",
    "current_version",
    "parse_bundle_topic",
]

log = logging.getLogger("afc.agent.config")

EVENT_APPLIED = "cfg-applied"
EVENT_REJECTED = "cfg-rejected"
EVENT_RELOAD = "cfg-reload-request"

APPLIED = "applied"
SAME = "same"  # the version in force, retained again: nothing to do
STALE = "stale"
REJECTED = "rejected"
RELOAD = "reload"
DUPLICATE = "duplicate"  # the very payload already handled in this process
UNAVAILABLE = "unavailable"  # the database could not take it now; retried at the next resync
#: Older than the version in force, but by the normal course of the delta chain, not a
#: rollback: the retained full list the deltas in force build on, or a delta a later list
#: replaced. Ignored silently like SAME (it would otherwise be reported at every restart).
SUPERSEDED = "superseded"
#: Distinct refusals reported as events per process (more are only logged).
_MAX_REPORTED = 256


@dataclass(frozen=True)
class Incoming:
    """A bundle that passed decoding, with where it came from (for de-duplication)."""

    topic: str
    digest: str
    bundle: protocol.Bundle


@dataclass(frozen=True)
class SyncResult:
    """What became of one bundle message."""

    outcome: str
    kind: str | None = None
    version: int | None = None
    reason: str | None = None


def parse_bundle_topic(topic: str, device_id: str) -> tuple[str, str | None]:
    """``(kind, target)`` of a configuration topic addressed to this device or the fleet."""
    kind, target = protocol.parse_cfg_topic(topic)
    if target is not None and target != device_id:
        raise ProtocolError(f"configuration topic {topic!r} is for another device")
    return kind, target


def current_version(db: DeviceDatabase, kind: str) -> int:
    """The version of ``kind`` in force on this device (0: none yet)."""
    if kind in ("blacklist", "blacklist-delta"):
        return db.blacklist.version
    if kind == "actions":
        return db.actions.version
    return db.config.version(kind)


class ConfigSync:
    """Decode, check and apply bundles for one device; see the module doc.

    ``decode`` runs where the message arrives (CPU only); ``apply`` runs in the thread that
    owns ``db``. ``on_agent_settings`` is called (in that thread) with the new remote
    settings after an ``agent`` bundle is applied.
    """

    def __init__(
        self,
        device_id: str,
        center_public: Ed25519PublicKey,
        settings: AgentSettings,
        *,
        on_agent_settings: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self._center = center_public
        self._settings = settings
        self._on_agent_settings = on_agent_settings
        self._seen: dict[str, str] = {}  # topic -> sha256 of the last payload handled
        self._reported: set[tuple[str, str, int | None, str]] = set()

    def forget(self) -> None:
        """Forget what was handled (``resync-config``): the next retained copies are
        decoded and checked again, and rejections reported again."""
        self._seen.clear()
        self._reported.clear()

    # -- decode (no database) -------------------------------------------------------------------

    def decode(self, topic: str, payload: bytes, now_ms: int) -> Incoming | SyncResult:
        """The bundle in this message, or the :class:`SyncResult` that ends it here."""
        if not payload:  # a retained bundle being cleared
            return SyncResult(DUPLICATE, reason="empty payload (retained message cleared)")
        digest = hashlib.sha256(payload).hexdigest()
        if self._seen.get(topic) == digest:
            return SyncResult(DUPLICATE)
        try:
            topic_kind, _target = parse_bundle_topic(topic, self.device_id)
            bundle = protocol.decode_bundle(
                payload, self._center, now_ms=now_ms, device_id=self.device_id
            )
            if bundle.kind != topic_kind:
                raise ProtocolError(
                    f"a {bundle.kind} bundle published on the {topic_kind} topic"
                )
        except SignatureInvalid as exc:
            return self._rejected(topic, digest, None, None, f"signature: {exc}")
        except Expired as exc:
            return self._rejected(topic, digest, None, None, f"expired: {exc}")
        except ProtocolError as exc:
            return self._rejected(topic, digest, None, None, f"malformed: {exc}")
        return Incoming(topic, digest, bundle)

    def _rejected(
        self, topic: str, digest: str, kind: str | None, version: int | None, reason: str
    ) -> SyncResult:
        self._seen[topic] = digest
        log.warning("dev=%s configuration on %s refused: %s", self.device_id, topic, reason)
        return SyncResult(REJECTED, kind, version, reason)

    # -- apply (database thread) ------------------------------------------------------------------

    def apply(self, db: DeviceDatabase, incoming: Incoming) -> SyncResult:
        """Apply a decoded bundle atomically and record the outcome as an event."""
        bundle, topic = incoming.bundle, incoming.topic
        kind, version = bundle.kind, bundle.version
        try:
            result = self._apply(db, bundle)
        except StoreUnavailable as exc:
            # Not the bundle's fault: do not remember it, so a resync retries it.
            log.warning("dev=%s %s bundle %d not applied now: %s", self.device_id, kind,
                        version, exc)
            return SyncResult(UNAVAILABLE, kind, version, str(exc))
        self._seen[topic] = incoming.digest
        self._report(db, topic, result)
        return result

    def _apply(self, db: DeviceDatabase, bundle: protocol.Bundle) -> SyncResult:
        kind, version, body = bundle.kind, bundle.version, bundle.body
        current = current_version(db, kind)
        if kind == "blacklist-delta" and version < current:
            return SyncResult(SUPERSEDED, kind, version, f"a later list ({current}) is in force")
        if kind != "blacklist-delta":
            if version == current:
                return SyncResult(SAME, kind, version)
            if version < current:
                if kind == "blacklist" and version == db.blacklist.base_version:
                    return SyncResult(SUPERSEDED, kind, version,
                                      f"the full list deltas up to {current} build on")
                return SyncResult(STALE, kind, version, f"version {version} is older than "
                                  f"{current} in force (rollback refused)")
        try:
            if kind == "blacklist":
                count = db.blacklist.load_full(version, body["entries"])
                return SyncResult(APPLIED, kind, version, f"{count} cards")
            if kind == "blacklist-delta":
                if version == current:
                    return SyncResult(SAME, kind, version)
                db.blacklist.apply_delta(
                    int(bundle.base or 0), version, body["add"], body["remove"]
                )
                return SyncResult(APPLIED, kind, version)
            if kind == "actions":
                pending = db.actions.replace_all(version, body["actions"])
                return SyncResult(APPLIED, kind, version, f"{pending} pending")
            if kind == KIND_FARES:
                db.config.put(KIND_FARES, version, body["toml"].encode("utf-8"))
                return SyncResult(APPLIED, kind, version, body.get("name"))
            if kind == KIND_CREDIT:
                text = json.dumps(body["allowance"], sort_keys=True, separators=(",", ":"))
                db.config.put(KIND_CREDIT, version, text.encode("utf-8"))
                return SyncResult(APPLIED, kind, version)
            if kind == KIND_AGENT:
                overrides = body["settings"]
                self._settings.with_remote(overrides)  # refuses unknown or unsafe settings
                text = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
                db.config.put(KIND_AGENT, version, text.encode("utf-8"))
                if self._on_agent_settings is not None:
                    self._on_agent_settings(overrides)
                return SyncResult(APPLIED, kind, version)
        except StaleVersion as exc:
            if exc.offered == exc.current:
                return SyncResult(SAME, kind, version)
            return SyncResult(STALE, kind, version, f"{exc} (rollback refused)")
        except DeltaChainBroken as exc:
            return SyncResult(RELOAD, kind, version,
                              f"delta on {exc.from_version}, {exc.current} in force")
        except StoreUnavailable:
            raise
        except (StoreError, AgentConfigError, KeyError, TypeError, ValueError,
                UnicodeError) as exc:
            return SyncResult(REJECTED, kind, version, f"not applicable: {exc}")
        return SyncResult(REJECTED, kind, version, f"unknown bundle kind {kind!r}")

    def _report(self, db: DeviceDatabase, topic: str, result: SyncResult) -> None:
        """Log the outcome and raise the matching event (rejections once per process)."""
        kind, version = result.kind, result.version
        if result.outcome == SAME:
            log.debug("dev=%s %s version %s already in force", self.device_id, kind, version)
            return
        if result.outcome == SUPERSEDED:
            log.debug("dev=%s %s version %s superseded: %s", self.device_id, kind, version,
                      result.reason)
            return
        if result.outcome == APPLIED:
            log.info("dev=%s %s version %s applied (%s)", self.device_id, kind, version,
                     result.reason or "ok")
            self._event(db, EVENT_APPLIED, "info",
                        {"kind": kind, "version": version, "topic": topic})
            return
        key = (result.outcome, str(kind), version, topic + "|" + (result.reason or "")[:60])
        if key in self._reported:
            return
        if len(self._reported) >= _MAX_REPORTED:  # a flood of distinct bad bundles: log only
            log.warning("dev=%s %s bundle refused (not reported again): %s", self.device_id,
                        kind, result.reason)
            return
        self._reported.add(key)
        if result.outcome == RELOAD:
            held = db.blacklist.version
            log.warning("dev=%s %s version %s breaks the delta chain (%s): requesting a full "
                        "reload", self.device_id, kind, version, result.reason)
            self._event(db, EVENT_RELOAD, "warning",
                        {"kind": "blacklist", "version": held, "offered": version,
                         "delta_kind": kind})
            return
        log.warning("dev=%s %s version %s refused: %s", self.device_id, kind, version,
                    result.reason)
        self._event(db, EVENT_REJECTED, "warning",
                    {"kind": kind, "version": version, "reason": (result.reason or "")[:300],
                     "topic": topic})

    def report_rejection(self, db: DeviceDatabase, topic: str, result: SyncResult) -> None:
        """Record a refusal found while decoding (signature, expiry, format) as an event."""
        self._report(db, topic, result)

    def _event(self, db: DeviceDatabase, event: str, severity: str,
               detail: Mapping[str, Any]) -> None:
        try:
            db.events.raise_event(event, severity, detail)
        except (StoreError, InvalidRecord) as exc:
            log.error("dev=%s could not record event %s: %s", self.device_id, event, exc)
