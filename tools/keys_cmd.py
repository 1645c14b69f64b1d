"""``afc keys``: key diversification and the key store.

Input errors are raised as the core's own errors, which ``afc`` prints as one line
(``afc: error: ...``) with exit status 1, the contract a script around ``afc`` relies on.
"""

from __future__ import annotations

import string

import click

from firmware.core.errors import CodecError, CoreError
from firmware.core.keys import (
    AES128_KEY_SIZE,
    CLASSIC_KEY_NAME,
    DEFAULT_KEY_NAMES,
    FileKeyStore,
    KeyStore,
    classic_sector_key,
    diversify_aes128,
)


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
