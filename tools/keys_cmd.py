"""``afc keys``: key diversification and the key store.

Input errors are raised as the core's own errors, which ``afc`` prints as one line
(``afc: error: ...``) with exit status 1, the contract a script around ``afc`` relies on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import string
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

from firmware.core.errors import CodecError, CoreError, KeyStoreError
from firmware.core.keys import (
    AES128_KEY_SIZE,
    CARD_KEY_NAMES,
    CLASSIC_KEY_NAME,
    DEFAULT_KEY_NAMES,
    FileKeyStore,
    KeyStore,
    classic_sector_key,
    diversify_aes128,
)
from firmware.durable import fsync_dir

log = logging.getLogger("afc.keys")


class KeyOptionError(CoreError):
    """The options given to an ``afc keys`` command contradict each other or are missing."""


def _hex(option: str, text: str, *, allow_empty: bool = False) -> bytes:
    """Bytes from the hex an operator typed; ``:`` and spaces between bytes are allowed,
    since readers and NXP documents print UIDs and keys both ways."""
    digits = "".join(text.replace(":", " ").split())
    if not digits and not allow_empty:
        raise CodecError(f"{option}: no hex digits given")
    if any(c not in string.hexdigits for c in digits):
        raise CodecError(f"{option}: {text!r} is not hex (digits 0-9 and A-F only)")
    if len(digits) % 2:
        raise CodecError(
            f"{option}: odd number of hex digits ({len(digits)}); every byte is two digits"
        )
    return bytes.fromhex(digits)


def _master(master: str | None) -> bytes | None:
    if master is None:
        return None
    key = _hex("--master", master)
    if len(key) != AES128_KEY_SIZE:
        raise CodecError(
            f"--master: an AES-128 key is {AES128_KEY_SIZE} bytes ({2 * AES128_KEY_SIZE} hex "
            f"digits), got {len(key)}"
        )
    return key


def _source(master: str | None, store: str | None) -> tuple[bytes | None, KeyStore | None]:
    """Exactly one of a master on the command line (labs) and a key store (everywhere else)."""
    if (master is None) == (store is None):
        raise KeyOptionError("give either --master HEX or --store PATH (exactly one of them)")
    return _master(master), FileKeyStore.open(store) if store is not None else None


def _out(key: bytes) -> None:
    click.echo(key.hex().upper())


_STORE_HELP = (
    "Key store file (see 'afc keys generate') to take the master key from instead of --master; "
    "keeps the master out of shell history and process lists."
)


@click.group()
def keys() -> None:
    """Derive and manage card keys.

    Every card has its own keys, derived from a master key and the card's UID with NXP
    AN10922 (AES-128); MIFARE Classic sector keys are the first 6 bytes of such a key.
    Hex is read with or without ':' or spaces between bytes and printed in upper case.
    See docs/keys.md.
    """


@keys.command(short_help="Print a card's AN10922 AES-128 key.")
@click.option("--master", metavar="HEX", help="AES-128 master key, 16 bytes (32 hex digits).")
@click.option("--store", metavar="PATH", help=_STORE_HELP)
@click.option("--key-name", metavar="NAME", help="With --store: which key to diversify.")
@click.option(
    "--key-version",
    type=int,
    metavar="N",
    help="With --store: key version (default: the store's current one).",
)
@click.option("--uid", required=True, metavar="HEX", help="Card UID: 4, 7 or 10 bytes.")
@click.option("--aid", required=True, metavar="HEX", help="Application ID: 3 bytes.")
@click.option(
    "--system-id",
    required=True,
    metavar="HEX",
    help="System identifier: 0 bytes up to what fills M = UID||AID||SYSID to 31.",
)
def diversify(
    master: str | None,
    store: str | None,
    key_name: str | None,
    key_version: int | None,
    uid: str,
    aid: str,
    system_id: str,
) -> None:
    """Print a card's diversified AES-128 key (NXP AN10922), 32 upper-case hex digits.

    The key is AES-CMAC(master, 01 || UID || AID || SYSID), padded to 32 bytes as AN10922
    prescribes. The example of AN10922 (system identifier "NXP Abu" in ASCII):

    \b
      afc keys diversify --master 00112233445566778899AABBCCDDEEFF \\
          --uid 04782E21801D80 --aid 3042F5 --system-id 4E585020416275
      A8DD63A3B89D54B37CA802473FDA9175
    """
    key, source = _source(master, store)
    uid_b, aid_b, sys_b = (
        _hex("--uid", uid),
        _hex("--aid", aid),
        _hex("--system-id", system_id, allow_empty=True),
    )
    if key is not None:
        if key_name is not None or key_version is not None:
            raise KeyOptionError("--key-name and --key-version go with --store, not --master")
        _out(diversify_aes128(key, uid_b, aid_b, sys_b))
        return
    assert source is not None
    if key_name is None:
        raise KeyOptionError(f"--store needs --key-name (the store has: {_names(source)})")
    _out(source.diversify(key_name, uid_b, aid_b, sys_b, key_version=key_version))


@keys.command(short_help="Print a MIFARE Classic sector key of a card.")
@click.option("--master", metavar="HEX", help="AES-128 master key, 16 bytes (32 hex digits).")
@click.option("--store", metavar="PATH", help=_STORE_HELP)
@click.option(
    "--key-version",
    type=int,
    metavar="N",
    help="With --store: version of the "
    f"{CLASSIC_KEY_NAME!r} key (default: the store's current one).",
)
@click.option("--uid", required=True, metavar="HEX", help="Card UID: 4 or 7 bytes.")
@click.option("--sector", required=True, type=int, metavar="N", help="Sector, 0..39.")
@click.option("--key-type", required=True, metavar="A|B", help="Key A or key B.")
def classic(
    master: str | None,
    store: str | None,
    key_version: int | None,
    uid: str,
    sector: int,
    key_type: str,
) -> None:
    """Print a MIFARE Classic sector key, 12 upper-case hex digits.

    The first 6 bytes of the AN10922 key of the card with AID "AFC" and system identifier
    "AFC-MFC1" || sector || key type (docs/keys.md). Only the UID is needed, so a reader
    finds any card's keys from its anticollision answer. Example:

    \b
      afc keys classic --master 00112233445566778899AABBCCDDEEFF \\
          --uid 04782E21801D80 --sector 1 --key-type A
      A3F220E74CD0
    """
    key, source = _source(master, store)
    uid_b = _hex("--uid", uid)
    key_type = key_type.upper()
    if key is not None:
        if key_version is not None:
            raise KeyOptionError("--key-version goes with --store, not --master")
        _out(classic_sector_key(key, uid_b, sector, key_type))
        return
    assert source is not None
    _out(source.classic_key(uid_b, sector, key_type, key_version=key_version))


@keys.command(short_help="Create a key store with random master keys.")
@click.option("--store", required=True, metavar="PATH", help="Key store file to create.")
@click.option(
    "--key",
    "names",
    multiple=True,
    metavar="NAME",
    help=f"Key to create (repeatable; default: {', '.join(DEFAULT_KEY_NAMES)}).",
)
def generate(store: str, names: tuple[str, ...]) -> None:
    """Create a new key store with random AES-128 master keys.

    The file is written with mode 0600 and never replaces an existing one: losing the
    master keys makes every card issued under them unreadable, so back the new file up
    (encrypted) before issuing cards. Example:

    \b
      afc keys generate --store /etc/afc/keys.toml
    """
    created = FileKeyStore.generate(store, names or DEFAULT_KEY_NAMES)
    click.echo(f"created {created.path} (mode 0600): {_names(created)}")


@keys.command(name="list", short_help="List a key store's keys (never the keys themselves).")
@click.option("--store", required=True, metavar="PATH", help="Key store file to read.")
def list_keys(store: str) -> None:
    """List the keys of a key store: name, current version, versions held (no key material).

    Opening the store also checks its permissions, so this is the quick test after copying
    a store to a device. Example:

    \b
      afc keys list --store /etc/afc/keys.toml
      classic-sector  current 1  versions 1
    """
    opened = FileKeyStore.open(store)
    for name in opened.names():
        held = ",".join(str(v) for v in opened.versions(name))
        click.echo(f"{name}  current {opened.current_version(name)}  versions {held}")


def _names(source: KeyStore) -> str:
    return ", ".join(f"{n} v{source.current_version(n)}" for n in source.names())


# -- public parts and rotation ------------------------------------------------------------

#: ``Identity.key_version`` is one byte on the card.
MAX_CARD_KEY_VERSION = 255
#: Bytes of the key check value printed for each key version.
KCV_BYTES = 3


class KeyRotationError(KeyStoreError):
    """A rotation that would leave cards or devices unable to use their keys."""


def key_check_value(source: KeyStore, name: str, version: int) -> str:
    """The key check value of one key version: the first 3 bytes of AES-CMAC(key, 16 zero
    bytes), upper-case hex (the CMAC method of ANSI X9.24-1:2017, cut to the 3 bytes key
    forms and HSM consoles show).

    Lets two sites compare their stores (same name, version and KCV: same key) without
    either showing a key. Computed through the store's own CMAC, so it works the same on
    a hardware SAM and never touches the master key here.
    """
    return source.cmac(name, bytes(16), key_version=version)[:KCV_BYTES].hex().upper()


def public_summary(source: KeyStore) -> list[dict[str, object]]:
    """Every key's name, current version and per-version KCV: everything but key bytes."""
    return [
        {
            "name": name,
            "current": source.current_version(name),
            "versions": [
                {"version": v, "kcv": key_check_value(source, name, v)}
                for v in source.versions(name)
            ],
        }
        for name in source.names()
    ]


