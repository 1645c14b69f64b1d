"""Key diversification, sector keys, the key store and ``afc keys``.

The published vectors (RFC 4493, AN10922) pin the cryptography; the pinned sector keys pin
the derivation itself: changing it would make every issued card unreadable.
"""

from __future__ import annotations

import copy
import os
import pickle
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import cmac as crypto_cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import assume, given
from hypothesis import strategies as st

from firmware.core.errors import CodecError, CoreError, KeyStoreError
from firmware.core.keys import (
    CLASSIC_AID,
    CLASSIC_KEY_NAME,
    CLASSIC_SYSTEM_TAG,
    DEFAULT_KEY_NAMES,
    PURSE_MAC_KEY_NAME,
    FileKeyStore,
    KeyedCmac,
    KeyStore,
    MemoryKeyStore,
    PinnedKeyStore,
    aes_cmac,
    an10922_aes128,
    card_key_versions,
    classic_sector_key,
    classic_system_id,
    cmac_subkeys,
    diversify_aes128,
)

h = bytes.fromhex

# --- RFC 4493, section 4 -------------------------------------------------------------------

RFC_KEY = h("2b7e151628aed2a6abf7158809cf4f3c")
RFC_MESSAGE = h(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
RFC_EXAMPLES = [
    (0, "bb1d6929e95937287fa37d129b756746"),
    (16, "070a16b46b4d4144f79bdd9dd04a287c"),
    (40, "dfa66747de9ae63030ca32611497c827"),
    (64, "51f0bebf7e3b9d92fc49741779363cfe"),
]


def test_rfc4493_subkeys() -> None:
    k1, k2 = cmac_subkeys(RFC_KEY)
    assert k1 == h("fbeed618357133667c85e08f7236a8de")
    assert k2 == h("f7ddac306ae266ccf90bc11ee46d513b")


@pytest.mark.parametrize(("length", "mac"), RFC_EXAMPLES)
def test_rfc4493_examples(length: int, mac: str) -> None:
    assert aes_cmac(RFC_KEY, RFC_MESSAGE[:length]) == h(mac)


@pytest.mark.parametrize(("length", "mac"), RFC_EXAMPLES)
def test_rfc4493_examples_through_the_key_store(length: int, mac: str) -> None:
    store = MemoryKeyStore({PURSE_MAC_KEY_NAME: RFC_KEY})
    assert store.cmac(PURSE_MAC_KEY_NAME, RFC_MESSAGE[:length]) == h(mac)


# --- AN10922, table "AES-128 key diversification example" ----------------------------------

AN_MASTER = h("00112233445566778899AABBCCDDEEFF")
AN_UID = h("04782E21801D80")
AN_AID = h("3042F5")
AN_SYSTEM_ID = b"NXP Abu"  # 4E585020416275
AN_KEY = h("A8DD63A3B89D54B37CA802473FDA9175")


def _reference_an10922(master: bytes, m: bytes) -> bytes:
    """AN10922's steps 9-15 written out literally: CBC over exactly 32 bytes, XOR K1 or K2."""
    d = b"\x01" + m
    k1, k2 = cmac_subkeys(master)
    if len(d) < 32:
        d = d + b"\x80" + bytes(31 - len(d))
        last = k2
    else:
        last = k1
    d = d[:16] + bytes(a ^ b for a, b in zip(d[16:], last, strict=True))
    enc = Cipher(algorithms.AES(master), modes.CBC(bytes(16))).encryptor()
    return (enc.update(d) + enc.finalize())[16:]


def test_an10922_subkeys() -> None:
    enc = Cipher(algorithms.AES(AN_MASTER), modes.ECB()).encryptor()
    assert enc.update(bytes(16)) + enc.finalize() == h("FDE4FBAE4A09E020EFF722969F83832B")
    assert cmac_subkeys(AN_MASTER) == (
        h("FBC9F75C9413C041DFEE452D3F0706D1"),
        h("F793EEB928278083BFDC8A5A7E0E0D25"),
    )


def test_an10922_intermediate_steps() -> None:
    # Step 13: the padded input with its last block XORed with K2; step 14: CBC encryption.
    step13 = h("0104782E21801D803042F54E5850204195E66EB928278083BFDC8A5A7E0E0D25")
    enc = Cipher(algorithms.AES(AN_MASTER), modes.CBC(bytes(16))).encryptor()
    step14 = enc.update(step13) + enc.finalize()
    assert step14[:16] == h("351DB989A47CCA6484CCE346FD5AE767")
    assert step14[16:] == AN_KEY


def test_an10922_worked_example() -> None:
    assert diversify_aes128(AN_MASTER, AN_UID, AN_AID, AN_SYSTEM_ID) == AN_KEY
    assert an10922_aes128(AN_MASTER, AN_UID + AN_AID + AN_SYSTEM_ID) == AN_KEY
    assert _reference_an10922(AN_MASTER, AN_UID + AN_AID + AN_SYSTEM_ID) == AN_KEY


def test_an10922_through_the_key_store() -> None:
    store = MemoryKeyStore({"desfire-app": AN_MASTER})
    assert store.diversify("desfire-app", AN_UID, AN_AID, AN_SYSTEM_ID) == AN_KEY


@given(master=st.binary(min_size=16, max_size=16), m=st.binary(min_size=1, max_size=31))
def test_an10922_always_macs_32_bytes(master: bytes, m: bytes) -> None:
    assert an10922_aes128(master, m) == _reference_an10922(master, m)


@given(master=st.binary(min_size=16, max_size=16), m=st.binary(min_size=16, max_size=31))
def test_an10922_is_plain_cmac_once_the_input_exceeds_a_block(master: bytes, m: bytes) -> None:
    assert an10922_aes128(master, m) == aes_cmac(master, b"\x01" + m)


def test_an10922_padding_differs_from_plain_cmac_for_short_inputs() -> None:
    # Plain CMAC pads 01||M to 16 bytes; AN10922 to 32. A short M shows the difference.
    m = h("04782E21")
    assert an10922_aes128(AN_MASTER, m) != aes_cmac(AN_MASTER, b"\x01" + m)
    assert an10922_aes128(AN_MASTER, m) == _reference_an10922(AN_MASTER, m)


@pytest.mark.parametrize("length", [0, 32, 40])
def test_an10922_input_length_is_1_to_31(length: int) -> None:
    with pytest.raises(CodecError, match="diversification input"):
        an10922_aes128(AN_MASTER, bytes(length))


def test_diversify_refuses_a_system_id_that_overflows_m() -> None:
    diversify_aes128(AN_MASTER, AN_UID, AN_AID, bytes(21))  # 7 + 3 + 21 = 31
    with pytest.raises(CodecError, match="too long"):
        diversify_aes128(AN_MASTER, AN_UID, AN_AID, bytes(22))


# --- MIFARE Classic sector keys ------------------------------------------------------------

# Pinned: these are keys on issued cards. A change here is a re-keying of the whole fleet.
PINNED_CLASSIC = [
    ("04782E21801D80", 0, "A", "6649B53261AE"),
    ("04782E21801D80", 1, "A", "A3F220E74CD0"),
    ("04782E21801D80", 1, "B", "16F6C0F80116"),
    ("04782E21801D80", 39, "B", "1D4A13A0005D"),
    ("DEADBEEF", 15, "A", "BFBC167B96F7"),
]


@pytest.mark.parametrize(("uid", "sector", "key_type", "key"), PINNED_CLASSIC)
def test_classic_sector_key_pinned(uid: str, sector: int, key_type: str, key: str) -> None:
    assert classic_sector_key(AN_MASTER, h(uid), sector, key_type) == h(key)


def test_classic_derivation_is_the_documented_one() -> None:
    system_id = classic_system_id(7, "B")
    assert system_id == b"AFC-MFC1\x07B" == CLASSIC_SYSTEM_TAG + b"\x07B"
    expected = diversify_aes128(AN_MASTER, AN_UID, b"AFC", system_id)[:6]
    assert CLASSIC_AID == b"AFC"
    assert classic_sector_key(AN_MASTER, AN_UID, 7, "B") == expected


def test_every_sector_and_key_type_of_a_card_differs() -> None:
    keys = {
        classic_sector_key(AN_MASTER, AN_UID, sector, key_type)
        for sector in range(40)
        for key_type in "AB"
    }
    assert len(keys) == 80
    assert all(len(k) == 6 for k in keys)


uids = st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=7, max_size=7))
sectors = st.integers(min_value=0, max_value=39)
key_types = st.sampled_from("AB")


