"""`afc demo`, the README's first command, end to end as an operator runs it — and the
fleet command's one-line failure when a scenario is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import click
from click.testing import CliRunner

from tools.cli import AfcGroup
from tools.fleet_sim_cmd import fleet


def test_afc_demo_runs_the_fleet_and_ends_with_the_reconciliation(tmp_path):
    work = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "demo", "--duration", "30", "--workdir", str(work)],
        capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "RESULT: every invariant holds" in out
    assert "balances agree to the kuruş" in out and "each once" in out
    result = json.loads((work / "result.json").read_text())
    clones = result["reconciliation"]["suspected_clones"]
    assert len(clones) == 2 and result["ok"]  # the cloned and the rolled-back card, only
    assert "too-fast" in out or "counter-regression" in out  # and how each was caught
    assert result["stats"]["sites"] == 1 and result["stats"]["taps"] > 40


def test_a_wrong_scenario_is_one_line_on_stderr(tmp_path):
    bad = tmp_path / "city.toml"
    bad.write_text("[faults]\nkil_agent = 2\n")

    @click.group(cls=AfcGroup)
    def afc() -> None:
        pass

    afc.add_command(fleet)
    result = CliRunner().invoke(afc, ["fleet", str(bad), "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("afc: error: ")
    assert "faults.kil_agent" in result.stderr and result.stdout == ""
