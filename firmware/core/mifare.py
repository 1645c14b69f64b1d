"""MIFARE Classic command protocol, both roles, over bit frames.

The reader side (:class:`ClassicReader`) is written against one abstract
``transceive(BitFrame) -> BitFrame`` callable, so the same code drives a virtual card in
process, a PN532 in transparent mode (the host runs Crypto1 and supplies its own parity), or
a test double that injects faults. The card side (:class:`ClassicCard`) is a sans-I/O state
machine that consumes the reader's frames and returns its answers; the virtual cards of the
simulators wrap it with persistence and fault injection. Both roles share the framing of
:mod:`.iso14443a` and the cipher of :mod:`.crypto1`, so a bug in either shows up as a
disagreement between them in the tests rather than hiding on one side.

Protocol facts used here (MIFARE Classic EV1 datasheets, and the published analysis of the
authentication): commands carry a CRC_A; after authentication every frame, its parity bits
and the 4-bit ACK/NACK are encrypted; WRITE and the value commands are two-phase (command,
ACK, data); INCREMENT/DECREMENT/RESTORE answer the data phase with silence on success and
TRANSFER commits the card's internal transfer buffer. For a 7-byte UID the cipher is
initialised with the UID's last four bytes.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from . import classic_layout as layout
from ._framing import (
    classic_card_frame,
    classic_reader_ack,
    classic_reader_authenticate,
    classic_reader_command,
    classic_reader_read,
    classic_tag_frame,
    prng_jump,
)
from .anticollision import CardSelector, PiccState, masked_uid, select_card
from .classic_layout import KeyType, parse_key_type
from .crypto1 import (
    Cipher,
    Crypto1,
    decrypt_bits,
    decrypt_frame,
    decrypt_nested_nonce,
    decrypt_reader_answer,
    encrypt_bits,
    encrypt_frame,
    encrypt_nested_nonce,
    encrypt_reader_answer,
    prng_successor,
)
from .errors import (
    AccessBitsError,
    AuthenticationError,
    CodecError,
    CoreError,
    FrameError,
    NackError,
    NoResponseError,
    ProtocolError,
)
from .iso14443a import SILENCE, BitFrame, decode, encode, strip_crc, with_crc

# Command codes (first byte of a MIFARE Classic command frame).
AUTH_A = 0x60
AUTH_B = 0x61
READ = 0x30
WRITE = 0xA0
DECREMENT = 0xC0
INCREMENT = 0xC1
RESTORE = 0xC2
TRANSFER = 0xB0
HALT = 0x50

ACK = 0xA
NACK_INVALID_OP = 0x4  # invalid operation (not permitted, wrong block), transfer buffer valid
NACK_CRC = 0x5  # parity or CRC error, transfer buffer valid
NACK_INVALID_OP_TB_INVALID = 0x0
NACK_CRC_TB_INVALID = 0x1

NACK_MEANINGS = {
    0x0: "invalid operation (transfer buffer invalid)",
    0x1: "parity or CRC error (transfer buffer invalid)",
    0x4: "invalid operation: not allowed by the access bits, or a wrong block",
    0x5: "parity or CRC error",
}

Transceive = Callable[[BitFrame], BitFrame]
CipherFactory = Callable[[int], Cipher]


def auth_command(key_type: KeyType) -> int:
    return AUTH_A if key_type is KeyType.A else AUTH_B


# "A"/"B" in either case as a KeyType without an Enum call per authentication; anything else
# goes through parse_key_type
_KEY_TYPES = {"A": KeyType.A, "a": KeyType.A, "B": KeyType.B, "b": KeyType.B}


def is_trailer_address(block: int) -> bool:
    """Whether ``block`` is a sector trailer on any Classic card (1K and 4K agree: sectors
    of 4 blocks up to block 127, of 16 blocks from 128). The reader uses it to keep keys out
    of traces without knowing the card type."""
    return block % 16 == 15 if block >= 128 else block % 4 == 3


def cipher_uid(uid: bytes) -> int:
    """The 32 bits of the UID that seed the cipher: all of a 4-byte UID, the last 4 of a
    7-byte UID (what the card calls its 'cuid')."""
    if len(uid) not in (4, 7, 10):
        raise CodecError(f"a UID has 4, 7 or 10 bytes, not {len(uid)}")
    return int.from_bytes(uid[-4:], "big")


def key_to_int(key: bytes | int) -> int:
    if isinstance(key, int):
        if not 0 <= key < 1 << 48:
            raise CodecError("a MIFARE Classic key has 48 bits")
        return key
    if len(key) != 6:
        raise CodecError(f"a MIFARE Classic key has 6 bytes, not {len(key)}")
    return int.from_bytes(key, "big")


class ClassicAccess(Protocol):
    """What an application needs to work with a selected MIFARE Classic card, whoever runs
    Crypto1: :class:`ClassicReader` (the host, over bit frames) or a reader chip's own
    engine (the PN532's InDataExchange in chip-crypto mode). Code above this line does not
    care which."""

    uid: bytes

    def authenticate(self, block: int, key: bytes | int, key_type: str = "A") -> None: ...
    def read(self, block: int) -> bytes: ...
    def write(self, block: int, data: bytes) -> None: ...
    def increment(self, block: int, amount: int) -> None: ...
    def decrement(self, block: int, amount: int) -> None: ...
    def restore(self, block: int) -> None: ...
    def transfer(self, block: int) -> None: ...
    def halt(self) -> None: ...
    def reactivate(self) -> ClassicAccess:
        """A new session with the same card (after a failed authentication); raises
        :class:`NoResponseError` if the card left."""
        ...


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One frame on the air as the reader saw it, with the plaintext it stands for."""

    direction: str  # "R>C" reader to card, "C>R" card to reader
    frame: BitFrame
    plain: bytes | None
    note: str


Tracer = Callable[[TraceEntry], None]


class ClassicReader:
    """The reader (PCD) side of MIFARE Classic on an already selected card.

    Keeps the session cipher between commands: the first :meth:`authenticate` runs the plain
    three-pass authentication, later ones run the nested (encrypted) one. Any failure that
    leaves the session in doubt drops the cipher, as a real card does, so the caller must
    authenticate again.
    """

    def __init__(
        self,
        transceive: Transceive,
        uid: bytes,
        *,
        cipher_factory: CipherFactory = Crypto1,
        nonce: Callable[[], int] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._transceive = transceive
        self.uid = bytes(uid)
        self._cuid = cipher_uid(self.uid)
        self._new_cipher = cipher_factory
        self._nonce = nonce or (lambda: int.from_bytes(os.urandom(4), "big"))
        self._tracer = tracer
        self.cipher: Cipher | None = None
        self.sector_block: int | None = None  # block used for the current authentication

    def reset(self) -> None:
        """Forget the session: the card was re-selected, or left the field and came back."""
        self.cipher = None
        self.sector_block = None

    def reactivate(self) -> ClassicReader:
        """Select the same card again (WUPA, anticollision, SELECT) over the same air, with
        the session forgotten: a failed authentication silences a Classic card until then.

        :class:`NoResponseError` if the card left the field or another card answers in its
        place (the caller treats it as a card pulled mid-tap).
        """
        selected = select_card(self._transceive, wakeup=True)
        if bytes(selected.uid) != self.uid:
            raise NoResponseError(
                f"card {masked_uid(self.uid)} left the field: another card answered"
            )
        self.reset()
        return self

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, frame: BitFrame, plain: bytes | None, note: str) -> BitFrame:
        if self._tracer:
            self._tracer(TraceEntry("R>C", frame, plain, note))
        answer = self._transceive(frame)
        return answer

    def _note_answer(self, frame: BitFrame, plain: bytes | None, note: str) -> None:
        if self._tracer:
            self._tracer(TraceEntry("C>R", frame, plain, note))

    def _command(self, payload: bytes, note: str, secret: bool = False) -> BitFrame:
        """Send a command frame (CRC appended; encrypted when a session is open).

        With ``secret`` the tracer gets no plaintext: sector trailers carry keys. (The
        callers build ``note`` only when a tracer is set.)
        """
        if not self._tracer:
            return classic_reader_command(self, payload)  # the same, in C
        data = with_crc(payload)
        cipher = self.cipher
        frame = encrypt_frame(cipher, data) if cipher else encode(data)
        self._tracer(TraceEntry("R>C", frame, None if secret else data, note))
        return self._transceive(frame)

    def _expect_ack(self, answer: BitFrame, what: str) -> None:
        if classic_reader_ack(self, answer, what):  # a 4-bit ACK, checked in C
            return
        if not answer:
            self.cipher = None
            raise NoResponseError(f"card did not acknowledge {what}: card removed or torn")
        if answer.length != 4:
            self.cipher = None
            raise FrameError(f"expected a 4-bit ACK to {what}, got {answer.length} bits")
        code = decrypt_bits(self.cipher, answer) if self.cipher else answer.bits
        if self._tracer:
            self._note_answer(answer, bytes([code]), "ACK" if code == ACK else f"NACK {code:X}")
        if code != ACK:
            self._raise_nack(code, what)

    def _raise_nack(self, code: int, what: str) -> None:
        self.cipher = None
        meaning = NACK_MEANINGS.get(code, "unknown NACK code")
        raise NackError(code, f"card refused {what}: NACK 0x{code:X}, {meaning}")

    # -- authentication -----------------------------------------------------------------

    def authenticate(self, block: int, key: bytes | int, key_type: str | KeyType = "A") -> None:
        """Authenticate for the sector of ``block`` with a 6-byte key.

        Raises :class:`AuthenticationError` when the card does not prove knowledge of the
        key (wrong key, wrong key type, or a card that is not what it claims to be).
        """
        if not self._tracer and classic_reader_authenticate(self, block, key, key_type):
            return  # the whole exchange in C (it hands the unusual answers to the steps below)
        kt = _KEY_TYPES.get(key_type) if type(key_type) is str else None
        if kt is None:
            kt = parse_key_type(key_type.upper() if isinstance(key_type, str) else key_type)
        name = "A" if kt is KeyType.A else "B"
        k = key_to_int(key)
        if not 0 <= block <= 0xFF:
            raise CodecError(f"block number {block} out of range 0..255")
        nested = self.cipher is not None
        answer = self._command(
            bytes((AUTH_A if kt is KeyType.A else AUTH_B, block)),
            f"AUTH-{name} block {block}" + (" (nested, encrypted)" if nested else "")
            if self._tracer
            else "",
        )
        cipher = self._new_cipher(k)
        nt = self._auth_nonce(answer, cipher, nested, name, block)
        self._auth_reply(cipher, nt, self._nonce(), name, block)

    # The steps of an authentication after the AUTH command went out. They are separate so
    # that the C path (``classic_reader_authenticate``) can hand any answer it does not expect
    # to them, with the cipher as it was when the answer arrived: every failure is then
    # raised here, by the specification itself.

    def _auth_nonce(
        self, answer: BitFrame, cipher: Cipher, nested: bool, name: str, block: int
    ) -> int:
        """The card nonce ``nt`` from the card's answer to AUTH-``name``, with ``cuid ^ nt``
        fed into the new ``cipher`` (decrypted into it for a ``nested`` authentication)."""
        if not answer:
            self.cipher = None
            raise NoResponseError(f"card did not answer AUTH-{name} for block {block}")
        if answer.length == 4:
            code = decrypt_bits(self.cipher, answer) if nested else answer.bits
            self._raise_nack(code, f"AUTH-{name} for block {block}")
        if answer.length != 36:
            self.cipher = None
            raise FrameError(f"card nonce should be 4 bytes, got a {answer.length}-bit frame")
        if nested:
            nt = decrypt_nested_nonce(cipher, self._cuid, answer)
            if nt is None:  # decrypted parity bits wrong
                self.cipher = None
                raise AuthenticationError(
                    f"encrypted card nonce has bad parity during nested AUTH-{name} for "
                    f"block {block}: the card does not hold this key"
                )
            if self._tracer:
                self._note_answer(answer, nt.to_bytes(4, "big"), "{nt} card nonce (encrypted)")
        else:
            nt = int.from_bytes(decode(answer), "big")
            if self._tracer:
                self._note_answer(answer, nt.to_bytes(4, "big"), "nt card nonce (plain)")
            cipher.word(self._cuid ^ nt, False)
        return nt

    def _auth_reply(self, cipher: Cipher, nt: int, nonce: int, name: str, block: int) -> None:
        """Send {nr}{ar} (``nr`` from the reader's ``nonce``) and check the card's {at}."""
        nr = (nonce & 0xFFFFFFFF).to_bytes(4, "big")
        ar = prng_successor(nt, 64).to_bytes(4, "big")
        frame = encrypt_reader_answer(cipher, nr, ar)
        self.cipher = None
        answer = self._send(frame, nr + ar, "{nr}{ar}: reader nonce and answer suc64(nt)")
        self._auth_check(answer, cipher, nt, name, block)

    def _auth_check(self, answer: BitFrame, cipher: Cipher, nt: int, name: str, block: int) -> None:
        """The card's answer {at} to {nr}{ar}: the session opens if it is suc96(nt)."""
        if not answer:
            raise AuthenticationError(
                f"card did not accept the reader's answer (AUTH-{name}, block {block}): "
                "wrong key or wrong key type for this sector, or the card left the field"
            )
        if answer.length == 4:
            raise AuthenticationError(
                f"card answered the reader's challenge with a NACK (AUTH-{name}, block "
                f"{block}): wrong key"
            )
        try:
            at = int.from_bytes(decrypt_frame(cipher, answer), "big")
        except CoreError as exc:
            raise AuthenticationError(f"card's answer {{at}} is garbled: {exc}") from exc
        if self._tracer:
            self._note_answer(answer, at.to_bytes(4, "big"), "{at}: card answer suc96(nt)")
        if at != prng_successor(nt, 96):
            raise AuthenticationError(
                "card's answer does not match suc96(nt): the card does not know the key "
                "(possible emulator or relay)"
            )
        self.cipher = cipher
        self.sector_block = block

    def _require_session(self, what: str) -> None:
        if self.cipher is None:
            raise ProtocolError(f"{what} needs an authenticated session: authenticate first")

    def _encrypted_answer(self, answer: BitFrame, what: str, nbytes: int) -> bytes:
        if not answer:
            self.cipher = None
            raise NoResponseError(f"card did not answer {what}: card removed or torn")
        if answer.length == 4:
            self._raise_nack(decrypt_bits(self.cipher, answer), what)
        try:
            data = strip_crc(decrypt_frame(self.cipher, answer))
        except CoreError:
            self.cipher = None
            raise
        if len(data) != nbytes:
            self.cipher = None
            raise FrameError(f"answer to {what} has {len(data)} bytes, expected {nbytes}")
        return data

    # -- memory commands ------------------------------------------------------------------

    def read(self, block: int) -> bytes:
        """Read one 16-byte block of the authenticated sector."""
        data = classic_reader_read(self, block)  # the common case in C, or None
        if data is not None:
            return data
        self._require_session("READ")
        tracing = bool(self._tracer)
        answer = self._command(bytes((READ, block)), f"READ block {block}" if tracing else "")
        if type(answer) is BitFrame and answer.length == 162:
            # the answer expected (16 bytes and CRC_A, with parity): _encrypted_answer's
            # checks without building its messages
            try:
                data = strip_crc(decrypt_frame(self.cipher, answer))
            except CoreError:
                self.cipher = None
                raise
        else:
            data = self._encrypted_answer(answer, f"READ block {block}", 16)
        if tracing:
            self._note_answer(answer, data, f"block {block} data")
        return data

    def write(self, block: int, data: bytes) -> None:
        """Write one 16-byte block (two phases, each acknowledged)."""
        self._require_session("WRITE")
        if len(data) != 16:
            raise CodecError(f"a block has 16 bytes, not {len(data)}")
        self._expect_ack(
            self._command(bytes((WRITE, block)), f"WRITE block {block}"), f"WRITE {block}"
        )
        trailer = is_trailer_address(block)
        note = "trailer data (keys not shown)" if trailer else "data"
        self._expect_ack(
            self._command(bytes(data), note, secret=trailer), f"WRITE data for block {block}"
        )

    def _value_op(self, command: int, name: str, block: int, operand: int) -> None:
        self._require_session(name)
        self._expect_ack(self._command(bytes((command, block)), f"{name} {block}"), name)
        answer = self._command(operand.to_bytes(4, "little", signed=True), f"{name} operand")
        if answer:
            # success is silence; anything else is an (encrypted) NACK
            if answer.length == 4:
                self._raise_nack(decrypt_bits(self.cipher, answer), f"{name} of block {block}")
            self.cipher = None
            raise FrameError(f"unexpected {answer.length}-bit answer to the {name} operand")

    def increment(self, block: int, amount: int) -> None:
        """Load value block ``block`` plus ``amount`` into the transfer buffer."""
        if not 0 <= amount < 1 << 31:
            raise CodecError("increment amount must be 0 .. 2^31-1")
        self._value_op(INCREMENT, "INCREMENT", block, amount)

    def decrement(self, block: int, amount: int) -> None:
        """Load value block ``block`` minus ``amount`` into the transfer buffer."""
        if not 0 <= amount < 1 << 31:
            raise CodecError("decrement amount must be 0 .. 2^31-1")
        self._value_op(DECREMENT, "DECREMENT", block, amount)

    def restore(self, block: int) -> None:
        """Load value block ``block`` unchanged into the transfer buffer (for backups)."""
        self._value_op(RESTORE, "RESTORE", block, 0)

    def transfer(self, block: int) -> None:
        """Write the transfer buffer to value block ``block``: the commit point."""
        self._require_session("TRANSFER")
        self._expect_ack(
            self._command(bytes([TRANSFER, block]), f"TRANSFER to block {block}"), "TRANSFER"
        )

    def halt(self) -> None:
        """Put the card to sleep (HLTA, encrypted inside a session); it must stay silent."""
        answer = self._command(bytes([HALT, 0]), "HALT")
        self.cipher = None
        if answer:
            raise ProtocolError(f"card answered HALT with a {answer.length}-bit frame")


# ----------------------------------------------------------------------------------------
# Card side
# ----------------------------------------------------------------------------------------


class CardState(Enum):
    ACTIVE = "active"  # selected, not authenticated
    AUTH_NONCE_SENT = "auth_nonce_sent"  # waiting for {nr}{ar}
    AUTHENTICATED = "authenticated"
    WRITE_PENDING = "write_pending"  # WRITE acknowledged, waiting for 16 data bytes
    VALUE_PENDING = "value_pending"  # INC/DEC/RESTORE acknowledged, waiting for the operand
    HALTED = "halted"  # HLTA received: silent until the activation layer wakes it
    ABORTED = "aborted"  # a protocol error: silent; the activation layer falls back to IDLE


class TagNonces:
    """The card's 16-bit LFSR nonce generator: it free-runs while the card is powered, so
    successive nonces are suc^n of each other for some n that depends on timing."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        seed = self._rng.getrandbits(16) or 1
        # a valid 32-bit nonce is 32 consecutive bits of the 16-bit LFSR sequence
        self._x = prng_successor((seed << 16) | seed, 16)
        # randrange(1, 4096) of a random.Random is 1 + the first getrandbits(12) below 4095
        # (its _randbelow): drawn here directly, one call instead of three Python functions
        # (tests/test_mifare.py checks the sequence against randrange's)
        self._bits = self._rng.getrandbits if type(self._rng) is random.Random else None

    def __call__(self) -> int:
        bits = self._bits
        if bits is None:
            step = self._rng.randrange(1, 4096)
        else:
            step = bits(12)
            while step >= 4095:
                step = bits(12)
            step += 1
        self._x = prng_jump(self._x, 16 + step)  # prng_successor, by jump tables
        return self._x


@functools.lru_cache(maxsize=256)
def _decoded_access_bits(raw: bytes) -> layout.AccessConditions | None:
    # The card checks its access bits on every command, as the chip does; decoding them is
    # a pure function of three bytes, so a card in a tight loop pays for it once.
    try:
        return layout.decode_access_bits(raw)
    except CoreError:
        return None


@functools.cache
def _geometry(
    card_type: layout.CardType,
) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """The card's geometry lookups as tables, once per card type: number of blocks, sector
    of every block, trailer block of every sector, whether every block is a trailer.

    The layout functions validate their arguments on every call; a card in a tight loop
    asks the same few questions, so they are asked once here and looked up after that.
    """
    blocks = range(card_type.blocks)
    return (
        card_type.blocks,
        tuple(layout.sector_of(b, card_type) for b in blocks),
        tuple(layout.trailer_block(s, card_type) for s in range(card_type.sectors)),
        tuple(layout.is_trailer(b, card_type) for b in blocks),
    )


# What block_permits says for (access bits as stored, block, operation, key B?, blocks on the
# card), False for access bits that do not decode. Keyed by bytes, ints, str and bool, whose
# hashes are cheap (an Enum's __hash__ is Python code); bounded, since a fuzzed card can store
# any access bits.
_PERMITS: dict[tuple[bytes, int, str, bool, int], bool] = {}
_PERMITS_MAX = 8192


class ClassicCard:
    """The card (PICC) side of MIFARE Classic after selection, as a sans-I/O state machine.

    ``memory`` is the card's whole EEPROM (64 or 256 blocks of 16 bytes), mutated in place.
    Keys and access conditions are read from the sector trailers on every authentication
    and command, as the chip does, and enforced: an operation the access bits forbid gets a
    NACK. Feed reader frames to :meth:`handle`; it returns the answer (``SILENCE`` for none).
    """

    def __init__(
        self,
        uid: bytes,
        memory: bytearray,
        *,
        card_type: layout.CardType | None = None,
        cipher_factory: CipherFactory = Crypto1,
        nonces: Callable[[], int] | None = None,
    ) -> None:
        self.uid = bytes(uid)
        self._cuid = cipher_uid(self.uid)
        if card_type is None:
            card_type = layout.CardType.from_size(len(memory))
        if len(memory) != card_type.size_bytes:
            raise CodecError(
                f"memory of {len(memory)} bytes does not fit a {card_type.name} card"
            )
        self.card_type = card_type
        self._blocks, self._sector_of, self._trailer_of, self._is_trailer = _geometry(card_type)
        self.memory = memory
        self._new_cipher = cipher_factory
        self._nonces = nonces or TagNonces()
        self.reset()

    def reset(self) -> None:
        """Back to the selected, unauthenticated state (also what a field reset leads to)."""
        self.state = CardState.ACTIVE
        self.cipher: Cipher | None = None
        self.auth_sector: int | None = None
        self.auth_key_type: KeyType | None = None
        self._nt = 0
        self._pending_block = 0
        self._pending_op = 0
        self._transfer_buffer: tuple[int, int] | None = None  # (value, address byte)

    # -- memory helpers -------------------------------------------------------------------

    def block(self, n: int) -> bytes:
        return bytes(self.memory[16 * n : 16 * n + 16])

    def _trailer(self, sector: int) -> bytes:
        return self.block(self._trailer_of[sector])

    def _conditions(self, sector: int) -> layout.AccessConditions | None:
        """The sector's access conditions, or None when its access bits are corrupt: the
        chip then blocks the sector."""
        return _decoded_access_bits(self._trailer(sector)[6:9])

    def _permits(self, block: int, operation: str) -> bool:
        """Whether the authenticated key may do ``operation`` on ``block`` (the datasheet
        tables, including the rule that a readable key B grants nothing)."""
        sector = self._sector_of[block]
        if sector != self.auth_sector:
            return False
        at = 16 * self._trailer_of[sector] + 6
        key = (
            bytes(self.memory[at : at + 3]),
            block,
            operation,
            self.auth_key_type is KeyType.B,
            self._blocks,  # the card type (an Enum, slow to hash) by its size
        )
        allowed = _PERMITS.get(key)
        if allowed is None:
            conds = _decoded_access_bits(key[0])
            allowed = conds is not None and layout.block_permits(
                conds, block, operation, self.auth_key_type, self.card_type
            )
            if len(_PERMITS) >= _PERMITS_MAX:
                _PERMITS.clear()
            _PERMITS[key] = allowed
        return allowed

    def _read_trailer(self, block: int) -> bytes:
        """A trailer as a reader sees it: keys and unreadable fields masked out."""
        sector = self._sector_of[block]
        raw = self._trailer(sector)
        conds = self._conditions(sector)
        if conds is None:
            raise AccessBitsError(f"sector {sector} is blocked: its access bits are corrupt")
        cond, kt = conds.trailer, self.auth_key_type
        out = bytearray(16)  # key A is never readable
        if layout.trailer_permits(cond, "access_bits", "read", kt):
            out[6:10] = raw[6:10]
        if layout.trailer_permits(cond, "key_b", "read", kt):
            out[10:16] = raw[10:16]
        return bytes(out)

    def _write_trailer(self, block: int, new: bytes) -> None:
        """Write the trailer fields the access bits let this key write; the others keep
        their old bytes, as on the chip."""
        sector = self._sector_of[block]
        raw = bytearray(self._trailer(sector))
        conds = self._conditions(sector)
        if conds is None:
            raise AccessBitsError(f"sector {sector} is blocked: its access bits are corrupt")
        cond, kt = conds.trailer, self.auth_key_type
        fields = (("key_a", 0, 6), ("access_bits", 6, 10), ("key_b", 10, 16))
        for name, lo, hi in fields:
            if layout.trailer_permits(cond, name, "write", kt):
                raw[lo:hi] = new[lo:hi]
        self.memory[16 * block : 16 * block + 16] = raw

    # -- framing helpers --------------------------------------------------------------------

    def _four_bits(self, code: int) -> BitFrame:
        if self.cipher is not None:
            return encrypt_bits(self.cipher, code, 4)
        return _PLAIN_4BIT[code]

    def _nack(self, code: int) -> BitFrame:
        """A NACK, after which the chip drops its session and falls back to IDLE: the
        reader must select and authenticate again (why nfc-mfclassic re-selects after a
        failed block)."""
        frame = self._four_bits(code)
        self.cipher = None
        self.state = CardState.ABORTED
        return frame

    def _ack(self) -> BitFrame:
        return self._four_bits(ACK)

    def _answer(self, data: bytes) -> BitFrame:
        return encrypt_frame(self.cipher, data) if self.cipher else encode(data)

    def _abort(self) -> BitFrame:
        """A protocol violation: the chip drops the session and goes quiet."""
        self.cipher = None
        self.state = CardState.ABORTED
        return SILENCE

    # -- the state machine ----------------------------------------------------------------

    def handle(self, frame: BitFrame) -> BitFrame:
        """Consume one reader frame and return the card's answer (``SILENCE`` for none)."""
        # A frame in an open session: decrypted and answered in C when it is a READ, a
        # WRITE, an AUTH or the reader's {nr}{ar}, else handed to the methods below as the
        # code after this line would; outside a session a plain AUTH is answered in C too
        answer = classic_card_frame(self, frame)
        if answer is not None:
            return answer
        state = self.state
        if (
            state is CardState.HALTED
            or state is CardState.ABORTED
            # ``not frame``, without BitFrame.__bool__'s Python call for a BitFrame
            or (frame.length <= 0 if type(frame) is BitFrame else not frame)
        ):
            return SILENCE
        try:
            if state is CardState.AUTH_NONCE_SENT:
                return self._finish_auth(frame)
            if frame.length % 9:
                return self._abort()
            cipher = self.cipher
            data = decode(frame) if cipher is None else decrypt_frame(cipher, frame)
        except CoreError:
            # a frame the chip cannot read (parity) is ignored and ends an open session
            return self._abort()
        try:
            payload = strip_crc(data)
        except CoreError:
            return self._nack(NACK_CRC)
        try:
            if state is CardState.WRITE_PENDING:
                return self._write_data(payload)
            if state is CardState.VALUE_PENDING:
                return self._value_operand(payload)
            return self._command(payload)
        except CoreError:
            # memory that no longer decodes (a torn value block, broken access bits)
            return self._nack(NACK_INVALID_OP)

    def _command(self, payload: bytes) -> BitFrame:
        cmd = payload[0]
        size = len(payload)
        if cmd == HALT and size == 2 and payload[1] == 0:
            self.cipher = None
            self.state = CardState.HALTED
            return SILENCE
        if cmd in (AUTH_A, AUTH_B) and size == 2:
            return self._start_auth(KeyType.A if cmd == AUTH_A else KeyType.B, payload[1])
        if self.state is not CardState.AUTHENTICATED or size != 2:
            return self._nack(NACK_INVALID_OP)
        block = payload[1]
        if block >= self._blocks:
            return self._nack(NACK_INVALID_OP)
        if cmd == READ:
            if not self._permits(block, "read"):
                return self._nack(NACK_INVALID_OP)
            data = self._read_trailer(block) if self._is_trailer[block] else self.block(block)
            return self._answer(with_crc(data))
        if cmd == WRITE:
            if not self._permits(block, "write"):
                return self._nack(NACK_INVALID_OP)
            self._pending_block = block
            self.state = CardState.WRITE_PENDING
            return self._ack()
        op = _VALUE_OPS.get(cmd)
        if op is not None:
            if self._is_trailer[block] or not self._permits(block, op):
                return self._nack(NACK_INVALID_OP)
            if not layout.is_value_block(self.block(block)):
                return self._nack(NACK_INVALID_OP)
            self._pending_block = block
            self._pending_op = cmd
            self.state = CardState.VALUE_PENDING
            return self._ack()
        if cmd == TRANSFER:
            if (
                self._transfer_buffer is None
                or self._is_trailer[block]
                or not self._permits(block, "transfer")
            ):
                return self._nack(NACK_INVALID_OP)
            value, addr = self._transfer_buffer
            self.memory[16 * block : 16 * block + 16] = layout.encode_value_block(value, addr)
            return self._ack()
        return self._nack(NACK_INVALID_OP)

    def _write_data(self, payload: bytes) -> BitFrame:
        self.state = CardState.AUTHENTICATED
        if len(payload) != 16:
            return self._nack(NACK_INVALID_OP)
        block = self._pending_block
        if self._is_trailer[block]:
            self._write_trailer(block, payload)
        else:
            self.memory[16 * block : 16 * block + 16] = payload
        return self._ack()

    def _value_operand(self, payload: bytes) -> BitFrame:
        self.state = CardState.AUTHENTICATED
        if len(payload) != 4:
            return self._nack(NACK_INVALID_OP)
        operand = int.from_bytes(payload, "little", signed=True)
        value, addr = layout.decode_value_block(self.block(self._pending_block))
        if self._pending_op == INCREMENT:
            value += operand
        elif self._pending_op == DECREMENT:
            value -= operand
        if not -(1 << 31) <= value < 1 << 31:
            self._transfer_buffer = None
            return self._nack(NACK_INVALID_OP_TB_INVALID)
        self._transfer_buffer = (value, addr)
        return SILENCE

    # -- authentication -------------------------------------------------------------------

    def _start_auth(self, key_type: KeyType, block: int) -> BitFrame:
        if block >= self._blocks:
            return self._nack(NACK_INVALID_OP)
        sector = self._sector_of[block]
        trailer = self._trailer(sector)
        key = trailer[0:6] if key_type is KeyType.A else trailer[10:16]
        nested = self.cipher is not None
        return self._send_nonce(key_type, sector, key, nested, self._nonces())

    def _send_nonce(
        self, key_type: KeyType, sector: int, key: bytes, nested: bool, nonce: int
    ) -> BitFrame:
        """The rest of :meth:`_start_auth` once the nonce generator ran: the new session
        cipher and the nonce frame. (The C path hands an unusual ``nonce`` over here.)"""
        nt = nonce & 0xFFFFFFFF
        cipher = self._new_cipher(int.from_bytes(key, "big"))
        if nested:
            answer = encrypt_nested_nonce(cipher, self._cuid, nt)
        else:
            cipher.word(self._cuid ^ nt, False)
            answer = encode(nt.to_bytes(4, "big"))
        self.cipher = cipher
        self._nt = nt
        self.auth_sector = sector
        self.auth_key_type = key_type
        self._transfer_buffer = None
        self.state = CardState.AUTH_NONCE_SENT
        return answer

    def _finish_auth(self, frame: BitFrame) -> BitFrame:
        cipher = self.cipher
        try:
            # {nr} decrypted into the register, {ar} after it; not 8 bytes, or a decrypted
            # parity bit wrong: the reader does not hold the key
            plain = decrypt_reader_answer(cipher, frame)
        except CoreError:
            return self._abort()
        if int.from_bytes(plain[4:], "big") != prng_successor(self._nt, 64):
            return self._abort()
        at = prng_successor(self._nt, 96)
        self.state = CardState.AUTHENTICATED
        return encrypt_frame(cipher, at.to_bytes(4, "big"))


_VALUE_OPS = {INCREMENT: "increment", DECREMENT: "decrement", RESTORE: "restore"}
# The 4-bit ACK/NACK frames outside a session (frames are immutable: one of each serves all)
_PLAIN_4BIT = tuple(BitFrame(code, 4) for code in range(16))


class ClassicTag:
    """A whole MIFARE Classic card on the air: the ISO 14443-3 activation layer
    (:class:`CardSelector`: REQA/WUPA, anticollision, SELECT, HLTA) in front of the Classic
    protocol (:class:`ClassicCard`). This is what a virtual card puts in an RF field.

    The activation layer sees every frame first and claims only those that can be nothing
    else; the rest go to the Classic layer, which decrypts and decides. Whenever the card
    leaves ACTIVE (halted, woken again, or an error) its Crypto1 session is dropped.
    """

    def __init__(
        self,
        uid: bytes,
        memory: bytearray,
        *,
        card_type: layout.CardType | None = None,
        cipher_factory: CipherFactory = Crypto1,
        nonces: Callable[[], int] | None = None,
    ) -> None:
        self.card = ClassicCard(
            uid, memory, card_type=card_type, cipher_factory=cipher_factory, nonces=nonces
        )
        ct = self.card.card_type
        self.selector = CardSelector(uid, ct.atqa(len(uid)).to_bytes(2, "little"), ct.sak)

    @property
    def uid(self) -> bytes:
        return self.card.uid

    @property
    def memory(self) -> bytearray:
        return self.card.memory

    def reset(self) -> None:
        """The card lost power (left the field, or the field was switched off)."""
        self.selector.reset()
        self.card.reset()

    def handle(self, frame: BitFrame) -> BitFrame:
        """Consume one reader frame; return the answer (``SILENCE`` for none)."""
        # a frame in an open session or a plain AUTH, answered in C (see
        # ClassicCard.handle), or None
        answer = classic_tag_frame(self, frame)
        if answer is not None:
            return answer
        selector = self.selector
        card = self.card
        if selector.state is PiccState.ACTIVE and type(frame) is BitFrame:
            # what selector.handle does for a frame in ACTIVE, one call shorter
            answer = selector._handle_active(frame)
        else:
            answer = selector.handle(frame)
        if answer is not None:
            if card.state is not CardState.ACTIVE or selector.state is not PiccState.ACTIVE:
                card.reset()  # (``not selector.selected``)
            return answer
        answer = card.handle(frame)
        state = card.state
        if state is CardState.HALTED:
            selector.halt()
            card.reset()
        elif state is CardState.ABORTED:
            selector.abort()
            card.reset()
        return answer
