"""Live progress of a fleet run: a ``rich`` table when ``rich`` is installed, plain lines
otherwise (and always when the output is not a terminal, e.g. in CI logs).

What it shows, refreshed about once a second: the simulated time and speed, taps and their
outcomes (accepted, and rejections by reason), top-ups, the outbox depth of every device
(journal records the center has not acknowledged yet), devices online at the center, camera
sites by camera state, and the faults injected so far.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["Progress", "Snapshot"]


@dataclass
class Snapshot:
    sim_time: str = ""
    speed: float = 0.0
    elapsed_s: float = 0.0
    moves_done: int = 0
    moves_total: int = 0
    taps: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    no_answer: int = 0
    topups: int = 0
    topups_refused: int = 0
    outbox: dict[str, int] = field(default_factory=dict)
    online: int = 0
    devices: int = 0
    sites: dict[str, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    phase: str = ""

    def line(self) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in self.rejected.most_common(4)) or "none"
        depth = sum(self.outbox.values())
        deepest = max(self.outbox.items(), key=lambda kv: kv[1], default=("-", 0))
        sites = ", ".join(f"{k}:{v}" for k, v in sorted(self.sites.items())) or "-"
        return (f"[{self.phase}] {self.sim_time} x{self.speed:.0f} "
                f"moves {self.moves_done}/{self.moves_total} | taps {self.taps} ok "
                f"{self.accepted} rejected: {rejected} | no answer {self.no_answer} | top-ups "
                f"{self.topups} | outbox {depth} (max {deepest[0]} {deepest[1]}) | online "
                f"{self.online}/{self.devices} | sites {sites} | faults {len(self.faults)}")


class Progress:
    """Polls ``collect()`` every ``period_s`` and shows it until :meth:`stop`."""

    def __init__(self, collect: Callable[[], Snapshot], *, out: TextIO | None = None,
                 period_s: float = 1.0, plain_every_s: float = 5.0, enabled: bool = True,
                 use_rich: bool | None = None) -> None:
        self.collect = collect
        self.out = out or sys.stdout
        self.period_s = period_s
        self.plain_every_s = plain_every_s
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        if use_rich is None:
            use_rich = bool(getattr(self.out, "isatty", lambda: False)())
        self._rich = bool(use_rich) and importlib.util.find_spec("rich") is not None

    def start(self) -> Progress:
        if not self.enabled:
            return self
        if self._rich:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.out), refresh_per_second=2,
                              transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._run, name="fleet-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._live is not None:
            self._show(self._safe_collect())
            self._live.stop()
            self._live = None

    def _safe_collect(self) -> Snapshot | None:
        try:
            return self.collect()
        except Exception as exc:  # progress must never break a run
            self.out.write(f"(progress unavailable: {exc})\n")
            return None

    def _run(self) -> None:
        waited = self.plain_every_s
        while not self._stop.wait(self.period_s):
            waited += self.period_s
            if self._live is None and waited < self.plain_every_s:
                continue
            waited = 0.0
            snap = self._safe_collect()
            if snap is not None:
                self._show(snap)

    def _show(self, snap: Snapshot | None) -> None:
        if snap is None:
            return
        if self._live is not None:
            self._live.update(self._table(snap))
        else:
            self.out.write(snap.line() + "\n")
            self.out.flush()

    @staticmethod
    def _table(snap: Snapshot) -> Any:
        from rich.table import Table

        top = Table.grid(padding=(0, 2))
        top.add_row(f"[bold]{snap.phase}[/]", f"simulated {snap.sim_time} (x{snap.speed:.0f})",
                    f"moves {snap.moves_done}/{snap.moves_total}",
                    f"devices online {snap.online}/{snap.devices}")
        taps = Table(title="Taps", show_header=True, expand=False)
        taps.add_column("outcome", no_wrap=True)
        taps.add_column("count", justify="right", no_wrap=True)
        taps.add_row("accepted", str(snap.accepted))
        for reason, n in snap.rejected.most_common(8):
            taps.add_row(reason, str(n))
        taps.add_row("no answer", str(snap.no_answer))
        taps.add_row("top-ups (refused)", f"{snap.topups} ({snap.topups_refused})")
        outbox = Table(title="Outbox depth", show_header=True)
        outbox.add_column("device", no_wrap=True)
        outbox.add_column("records", justify="right", no_wrap=True)
        for dev, depth in sorted(snap.outbox.items(), key=lambda kv: -kv[1])[:10]:
            outbox.add_row(dev, str(depth))
        sites = Table(title="Camera sites", show_header=True)
        sites.add_column("site", no_wrap=True)
        sites.add_column("state", no_wrap=True)
        for site, state in sorted(snap.sites.items()):
            sites.add_row(site, state)
        faults = Table(title="Faults", show_header=False)
        faults.add_column("fault")
        for f in snap.faults[-8:]:
            faults.add_row(f)
        row1 = Table.grid(padding=(0, 2))
        row1.add_row(taps, outbox)
        row2 = Table.grid(padding=(0, 2))
        row2.add_row(sites, faults)
        outer = Table.grid()
        outer.add_row(top)
        outer.add_row(row1)
        outer.add_row(row2)
        return outer
