"""Fuzzing configuration bundles: what a compromised or buggy center could sign, through
``ConfigSync.decode`` + ``apply`` on a real device database, exactly as the agent runs them.

The harness (fuzz/fuzz_bundles.py) re-signs every bundle with a fixed test center key, so
the fuzzing gets past the signature into each kind's body checks and the stores. Each
message may only end in a documented :class:`SyncResult` outcome (or a ``StoreError``, the
one exception ``Agent._config_worker`` catches); afterwards the database must be consistent
(blacklist count == rows, no card twice, SQLite integrity), versions never go back, a
message not applied changes no store, and an applied blacklist or delta leaves exactly the
list it describes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_agent import protocol

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))
try:
    fb = importlib.import_module("fuzz_bundles")
finally:
    sys.path.remove(str(FUZZ))

U64 = 1 << 64
cards = st.one_of(st.integers(0, U64 - 1), st.sampled_from([0, 1, 2**63 - 1, 2**63, U64 - 1]),
                  st.integers(1, 20))
uids = st.none() | st.sampled_from([4, 7, 10]).flatmap(lambda n: st.binary(min_size=n,
                                                                          max_size=n))
entries = st.lists(st.tuples(cards, st.integers(0, 0xFFFF), uids), max_size=6)


@pytest.fixture(scope="module", autouse=True)
def _close_harness_rig():
    yield
    fb.RIGS.close()


@pytest.fixture
def rig():
    r = fb.BundleRig()
    yield r
    r.close()


def bundle(kind: str, version: int, body, *, base=None, target=None) -> tuple[str, bytes]:
    b = protocol.Bundle(kind, version, body, fb.NOW_MS, base, target)
    return protocol.cfg_topic(kind), protocol.encode_bundle(b, fb.CENTER_KEY)


@settings(max_examples=600)
@given(st.binary(max_size=800))
@example(b"")
@example(bytes(64))
@example(b"\x0d" + b"\xff" * 40)  # raw payload mode
def test_any_bytes_through_the_bundle_harness(data):
    fb.TestOneInput(data)


@st.composite
def steps(draw):
    """A kind, a version relative to the one in force, and a body: from hypothesis for the
    blacklist kinds (the model check then covers every entry), from bytes for the others."""
    kind = draw(st.sampled_from(protocol.BUNDLE_KINDS))
    offset = draw(st.sampled_from([1, 1, 1, 2, 0, -1]))
    base_offset = draw(st.sampled_from([0, 0, 0, -1, 1]))
    if kind == "blacklist":
        body = {"entries": draw(entries)}
    elif kind == "blacklist-delta":
        body = {"add": draw(entries), "remove": draw(st.lists(cards, max_size=4))}
    else:
        body = fb.logical_body(fb.Draw(draw(st.binary(max_size=120))), kind, [1, 2, 3])
    return kind, offset, base_offset, body


@settings(max_examples=200)
@given(st.lists(steps(), min_size=1, max_size=5))
def test_bundle_sequences_keep_the_database_consistent(seq):
    rig = fb.BundleRig()
    try:
        for kind, offset, base_offset, body in seq:
            version = max(1, fb.current_version(rig.db, kind) + offset)
            base = None
            if kind == "blacklist-delta":
                base = max(0, rig.db.blacklist.version + base_offset)
                version = max(version, base + 1)
            try:
                topic, payload = bundle(kind, version, body, base=base)
            except protocol.ProtocolError:  # our encoder refuses it: sign the raw body then
                fields = {"kind": kind, "version": version, "ts": fb.NOW_MS, "z": "deflate",
                          "body": fb.deflate(fb.cbor2.dumps(body, canonical=True))}
                if base is not None:
                    fields["base"] = base
                topic, payload = protocol.cfg_topic(kind), fb.sign(fields)
            rig.deliver(topic, payload)
    finally:
        rig.close()


def test_a_blacklist_chain_is_applied_as_listed(rig):
    """The rig's model agrees with the stores on a normal chain, and every refusal path
    (rollback, same version, broken chain, superseded list) leaves the list alone."""
    r = rig.deliver(*bundle("blacklist", 1, {"entries": [(5, 1, None), (2**64 - 1, 2, bytes(4))]}))
    assert r.outcome == fb.APPLIED and rig.db.blacklist.count == 2
    r = rig.deliver(*bundle("blacklist-delta", 2, {"add": [(7, 3, None)], "remove": [5]}, base=1))
    assert r.outcome == fb.APPLIED and rig.db.blacklist.lookup(5) is None
    assert rig.db.blacklist.lookup(7).reason == 3 and rig.db.blacklist.count == 2
    r = rig.deliver(*bundle("blacklist-delta", 4, {"add": [], "remove": [7]}, base=3))
    assert r.outcome == fb.RELOAD and rig.db.blacklist.lookup(7) is not None
    r = rig.deliver(*bundle("blacklist", 1, {"entries": []}))
    assert r.outcome == fb.SUPERSEDED
    rig.sync.forget()
    assert rig.deliver(*bundle("actions", 1, {"actions": []})).outcome == fb.APPLIED
    assert rig.deliver(*bundle("actions", 1, {"actions": []})).outcome in (fb.SAME,
                                                                           fb.DUPLICATE)
    assert rig.outcomes[fb.APPLIED] == 3


def test_the_checks_catch_a_broken_database(rig):
    """The consistency checks can fail: a count that disagrees with the rows is caught."""
    rig.deliver(*bundle("blacklist", 1, {"entries": [(5, 1, None)]}))
    rig.db.connection.execute("UPDATE meta SET value = 7 WHERE key = 'blacklist_count'")
    with pytest.raises(AssertionError, match="blacklist count"):
        fb.check_database(rig.db)


def test_a_store_change_without_applied_is_caught(rig, monkeypatch):
    """And so is a refusal that changed a store (here: a sync that applies but says no)."""
    real = fb.ConfigSync._apply

    def lying(self, db, b):
        real(self, db, b)
        return fb.SyncResult(fb.REJECTED, b.kind, b.version, "lie")

    monkeypatch.setattr(fb.ConfigSync, "_apply", lying)
    with pytest.raises(AssertionError, match="changed the stores"):
        rig.deliver(*bundle("blacklist", 1, {"entries": [(5, 1, None)]}))


@pytest.mark.slow
@settings(max_examples=20_000)
@given(st.binary(max_size=2000))
def test_bundle_harness_soak(data):
    fb.TestOneInput(data)
