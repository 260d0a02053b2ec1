"""Serving support: per-conversation state kept on the server between requests.

:mod:`rxt.serve.store` holds a versioned store of conversation states (serialised STMs) with
compare-and-set appends, checksummed reads and owner isolation, backed by SQLite or Redis.
"""

from rxt.serve.store import (
    ConversationInfo,
    StateStore,
    StoreConflict,
    StoreCorrupt,
    StoredVersion,
    StoreError,
    StoreNotFound,
    open_store,
)

__all__ = [
    "ConversationInfo",
    "StateStore",
    "StoreConflict",
    "StoreCorrupt",
    "StoreError",
    "StoreNotFound",
    "StoredVersion",
    "open_store",
]
