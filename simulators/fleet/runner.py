"""A fleet run: every part started as a real process, a day of riders, faults, reconciliation.

:class:`FleetRun` does, in order (each step bounded in time, each failure a one-line
:class:`~.errors.FleetError`):

1. **set up** the run folder: a key store, the cards (seeded), the center's key, one folder
   per device (device key, ``agent.toml``, ``validator.toml``/``bayi.toml``, clock and
   faults files), the devices registry the center loads;
2. **start** Mosquitto (or use the scenario's broker), one TCP link proxy per bus
   (:mod:`.proxy`), the reference center (``afc sim center run``), a PN532 emulator per
   reader (:mod:`.rf`), every validator (``afc validator`` through :mod:`.device`), every
   bayi terminal (``afc topup``), one agent per device (``python -m edge_agent``), the
   camera sites (MicroPython firmware + emulated cameras and cabinet); publish the initial
   blacklist and the online loads as signed bundles, and wait until every device is online
   and has applied them;
3. **ride** the day: every move at its simulated time on the shared clock, a card on one
   reader at a time, while the fault schedule (:mod:`.faults`) kills processes, restarts the
   broker, cuts buses off, fills a disk, sets a clock back, clones and rolls back cards,
   publishes blacklist deltas and breaks cameras;
4. **drain**: heal every fault, stop the validators and terminals, wait until every
   device's journal is acknowledged by the center and every validator holds the newest
   blacklist;
5. **reconcile** (:mod:`.reconcile`): the center's report, every card read back, every
   device database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from firmware.apps.topup import CreditAllowance
from firmware.core.fares import CardType, Reason
from firmware.core.keys import FileKeyStore
from simulators.bus_day import LOCAL_TZ, CardPlan, Event, issue_cards, local_time, standard_cards
from simulators.cards import VirtualCard

from .clock import ClockSetting, write_clock
from .errors import FleetError, InvariantFailed, ProcessFailed
from .faults import FaultSchedule, plan_faults
from .procs import ManagedProcess
from .progress import Progress, Snapshot
from .proxy import LinkProxy
from .reconcile import CardState, DeviceFacts, Reconciliation, device_facts, reconcile
from .rf import RfWorld, read_snapshot
from .riders import Fleet, RiderDay, build_fleet, plan_riders
from .scenario import Scenario

__all__ = ["LOG_LEVELS", "FleetResult", "FleetRun", "run_fleet"]

log = logging.getLogger("afc.fleet")

PY = sys.executable
CLONE = -1  # the clone's key in the card registry
PROBE = -2  # an empty card the fault injector taps at a validator whose disk is full
PROBE_CARD_NUMBER = 39_999_999
#: Seconds a rider waits for the display before walking on (a dead validator shows nothing).
TAP_TIMEOUT_S = 8.0
#: Host writes that make one poll of an empty field (RF off, RF on, list targets).
POLL_WRITES = 3
#: Levels a run's processes can log at (``FleetRun(log_level=...)``).
LOG_LEVELS = ("debug", "info", "warning", "error")
_DISPLAY = re.compile(r"^\[(\w+)\s*\] (.*?)\s*\| (.*?)\s*(beep.*)?$")
_SITE_EVENT = re.compile(r"^I event dev=\S+ event=\S+ seq=(\d+)")
_LOCAL_TEXTS = {  # validator displays that are not a fare-engine reason
    "HİZMET DIŞI": "OUT_OF_SERVICE", "Kart bloke": "CARD_BLOCKED_HERE",
    "Geçersiz kart": "NOT_A_FARE_CARD", "Tekrar okutun": "TAP_AGAIN",
    "Bilet gişesine": "SEE_TICKET_OFFICE", "Kart okunamadı": "RATE_LIMITED",
}


def classify(line: str) -> tuple[bool, str]:
    """(accepted, reason name) of a validator's display line."""
    m = _DISPLAY.match(line)
    text = m.group(2) if m else line
    for reason in Reason:
        if text.startswith(reason.message_tr):
            return reason.accepted, reason.name
    for prefix, name in _LOCAL_TEXTS.items():
        if text.startswith(prefix):
            return False, name
    return False, "OTHER"


# -- devices ------------------------------------------------------------------------------------


@dataclass
class _Device:
    name: str
    kind: str  # validator | topup
    folder: Path
    vehicle: int | None
    app: ManagedProcess
    agent: ManagedProcess
    clock_path: Path
    faults_path: Path
    jobs: queue.Queue = field(default_factory=queue.Queue)
    worker: threading.Thread | None = None
    reader_mode: str = ""

    @property
    def db(self) -> Path:
        return self.folder / "device.db"


@dataclass
class _CardTrack:
    free: threading.Event = field(default_factory=threading.Event)
    where: object = None
    sim_done: float = 0.0
    device: str = ""

    def __post_init__(self) -> None:
        self.free.set()


