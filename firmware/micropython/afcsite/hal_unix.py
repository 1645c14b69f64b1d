"""The hardware layer on the MicroPython unix port: what CI and the test rigs run.

- Flash is a directory (``--flash DIR``).
- The cabinet's sensors are a JSON file written by ``simulators.cameras.CabinetSensors``
  (``--sensors FILE``): ``temp_c``, ``humidity_pct``, ``door_open``, ``mains``, ``ups_pct``;
  ``bus_hang_ms`` makes the read block that long, as a sensor bus stuck by a slave holding the
  clock line does.
- The watchdog is a thread that, when the loop has not fed it for ``timeout_ms``, writes
  ``.wdt`` on flash and ends the process with SIGALRM: the process dies whatever the loop is
  stuck in (a blocking call included), as an MCU's hardware watchdog resets it; a supervisor
  (the test, ``afc sim camera site``) sees status -14 and starts it again, as the reset would.
- The reset cause comes from marker files: ``.wdt`` (watchdog), ``.run`` left behind
  (killed or crashed: like a power cut), neither (clean start).
"""

import gc
import json
import os
import sys
import time

WATCHDOG_SIGNAL = 14  # SIGALRM: the exit a supervisor recognises as a watchdog reset


class Hal:
    def __init__(self, argv):
        self.flash = "./"
        self.sensors = None
        self.cycles = 0  # stop after this many probe cycles (benchmarks); 0 = run forever
        self.measure_alloc = False  # count what the last benchmark cycle allocates (GC off)
        i = 1
        while i < len(argv):
            a = argv[i]
            v = argv[i + 1] if i + 1 < len(argv) else None
            if a == "--measure-alloc":
                self.measure_alloc = True
                i += 1
                continue
            if a == "--debug":  # log lines of every level (the default is info and above)
                from afcsite import log

                log.level = 0
                i += 1
                continue
            if a == "--flash" and v:
                self.flash = v if v.endswith("/") else v + "/"
            elif a == "--sensors" and v:
                self.sensors = v
            elif a == "--cycles" and v:
                self.cycles = int(v)
            else:
                raise SystemExit("usage: main.py --flash DIR [--sensors FILE] [--cycles N] "
                                 "[--measure-alloc] [--debug]")
            i += 2
        self._fed = [time.ticks_ms()]
        self._wdt_ms = 0

    # -- time ---------------------------------------------------------------------------

    def unix_ms(self):
        return time.time_ns() // 1000000

    def clock_ok(self):
        return True

    # -- network ------------------------------------------------------------------------

    def network_up(self):
        return True

    # -- sensors ------------------------------------------------------------------------

    def read_cabinet(self, out):
        """Fill ``out`` = [temp_c, humidity_pct, door_open, on_mains, ups_pct] (None where a
        sensor cannot be read)."""
        for i in range(5):
            out[i] = None
        if not self.sensors:
            return out
        try:
            with open(self.sensors) as f:
                r = json.load(f)
        except (OSError, ValueError):
            return out  # no file yet, or caught mid-replace: sensors unreadable this time
        hang = r.get("bus_hang_ms", 0)
        if isinstance(hang, int) and hang > 0:
            time.sleep_ms(hang)
        out[0] = _num(r.get("temp_c"))
        out[1] = _num(r.get("humidity_pct"))
        out[2] = _bool(r.get("door_open"))
        out[3] = _bool(r.get("mains"))
        out[4] = _num(r.get("ups_pct"))
        return out

    # -- memory -------------------------------------------------------------------------

    def mem_free(self):
        return gc.mem_free()

    # -- watchdog and resets ------------------------------------------------------------

    def wdt_start(self, timeout_ms):
        import _thread

        self._wdt_ms = timeout_ms
        self._fed[0] = time.ticks_ms()
        _thread.start_new_thread(self._watch, ())

    def wdt_feed(self):
        self._fed[0] = time.ticks_ms()

    def _watch(self):
        period = max(10, self._wdt_ms // 10)
        while time.ticks_diff(time.ticks_ms(), self._fed[0]) <= self._wdt_ms:
            time.sleep_ms(period)
        print("E watchdog-reset stalled_ms=%d" % time.ticks_diff(time.ticks_ms(), self._fed[0]))
        try:
            with open(self.flash + ".wdt", "w") as f:
                f.write("1")
        except OSError:
            pass
        os.system("kill -ALRM $PPID || kill -KILL $PPID")
        time.sleep(60)

    def reset_cause(self):
        cause = "power-on"
        if _exists(self.flash + ".wdt"):
            cause = "watchdog"
            os.remove(self.flash + ".wdt")
        elif _exists(self.flash + ".run"):
            cause = "unclean"
        with open(self.flash + ".run", "w") as f:
            f.write("1")
        return cause

    def clean_exit(self):
        try:
            os.remove(self.flash + ".run")
        except OSError:
            pass

    def exit(self, code):
        sys.exit(code)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _num(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v


def _bool(v):
    return v if isinstance(v, bool) else None