@given(
    master=st.binary(min_size=16, max_size=16),
    a=st.tuples(uids, sectors, key_types),
    b=st.tuples(uids, sectors, key_types),
)
def test_distinct_cards_sectors_and_key_types_get_distinct_keys(
    master: bytes, a: tuple[bytes, int, str], b: tuple[bytes, int, str]
) -> None:
    assume(a != b)
    # 48-bit keys: a chance collision has probability 2**-48 per pair, never seen here.
    assert classic_sector_key(master, *a) != classic_sector_key(master, *b)


@given(master=st.binary(min_size=16, max_size=16), uid=uids, sector=sectors, key_type=key_types)
def test_classic_key_is_deterministic(
    master: bytes, uid: bytes, sector: int, key_type: str
) -> None:
    key = classic_sector_key(master, uid, sector, key_type)
    assert classic_sector_key(bytearray(master), memoryview(uid), sector, key_type) == key
    assert MemoryKeyStore({CLASSIC_KEY_NAME: master}).classic_key(uid, sector, key_type) == key


@given(
    master=st.binary(max_size=20),
    uid=st.binary(max_size=12),
    sector=st.integers(min_value=-3, max_value=300),
    key_type=st.text(max_size=2),
)
def test_bad_classic_input_raises_codec_error_only(
    master: bytes, uid: bytes, sector: int, key_type: str
) -> None:
    valid = len(master) == 16 and len(uid) in (4, 7) and 0 <= sector <= 39 and key_type in "AB"
    valid = valid and len(key_type) == 1
    try:
        key = classic_sector_key(master, uid, sector, key_type)
    except CodecError:
        assert not valid
    else:
        assert valid and len(key) == 6


