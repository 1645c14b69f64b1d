"""Card keys: AN10922 AES-128 diversification, MIFARE Classic sector keys, the key store.

Every card carries its own keys, derived from a master key and the card's UID, so that cracking
one card (Crypto1 falls in minutes) yields that card's keys and nothing else. The derivation
is NXP's AN10922 ("Symmetric key diversifications", AES-128 method): the same function a
MIFARE SAM AV2/AV3 computes, so a hardware SAM can later take over from the software one
without re-keying a single card. ``docs/keys.md`` states the derivation byte by byte.

Master keys never leave a :class:`KeyStore`: callers ask it for a card's diversified key or for
a CMAC, the way they would ask a SAM. Everything but :class:`FileKeyStore` is pure computation.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import cmac as _cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from firmware.durable import write_file

from .errors import CodecError, KeyStoreError

__all__ = [
    "AES128_KEY_SIZE",
    "AID_SIZE",
    "CARD_KEY_NAMES",
    "CLASSIC_AID",
    "CLASSIC_KEY_NAME",
    "CLASSIC_KEY_SIZE",
    "CLASSIC_KEY_TYPES",
    "CLASSIC_SECTORS",
    "CLASSIC_SYSTEM_TAG",
    "CLASSIC_UID_SIZES",
    "DEFAULT_KEY_NAMES",
    "MAX_DIVERSIFICATION_INPUT",
    "PURSE_MAC_KEY_NAME",
    "UID_SIZES",
    "FileKeyStore",
    "KeyStore",
    "KeyedCmac",
    "MemoryKeyStore",
    "PinnedKeyStore",
    "aes_cmac",
    "an10922_aes128",
    "card_key_versions",
    "classic_sector_key",
    "classic_system_id",
    "cmac_subkeys",
    "diversify_aes128",
]

AES_BLOCK = 16
AES128_KEY_SIZE = 16

#: AN10922's diversification constant for an AES-128 key, put in front of the input M.
DIV_CONSTANT_AES128 = 0x01
#: AN10922 allows at most 31 bytes of diversification input (32 with the constant).
MAX_DIVERSIFICATION_INPUT = 31

#: ISO/IEC 14443-3 UIDs: single, double and triple size.
UID_SIZES = (4, 7, 10)
#: MIFARE Classic cards come with a 4-byte (N)UID or a 7-byte UID.
CLASSIC_UID_SIZES = (4, 7)
#: A DESFire-style application identifier, as AN10922's example uses.
AID_SIZE = 3

CLASSIC_KEY_SIZE = 6
CLASSIC_SECTORS = 40  # MIFARE Classic 4K: sectors 0..39 (1K uses 0..15, the same keys)
CLASSIC_KEY_TYPES = ("A", "B")

#: The AID field of every sector key derivation: ASCII "AFC", the fare application.
CLASSIC_AID = b"AFC"
#: Opens the system identifier of every sector key derivation: ASCII "AFC-MFC1" (MIFARE
#: Classic sector keys, derivation layout 1). A later layout changes the digit, so keys of
#: the two layouts can never coincide by construction.
CLASSIC_SYSTEM_TAG = b"AFC-MFC1"

#: The store key from which MIFARE Classic sector keys are diversified.
CLASSIC_KEY_NAME = "classic-sector"
#: The store key for purse MACs (AES-CMAC over the purse record).
PURSE_MAC_KEY_NAME = "purse-mac"
#: What ``FileKeyStore.generate`` creates when not told otherwise.
JOURNAL_MAC_KEY_NAME = "journal-mac"
DEFAULT_KEY_NAMES = (CLASSIC_KEY_NAME, PURSE_MAC_KEY_NAME, JOURNAL_MAC_KEY_NAME)

_BytesLike = bytes | bytearray | memoryview


def _as_bytes(value: object, what: str, sizes: Iterable[int] | None = None) -> bytes:
    """Turn caller input into ``bytes`` or refuse it with the package's own error.

    Callers catch :class:`~firmware.core.errors.CoreError`; a ``TypeError`` from deep inside
    the AES library would slip past them and crash a validator on a malformed card read.
    """
    if type(value) is bytes:
        data = value  # immutable already: no copy (the common case, on every tap)
    elif isinstance(value, _BytesLike):
        data = bytes(value)
    else:
        raise CodecError(f"{what} must be bytes, not {type(value).__name__}")
    if sizes is not None:
        allowed = sizes if type(sizes) is tuple else tuple(sizes)
        if len(data) not in allowed:
            expected = " or ".join(str(n) for n in allowed)
            raise CodecError(f"{what} must be {expected} bytes long, got {len(data)}")
    return data


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-128 CMAC (NIST SP 800-38B, RFC 4493) of ``data``: 16 bytes.

    This and :class:`KeyedCmac`, which it runs, are the one CMAC path of the package:
    AN10922 diversification, the key store's MACs and the card MACs all end in
    :class:`KeyedCmac`, so the RFC 4493 vectors test all of them at once.
    """
    return KeyedCmac(key)(data)


