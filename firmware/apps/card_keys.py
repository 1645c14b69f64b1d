"""Cards of every card key version a device holds: taps keep working across ``afc keys rotate``.

A card's sector keys and MAC keys come from the master keys of one version, which its identity
block names. ``afc keys rotate classic-sector purse-mac`` makes a new version the one new cards
get, but the cards issued before stay in riders' pockets for years, and a device must keep
reading them. So a device tries the store's current version first (the tap of every card
issued since the rotation, and of every card when nothing was ever rotated, is exactly what
it was: nothing here runs on that path), and only when that authentication fails tries the
older versions the store holds, newest first: at most one try per version held. A failed
MIFARE authentication ends the card's session (the card drops out and answers nothing more),
so the card is activated again before each further try.

A card read under an older version stays under it: the device writes it back with the same
version's keys (a :class:`~firmware.core.keys.PinnedKeyStore`). Re-keying a card means
rewriting every sector trailer and MAC; a tear halfway through would leave a card half under
each version, so that is the issuing office's job, never a tap's.
"""

from __future__ import annotations

import logging
import weakref
from typing import ClassVar

from firmware.core import card_layout as cl
from firmware.core import classic_layout as layout
from firmware.core.anticollision import masked_uid
from firmware.core.errors import AuthenticationError, CoreError
from firmware.core.keys import CLASSIC_KEY_NAME, KeyStore, PinnedKeyStore, card_key_versions
from firmware.core.mifare import ClassicAccess
from firmware.core.purse import Purse

__all__ = ["OlderCardKeys", "key_version_of", "reactivate"]

log = logging.getLogger("afc.card_keys")


def reactivate(access: ClassicAccess) -> ClassicAccess:
    """A new session with the same card, after a failed authentication silenced it: the
    access object's own way (:meth:`ClassicReader.reactivate
    <firmware.core.mifare.ClassicReader.reactivate>` re-selects over the same air; the PN532's
    chip-crypto access cycles the field and lists the card again).

    :class:`~firmware.core.errors.NoResponseError` if the card left the field or another
    card answers in its place: the caller treats it as a card pulled mid-tap.
    """
    own = getattr(access, "reactivate", None)
    if not callable(own):
        raise CoreError(
            f"cannot activate a card again through {type(access).__name__}: cards of older "
            "key versions cannot be read on this reader"
        )
    return own()


def key_version_of(purse: Purse) -> int | None:
    """The card key version ``purse`` reads and writes with, when it is pinned to one
    (:meth:`OlderCardKeys.open` made it); None for the store's current version."""
    store = purse.store
    return store.version if isinstance(store, PinnedKeyStore) else None


class OlderCardKeys:
    """The card key versions of one key store older than its current one, for the cards the
    current one does not open.

    A device builds this the first time a card fails authentication, never on a successful
    tap; with a single version held there is nothing to try and :meth:`open` gives up at
    once, without touching the card again.
    """

    _built: ClassVar[weakref.WeakKeyDictionary[KeyStore, OlderCardKeys]] = (
        weakref.WeakKeyDictionary())

    @classmethod
    def of(cls, keys: KeyStore) -> OlderCardKeys:
        """The older versions of ``keys``, worked out once per key store (a store's versions
        do not change once it is loaded: a rotated store file takes a restart)."""
        try:
            found = cls._built.get(keys)
            if found is None:
                found = cls._built[keys] = cls(keys)
        except TypeError:  # a store that cannot be weakly referenced: worked out each time
            found = cls(keys)
        return found

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.current = keys.current_version(CLASSIC_KEY_NAME)
        #: newest first, one pinned view per version: at most one try each
        self.stores = tuple(
            PinnedKeyStore(keys, version)
            for version in card_key_versions(keys)
            if version != self.current
        )

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(store.version for store in self.stores)

    def open(self, failed: Purse) -> Purse:
        """A purse on ``failed``'s card under the newest older version whose key opens the
        card's identity sector (the sector :meth:`Purse.read` starts with).

        ``failed`` is the purse whose read failed to authenticate under the current version.
        :class:`~firmware.core.errors.AuthenticationError` when no version held opens the card
        (after one try per version), :class:`~firmware.core.errors.NoResponseError` when the
        card left the field between tries.
        """
        uid, key_type = failed.uid, failed.key_type
        if self.stores:
            block = layout.first_block(cl.IDENTITY_SECTOR, failed.card_type)
            access = failed.access
            for store in self.stores:
                access = reactivate(access)
                key = store.classic_key(uid, cl.IDENTITY_SECTOR, key_type)
                try:
                    access.authenticate(block, key, key_type)
                except AuthenticationError:
                    continue
                log.debug("card uid=%s opens with card key version %d (current %d)",
                          masked_uid(uid), store.version, self.current)
                return Purse(access, store, key_type=key_type, card_type=failed.card_type)
        held = ", ".join(str(v) for v in (self.current, *self.versions))
        raise AuthenticationError(
            f"card {masked_uid(uid)} opens with none of the card key versions held ({held}): "
            "not a card of this system, or issued under keys this device's key store lacks"
        )
