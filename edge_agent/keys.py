"""Ed25519 key files of devices and of the center.

A device signs its transaction batches and command replies with its private key; the center
signs acks, bundles and commands with its own. Private keys live in PKCS#8 PEM files readable
by their owner alone: a key another account can read is a key anyone on the box could sign
forged taps or forged blacklists with, so loading refuses it (as the card key store does).
Public keys travel as 64 hex digits (the 32 raw bytes), short enough for a TOML line or a
command line; a PEM file is accepted too.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.durable import write_file

from .errors import KeyFileError

__all__ = ["generate_key_file", "load_private_key", "load_public_key", "public_hex"]


def generate_key_file(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Write a fresh Ed25519 private key to ``path`` (PKCS#8 PEM, mode 0600); returns it.

    Refuses to overwrite an existing file: replacing a device's or the center's key
    silently would strand every peer that pinned the old public key. The file appears
    complete or not at all (written beside it, then hard-linked into place).
    """
    path = Path(path)
    if os.path.lexists(path):
        raise KeyFileError(
            f"{path} already exists; refusing to overwrite a key file (peers pinned its "
            "public key). Move it away first if you really mean to replace it"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_file(path, pem, replace=False)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``; refuses a file others can read."""
    path = Path(path)
    quoted = shlex.quote(str(path))
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            data = fh.read(64 << 10)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist (create one with 'afc sim center keygen' or "
            "generate_key_file)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:04o}): chmod 600 {quoted}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(text_or_path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """A public key from 64 hex digits (the raw 32 bytes) or from a PEM file's path.

    A PEM file may hold the public key or a private key (its public half is taken)."""
    text = os.fspath(text_or_path)
    digits = text.strip().replace(":", "") if isinstance(text, str) else ""
    if len(digits) == 64:
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(digits))
        except ValueError:
            pass  # not hex: maybe a file name of 64 characters
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"public key {text!r:.80} is neither 64 hex digits nor a readable PEM file "
            f"({exc.strerror})"
        ) from None
    key: object
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not a PEM Ed25519 key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The 64 lower-case hex digits of a key's public half (what the registry stores)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
