"""``afc sim fleet SCENARIO``: a city's fleet on this machine, faults included, reconciled.

The lead registers :data:`fleet` under ``afc sim`` in ``tools/cli.py``
(``sim.add_command(fleet)``); ``afc demo`` runs the ``demo`` scenario through
:func:`run_and_report`.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import click

__all__ = ["fleet", "run_and_report"]


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_and_report(scenario_name: str, *, workdir: str | None = None, keep: bool = False,
                   as_json: bool = False, quiet: bool = False,
                   overrides: dict[str, Any] | None = None) -> None:
    """Run a scenario, print its summary (or JSON), and fail with the one-line reason of
    the first broken invariant. The run folder is removed after a good run unless ``keep``
    or ``workdir`` was given; after a failed run it is kept and named."""
    from simulators.fleet import FleetRun, load_scenario, raise_for

    scenario = load_scenario(scenario_name, overrides)
    temp = workdir is None
    folder = Path(tempfile.mkdtemp(prefix=f"afc-fleet-{scenario.name}-")) if temp \
        else Path(workdir)
    # the run logs to its folder (fleet.log, logs/*.log); the console shows the progress
    fleet_log = logging.getLogger("afc.fleet")
    fleet_log.propagate = False
    # SIGTERM unwinds like Ctrl-C, so the run stops every process it started
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = FleetRun(scenario, folder, progress=not (quiet or as_json)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        fleet_log.propagate = True
    remove = result.ok and temp and not keep
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(result.to_text(folder_kept=not remove))
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
    raise_for(result)


@click.command("fleet")
@click.argument("scenario", default="demo")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Run folder (must be new or empty); default: a temporary folder, removed "
              "after a good run, kept (and named) after a failed one.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Override the scenario's seed (riders, faults, cards).")
@click.option("--duration", type=click.FloatRange(5, 86_400), default=None,
              help="Real seconds the riders' day takes (sets the simulated clock's speed).")
@click.option("--broker", default=None,
              help="HOST:PORT of a running broker instead of a local Mosquitto (no broker "
              "restarts are injected then).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--quiet", is_flag=True, help="No live progress, only the final summary.")
@click.option("--keep", is_flag=True, help="Keep the run folder after a good run too.")
@click.option("--list", "list_only", is_flag=True, help="List the shipped scenarios and exit.")
def fleet(scenario: str, workdir: str | None, seed: int | None, duration: float | None,
          broker: str | None, as_json: bool, quiet: bool, keep: bool, list_only: bool) -> None:
    """Run a fleet scenario: every part as a real process, a day of riders, faults, and the
    reconciliation of every invariant at the end.

    SCENARIO is a shipped scenario (demo, ci, soak; see --list) or a TOML file
    (docs/fleet.md lists every setting; unknown settings are refused). Mosquitto, the
    reference center, validators and bayi terminals behind emulated PN532 readers, one agent
    per device and the camera-site firmware are started; riders tap through a simulated
    day while the scenario's faults are injected; then everything is delivered and checked:
    every record and every card write at the center exactly once, balances to the kuruş,
    the cloned and the rolled-back card caught, every blacklist delta on every validator,
    camera alarms in order. Exit status 1 with the first broken invariant otherwise.

    \b
    Examples:
      afc sim fleet demo
      afc sim fleet ci --seed 11 --json
      afc sim fleet my-city.toml --workdir /tmp/run1 --keep
    """
    from simulators.fleet import available, load_scenario
    from simulators.fleet.scenario import SCENARIO_DIR

    if list_only:
        for name in available():
            sc = load_scenario(name)
            click.echo(f"{name:8} {sc.validators} validators, {sc.camera_sites} site(s), "
                       f"{sc.duration_s:.0f} s: {sc.description}")
        click.echo(f"(in {SCENARIO_DIR})")
        return
    overrides: dict[str, Any] = {}
    if seed is not None:
        overrides["seed"] = seed
    if duration is not None:
        overrides["time"] = {"duration_s": duration}
    if broker is not None:
        overrides["broker"] = {"url": broker}
    run_and_report(scenario, workdir=workdir, keep=keep, as_json=as_json, quiet=quiet,
                   overrides=overrides)
