"""Scenario files: what a city's fleet looks like for one run, in TOML, with working defaults.

A scenario names the lines and their buses (1–3 validators each), the bayi terminals, the
camera sites, the riders (how many cards, their habits, the rush-hour profile), the agents'
batching, and the faults to inject. Every key has a default (:data:`DEFAULTS`), so an empty
file is a valid small fleet; an unknown section or key is refused with its name, because a
misspelt fault (``kil_agent = 2``) silently ignored would make a fault suite prove nothing.

Time: the validators and bayi terminals run on a shared simulated clock
(:mod:`.clock`), ``speed`` simulated seconds per real second, so a service day fits in a few
real minutes. The agents, the broker, the center and the camera sites run in real time: their
timers are about the network, not about fares.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from .errors import ScenarioError

__all__ = [
    "DEFAULTS",
    "SCENARIO_DIR",
    "Faults",
    "LineSpec",
    "Scenario",
    "available",
    "load_scenario",
    "scenario_from_dict",
]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

#: Every setting and its default. ``lines`` is a list of tables (``[[lines]]``).
DEFAULTS: dict[str, Any] = {
    "name": "unnamed",
    "description": "",
    "seed": 2026,
    "day": "today",  # the simulated service day: "today" or YYYY-MM-DD
    "time": {
        "start": "06:30",  # local (Europe/Istanbul) time the riders' day starts
        "end": "20:30",
        "duration_s": 90.0,  # real seconds the riders' day takes (sets the speed)
        "drain_timeout_s": 90.0,  # bound on delivering everything once the day is over
    },
    "broker": {"url": ""},  # HOST:PORT of a running broker; empty: a local Mosquitto
    "center": {"workers": 1},
    "lines": [
        {"id": 41, "buses": 2, "validators": 2},
        {"id": 42, "buses": 1, "validators": 1},
    ],
    "bayi": {"terminals": 1, "allowance_tl": 20_000},
    "camera_sites": {"count": 1, "cameras": 3},
    "riders": {
        "cards": 30,
        "journeys": 2.0,  # mean journeys per rider and day
        "transfer": 0.35,  # share of journeys with a transfer to another line
        "double_tap": 0.06,  # share of boardings tapped twice ("did it beep?")
        "topup": 0.7,  # share of low-balance riders who top up at a bayi
        "online_loads": True,  # an online top-up and an online pass wait at validators
        # rush-hour profile: [from, to, weight]; a journey starts in a window with
        # probability weight x length, peaking mid-window
        "rush": [["07:00", "09:00", 3.0], ["09:00", "16:30", 0.6], ["16:30", "19:30", 3.0]],
    },
    "agent": {"max_age_s": 0.3, "window": 8, "ack_timeout_s": 3.0, "max_records": 200},
    "faults": {
        "kill_validator": 0,  # kill -9 of a validator at a seeded instant, restarted after
        "kill_agent": 0,
        "kill_center_worker": 0,
        "kill_site": 0,  # kill -9 of a camera site's firmware (power cut), restarted
        "broker_restart": 0,
        "broker_down_s": 2.0,
        "partition": 0,  # a bus loses its uplink (its proxy blackholes) for partition_s
        "partition_s": 4.0,
        "power_cut": 0,  # a validator killed mid-write, card in the field; restart, re-tap
        "disk_full": 0,  # one validator's database refuses to grow for disk_full_s
        "disk_full_s": 4.0,
        "clock_back": 0,  # one validator's wall clock set back by clock_back_s (simulated)
        "clock_back_s": 300,
        "clone": True,  # a cloned card rides another line while the original rides on
        "rollback": True,  # a card dumped in the morning is written back and tapped again
        "blacklist_deltas": 2,  # blacklist deltas published during the day
        "camera_faults": 1,  # camera down/up and cabinet door open/closed, per site
    },
}


@dataclass(frozen=True)
class LineSpec:
    """One bus line: ``buses`` buses with ``validators`` doors each."""

    id: int
    buses: int
    validators: int


@dataclass(frozen=True)
class Faults:
    kill_validator: int
    kill_agent: int
    kill_center_worker: int
    kill_site: int
    broker_restart: int
    broker_down_s: float
    partition: int
    partition_s: float
    power_cut: int
    disk_full: int
    disk_full_s: float
    clock_back: int
    clock_back_s: int
    clone: bool
    rollback: bool
    blacklist_deltas: int
    camera_faults: int

    @property
    def any_process_fault(self) -> bool:
        return any((self.kill_validator, self.kill_agent, self.kill_center_worker,
                    self.kill_site, self.broker_restart, self.partition, self.power_cut,
                    self.disk_full, self.clock_back))


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario (see :data:`DEFAULTS` for the meaning of every field)."""

    name: str
    description: str
    seed: int
    day: date
    start: str
    end: str
    duration_s: float
    drain_timeout_s: float
    broker_url: str
    center_workers: int
    lines: tuple[LineSpec, ...]
    bayi_terminals: int
    allowance_kurus: int
    camera_sites: int
    cameras_per_site: int
    cards: int
    journeys: float
    transfer: float
    double_tap: float
    topup: float
    online_loads: bool
    rush: tuple[tuple[str, str, float], ...]
    agent: dict[str, float]
    faults: Faults
    source: str = "<defaults>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def validators(self) -> int:
        return sum(line.buses * line.validators for line in self.lines)

    def day_span_s(self) -> int:
        """Simulated seconds from ``start`` to ``end``."""
        return _minutes(self.end, "time.end") * 60 - _minutes(self.start, "time.start") * 60

    @property
    def speed(self) -> float:
        """Simulated seconds per real second."""
        return self.day_span_s() / self.duration_s