class KeyedCmac:
    """AES-128 CMAC under one key, set up once: ``KeyedCmac(key)(data) == aes_cmac(key, data)``.

    Setting up a CMAC (the AES key schedule and the subkeys) costs several times what MACing
    a short message does, and a tap MACs with the same few keys again and again (the key
    store's masters, a card's three MAC keys). This object keeps the keyed state and copies
    it for every message. It holds key material: it is never shown, pickled or copied, and
    lives as long as whoever derived the key (a key store, one tap's
    :class:`~firmware.core.card_layout.CardMacs`).
    """

    __slots__ = ("_ctx", "_key", "_subkeys")

    def __init__(self, key: bytes, what: str = "AES-128 key") -> None:
        key = _as_bytes(key, what, (AES128_KEY_SIZE,))
        self._ctx = _cmac.CMAC(algorithms.AES(key))
        self._key = key
        self._subkeys: tuple[bytes, bytes] | None = None

    def __call__(self, data: bytes) -> bytes:
        """The 16-byte CMAC of ``data``."""
        if type(data) is not bytes:
            data = _as_bytes(data, "CMAC input")
        mac = self._ctx.copy()
        mac.update(data)
        return mac.finalize()

    def subkeys(self) -> tuple[bytes, bytes]:
        """:func:`cmac_subkeys` of the key (computed on first use)."""
        if self._subkeys is None:
            self._subkeys = cmac_subkeys(self._key)
        return self._subkeys

    def __repr__(self) -> str:
        return "<KeyedCmac>"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise KeyStoreError("a keyed CMAC holds key material: it cannot be pickled or copied")


def _dbl(block: bytes) -> bytes:
    value = int.from_bytes(block, "big") << 1
    if value >> 128:
        value ^= (1 << 128) | 0x87
    return value.to_bytes(AES_BLOCK, "big")


def cmac_subkeys(key: bytes) -> tuple[bytes, bytes]:
    """The CMAC subkeys (K1, K2) of an AES-128 key.

    The ``cryptography`` CMAC keeps them private, but AN10922 pads its input differently from
    plain CMAC when the input is short, and then needs K2 explicitly.
    """
    key = _as_bytes(key, "AES-128 key", (AES128_KEY_SIZE,))
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    l_block = encryptor.update(bytes(AES_BLOCK)) + encryptor.finalize()
    k1 = _dbl(l_block)
    return k1, _dbl(k1)


def an10922_aes128(master: bytes, m: bytes) -> bytes:
    """AN10922 AES-128 diversification of ``master`` with diversification input ``m``.

    The note always MACs exactly 32 bytes: ``0x01 || M`` padded with ``80 00 ..`` and the last
    block XORed with K2, or unpadded with K1 when M has the full 31 bytes. Plain CMAC agrees
    whenever ``0x01 || M`` is longer than one block, but pads a shorter one to 16 bytes only;
    for those inputs the 32-byte block is built here and its last half pre-XORed with
    K1 ^ K2, so that the CMAC (which sees a complete block and applies K1) applies K2.
    """
    master = _as_bytes(master, "AES-128 master key", (AES128_KEY_SIZE,))
    m = _as_bytes(m, "diversification input")
    if not 1 <= len(m) <= MAX_DIVERSIFICATION_INPUT:
        raise CodecError(
            f"diversification input must be 1 to {MAX_DIVERSIFICATION_INPUT} bytes long, "
            f"got {len(m)}"
        )
    return _an10922(KeyedCmac(master), m)