@given(
    master=st.binary(max_size=20),
    uid=st.binary(max_size=12),
    aid=st.binary(max_size=5),
    system_id=st.binary(max_size=32),
)
def test_bad_diversify_input_raises_codec_error_only(
    master: bytes, uid: bytes, aid: bytes, system_id: bytes
) -> None:
    valid = (
        len(master) == 16
        and len(uid) in (4, 7, 10)
        and len(aid) == 3
        and len(uid + aid + system_id) <= 31
    )
    try:
        key = diversify_aes128(master, uid, aid, system_id)
    except CodecError:
        assert not valid
    else:
        assert valid and len(key) == 16


@pytest.mark.parametrize("bad", ["00112233445566778899AABBCCDDEEFF", None, 7, [1, 2], 1.5])
def test_non_bytes_input_raises_codec_error(bad: object) -> None:
    with pytest.raises(CodecError):
        classic_sector_key(bad, AN_UID, 1, "A")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        classic_sector_key(AN_MASTER, bad, 1, "A")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        diversify_aes128(AN_MASTER, AN_UID, bad, b"")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        aes_cmac(AN_MASTER, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("sector", [-1, 40, True, "1", 1.0, None])
def test_sector_must_be_0_to_39(sector: object) -> None:
    with pytest.raises(CodecError, match="sector"):
        classic_sector_key(AN_MASTER, AN_UID, sector, "A")  # type: ignore[arg-type]


@pytest.mark.parametrize("key_type", ["a", "C", "", "AB", None, 0x0A])
def test_key_type_must_be_a_or_b(key_type: object) -> None:
    with pytest.raises(CodecError, match="key type"):
        classic_sector_key(AN_MASTER, AN_UID, 1, key_type)  # type: ignore[arg-type]


def test_classic_uid_must_be_4_or_7_bytes() -> None:
    with pytest.raises(CodecError, match="4 or 7"):
        classic_sector_key(AN_MASTER, bytes(10), 1, "A")


# --- key stores ----------------------------------------------------------------------------

MASTER_V1 = h("000102030405060708090A0B0C0D0E0F")
MASTER_V2 = h("F0E1D2C3B4A5968778695A4B3C2D1E0F")


def _key_material_shown(text: str, *keys: bytes) -> bool:
    return any(
        form in text for key in keys for form in (key.hex(), key.hex().upper(), repr(key)[2:-1])
    )


def test_memory_store_versions_and_current() -> None:
    store = MemoryKeyStore(
        {CLASSIC_KEY_NAME: {1: MASTER_V1, 2: MASTER_V2}, PURSE_MAC_KEY_NAME: MASTER_V1},
        current={CLASSIC_KEY_NAME: 1},
    )
    assert store.names() == [CLASSIC_KEY_NAME, PURSE_MAC_KEY_NAME]
    assert store.versions(CLASSIC_KEY_NAME) == [1, 2]
    assert store.current_version(CLASSIC_KEY_NAME) == 1
    assert store.classic_key(AN_UID, 3, "B") == classic_sector_key(MASTER_V1, AN_UID, 3, "B")
    assert store.classic_key(AN_UID, 3, "B", key_version=2) == classic_sector_key(
        MASTER_V2, AN_UID, 3, "B"
    )
    assert MemoryKeyStore({"k": {1: MASTER_V1, 2: MASTER_V2}}).current_version("k") == 2


def test_memory_store_refusals() -> None:
    store = MemoryKeyStore({CLASSIC_KEY_NAME: MASTER_V1})
    with pytest.raises(KeyStoreError, match="no key named"):
        store.cmac("nope", b"")
    with pytest.raises(KeyStoreError, match="no version 2"):
        store.classic_key(AN_UID, 1, "A", key_version=2)
    with pytest.raises(KeyStoreError, match="no key named"):
        MemoryKeyStore({"other": MASTER_V1}).classic_key(AN_UID, 1, "A")
    with pytest.raises(CodecError):
        store.classic_key(AN_UID, 40, "A")
    for bad in ({}, {"k": b"short"}, {"bad name": MASTER_V1}, {"k": {0: MASTER_V1}}):
        with pytest.raises(KeyStoreError) as info:
            MemoryKeyStore(bad)
        assert not _key_material_shown(str(info.value), MASTER_V1)
    with pytest.raises(KeyStoreError, match="current version"):
        MemoryKeyStore({"k": MASTER_V1}, current={"k": 2})


def test_store_never_shows_or_copies_key_material() -> None:
    store = MemoryKeyStore({CLASSIC_KEY_NAME: MASTER_V1, PURSE_MAC_KEY_NAME: MASTER_V2})
    for text in (repr(store), str(store), f"{store}"):
        assert "classic-sector" in text
        assert not _key_material_shown(text, MASTER_V1, MASTER_V2)
    with pytest.raises(KeyStoreError):
        pickle.dumps(store)
    with pytest.raises(KeyStoreError):
        copy.copy(store)


# --- keyed CMAC states, kept by the stores and a tap's card MACs -----------------------------


@pytest.mark.parametrize(("length", "mac"), RFC_EXAMPLES)
def test_keyed_cmac_rfc4493(length: int, mac: str) -> None:
    keyed = KeyedCmac(RFC_KEY)
    assert keyed(RFC_MESSAGE[:length]) == h(mac)
    assert keyed(RFC_MESSAGE[:length]) == h(mac)  # the state is copied, never used up
    assert keyed.subkeys() == cmac_subkeys(RFC_KEY)


@given(key=st.binary(min_size=16, max_size=16), data=st.lists(st.binary(max_size=80), max_size=4))
def test_keyed_cmac_is_cmac(key: bytes, data: list[bytes]) -> None:
    """Against the library's CMAC set up afresh for every message, in any order of use."""
    keyed = KeyedCmac(key)
    for message in data:
        fresh = crypto_cmac.CMAC(algorithms.AES(key))
        fresh.update(message)
        want = fresh.finalize()
        assert keyed(message) == want
        assert keyed(bytearray(message)) == want == aes_cmac(key, memoryview(message))


def test_keyed_cmac_refusals_and_secrecy() -> None:
    with pytest.raises(CodecError, match="AES-128 key must be 16 bytes"):
        KeyedCmac(b"short")
    with pytest.raises(CodecError, match="CMAC input must be bytes"):
        KeyedCmac(MASTER_V1)("text")  # type: ignore[arg-type]
    keyed = KeyedCmac(MASTER_V1)
    assert not _key_material_shown(repr(keyed), MASTER_V1)
    with pytest.raises(KeyStoreError):
        pickle.dumps(keyed)
    with pytest.raises(KeyStoreError):
        copy.copy(keyed)


def test_store_results_do_not_depend_on_its_caches() -> None:
    """The store keeps each master's CMAC state (current version by name, others by
    version): every answer equals the module functions' on the raw master, first call or
    not, current version or explicit."""
    store = MemoryKeyStore(
        {CLASSIC_KEY_NAME: {1: MASTER_V1, 2: MASTER_V2}, PURSE_MAC_KEY_NAME: MASTER_V2},
        current={CLASSIC_KEY_NAME: 1},
    )
    for _ in range(2):
        for version, master in ((None, MASTER_V1), (1, MASTER_V1), (2, MASTER_V2)):
            assert store.cmac(CLASSIC_KEY_NAME, b"abc", key_version=version) == aes_cmac(
                master, b"abc"
            )
            for uid in (AN_UID, AN_UID[:4]):
                assert store.diversify(
                    CLASSIC_KEY_NAME, uid, CLASSIC_AID, b"S", key_version=version
                ) == diversify_aes128(master, uid, CLASSIC_AID, b"S")
                assert store.classic_key(uid, 7, "B", key_version=version) == (
                    classic_sector_key(master, uid, 7, "B")
                )
        assert store.cmac(PURSE_MAC_KEY_NAME, b"") == aes_cmac(MASTER_V2, b"")
        with pytest.raises(KeyStoreError, match="no key named"):
            store.cmac("nope", b"")
        with pytest.raises(KeyStoreError, match="no version 3"):
            store.cmac(CLASSIC_KEY_NAME, b"", key_version=3)
        with pytest.raises(KeyStoreError, match="no key named"):
            store.cmac(["not", "hashable"], b"")  # type: ignore[arg-type]


def test_system_ids_come_out_the_same_from_the_cache() -> None:
    first = [classic_system_id(s, t) for s in range(40) for t in "AB"]
    again = [classic_system_id(s, t) for s in range(40) for t in "AB"]
    assert first == again
    assert first[0] == CLASSIC_SYSTEM_TAG + b"\x00A"
    for sector, key_type in ((40, "A"), (True, "A"), (1, "a"), (1, b"A")):
        with pytest.raises(CodecError):
            classic_system_id(sector, key_type)  # type: ignore[arg-type]


def test_a_hardware_sam_needs_only_diversify_and_cmac() -> None:
    class FakeSam(KeyStore):
        def names(self) -> list[str]:
            return [CLASSIC_KEY_NAME]

        def versions(self, name: str) -> list[int]:
            return [1]

        def current_version(self, name: str) -> int:
            return 1

        def diversify(self, name, uid, aid, system_id, *, key_version=None):  # type: ignore[no-untyped-def]
            return diversify_aes128(AN_MASTER, uid, aid, system_id)

        def cmac(self, name, data, *, key_version=None):  # type: ignore[no-untyped-def]
            return aes_cmac(AN_MASTER, data)

    assert FakeSam().classic_key(AN_UID, 1, "A") == h("A3F220E74CD0")
    with pytest.raises(TypeError):
        KeyStore()  # type: ignore[abstract]


def test_file_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    created = FileKeyStore.create(
        path,
        {CLASSIC_KEY_NAME: {1: MASTER_V1, 2: MASTER_V2}, PURSE_MAC_KEY_NAME: MASTER_V2},
        current={CLASSIC_KEY_NAME: 1},
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    opened = FileKeyStore.open(path)
    for store in (created, opened):
        assert store.names() == [CLASSIC_KEY_NAME, PURSE_MAC_KEY_NAME]
        assert store.versions(CLASSIC_KEY_NAME) == [1, 2]
        assert store.current_version(CLASSIC_KEY_NAME) == 1
        assert store.classic_key(AN_UID, 5, "A") == classic_sector_key(MASTER_V1, AN_UID, 5, "A")
        assert store.classic_key(AN_UID, 5, "A", 2) == classic_sector_key(MASTER_V2, AN_UID, 5, "A")
        assert store.cmac(PURSE_MAC_KEY_NAME, b"purse") == aes_cmac(MASTER_V2, b"purse")
    assert [p.name for p in tmp_path.iterdir()] == ["keys.toml"]  # no temporary left behind


def test_file_store_repr_hides_keys(tmp_path: Path) -> None:
    store = FileKeyStore.create(tmp_path / "keys.toml", {CLASSIC_KEY_NAME: MASTER_V1})
    assert "keys.toml" in repr(store)
    assert not _key_material_shown(repr(store) + str(store), MASTER_V1)


def test_file_store_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    FileKeyStore.create(path, {CLASSIC_KEY_NAME: MASTER_V1})
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match="already exists"):
        FileKeyStore.create(path, {CLASSIC_KEY_NAME: MASTER_V2})
    with pytest.raises(KeyStoreError, match="already exists"):
        FileKeyStore.generate(path)
    assert path.read_bytes() == before


def test_generate_makes_fresh_random_keys(tmp_path: Path) -> None:
    a = FileKeyStore.generate(tmp_path / "a.toml")
    b = FileKeyStore.generate(tmp_path / "b.toml")
    assert a.names() == b.names() == sorted(DEFAULT_KEY_NAMES)
    assert a.classic_key(AN_UID, 1, "A") != b.classic_key(AN_UID, 1, "A")
    assert stat.S_IMODE((tmp_path / "a.toml").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o666])
