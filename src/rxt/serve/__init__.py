"""Serving: ``rxt serve``, an OpenAI-compatible server keeping each conversation's STM.

:func:`rxt.serve.app.create_app` builds the FastAPI app (routes in ``serve.routes``, turns in
:mod:`rxt.serve.service`). :mod:`rxt.serve.store` holds a versioned store of conversation states
(serialised STMs) with compare-and-set appends, checksummed reads and owner isolation, backed by
SQLite or Redis. See ``docs/serving.md``.
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
