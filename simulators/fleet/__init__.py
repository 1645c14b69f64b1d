"""The fleet simulator: a city's fare collection and camera sites on one machine, under faults.

``afc sim fleet SCENARIO`` and ``afc demo`` run :func:`run_fleet`: a scenario file
(:mod:`.scenario`) becomes real processes — Mosquitto, the reference center, validators and
bayi terminals behind emulated PN532 readers, one agent per device, camera-site firmware on
MicroPython — a seeded day of riders on a simulated clock, faults (:mod:`.faults`), and a
reconciliation of every invariant at the end (:mod:`.reconcile`). docs/fleet.md describes it.
"""

from .errors import FleetError, InvariantFailed, ProcessFailed, ScenarioError
from .runner import FleetResult, FleetRun, raise_for, run_fleet
from .scenario import Scenario, available, load_scenario

__all__ = [
    "FleetError",
    "FleetResult",
    "FleetRun",
    "InvariantFailed",
    "ProcessFailed",
    "Scenario",
    "ScenarioError",
    "available",
    "load_scenario",
    "raise_for",
    "run_fleet",
]