def _an10922(cmac: KeyedCmac, m: bytes) -> bytes:
    """:func:`an10922_aes128` with the master as a :class:`KeyedCmac` (``m`` checked)."""
    d = bytes((DIV_CONSTANT_AES128,)) + m
    if len(d) > AES_BLOCK:
        return cmac(d)
    padded = d + b"\x80" + bytes(2 * AES_BLOCK - len(d) - 1)
    k1, k2 = cmac.subkeys()
    return cmac(padded[:AES_BLOCK] + _xor(padded[AES_BLOCK:], _xor(k1, k2)))


def diversify_aes128(master: bytes, uid: bytes, aid: bytes, system_id: bytes) -> bytes:
    """A card's AES-128 key: AN10922 with M = UID || AID || system identifier.

    The UID makes the key the card's own; the AID and the system identifier keep keys of
    different applications and systems apart even when they share a master key.
    """
    return _diversify(master, uid, aid, system_id, None)


def _diversify(
    master: bytes, uid: bytes, aid: bytes, system_id: bytes, cmac: KeyedCmac | None
) -> bytes:
    """:func:`diversify_aes128`, with the master's :class:`KeyedCmac` when the caller keeps
    one (a key store); the inputs are checked here in the same order either way."""
    uid = _as_bytes(uid, "UID", UID_SIZES)
    aid = _as_bytes(aid, "AID", (AID_SIZE,))
    system_id = _as_bytes(system_id, "system identifier")
    room = MAX_DIVERSIFICATION_INPUT - len(uid) - len(aid)
    if len(system_id) > room:
        raise CodecError(
            f"system identifier of {len(system_id)} bytes is too long: with a {len(uid)}-byte "
            f"UID and a {len(aid)}-byte AID it may have at most {room}"
        )
    m = uid + aid + system_id
    if cmac is None:
        return an10922_aes128(master, m)
    # an10922_aes128's check of m: 1..31 bytes, which the checks above already guarantee
    return _an10922(cmac, m)


def classic_system_id(sector: int, key_type: str) -> bytes:
    """The system identifier of a sector key: ``"AFC-MFC1" || sector || "A"/"B"``.

    Sector and key type go into the diversification input so that every sector and both keys
    of a sector differ: a reader holding key A (read) of one sector learns neither key B
    (write) nor any other sector's keys.
    """
    if type(sector) is int and type(key_type) is str:
        known = _SYSTEM_IDS.get((sector, key_type))
        if known is not None:
            return known
    if isinstance(sector, bool) or not isinstance(sector, int):
        raise CodecError(f"sector must be an integer, not {type(sector).__name__}")
    if not 0 <= sector < CLASSIC_SECTORS:
        raise CodecError(f"sector {sector} is out of range 0..{CLASSIC_SECTORS - 1}")
    if key_type not in CLASSIC_KEY_TYPES:
        raise CodecError(f"key type must be 'A' or 'B', got {key_type!r}")
    system_id = CLASSIC_SYSTEM_TAG + bytes((sector,)) + key_type.encode("ascii")
    if type(sector) is int and type(key_type) is str:
        _SYSTEM_IDS[sector, key_type] = system_id  # at most 40 sectors x 2 keys
    return system_id


_SYSTEM_IDS: dict[tuple[int, str], bytes] = {}


def _classic_uid(uid: object) -> bytes:
    return _as_bytes(uid, "MIFARE Classic UID", CLASSIC_UID_SIZES)


def classic_sector_key(master: bytes, uid: bytes, sector: int, key_type: str) -> bytes:
    """The 6-byte MIFARE Classic key ``key_type`` of ``sector`` on the card ``uid``.

    The first 6 bytes of :func:`diversify_aes128` with AID :data:`CLASSIC_AID` and the system
    identifier of :func:`classic_system_id`: only the UID, read before authentication, is
    needed to find any key of any card.
    """
    uid = _classic_uid(uid)
    system_id = classic_system_id(sector, key_type)
    return diversify_aes128(master, uid, CLASSIC_AID, system_id)[:CLASSIC_KEY_SIZE]