def test_file_store_refuses_loose_permissions(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.toml"
    FileKeyStore.create(path, {CLASSIC_KEY_NAME: MASTER_V1})
    path.chmod(mode)
    with pytest.raises(KeyStoreError) as info:
        FileKeyStore.open(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_file_store_accepts_owner_read_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    FileKeyStore.create(path, {CLASSIC_KEY_NAME: MASTER_V1})
    path.chmod(0o400)
    assert FileKeyStore.open(path).names() == [CLASSIC_KEY_NAME]


def test_file_store_refuses_another_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.toml"
    FileKeyStore.create(path, {CLASSIC_KEY_NAME: MASTER_V1})
    other = path.stat().st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: other)
    with pytest.raises(KeyStoreError, match=f"chown {other} "):
        FileKeyStore.open(path)


def test_file_store_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="afc keys generate"):
        FileKeyStore.open(tmp_path / "absent.toml")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyStoreError, match="not a regular file"):
        FileKeyStore.open(tmp_path / "dir")
    with pytest.raises(KeyStoreError, match="cannot create"):
        FileKeyStore.create(tmp_path / "no" / "such" / "dir.toml", {"k": MASTER_V1})


NEAR_KEY = "0F1E2D3C4B5A69788796A5B4C3D2E1F"  # 31 digits: most of a key


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not toml [", "not valid TOML"),
        ('format = 2\n[keys.k.versions]\n1 = "' + MASTER_V1.hex() + '"\n', "format"),
        ("format = 1\n", "no \\[keys"),
        ("format = 1\n[keys.k]\ncurrent = 1\n", "versions"),
        (f'format = 1\n[keys.k.versions]\n1 = "{NEAR_KEY}"\n', "hex digits"),
        (f'format = 1\n[keys.k.versions]\n1 = "{NEAR_KEY}Z"\n', "hex digits"),
        (f'format = 1\n[keys.k.versions]\nx = "{MASTER_V1.hex()}"\n', "not a number"),
        (f'format = 1\n[keys.k]\ncurrent = 3\n[keys.k.versions]\n1 = "{MASTER_V1.hex()}"\n', "3"),
    ],
)
def test_file_store_malformed(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match=why) as info:
        FileKeyStore.open(path)
    assert NEAR_KEY not in str(info.value)
    assert not _key_material_shown(str(info.value), MASTER_V1)


