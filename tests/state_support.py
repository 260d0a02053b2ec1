"""Test helpers for stored STM blobs: count the sha256 calls a module makes, damage a stored
state in place (real SQLite or Redis, no mocks of the store)."""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

from rxt.serve.store import StateStore
from rxt.serve.store.sqlite import SQLiteStore


class CountingHashlib:
    """``hashlib`` as one module sees it, recording how many bytes each sha256 starts on."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def sha256(self, data: Any = b"", **kwargs: Any):
        self.sizes.append(memoryview(data).nbytes)
        return hashlib.sha256(data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(hashlib, name)


def flip_stored_byte(store: StateStore, owner: str, cid: str, version: int, index: int) -> None:
    """Flip one bit of a stored state in place: same length, one byte changed."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            where = "WHERE owner = ? AND conversation_id = ? AND version = ?"
            (state,) = db.execute(f"SELECT state FROM versions {where}", (owner, cid, version))
            damaged = bytearray(state[0])
            damaged[index] ^= 0x01
            db.execute(
                f"UPDATE versions SET state = ? {where}", (bytes(damaged), owner, cid, version)
            )
    else:
        key = store._key(owner, "state", cid)
        damaged = bytearray(store.redis.hget(key, version))
        damaged[index] ^= 0x01
        store.redis.hset(key, version, bytes(damaged))
