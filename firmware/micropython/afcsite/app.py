"""The camera-site monitor: four asyncio tasks around a ring of messages on flash.

- ``_sensors`` reads the cabinet every ``sensor_ms`` and raises alarms on change.
- ``_probes`` probes every camera every ``probe_ms`` (a few at a time) and raises
  ``camera-down`` / ``camera-degraded`` / ``camera-up`` when a state changes (hysteresis).
- ``_uplink`` keeps the MQTT connection (exponential backoff with jitter), publishes the
  birth and the retained status, telemetry, and flushes the ring oldest first: an event leaves
  the ring only when the broker acknowledged it (QoS 1 PUBACK), so a broker down for an hour or
  a power cut loses none, and they arrive in order. Offline telemetry goes to the ring too,
  and is what gets dropped first when the ring is full.
- ``_feeder`` feeds the watchdog only while every task has checked in recently: a task stuck
  (or a loop blocked in a call that never returns) stops the feeding and the watchdog resets
  the board.

Every event is written to flash before anything tries to send it. Every wait is bounded.
"""

import asyncio
import errno
import gc
import random
import time

from afcsite import KIND, SW, log
from afcsite import config as cfgmod
from afcsite.canon import Encoder, Hmac
from afcsite.errors import ConfigError, ConfigRejected, EncodeError, RingError
from afcsite.health import DEGRADED, DOWN, UP, Cabinet, Camera
from afcsite.probe import Prober
from afcsite.ring import EVENT, TELEMETRY, Ring

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff
ticks_add = time.ticks_add

MSG_MAX = 1024  # the output buffer: the largest message the site sends
SLOT_SIZE = 1024  # a ring slot: 20-byte header + a message
EXIT_CONFIG = 78  # unix port: identity/config unusable (EX_CONFIG)
_TASKS = ("sensors", "probes", "uplink")


