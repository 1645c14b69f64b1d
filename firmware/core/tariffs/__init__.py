"""Tariffs shipped with the firmware, as TOML data beside this module.

A device normally receives its tariff as a signed bundle from the center; the shipped ones
are the factory default and the reference the tests and the simulators use. They are read
through :mod:`importlib.resources` so they work from a wheel as well as from a checkout.
"""

from __future__ import annotations

from importlib import resources

from ..fares import FareTable, FareTableError

__all__ = ["available", "load"]


def available() -> list[str]:
    """The names of the shipped tariffs (file names without ``.toml``), sorted."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".toml")
    )


def load(name: str = "konya-2025") -> FareTable:
    """Load a shipped tariff by name, e.g. ``load("konya-2025")``."""
    if name not in available():
        raise FareTableError(f"no shipped tariff {name!r} (have: {available()})")
    return FareTable.from_toml(resources.files(__name__).joinpath(f"{name}.toml").read_bytes())
