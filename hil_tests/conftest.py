"""Fixtures of the hardware-in-the-loop suite: real processes wired by real ptys."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from firmware.reader.driver import Pn532
from simulators.rig import ReaderEmulatorProcess


@pytest.fixture
def reader_rig(tmp_path) -> Iterator[Callable[..., tuple[ReaderEmulatorProcess, Pn532]]]:
    """Start ``afc sim reader`` with the given card specs and open our driver on its pty.

    Usage: ``emulator, pn = reader_rig("new:1k", control=...)``. Everything started is
    stopped at the end of the test, within bounded time.
    """
    stack = contextlib.ExitStack()

    def start(*cards: str, **kwargs) -> tuple[ReaderEmulatorProcess, Pn532]:
        port = tmp_path / f"pn532-{len(stack._exit_callbacks)}"
        emulator = stack.enter_context(ReaderEmulatorProcess(port, list(cards), **kwargs))
        pn = stack.enter_context(Pn532.open(str(port), response_timeout=2.0))
        pn.set_max_retries(passive=1)
        return emulator, pn

    with stack:
        yield start