def available() -> list[str]:
    """Names of the scenarios shipped in :data:`SCENARIO_DIR`."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """A shipped scenario by name (``demo``, ``ci``, ``soak``) or a TOML file by path;
    ``overrides`` (same shape as the file) win over both."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"no scenario {name_or_path!r}: give a TOML file or one of "
                            f"{', '.join(available())}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    if overrides:
        data = _merge(data, overrides, "", check=False)
    return scenario_from_dict(data, source=str(path))


def scenario_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> Scenario:
    """Validate ``data`` against :data:`DEFAULTS` and build the scenario."""
    try:
        merged = _merge(copy.deepcopy(DEFAULTS), data, "", check=True)
        return _build(merged, source)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any], where: str, *, check: bool) -> dict:
    for key, value in over.items():
        name = f"{where}{key}"
        if check and key not in base:
            raise ScenarioError(f"unknown setting {name!r} (known: {', '.join(sorted(base))})")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            base[key] = _merge(dict(base[key]), value, f"{name}.", check=check)
        elif check and key in base and isinstance(base[key], dict):
            raise ScenarioError(f"{name} must be a table")
        else:
            base[key] = value
    return base


def _minutes(text: Any, what: str) -> int:
    try:
        hours, minutes = str(text).split(":")
        value = int(hours) * 60 + int(minutes)
    except ValueError:
        raise ScenarioError(f"{what} must be HH:MM, not {text!r}") from None
    if not 0 <= value <= 24 * 60:
        raise ScenarioError(f"{what} must be within 00:00..24:00, not {text!r}")
    return value


def _number(section: dict[str, Any], key: str, where: str, lo: float, hi: float,
            kind: type = float) -> Any:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            (kind is int and not isinstance(value, int)):
        raise ScenarioError(f"{where}.{key} must be {'an integer' if kind is int else 'a number'}"
                            f", not {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"{where}.{key} must be within {lo:g}..{hi:g}, not {value!r}")
    return kind(value)


def _flag(section: dict[str, Any], key: str, where: str) -> bool:
    value = section[key]
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}.{key} must be true or false, not {value!r}")
    return value


