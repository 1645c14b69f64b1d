"""ISO/IEC 14443-3 type A activation: REQA/WUPA, the anticollision/SELECT cascade, HLTA.

Both roles are here, sans-I/O and at the level of bits on the air (:class:`BitFrame`):

* the card (PICC): :class:`CardSelector`, the IDLE/READY/ACTIVE/HALT state machine of one
  card, which a virtual card puts in front of its higher protocol layer (MIFARE Classic);
* the air: :func:`field_response` and :class:`Field`, several cards answering one reader
  frame at once, with bit collisions where their answers differ;
* the reader (PCD): :func:`select_card`, :func:`halt` and :func:`enumerate_cards`, written
  against any ``transceive(BitFrame) -> BitFrame`` callable (a :class:`Field`, a PN532 in
  transparent mode, a test double).

Modelling the cascade bit by bit instead of trusting a reader chip's "select" command is what
lets the simulators put two cards in one field, and lets the tests check the reader against
the card at the level where real collisions happen.

Protocol facts used (ISO/IEC 14443-3 clause 6, "Type A – Initialization and anticollision"):

* UID sizes 4, 7 and 10 bytes take 1, 2 and 3 cascade levels. Each level carries 4 bytes
  "UID CLn" plus BCC (their XOR). Every level but the last starts with the cascade tag 0x88
  followed by the next 3 UID bytes; the last level carries the last 4 UID bytes. uid0 of a
  single-size UID and uid3 of a double-size UID must not be 0x88 (Amendment 1), or the levels
  would be ambiguous.
* SEL codes 0x93/0x95/0x97 name the cascade level. NVB ("number of valid bits") counts what
  the reader sends *including SEL and NVB*: high nibble = whole bytes (2..7), low nibble =
  extra bits of a partial last byte (0..7). 0x20 = no UID bits yet, 0x70 = all 40 bits: that
  frame is SELECT and carries CRC_A; the card answers SAK + CRC_A. SAK bit 0x04 set means
  "UID not complete: go on with the next cascade level".
* ATQA is sent low byte first; its bits b5..b1 announce bit-frame anticollision (exactly one
  set on an ISO card; none set means a proprietary scheme, e.g. Topaz/Jewel).

Bit-oriented anticollision frames, the split-byte rule implemented here
(ISO/IEC 14443-3 6.2.3.3 "bit oriented anticollision frame"; the reader-side parity rule as
the NXP MFRC500/MFRC531 data sheets state it, 11.2.2.4 "receiving bit oriented frames"):

* The 7 bytes SEL, NVB, UID CLn (4), BCC are one frame split in two parts: part 1, from the
  reader, is SEL, NVB and the first ``n`` known UID CLn/BCC bits (16 + n data bits,
  0 <= n <= 39); part 2, from the card, is the remaining ``40 - n`` bits.
* Full-byte split (``n % 8 == 0``): the reader's last byte has its parity bit; the card
  answers whole bytes, each followed by its parity bit.
* Split byte (``n % 8 != 0``): the reader sends the ``n % 8`` low bits of the split byte and
  *no* parity bit after them. The card answers the ``8 - n % 8`` high bits of that byte, then
  one parity bit, then the remaining whole bytes with parity. The card computes that first
  parity bit over the whole split byte (all 8 bits, the reader's part included); the reader
  ignores it (the MFRC500 "ignores and does not check the first parity bit when RxAlign is
  not 0"), so only the parity of the whole bytes is checked.

In a :class:`BitFrame`, ``collision`` is the index of the first colliding bit *on the air*,
parity bits counted (a reader chip's CollPos register counts data bits only; a driver for
such a chip converts). For cards that follow this module, the first collision always lies
on a data bit: two cards that agree on every data bit of a byte agree on its parity too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Literal, Protocol

from .errors import (
    CodecError,
    CollisionError,
    CoreError,
    FrameError,
    NoResponseError,
    ProtocolError,
)
from .iso14443a import (
    _PARITY,
    CASCADE_TAG,
    HLTA,
    REQA,
    SEL_CL1,
    SEL_CL2,
    SEL_CL3,
    SILENCE,
    WUPA,
    BitFrame,
    concat,
    decode,
    encode,
    encode_bits,
    odd_parity,
    short_frame,
    split,
    strip_crc,
    with_crc,
)

Transceive = Callable[[BitFrame], BitFrame]

SEL_CODES = (SEL_CL1, SEL_CL2, SEL_CL3)
NVB_SELECT = 0x70
SAK_UID_INCOMPLETE = 0x04  # SAK bit: the UID goes on at the next cascade level
SAK_ISO14443_4 = 0x20  # SAK bit: the card speaks ISO/IEC 14443-4 (not needed for Classic)
UID_SIZES = (4, 7, 10)
LEVEL_BITS = 40  # UID CLn (32 bits) + BCC (8 bits)

_ATQA_BITS = 18  # 2 bytes with parity
_SAK_BITS = 27  # SAK + CRC_A, 3 bytes with parity
_SELECT_BITS = 81  # SEL NVB UID CLn BCC CRC_A, 9 bytes with parity
_HEAD_BITS = 18  # SEL and NVB with parity
_FULL_ANSWER_BITS = 45  # UID CLn and BCC, 5 bytes with parity


class BccError(ProtocolError):
    """The BCC of a UID CLn does not match its 4 bytes: a misread UID, or a faulty card."""


# --- frames and helpers shared by both roles -----------------------------------------------


def masked_uid(uid: bytes) -> str:
    """A UID as logs show it: its last two bytes only ("…A1B2"). A UID identifies a card and
    so its holder; two bytes are enough to follow one tap through the logs."""
    return "…" + bytes(uid[-2:]).hex().upper()


def bcc(data: bytes) -> int:
    """The block check character of one UID CLn: the XOR of its 4 bytes."""
    return data[0] ^ data[1] ^ data[2] ^ data[3]


def cascade_levels(uid: bytes) -> tuple[bytes, ...]:
    """The 5-byte "UID CLn ‖ BCC" each cascade level carries on the air, for a 4-, 7- or
    10-byte UID (cascade tag 0x88 in front of every level but the last)."""
    uid = bytes(uid)
    if len(uid) not in UID_SIZES:
        raise CodecError(f"a UID has 4, 7 or 10 bytes, not {len(uid)} ({uid.hex()})")
    if len(uid) == 4 and uid[0] == CASCADE_TAG:
        raise CodecError(f"single-size UID {uid.hex()} starts with the cascade tag 0x88")
    if len(uid) == 7 and uid[3] == CASCADE_TAG:
        raise CodecError(f"double-size UID {uid.hex()} has the cascade tag 0x88 as uid3")
    chunks = [bytes([CASCADE_TAG]) + uid[i : i + 3] for i in range(0, len(uid) - 4, 3)]
    chunks.append(uid[-4:])
    return tuple(c + bytes([bcc(c)]) for c in chunks)


def nvb(nbits: int) -> int:
    """NVB for a reader frame carrying ``nbits`` UID CLn/BCC bits after SEL and NVB."""
    if not 0 <= nbits <= LEVEL_BITS:
        raise FrameError(f"an anticollision frame carries 0..40 UID bits, not {nbits}")
    return ((2 + nbits // 8) << 4) | (nbits % 8)


# Frames the two roles build again at every tap from the same few arguments (the first
# ANTICOLLISION of a level, a card's SELECT, SAK and ATQA), kept by their arguments: frames
# are immutable. Only exact ints and bytes are keys; bounded, as a fuzzer sends anything.
_FRAMES: dict[tuple[object, ...], BitFrame] = {}


def _keep(key: tuple[object, ...], frame: BitFrame) -> BitFrame:
    if len(_FRAMES) >= 4096:
        _FRAMES.clear()
    _FRAMES[key] = frame
    return frame


def anticollision_frame(sel: int, known: int, nbits: int) -> BitFrame:
    """The reader's ANTICOLLISION frame: SEL, NVB and the first ``nbits`` (0..39) bits of
    ``known`` (UID CLn ‖ BCC as an integer, bit 0 first on the air, i.e. little-endian).

    Whole bytes carry parity; a partial last byte is sent without a parity bit.
    """
    if type(sel) is int and type(known) is int and type(nbits) is int:
        key = ("anticollision", sel, known, nbits)
        frame = _FRAMES.get(key)
        if frame is not None:
            return frame
        return _keep(key, _anticollision_frame(sel, known, nbits))
    return _anticollision_frame(sel, known, nbits)


def _anticollision_frame(sel: int, known: int, nbits: int) -> BitFrame:
    if not 0 <= nbits < LEVEL_BITS:
        raise FrameError(f"an ANTICOLLISION frame carries 0..39 UID bits, not {nbits}")
    whole, rest = divmod(nbits, 8)
    head = bytes([sel, nvb(nbits)]) + (known & ((1 << (8 * whole)) - 1)).to_bytes(whole, "little")
    tail = encode_bits((known >> (8 * whole)) & ((1 << rest) - 1), rest)
    return concat((encode(head), tail))


def select_frame(sel: int, level: bytes) -> BitFrame:
    """The reader's SELECT frame: SEL, 0x70, UID CLn ‖ BCC (5 bytes) and CRC_A."""
    key = ("select", sel, level)
    if type(sel) is int and type(level) is bytes:
        frame = _FRAMES.get(key)
        if frame is not None:
            return frame
    if len(level) != 5:
        raise FrameError(f"SELECT carries UID CLn and BCC (5 bytes), not {len(level)}")
    frame = encode(with_crc(bytes([sel, NVB_SELECT]) + bytes(level)))
    return _keep(key, frame) if type(sel) is int and type(level) is bytes else frame


