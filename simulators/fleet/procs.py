"""The fleet's child processes: start, watch, kill -9, restart, stop — all bounded in time.

Every process of the fleet (validators, bayi terminals, agents, the center, camera-site
firmware) is a :class:`ManagedProcess`: its own session (a kill never reaches the
orchestrator), stderr appended to a log file in the run folder (one per process, kept
across restarts, so a failing run can be read afterwards), and optionally its stdout read
line by line into a bounded buffer with a condition variable, which is how the
orchestrator sees a validator's display ("the rider saw the fare") without polling.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ProcessFailed

__all__ = ["ManagedProcess"]

log = logging.getLogger("afc.fleet.procs")

_LINES_KEPT = 2000


class ManagedProcess:
    """One child process and its restarts.

    ``watch_stdout`` keeps the last lines of stdout (each with a running number,
    :attr:`line_count`), so a caller can wait for "a line after number N"; otherwise stdout
    goes to the log file too. ``stdin`` opens a pipe for commands (the bayi terminal);
    ``merge_stderr`` reads stderr with stdout (its refusals are lines to wait for).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        watch_stdout: bool = False,
        stdin: bool = False,
        merge_stderr: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.watch_stdout = watch_stdout
        self.want_stdin = stdin
        self.merge_stderr = merge_stderr
        self.on_line = on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.lines: collections.deque[tuple[int, float, str]] = collections.deque(
            maxlen=_LINES_KEPT)
        self.line_count = 0
        self._cond = threading.Condition()
        self._log = None
        self._reader: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ManagedProcess:
        if self.running:
            return self
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _close_log
        self._log.write(f"--- {time.strftime('%H:%M:%S')} start #{self.starts + 1}: "
                        f"{' '.join(self.argv)}\n".encode())
        self._log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, start_new_session=True,
                stdin=subprocess.PIPE if self.want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.watch_stdout else self._log,
                stderr=subprocess.STDOUT if self.merge_stderr and self.watch_stdout
                else self._log,
            )
        except OSError as exc:
            raise ProcessFailed(f"{self.name}: cannot start {self.argv[0]}: {exc}") from None
        self.starts += 1
        if self.watch_stdout:
            self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                            name=f"out-{self.name}", daemon=True)
            self._reader.start()
        log.debug("%s started: pid=%d", self.name, self.proc.pid)
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log_file = self._log
            if log_file is not None:  # keep the display in the process's log too
                with contextlib.suppress(OSError, ValueError):
                    log_file.write(raw)
                    log_file.flush()
            with self._cond:
                self.line_count += 1
                self.lines.append((self.line_count, time.time(), line))
                self._cond.notify_all()
            if self.on_line is not None:
                self.on_line(line)
        with self._cond:
            self._cond.notify_all()

    def kill9(self) -> int | None:
        """SIGKILL, as a power cut: nothing is flushed, nothing is cleaned up."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        pid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        self.kills += 1
        log.info("%s killed (-9): pid=%d", self.name, pid)
        return pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            if self.want_stdin and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing it", self.name, timeout)
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        self._close_log()
        return proc.returncode

    def restart(self) -> ManagedProcess:
        if self.running:
            self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    # -- talking to it -------------------------------------------------------------------------

    def send(self, line: str) -> None:
        """Write one command line to its stdin."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            raise ProcessFailed(f"{self.name} is not running: cannot send {line.split()[0]!r}")
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            raise ProcessFailed(f"{self.name}: stdin closed: {exc}") from None

    def wait_line(self, after: int, predicate: Callable[[str], bool],
                  timeout: float) -> tuple[int, float, str] | None:
        """The first stdout line numbered above ``after`` that satisfies ``predicate``, or
        None when ``timeout`` passes or the process ends first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.lines:
                    if item[0] > after and predicate(item[2]):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    return None
                self._cond.wait(min(left, 0.2))

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 8192))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<ManagedProcess {self.name} {state}>"