def test_file_store_reads_hand_written_toml(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        "format = 1\n"
        "[keys.classic-sector]\ncurrent = 2\n"
        f'[keys.classic-sector.versions]\n1 = "{MASTER_V1.hex()}"\n2 = "{MASTER_V2.hex()}"\n'
    )
    path.chmod(0o600)
    store = FileKeyStore.open(path)
    assert store.current_version(CLASSIC_KEY_NAME) == 2
    assert store.classic_key(AN_UID, 0, "A") == classic_sector_key(MASTER_V2, AN_UID, 0, "A")


# --- afc keys ------------------------------------------------------------------------------


@pytest.fixture
def afc():
    from tools.cli import main

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, ["keys", *args])

    return run


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_diversify_an10922(afc) -> None:
    result = afc(
        "diversify",
        "--master",
        AN_MASTER.hex().upper(),
        "--uid",
        "04782E21801D80",
        "--aid",
        "3042F5",
        "--system-id",
        "4E585020416275",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "A8DD63A3B89D54B37CA802473FDA9175\n"


def test_cli_classic(afc) -> None:
    for uid in ("04782E21801D80", "04:78:2e:21:80:1d:80", "04 78 2E 21 80 1D 80"):
        result = afc(
            "classic", "--master", AN_MASTER.hex(), "--uid", uid, "--sector", "1", "--key-type", "A"
        )
        assert result.exit_code == 0, result.output
        assert result.stdout == "A3F220E74CD0\n"
    result = afc(
        "classic",
        "--master",
        AN_MASTER.hex(),
        "--uid",
        "DEADBEEF",
        "--sector",
        "15",
        "--key-type",
        "a",
    )
    assert result.stdout == "BFBC167B96F7\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--master", AN_MASTER.hex()[:-1]], "odd number of hex digits"),
        (["--master", AN_MASTER.hex()[:-2]], "16 bytes"),
        (["--master", "zz" * 16], "not hex"),
        (["--master", AN_MASTER.hex(), "--sector", "40"], "sector 40 is out of range"),
        (["--master", AN_MASTER.hex(), "--sector", "-1"], "out of range"),
        (["--master", AN_MASTER.hex(), "--key-type", "C"], "key type"),
        (["--master", AN_MASTER.hex(), "--uid", "0102030405"], "UID must be 4 or 7"),
        (["--master", AN_MASTER.hex(), "--uid", "123"], "--uid: odd"),
        ([], "either --master"),
        (["--master", AN_MASTER.hex(), "--store", "x.toml"], "either --master"),
    ],
)
def test_cli_classic_errors(afc, args: list[str], message: str) -> None:
    defaults = {"--uid": "04782E21801D80", "--sector": "1", "--key-type": "A"}
    for i in range(0, len(args), 2):
        defaults.pop(args[i], None)
    extra = [item for pair in defaults.items() for item in pair]
    line = _one_line_error(afc("classic", *args, *extra))
    assert line.startswith("afc: error: ")
    assert message in line


