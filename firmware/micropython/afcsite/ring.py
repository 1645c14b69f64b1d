"""A bounded ring of outgoing messages on flash: events and offline telemetry.

Why on flash: an alarm raised while the uplink is down (the door opened during a mains cut)
must reach the center after a reboot too. Why bounded: the flash and the heap are small, and
a site offline for a week must keep working.

The file is a 16-byte header (magic, slot count, slot size) and ``slots`` fixed-size slots::

    u16 len | u8 kind | u8 spare | u32 ordinal | u32 seq | u32 time_s | u32 crc32 | payload

``kind`` is 1 (event) or 2 (telemetry), with bit 7 set once the center's broker acknowledged
it (the slot is free again). ``ordinal`` orders the slots (oldest first, across reboots).
``seq`` holds the device's event counter at the time of the write (an event's own number), so
the counter survives a reboot without a file of its own: the next event number is the largest
``seq`` on flash plus one. The CRC covers everything but the kind byte, so freeing a slot
(one byte) keeps it verifiable and a torn slot is skipped at boot.

When every slot is taken the oldest *telemetry* slot is overwritten; only a ring holding
nothing but events drops its oldest event, and counts it (the center sees the gap in ``seq``).
"""

import struct
from array import array
from binascii import crc32

from afcsite.errors import RingError

MAGIC = b"AFCRING1"
FILE_HDR = 16
SLOT_HDR = 20
_HDR_FMT = "<HBBIIII"
EVENT = 1
TELEMETRY = 2
FREED = 0x80


