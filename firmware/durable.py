"""Small helpers for files that must survive a power cut (key stores, databases, card files)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the directory entries of files just created or renamed in ``directory`` durable.

    fsync on a file makes its contents durable, not its name: without this a power cut right
    after creating a key store or a database can lose the new file. Best effort: some
    filesystems refuse to open or sync a directory, which is not an error here.
    """
    try:
        fd = os.open(Path(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
