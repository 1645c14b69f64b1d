"""Signing and publishing configuration bundles, with their version history.

Each bundle is signed with the center key (:func:`edge_agent.protocol.encode_bundle`), kept
in the store's history, and published **retained** on ``afc/v1/cfg/{kind}`` (the fleet) or
``afc/v1/cfg/{kind}/{device}`` (one device), QoS 1: a device that connects later, or comes
back after a week offline, receives the newest bundle of every kind from the broker at once.

The blacklist is a chain: a full list at version F, then deltas F+1, F+2... each with
``base`` = the previous version; full lists and deltas share one version sequence. A device
whose version is not a delta's base (it missed one) asks for a reload; :meth:`republish_full`
then publishes a full list at the *current* version, composed from the last full list and
the deltas after it, so the device can accept it (a re-sent old full list would be refused
as a rollback).

Every ``credit`` bundle signed or published here is also recorded as an *issued allowance*
(:mod:`.dealer`): the reconciliation report checks the dealers' top-ups against them. A credit
bundle whose allowance the center did not sign itself is refused before signing (every
terminal would refuse it too). :meth:`Publisher.issue_allowance` signs a new allowance, its
bundle for the dealer, records and publishes it in one step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol import Bundle, cfg_topic, decode_bundle, encode_bundle

from .errors import CenterError
from .store import BundleInfo, CenterStore, now_ms

__all__ = ["PublishFunction", "Publisher", "bundle_topic"]

log = logging.getLogger("afc.center.publisher")

#: ``publish(topic, payload, retain)``: QoS 1, awaited until the broker has it.
PublishFunction = Callable[[str, bytes, bool], Awaitable[None]]
BlacklistState = dict[int, tuple[int, bytes | None]]

_BLACKLIST_KINDS = ("blacklist", "blacklist-delta")


def bundle_topic(bundle: Bundle) -> str:
    """Where a bundle is published: ``cfg/{kind}`` or ``cfg/{kind}/{target}``."""
    return cfg_topic(bundle.kind, bundle.target)


class Publisher:
    """Builds, records and publishes bundles. ``publish`` may be None for signing only."""

    def __init__(
        self,
        store: CenterStore,
        center_key: Ed25519PrivateKey,
        publish: PublishFunction | None = None,
    ) -> None:
        self.store = store
        self.center_key = center_key
        self._publish = publish

    # -- versions ----------

    def _history(self, kind: str, target: str | None) -> list[BundleInfo]:
        kinds = _BLACKLIST_KINDS if kind in _BLACKLIST_KINDS else (kind,)
        out = [info for k in kinds for info in self.store.bundles(k, target)]
        return sorted(out, key=lambda info: (info.version, info.full))  # a full list last

    def current_version(self, kind: str, target: str | None = None) -> int:
        """The newest version of ``kind`` (blacklist kinds share one sequence); 0 if none."""
        history = self._history(kind, target)
        return history[-1].version if history else 0

    # -- signing ----------

    def sign(
        self,
        kind: str,
        body: Any,
        *,
        version: int | None = None,
        base: int | None = None,
        target: str | None = None,
        expires: int | None = None,
    ) -> bytes:
        """Sign a bundle and record it in the history; ``version`` defaults to the next one.

        A version not newer than the current one is refused here already: devices would
        refuse it as a rollback.
        """
        current = self.current_version(kind, target)
        if version is None:
            version = current + 1
        if version <= current:
            raise CenterError(
                f"{kind} version {version} is not newer than the published {current}: devices "
                "would refuse it as a rollback"
            )
        bundle = Bundle(kind, version, body, now_ms(), base, target, expires)
        if kind == "credit":  # checked before signing: devices would refuse a bad allowance
            from .dealer import allowance_info

            allowance_info(body["allowance"], self.center_key.public_key())
        payload = encode_bundle(bundle, self.center_key)
        if kind == "credit":
            self._record_credit(bundle)
        self.store.add_bundle(
            BundleInfo(kind, target, version, base, bundle.ts, kind != "blacklist-delta",
                       payload, None)
        )
        log.info("signed bundle kind=%s version=%d base=%s target=%s bytes=%d", kind, version,
                 base, target, len(payload))
        return payload

    async def publish_payload(self, payload: bytes) -> Bundle:
        """Publish a signed bundle (from :meth:`sign` or a file) retained on its topic, after
        checking it verifies against this center's key."""
        if self._publish is None:
            raise CenterError("this publisher has no broker connection")
        bundle = decode_bundle(payload, self.center_key.public_key(), now_ms=now_ms())
        if bundle.kind == "credit":
            self._record_credit(bundle)  # before it goes out: never a grant not on record
        await self._publish(bundle_topic(bundle), payload, True)
        self.store.add_bundle(
            BundleInfo(bundle.kind, bundle.target, bundle.version, bundle.base, bundle.ts,
                       bundle.kind != "blacklist-delta", payload, now_ms())
        )
        log.info("published bundle kind=%s version=%d target=%s", bundle.kind, bundle.version,
                 bundle.target)
        return bundle

    async def publish(self, kind: str, body: Any, **options: Any) -> Bundle:
        """Sign the next version of ``kind`` and publish it."""
        return await self.publish_payload(self.sign(kind, body, **options))

    # -- dealer credit ----------

    def _record_credit(self, bundle: Bundle, daily_limit: int | None = None) -> None:
        from .dealer import record_credit_bundle

        record_credit_bundle(self.store, bundle, self.center_key.public_key(),
                             daily_limit=daily_limit)

    def sign_allowance(
        self,
        dealer_id: str,
        allowance_id: str,
        amount: int,
        valid_from: int,
        valid_until: int,
        *,
        daily_limit: int | None = None,
    ) -> bytes:
        """Sign a credit allowance (``firmware.apps.topup.CreditAllowance``, Unix seconds,
        kuruş) and its ``credit`` bundle for the dealer's terminal, and record it as issued
        (with the dealer's per-day limit, kuruş, when given). Returns the signed bundle."""
        from dataclasses import replace

        from firmware.apps.topup import CreditAllowance

        unsigned = CreditAllowance(dealer_id, allowance_id, amount, valid_from, valid_until,
                                   b"")
        credit = replace(unsigned, signature=self.center_key.sign(unsigned.signed_bytes()))
        body = {"allowance": json.loads(credit.to_json())}
        payload = self.sign("credit", body, target=dealer_id)
        if daily_limit is not None:
            self._record_credit(decode_bundle(payload, self.center_key.public_key(), now_ms=0),
                                daily_limit)
        return payload

    async def issue_allowance(
        self,
        dealer_id: str,
        allowance_id: str,
        amount: int,
        valid_from: int,
        valid_until: int,
        *,
        daily_limit: int | None = None,
    ) -> Bundle:
        """:meth:`sign_allowance`, then publish the bundle retained for the dealer."""
        return await self.publish_payload(self.sign_allowance(
            dealer_id, allowance_id, amount, valid_from, valid_until, daily_limit=daily_limit))

    # -- the blacklist chain ----------

    def blacklist_state(self, target: str | None = None) -> tuple[int, BlacklistState]:
        """(version, card -> (reason, uid)): the last full list with its deltas applied."""
        history = self._history("blacklist", target)
        fulls = [i for i, info in enumerate(history) if info.full]
        if not fulls:
            return 0, {}
        start = fulls[-1]
        public = self.center_key.public_key()
        full = decode_bundle(history[start].payload, public, now_ms=0)
        state: BlacklistState = {card: (reason, uid) for card, reason, uid in
                                 full.body["entries"]}
        version = full.version
        for info in history[start + 1:]:
            if info.full or info.version <= version:
                continue
            delta = decode_bundle(info.payload, public, now_ms=0)
            if delta.base != version:
                raise CenterError(f"blacklist history is broken: delta {delta.version} has base "
                                  f"{delta.base}, the chain is at {version}")
            for card in delta.body["remove"]:
                state.pop(card, None)
            for card, reason, uid in delta.body["add"]:
                state[card] = (reason, uid)
            version = delta.version
        return version, state

    async def publish_blacklist_full(
        self, entries: Iterable[tuple[int, int, bytes | None]], *, target: str | None = None
    ) -> Bundle:
        """A full list at the next version: the new base of the delta chain."""
        items = sorted(entries, key=lambda e: e[0])
        return await self.publish("blacklist", {"entries": items}, target=target)

    async def publish_blacklist_delta(
        self,
        add: Iterable[tuple[int, int, bytes | None]] = (),
        remove: Iterable[int] = (),
        *,
        target: str | None = None,
    ) -> Bundle:
        """The next delta on the chain (``base`` = the current version)."""
        current = self.current_version("blacklist", target)
        if current == 0:
            raise CenterError("publish a full blacklist before any delta")
        body = {"add": sorted(add, key=lambda e: e[0]), "remove": sorted(remove)}
        return await self.publish("blacklist-delta", body, base=current, target=target)

    # -- reloads ----------

    async def republish_full(self, kind: str, target: str | None = None) -> Bundle | None:
        """Serve a reload request: publish a full bundle of ``kind`` that a device holding
        any older version accepts. None when nothing of that kind was ever signed."""
        if kind in _BLACKLIST_KINDS:
            history = self._history("blacklist", target)
            if not history and target is not None:
                return await self.republish_full(kind, None)
            if not history:
                return None
            latest = history[-1]
            if latest.full:
                return await self.publish_payload(latest.payload)
            version, state = self.blacklist_state(target)
            entries = sorted((card, reason, uid) for card, (reason, uid) in state.items())
            payload = encode_bundle(
                Bundle("blacklist", version, {"entries": entries}, now_ms(), None, target),
                self.center_key,
            )
            return await self.publish_payload(payload)
        history = self._history(kind, target)
        if not history and target is not None:
            return await self.republish_full(kind, None)
        if not history:
            return None
        return await self.publish_payload(history[-1].payload)

    async def on_reload_request(self, device_id: str, detail: Mapping[str, Any]) -> None:
        """The monitor's hook for a ``cfg-reload-request`` event (``detail.kind``)."""
        kind = detail.get("kind")
        if not isinstance(kind, str):
            log.warning("reload request of dev=%s names no kind: %r", device_id, detail)
            return
        target = device_id if self.store.bundles(kind, device_id) else None
        bundle = await self.republish_full(kind, target)
        log.info("reload request dev=%s kind=%s version=%s: republished %s", device_id, kind,
                 detail.get("version"), None if bundle is None else bundle.version)
