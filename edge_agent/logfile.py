"""The agent's log file: one line per record, UTC timestamp first, rotated by size.

The format is what ``send-logs`` parses back: ``2025-05-01T08:30:00.123Z LEVEL logger
message``. Lines that do not start with a timestamp (a traceback) belong to the record above
them. Rotation (``agent.log``, ``agent.log.1`` ...) bounds the disk the log may take;
:func:`read_log_since` reads the rotated files oldest first.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["LogExcerpt", "UtcFormatter", "open_log_handler", "read_log_since"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class UtcFormatter(logging.Formatter):
    """ISO 8601 UTC with milliseconds: sortable, parseable, the same on every device."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{base}.{int(record.msecs):03d}Z"


def open_log_handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    """A size-rotated file handler with the agent's format (creates the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(UtcFormatter(LOG_FORMAT))
    return handler


def _line_time_ms(line: str) -> int | None:
    stamp = line[:24]
    if len(stamp) != 24 or stamp[-1] != "Z" or stamp[10] != "T":
        return None
    try:
        when = datetime.strptime(stamp[:-1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(when.timestamp() * 1000)


class LogExcerpt:
    """Log lines since a time, bounded: ``text``, whether it was cut short and where to
    continue (``next_since``, the time of the first line left out)."""

    def __init__(self, text: str, truncated: bool, next_since: int | None, lines: int) -> None:
        self.text = text
        self.truncated = truncated
        self.next_since = next_since
        self.lines = lines


def read_log_since(path: Path, since_ms: int, max_bytes: int, backups: int = 20) -> LogExcerpt:
    """The lines of ``path`` (and its rotated copies) logged at or after ``since_ms``.

    Oldest first, at most ``max_bytes`` of UTF-8; when cut, ``next_since`` says where the
    next request should start. Unreadable files are skipped (the log may be rotating).
    """
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    out: list[str] = []
    size = 0
    include = False
    current: int | None = None
    for file in files:
        try:
            handle = file.open("r", encoding="utf-8", errors="replace")
        except OSError:
            continue
        with handle:
            for line in handle:
                stamp = _line_time_ms(line)
                if stamp is not None:
                    include = stamp >= since_ms
                    current = stamp
                if not include:
                    continue
                encoded = len(line.encode("utf-8"))
                if size + encoded > max_bytes:
                    return LogExcerpt("".join(out), True, current, len(out))
                out.append(line)
                size += encoded
    return LogExcerpt("".join(out), False, None, len(out))
