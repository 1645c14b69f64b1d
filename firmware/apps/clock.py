"""A wall clock that never runs backwards.

Anti-passback windows, transfer windows and passes are all decided on the validator's clock,
and a clock set back (a bad RTC battery, a wrong manual setting, an NTP step) would reopen
windows and make a card pay twice or ride free twice. :class:`GuardedClock` returns
``max(wall time, the latest time it ever returned)``, persists that high-water mark so it
survives a restart, and reports how far the wall clock lags so the agent can raise an alarm.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class GuardedClock:
    def __init__(
        self,
        load: Callable[[], int | None],
        save: Callable[[int], None],
        wall: Callable[[], float] = time.time,
        *,
        save_every: int = 60,
    ) -> None:
        self._wall = wall
        self._save = save
        self._save_every = save_every
        self._high = load() or 0
        self._saved = self._high
        self.set_back_by = 0  # seconds the wall clock is behind the high-water mark

    def now(self) -> int:
        wall = int(self._wall())
        if wall < self._high:
            self.set_back_by = self._high - wall
            return self._high
        self.set_back_by = 0
        self._high = wall
        if wall - self._saved >= self._save_every:
            self.flush()
        return wall

    def flush(self) -> None:
        self._save(self._high)
        self._saved = self._high