@dataclass
class FleetResult:
    scenario: Scenario
    workdir: Path
    reconciliation: Reconciliation | None
    stats: dict[str, Any]
    faults: list[str]
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reconciliation is not None and \
            self.reconciliation.ok

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "seed": self.scenario.seed,
                "ok": self.ok, "error": self.error, "seconds": round(self.seconds, 1),
                "workdir": str(self.workdir), "stats": self.stats, "faults": self.faults,
                "reconciliation": None if self.reconciliation is None
                else self.reconciliation.to_json()}

    def to_text(self, *, folder_kept: bool = True) -> str:
        s = self.stats
        lines = [
            f"Fleet run '{self.scenario.name}' (seed {self.scenario.seed}): "
            f"{s.get('validators', 0)} validators on {s.get('buses', 0)} buses, "
            f"{s.get('bayis', 0)} bayi terminal(s), {s.get('sites', 0)} camera site(s), "
            f"{s.get('cards', 0)} cards, {self.seconds:.0f} s",
            f"Moves: {s.get('taps', 0)} taps ({s.get('accepted', 0)} accepted, "
            f"{s.get('rejected', 0)} rejected, {s.get('no_answer', 0)} unanswered while a "
            f"device was down), {s.get('topups', 0)} top-ups ({s.get('topups_refused', 0)} "
            "refused)",
        ]
        if s.get("tap_p50_ms") is not None:
            lines.append(f"Tap, card placed to display: p50 {s['tap_p50_ms']} ms, p99 "
                         f"{s['tap_p99_ms']} ms (validator poll period included)")
        if s.get("rejections"):
            lines.append("Rejections: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(s["rejections"].items())))
        if self.faults:
            lines.append(f"Faults injected ({len(self.faults)}):")
            lines += [f"  {f}" for f in self.faults]
        if self.reconciliation is not None:
            lines.append(self.reconciliation.to_text())
        if self.error:
            lines.append(f"Error: {self.error}")
        if folder_kept:
            lines.append(f"Run folder: {self.workdir}")
        lines.append("RESULT: " + ("every invariant holds" if self.ok else "FAILED"))
        return "\n".join(lines)


class FleetRun:
    """One run of a scenario in ``workdir`` (created; must be empty or absent).

    ``log_level`` is passed to every process through its own setting, so a run can be read
    (or grepped for secrets, hil_tests/test_no_secrets_in_logs.py) at debug level: the agents'
    ``[log] level`` (and ``--verbose`` at debug, for the MQTT client's lines), the center's
    ``--log-level``, the validators' and bayi terminals' ``--verbose`` at debug, Mosquitto's
    ``log_type all`` at debug, the camera-site firmware's ``--debug``, and ``fleet.log``.
    Default ``info``: the processes' usual logs.
    """

    def __init__(self, scenario: Scenario, workdir: str | Path, *, progress: bool = True,
                 out: Any = None, use_rich: bool | None = None, log_level: str = "info") -> None:
        if log_level not in LOG_LEVELS:
            raise FleetError(f"log level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
        self.log_level = log_level
        self.scenario = scenario
        self.workdir = Path(workdir).resolve()
        self.show_progress = progress
        self.out = out or sys.stdout
        self.use_rich = use_rich
        self.rng = random.Random(scenario.seed)
        self.fleet: Fleet = build_fleet(scenario)
        self.devices: dict[str, _Device] = {}
        self.proxies: dict[int, LinkProxy] = {}
        self.cards: dict[int, VirtualCard] = {}
        self.plans: dict[int, CardPlan] = {}
        self.tracks: dict[int, _CardTrack] = {}
        self.issued: dict[int, CardState] = {}
        self.broker: Any = None
        self.center: ManagedProcess | None = None
        self.rf: RfWorld | None = None
        self.sites: dict[str, dict[str, Any]] = {}
        self.clock = ClockSetting(time.time(), time.time(), 1.0)
        self.clock_shift: dict[str, float] = {}
        self.day: RiderDay | None = None
        self.fault_log: list[str] = []
        self.injected_alarms: dict[str, list[str]] = {}
        self.stats: Counter = Counter()
        self.rejections: Counter = Counter()
        self.moves_total = 0
        self.moves_done = 0
        self.phase = "setup"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._publisher: Any = None
        self._store: Any = None
        self._dump: bytes | None = None
        self.power_cuts_fired = 0
        self.blacklist_version = 0
        self.device_rejections: Counter = Counter()
        self.disk_full_refusals = 0
        self.tap_ms: list[float] = []  # card placed -> display, per answered tap
        self.started = time.monotonic()

    # ------------------------------------------------------------------------------------
    # the whole run

    def run(self) -> FleetResult:
        """Run everything; always stops every process. A broken invariant is in the result
        (``ok`` false), a run that could not even finish sets ``error``."""
        self.started = time.monotonic()
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise FleetError(f"run folder {self.workdir} is not empty: give a new one")
        self.workdir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.workdir / "fleet.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        fleet_log = logging.getLogger("afc.fleet")
        fleet_log.addHandler(handler)
        level = min(logging.INFO, getattr(logging, self.log_level.upper()))
        if fleet_log.getEffectiveLevel() > level:
            fleet_log.setLevel(level)
        try:
            return self._run()
        finally:
            fleet_log.removeHandler(handler)
            handler.close()

    def _run(self) -> FleetResult:
        progress = Progress(self.snapshot, out=self.out, enabled=self.show_progress,
                            use_rich=self.use_rich)
        reconciliation = None
        error = None
        try:
            self._setup()
            self._start()
            progress.start()
            self._ride()
            self._drain()
            progress.stop()
            reconciliation = self._reconcile()
        except FleetError as exc:
            error = str(exc)
            log.error("fleet run failed: %s", exc)
        finally:
            progress.stop()
            self.phase = "stopping"
            self._stop_all()
        result = FleetResult(self.scenario, self.workdir, reconciliation, self._stats(),
                             list(self.fault_log), time.monotonic() - self.started, error)
        with contextlib.suppress(OSError):
            (self.workdir / "result.json").write_text(json.dumps(result.to_json(), indent=2,
                                                                 ensure_ascii=False))
        return result

    def _say(self, text: str) -> None:
        if self.show_progress:
            self.out.write(f"[fleet] {text}\n")
            self.out.flush()
        log.info("%s", text)

    # ------------------------------------------------------------------------------------
    # 1. set up

    def _setup(self) -> None:
        from edge_agent.keys import generate_key_file, public_hex

        sc = self.scenario
        for sub in ("cards", "center", "devices", "sites", "logs", "readers"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._say(f"scenario {sc.name}: {sc.validators} validators, {sc.bayi_terminals} bayi, "
                  f"{sc.camera_sites} camera site(s), {sc.cards} cards, day {sc.day} "
                  f"{sc.start}-{sc.end} in {sc.duration_s:.0f} s (x{sc.speed:.0f})")
        self.keys = FileKeyStore.generate(self.workdir / "keys.toml",
                                          names=("classic-sector", "purse-mac", "journal-mac"))
        midnight = local_time(sc.day, 0)
        plans = standard_cards(sc.cards, sc.day, self.rng)
        plans = issue_cards(plans, self.keys, self.workdir / "cards",
                            issued_at=midnight - 30 * 86_400, seed=sc.seed)
        for plan in plans:
            assert plan.path is not None
            card = VirtualCard.from_file(plan.path)
            self.cards[plan.number] = card
            self.plans[plan.number] = plan
            self.tracks[plan.number] = _CardTrack()
            snap = read_snapshot(card, self.keys)
            self.issued[plan.number] = CardState(plan.card_number, snap.counter, snap.balance)
        self.tracks[CLONE] = _CardTrack()
        probe = CardPlan(len(plans) + 1, PROBE_CARD_NUMBER, "probe", CardType.FULL, 0,
                         midnight + 5 * 365 * 86_400)
        probe = issue_cards([probe], self.keys, self.workdir / "cards",
                            issued_at=midnight - 30 * 86_400, seed=sc.seed + 1)[0]
        assert probe.path is not None
        self.cards[PROBE] = VirtualCard.from_file(probe.path)
        self.plans[PROBE] = probe
        self.tracks[PROBE] = _CardTrack()
        snap = read_snapshot(self.cards[PROBE], self.keys)
        self.issued[PROBE] = CardState(probe.card_number, snap.counter, snap.balance)
        self.day = plan_riders(plans, self.fleet, sc, self.rng)
        self.center_key = generate_key_file(self.workdir / "center" / "center.key")
        self.center_public = public_hex(self.center_key)
        self.faults: FaultSchedule = plan_faults(sc, self.fleet, self.day, self.rng)
        # until the day begins every device clock stands still at its first second: a device
        # that reads its clock while booting must not push its guard past the day's start
        self.day_start = local_time(sc.day, *map(int, sc.start.split(":")))
        self.clock = ClockSetting(time.time(), self.day_start, 0.0)

    # ------------------------------------------------------------------------------------
    # 2. start

    def _start(self) -> None:
        from simulators.broker import MosquittoBroker
        from simulators.center.mqtt import parse_broker

        sc = self.scenario
        self.phase = "starting"
        if sc.broker_url:
            address = parse_broker(sc.broker_url)
            self.broker_host, self.broker_port = address.host, address.port
        else:
            self.broker = MosquittoBroker(
                self.workdir / "broker", persistence=True,
                extra_config="log_type all" if self.log_level == "debug" else "").start()
            self.broker_host, self.broker_port = self.broker.host, self.broker.port
        self._say(f"broker {self.broker_host}:{self.broker_port}"
                  + ("" if sc.broker_url else " (local Mosquitto)"))
        for vehicle in sorted(self.fleet.buses()):
            self.proxies[vehicle] = LinkProxy((self.broker_host, self.broker_port),
                                              name=f"bus-{vehicle}").start()
        self.rf = RfWorld(self.workdir / "readers")
        self._make_devices()
        self._make_sites()
        self._write_registry()
        self._start_center()
        self._publish_initial()
        for dev in self.devices.values():
            dev.agent.start()
            dev.app.start()
            dev.worker = threading.Thread(target=self._worker, args=(dev,),
                                          name=f"rider-{dev.name}", daemon=True)
            dev.worker.start()
        for site in self.sites.values():
            site["firmware"].start()
        self._wait_ready()

    def _agent_sections(self, port: int, kind: str) -> dict[str, dict[str, Any]]:
        a = self.scenario.agent
        return {
            "device": {"kind": kind},
            "mqtt": {"port": port, "keepalive": 5, "backoff_initial_s": 0.1,
                     "backoff_max_s": 2.0, "connect_timeout_s": 5.0},
            "batch": {"max_age_s": a["max_age_s"], "window": a["window"],
                      "ack_timeout_s": a["ack_timeout_s"], "max_records": a["max_records"]},
            "telemetry": {"interval_s": 5.0},
            "log": {"level": self.log_level},
        }

    def _make_devices(self) -> None:
        from edge_agent.testing import make_device

        assert self.rf is not None
        logs = self.workdir / "logs"
        for spec in self.fleet.validators:
            folder = self.workdir / "devices" / spec.device_id
            port = self.proxies[spec.vehicle_id].port
            make_device(folder, spec.device_id, "127.0.0.1", port, center_key=self.center_key,
                        sections=self._agent_sections(port, "validator"))
            others = ", ".join(str(v) for v in sorted(spec.other_validators))
            (folder / "validator.toml").write_text(
                f'[device]\nid = "{spec.device_id}"\nvalidator_id = {spec.validator_id}\n'
                f"vehicle_id = {spec.vehicle_id}\nline_id = {spec.line_id}\n"
                f'line_group = "merkez"\nother_validators = [{others}]\n'
                f'[reader]\nmode = "{spec.modes[0]}"\n[tariff]\nname = "konya-2025"\n'
                f'[keys]\nstore = "{self.workdir / "keys.toml"}"\n')
            reader = self.rf.add_reader(spec.device_id)
            self._add_device(spec.device_id, "validator", folder, spec.vehicle_id, reader,
                             ["validator", "--reader", reader, "--db",
                              str(folder / "device.db"), "--config",
                              str(folder / "validator.toml")], logs)
            self.devices[spec.device_id].reader_mode = spec.modes[0]
        midnight = local_time(self.scenario.day, 0)
        for bayi in self.fleet.bayis:
            folder = self.workdir / "devices" / bayi.device_id
            make_device(folder, bayi.device_id, self.broker_host, self.broker_port,
                        center_key=self.center_key,
                        sections=self._agent_sections(self.broker_port, "topup"))
            # one grant per dealer: the center refuses an allowance id reused for another
            unsigned = CreditAllowance(bayi.device_id,
                                       f"alw-{bayi.device_id}-{self.scenario.day:%Y%m%d}",
                                       self.scenario.allowance_kurus, midnight - 86_400,
                                       midnight + 2 * 86_400, b"")
            allowance = replace(unsigned,
                                signature=self.center_key.sign(unsigned.signed_bytes()))
            (folder / "allowance.json").write_text(allowance.to_json())
            (folder / "bayi.toml").write_text(
                f'[device]\nid = "{bayi.device_id}"\nterminal_id = {bayi.terminal_id}\n'
                f'[dealer]\nallowance = "{folder / "allowance.json"}"\n'
                f'center_public_key = "{self.center_public}"\ndaily_limit = 50000\n'
                f'[keys]\nstore = "{self.workdir / "keys.toml"}"\n')
            reader = self.rf.add_reader(bayi.device_id)
            self._add_device(bayi.device_id, "topup", folder, None, reader,
                             ["topup", "--reader", reader, "--db",
                              str(folder / "device.db"), "--config", str(folder / "bayi.toml"),
                              "--card-wait", "5"], logs)

    def _add_device(self, name: str, kind: str, folder: Path, vehicle: int | None, reader: str,
                    command: list[str], logs: Path) -> None:
        clock_path = folder / "clock.json"
        faults_path = folder / "faults.json"
        write_clock(clock_path, self.clock)
        faults_path.write_text(json.dumps({"disk_full": False}))
        command = [*command, "--clock-file", str(clock_path),
                   *(["--verbose"] if self.log_level == "debug" else [])]
        if kind == "validator":  # the shim adds the disk-full fault (fleet/device.py)
            argv = [PY, "-m", "simulators.fleet.device", "--faults", str(faults_path), "--",
                    *command]
        else:
            argv = [PY, "-m", "tools.cli", *command]
        app = ManagedProcess(name, argv, logs / f"{name}.log", watch_stdout=True,
                             stdin=kind == "topup", merge_stderr=kind == "topup")
        agent = ManagedProcess(f"{name}-agent",
                               [PY, "-m", "edge_agent", "--config", str(folder / "agent.toml"),
                                *(["--verbose"] if self.log_level == "debug" else [])],
                               logs / f"{name}-agent.log")
        self.devices[name] = _Device(name, kind, folder, vehicle, app, agent, clock_path,
                                     faults_path)

    def _make_sites(self) -> None:
        sc = self.scenario
        if not sc.camera_sites:
            return
        from simulators.cameras import CabinetSensors, CameraFarm, SiteFirmware, site_config
        from simulators.cameras.errors import FirmwareError
        from simulators.cameras.firmware import micropython_binary, require_umqtt
        from simulators.cameras.siteconfig import new_key

        try:
            micropython_binary()
            require_umqtt()
        except FirmwareError as exc:
            self._say(f"no camera sites in this run: {exc}")
            self.stats["sites_skipped"] = sc.camera_sites
            return

        for i in range(1, sc.camera_sites + 1):
            site_id = f"site-{i:03d}"
            folder = self.workdir / "sites" / site_id
            farm = CameraFarm(sc.cameras_per_site, prefix=f"s{i}-cam-").start()
            cabinet = CabinetSensors(folder / "cabinet.json")
            firmware = SiteFirmware(folder / "flash", sensors=folder / "cabinet.json",
                                    debug=self.log_level == "debug")
            key = new_key()
            config = site_config(self.broker_host, self.broker_port, farm.config_entries(),
                                 fast=True, timing={"telemetry_ms": 2000, "status_ms": 5000})
            firmware.provision(site_id, key, 1, config)
            self.sites[site_id] = {"farm": farm, "cabinet": cabinet, "firmware": firmware,
                                   "key": key, "folder": folder}

    def _write_registry(self) -> None:
        from edge_agent.keys import load_private_key, public_hex

        lines = []
        for dev in self.devices.values():
            key = load_private_key(dev.folder / "device.key")
            lines += ["[[device]]", f'id = "{dev.name}"', f'kind = "{dev.kind}"',
                      f'public_key = "{public_hex(key)}"', ""]
        for site_id in self.sites:
            lines += ["[[device]]", f'id = "{site_id}"', 'kind = "camera-site"', ""]
        (self.workdir / "center" / "devices.toml").write_text("\n".join(lines))

    def _start_center(self) -> None:
        from simulators.center.dealer import register_allowance_file
        from simulators.center.mqtt import BrokerAddress
        from simulators.center.publisher import Publisher
        from simulators.center.store import SqliteCenterStore

        center_dir = self.workdir / "center"
        self.center_db = center_dir / "center.db"
        self.center = ManagedProcess(
            "center", [PY, "-m", "tools.cli", "sim", "center", "run", "--broker",
                       f"{self.broker_host}:{self.broker_port}", "--db", str(self.center_db),
                       "--key", str(center_dir / "center.key"), "--workers",
                       str(self.scenario.center_workers), "--devices",
                       str(center_dir / "devices.toml"), "--log-level",
                       self.log_level.upper()],
            self.workdir / "logs" / "center.log").start()
        if not _wait(lambda: "center ready" in self._center_log(), 45):
            raise ProcessFailed(f"the center did not become ready: {self.center.log_tail()}")
        self._store = SqliteCenterStore(self.center_db)
        # the credit each bayi was given (a file, as a terminal without a synced credit
        # bundle reads it) is credit the center issued: its dealer report checks against it
        for bayi in self.fleet.bayis:
            register_allowance_file(self._store,
                                    self.workdir / "devices" / bayi.device_id / "allowance.json",
                                    self.center_key.public_key())
        self._address = BrokerAddress(self.broker_host, self.broker_port)
        self._publisher = Publisher(self._store, self.center_key, self._publish_async)

    def _center_log(self) -> str:
        try:
            return (self.workdir / "logs" / "center.log").read_text(errors="replace")
        except OSError:
            return ""

    async def _publish_async(self, topic: str, payload: bytes, retain: bool) -> None:
        from simulators.center.mqtt import client_id, connect

        async with connect(self._address, client_id("fleet")) as client:
            await client.publish(topic, payload, qos=1, retain=retain, timeout=30)

    def _publish(self, what: str, coro_factory: Callable[[], Any]) -> Any:
        """Run one publisher call; retried (bounded) while the broker is restarting."""
        import aiomqtt

        last: Exception | None = None
        for _ in range(20):
            try:
                return asyncio.run(coro_factory())
            except (aiomqtt.MqttError, OSError) as exc:
                last = exc
                time.sleep(0.5)
        raise FleetError(f"could not publish {what}: {last}")

    def _publish_initial(self) -> None:
        day = self.day
        assert day is not None
        blacklisted = [p.card_number for p in self.plans.values() if p.kind == "blacklisted"]
        self._publish("the blacklist", lambda: self._publisher.publish_blacklist_full(
            [(n, 1, None) for n in blacklisted]))
        valid_until = (local_time(self.scenario.day, 0) + 7 * 86_400) * 1000
        for kind, (card_number, device) in sorted(day.online.items()):
            action = {"action_id": f"web-{kind}-{card_number}", "card_number": card_number,
                      "kind": "topup" if kind == "online-topup" else "pass",
                      "valid_until": valid_until,
                      "amount": 10_000 if kind == "online-topup" else None,
                      "product_id": None if kind == "online-topup" else 1, "card_seq": 1}
            self._publish(f"the actions of {device}", lambda d=device, a=action:
                          self._publisher.publish("actions", {"actions": [a]}, target=d))

    def _wait_ready(self) -> None:
        assert self.rf is not None
        self._say("waiting for every device to be online and configured")
        deadline = time.monotonic() + 90
        for dev in self.devices.values():
            if not self.rf.wait_polls(dev.name, 1, max(1.0, deadline - time.monotonic()),
                                      since=0):
                raise ProcessFailed(f"{dev.name} never polled its reader: {dev.app.log_tail()}")
        want = {d.name for d in self.devices.values()} | set(self.sites)
        if not _wait(lambda: want <= self._online(), max(1.0, deadline - time.monotonic())):
            missing = sorted(want - self._online())
            first = self.devices.get(missing[0])
            tail = first.agent.log_tail(5) if first is not None else ""
            raise ProcessFailed(f"devices not online at the center: {', '.join(missing[:5])}"
                                f" ({tail})")
        targets = {dev for _, dev in (self.day.online.values() if self.day else [])}

        def configured() -> bool:
            for dev in self.devices.values():
                if dev.kind != "validator":
                    continue
                meta = _meta(dev.db)
                if int(meta.get("blacklist_version", 0) or 0) < 1:
                    return False
                if dev.name in targets and int(meta.get("actions_version", 0) or 0) < 1:
                    return False
            return True

        if not _wait(configured, max(1.0, deadline - time.monotonic())):
            raise ProcessFailed("validators did not apply the initial blacklist and actions")

    def _online(self) -> set[str]:
        try:
            rows = _query(self.center_db, "SELECT device_id FROM device_state "
                                          "WHERE state = 'online'")
        except sqlite3.Error:
            return set()
        return {r[0] for r in rows}

    # ------------------------------------------------------------------------------------
    # 3. the day

    def _ride(self) -> None:
        sc = self.scenario
        day = self.day
        assert day is not None
        self.clock = ClockSetting(time.time() + 0.5, self.day_start, sc.speed)
        for dev in self.devices.values():
            write_clock(dev.clock_path, self.clock)
        moves: list[tuple[int, int, Event]] = [(e.time, 0, e) for e in day.events]
        moves += [(e.time, 1, e) for e in day.clone_events]
        moves.sort(key=lambda m: (m[0], m[1]))
        self.moves_total = len(moves)
        self.phase = "riding"
        self._say(f"the day begins: {len(moves)} moves, {len(self.faults.items)} faults")
        fault_thread = threading.Thread(target=self.faults.run, args=(self,), name="faults",
                                        daemon=True)
        fault_thread.start()
        cut_at = {(e.time, e.card) for e in day.power_cuts}
        budget = sc.duration_s * 4 + 120  # the day may run late under load; never forever
        deadline = time.monotonic() + budget
        for t, _, event in moves:
            if time.monotonic() > deadline:
                raise FleetError(f"the day did not finish within {budget:.0f} s")
            self._sleep_until(self.clock.real_at(t))
            key = CLONE if event.card == -1 else event.card
            self._prepare(event, key)
            track = self.tracks[key]
            if not track.free.wait(60):
                raise FleetError(f"card {key} stuck on reader {track.device}")
            where = self._where(event.device)
            if track.where is not None and track.where != where:
                gap = 150 + self.clock_shift.get(track.device, 0) + \
                    self.clock_shift.get(event.device, 0)
                self._sleep_until(self.clock.real_at(track.sim_done + gap))
            track.free.clear()
            dev = self.devices[event.device]
            dev.jobs.put((event, key, (event.time, event.card) in cut_at))
            if key == day.rollback and event.time == day.rollback_after:
                self._after(key, self._take_dump)
        for dev in self.devices.values():
            dev.jobs.put(None)
        for dev in self.devices.values():
            if dev.worker is not None:
                dev.worker.join(60)
        self.faults.stop()
        fault_thread.join(max(10.0, sc.faults.broker_down_s + sc.faults.partition_s + 10))
        self._say(f"the day is over ({self.moves_done} moves)")

    def _where(self, device: str) -> object:
        dev = self.devices[device]
        return dev.vehicle if dev.vehicle is not None else device

    def _sleep_until(self, real: float) -> None:
        delay = real - time.time()
        if delay > 0:
            self._stopping.wait(min(delay, 3600))

    def _prepare(self, event: Event, key: int) -> None:
        """Card-side actions a move needs first: make the clone, roll a card back."""
        day = self.day
        assert day is not None
        if key == CLONE and CLONE not in self.cards:
            original = self.tracks[day.clone_of]
            original.free.wait(60)
            self.cards[CLONE] = RfWorld.clone(self.cards[day.clone_of], "the clone")
            self._fault(f"card {self.plans[day.clone_of].card_number} cloned")
        if key == day.rollback and event.time == day.rollback_at and self._dump is not None:
            self.tracks[key].free.wait(60)
            RfWorld.write_back(self.cards[key], self._dump)
            self._fault(f"card {self.plans[key].card_number} rolled back to its morning dump")

    def _after(self, key: int, action: Callable[[int], None]) -> None:
        def run() -> None:
            if self.tracks[key].free.wait(60):
                action(key)

        threading.Thread(target=run, daemon=True).start()

    def _take_dump(self, key: int) -> None:
        self._dump = RfWorld.dump(self.cards[key])

    def _worker(self, dev: _Device) -> None:
        while True:
            job = dev.jobs.get()
            if job is None:
                return
            event, key, cut = job
            track = self.tracks[key]
            try:
                if dev.kind == "validator":
                    self._tap(dev, key, event, cut)
                else:
                    self._topup(dev, key, event)
            except Exception as exc:  # one move's failure is counted, the door goes on
                log.error("move %s failed: %s", event, exc, exc_info=True)
                with self._lock:
                    self.stats["move_errors"] += 1
            finally:
                track.where = self._where(dev.name)
                track.device = dev.name
                track.sim_done = self.clock.at(time.time())
                if key != PROBE:
                    with self._lock:
                        self.moves_done += 1
                track.free.set()

    def _present(self, dev: _Device, card: VirtualCard, timeout: float, *,
                 timed: bool = True) -> str | None:
        """Place the card, wait for the display, take the card away, let the validator see
        the empty field. The display line, or None when the validator showed nothing."""
        assert self.rf is not None
        mark = dev.app.line_count
        placed = time.time()
        self.rf.place(dev.name, card)
        try:
            got = dev.app.wait_line(mark, lambda s: s.startswith("["), timeout)
        finally:
            self.rf.remove(dev.name, card)
        if got is not None and timed:
            with self._lock:
                self.tap_ms.append((got[1] - placed) * 1000)
        if dev.app.running:
            self.rf.wait_polls(dev.name, POLL_WRITES, 2.0)
        return got[2] if got else None

    def _tap(self, dev: _Device, key: int, event: Event, cut: bool) -> None:
        card = self.cards[key]
        if cut:
            nth = self.rng.randint(1, 2)
            RfWorld.arm_power_cut(card, nth, lambda: self._power_cut(dev))
        try:
            line = self._present(dev, card, TAP_TIMEOUT_S)
        finally:
            if cut:
                RfWorld.disarm(card)
        if cut and not dev.app.running:
            # the power came back: the validator boots, the rider taps again
            self.power_cuts_fired += 1
            dev.app.start()
            line = self._present(dev, card, 30.0, timed=False)
            self._fault(f"power cut of {dev.name} mid-write (card "
                        f"{self.plans[key].card_number if key in self.plans else 'clone'}), "
                        "re-tapped: "
                        f"{classify(line)[1] if line else 'no display'}")
        self._count_tap(line, dev.name, rider=key != PROBE)

    def _count_tap(self, line: str | None, device: str = "", *, rider: bool = True) -> None:
        with self._lock:
            if not rider:  # the fault injector's empty card: counted for its fault only
                self.stats["probe_taps"] += 1
                if line is not None:
                    self.device_rejections[(device, classify(line)[1])] += 1
                return
            self.stats["taps"] += 1
            if line is None:
                self.stats["no_answer"] += 1
                return
            accepted, reason = classify(line)
            if accepted:
                self.stats["accepted"] += 1
            else:
                self.stats["rejected"] += 1
                self.rejections[reason] += 1
                self.device_rejections[(device, reason)] += 1

    def _power_cut(self, dev: _Device) -> None:
        dev.app.kill9()

    def _topup(self, dev: _Device, key: int, event: Event) -> None:
        assert self.rf is not None
        card = self.cards[key]
        mark = dev.app.line_count
        self.rf.place(dev.name, card)
        try:
            dev.app.send(f"load {event.amount // 100},{event.amount % 100:02d}")
            got = dev.app.wait_line(mark, lambda s: s.startswith(("İşlem no", "error:")),
                                    TAP_TIMEOUT_S)
        except ProcessFailed:
            got = None
        finally:
            self.rf.remove(dev.name, card)
        with self._lock:
            if got is None:
                self.stats["topups_no_answer"] += 1
            elif got[2].startswith("error:"):
                self.stats["topups_refused"] += 1
            else:
                self.stats["topups"] += 1

    # ------------------------------------------------------------------------------------
    # faults (called by the fault schedule's thread)

    def _fault(self, text: str) -> None:
        stamp = datetime.fromtimestamp(self.clock.at(time.time()), LOCAL_TZ).strftime("%H:%M")
        with self._lock:
            self.fault_log.append(f"{stamp} {text}")
        log.warning("fault: %s", text)

    def kill_app(self, name: str, down_s: float = 1.0) -> None:
        dev = self.devices[name]
        if dev.app.kill9() is not None:
            self._fault(f"kill -9 {name} ({dev.kind})")
            self._stopping.wait(down_s)
            dev.app.start()

    def kill_agent(self, name: str, down_s: float = 1.0) -> None:
        dev = self.devices[name]
        if dev.agent.kill9() is not None:
            self._fault(f"kill -9 {name}'s agent")
            self._stopping.wait(down_s)
            dev.agent.start()

    def kill_center_worker(self) -> None:
        import psutil

        assert self.center is not None and self.center.pid is not None
        try:
            children = psutil.Process(self.center.pid).children(recursive=True)
        except psutil.Error:
            return
        workers = [c for c in children if "simulators.center.ingest" in " ".join(c.cmdline())]
        if workers:
            victim = self.rng.choice(workers)
            with contextlib.suppress(psutil.Error):
                victim.kill()
                self._fault(f"kill -9 center ingest worker pid {victim.pid}")

    def kill_site(self, site_id: str, down_s: float = 1.0) -> None:
        if site_id not in self.sites:
            return
        firmware = self.sites[site_id]["firmware"]
        firmware.kill()
        self._fault(f"power cut of camera site {site_id}")
        self._stopping.wait(down_s)
        firmware.start()

    def restart_broker(self, down_s: float) -> None:
        if self.broker is None:
            return
        self._fault(f"broker restart ({down_s:g} s down)")
        self.broker.restart(down_for=down_s)

    def partition(self, vehicle: int, seconds: float, how: str) -> None:
        proxy = self.proxies[vehicle]
        proxy.set_state(how)
        self._fault(f"bus {vehicle} cut off ({how}) for {seconds:g} s")
        self._stopping.wait(seconds)
        proxy.set_state("up")

    def disk_full(self, name: str, seconds: float) -> None:
        dev = self.devices[name]
        before = self.device_rejections[(name, "OUT_OF_SERVICE")]
        dev.faults_path.write_text(json.dumps({"disk_full": True}))
        # While its agent delivers, a device's journal is pruned as fast as it grows and a
        # full disk costs nothing (the journal reuses its own pages): a full disk bites when
        # the outbox must grow. So the bus goes offline meanwhile; the disk stays full for
        # ``seconds`` at most, or until the validator has refused two taps for it, and a
        # queue of riders with empty cards (the probe card, refused for its balance: one
        # journal record per tap) taps at that door, so the full disk is met, not missed.
        proxy = self.proxies.get(dev.vehicle) if dev.vehicle is not None else None
        cut = proxy is not None and proxy.state == "up"
        if cut:
            proxy.set_state("blackhole")
        deadline = time.monotonic() + seconds
        probe = self.tracks[PROBE]
        while time.monotonic() < deadline and not self._stopping.is_set() and \
                self.device_rejections[(name, "OUT_OF_SERVICE")] - before < 2:
            if not probe.free.wait(5):
                continue
            probe.free.clear()
            dev.jobs.put((Event(int(self.clock.at(time.time())), PROBE, name, 0,
                                "empty card at a full disk"), PROBE, False))
            probe.free.wait(TAP_TIMEOUT_S + 5)
        if cut:
            proxy.set_state("up")
        dev.faults_path.write_text(json.dumps({"disk_full": False}))
        refused = self.device_rejections[(name, "OUT_OF_SERVICE")] - before
        self.disk_full_refusals += refused
        self._fault(f"disk full on {name}" + (f" (bus {dev.vehicle} offline)" if cut else "")
                    + f": {refused} tap(s) refused out of service, nothing charged")

    def clock_back(self, name: str, seconds: int) -> None:
        dev = self.devices[name]
        self.clock_shift[name] = float(seconds)
        write_clock(dev.clock_path, replace(self.clock, offset_s=-float(seconds)))
        self._fault(f"clock of {name} set back {seconds} s")

    def blacklist_delta(self, card_number: int) -> None:
        bundle = self._publish("a blacklist delta", lambda: self._publisher
                               .publish_blacklist_delta([(card_number, 2, None)]))
        self._fault(f"blacklist delta v{bundle.version}: card {card_number} reported stolen")

    def camera_fault(self, site_id: str, seconds: float) -> None:
        if site_id not in self.sites:
            return
        site = self.sites[site_id]
        cam = next(iter(site["farm"].cameras))
        site["farm"].set_fault(cam, "down")
        self.injected_alarms.setdefault(site_id, []).append("camera-down")
        self._fault(f"camera {cam} of {site_id} down")
        self._stopping.wait(seconds)
        site["farm"].set_fault(cam, "ok")
        self.injected_alarms[site_id].append("camera-up")
        self._stopping.wait(seconds / 2)
        site["cabinet"].set(door_open=True)
        self.injected_alarms[site_id].append("door-open")
        self._fault(f"cabinet door of {site_id} opened")
        self._stopping.wait(seconds)
        site["cabinet"].set(door_open=False)
        self.injected_alarms[site_id].append("door-closed")

    # ------------------------------------------------------------------------------------
    # 4. drain

    def _heal(self) -> None:
        for proxy in self.proxies.values():
            if proxy.state != "up":
                proxy.set_state("up")
        if self.broker is not None and not self.broker.running:
            self.broker.start()
        for dev in self.devices.values():
            dev.faults_path.write_text(json.dumps({"disk_full": False}))
            write_clock(dev.clock_path, self.clock)
            if not dev.agent.running:
                dev.agent.start()
        for site in self.sites.values():
            if not site["firmware"].running:
                site["firmware"].start()

    def _drain(self) -> None:
        self.phase = "draining"
        self._heal()
        for dev in self.devices.values():
            dev.app.stop()  # a validator killed at the very end: its journal is on disk
        deadline = time.monotonic() + self.scenario.drain_timeout_s
        self._say("draining: every journal to the center, every validator to the newest "
                  "blacklist")

        def delivered() -> bool:
            for dev in self.devices.values():
                meta = _meta(dev.db)
                if int(meta.get("journal_acked", 0) or 0) < _last_seq(dev.db):
                    return False
            return True

        if not _wait(delivered, max(1.0, deadline - time.monotonic()), step=0.25):
            late = [d.name for d in self.devices.values()
                    if int(_meta(d.db).get("journal_acked", 0) or 0) < _last_seq(d.db)]
            raise FleetError(f"journals not acknowledged within "
                             f"{self.scenario.drain_timeout_s:.0f} s: {', '.join(late[:5])}")
        version = self._publisher.current_version("blacklist")
        self.blacklist_version = version

        def blacklists() -> bool:
            return all(int(_meta(d.db).get("blacklist_version", 0) or 0) >= version
                       for d in self.devices.values() if d.kind == "validator")

        _wait(blacklists, max(1.0, deadline - time.monotonic()), step=0.25)
        if self.sites:
            _wait(self._alarms_arrived, max(1.0, min(20.0, deadline - time.monotonic())))
        for dev in self.devices.values():
            dev.agent.stop()

    def _site_last_seq(self, site_id: str) -> int:
        """The last event number the site's firmware logged raising."""
        seqs = [int(m.group(1)) for line in self.sites[site_id]["firmware"].lines
                if (m := _SITE_EVENT.search(line))]
        return max(seqs, default=0)

    def _alarms_arrived(self) -> bool:
        events = self._site_events()
        for site in self.sites:
            got = {e["seq"] for e in events.get(site, [])}
            if not set(range(1, self._site_last_seq(site) + 1)) <= got:
                return False
        for site, want in self.injected_alarms.items():
            names = [e["event"] for e in sorted(events.get(site, []), key=lambda e: e["seq"])]
            it = iter(names)
            if not all(any(n == w for n in it) for w in want):
                return False
        return True

    def _site_events(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in self.sites}
        try:
            rows = _query(self.center_db, "SELECT device_id, seq, event, received_ms, id "
                                          "FROM events ORDER BY id")
        except sqlite3.Error:
            return out
        for dev, seq, event, received, row_id in rows:
            if dev in out and seq is not None:
                out[dev].append({"seq": seq, "event": event, "received_ms": received,
                                 "id": row_id})
        return out

    # ------------------------------------------------------------------------------------
    # 5. reconcile

    def reconcile(self) -> Reconciliation:
        """Reconcile what the run left (also after :meth:`run`: the processes are gone, the
        databases and the cards are not; tests tamper with them to see a check fail)."""
        return self._reconcile()

    def _reconcile(self) -> Reconciliation:
        self.phase = "reconciling"
        assert self.rf is not None and self.day is not None
        final = {}
        for number, card in self.cards.items():
            if number == CLONE:
                continue
            snap = read_snapshot(card, self.keys)
            final[number] = CardState(self.plans[number].card_number, snap.counter, snap.balance)
        out = subprocess.run(
            [PY, "-m", "tools.cli", "sim", "center", "report", "--db", str(self.center_db),
             "--json"], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise FleetError(f"afc sim center report failed: {out.stderr.strip()[-300:]}")
        report = json.loads(out.stdout)
        facts: list[DeviceFacts] = [device_facts(d.name, d.db) for d in self.devices.values()]
        injected = []
        if self.day.clone_of is not None and CLONE in self.cards:
            injected.append(self.plans[self.day.clone_of].card_number)
        if self.day.rollback is not None and self._dump is not None and any(
                "rolled back" in f for f in self.fault_log):
            injected.append(self.plans[self.day.rollback].card_number)
        issued = {p.card_number: self.issued[n] for n, p in self.plans.items()}
        final_by_card = {self.plans[n].card_number: s for n, s in final.items()}
        delta_cards = [self.plans[n].card_number for n in self.day.victims
                       if any(f"card {self.plans[n].card_number} reported" in x
                              for x in self.fault_log)]
        from simulators.center.store import SqliteCenterStore

        with SqliteCenterStore(self.center_db) as store:
            records = list(store.records())
        result = reconcile(
            report=report, records=records, devices=facts,
            validators=[d.name for d in self.devices.values() if d.kind == "validator"],
            issued=issued, final=final_by_card, injected_clones=injected,
            blacklist_version=self.blacklist_version,
            delta_cards=delta_cards,
            site_events=self._site_events() if self.sites else None,
            injected_alarms=self.injected_alarms,
            site_last_seq={s: self._site_last_seq(s) for s in self.sites},
            emulator_errors=self.rf.internal_errors(),
        )
        (self.workdir / "report.json").write_text(json.dumps(report, indent=1))
        return result

    # ------------------------------------------------------------------------------------
    # stopping and reporting

    def _stop_all(self) -> None:
        self._stopping.set()
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                dev.jobs.put(None)
            for proc in (dev.app, dev.agent):
                with contextlib.suppress(Exception):
                    proc.stop(5)
        for site in self.sites.values():
            with contextlib.suppress(Exception):
                site["firmware"].stop(5)
            with contextlib.suppress(Exception):
                (site["folder"] / "firmware.log").write_text(
                    "\n".join(site["firmware"].lines) + "\n")
            with contextlib.suppress(Exception):
                site["farm"].stop()
        if self.center is not None:
            with contextlib.suppress(Exception):
                self.center.stop(15)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        if self.rf is not None:
            with contextlib.suppress(Exception):
                self.rf.stop()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()

    def _stats(self) -> dict[str, Any]:
        s = dict(self.stats)
        s.update(validators=len(self.fleet.validators), buses=len(self.fleet.buses()),
                 bayis=len(self.fleet.bayis), sites=len(self.sites), cards=len(self.plans),
                 rejections=dict(self.rejections), power_cuts_fired=self.power_cuts_fired,
                 disk_full_refusals=self.disk_full_refusals,
                 speed=round(self.scenario.speed, 1))
        if self.tap_ms:
            ordered = sorted(self.tap_ms)
            s["tap_p50_ms"] = round(ordered[len(ordered) // 2], 1)
            s["tap_p99_ms"] = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)
        return s

    def snapshot(self) -> Snapshot:
        """What the progress display shows (cheap reads only)."""
        outbox = {}
        for dev in self.devices.values():
            try:
                outbox[dev.name] = max(0, _last_seq(dev.db) -
                                       int(_meta(dev.db).get("journal_acked", 0) or 0))
            except sqlite3.Error:
                outbox[dev.name] = -1
        sites: dict[str, str] = {}
        online = self._online() if self.center is not None else set()
        if self.sites:
            with contextlib.suppress(sqlite3.Error):
                for dev, text in _query(self.center_db, "SELECT device_id, status_json FROM "
                                                        "device_state WHERE kind = "
                                                        "'camera-site'"):
                    status = json.loads(text) if text else {}
                    cams = Counter((status.get("cameras") or {}).values())
                    state = status.get("state", "?")
                    sites[dev] = state + (" " + " ".join(f"{k}={v}" for k, v in
                                                         sorted(cams.items())) if cams else "")
        sim = self.clock.at(time.time())
        with self._lock:
            return Snapshot(
                sim_time=datetime.fromtimestamp(sim, LOCAL_TZ).strftime("%H:%M"),
                speed=self.clock.speed, elapsed_s=time.monotonic() - self.started,
                moves_done=self.moves_done, moves_total=self.moves_total,
                taps=self.stats["taps"], accepted=self.stats["accepted"],
                rejected=Counter(self.rejections), no_answer=self.stats["no_answer"],
                topups=self.stats["topups"], topups_refused=self.stats["topups_refused"],
                outbox=outbox, online=len(online & (set(self.devices) | set(self.sites))),
                devices=len(self.devices) + len(self.sites), sites=sites,
                faults=list(self.fault_log), phase=self.phase)


# -- helpers ------------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except sqlite3.Error:
            pass
        time.sleep(step)
    try:
        return bool(predicate())
    except sqlite3.Error:
        return False


def _query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _meta(db: Path) -> dict[str, Any]:
    return dict(_query(db, "SELECT key, value FROM meta"))


def _last_seq(db: Path) -> int:
    rows = _query(db, "SELECT max(coalesce((SELECT max(seq) FROM journal), 0), "
                      "coalesce((SELECT value FROM meta WHERE key = 'journal_floor'), 0))")
    return int(rows[0][0] or 0)


def run_fleet(scenario: Scenario, workdir: str | Path | None = None, *, progress: bool = True,
              keep: bool = False, out: Any = None, log_level: str = "info") -> FleetResult:
    """Run ``scenario`` in ``workdir`` (a new temporary folder when None, removed after a
    successful run unless ``keep``); every process logs at ``log_level``."""
    import tempfile

    temp = workdir is None
    folder = Path(tempfile.mkdtemp(prefix=f"afc-fleet-{scenario.name}-")) if temp \
        else Path(workdir)
    result = FleetRun(scenario, folder, progress=progress, out=out, log_level=log_level).run()
    if temp and result.ok and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def raise_for(result: FleetResult) -> None:
    """The one-line failure ``afc`` prints, or nothing when every invariant holds."""
    if result.error:
        raise FleetError(f"{result.error} (logs in {result.workdir})")
    if result.reconciliation is not None and not result.reconciliation.ok:
        raise InvariantFailed(result.reconciliation.failures)
