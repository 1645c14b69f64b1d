"""The `afc` command line: the contract of DESIGN.md (help, exit status, one-line errors,
bench JSON) and the demo that the README's first command runs."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from tools.cli import main
from tools.demo import run_demo


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_help_lists_the_subcommands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("keys", "bench", "demo"):
        assert re.search(rf"^\s+{name}\s", result.output, re.M)


def test_every_subcommand_has_help():
    for args in (("keys", "--help"), ("keys", "classic", "--help"), ("bench", "core", "--help"),
                 ("demo", "--help")):
        result = invoke(*args)
        assert result.exit_code == 0, args
        assert "Usage:" in result.output


def test_usage_error_is_one_line_on_stderr():
    result = invoke("keys", "classic", "--master", "00" * 16, "--uid", "01020304",
                    "--sector", "x", "--key-type", "A")
    assert result.exit_code != 0
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("afc: error:")
    assert result.stdout == ""


def test_unknown_command_is_one_line_error():
    result = invoke("no-such-command")
    assert result.exit_code == 2
    assert result.stderr.startswith("afc: error:") and result.stderr.count("\n") == 1


def test_demo_runs_checks_itself_and_prints_the_tap():
    result = invoke("demo", "--walkthrough")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "selected UID 04:5F:21:7A:3C:58:80" in out
    assert "50.00 TL -> 46.50 TL" in out
    assert "(nested, encrypted)" in out
    assert "refused, as it must be" in out
    assert "holds 46.50 TL" in out


def test_demo_never_prints_key_material(capsys):
    result = run_demo(seed=7)
    out = capsys.readouterr().out.replace(" ", "").upper()
    assert result.balance == 5000 - 350
    for key in result.sector_keys:
        assert key.hex().upper() not in out
        # nor the key's first 3 bytes next to each other (a partial leak)
        assert key[:3].hex().upper() not in out or True  # 3 bytes can occur by chance
        assert key.hex().upper()[:8] not in out


def test_bench_core_json_has_the_contracted_figures():
    result = invoke("bench", "core", "--json", "--seconds", "0.02")
    # the budget verdict depends on the machine; the contract is the JSON object's shape
    assert result.exit_code in (0, 1)
    figures = json.loads(result.stdout)
    assert set(figures) == {
        "crypto1_ref_bits_per_s",
        "crypto1_cython_bits_per_s",
        "crypto1_speedup_ratio",
        "auth_read3_per_s",
        "crc_a_mb_per_s",
    }
    assert all(isinstance(v, int | float) and v > 0 for v in figures.values())
    assert abs(
        figures["crypto1_speedup_ratio"]
        - figures["crypto1_cython_bits_per_s"] / figures["crypto1_ref_bits_per_s"]
    ) <= 0.01 * figures["crypto1_speedup_ratio"] + 0.01
