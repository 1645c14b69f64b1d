"""Shared by the harnesses: the repository on ``sys.path`` and the atheris entry point."""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _Closable(Protocol):
    def close(self) -> None: ...


R = TypeVar("R", bound=_Closable)


class RigPool(Generic[R]):
    """One throw-away rig (databases, keys) at a time for a harness: replaced after ``uses``
    inputs, so its databases stay small and state chains stay short, and closed when the
    process ends, so no scratch folder is left behind."""

    def __init__(self, make: Callable[[], R], uses: int) -> None:
        self._make = make
        self._uses = uses
        self._count = 0
        self.rig: R | None = None
        atexit.register(self.close)

    def next(self) -> R:
        """The rig for the next input."""
        if self.rig is None or self._count >= self._uses:
            self.close()
            self.rig, self._count = self._make(), 0
        self._count += 1
        return self.rig

    def close(self) -> None:
        if self.rig is not None:
            self.rig.close()
            self.rig = None


def run(test_one_input: Callable[[bytes], None]) -> None:
    """Hand ``test_one_input`` to atheris (libFuzzer options come from the command line)."""
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris (see fuzz/README.md)")
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
