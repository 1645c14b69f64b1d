"""``afc keys``: key diversification and the key store."""

from __future__ import annotations

import click


@click.group()
def keys() -> None:
    """Derive and manage card keys."""
