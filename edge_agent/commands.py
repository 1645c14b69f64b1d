"""Remote commands on ``afc/v1/dev/{id}/cmd``: authenticated, replay-proof, answered signed.

A command is accepted only if (1) its signature verifies against the pinned center key, (2)
it names this device, (3) it has not expired, and (4) its ``nonce`` is greater than the last
nonce this device accepted. The last nonce is kept in the device database
(``agent_state.cmd_nonce``) and advanced in the same transaction that checks it, so a
recorded command cannot be replayed, not even after a reboot or by a second agent process.

Commands (docs/protocol.md): ``ping``; ``send-logs`` (``since``: Unix ms; the agent's log
lines since then, at most ``max_bytes``, cut with ``next_since`` to continue);
``resync-config`` (subscribe to the configuration topics again, so the broker sends the
retained bundles again, and re-check them all); ``reboot-app`` (answer, then leave the run
loop with :data:`EXIT_REBOOT` so the service manager restarts the agent). The reply is
signed with the device key and published on ``.../reply``. A command that fails the
checks in (2)-(4) gets a refusal reply (its id is known and signed by the center); a forged
or unreadable one is only logged: answering it would let anyone make the device talk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.stores import DeviceDatabase

from . import protocol
from .errors import ReplayRejected
from .logfile import read_log_since

__all__ = [
    "ACTION_REBOOT",
    "ACTION_RESYNC",
    "EXIT_REBOOT",
    "NONCE_KEY",
    "CommandResult",
    "Commands",
]

log = logging.getLogger("afc.agent.commands")

#: The run loop's exit status after ``reboot-app`` (EX_TEMPFAIL): systemd's
#: ``Restart=on-failure`` (or ``RestartForceExitStatus=75``) starts the agent again.
EXIT_REBOOT = 75
NONCE_KEY = "cmd_nonce"
ACTION_RESYNC = "resync-config"
ACTION_REBOOT = "reboot-app"
#: Log bytes one ``send-logs`` reply may carry (the reply must stay under MAX_CMD_BYTES).
DEFAULT_LOG_BYTES = 48 * 1024
MAX_LOG_BYTES = 56 * 1024


@dataclass(frozen=True)
class CommandResult:
    """The reply to publish and what the agent must do after publishing it."""

    reply: protocol.Reply
    action: str | None = None


class Commands:
    """Check and run commands for one device (see the module doc)."""

    def __init__(
        self,
        device_id: str,
        center_public: Ed25519PublicKey,
        device_key: Ed25519PrivateKey,
        log_path: Path,
        *,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.device_id = device_id
        self._center = center_public
        self._key = device_key
        self._log_path = log_path
        self._status = status

    def decode(self, payload: bytes, now_ms: int) -> protocol.Command:
        """Verify a command (signature, device, expiry); raises a ProtocolError subclass."""
        return protocol.decode_command(
            payload, self._center, device_id=self.device_id, now_ms=now_ms
        )

    @staticmethod
    def accept(db: DeviceDatabase, cmd: protocol.Command) -> None:
        """Advance the durable nonce or refuse the command as a replay (database thread)."""
        if not db.config.advance(NONCE_KEY, cmd.nonce):
            last = db.config.state(NONCE_KEY)
            raise ReplayRejected(
                f"command {cmd.id!r} nonce {cmd.nonce} is not newer than {last}: replay refused"
            )

    def refusal(self, cmd: protocol.Command, reason: str, now_ms: int) -> bytes:
        """A signed refusal reply for a command that verified but may not run."""
        return protocol.encode_reply(
            protocol.Reply(self.device_id, cmd.id, False, now_ms, error=reason[:4000]), self._key
        )

    def encode(self, reply: protocol.Reply) -> bytes:
        return protocol.encode_reply(reply, self._key)

    def run(self, cmd: protocol.Command, now_ms: int) -> CommandResult:
        """Execute an accepted command; the reply is built, not sent."""
        name = cmd.name
        try:
            if name == "ping":
                result: dict[str, Any] = {"pong": True}
                if self._status is not None:
                    result.update(self._status())
                return self._ok(cmd, now_ms, result)
            if name == "send-logs":
                return self._ok(cmd, now_ms, self._send_logs(cmd.args))
            if name == "resync-config":
                return CommandResult(self._reply(cmd, now_ms, True, {"resync": True}),
                                     ACTION_RESYNC)
            if name == "reboot-app":
                return CommandResult(self._reply(cmd, now_ms, True, {"exit": EXIT_REBOOT}),
                                     ACTION_REBOOT)
        except (TypeError, ValueError) as exc:
            return CommandResult(self._reply(cmd, now_ms, False, error=f"bad arguments: {exc}"))
        return CommandResult(
            self._reply(cmd, now_ms, False, error=f"unknown command {name!r} "
                        f"(known: {', '.join(protocol.COMMAND_NAMES)})")
        )

    def _send_logs(self, args: Mapping[str, Any]) -> dict[str, Any]:
        since = args.get("since", 0)
        limit = args.get("max_bytes", DEFAULT_LOG_BYTES)
        if type(since) is not int or type(limit) is not int:
            raise ValueError("'since' (Unix ms) and 'max_bytes' must be integers")
        limit = max(1024, min(limit, MAX_LOG_BYTES))
        excerpt = read_log_since(self._log_path, since, limit)
        result: dict[str, Any] = {
            "since": since,
            "lines": excerpt.lines,
            "log": excerpt.text,
            "truncated": excerpt.truncated,
        }
        if excerpt.next_since is not None:
            result["next_since"] = excerpt.next_since
        return result

    def _ok(self, cmd: protocol.Command, now_ms: int, result: Mapping[str, Any]) -> CommandResult:
        return CommandResult(self._reply(cmd, now_ms, True, result))

    def _reply(
        self,
        cmd: protocol.Command,
        now_ms: int,
        ok: bool,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> protocol.Reply:
        return protocol.Reply(self.device_id, cmd.id, ok, now_ms, result, error)
