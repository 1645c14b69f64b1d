"""Fault injection for virtual cards: tears, bit errors and slow answers, armed on the card.

The invariants this system must prove (tear-safe purse updates, no double charge, clean
rejection of garbled frames) are about what happens when the air interface misbehaves, so
the virtual card can be told to misbehave in exactly the ways real cards do:

* **tear** — the card leaves the field (loses power) after a given frame, with or without
  its answer getting out; or between the two phases of a WRITE, before the data arrives
  (memory unchanged) or after the data was written but before the ACK (memory changed, the
  reader hears nothing). The last case is the one a naive purse update gets wrong: the
  reader must assume the write may have happened.
* **bit errors** — flip bits in one chosen answer, or in any answer with a probability.
* **slow answers** — a real ``time.sleep`` before answering, for reader timeout tests.

Every fault is bounded: tears and single bit-error/slow faults fire once and disarm; the
continuous ones (noise, slow on every answer) stop at :meth:`CardFaults.clear`. Random
choices come from the card's seeded generator, so a test that seeds the card replays the
same faults. Counting starts when a fault is armed: "the 3rd frame" is the 3rd frame the
card receives *in the field* after the call.

Frames count every reader frame the card receives while in the field, answered or not;
answers count the non-silent answers it actually sends (silence has no bits to flip and
nothing to delay).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields

from firmware.core.iso14443a import BitFrame

from ..errors import SimulatorError

MAX_DELAY_S = 5.0
"""Upper bound of a slow answer: long enough for any reader timeout, short enough for CI."""

MAX_FLIPPED_BITS = 64
"""Upper bound of bits flipped in one answer (an answer has at most 18 bytes = 162 bits)."""


@dataclass
class CardCounters:
    """What the card has seen and done; tests and the rig's status page read these."""

    frames: int = 0
    """Reader frames received while in the field (answered or not)."""
    ignored: int = 0
    """Reader frames that arrived while the card was out of the field (after a tear)."""
    answers: int = 0
    """Non-silent answers sent to the reader."""
    lost_answers: int = 0
    """Answers the card computed but never sent because it was torn first."""
    tears: int = 0
    """Tears injected (the card left the field)."""
    bits_flipped: int = 0
    """Bits flipped in answers by bit-error faults."""
    delayed: int = 0
    """Answers held back by a slow-answer fault."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name, e.g. for a JSON status reply."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        """Back to zero (between test phases)."""
        for f in fields(self):
            setattr(self, f.name, 0)


def _positive_int(value: object, what: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SimulatorError(f"{what} must be a positive whole number, not {value!r}")
    if limit is not None and value > limit:
        raise SimulatorError(f"{what} must be at most {limit}, not {value}")
    return value


class CardFaults:
    """The faults armed on one virtual card (``card.faults``), and their bookkeeping.

    Arm with the public methods; the card calls the ``_on_*`` hooks on every frame. A lock
    shared with the card makes arming from a control-channel thread safe while a reader
    thread drives the card.
    """

    def __init__(self, rng: random.Random, lock: threading.RLock | None = None) -> None:
        self._rng = rng
        self._lock = lock or threading.RLock()
        self.clear()

    # -- arming -------------------------------------------------------------------------------

    def clear(self) -> None:
        """Disarm every fault (counters are kept; see :meth:`CardCounters.reset`)."""
        with self._lock:
            self._tear_countdown: int | None = None
            self._tear_answer = True
            self._write_countdown: int | None = None
            self._write_commit = False
            self._tear_on_data = False
            self._flip_countdown: int | None = None
            self._flip_count = 1
            self._noise_probability = 0.0
            self._noise_count = 1
            self._slow_seconds = 0.0
            self._slow_countdown: int | None = None

    def tear_after(self, n: int, *, answer: bool = True) -> None:
        """Tear the card at the ``n``-th frame from now (1 = the next frame).

        The card always processes that frame, so whatever it does to memory (a WRITE's data
        phase, a TRANSFER) happens. With ``answer`` its answer still reaches the reader and
        the card leaves right after; without, the card leaves before answering and the
        reader hears silence — it cannot tell whether the command took effect. To pull the
        card *before* a frame arrives, tear after the frame before it (or call
        ``card.remove()``). Replaces an earlier :meth:`tear_after`.
        """
        n = _positive_int(n, "tear_after frame number")
        with self._lock:
            self._tear_countdown = n
            self._tear_answer = bool(answer)

    def tear_in_write(self, *, commit: bool, nth: int = 1) -> None:
        """Tear the card inside the ``nth`` WRITE from now, between or after its two phases.

        The card accepts the WRITE command and sends its ACK either way. With
        ``commit=False`` it then leaves the field before the 16 data bytes arrive: memory is
        unchanged and the data frame meets silence. With ``commit=True`` it takes the data
        frame, writes the block (if the data phase is valid) and leaves before the final
        ACK: memory holds the new block, the reader hears silence. Only WRITE commands the
        card accepts count. Replaces an earlier :meth:`tear_in_write`.
        """
        nth = _positive_int(nth, "tear_in_write WRITE number")
        with self._lock:
            self._write_countdown = nth
            self._write_commit = bool(commit)
            self._tear_on_data = False

    def flip_bits(self, nth_answer: int, count: int = 1) -> None:
        """Flip ``count`` distinct random bits (data or parity) of the ``nth_answer``-th
        answer from now (1 = the next answer), once. Replaces an earlier :meth:`flip_bits`."""
        nth_answer = _positive_int(nth_answer, "flip_bits answer number")
        count = _positive_int(count, "flip_bits bit count", MAX_FLIPPED_BITS)
        with self._lock:
            self._flip_countdown = nth_answer
            self._flip_count = count

    def noise(self, probability: float, count: int = 1) -> None:
        """Flip ``count`` random bits of every answer with ``probability`` (0 disarms)."""
        if isinstance(probability, bool) or not isinstance(probability, int | float):
            raise SimulatorError(f"noise probability must be a number, not {probability!r}")
        if not 0.0 <= probability <= 1.0:
            raise SimulatorError(f"noise probability must be within 0..1, not {probability}")
        count = _positive_int(count, "noise bit count", MAX_FLIPPED_BITS)
        with self._lock:
            self._noise_probability = float(probability)
            self._noise_count = count

    def slow(self, seconds: float, nth_answer: int | None = None) -> None:
        """Sleep ``seconds`` (at most :data:`MAX_DELAY_S`) before answering: before every
        answer, or only before the ``nth_answer``-th answer from now. 0 disarms."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise SimulatorError(f"slow delay must be a number of seconds, not {seconds!r}")
        if not 0.0 <= seconds <= MAX_DELAY_S:
            raise SimulatorError(f"slow delay must be within 0..{MAX_DELAY_S} s, not {seconds}")
        if nth_answer is not None:
            nth_answer = _positive_int(nth_answer, "slow answer number")
        with self._lock:
            self._slow_seconds = float(seconds)
            self._slow_countdown = nth_answer

    # -- inspection ------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        """Whether any fault is armed."""
        return bool(self.describe())

    def describe(self) -> list[str]:
        """The armed faults in words, for a status reply or a test failure message."""
        with self._lock:
            out = []
            if self._tear_countdown is not None:
                how = "after answering" if self._tear_answer else "before answering"
                out.append(f"tear {how} frame {self._tear_countdown} from now")
            if self._tear_on_data:
                out.append("tear after the data of the WRITE in progress is written")
            elif self._write_countdown is not None:
                what = "after the data is written" if self._write_commit else "before the data"
                out.append(f"tear in WRITE {self._write_countdown} from now, {what}")
            if self._flip_countdown is not None:
                out.append(f"flip {self._flip_count} bit(s) of answer {self._flip_countdown}")
            if self._noise_probability:
                out.append(
                    f"flip {self._noise_count} bit(s) with probability "
                    f"{self._noise_probability:g} per answer"
                )
            if self._slow_seconds:
                which = (
                    "every answer"
                    if self._slow_countdown is None
                    else f"answer {self._slow_countdown}"
                )
                out.append(f"delay {which} by {self._slow_seconds:g} s")
            return out

    # -- hooks the card calls (with the lock held) ------------------------------------------------

    def _on_frame(self, *, write_acked: bool, data_taken: bool, waiting: bool) -> tuple[bool, bool]:
        """After the card processed a frame: ``(tear, deliver)`` — whether the card leaves
        the field now, and whether its answer gets out first.

        ``write_acked``: the frame was a WRITE command the card accepted. ``data_taken``:
        the frame was the data phase of a WRITE (written, or refused). ``waiting``: the card
        still waits for WRITE data (it NACKed a data frame with a bad CRC).
        """
        tear, deliver = False, True
        if self._tear_countdown is not None:
            self._tear_countdown -= 1
            if self._tear_countdown == 0:
                self._tear_countdown = None
                tear, deliver = True, self._tear_answer
        if self._tear_on_data:
            if data_taken:
                self._tear_on_data = False
                tear, deliver = True, False
            elif not waiting:
                # the write was abandoned (HLTA, reselection, a garbled frame): it lapses
                self._tear_on_data = False
        if write_acked and self._write_countdown is not None:
            self._write_countdown -= 1
            if self._write_countdown == 0:
                self._write_countdown = None
                if self._write_commit:
                    self._tear_on_data = True
                else:
                    tear = True
        return tear, deliver

    def _on_power_cycle(self) -> None:
        """The card left the field or was reset: a WRITE in flight is gone with it."""
        self._tear_on_data = False

    def _corrupt(self, answer: BitFrame) -> tuple[BitFrame, int]:
        """``answer`` with the bits the armed bit-error faults call for flipped, and how many."""
        count = 0
        if self._flip_countdown is not None:
            self._flip_countdown -= 1
            if self._flip_countdown == 0:
                self._flip_countdown = None
                count += self._flip_count
        if self._noise_probability and self._rng.random() < self._noise_probability:
            count += self._noise_count
        count = min(count, answer.length)
        if not count:
            return answer, 0
        mask = 0
        for position in self._rng.sample(range(answer.length), count):
            mask |= 1 << position
        return BitFrame(answer.bits ^ mask, answer.length, answer.collision), count

    def _delay(self) -> float:
        """Seconds to wait before sending the current answer."""
        if not self._slow_seconds:
            return 0.0
        if self._slow_countdown is None:
            return self._slow_seconds
        self._slow_countdown -= 1
        if self._slow_countdown:
            return 0.0
        seconds = self._slow_seconds
        self._slow_seconds, self._slow_countdown = 0.0, None
        return seconds