class Site:
    """One run of the monitor with one configuration; a new config means a new Site."""

    def __init__(self, hal, dev, key, version, cfg, boot_ms, cause=None):
        self.hal = hal
        self.dev = dev
        self.version = version
        self.cfg = cfg
        self.t = t = cfg["timing"]
        self.th = th = cfg["thresholds"]
        self.boot_ms = boot_ms
        self.cause = cause
        self.enc = Encoder(MSG_MAX, Hmac(key))
        self.ring = Ring(hal.flash + "ring.bin", cfg["ring_slots"], SLOT_SIZE)
        self.cams = [Camera(c) for c in cfg["cameras"]]
        self.cab = Cabinet(th)
        self.need = {UP: th["up_after"], DEGRADED: th["degraded_after"],
                     DOWN: th["down_after"]}
        self.prober = Prober(hal, t["probe_timeout_ms"], th["probe_parallel"])
        base = "afc/v1/dev/" + dev + "/"
        self.t_status = base + "status"
        self.t_tele = base + "telemetry"
        self.t_event = base + "event"
        self.t_cfg = "afc/v1/cfg/" + KIND + "/" + dev
        now = ticks_ms()
        self.beats = [now, now, now]
        rounds = (len(self.cams) + th["probe_parallel"] - 1) // th["probe_parallel"]
        io = t["io_timeout_ms"]
        self.allow = [
            t["sensor_ms"] + 1000,
            t["probe_ms"] + rounds * 2 * t["probe_timeout_ms"] + 1000,
            3 * io + 1000,
        ]
        self.reading = [None] * 5
        self.client = None
        self.online = False
        self.reload = False
        self.stop = False
        self.tele_pending = False
        self.status_dirty = True
        self.next_status = now
        self.cycles = 0
        self.cycle_alloc = 0
        self.mem_low = gc.mem_free()
        self._rejected = None  # hash of the last refused config payload (no repeats)

    # -- messages -----------------------------------------------------------------------

    def _base(self):
        return {"v": 1, "dev": self.dev, "ts": self.hal.unix_ms(), "kind": KIND}

    def _cam_states(self):
        out = {}
        for c in self.cams:
            if c.state is not None:
                out[c.id] = c.state
        return out

    def status(self, state):
        """The signed status (birth, periodic, last will); a view into the encoder."""
        msg = self._base()
        msg["state"] = state
        msg["sw"] = SW
        if state == "online":
            msg["cfg_version"] = self.version
            msg["cameras"] = self._cam_states()
            msg["alarms"] = self.cab.alarms()
        return self.enc.signed(msg)

    def telemetry(self):
        """The signed telemetry report; a view into the encoder."""
        now = ticks_ms()
        ring = self.ring
        msg = self._base()
        depth = ring.depth()
        msg["uptime_s"] = ticks_diff(now, self.boot_ms) // 1000
        msg["mem_free"] = gc.mem_free()
        msg["mem_low"] = self.mem_low
        msg["outbox_depth"] = depth
        msg["outbox_age_s"] = max(0, msg["ts"] // 1000 - ring.oldest_time()) if depth else 0
        if ring.dropped_events or ring.dropped_telemetry:
            msg["dropped"] = {"event": ring.dropped_events, "telemetry": ring.dropped_telemetry}
        msg["cameras"] = self._cam_states()
        skew = {}
        for c in self.cams:
            if c.offset_ms is not None and abs(c.offset_ms) > self.th["clock_skew_ms"]:
                skew[c.id] = c.offset_ms
        if skew:
            msg["cam_clock_offset_ms"] = skew
        cab = self.cab
        if cab.temp_c is not None:
            msg["temp_c"] = _round(cab.temp_c)
        if cab.humidity_pct is not None:
            msg["humidity_pct"] = _round(cab.humidity_pct)
        if cab.door_open is not None:
            msg["door"] = "open" if cab.door_open else "closed"
        if cab.on_mains is not None:
            msg["power"] = "mains" if cab.on_mains else "ups"
        if cab.ups_pct is not None:
            msg["ups_pct"] = _round(cab.ups_pct)
        msg["cfg_version"] = self.version
        return self.enc.signed(msg)

    def emit(self, event, severity, detail):
        """Sign an event with the next ``seq`` and put it on flash (the uplink sends it)."""
        seq = self.ring.last_seq + 1
        msg = self._base()
        msg["event"] = event
        msg["severity"] = severity
        msg["seq"] = seq
        msg["detail"] = detail
        try:
            dropped = self.ring.append(EVENT, self.enc.signed(msg), seq, msg["ts"] // 1000)
        except (EncodeError, RingError) as e:
            log.error("event-lost", dev=self.dev, seq=seq, event=event, error=e)
            return
        log.info("event", dev=self.dev, seq=seq, event=event, severity=severity)
        if dropped == EVENT:
            log.warn("ring-full", dev=self.dev, dropped="oldest-event",
                     total=self.ring.dropped_events)
        self.status_dirty = True

    def _note_mem(self):
        free = gc.mem_free()
        if free < self.mem_low:
            self.mem_low = free

    # -- tasks --------------------------------------------------------------------------

    async def run(self):
        if self.cause is not None:
            sev = "info" if self.cause in ("power-on", "soft") else "warning"
            self.emit("boot", sev, {"cause": self.cause, "sw": SW, "cfg_version": self.version})
        tasks = [asyncio.create_task(self._sensors()), asyncio.create_task(self._probes()),
                 asyncio.create_task(self._uplink())]
        try:
            await self._feeder()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.sleep_ms(0)

    async def _feeder(self):
        period = max(50, self.t["wdt_ms"] // 4)
        reported = -1
        while not (self.reload or self.stop):
            now = ticks_ms()
            late = -1
            for i in range(3):
                if ticks_diff(now, self.beats[i]) > self.allow[i]:
                    late = i
            if late < 0:
                self.hal.wdt_feed()
                reported = -1
            elif late != reported:
                log.error("task-stalled", dev=self.dev, task=_TASKS[late],
                          ms=ticks_diff(now, self.beats[late]))
                reported = late
            await asyncio.sleep_ms(period)

    async def _sensors(self):
        while True:
            self.beats[0] = ticks_ms()
            r = self.hal.read_cabinet(self.reading)
            for ev, sev, detail in self.cab.update(r):
                self.emit(ev, sev, detail)
            self._note_mem()
            await asyncio.sleep_ms(self.t["sensor_ms"])

    async def _probes(self):
        t = self.t
        while True:
            start = ticks_ms()
            self.beats[1] = start
            bench = self.hal.measure_alloc and self.cycles + 1 == self.hal.cycles
            if bench:  # the last benchmark cycle: count every byte it allocates
                gc.collect()
                alloc0 = gc.mem_alloc()
                gc.disable()
            await self.prober.cycle(self.cams, self.th)
            if bench:
                self.cycle_alloc = gc.mem_alloc() - alloc0
                gc.enable()
            self._note_mem()
            for cam in self.cams:
                old = cam.observe(cam.raw, self.need)
                if old is not False:
                    self._camera_changed(cam, old)
            self.cycles += 1
            if self.hal.cycles and self.cycles >= self.hal.cycles:
                self._bench_report()
                self.stop = True
                return
            left = t["probe_ms"] - ticks_diff(ticks_ms(), start)
            await asyncio.sleep_ms(left if left > 0 else 0)

    def _camera_changed(self, cam, old):
        new = cam.state
        detail = {"camera": cam.id, "from": old, "reason": cam.reason, "rtt_ms": cam.rtt_ms}
        if cam.offset_ms is not None:
            detail["clock_offset_ms"] = cam.offset_ms
        if new == DOWN:
            self.emit("camera-down", "alarm", detail)
        elif new == DEGRADED:
            self.emit("camera-degraded", "warning", detail)
        elif old is not None:
            self.emit("camera-up", "info", detail)
        else:
            log.info("camera", dev=self.dev, camera=cam.id, state=new)
        self.status_dirty = True

    def _bench_report(self):
        tele = len(self.telemetry())
        status = len(self.status("online"))
        gc.collect()
        log.info("bench", dev=self.dev, cycles=self.cycles, cameras=len(self.cams),
                 mem_low=self.mem_low, mem_free_after_gc=gc.mem_free(),
                 cycle_alloc=self.cycle_alloc,
                 mem_alloc_after_gc=gc.mem_alloc(), telemetry_bytes=tele,
                 status_bytes=status, topic_telemetry=len(self.t_tele),
                 topic_status=len(self.t_status))

    async def _uplink(self):
        t = self.t
        backoff = t["backoff_min_ms"]
        next_try = ticks_ms()
        next_tele = ticks_add(ticks_ms(), t["telemetry_ms"])
        while not (self.reload or self.stop):
            now = ticks_ms()
            self.beats[2] = now
            if ticks_diff(now, next_tele) >= 0:
                next_tele = ticks_add(now, t["telemetry_ms"])
                self._telemetry_due()
            if self.client is None:
                if ticks_diff(now, next_try) >= 0 and self.hal.network_up():
                    try:
                        await self._connect()
                        backoff = t["backoff_min_ms"]
                        continue
                    except Exception as e:  # any failure means "retry later"
                        self._drop_client()
                        wait = backoff + random.getrandbits(16) % (backoff // 4 + 1)
                        next_try = ticks_add(ticks_ms(), wait)
                        log.warn("uplink-down", dev=self.dev, error=_err(e), retry_ms=wait,
                                 outbox=self.ring.depth())
                        backoff = min(backoff * 2, t["backoff_max_ms"])
                await asyncio.sleep_ms(100)
                continue
            try:
                await self._serve_once()
            except Exception as e:  # the connection is gone; reconnect
                self._drop_client()
                next_try = ticks_add(ticks_ms(), backoff)
                log.warn("uplink-lost", dev=self.dev, error=_err(e), outbox=self.ring.depth())

    def _telemetry_due(self):
        if self.online and self.ring.depth() == 0:
            self.tele_pending = True
            return
        try:
            ring = self.ring
            mv = self.telemetry()
            dropped = ring.append(TELEMETRY, mv, ring.last_seq, self.hal.unix_ms() // 1000)
            if dropped:
                log.debug("ring-full", dev=self.dev,
                          dropped="oldest-telemetry" if dropped == TELEMETRY else "oldest-event")
        except (EncodeError, RingError) as e:
            log.error("telemetry-lost", dev=self.dev, error=e)

    async def _connect(self):
        from afcsite.uplink import Uplink

        b = self.cfg["broker"]
        c = Uplink(self.dev, b["host"], b["port"], b["user"], b["password"], b["keepalive_s"],
                   self.t["io_timeout_ms"], cfgmod.MAX_MESSAGE)
        c.set_last_will(self.t_status, bytes(self.status("offline")), True, 1)
        c.set_callback(self._on_message)
        self.client = c
        c.connect()
        await self._publish1(self.t_status, self.status("online"), True)
        self.status_dirty = False
        self.next_status = ticks_add(ticks_ms(), self.t["status_ms"])
        c.subscribe(self.t_cfg, 1)
        self.online = True
        log.info("uplink-up", dev=self.dev, broker=b["host"], port=b["port"],
                 outbox=self.ring.depth())

    def _drop_client(self):
        if self.client is not None:
            self.client.close()
        self.client = None
        self.online = False
        self.ring.pinned = -1

    async def _publish1(self, topic, payload, retain):
        """QoS 1 publish, waiting (bounded, without blocking other tasks) for the PUBACK."""
        c = self.client
        pid = c.publish_nowait(topic, payload, retain, 1)
        deadline = ticks_add(ticks_ms(), self.t["io_timeout_ms"])
        while c.acked != pid:
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise OSError(errno.ETIMEDOUT)
            await asyncio.sleep_ms(5)
            self.beats[2] = ticks_ms()
            if self.client is not c:
                raise OSError(errno.ECONNABORTED)
            c.check_msg()

    async def _serve_once(self):
        c = self.client
        for _ in range(4):
            if c.check_msg() is None:
                break
        if self.reload:
            return  # a new config: the uplink loop ends, the site restarts with it
        ring = self.ring
        i = ring.oldest()
        if i >= 0:
            kind = ring.kind(i)
            ring.pinned = i
            try:
                await self._publish1(self.t_event if kind == EVENT else self.t_tele,
                                     ring.read(i), False)
            finally:
                ring.pinned = -1
            ring.free(i)
            await asyncio.sleep_ms(0)
            return
        now = ticks_ms()
        if self.tele_pending:
            self.tele_pending = False
            c.publish_nowait(self.t_tele, self.telemetry(), False, 0)
        if self.status_dirty or ticks_diff(now, self.next_status) >= 0:
            self.status_dirty = False
            self.next_status = ticks_add(now, self.t["status_ms"])
            await self._publish1(self.t_status, self.status("online"), True)
        ka = self.cfg["broker"]["keepalive_s"] * 1000
        if ticks_diff(now, c.last_tx) > ka // 2:
            c.ping()
        if ticks_diff(now, c.last_rx) > ka + ka // 2:
            raise OSError(errno.ETIMEDOUT)  # no PINGRESP: the broker or the path is dead
        await asyncio.sleep_ms(50)

    def _on_message(self, topic, msg):
        """A message on the config topic (called from inside ``check_msg``); never raises."""
        try:
            if topic != self.t_cfg.encode():
                log.warn("unexpected-topic", dev=self.dev)
                return
            digest = None
            if msg is not None:
                import hashlib

                digest = hashlib.sha256(msg).digest()
                if digest == self._rejected:
                    return  # the same refused retained message again: reported already
            try:
                got = cfgmod.check_message(msg, self.dev, self.enc, self.version)
            except ConfigRejected as e:
                self._rejected = digest
                log.warn("cfg-rejected", dev=self.dev, reason=e.reason, version=self.version)
                self.emit("cfg-rejected", "warning",
                          {"reason": e.reason, "detail": e.detail[:120], "version": self.version})
                return
            if got is None:
                return  # the retained copy of the config in force
            version, cfg = got
            cfgmod.save(self.hal.flash, version, cfg)
            log.info("cfg-applied", dev=self.dev, version=version, previous=self.version)
            self.emit("cfg-applied", "info", {"version": version, "previous": self.version})
            self.reload = True
        except Exception as e:  # a bad message must not stop the site
            log.error("cfg-handler", dev=self.dev, error=_err(e))

    def shutdown(self, clean):
        """Leave the broker: on a clean stop publish ``offline`` (what the will would say)."""
        c = self.client
        if c is not None:
            try:
                if clean:
                    pid = c.publish_nowait(self.t_status, self.status("offline"), True, 1)
                    for _ in range(40):
                        c.check_msg()
                        if c.acked == pid:
                            break
                        time.sleep_ms(5)
                c.disconnect()
            except Exception as e:  # leaving anyway
                log.warn("uplink-close", dev=self.dev, error=_err(e))
            self.client = None
        self.ring.close()


def _round(x):
    return int(x + 0.5) if x >= 0 else -int(-x + 0.5)


def _err(e):
    return "%s(%s)" % (type(e).__name__, e)


def main(hal):
    """Run the site until stopped; a new config restarts it in-process."""
    boot = ticks_ms()
    try:
        dev, key = cfgmod.load_identity(hal.flash)
        version, cfg = cfgmod.load(hal.flash)
    except ConfigError as e:
        log.error("config", error=e)
        hal.exit(EXIT_CONFIG)
        return
    cause = hal.reset_cause()
    log.info("boot", dev=dev, sw=SW, cause=cause, cfg_version=version,
             cameras=len(cfg["cameras"]), mem_free=gc.mem_free())
    log.debug("timing", dev=dev, **cfg["timing"])  # what the field technician asks first
    hal.wdt_start(cfg["timing"]["wdt_ms"])
    while True:
        asyncio.new_event_loop()
        site = Site(hal, dev, key, version, cfg, boot, cause)
        cause = None
        try:
            asyncio.run(site.run())
        except KeyboardInterrupt:
            site.shutdown(True)
            hal.clean_exit()
            log.info("stopped", dev=dev)
            return
        if not site.reload:
            site.shutdown(True)
            hal.clean_exit()
            return
        site.shutdown(False)
        try:
            version, cfg = cfgmod.load(hal.flash)
        except ConfigError as e:
            log.error("config", dev=dev, error=e)
            hal.exit(EXIT_CONFIG)
            return
        gc.collect()
