"""Benchmark figures for the camera-site firmware (issue 6's closing note).

- ``heap_hwm_bytes``: the heap high-water mark of a 10-camera site: the smallest MicroPython
  heap (``-X heapsize``, 1 KiB steps) in which the whole firmware boots, connects, and runs
  two full probe cycles (RTSP + ONVIF on every camera) without a MemoryError. This is what a
  board must have free, fragmentation included. Measured on the 64-bit unix port: an ESP32's
  32-bit objects are smaller, so the figure is an upper bound for it.
- ``heap_live_bytes``: ``gc.mem_alloc()`` after a collection, once the cycles ran.
- ``heap_code_bytes``: what importing the firmware's modules costs (bytecode compiled from
  source into the heap): on a device built with the modules frozen into the firmware image
  this moves to flash, and the heap need drops by about as much.
- ``cycle_alloc_bytes``: every byte allocated while one probe cycle of the N cameras runs
  (with the GC off, so garbage counts too): the churn a cycle adds above the live heap.
- ``status_bytes`` / ``telemetry_bytes`` / ``event_bytes``: payload of one retained status,
  one telemetry report and one ``camera-down`` event of that site; ``*_wire_bytes`` add the
  MQTT PUBLISH header and topic (what the link carries).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from simulators.broker import MosquittoBroker

from .cabinet import CabinetSensors
from .camera import CameraFarm
from .errors import FirmwareError
from .firmware import SiteFirmware, run_script
from .recorder import Recorder
from .siteconfig import dev_topic, new_key, site_config

DEV = "site-bench"
_IMPORTS = """
import gc
gc.collect()
a = gc.mem_alloc()
import asyncio, umqtt.simple
import afcsite.app, afcsite.hal_unix, afcsite.uplink
gc.collect()
print(gc.mem_alloc() - a)
"""
_BENCH = re.compile(r"^I bench (.*)$")


def _wire(topic: str, payload_len: int, qos: int) -> int:
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    varint = 1
    while remaining >= 128 ** varint:
        varint += 1
    return 1 + varint + remaining


def measure(cameras: int = 10, *, log: Callable[[str], None] | None = None,
            max_heap_kib: int = 512) -> dict[str, float]:
    """Run the firmware against ``cameras`` emulated cameras; the figures (see module doc)."""
    say = log or (lambda _m: None)
    key = new_key()
    with tempfile.TemporaryDirectory(prefix="afc-camera-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with MosquittoBroker(tmp / "broker") as broker, CameraFarm(cameras) as farm, \
                Recorder(broker.host, broker.port, client_id="bench") as rec:
            CabinetSensors(tmp / "cabinet.json")
            config = site_config(broker.host, broker.port, farm.config_entries(),
                                 timing={"wdt_ms": 1000, "telemetry_ms": 100},
                                 thresholds={"probe_parallel": 4})
            runs = 0

            def run(heapsize: str | None, cycles: int) -> dict[str, int] | None:
                nonlocal runs
                runs += 1
                fw = SiteFirmware(tmp / f"flash-{runs}", sensors=tmp / "cabinet.json",
                                  heapsize=heapsize, cycles=cycles,
                                  measure_alloc=heapsize is None)
                fw.provision(DEV, key, 1, config)
                fw.start()
                try:
                    status = fw.wait(timeout=60)
                except FirmwareError:
                    fw.kill()
                    return None
                for line in fw.lines:
                    m = _BENCH.match(line)
                    if m and status == 0:
                        return {k: int(v) for k, v in
                                (kv.split("=", 1) for kv in m.group(1).split())
                                if v.lstrip("-").isdigit()}
                return None

            # a full-heap run with one camera down: message sizes, live heap, a real event
            farm.set_fault("cam-01", "down")
            full = run(None, 4)
            if full is None:
                raise FirmwareError("the firmware did not complete a benchmark run")
            event = rec.wait_for(lambda m: m.leaf == "event"
                                 and m.json().get("event") == "camera-down", 10)
            farm.set_fault("cam-01", "ok")

            # the smallest heap that boots, connects and runs two full probe cycles
            lo, hi = 4, max_heap_kib  # lo fails, hi works
            if run(f"{hi}K", 2) is None:
                raise FirmwareError(f"the firmware does not run in {hi} KiB of heap")
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok = run(f"{mid}K", 2) is not None
                say(f"heap {mid} KiB: {'ok' if ok else 'too small'}")
                if ok:
                    hi = mid
                else:
                    lo = mid
    code = run_script(_IMPORTS)
    if code.returncode != 0:
        raise FirmwareError(f"importing the firmware failed: {code.stderr.strip()[-200:]}")
    status_topic = dev_topic(DEV, "status")
    tele_topic = dev_topic(DEV, "telemetry")
    event_topic = dev_topic(DEV, "event")
    return {
        "cameras_count": float(cameras),
        "heap_hwm_bytes": float(hi * 1024),
        "heap_live_bytes": float(full["mem_alloc_after_gc"]),
        "heap_code_bytes": float(int(code.stdout.split()[-1])),
        "cycle_alloc_bytes": float(full["cycle_alloc"]),
        "status_bytes": float(full["status_bytes"]),
        "status_wire_bytes": float(_wire(status_topic, full["status_bytes"], 1)),
        "telemetry_bytes": float(full["telemetry_bytes"]),
        "telemetry_wire_bytes": float(_wire(tele_topic, full["telemetry_bytes"], 0)),
        "event_bytes": float(len(event.payload)),
        "event_wire_bytes": float(_wire(event_topic, len(event.payload), 1)),
    }