class KeyStore(ABC):
    """A software or hardware SAM: it computes with master keys but never hands them out.

    Keys are named (what they are for) and versioned (so they can be rotated while cards
    issued under the old version are still out there). ``key_version=None`` means the
    store's current version of that key, the one new cards are issued with.
    """

    @abstractmethod
    def names(self) -> list[str]:
        """The names of the keys in the store, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """The versions held of key ``name``, ascending; :class:`KeyStoreError` if unknown."""

    @abstractmethod
    def current_version(self, name: str) -> int:
        """The version of key ``name`` that new cards get."""

    @abstractmethod
    def diversify(
        self,
        name: str,
        uid: bytes,
        aid: bytes,
        system_id: bytes,
        *,
        key_version: int | None = None,
    ) -> bytes:
        """AN10922 AES-128 diversification of key ``name`` for one card (16 bytes)."""

    @abstractmethod
    def cmac(self, name: str, data: bytes, *, key_version: int | None = None) -> bytes:
        """AES-CMAC of ``data`` with key ``name`` (16 bytes), e.g. a purse record's MAC."""

    def classic_key(
        self, uid: bytes, sector: int, key_type: str, key_version: int | None = None
    ) -> bytes:
        """The MIFARE Classic sector key of a card, as :func:`classic_sector_key` derives it
        from this store's :data:`CLASSIC_KEY_NAME` key.

        Built on :meth:`diversify` so that a hardware SAM only has to provide that.
        """
        uid = _classic_uid(uid)
        system_id = classic_system_id(sector, key_type)
        key = self.diversify(CLASSIC_KEY_NAME, uid, CLASSIC_AID, system_id, key_version=key_version)
        return key[:CLASSIC_KEY_SIZE]


_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FORMAT = 1

KeySpec = bytes | Mapping[int, bytes]


def _check_name(name: object) -> str:
    # Names are written as bare TOML keys and shown in messages: keep them to a safe alphabet.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise KeyStoreError(
            f"key name {name!r} is not usable: use 1 to 64 letters, digits, '-' or '_'"
        )
    return name


