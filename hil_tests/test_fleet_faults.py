"""The HIL fault suite: the whole system under every fault, reconciled at the end.

The short profile (``simulators/fleet/scenarios/ci.toml``, seeded, about a minute of riders
on five validators, a bayi terminal and a camera site) injects each fault of the issue:
kill -9 of a validator, of agents, of a center ingest worker and of the camera site's
firmware at seeded instants; a broker restart; two bus partitions (a silent blackhole and a
dropped link) through the link proxies; two power cuts of a validator between two commands
of a card write, then restart and re-tap; a full disk on the busiest validator; a clock set
back; a cloned and a rolled-back card; two blacklist deltas; a camera down and a cabinet
door opened. At the end every invariant of DESIGN.md is checked across the system
(:mod:`simulators.fleet.reconcile`), and then checked again on tampered evidence to show
the checks bite on real data too.

The long soak (``soak.toml``: fourteen validators, two bayi terminals, two sites, ten
minutes, every fault several times) runs with ``AFC_SLOW=1``.
"""

from __future__ import annotations

import sqlite3

import pytest

from simulators.fleet import FleetRun, load_scenario


def _run(tmp_path, name: str) -> tuple[FleetRun, object]:
    run = FleetRun(load_scenario(name), tmp_path / "run", progress=False)
    return run, run.run()


def _explain(result) -> str:
    return result.to_text() + f"\n(logs in {result.workdir})"


def test_ci_profile_every_fault_then_every_invariant(ci_fleet_run):
    # the one debug-level run of the ci scenario that test_no_secrets_in_logs.py scans too
    run, result = ci_fleet_run.run, ci_fleet_run.result
    assert result.error is None, _explain(result)
    assert result.ok, _explain(result)

    # every fault really happened (a fault that did not fire proves nothing)
    log = "\n".join(result.faults)
    for words in ("(validator)", "'s agent", "center ingest worker", "broker restart",
                  "(blackhole)", "(drop)", "mid-write", "disk full", "set back", "cloned",
                  "rolled back", "blacklist delta v2", "blacklist delta v3",
                  "power cut of camera site", "camera s1-cam-01", "cabinet door"):
        assert words in log, f"fault '{words}' never fired:\n{log}"
    stats = result.stats
    assert stats["power_cuts_fired"] == 2, log
    assert stats["disk_full_refusals"] >= 1, log  # the full disk refused taps, charged none
    assert stats.get("move_errors", 0) == 0 and stats["sites"] == 1
    assert stats["taps"] >= 50 and stats["topups"] >= 1
    assert not run.faults.errors, run.faults.errors

    # the same evidence, tampered with: the reconciliation must fail, and say why
    db = result.workdir / "center" / "center.db"
    with sqlite3.connect(db) as conn:
        dev, seq = conn.execute(
            "SELECT device_id, seq FROM records WHERE phase = 'done' AND kind = 'tap' "
            "AND outcome = 'ok' AND balance_after IS NOT NULL ORDER BY device_id, seq "
            "LIMIT 1").fetchone()
        conn.execute("DELETE FROM records WHERE device_id = ? AND seq IN (?, ?)",
                     (dev, seq - 1, seq))
    again = run.reconcile()
    failed = {c.name for c in again.checks if not c.ok}
    assert failed == {"records", "cards"}, again.to_text()
    assert any(f"{dev}: missing seq" in f for f in again.failures), again.failures


@pytest.mark.slow
def test_soak_every_fault_repeatedly(tmp_path):
    run, result = _run(tmp_path, "soak")
    assert result.ok, _explain(result)
    assert result.stats["power_cuts_fired"] >= 4
    assert not run.faults.errors, run.faults.errors
