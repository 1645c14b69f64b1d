"""Fuzzing ``agent.toml``: :func:`edge_agent.settings.load_settings` on arbitrary files.

A technician edits agent.toml by hand on a device; whatever they write (a typo, a wrong
type, a number out of range, a file that is not TOML or not UTF-8) must be refused with an
:class:`~edge_agent.errors.AgentConfigError` naming the problem, and the agent must never
start with a crash instead. Documents are generated around the real schema (known sections
and keys with values of any TOML type), so most of them get deep into the checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
from datetime import date, datetime, time
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge_agent.errors import AgentConfigError
from edge_agent.settings import AgentSettings, load_settings

SCHEMA = {f.name: [g.name for g in dataclasses.fields(getattr(AgentSettings(), f.name))]
          for f in dataclasses.fields(AgentSettings) if f.name != "source"}
VALID = {"device": {"id": "BUS-1"}, "identity": {"center_public": "ab" * 32}}
_DIR = Path(tempfile.mkdtemp(prefix="afc-fuzz-toml-"))  # hypothesis: no function fixtures


@pytest.fixture(scope="module", autouse=True)
def _remove_dir():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


def toml_value(value) -> str:
    """``value`` as TOML (inline tables and arrays; strings as JSON, which TOML accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_doc(doc: dict) -> str:
    lines = []
    for section, values in doc.items():
        if isinstance(values, dict):
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]
        else:
            lines.insert(0, f"{json.dumps(section)} = {toml_value(values)}")
    return "\n".join(lines) + "\n"


scalars = st.one_of(
    st.booleans(), st.integers(), st.integers(-(2**63), 2**63 - 1), st.integers(2**1023, 2**1100),
    st.floats(),
    st.text(max_size=80), st.sampled_from(["", "~", "/", "device.db", "ab" * 32, "5", "clean",
                                          "persistent", "3.1.1", "validator", "camera-site"]),
    st.dates(), st.datetimes(), st.times(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@st.composite
def documents(draw) -> dict:
    doc = {}
    for section, keys in SCHEMA.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(keys) | st.text(min_size=1, max_size=10),
                                   max_size=5, unique=True))
            doc[section] = {k: draw(values) for k in chosen}
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(min_size=1, max_size=10))] = draw(values)
    if draw(st.booleans()):  # keep the two required settings, so the checks go deeper
        for section, required in VALID.items():
            table = doc.setdefault(section, {})
            if isinstance(table, dict):
                for k, v in required.items():
                    table.setdefault(k, v)
    return doc


def load(text: bytes | str, name: str = "agent.toml"):
    path = _DIR / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return load_settings(path)


@given(documents())
@example({**VALID, "mqtt": {"port": 0}})
@example({**VALID, "batch": {"window": True}})
def test_any_agent_toml_is_loaded_or_refused_with_agent_config_error(doc):
    try:
        text = toml_doc(doc)
    except (TypeError, UnicodeEncodeError):
        return
    try:
        settings = load(text)
    except AgentConfigError as exc:
        assert str(exc)
        return
    assert isinstance(settings, AgentSettings)
    assert settings.device.id and settings.identity.center_public


@given(st.binary(max_size=400))
@example(b"\xff\xfe not utf-8")
@example(b"[device\n")
def test_any_bytes_as_agent_toml_are_refused_cleanly(raw):
    with contextlib.suppress(AgentConfigError):
        load(raw, "raw.toml")


def test_a_huge_integer_for_a_float_setting_is_refused_cleanly():
    """Found by this fuzzing: float() of an integer beyond a float's range (TOML allows it,
    tomllib parses it) raised OverflowError instead of AgentConfigError."""
    with pytest.raises(AgentConfigError):
        load(toml_doc({**VALID, "mqtt": {"backoff_initial_s": 10**400}}), "huge.toml")