def sak_frame(sak: int) -> BitFrame:
    """The card's answer to SELECT: SAK and CRC_A."""
    if type(sak) is int:
        frame = _FRAMES.get(("sak", sak))
        if frame is not None:
            return frame
        return _keep(("sak", sak), encode(with_crc(bytes([sak]))))
    return encode(with_crc(bytes([sak])))


HLTA_FRAME = encode(with_crc(bytes([HLTA, 0x00])))
_HLTA_LENGTH, _HLTA_BITS = HLTA_FRAME.length, HLTA_FRAME.bits


@lru_cache(maxsize=LEVEL_BITS + 1)
def _answer_layout(known: int) -> tuple[int, ...]:
    """Bit by bit, what the card's answer after ``known`` reader bits carries: a UID CLn/BCC
    bit index (``known``..39), or ``-1 - b`` for the parity bit of byte ``b``."""
    layout: list[int] = []
    for i in range(known, LEVEL_BITS):
        layout.append(i)
        if i % 8 == 7:
            layout.append(-1 - i // 8)
    return tuple(layout)


def anticollision_answer(level: bytes, known: int) -> BitFrame:
    """The card's answer when the reader already sent the first ``known`` bits of ``level``
    (UID CLn ‖ BCC): the remaining bits, framed by the split-byte rule of the module doc."""
    cacheable = type(level) is bytes and type(known) is int
    if cacheable:
        # a card answers the same (level, known) at every tap: frames are immutable, so the
        # one built the first time serves all
        answer = _ANSWERS.get((level, known))
        if answer is not None:
            return answer
    value = int.from_bytes(level, "little")
    bits = 0
    layout = _answer_layout(known)
    for pos, what in enumerate(layout):
        bit = (value >> what) & 1 if what >= 0 else odd_parity(level[-1 - what])
        bits |= bit << pos
    answer = BitFrame(bits, len(layout))
    if cacheable:
        if len(_ANSWERS) >= 1024:
            _ANSWERS.clear()
        _ANSWERS[level, known] = answer
    return answer


_ANSWERS: dict[tuple[bytes, int], BitFrame] = {}


def _read_answer(frame: BitFrame, known: int, stop: int, level_no: int) -> int:
    """UID CLn/BCC bits of the card's answer up to (not including) air bit ``stop``, as an
    integer in place (bit i = UID CLn/BCC bit i). Checks the parity of every whole byte; the
    split byte's parity bit is ignored, as ISO 14443-3 readers do."""
    if (
        known == 0
        and stop == _FULL_ANSWER_BITS
        and type(frame) is BitFrame
        and frame.length == _FULL_ANSWER_BITS
    ):
        # the answer to "no bits known yet" without a collision (every tap with one card in
        # the field): 5 whole bytes with parity. The loop below only to name a bad byte.
        data, parity = split(frame)
        par = _PARITY
        if (
            par[data[0]] == parity[0]
            and par[data[1]] == parity[1]
            and par[data[2]] == parity[2]
            and par[data[3]] == parity[3]
            and par[data[4]] == parity[4]
        ):
            return int.from_bytes(data, "little")
    layout = _answer_layout(known)
    value = 0
    for pos in range(stop):
        what = layout[pos]
        if what >= 0:
            value |= ((frame.bits >> pos) & 1) << what
        elif 8 * (-1 - what) >= known:
            byte_no = -1 - what
            byte = (value >> (8 * byte_no)) & 0xFF
            if odd_parity(byte) != (frame.bits >> pos) & 1:
                name = "BCC" if byte_no == 4 else f"UID CL{level_no} byte {byte_no}"
                raise FrameError(
                    f"parity error in the anticollision answer ({name} = 0x{byte:02x}) at "
                    f"cascade level {level_no}: noise on the air, or a card that is not ISO "
                    "14443-3 compliant; check the antenna and try again"
                )
    return value


# --- the card ---------------------------------------------------------------------------------


class PiccState(Enum):
    """States of ISO/IEC 14443-3 6.3 (READY* and ACTIVE* are READY/ACTIVE with
    :attr:`CardSelector.from_halt` set; POWER-OFF is what :meth:`CardSelector.reset` ends)."""

    IDLE = "idle"
    READY = "ready"
    ACTIVE = "active"
    HALT = "halt"


class CardSelector:
    """The activation layer of one type A card: answers REQA/WUPA, ANTICOLLISION, SELECT and
    HLTA, and tells its caller when a frame belongs to the layer above.

    ``uid`` is 4, 7 or 10 bytes; ``atqa`` the 2 bytes as sent (low byte first, e.g.
    ``04 00`` for a MIFARE Classic 1K); ``sak`` the SAK of the last cascade level (0x08 for a
    Classic 1K). Intermediate levels answer SAK 0x04 ("UID not complete").

    Transitions (ISO/IEC 14443-3 6.3; "any other data is an error" as the NXP card data
    sheets word it): IDLE leaves only on REQA/WUPA; HALT only on WUPA; in READY a frame that
    is not an ANTICOLLISION/SELECT of the current cascade level, a SELECT of another card,
    or a garbled frame (parity, CRC, length, NVB) sends the card back to IDLE (to HALT if it
    was woken from HALT); an ANTICOLLISION whose bits do not match leaves it silent and
    READY, so it can take part in the next round. In ACTIVE, HLTA leads to HALT and REQA,
    WUPA or a SELECT back to IDLE (HALT).

    In ACTIVE the card claims only frames that cannot be anything else: the 7-bit REQA/WUPA,
    an exact HLTA (``50 00 57 CD``) and a well-formed 81-bit SELECT with a good CRC. Every
    other frame — bit-oriented ANTICOLLISION frames and garbled ones included — gets
    ``None`` from :meth:`handle`: after MIFARE Classic authentication every frame is
    encrypted, and 4-byte ciphertext frames look like an HLTA with a bad CRC (``50`` with
    good parity: about 1 in 512) or a valid ``93 40 ..`` ANTICOLLISION (about 1 in 350,000)
    often enough to break sessions at random in a long soak. The higher layer
    decrypts and decides, then calls :meth:`halt` (it decrypted an HLTA) or :meth:`abort`
    (the frame was an error). Conversely it should drop its own session whenever
    :attr:`state` is no longer ACTIVE after :meth:`handle`.
    """

    def __init__(self, uid: bytes, atqa: bytes, sak: int) -> None:
        self.uid = bytes(uid)
        self.levels: tuple[bytes, ...] = cascade_levels(self.uid)
        if len(atqa) != 2:
            raise CodecError(f"ATQA has 2 bytes, not {len(atqa)} ({bytes(atqa).hex()})")
        if not 0 <= sak <= 0xFF or sak & SAK_UID_INCOMPLETE:
            raise CodecError(
                f"final SAK 0x{sak:02x} must be one byte without the 'UID not complete' bit 0x04"
            )
        self.atqa = bytes(atqa)
        self.sak = sak
        self.reset()

    # -- transitions the layer above (or the field) drives ------------------------------------

    def reset(self) -> None:
        """Field off and on again (or the card left the field and came back): IDLE."""
        self.state = PiccState.IDLE
        self.from_halt = False
        self.cascade_level = 1

    def halt(self) -> None:
        """Enter HALT; for a higher layer that decrypted an HLTA itself."""
        self.state = PiccState.HALT
        self.cascade_level = 1

    def abort(self) -> None:
        """A frame was an error: READY/ACTIVE fall back to IDLE, or to HALT if the card was
        woken from HALT (READY*/ACTIVE*); IDLE and HALT stay as they are."""
        if self.state in (PiccState.READY, PiccState.ACTIVE):
            self.state = PiccState.HALT if self.from_halt else PiccState.IDLE
        self.cascade_level = 1

    @property
    def selected(self) -> bool:
        """Whether the card is ACTIVE, i.e. a higher layer may talk to it."""
        return self.state is PiccState.ACTIVE

    # -- the air interface --------------------------------------------------------------------

    def handle(self, frame: BitFrame) -> BitFrame | None:
        """The card's answer to one reader frame: a frame, ``SILENCE`` when the card keeps
        quiet, or ``None`` when the card is ACTIVE and the frame is for the layer above.

        Garbage never raises: a card on the air cannot refuse with an exception, it stays
        silent. Only a non-:class:`BitFrame` argument (a programming error) raises
        :class:`FrameError`.
        """
        if not isinstance(frame, BitFrame):
            raise FrameError(f"a card handles BitFrames, not {type(frame).__name__}")
        if self.state is PiccState.ACTIVE:
            return self._handle_active(frame)
        if frame.length == 7:
            return self._request(frame.bits)
        first = frame.bits & 0xFF
        if frame.length >= 9 and first in SEL_CODES and (frame.bits >> 8) & 1 == _PARITY[first]:
            return self._handle_select(frame, first)
        return self._error()

    def _error(self) -> BitFrame:
        self.abort()
        return SILENCE

    def _request(self, command: int) -> BitFrame:
        if (self.state is PiccState.IDLE and command in (REQA, WUPA)) or (
            self.state is PiccState.HALT and command == WUPA
        ):
            self.from_halt = self.state is PiccState.HALT
            self.state = PiccState.READY
            self.cascade_level = 1
            atqa = self.atqa
            if type(atqa) is not bytes:
                return encode(atqa)
            frame = _FRAMES.get(("atqa", atqa))
            return frame if frame is not None else _keep(("atqa", atqa), encode(atqa))
        return self._error()  # REQA in HALT: stays HALT; REQA/WUPA in READY: an error

    def _handle_active(self, frame: BitFrame) -> BitFrame | None:
        length = frame.length
        if length == 7:
            return self._error() if frame.bits in (REQA, WUPA) else None
        if length == _HLTA_LENGTH and frame.bits == _HLTA_BITS:
            self.halt()
            return SILENCE
        if length == _SELECT_BITS:
            try:
                payload = strip_crc(decode(frame))
            except CoreError:
                return None
            if payload[0] in SEL_CODES and payload[1] == NVB_SELECT:
                return self._error()
        return None

    def _handle_select(self, frame: BitFrame, sel: int) -> BitFrame:
        if self.state is not PiccState.READY:
            return SILENCE  # IDLE and HALT ignore everything but REQA/WUPA
        if sel != SEL_CODES[self.cascade_level - 1] or frame.length < _HEAD_BITS:
            return self._error()
        code = (frame.bits >> 9) & 0xFF
        if (frame.bits >> 17) & 1 != odd_parity(code):
            return self._error()
        whole, rest = code >> 4, code & 0x0F
        if whole < 2 or rest > 7:
            return self._error()
        nbits = 8 * (whole - 2) + rest
        if nbits > LEVEL_BITS:
            return self._error()
        level = self.levels[self.cascade_level - 1]
        if nbits == LEVEL_BITS:
            return self._select(frame, level)
        if frame.length != _HEAD_BITS + 9 * (nbits // 8) + nbits % 8:
            return self._error()
        sent = 0
        pos = _HEAD_BITS
        for i in range(nbits // 8):
            chunk = (frame.bits >> pos) & 0x1FF
            if chunk >> 8 != odd_parity(chunk & 0xFF):
                return self._error()
            sent |= (chunk & 0xFF) << (8 * i)
            pos += 9
        sent |= ((frame.bits >> pos) & ((1 << (nbits % 8)) - 1)) << (8 * (nbits // 8))
        if (int.from_bytes(level, "little") ^ sent) & ((1 << nbits) - 1):
            return SILENCE  # not my UID: drop out of this round, stay READY
        return anticollision_answer(level, nbits)

    def _select(self, frame: BitFrame, level: bytes) -> BitFrame:
        if frame.length != _SELECT_BITS:
            return self._error()
        try:
            payload = strip_crc(decode(frame))
        except CoreError:
            return self._error()  # transmission error: no answer
        if payload[2:] != level:
            return self._error()  # another card was selected
        if self.cascade_level == len(self.levels):
            self.state = PiccState.ACTIVE
            return sak_frame(self.sak)
        self.cascade_level += 1
        return sak_frame(SAK_UID_INCOMPLETE)


# --- the air ----------------------------------------------------------------------------------


def field_response(answers: Iterable[BitFrame | None]) -> BitFrame:
    """What the reader hears when several cards answer the same frame: their bits
    superposed. Silent cards (``SILENCE`` or ``None``) add nothing; where the answering
    cards differ, the bit reads 1 and is a collision; ``collision`` of the result is the
    first such bit (or the first one an input already carried). Manchester coding makes a
    difference of two cards visible bit by bit, which is what the anticollision loop uses.
    """
    heard = [a for a in answers if a]
    if not heard:
        return SILENCE
    if len(heard) == 1:
        return heard[0]
    ones = zeros = collided = 0
    length = 0
    for f in heard:
        ones |= f.bits
        zeros |= ~f.bits & ((1 << f.length) - 1)
        length = max(length, f.length)
        if f.collision >= 0:
            collided |= 1 << f.collision
    collided |= ones & zeros
    first = (collided & -collided).bit_length() - 1 if collided else -1
    return BitFrame(ones, length, first)


class Card(Protocol):
    """What :class:`Field` needs of a card: :class:`CardSelector`, or a virtual card that
    puts one in front of its higher layer."""

    def handle(self, frame: BitFrame) -> BitFrame | None: ...

    def reset(self) -> None: ...


class Field:
    """The in-process "air": every reader frame reaches every card in the field, and the
    reader hears the superposition of their answers (:func:`field_response`)."""

    def __init__(self, cards: Iterable[Card] = ()) -> None:
        self.cards: list[Card] = list(cards)

    def add(self, card: Card) -> None:
        """A card enters the field (it powers up in IDLE only if it was reset before)."""
        self.cards.append(card)

    def remove(self, card: Card) -> None:
        """A card leaves the field: it loses power, so it is reset."""
        self.cards.remove(card)
        card.reset()

    def reset(self) -> None:
        """The reader switches the field off and on: every card is back in IDLE."""
        for card in self.cards:
            card.reset()

    def transceive(self, frame: BitFrame) -> BitFrame:
        """Broadcast ``frame`` to all cards and return what the reader hears."""
        cards = self.cards
        if len(cards) == 1:
            # field_response of a single answer, without the list and the superposition
            answer = cards[0].handle(frame)
            if type(answer) is BitFrame:
                return answer if answer.length > 0 else SILENCE
            return answer if answer else SILENCE
        return field_response([card.handle(frame) for card in cards])


# --- the reader -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelectedCard:
    """A card the reader has selected (it is ACTIVE now).

    ``levels`` holds the "UID CLn ‖ BCC" of each cascade level as read. ``atqa`` is what the
    reader heard; when several cards answered REQA with different ATQAs its colliding bits
    read 1 and ``atqa_collision`` is set, since no reader can tell which card sent what.
    """

    uid: bytes
    atqa: bytes
    sak: int
    levels: tuple[bytes, ...]
    atqa_collision: bool = False


def _request(transceive: Transceive, wakeup: bool) -> tuple[bytes, bool]:
    """REQA (or WUPA) and the ATQA heard: ``(atqa, collided)``."""
    command = WUPA if wakeup else REQA
    answer = transceive(short_frame(command))
    if not answer:
        hint = "" if wakeup else " (cards halted earlier only answer WUPA)"
        raise NoResponseError(
            f"no card answered {'WUPA' if wakeup else 'REQA'}: no card in the field{hint}"
        )
    if answer.length != _ATQA_BITS:
        raise FrameError(
            f"ATQA of {answer.length} bits, expected 18 (2 bytes with parity): noise on the "
            "air or a card that is not ISO 14443-3 type A"
        )
    if answer.collision >= 0:
        # several cards with different ATQAs: colliding bits read 1, parity means nothing
        return split(answer)[0], True
    try:
        atqa = decode(answer)
    except FrameError as exc:
        raise type(exc)(f"ATQA: {exc}") from exc
    if atqa[0] & 0x1F == 0:
        raise ProtocolError(
            f"ATQA {atqa.hex()} announces no bit-frame anticollision (a proprietary scheme, "
            "e.g. a Topaz/Jewel tag): not a card this system can use"
        )
    return atqa, False


def _resolve_level(transceive: Transceive, level_no: int, collision_bit: int) -> bytes:
    """The anticollision loop of one cascade level: UID CLn ‖ BCC of one card."""
    sel = SEL_CODES[level_no - 1]
    known = 0
    nbits = 0
    # Every round either completes the level or learns at least one more bit, so 40
    # rounds plus the last one always suffice; the bound guards against a broken
    # transceive that keeps inventing collisions.
    for _ in range(LEVEL_BITS + 1):
        answer = transceive(anticollision_frame(sel, known, nbits))
        if not answer:
            raise NoResponseError(
                f"no card answered ANTICOLLISION at cascade level {level_no} after {nbits} "
                "known UID bits: the card left the field during selection; tap again"
            )
        layout = _answer_layout(nbits)
        if answer.collision < 0:
            if answer.length != len(layout):
                raise FrameError(
                    f"anticollision answer of {answer.length} bits at cascade level "
                    f"{level_no}, expected {len(layout)} after {nbits} known bits: noise on "
                    "the air or a card that is not ISO 14443-3 compliant"
                )
            known |= _read_answer(answer, nbits, len(layout), level_no)
            return _checked_level(known, level_no)
        at = answer.collision
        if at >= min(answer.length, len(layout)):
            raise FrameError(
                f"collision reported at bit {at} of a {answer.length}-bit anticollision "
                f"answer at cascade level {level_no}: the reader's collision report is bogus"
            )
        if layout[at] < 0:
            raise CollisionError(
                f"collision in a parity bit at cascade level {level_no} with no data bit "
                "colliding before it: a card in the field computes parity wrongly; remove "
                "the other cards and tap again"
            )
        known |= _read_answer(answer, nbits, at, level_no)
        known |= collision_bit << layout[at]
        nbits = layout[at] + 1
        if nbits == LEVEL_BITS:
            return _checked_level(known, level_no)
    raise CollisionError(  # pragma: no cover - unreachable: nbits grows every round
        f"anticollision at cascade level {level_no} did not converge"
    )


def _checked_level(value: int, level_no: int) -> bytes:
    level = value.to_bytes(5, "little")
    if bcc(level) != level[4]:
        raise BccError(
            f"UID CL{level_no} {level[:4].hex()} has BCC 0x{level[4]:02x}, its bytes give "
            f"0x{bcc(level):02x}: the UID was misread (noise, or a collision the reader "
            "missed) or the card is faulty; tap again"
        )
    return level


def _select_level(transceive: Transceive, level_no: int, level: bytes) -> int:
    answer = transceive(select_frame(SEL_CODES[level_no - 1], level))
    if not answer:
        raise NoResponseError(
            f"no card answered SELECT for UID CL{level_no} {level[:4].hex()}: the card left "
            "the field, or the UID was misread; tap again"
        )
    if answer.collision >= 0:
        raise CollisionError(
            f"several cards answered SELECT for UID CL{level_no} {level[:4].hex()} with "
            "different SAKs: two cards share that UID (a clone next to the original?)"
        )
    if answer.length != _SAK_BITS:
        raise FrameError(
            f"SAK answer of {answer.length} bits at cascade level {level_no}, expected 27 "
            "(SAK and CRC_A with parity)"
        )
    try:
        payload = strip_crc(decode(answer))
    except FrameError as exc:
        raise type(exc)(f"SAK at cascade level {level_no}: {exc}") from exc
    return payload[0]


def _select_levels(
    transceive: Transceive, atqa: bytes, atqa_collision: bool, collision_bit: int
) -> SelectedCard:
    uid = b""
    levels: list[bytes] = []
    for level_no in (1, 2, 3):
        level = _resolve_level(transceive, level_no, collision_bit)
        sak = _select_level(transceive, level_no, level)
        levels.append(level)
        if not sak & SAK_UID_INCOMPLETE:
            # Follow the SAK, as reader chips do: a (non-ISO) single-size UID that starts
            # with 0x88 is read as it is rather than refused.
            uid += level[:4]
            return SelectedCard(uid, atqa, sak, tuple(levels), atqa_collision)
        if level[0] != CASCADE_TAG:
            raise ProtocolError(
                f"SAK 0x{sak:02x} at cascade level {level_no} says the UID is not complete, "
                f"but UID CL{level_no} {level[:4].hex()} has no cascade tag 0x88: faulty card"
            )
        uid += level[1:4]
    raise ProtocolError(
        "SAK at cascade level 3 still says the UID is not complete: no ISO UID is longer "
        "than 10 bytes; faulty card"
    )


def select_card(
    transceive: Transceive, *, wakeup: bool = False, collision_bit: Literal[0, 1] = 1
) -> SelectedCard:
    """Select one card: REQA (WUPA with ``wakeup``, which also wakes halted cards), then
    anticollision and SELECT at every cascade level the SAK asks for.

    On a collision the reader takes ``collision_bit`` (ISO suggests 1) for the first
    colliding bit and asks again with NVB covering the bits so far, so each round drops the
    cards that disagree; the card whose bits were chosen is selected, the others fall back
    to IDLE. Raises :class:`NoResponseError` (no card; a card left), :class:`FrameError`,
    :class:`CrcError` or :class:`ParityError` (garbled frames), :class:`BccError` (misread
    UID), :class:`CollisionError` (cards that cannot be told apart), :class:`ProtocolError`
    (a card breaking the protocol).
    """
    if collision_bit not in (0, 1):
        raise ValueError(f"collision_bit is 0 or 1, not {collision_bit!r}")
    atqa, atqa_collision = _request(transceive, wakeup)
    return _select_levels(transceive, atqa, atqa_collision, collision_bit)


def halt(transceive: Transceive) -> None:
    """Send HLTA (``50 00`` + CRC_A). A card acknowledges HLTA by staying silent; any answer
    means it did not halt, and :class:`ProtocolError` says so."""
    answer = transceive(HLTA_FRAME)
    if answer:
        raise ProtocolError(
            f"a card answered HLTA ({answer.length} bits) instead of keeping silent: it did "
            "not halt (not selected, or not ISO 14443-3 compliant)"
        )


def enumerate_cards(transceive: Transceive, *, limit: int = 8) -> list[SelectedCard]:
    """All cards in the field: select one, halt it, repeat until REQA goes unanswered.

    Only cards that answer REQA are found: cards already halted stay halted (a WUPA would
    wake the ones just enumerated too). A validator uses this to refuse a wallet with two
    cards instead of charging whichever card the loop happened to pick. More than ``limit``
    cards raises :class:`CollisionError`; a card selected twice (it ignored HLTA) raises
    :class:`ProtocolError`.
    """
    found: list[SelectedCard] = []
    while True:
        try:
            atqa, atqa_collision = _request(transceive, wakeup=False)
        except NoResponseError:
            return found
        if len(found) == limit:
            raise CollisionError(f"more than {limit} cards in the field")
        card = _select_levels(transceive, atqa, atqa_collision, 1)
        if any(card.uid == f.uid for f in found):
            raise ProtocolError(
                f"card {card.uid.hex()} was selected twice: it ignored HLTA, or two cards "
                "share that UID"
            )
        found.append(card)
        halt(transceive)
