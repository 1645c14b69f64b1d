"""Small helpers for files that must survive a power cut (key stores, databases, card files)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "write_file"]


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


def write_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    replace: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write ``data`` to ``path`` complete or not at all, and durably.

    A temporary file beside ``path`` gets ``mode`` (and ``owner``, a (uid, gid)) before any
    byte is written, so a key never exists on disk with wider permissions; it is fsynced,
    then renamed over ``path`` (``replace``) or hard-linked to it, which refuses an existing
    file (:class:`FileExistsError`: two runs racing cannot both win); then the directory is
    fsynced. A crash leaves the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
