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
    assert HARNESSES == ["fuzz_agent_config", "fuzz_card_sectors", "fuzz_iso14443",
                         "fuzz_pn532_codec"]


@pytest.mark.parametrize("name", HARNESSES)
def test_a_harness_survives_its_corpus_seeds(name):
    harness = load(name)
    rng = random.Random(name)
    inputs = [b"", b"\x00", b"\xff" * 300, encode_command(0x4A, b"\x01\x00") * 3,
              b'[device]\nid = "X"\n', *(rng.randbytes(rng.randrange(1, 400)) for _ in range(30))]
    for data in inputs:
        harness.TestOneInput(data)
