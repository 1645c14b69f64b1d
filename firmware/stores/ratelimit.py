"""Rate limiting of card authentication failures, per UID, in bounded memory.

A card that fails MIFARE authentication again and again is someone probing keys (or a
foreign card held to the reader). After ``max_failures`` failures within ``window_s``
seconds its UID is blocked for ``block_s`` seconds: the validator refuses it without
touching the card, which also keeps the door moving.

Kept in memory, not in SQLite: it is written on the tap path for every failure, it needs no
durability (a reboot clearing it costs an attacker a reboot of a bus validator, which takes
longer than the block), and journaling each failure would wear the flash for nothing (the
rejection itself is journaled by the validator). Memory is bounded: at most
``max_entries`` UIDs are tracked, each with at most ``max_failures`` timestamps; the least
recently failing UID is forgotten first. Evicting a blocked UID would take ``max_entries``
other cards failing in the meantime: thousands of physical taps, far longer than a block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["AuthFailureLimiter"]


@dataclass(slots=True)
class _Track:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = float("-inf")


class AuthFailureLimiter:
    """Blocks a UID after too many authentication failures in a sliding window.

    ``now`` is a monotonic clock in seconds (``time.monotonic()``), given by the caller so
    tests and the sans-I/O core stay clock-free.
    """

    def __init__(
        self,
        *,
        max_failures: int = 5,
        window_s: float = 60.0,
        block_s: float = 300.0,
        max_entries: int = 4096,
    ) -> None:
        if max_failures < 1 or window_s <= 0 or block_s <= 0 or max_entries < 1:
            raise ValueError("rate-limit parameters must be positive")
        self.max_failures = max_failures
        self.window_s = window_s
        self.block_s = block_s
        self.max_entries = max_entries
        self._tracks: OrderedDict[bytes, _Track] = OrderedDict()

    def note_auth_failure(self, uid: bytes, now: float) -> bool:
        """Count one failure of ``uid`` at ``now``; returns True if the UID is now blocked."""
        key = bytes(uid)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(deque(maxlen=self.max_failures))
            while len(self._tracks) > self.max_entries:
                self._tracks.popitem(last=False)
        else:
            self._tracks.move_to_end(key)
        if now < track.blocked_until:
            return True
        failures = track.failures
        failures.append(now)
        if len(failures) == self.max_failures and now - failures[0] <= self.window_s:
            track.blocked_until = now + self.block_s
            failures.clear()
            return True
        return False

    def auth_blocked(self, uid: bytes, now: float) -> bool:
        """True while ``uid`` is blocked; a UID whose block and failures expired is dropped."""
        key = bytes(uid)
        track = self._tracks.get(key)
        if track is None:
            return False
        if now < track.blocked_until:
            return True
        if not track.failures or now - track.failures[-1] > self.window_s:
            del self._tracks[key]  # nothing left that could count: forget it early
        return False

    def clear(self, uid: bytes) -> None:
        """Forget ``uid`` (e.g. after a successful authentication, if policy wants that)."""
        self._tracks.pop(bytes(uid), None)

    def __len__(self) -> int:
        return len(self._tracks)