def _check_version(version: object, name: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KeyStoreError(f"key {name!r}: version {version!r} is not a positive integer")
    return version


def _normalize(
    keys: Mapping[str, KeySpec], current: Mapping[str, int] | None
) -> tuple[dict[str, dict[int, bytes]], dict[str, int]]:
    """Validate key material handed to a store; never echo it in an error."""
    if not isinstance(keys, Mapping) or not keys:
        raise KeyStoreError("a key store needs at least one key")
    table: dict[str, dict[int, bytes]] = {}
    for name, spec in keys.items():
        name = _check_name(name)
        versions = {1: spec} if isinstance(spec, _BytesLike) else spec
        if not isinstance(versions, Mapping) or not versions:
            raise KeyStoreError(f"key {name!r} has no versions")
        table[name] = {}
        for version, key in versions.items():
            version = _check_version(version, name)
            if not isinstance(key, _BytesLike) or len(key) != AES128_KEY_SIZE:
                raise KeyStoreError(
                    f"key {name!r} version {version} is not a {AES128_KEY_SIZE}-byte AES-128 key"
                )
            table[name][version] = bytes(key)
    chosen: dict[str, int] = {}
    current = current or {}
    for name in current:
        if name not in table:
            raise KeyStoreError(f"current version given for unknown key {name!r}")
    for name, versions in table.items():
        version = _check_version(current.get(name, max(versions)), name)
        if version not in versions:
            raise KeyStoreError(f"key {name!r}: current version {version!r} is not in the store")
        chosen[name] = version
    return table, chosen


class _SoftwareKeyStore(KeyStore):
    """The key store's computations in software, over keys held in this process's memory.

    An API boundary, not a memory-protection one: it keeps master keys out of return values,
    ``repr``, messages and pickles, which is what stops them leaking into logs and journals.
    """

    def __init__(
        self, keys: Mapping[str, KeySpec], current: Mapping[str, int] | None = None
    ) -> None:
        self._keys, self._current = _normalize(keys, current)
        # (name, version) -> the master's keyed CMAC, made on first use; and by name, the
        # (master, keyed CMAC) of the current version, what nearly every call asks for
        self._cmacs: dict[tuple[str, int], KeyedCmac] = {}
        self._current_cmacs: dict[str, tuple[bytes, KeyedCmac]] = {}

    def names(self) -> list[str]:
        return sorted(self._keys)

    def versions(self, name: str) -> list[int]:
        return sorted(self._versions_of(name))

    def current_version(self, name: str) -> int:
        self._versions_of(name)
        return self._current[name]

    def diversify(
        self,
        name: str,
        uid: bytes,
        aid: bytes,
        system_id: bytes,
        *,
        key_version: int | None = None,
    ) -> bytes:
        master, cmac = self._keyed(name, key_version)
        return _diversify(master, uid, aid, system_id, cmac)

    def cmac(self, name: str, data: bytes, *, key_version: int | None = None) -> bytes:
        return self._keyed(name, key_version)[1](data)

    def _keyed(self, name: str, version: int | None) -> tuple[bytes, KeyedCmac]:
        """The master key ``name``/``version`` and its keyed CMAC (errors as :meth:`_master`)."""
        if version is None and type(name) is str:
            current = self._current_cmacs.get(name)
            if current is not None:
                return current
            found = self._current_cmacs[name] = self._keyed(name, self._current_of(name))
            return found
        master = self._master(name, version)
        key = (name, self._current[name] if version is None else version)
        cmac = self._cmacs.get(key)
        if cmac is None:
            cmac = self._cmacs[key] = KeyedCmac(master, "AES-128 master key")
        return master, cmac

    def _current_of(self, name: str) -> int:
        self._versions_of(name)  # an unknown name: the same error as _master's
        return self._current[name]

    def _versions_of(self, name: str) -> dict[int, bytes]:
        try:
            return self._keys[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names())
            raise KeyStoreError(f"no key named {name!r} in the store (it has: {known})") from None

    def _master(self, name: str, version: int | None) -> bytes:
        versions = self._versions_of(name)
        version = self._current[name] if version is None else _check_version(version, name)
        try:
            return versions[version]
        except (KeyError, TypeError):
            held = ", ".join(str(v) for v in sorted(versions))
            raise KeyStoreError(
                f"key {name!r} has no version {version!r} (the store holds: {held})"
            ) from None

    def _summary(self) -> str:
        return ", ".join(f"{name} v{self._current[name]}" for name in self.names())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} keys: {self._summary()}>"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # Pickling would copy master keys into whatever the pickle lands in (a queue, a cache).
        raise KeyStoreError(f"{type(self).__name__} cannot be pickled or copied")


class MemoryKeyStore(_SoftwareKeyStore):
    """Keys held only in memory: for tests, simulators and the virtual cards.

    ``keys`` maps a name to a 16-byte key (version 1) or to ``{version: key}``; the current
    version of each is the highest unless ``current`` says otherwise.
    """


