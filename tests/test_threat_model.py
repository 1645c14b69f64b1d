"""docs/threat-model.md names a test for every control: every name it gives must exist, so
the document cannot point at a test that was renamed or deleted."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "threat-model.md"


def references() -> list[tuple[str, str]]:
    """(file, test) for every `file::test` and every following `::test` of the same file."""
    found = []
    for cell in re.findall(r"`([^`]*::[^`]*)`", DOC.read_text()):
        path, _, name = cell.partition("::")
        found.append((path, name))
    out, current = [], ""
    for path, name in found:
        current = path or current
        out.append((current, name.strip()))
    return out


def test_every_test_the_threat_model_names_exists():
    refs = references()
    assert len(refs) > 100
    missing = []
    for path, name in refs:
        source = ROOT / path
        if not source.is_file() or not re.search(rf"^(async )?def {re.escape(name)}\(",
                                                 source.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_attacker_has_controls():
    text = DOC.read_text()
    for attacker in ("Card cloner", "Purse rollback", "Dealer fraud", "Rogue device",
                     "Network attacker", "Insider with a validator"):
        section = text.split(f"### {attacker}")[1].split("###")[0]
        assert section.count("::") >= 3, attacker
