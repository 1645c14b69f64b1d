"""The hardware layer on an ESP32 cabinet board (compiled by mpy-cross in CI; run on the
device only).

Wiring (change the pin numbers here for another board):

- DHT22 temperature/humidity on GPIO 4;
- door contact (closed = pulled to ground) on GPIO 5, input with pull-up;
- mains-present opto-coupler (mains = low) on GPIO 18, input with pull-up;
- UPS battery voltage through a 1:4 divider on ADC GPIO 34 (11 dB attenuation), 10.5 V
  empty .. 13.5 V full for a 12 V lead-acid battery.

Wi-Fi credentials come from identity.json (``"wifi": {"ssid": ..., "password": ...}``);
without them the board is expected to use a wired interface brought up in boot.py.
"""

import gc
import time

import machine
import network
import ntptime

PIN_DHT = 4
PIN_DOOR = 5
PIN_MAINS = 18
PIN_UPS = 34
UPS_EMPTY_MV = 10500
UPS_FULL_MV = 13500
DIVIDER = 4
_EPOCH_2000 = 946684800


class Hal:
    def __init__(self, argv=None):
        import dht

        self.flash = "/"
        self.cycles = 0
        self.measure_alloc = False
        self._dht = dht.DHT22(machine.Pin(PIN_DHT))
        self._door = machine.Pin(PIN_DOOR, machine.Pin.IN, machine.Pin.PULL_UP)
        self._mains = machine.Pin(PIN_MAINS, machine.Pin.IN, machine.Pin.PULL_UP)
        self._ups = machine.ADC(machine.Pin(PIN_UPS))
        self._ups.atten(machine.ADC.ATTN_11DB)
        self._wdt = None
        self._wlan = None
        self._synced = False
        self._next_sync = 0
        self._epoch = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0

    def unix_ms(self):
        return time.time_ns() // 1000000 + self._epoch * 1000

    def clock_ok(self):
        return self._synced

    def network_up(self):
        if self._wlan is None:
            self._wlan = network.WLAN(network.STA_IF)
            self._wlan.active(True)
            wifi = _wifi()
            if wifi:
                self._wlan.connect(wifi["ssid"], wifi["password"])
        up = self._wlan.isconnected() or _wifi() is None
        now = time.ticks_ms()
        if up and time.ticks_diff(now, self._next_sync) >= 0:
            self._next_sync = time.ticks_add(now, 3600000)
            try:
                ntptime.settime()
                self._synced = True
            except (OSError, OverflowError):
                self._next_sync = time.ticks_add(now, 60000)
        return up

    def read_cabinet(self, out):
        try:
            self._dht.measure()
            out[0] = self._dht.temperature()
            out[1] = self._dht.humidity()
        except OSError:
            out[0] = out[1] = None
        out[2] = self._door.value() == 1
        out[3] = self._mains.value() == 0
        mv = self._ups.read_uv() * DIVIDER // 1000
        pct = (mv - UPS_EMPTY_MV) * 100 // (UPS_FULL_MV - UPS_EMPTY_MV)
        out[4] = max(0, min(100, pct))
        return out

    def mem_free(self):
        return gc.mem_free()

    def wdt_start(self, timeout_ms):
        self._wdt = machine.WDT(timeout=timeout_ms)

    def wdt_feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset_cause(self):
        c = machine.reset_cause()
        if c == machine.WDT_RESET:
            return "watchdog"
        if c == machine.PWRON_RESET:
            return "power-on"
        if c == machine.SOFT_RESET:
            return "soft"
        return "unclean"

    def clean_exit(self):
        pass

    def exit(self, code):
        machine.reset()


def _wifi():
    import json

    try:
        with open("/identity.json") as f:
            w = json.load(f).get("wifi")
    except (OSError, ValueError):
        return None
    return w if isinstance(w, dict) and "ssid" in w else None
