"""The MQTT uplink: micropython-lib's ``umqtt.simple`` with the three changes a field device
needs.

- ``connect``: the library opens its socket without a timeout, so a broker (or a firewall)
  that accepts TCP and never answers would hang the loop until the watchdog resets the site.
  Ours sets ``io_timeout`` on the socket before connecting; the handshake is the library's.
- ``wait_msg``: the library switches the socket back to blocking-forever after the first
  byte; ours keeps the timeout, records PUBACKs (so a QoS 1 publish is confirmed without
  blocking the event loop), bounds an incoming message (a config message larger than
  ``max_in`` is drained through a small buffer and reported, never allocated) and notes when
  the broker last spoke (for the keepalive check).
- ``publish_nowait``: sends a PUBLISH and returns its packet id; the caller polls
  ``check_msg`` until ``acked`` equals it. Packet ids wrap at 65535 (the library's grow
  without bound).
"""

import socket
import struct
import time

from umqtt.simple import MQTTClient, MQTTException


class Uplink(MQTTClient):
    def __init__(self, client_id, server, port, user, password, keepalive, io_timeout_ms,
                 max_in=4096):
        super().__init__(client_id, server, port=port, user=user, password=password,
                         keepalive=keepalive)
        self.io_timeout = io_timeout_ms / 1000
        self.max_in = max_in
        self.acked = -1
        self.last_rx = time.ticks_ms()
        self.last_tx = self.last_rx
        self._drain = bytearray(128)

    def connect(self, clean_session=True):
        self.sock = socket.socket()
        self.sock.settimeout(self.io_timeout)
        addr = socket.getaddrinfo(self.server, self.port)[0][-1]
        self.sock.connect(addr)
        # From here on this is umqtt.simple 1.3.4's handshake, unchanged.
        premsg = bytearray(b"\x10\0\0\0\0\0")
        msg = bytearray(b"\x04MQTT\x04\x02\0\0")
        sz = 10 + 2 + len(self.client_id)
        msg[6] = clean_session << 1
        if self.user is not None:
            sz += 2 + len(self.user) + 2 + len(self.pswd)
            msg[6] |= 0xC0
        if self.keepalive:
            msg[7] |= self.keepalive >> 8
            msg[8] |= self.keepalive & 0x00FF
        if self.lw_topic:
            sz += 2 + len(self.lw_topic) + 2 + len(self.lw_msg)
            msg[6] |= 0x4 | (self.lw_qos & 0x1) << 3 | (self.lw_qos & 0x2) << 3
            msg[6] |= self.lw_retain << 5
        i = 1
        while sz > 0x7F:
            premsg[i] = (sz & 0x7F) | 0x80
            sz >>= 7
            i += 1
        premsg[i] = sz
        self.sock.write(premsg, i + 2)
        self.sock.write(msg)
        self._send_str(self.client_id)
        if self.lw_topic:
            self._send_str(self.lw_topic)
            self._send_str(self.lw_msg)
        if self.user is not None:
            self._send_str(self.user)
            self._send_str(self.pswd)
        resp = self.sock.read(4)
        if not resp or len(resp) < 4 or resp[0] != 0x20 or resp[1] != 0x02:
            raise MQTTException("no CONNACK")
        if resp[3] != 0:
            raise MQTTException(resp[3])
        self.last_rx = self.last_tx = time.ticks_ms()
        return resp[2] & 1

    def close(self):
        """Drop the connection without DISCONNECT (so the broker sends the last will)."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def publish_nowait(self, topic, msg, retain=False, qos=0):
        pkt = bytearray(b"\x30\0\0\0")
        pkt[0] |= qos << 1 | retain
        sz = 2 + len(topic) + len(msg)
        if qos > 0:
            sz += 2
        i = 1
        while sz > 0x7F:
            pkt[i] = (sz & 0x7F) | 0x80
            sz >>= 7
            i += 1
        pkt[i] = sz
        self.sock.write(pkt, i + 1)
        self._send_str(topic)
        pid = 0
        if qos > 0:
            self.pid = self.pid % 65535 + 1
            pid = self.pid
            struct.pack_into("!H", pkt, 0, pid)
            self.sock.write(pkt, 2)
        self.sock.write(msg)
        self.last_tx = time.ticks_ms()
        return pid

    def ping(self):
        super().ping()
        self.last_tx = time.ticks_ms()

    def _read(self, n):
        b = self.sock.read(n)
        if not b or len(b) < n:
            raise OSError(-1)  # the broker closed the connection mid-packet
        return b

    def _skip(self, n):
        mv = memoryview(self._drain)
        while n > 0:
            k = self.sock.readinto(mv[: min(n, len(self._drain))])
            if not k:
                raise OSError(-1)
            n -= k

    def wait_msg(self):
        res = self.sock.read(1)
        self.sock.settimeout(self.io_timeout)
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)  # the broker closed the connection
        self.last_rx = time.ticks_ms()
        if res == b"\xd0":  # PINGRESP
            self._read(1)
            return None
        op = res[0]
        if op == 0x40:  # PUBACK
            b = self._read(3)
            if b[0] != 2:
                raise MQTTException("bad PUBACK")
            self.acked = b[1] << 8 | b[2]
            return op
        if op & 0xF0 != 0x30:
            return op  # SUBACK and the like: the caller reads the rest
        sz = self._recv_len()
        tl = self._read(2)
        tl = tl[0] << 8 | tl[1]
        topic = self._read(tl)
        sz -= tl + 2
        pid = 0
        if op & 6:
            p = self._read(2)
            pid = p[0] << 8 | p[1]
            sz -= 2
        if sz > self.max_in:
            self._skip(sz)
            msg = None  # too large: the callback reports it
        else:
            msg = self._read(sz) if sz else b""
        self.cb(topic, msg)
        if op & 6 == 2:
            pkt = bytearray(b"\x40\x02\0\0")
            struct.pack_into("!H", pkt, 2, pid)
            self.sock.write(pkt)
        elif op & 6 == 4:
            raise MQTTException("QoS 2 is not used")
        return op
