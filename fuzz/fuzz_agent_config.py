"""atheris harness: any bytes as agent.toml. Only AgentConfigError may come out.

Finding so far: an integer beyond a float's range for a float setting raised OverflowError
(fixed; regression test in tests/test_fuzz_agent_config.py).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from pathlib import Path

import _common  # first: puts the repository on sys.path

from edge_agent.errors import AgentConfigError
from edge_agent.settings import load_settings

_PATH = Path(tempfile.mkdtemp(prefix="afc-fuzz-")) / "agent.toml"
atexit.register(shutil.rmtree, _PATH.parent, ignore_errors=True)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    _PATH.write_bytes(data)
    with contextlib.suppress(AgentConfigError):
        load_settings(_PATH)


if __name__ == "__main__":
    _common.run(TestOneInput)
