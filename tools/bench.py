"""``afc bench``: benchmarks that print figures and compare them with DESIGN.md's budgets."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Measure this machine against the budgets of DESIGN.md."""
