"""Turning raw probe results and sensor readings into states and alarms.

Cameras: each probe cycle gives a raw verdict (up, degraded, down); the reported state moves
to a new verdict only after it was seen ``need[verdict]`` cycles in a row, so one lost packet
does not page anyone and a flapping camera does not flood the center.

Cabinet: alarms are raised on change (door opened, over-temperature, mains lost, UPS battery
low) and cleared with hysteresis where the reading is analog. At boot the first reading sets
the state and raises the alarms that are active then (a door found open after a reboot is
reported), never the "all normal" events.
"""

UP = "up"
DEGRADED = "degraded"
DOWN = "down"


class Camera:
    """One camera's hysteresis state and its last probe figures."""

    def __init__(self, spec):
        self.id = spec["id"]
        self.host = spec["host"]
        self.rtsp_port = spec["rtsp_port"]
        self.onvif_port = spec["onvif_port"]
        self.onvif_path = spec["onvif_path"]
        self.addr = None  # resolved once, by the prober
        self.state = None  # None until enough cycles agree
        self.cand = None
        self.count = 0
        # last probe figures (for events and telemetry)
        self.raw = None
        self.reason = ""
        self.rtt_ms = -1
        self.offset_ms = None

    def observe(self, raw, need):
        """Feed one raw verdict; returns the previous state when the state changed, else
        ``False`` (the previous state may be ``None`` at boot)."""
        if raw == self.state:
            self.cand = None
            self.count = 0
            return False
        if raw == self.cand:
            self.count += 1
        else:
            self.cand = raw
            self.count = 1
        if self.count >= need[raw]:
            old = self.state
            self.state = raw
            self.cand = None
            self.count = 0
            return old
        return False


def classify(cam, rtsp, onvif, th):
    """The raw verdict and its reason from one cycle's probe results.

    ``rtsp`` and ``onvif`` are ``(ok, reason, rtt_ms, offset_ms)``. Down: the RTSP server
    does not answer properly (no video can be pulled). Degraded: video answers but ONVIF does
    not, or it is slow, or the camera's clock is off (evidence timestamps would be wrong).
    """
    ok, reason, rtt, _ = rtsp
    cam.rtt_ms = rtt
    if not ok:
        cam.offset_ms = None
        return DOWN, "rtsp-" + reason
    ook, oreason, ortt, offset = onvif
    cam.offset_ms = offset
    if not ook:
        return DEGRADED, "onvif-" + oreason
    if rtt > th["slow_ms"] or ortt > th["slow_ms"]:
        return DEGRADED, "slow"
    if offset is not None and abs(offset) > th["clock_skew_ms"]:
        return DEGRADED, "clock"
    return UP, "ok"


class Cabinet:
    """Alarm state of the cabinet; :meth:`update` yields ``(event, severity, detail)``."""

    def __init__(self, th):
        self.th = th
        self.door_open = None
        self.on_mains = None
        self.hot = None
        self.ups_low = None
        self.temp_c = None
        self.humidity_pct = None
        self.ups_pct = None

    def alarms(self):
        """Active alarm tokens, for the retained status."""
        out = []
        if self.door_open:
            out.append("door-open")
        if self.on_mains is False:
            out.append("mains-lost")
        if self.hot:
            out.append("over-temperature")
        if self.ups_low:
            out.append("ups-battery-low")
        return out

    def update(self, r):
        """Take one reading ``r`` = [temp_c, humidity_pct, door_open, on_mains, ups_pct]
        (``None`` where a sensor could not be read) and return the events it causes."""
        th = self.th
        temp, hum, door, mains, ups = r
        self.temp_c = temp
        self.humidity_pct = hum
        self.ups_pct = ups
        out = []
        if door is not None and door != self.door_open:
            boot = self.door_open is None
            self.door_open = door
            if door:
                out.append(("door-open", "alarm", {}))
            elif not boot:
                out.append(("door-closed", "info", {}))
        if mains is not None and mains != self.on_mains:
            boot = self.on_mains is None
            self.on_mains = mains
            if not mains:
                out.append(("mains-lost", "alarm", {"ups_pct": _int(ups)}))
            elif not boot:
                out.append(("mains-back", "info", {}))
        if temp is not None:
            high = th["temp_high_c"]
            if self.hot is not True and temp >= high:
                self.hot = True
                out.append(("over-temperature", "alarm",
                            {"temp_c": _int(temp), "limit_c": high}))
            elif self.hot is not False and temp <= high - th["temp_hyst_c"]:
                boot = self.hot is None
                self.hot = False
                if not boot:
                    out.append(("temperature-ok", "info", {"temp_c": _int(temp)}))
        if ups is not None:
            low = th["ups_low_pct"]
            if self.ups_low is not True and ups < low:
                self.ups_low = True
                out.append(("ups-battery-low", "alarm", {"ups_pct": _int(ups), "limit_pct": low}))
            elif self.ups_low is not False and ups >= low + 5:
                boot = self.ups_low is None
                self.ups_low = False
                if not boot:
                    out.append(("ups-battery-ok", "info", {"ups_pct": _int(ups)}))
        return out


def _int(x):
    """Readings travel as integers (signed JSON carries no floats)."""
    if x is None:
        return None
    return int(x + 0.5) if x >= 0 else -int(-x + 0.5)