class Ring:
    """The ring file, with its index (kind, ordinal, time per slot) held in RAM.

    ``slots`` and ``slot_size`` are used when the file is created; an existing file keeps its
    own geometry (read from its header).
    """

    def __init__(self, path, slots=48, slot_size=1024):
        self.path = path
        self.dropped_events = 0
        self.dropped_telemetry = 0
        self.bad_slots = 0
        self.pinned = -1
        self.last_seq = 0
        self._next_ord = 1
        try:
            f = open(path, "r+b")  # noqa: SIM115 - kept open for the ring's life
        except OSError:
            f = self._create(path, slots, slot_size)
        self.f = f
        hdr = f.read(FILE_HDR)
        if len(hdr) < FILE_HDR or hdr[:8] != MAGIC:
            f.close()
            self.f = f = self._create(path, slots, slot_size)
            hdr = f.read(FILE_HDR)
        self.slots, self.slot_size = struct.unpack_from("<HH", hdr, 8)
        if self.slots < 2 or self.slot_size <= SLOT_HDR:
            raise RingError("ring file %s has a bad header: delete it" % path)
        n = self.slots
        self.kinds = bytearray(n)  # live kind per slot, 0 = free
        self.ords = array("I", (0 for _ in range(n)))
        self.times = array("I", (0 for _ in range(n)))
        self.rbuf = bytearray(self.slot_size)
        self.wbuf = bytearray(self.slot_size)
        self._scan()

    @staticmethod
    def _create(path, slots, slot_size):
        if not 2 <= slots <= 1024 or not 64 <= slot_size <= 4096:
            raise RingError("ring geometry %d x %d is out of range" % (slots, slot_size))
        try:
            f = open(path, "w+b")  # noqa: SIM115 - handed to the Ring, closed by close()
            hdr = bytearray(FILE_HDR)
            hdr[:8] = MAGIC
            struct.pack_into("<HH", hdr, 8, slots, slot_size)
            f.write(hdr)
            zero = bytearray(slot_size)
            for _ in range(slots):
                f.write(zero)
            f.flush()
            f.seek(0)
        except OSError as e:
            raise RingError("cannot create the ring file %s (flash full?): %s" % (path, e))
        return f

    def _crc(self, buf, length):
        mv = memoryview(buf)
        c = crc32(mv[0:2])
        c = crc32(mv[4:16], c)
        return crc32(mv[SLOT_HDR:SLOT_HDR + length], c)

    def _scan(self):
        f = self.f
        buf = self.rbuf
        mv = memoryview(buf)
        for i in range(self.slots):
            f.seek(FILE_HDR + i * self.slot_size)
            got = f.readinto(mv)
            if got is None or got < SLOT_HDR:
                continue
            length, kind, _, ordinal, seq, t, crc = struct.unpack_from(_HDR_FMT, buf, 0)
            if length == 0 and ordinal == 0:
                continue  # never written
            if length > self.slot_size - SLOT_HDR or self._crc(buf, length) != crc:
                self.bad_slots += 1
                continue
            if ordinal >= self._next_ord:
                self._next_ord = ordinal + 1
            if seq > self.last_seq:
                self.last_seq = seq
            self.ords[i] = ordinal
            live = kind & 0x7F
            if kind & FREED or live not in (EVENT, TELEMETRY):
                continue
            self.kinds[i] = live
            self.times[i] = t

    # -- queries ------------------------------------------------------------------------

    def depth(self):
        n = 0
        for k in self.kinds:
            if k:
                n += 1
        return n

    def oldest(self, kind=0):
        """Index of the oldest live slot (of ``kind`` if given), or -1."""
        best = -1
        for i in range(self.slots):
            k = self.kinds[i]
            if k and (kind == 0 or k == kind) and (best < 0 or self.ords[i] < self.ords[best]):
                best = i
        return best

    def oldest_time(self):
        i = self.oldest()
        return self.times[i] if i >= 0 else 0

    def kind(self, i):
        return self.kinds[i]

    def read(self, i):
        """The payload of slot ``i`` as a memoryview (valid until the next read)."""
        f = self.f
        f.seek(FILE_HDR + i * self.slot_size)
        mv = memoryview(self.rbuf)
        f.readinto(mv)
        length = struct.unpack_from("<H", self.rbuf, 0)[0]
        return mv[SLOT_HDR:SLOT_HDR + length]

    # -- changes ------------------------------------------------------------------------

    def append(self, kind, payload, seq, time_s):
        """Write one message; returns the kind that was dropped to make room (0 if none).

        ``seq`` is the event's number, or for telemetry the current event counter.
        """
        length = len(payload)
        if length > self.slot_size - SLOT_HDR:
            raise RingError("message of %d bytes does not fit a %d-byte slot"
                            % (length, self.slot_size - SLOT_HDR))
        dropped = 0
        i = -1
        for j in range(self.slots):
            if not self.kinds[j] and j != self.pinned:
                i = j
                break
        if i < 0:
            i = self._victim(TELEMETRY)
            if i >= 0:
                dropped = TELEMETRY
                self.dropped_telemetry += 1
            else:
                i = self._victim(EVENT)
                dropped = EVENT
                self.dropped_events += 1
        buf = self.wbuf
        ordinal = self._next_ord
        buf[SLOT_HDR:SLOT_HDR + length] = payload
        struct.pack_into(_HDR_FMT, buf, 0, length, kind, 0, ordinal, seq, time_s, 0)
        struct.pack_into("<I", buf, 16, self._crc(buf, length))
        try:
            self.f.seek(FILE_HDR + i * self.slot_size)
            self.f.write(memoryview(buf)[:SLOT_HDR + length])
            self.f.flush()
        except OSError as e:
            raise RingError("cannot write the ring file (flash full or worn?): %s" % e)
        self._next_ord = ordinal + 1
        if seq > self.last_seq:
            self.last_seq = seq
        self.kinds[i] = kind
        self.ords[i] = ordinal
        self.times[i] = time_s
        return dropped

    def _victim(self, kind):
        best = -1
        for i in range(self.slots):
            if i != self.pinned and self.kinds[i] == kind and (
                    best < 0 or self.ords[i] < self.ords[best]):
                best = i
        return best

    def free(self, i):
        """Mark slot ``i`` delivered (the broker acknowledged it)."""
        k = self.kinds[i]
        if not k:
            return
        try:
            self.f.seek(FILE_HDR + i * self.slot_size + 2)
            self.f.write(bytes((k | FREED,)))
            self.f.flush()
        except OSError as e:
            raise RingError("cannot write the ring file (flash full or worn?): %s" % e)
        self.kinds[i] = 0

    def close(self):
        try:
            self.f.close()
        except OSError:
            pass