def _build(d: dict[str, Any], source: str) -> Scenario:
    if d["day"] == "today":
        day = datetime.now().date()
    else:
        try:
            day = date.fromisoformat(str(d["day"]))
        except ValueError:
            raise ScenarioError(f"day must be 'today' or YYYY-MM-DD, not {d['day']!r}") from None
    t = d["time"]
    start, end = _minutes(t["start"], "time.start"), _minutes(t["end"], "time.end")
    if end - start < 60:
        raise ScenarioError("time.end must be at least an hour after time.start")
    lines = []
    if not isinstance(d["lines"], list) or not d["lines"]:
        raise ScenarioError("lines must be a non-empty list of [[lines]] tables")
    for i, item in enumerate(d["lines"]):
        if not isinstance(item, dict) or set(item) - {"id", "buses", "validators"}:
            raise ScenarioError(f"[[lines]] #{i + 1} takes id, buses and validators")
        item = {"buses": 1, "validators": 1, **item}
        if "id" not in item:
            raise ScenarioError(f"[[lines]] #{i + 1} needs an id")
        lines.append(LineSpec(_number(item, "id", f"lines[{i}]", 1, 9999, int),
                              _number(item, "buses", f"lines[{i}]", 1, 50, int),
                              _number(item, "validators", f"lines[{i}]", 1, 3, int)))
    if len({line.id for line in lines}) != len(lines):
        raise ScenarioError("two [[lines]] have the same id")
    r = d["riders"]
    rush = []
    for i, window in enumerate(r["rush"]):
        if not isinstance(window, list) or len(window) != 3:
            raise ScenarioError(f"riders.rush[{i}] must be [\"HH:MM\", \"HH:MM\", weight]")
        a = _minutes(window[0], f"riders.rush[{i}]")
        b = _minutes(window[1], f"riders.rush[{i}]")
        weight = _number({"w": window[2]}, "w", f"riders.rush[{i}]", 0, 1000)
        if b <= a:
            raise ScenarioError(f"riders.rush[{i}] ends before it starts")
        rush.append((str(window[0]), str(window[1]), weight))
    f = d["faults"]
    faults = Faults(
        kill_validator=_number(f, "kill_validator", "faults", 0, 100, int),
        kill_agent=_number(f, "kill_agent", "faults", 0, 100, int),
        kill_center_worker=_number(f, "kill_center_worker", "faults", 0, 100, int),
        kill_site=_number(f, "kill_site", "faults", 0, 100, int),
        broker_restart=_number(f, "broker_restart", "faults", 0, 20, int),
        broker_down_s=_number(f, "broker_down_s", "faults", 0, 60),
        partition=_number(f, "partition", "faults", 0, 100, int),
        partition_s=_number(f, "partition_s", "faults", 0.5, 600),
        power_cut=_number(f, "power_cut", "faults", 0, 100, int),
        disk_full=_number(f, "disk_full", "faults", 0, 100, int),
        disk_full_s=_number(f, "disk_full_s", "faults", 0.5, 600),
        clock_back=_number(f, "clock_back", "faults", 0, 100, int),
        clock_back_s=_number(f, "clock_back_s", "faults", 1, 480, int),
        clone=_flag(f, "clone", "faults"),
        rollback=_flag(f, "rollback", "faults"),
        blacklist_deltas=_number(f, "blacklist_deltas", "faults", 0, 50, int),
        camera_faults=_number(f, "camera_faults", "faults", 0, 20, int),
    )
    a = d["agent"]
    agent = {
        "max_age_s": _number(a, "max_age_s", "agent", 0.01, 60),
        "window": _number(a, "window", "agent", 1, 64, int),
        "ack_timeout_s": _number(a, "ack_timeout_s", "agent", 0.5, 120),
        "max_records": _number(a, "max_records", "agent", 2, 100_000, int),
    }
    broker = d["broker"]["url"]
    if not isinstance(broker, str):
        raise ScenarioError("broker.url must be text (HOST:PORT) or empty")
    scenario = Scenario(
        name=str(d["name"]), description=str(d["description"]),
        seed=_number(d, "seed", "scenario", 0, 2**63, int), day=day,
        start=str(t["start"]), end=str(t["end"]),
        duration_s=_number(t, "duration_s", "time", 5, 7 * 86_400),
        drain_timeout_s=_number(t, "drain_timeout_s", "time", 5, 3600),
        broker_url=broker, center_workers=_number(d["center"], "workers", "center", 0, 16, int),
        lines=tuple(lines),
        bayi_terminals=_number(d["bayi"], "terminals", "bayi", 0, 20, int),
        allowance_kurus=_number(d["bayi"], "allowance_tl", "bayi", 0, 10_000_000, int) * 100,
        camera_sites=_number(d["camera_sites"], "count", "camera_sites", 0, 50, int),
        cameras_per_site=_number(d["camera_sites"], "cameras", "camera_sites", 1, 16, int),
        cards=_number(r, "cards", "riders", 20, 100_000, int),
        journeys=_number(r, "journeys", "riders", 0.5, 6),
        transfer=_number(r, "transfer", "riders", 0, 1),
        double_tap=_number(r, "double_tap", "riders", 0, 0.5),
        topup=_number(r, "topup", "riders", 0, 1),
        online_loads=_flag(r, "online_loads", "riders"),
        rush=tuple(rush), agent=agent, faults=faults, source=source, raw=d,
    )
    if scenario.validators > 60:
        raise ScenarioError(f"{scenario.validators} validators: at most 60 run on one machine")
    if faults.partition and not scenario.lines:
        raise ScenarioError("faults.partition needs a bus")
    return scenario