def test_cli_diversify_errors(afc) -> None:
    base = ["--uid", "04782E21801D80", "--aid", "3042F5"]
    line = _one_line_error(
        afc("diversify", "--master", AN_MASTER.hex(), *base, "--system-id", "00" * 22)
    )
    assert "too long" in line
    line = _one_line_error(
        afc(
            "diversify",
            "--master",
            AN_MASTER.hex(),
            "--uid",
            "04782E21801D80",
            "--aid",
            "30F5",
            "--system-id",
            "",
        )
    )
    assert "AID must be 3 bytes" in line


def test_cli_generate_list_and_use_a_store(afc, tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    result = afc("generate", "--store", str(path))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "classic-sector v1" in result.stdout
    written = path.read_text()
    for line in written.splitlines():
        if '= "' in line:
            assert line.split('"')[1] not in result.output

    store = FileKeyStore.open(path)
    result = afc(
        "classic", "--store", str(path), "--uid", "DEADBEEF", "--sector", "2", "--key-type", "B"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == store.classic_key(h("DEADBEEF"), 2, "B").hex().upper() + "\n"

    result = afc(
        "diversify",
        "--store",
        str(path),
        "--key-name",
        "purse-mac",
        "--uid",
        "DEADBEEF",
        "--aid",
        "010203",
        "--system-id",
        "",
    )
    assert result.exit_code == 0, result.output
    expected = store.diversify("purse-mac", h("DEADBEEF"), h("010203"), b"")
    assert result.stdout == expected.hex().upper() + "\n"

    result = afc("list", "--store", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "classic-sector  current 1  versions 1",
        "journal-mac  current 1  versions 1",
        "purse-mac  current 1  versions 1",
    ]

    line = _one_line_error(afc("generate", "--store", str(path)))
    assert "already exists" in line
    assert path.read_text() == written

    path.chmod(0o644)
    line = _one_line_error(afc("list", "--store", str(path)))
    assert f"chmod 600 {path}" in line


def test_cli_generate_named_keys(afc, tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    result = afc("generate", "--store", str(path), "--key", "classic-sector", "--key", "lab-1")
    assert result.exit_code == 0, result.output
    assert FileKeyStore.open(path).names() == ["classic-sector", "lab-1"]
    line = _one_line_error(afc("generate", "--store", str(tmp_path / "x.toml"), "--key", "a b"))
    assert "key name" in line


@pytest.mark.parametrize("command", [[], ["diversify"], ["classic"], ["generate"], ["list"]])
def test_cli_help(afc, command: list[str]) -> None:
    result = afc(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    if command:
        assert "afc keys " + command[0] in result.stdout  # every command shows an example


def test_core_errors_are_what_the_cli_turns_into_one_line() -> None:
    assert issubclass(KeyStoreError, CoreError) and issubclass(CodecError, CoreError)


# --- card key versions: what a device tries on a card, and a card's view of the store ------

ROTATED_STORE = MemoryKeyStore(
    {"classic-sector": {1: bytes(16), 2: bytes(range(16)), 3: bytes(range(1, 17))},
     "purse-mac": {1: bytes(16), 2: bytes(range(16)), 3: bytes(range(2, 18))},
     "journal-mac": {1: bytes(16), 4: bytes(range(3, 19))}},
    current={"classic-sector": 2, "purse-mac": 2},
)


def test_card_key_versions_try_the_current_one_first_then_newest_first():
    assert card_key_versions(ROTATED_STORE) == [2, 3, 1]  # version 3 held, not yet current
    # a version held of one card key only is no card's version: a card needs both
    lopsided = MemoryKeyStore({"classic-sector": {1: bytes(16), 2: bytes(range(16))},
                               "purse-mac": {1: bytes(16)}}, current={"classic-sector": 1})
    assert card_key_versions(lopsided) == [1]


def test_a_pinned_store_pins_the_card_keys_and_nothing_else():
    uid = h("04A1B2C3")
    pinned = PinnedKeyStore(ROTATED_STORE, 1)
    assert pinned.current_version(CLASSIC_KEY_NAME) == pinned.current_version(
        PURSE_MAC_KEY_NAME) == 1
    assert pinned.current_version("journal-mac") == 4  # not a card key: the store's own
    assert pinned.classic_key(uid, 8, "B") == ROTATED_STORE.classic_key(uid, 8, "B",
                                                                        key_version=1)
    assert pinned.cmac(PURSE_MAC_KEY_NAME, b"x") == ROTATED_STORE.cmac(
        PURSE_MAC_KEY_NAME, b"x", key_version=1)
    assert pinned.cmac("journal-mac", b"x") == ROTATED_STORE.cmac("journal-mac", b"x")
    # an explicit version is still honoured
    assert pinned.classic_key(uid, 8, "B", key_version=3) == ROTATED_STORE.classic_key(
        uid, 8, "B", key_version=3)
    assert pinned.names() == ROTATED_STORE.names()
    assert pinned.versions(CLASSIC_KEY_NAME) == [1, 2, 3]
    with pytest.raises(KeyStoreError, match="no version 5"):
        PinnedKeyStore(ROTATED_STORE, 5)
    with pytest.raises(KeyStoreError):
        pickle.dumps(pinned)
    assert "v1" in repr(pinned)
    for key in (bytes(range(16)), bytes(range(1, 17))):
        assert key.hex() not in repr(pinned).lower()


def test_the_office_tool_uses_the_same_pinned_store():
    """``afc card`` and the devices share one implementation (tools.card_cmd re-exports it)."""
    from tools import card_cmd

    assert card_cmd.PinnedKeyStore is PinnedKeyStore
    assert card_cmd.card_key_versions is card_key_versions