class FileKeyStore(_SoftwareKeyStore):
    """Master keys in a TOML file readable by its owner alone.

    The file format, hex keys by name and version::

        format = 1

        [keys.classic-sector]
        current = 1

        [keys.classic-sector.versions]
        1 = "00112233445566778899AABBCCDDEEFF"

    Opening refuses a file that another account could read or change, or that belongs to
    another account: copied keys cannot be un-copied, so the check comes before any use.
    """

    #: Larger files are not key stores; refuse them before reading them into memory.
    MAX_FILE_SIZE = 1 << 20

    def __init__(
        self,
        path: str | os.PathLike[str],
        keys: Mapping[str, KeySpec],
        current: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(keys, current)
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<FileKeyStore {str(self.path)!r} keys: {self._summary()}>"

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileKeyStore:
        """Load a key store, refusing it unless it is private to the current user."""
        path = Path(path)
        try:
            # O_NONBLOCK: a FIFO planted under the name must not hang the device at start-up.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise KeyStoreError(
                f"no key store at {path}; create one with: afc keys generate --store "
                f"{shlex.quote(str(path))}"
            ) from None
        except OSError as exc:
            raise KeyStoreError(f"cannot open key store {path}: {exc.strerror}") from None
        try:
            # fstat on the open file: the file checked is the file read, even if renamed.
            info = os.fstat(fd)
            _check_private(path, info)
            if info.st_size > cls.MAX_FILE_SIZE:
                raise KeyStoreError(f"key store {path} is {info.st_size} bytes: not a key store")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                raw = handle.read(cls.MAX_FILE_SIZE + 1)
        except OSError as exc:
            raise KeyStoreError(f"cannot read key store {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        keys, current = _parse(path, raw)
        return cls(path, keys, current)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        keys: Mapping[str, KeySpec],
        current: Mapping[str, int] | None = None,
    ) -> FileKeyStore:
        """Write a new key store (mode 0600) and open it; never replaces an existing file.

        The file appears complete or not at all (written beside it, then hard-linked into
        place), and the link fails if the name is taken, so two technicians generating at
        once cannot overwrite each other's keys, and keys cards were issued under are not lost.
        """
        path = Path(path)
        table, chosen = _normalize(keys, current)
        text = _format(table, chosen)
        if os.path.lexists(path):
            _refuse_overwrite(path)
        try:
            write_file(path, text.encode("ascii"), replace=False)
        except FileExistsError:
            _refuse_overwrite(path)
        except OSError as exc:
            raise KeyStoreError(f"cannot create key store {path}: {exc.strerror}") from None
        return cls.open(path)

    @classmethod
    def generate(
        cls, path: str | os.PathLike[str], names: Iterable[str] = DEFAULT_KEY_NAMES
    ) -> FileKeyStore:
        """A new key store with a fresh random key (version 1) for each of ``names``."""
        return cls.create(path, {name: os.urandom(AES128_KEY_SIZE) for name in names})


def _refuse_overwrite(path: Path) -> NoReturn:
    raise KeyStoreError(
        f"{path} already exists; refusing to overwrite a key store (cards issued under its "
        "keys would become unreadable). Move it away first if you really mean to replace it"
    )


def _check_private(path: Path, info: os.stat_result) -> None:
    quoted = shlex.quote(str(path))
    if not stat.S_ISREG(info.st_mode):
        raise KeyStoreError(f"key store {path} is not a regular file")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise KeyStoreError(
            f"key store {path} belongs to uid {info.st_uid}, not to uid {uid} that runs afc; "
            f"refusing it. Fix: chown {uid} {quoted} && chmod 600 {quoted}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyStoreError(
            f"key store {path} has mode {mode:04o}: other accounts can read or change the "
            f"master keys; refusing it. Fix: chmod 600 {quoted}"
        )


def _format(table: Mapping[str, Mapping[int, bytes]], current: Mapping[str, int]) -> str:
    """Hand-formatted TOML: the names are bare-key safe and the values hex, nothing to escape."""
    lines = [
        "# afc-edge key store: AES-128 master keys, hex, by name and version.",
        "# Keep it mode 0600, owned by the account that runs afc. Never copy it off the device",
        "# unencrypted, never paste it into a ticket, a chat or a log.",
        f"format = {_FORMAT}",
    ]
    for name in sorted(table):
        lines += ["", f"[keys.{name}]", f"current = {current[name]}", ""]
        lines.append(f"[keys.{name}.versions]")
        for version in sorted(table[name]):
            lines.append(f'{version} = "{table[name][version].hex().upper()}"')
    return "\n".join(lines) + "\n"