@keys.command(name="export-public", short_help="Print key names, versions and KCVs.")
@click.option("--store", required=True, metavar="PATH", help="Key store file to read.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def export_public(store: str, as_json: bool) -> None:
    """Print the public parts of a key store: names, versions and key check values.

    Never a key: the KCV (first 3 bytes of AES-CMAC of 16 zero bytes) only lets a second
    site or an auditor confirm that two stores hold the same key version. Example:

    \b
      afc keys export-public --store /etc/afc/keys.toml
      classic-sector  current 2  v1 kcv 1A2B3C  v2 kcv 4D5E6F
    """
    opened = FileKeyStore.open(store)
    summary = public_summary(opened)
    if as_json:
        click.echo(json.dumps({"store": str(opened.path), "keys": summary}, indent=2))
        return
    for entry in summary:
        versions = "  ".join(f"v{v['version']} kcv {v['kcv']}" for v in entry["versions"])
        click.echo(f"{entry['name']}  current {entry['current']}  {versions}")


@contextlib.contextmanager
def _store_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside the store, so two rotations cannot both read the old file
    and one of them lose the other's new key."""
    lock = path.parent / f".{path.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise KeyStoreError(f"cannot lock key store {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_versions(path: Path) -> dict[str, dict[int, bytes]]:
    """The key table of a store file that :meth:`FileKeyStore.open` has just accepted."""
    with open(path, "rb") as handle:
        doc = tomllib.loads(handle.read(FileKeyStore.MAX_FILE_SIZE + 1).decode("utf-8"))
    return {
        name: {int(v): bytes.fromhex(text) for v, text in entry["versions"].items()}
        for name, entry in doc["keys"].items()
    }


def rotate_store(path: str | os.PathLike[str], names: Iterable[str]) -> int:
    """Add a fresh random version to each key of ``names`` and make it current; returns it.

    Every named key gets the same new version number (one more than the highest held by
    any of them), so the card keys stay one generation. Old versions are kept: cards and
    journals made under them must stay readable. The store is replaced atomically (new
    file written 0600 and fsynced beside it, then renamed over it) under a lock.
    """
    path = Path(path)
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise KeyRotationError("name at least one key to rotate")
    with _store_lock(path):
        store = FileKeyStore.open(path)  # permissions, owner and format checked first
        for name in wanted:
            store.versions(name)  # unknown name: KeyStoreError naming what the store has
        card_held = [n for n in CARD_KEY_NAMES if n in store.names()]
        if set(wanted) & set(card_held) and not set(card_held) <= set(wanted):
            raise KeyRotationError(
                "a card names one key version for its sector and MAC keys: rotate them "
                f"together: afc keys rotate {' '.join(card_held)} --store {path}"
            )
        version = max(max(store.versions(n)) for n in wanted) + 1
        if set(wanted) & set(card_held) and version > MAX_CARD_KEY_VERSION:
            raise KeyRotationError(
                f"card keys are at version {version - 1}: a card stores the key version in "
                "one byte, so there is no version left; migrate the card layout first"
            )
        table = _read_versions(path)
        current = {n: store.current_version(n) for n in store.names()}
        for name in wanted:
            table[name][version] = os.urandom(AES128_KEY_SIZE)
            current[name] = version
        tmp = path.parent / f".{path.name}.rotate-{os.getpid()}"
        try:
            FileKeyStore.create(tmp, table, current)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(path.parent)
    log.info("key store %s: rotated %s to version %d", path, ", ".join(wanted), version)
    return version


@keys.command(short_help="Add a new version of keys and make it current.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--store", required=True, metavar="PATH", help="Key store file to change.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def rotate(names: tuple[str, ...], store: str, as_json: bool) -> None:
    """Rotate keys: add a fresh random version of each NAME and make it the current one.

    New cards are issued under the new version and carry it in their identity block
    (key version); the old versions stay in the store so cards issued under them keep
    working. The card keys (classic-sector and purse-mac) must be rotated together.
    Devices MAC new journal records with the current journal-mac version and verify a
    record under any version the store holds, so journal-mac rotates at any time.
    Copy the new store to every device that holds the old one (the same file: it still
    has the old versions), back it up encrypted, and compare with 'export-public'.
    Example:

    \b
      afc keys rotate classic-sector purse-mac --store /etc/afc/keys.toml
      rotated classic-sector, purse-mac to version 2 (kcv ...)
    """
    version = rotate_store(store, names)
    opened = FileKeyStore.open(store)
    kcvs = {n: key_check_value(opened, n, version) for n in dict.fromkeys(names)}
    if as_json:
        click.echo(json.dumps({"version": version, "kcv": kcvs}))
        return
    shown = ", ".join(f"{n} kcv {k}" for n, k in kcvs.items())
    click.echo(f"rotated {', '.join(kcvs)} to version {version} ({shown})")
