"""Per-conversation asyncio locks: a turn holds its conversation's from start to stored state."""

from __future__ import annotations

import asyncio
import time

__all__ = ["LockTable"]


class LockTable:
    """One asyncio lock per (owner, conversation), dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], list] = {}

    async def acquire(self, key: tuple[str, str]) -> float:
        """Take ``key``'s lock; returns the seconds spent waiting for another holder."""
        began = time.perf_counter()
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(key, entry)
            raise
        return time.perf_counter() - began

    def release(self, key: tuple[str, str]) -> None:
        entry = self._locks[key]
        entry[0].release()
        self._drop(key, entry)

    def _drop(self, key: tuple[str, str], entry: list) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