def _parse(path: Path, raw: bytes) -> tuple[dict[str, dict[int, bytes]], dict[str, int]]:
    def bad(why: str) -> NoReturn:
        raise KeyStoreError(f"key store {path} is malformed: {why}") from None

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        bad("not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        bad(f"not valid TOML ({exc})")
    if doc.get("format") != _FORMAT:
        bad(f"'format' must be {_FORMAT}")
    entries = doc.get("keys")
    if not isinstance(entries, dict) or not entries:
        bad("no [keys.NAME] tables")
    keys: dict[str, dict[int, bytes]] = {}
    current: dict[str, int] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict):
            bad(f"key {name!r} needs a [keys.{name}.versions] table")
        keys[name] = {}
        for version_text, value in entry["versions"].items():
            if not version_text.isascii() or not version_text.isdigit():
                bad(f"key {name!r}: version {version_text!r} is not a number")
            version = int(version_text)
            if version in keys[name]:
                bad(f"key {name!r}: version {version} is given twice")
            # Never quote the value: a near-miss of a key is still most of a key.
            if not isinstance(value, str) or len(value) != 2 * AES128_KEY_SIZE:
                bad(f"key {name!r} version {version}: not {2 * AES128_KEY_SIZE} hex digits")
            try:
                keys[name][version] = bytes.fromhex(value)
            except ValueError:
                bad(f"key {name!r} version {version}: not {2 * AES128_KEY_SIZE} hex digits")
        if "current" in entry:
            if isinstance(entry["current"], bool) or not isinstance(entry["current"], int):
                bad(f"key {name!r}: 'current' must be a version number")
            current[name] = entry["current"]
    try:
        return _normalize(keys, current)
    except KeyStoreError as exc:
        bad(str(exc))


# -- card key versions -------------------------------------------------------------------------

#: The keys whose version a card names in its identity block (``Identity.key_version``): its
#: sector keys and its MAC keys. Rotated together, since a card names one version for both.
CARD_KEY_NAMES = (CLASSIC_KEY_NAME, PURSE_MAC_KEY_NAME)


class PinnedKeyStore(KeyStore):
    """A key store that uses one version of the card keys by default: a card's view of it.

    ``Purse`` asks its store for "the current" sector and MAC keys; wrapping the store in
    this view makes that the version the card was issued under, so a card issued before an
    ``afc keys rotate`` is read and written back under its own version (never re-keyed
    mid-tap, where a tear would leave it half under each). The master keys stay in the
    wrapped store (a SAM stays a SAM); keys other than :data:`CARD_KEY_NAMES` pass through.
    """

    def __init__(self, base: KeyStore, version: int) -> None:
        for name in CARD_KEY_NAMES:
            if version not in base.versions(name):
                raise KeyStoreError(
                    f"key {name!r} has no version {version} (the store holds: "
                    f"{', '.join(str(v) for v in base.versions(name))})"
                )
        self._base = base
        self.version = version

    def _pin(self, name: str, key_version: int | None) -> int | None:
        if key_version is None and name in CARD_KEY_NAMES:
            return self.version
        return key_version

    def names(self) -> list[str]:
        return self._base.names()

    def versions(self, name: str) -> list[int]:
        return self._base.versions(name)

    def current_version(self, name: str) -> int:
        return self.version if name in CARD_KEY_NAMES else self._base.current_version(name)

    def diversify(
        self,
        name: str,
        uid: bytes,
        aid: bytes,
        system_id: bytes,
        *,
        key_version: int | None = None,
    ) -> bytes:
        return self._base.diversify(name, uid, aid, system_id,
                                    key_version=self._pin(name, key_version))

    def cmac(self, name: str, data: bytes, *, key_version: int | None = None) -> bytes:
        return self._base.cmac(name, data, key_version=self._pin(name, key_version))

    def __repr__(self) -> str:
        return f"<PinnedKeyStore v{self.version} of {self._base!r}>"

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise KeyStoreError("PinnedKeyStore cannot be pickled or copied")


def card_key_versions(store: KeyStore) -> list[int]:
    """The card key versions to try on a card of unknown version: the current one first,
    then the older ones newest first (a card is likelier to be recent). Only versions held
    of both card keys count: a card needs its sector keys and its MAC keys of one version."""
    common = set(store.versions(CLASSIC_KEY_NAME)) & set(store.versions(PURSE_MAC_KEY_NAME))
    current = store.current_version(CLASSIC_KEY_NAME)
    return sorted(common, key=lambda v: (v != current, -v))
