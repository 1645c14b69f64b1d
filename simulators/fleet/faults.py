"""The fault schedule of a run: what breaks, where and when — all drawn from the seed.

Each fault happens at a real-time offset from the start of the day, between 10 % and 80 %
of it (so the fleet has something to deliver before and time to recover after), on a
device drawn from the fleet. A fault with a duration (a partition, a full disk, a camera
down) runs in its own thread; every wait is bounded and ends early when the run stops.

Faults that belong to a rider's move rather than to an instant — the power cut in the
middle of a card write, the clone and the rollback — are planned with the riders
(:mod:`.riders`) and executed by the runner at that move.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulators.bus_day import local_time

from .riders import Fleet, RiderDay
from .scenario import Scenario

__all__ = ["FaultItem", "FaultSchedule", "plan_faults"]

log = logging.getLogger("afc.fleet.faults")


@dataclass(frozen=True)
class FaultItem:
    at_s: float  # real seconds after the day starts
    name: str
    action: Callable[[Any], None]  # called with the runner


@dataclass
class FaultSchedule:
    items: list[FaultItem] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [f"+{i.at_s:5.1f} s {i.name}" for i in sorted(self.items, key=lambda i: i.at_s)]

    def run(self, runner: Any) -> None:
        """Start each fault at its time (from the runner's clock); return when all ended."""
        start = runner.clock.real0
        for item in sorted(self.items, key=lambda i: i.at_s):
            delay = start + item.at_s - time.time()
            if delay > 0 and self._stop.wait(delay):
                break

            def body(item: FaultItem = item) -> None:
                try:
                    item.action(runner)
                except Exception as exc:  # a fault that could not be injected is reported
                    log.error("fault %s could not be injected: %s", item.name, exc)
                    self.errors.append(f"{item.name}: {exc}")

            thread = threading.Thread(target=body, name=f"fault-{item.name}", daemon=True)
            thread.start()
            self.threads.append(thread)
        for thread in self.threads:
            thread.join(120)

    def stop(self) -> None:
        """No new fault starts; the running ones finish their (bounded) course."""
        self._stop.set()


def plan_faults(scenario: Scenario, fleet: Fleet, day: RiderDay,
                rng: random.Random) -> FaultSchedule:
    f = scenario.faults
    span = scenario.duration_s
    validators = [s.device_id for s in fleet.validators]
    devices = validators + [b.device_id for b in fleet.bayis]
    buses = sorted(fleet.buses())
    items: list[FaultItem] = []

    def at() -> float:
        return rng.uniform(0.1, 0.8) * span

    for _ in range(f.kill_validator):
        name = rng.choice(validators)
        items.append(FaultItem(at(), f"kill -9 {name}", lambda r, n=name: r.kill_app(n)))
    for _ in range(f.kill_agent):
        name = rng.choice(devices)
        items.append(FaultItem(at(), f"kill -9 agent of {name}",
                               lambda r, n=name: r.kill_agent(n)))
    if scenario.center_workers:
        for _ in range(f.kill_center_worker):
            items.append(FaultItem(at(), "kill -9 center worker",
                                   lambda r: r.kill_center_worker()))
    for _ in range(f.broker_restart):
        if not scenario.broker_url:
            items.append(FaultItem(at(), "broker restart",
                                   lambda r: r.restart_broker(f.broker_down_s)))
    for i in range(f.partition):
        bus = rng.choice(buses)
        how = "blackhole" if i % 2 == 0 else "drop"
        items.append(FaultItem(at(), f"partition bus {bus} ({how})",
                               lambda r, b=bus, h=how: r.partition(b, f.partition_s, h)))
    day_start = local_time(scenario.day, *map(int, scenario.start.split(":")))
    speed = scenario.speed

    def busiest(start_s: float, seconds: float) -> str:
        """The validator with the most taps planned in [start, start + seconds] (real):
        a full disk nobody taps on proves nothing."""
        lo = day_start + start_s * speed
        hi = lo + seconds * speed
        counts = {v: 0 for v in validators}
        for e in day.events:
            if e.device in counts and lo <= e.time <= hi:
                counts[e.device] += 1
        return max(sorted(counts), key=lambda v: counts[v])

    for _ in range(f.disk_full):
        when = at()
        name = busiest(when, f.disk_full_s)
        items.append(FaultItem(when, f"disk full {name}",
                               lambda r, n=name: r.disk_full(n, f.disk_full_s)))
    for _ in range(f.clock_back):
        name = rng.choice(validators)
        items.append(FaultItem(at(), f"clock back {name}",
                               lambda r, n=name: r.clock_back(n, f.clock_back_s)))
    sites = [f"site-{i:03d}" for i in range(1, scenario.camera_sites + 1)]
    for _ in range(f.kill_site):
        if sites:
            site = rng.choice(sites)
            items.append(FaultItem(at(), f"power cut {site}", lambda r, s=site: r.kill_site(s)))
    for site in sites:
        for k in range(f.camera_faults):
            when = (0.15 + 0.6 * (k + 0.5) / f.camera_faults) * span
            items.append(FaultItem(when, f"camera fault {site}",
                                   lambda r, s=site: r.camera_fault(s, 3.0)))
    # blacklist deltas spread over the day, each before its victim's later journeys
    for k, victim in enumerate(day.victims):
        when = (0.2 + 0.5 * (k + 0.5) / max(1, len(day.victims))) * span
        items.append(FaultItem(when, "blacklist delta",
                               lambda r, v=victim: r.blacklist_delta(r.plans[v].card_number)))
    return FaultSchedule(items)
