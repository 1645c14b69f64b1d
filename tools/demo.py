"""``afc demo``: the main job on embedded defaults."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Run the self-demonstration."""
