"""The edge agent's exception hierarchy (protocol, keys, configuration, uplink).

Everything derives from :class:`AgentError`, itself a
:class:`~firmware.core.errors.CoreError`, so ``afc`` prints any of them as one line and a
receive loop catches one type to turn bad input into a logged rejection instead of a crash.
The subclasses say what the receiver does next: drop and log (:class:`ProtocolError` and its
kinds), ignore an old bundle (:class:`StaleBundle`), ask for a full reload
(:class:`ChainBroken`), fix a file (:class:`AgentConfigError`, :class:`KeyFileError`) or retry
later (:class:`UplinkError`).
"""

from __future__ import annotations

from firmware.core.errors import CoreError

__all__ = [
    "AgentConfigError",
    "AgentError",
    "ChainBroken",
    "Expired",
    "KeyFileError",
    "ProtocolError",
    "ReplayRejected",
    "SignatureInvalid",
    "StaleBundle",
    "UnknownDevice",
    "UplinkError",
]


class AgentError(CoreError):
    """Base of every error raised by :mod:`edge_agent`."""


class ProtocolError(AgentError):
    """A message does not follow ``docs/protocol.md``: malformed CBOR/JSON, another protocol
    version, the wrong message type, a bad field, an oversize payload. Log it, drop it."""


class SignatureInvalid(ProtocolError):
    """The message's signature does not verify against the key pinned for its sender:
    forged, corrupted, or signed with a key the receiver does not know (rotated?)."""


class UnknownDevice(ProtocolError):
    """The message names a device that is not in the receiver's registry: register its
    public key (``afc sim center register``) or check the device id in its config."""


class Expired(ProtocolError):
    """The message's ``expires`` time has passed (or the receiver's clock is wrong)."""


class ReplayRejected(ProtocolError):
    """The message was already accepted once (its nonce is not newer than the last one)."""


class StaleBundle(AgentError):
    """A configuration bundle whose version is not newer than the one in force: ignored."""


class ChainBroken(AgentError):
    """A delta bundle's base is not the version the device holds: a full reload is needed."""


class AgentConfigError(AgentError):
    """The agent's or the center's configuration (TOML, options) cannot be used."""


class KeyFileError(AgentConfigError):
    """A key file is missing, malformed, unsafe (readable by others) or would be overwritten."""


class UplinkError(AgentError):
    """The broker cannot be reached or refused us; the caller backs off and retries."""
