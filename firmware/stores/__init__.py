"""Layer 3: the device database (one SQLite file per device, WAL) and the stores in it.

:class:`DeviceDatabase` holds the blacklist, the action list, the transaction journal, the
applied configuration bundles and the device's events;
:class:`AuthFailureLimiter` rate-limits card authentication failures in memory. Nothing here
talks to the network. ``docs/stores.md`` documents the schema, the durability argument, the
journal MAC format and the rate-limit policy.
"""

from .actions import ACTION_KINDS, Action, ActionList
from .blacklist import Blacklist, BlacklistEntry
from .config import KIND_AGENT, KIND_CREDIT, KIND_FARES, ConfigEntry, ConfigStore
from .database import JOURNAL_MAC_KEY_NAME, DeviceDatabase, JournalKey
from .errors import (
    ActionAlreadyApplied,
    DeltaChainBroken,
    DeviceMismatch,
    InvalidRecord,
    JournalTampered,
    NotFound,
    StaleVersion,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
)
from .events import SEVERITIES, STATUS_READER, EventLog, EventRecord
from .journal import (
    KIND_ACTION_APPLIED,
    KIND_REJECTION,
    KIND_REPAIR,
    KIND_TAP,
    KIND_TOPUP,
    PHASE_DONE,
    PHASE_EVENT,
    PHASE_INTENT,
    Journal,
    JournalRecord,
    canonical_bytes,
)
from .ratelimit import AuthFailureLimiter
from .schema import SCHEMA_VERSION

__all__ = [
    "ACTION_KINDS",
    "JOURNAL_MAC_KEY_NAME",
    "KIND_ACTION_APPLIED",
    "KIND_AGENT",
    "KIND_CREDIT",
    "KIND_FARES",
    "KIND_REJECTION",
    "KIND_REPAIR",
    "KIND_TAP",
    "KIND_TOPUP",
    "PHASE_DONE",
    "PHASE_EVENT",
    "PHASE_INTENT",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "STATUS_READER",
    "Action",
    "ActionAlreadyApplied",
    "ActionList",
    "AuthFailureLimiter",
    "Blacklist",
    "BlacklistEntry",
    "ConfigEntry",
    "ConfigStore",
    "DeltaChainBroken",
    "DeviceDatabase",
    "DeviceMismatch",
    "EventLog",
    "EventRecord",
    "InvalidRecord",
    "Journal",
    "JournalKey",
    "JournalRecord",
    "JournalTampered",
    "NotFound",
    "StaleVersion",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "canonical_bytes",
]
