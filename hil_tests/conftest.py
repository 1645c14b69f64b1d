"""Fixtures of the hardware-in-the-loop suite: real processes wired by real ptys."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


# -- one full fleet run at debug level, shared by every test that reads it -----------------


#: In-process records of the PN532 emulators' frame trace: each host command as the emulator
#: decoded it ("host > chip: IN_DATA_EXCHANGE tg=1 60 block=8 <key> ..."), and the serial line's
#: byte counts. They go to their own file, scanned apart by
#: hil_tests/test_no_secrets_in_logs.py: in chip mode the host sends the sector key to the
#: chip, and the trace is the one place that could print it.
PN532_FRAME_LOGGERS = ("simulators.pn532.server", "simulators.pn532.emulator")
PN532_FRAME_PREFIXES = ("host > chip", "chip > host")


@dataclass(frozen=True)
class CiFleetRun:
    """The ``ci`` scenario run once at debug level (see :func:`ci_fleet_run`)."""

    run: Any  # simulators.fleet.FleetRun: its databases and cards stay for reconcile()
    result: Any  # simulators.fleet.FleetResult
    base: Path  # everything the run wrote: ``run/`` (the run folder) and the files below
    in_process_log: Path  # every in-process logger at DEBUG but the PN532 frame trace
    pn532_frames_log: Path  # the PN532 emulators' frame trace (DEBUG)
    canary_key: bytes = field(repr=False)  # logged to fleet.log (DEBUG), every encoding
    canary_ed25519: Ed25519PrivateKey = field(repr=False)  # its PEM logged there too


def _is_frame_trace(record: logging.LogRecord) -> bool:
    return record.name in PN532_FRAME_LOGGERS and record.levelno == logging.DEBUG and \
        str(record.msg).startswith(PN532_FRAME_PREFIXES)


@pytest.fixture(scope="session")
def ci_fleet_run(tmp_path_factory) -> Iterator[CiFleetRun]:
    """The HIL fault profile (``simulators/fleet/scenarios/ci.toml``) run ONCE per session
    with every process at debug level (``FleetRun(log_level="debug")``), for every test
    that needs a full run: the secrets test greps everything it wrote, and the fault suite
    can reconcile the same run instead of starting its own (a full run is a minute of CI).

    Besides the run folder, this process's own loggers (the PN532 emulators, the link
    proxies, the camera farm, the publisher) are written at DEBUG to ``in-process.log``, and
    the emulators' frame trace to ``pn532-frames.log``. While the run starts, a canary key
    is logged through ``afc.fleet`` into the run's own ``fleet.log`` at DEBUG, once in each
    encoding a careless log line would use, so the secrets test can show its grep finds a
    key that did reach a log.
    """
    from cryptography.hazmat.primitives import serialization

    from simulators.fleet import FleetRun, load_scenario

    base = tmp_path_factory.mktemp("ci-fleet")
    canary = os.urandom(32)
    canary_ed25519 = Ed25519PrivateKey.generate()
    pem = canary_ed25519.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode()

    class CanaryRun(FleetRun):
        def _setup(self) -> None:
            # run() has opened fleet.log by now: these go through its real handler
            log = logging.getLogger("afc.fleet.canary")
            log.debug("canary-hex %s", canary.hex())
            log.debug("canary-HEX %s", canary.hex().upper())
            log.debug("canary-hex-spaced %s", canary.hex(" "))
            log.debug("canary-HEX-spaced %s", canary.hex(" ").upper())
            log.debug("canary-hex-colons %s", canary.hex(":"))
            log.debug("canary-HEX-colons %s", canary.hex(":").upper())
            log.debug("canary-base64 %s", base64.b64encode(canary).decode())
            log.debug("canary-base64url %s", base64.urlsafe_b64encode(canary).decode())
            log.debug("canary-repr %r", canary)
            log.debug("canary-list %s", list(canary))
            log.debug("canary-pem\n%s", pem)
            super()._setup()

    everything = logging.FileHandler(base / "in-process.log", encoding="utf-8")
    everything.addFilter(lambda record: not _is_frame_trace(record))
    frames = logging.FileHandler(base / "pn532-frames.log", encoding="utf-8")
    frames.addFilter(_is_frame_trace)
    root = logging.getLogger()
    fleet_logger = logging.getLogger("afc.fleet")
    saved = root.level, fleet_logger.level
    # The handlers already there (pytest's log capture) keep the level they saw so far: a
    # failing test's report must not print this DEBUG trace, keys and all.
    others = {h: h.level for h in root.handlers}
    for handler in others:
        handler.setLevel(max(handler.level, root.getEffectiveLevel()))
    for handler in (everything, frames):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # A logger an earlier in-process command set to INFO (``afc sim reader`` sets
    # "simulators") would hide its debug lines from this run: open every one for the run.
    raised = {lg: lg.level for lg in logging.Logger.manager.loggerDict.values()
              if isinstance(lg, logging.Logger) and lg.level > logging.DEBUG}
    for lg in raised:
        lg.setLevel(logging.NOTSET)
    try:
        run = CanaryRun(load_scenario("ci"), base / "run", progress=False, log_level="debug")
        result = run.run()
    finally:
        for handler in (everything, frames):
            root.removeHandler(handler)
            handler.close()
        for handler, level in others.items():
            handler.setLevel(level)
        root.setLevel(saved[0])
        fleet_logger.setLevel(saved[1])
        for lg, level in raised.items():
            lg.setLevel(level)
    yield CiFleetRun(run, result, base, base / "in-process.log", base / "pn532-frames.log",
                     canary, canary_ed25519)
