"""The atheris harnesses of fuzz/ run here on a few inputs, without atheris, so they keep
working between the on-demand coverage-guided runs (fuzz/README.md)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from firmware.reader.codec import encode_command

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
HARNESSES = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))


def load(name: str):
    sys.path.insert(0, str(FUZZ))
    try:
        spec = importlib.util.spec_from_file_location(f"afc_fuzz_{name}", FUZZ / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(FUZZ))


def test_every_harness_is_here():
    assert HARNESSES == ["fuzz_agent_config", "fuzz_bundles", "fuzz_card_sectors",
                         "fuzz_iso14443", "fuzz_mqtt_payloads", "fuzz_pn532_codec"]


@pytest.mark.parametrize("name", HARNESSES)
def test_a_harness_survives_its_corpus_seeds(name):
    harness = load(name)
    rng = random.Random(name)
    inputs = [b"", b"\x00", b"\xff" * 300, encode_command(0x4A, b"\x01\x00") * 3,
              b'[device]\nid = "X"\n', *(rng.randbytes(rng.randrange(1, 400)) for _ in range(30))]
    inputs += SEEDS.get(name, [])
    try:
        for data in inputs:
            harness.TestOneInput(data)
    finally:
        pool = getattr(harness, "RIGS", None)  # the message harnesses' throw-away rigs
        if pool is not None:
            pool.close()


#: Inputs that take the structured decoders of the message harnesses down each path: the
#: first bytes pick the mode (or the topic leaf), the kind and the version; zeros past the
#: end give the plainest valid choice.
SEEDS = {
    "fuzz_bundles": [
        bytes([0, 0, kind]) + bytes(40) for kind in range(6)  # each kind, next version, valid
    ] + [
        bytes([0, 0, 1, 0, 0]) + b"\x05" * 60,  # a blacklist with entries
        bytes([0, 0, 2, 0, 0]) + b"\x03" * 60,  # a delta
        bytes([0, 13, 0, 0]) + b"\xa1" * 20,  # raw payload
        bytes([0, 14, 1, 0, 0]) + b"\x81\x00",  # raw body, deflated
        bytes([0, 15, 3, 0, 0]) + b"\xff" * 9,  # raw body, not DEFLATE
    ],
    "fuzz_mqtt_payloads": [
        bytes([0, leaf]) + bytes(60) for leaf in range(9)  # every topic leaf, structured
    ] + [bytes([0, leaf, 0, 0, 15]) + b"\xff" * 30 for leaf in range(9)],  # raw payloads
}
