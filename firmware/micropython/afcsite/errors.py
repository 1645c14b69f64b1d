"""The firmware's one exception hierarchy.

Every failure the firmware expects is a :class:`SiteError`; its message says what a field
technician can check (a file on flash, a key, a setting), and never carries a secret.
"""


class SiteError(Exception):
    """Base of every error raised on purpose by afcsite."""


class ConfigError(SiteError):
    """identity.json or config.json (or a config message) is missing, unreadable or invalid.

    The message names the file or field, so the fix is a corrected file or a new config
    message from the center.
    """


class ConfigRejected(SiteError):
    """A config message from the center was refused; ``reason`` is the token reported in the
    ``cfg-rejected`` event (``bad-json``, ``bad-signature``, ``stale-version``, ...)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


class EncodeError(SiteError):
    """A message cannot be written in the signed JSON form (a float, a non-text key, or it is
    larger than the preallocated output buffer)."""


class RingError(SiteError):
    """The event ring file on flash cannot be created or written (flash full or damaged)."""
