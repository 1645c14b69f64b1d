"""Shared by the harnesses: the repository on ``sys.path`` and the atheris entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(test_one_input: Callable[[bytes], None]) -> None:
    """Hand ``test_one_input`` to atheris (libFuzzer options come from the command line)."""
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: .venv/bin/pip install atheris (see fuzz/README.md)")
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
