"""Versioned conversation-state store: one interface, a SQLite and a Redis backend.

A served conversation *is* its STM between turns (see :mod:`rxt.engine.state`), so the server
keeps one state blob per turn here. The store treats a state as opaque bytes and guarantees:

* **Compare-and-set appends.** :meth:`StateStore.append_version` stores version ``n + 1`` only
  if the latest version is still ``n`` (the one the caller read); otherwise it raises
  :class:`StoreConflict` naming both numbers. Two requests continuing the same conversation at
  once cannot both win, so a turn is never computed from a state that another turn replaced.
  Versions are contiguous ``1..N`` (minus those pruned by ``keep_versions``).
* **Atomic writes.** A version is stored entirely (state, checksum, turn, new latest number)
  or not at all, so a crash leaves the previous version intact and readable.
* **Verified reads.** Every version carries the sha256 of its state bytes, recomputed on each
  read whatever the payload; a mismatch raises :class:`StoreCorrupt` naming conversation and
  version, so damaged bytes never reach the model. This check covers every byte of an STM
  blob, the tensor bytes its own checksum covers included, so the server then loads it with
  :func:`rxt.engine.state.stm_from_bytes` ``(..., verify_checksum=False)``, which still checks
  format, model fingerprint, shape, dtype and finite values: each read hashes the blob once.
  (A write hashes the tensor bytes twice, unavoidably: the blob's checksum is in its header,
  which the store's sha256 covers, so neither digest can be computed from the other.)
* **Ownership isolation.** Conversations and alias keys are namespaced by ``owner`` (the
  server passes a hash of the API key): another owner's conversation is indistinguishable
  from a missing one — reads return ``None``, writes raise :class:`StoreNotFound`, and the
  same id may exist independently under two owners.
* **Retention.** ``ttl_seconds`` drops conversations idle (no create or append) for longer;
  ``keep_versions`` keeps only the newest N versions of each conversation.

:func:`open_store` picks the backend from a URL: ``redis://`` / ``rediss://`` →
:class:`~rxt.serve.store.redis.RedisStore`, ``sqlite:///path`` or a plain path →
:class:`~rxt.serve.store.sqlite.SQLiteStore`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

MAX_ID_LEN = 256


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreConflict(StoreError):
    """A write lost a race or reused an id: a compare-and-set saw another version."""


class StoreCorrupt(StoreError):
    """Stored state bytes no longer match their recorded sha256."""


class StoreNotFound(StoreError, KeyError):
    """A write named a conversation (or version) that this owner does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ConversationInfo:
    conversation_id: str
    owner: str
    created_at: float
    updated_at: float  # last create or append: what ttl_seconds measures
    latest_version: int  # 0 until the first append
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredVersion:
    conversation_id: str
    version: int
    state: bytes
    sha256: str  # of ``state``, verified when this object was read
    created_at: float
    turn: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    """Where an alias key points. ``committed`` is False for a *pending* binding: one made
    (with ``bind(..., pending=True)``) for the version a writer is about to append, so that
    another process can tell "being written" from "never existed" and wait for it."""

    conversation_id: str
    version: int
    bound_at: float  # time.time() of the bind
    committed: bool


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_conversation_id() -> str:
    return f"conv_{secrets.token_hex(16)}"


def check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise ValueError(f"{name} must be a non-empty str of at most {MAX_ID_LEN} chars")
    return value


def check_version(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def dump_json(name: str, value: dict | None) -> str:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def verified(
    conversation_id: str, version: int, state: bytes, digest: str, created_at: float, turn: str
) -> StoredVersion:
    """A StoredVersion from raw fields, or StoreCorrupt if the state fails its checksum."""
    state = bytes(state)
    if sha256_hex(state) != digest:
        raise StoreCorrupt(
            f"conversation {conversation_id!r} version {version}: state bytes fail their "
            f"sha256 check ({len(state)} bytes stored)"
        )
    return StoredVersion(conversation_id, version, state, digest, created_at, json.loads(turn))


def conflict(conversation_id: str, expected: int, latest: int) -> StoreConflict:
    return StoreConflict(
        f"conversation {conversation_id!r}: expected latest version {expected}, but it is {latest}"
    )


def not_found(conversation_id: str, version: int | None = None) -> StoreNotFound:
    what = f"conversation {conversation_id!r}"
    if version is not None:
        what += f" version {version}"
    return StoreNotFound(f"{what} not found")


class StateStore(ABC):
    """The interface both backends implement; see the module docstring for guarantees."""

    ttl_seconds: float | None
    keep_versions: int | None

    def _init_retention(self, ttl_seconds: float | None, keep_versions: int | None) -> None:
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0 or None, got {ttl_seconds!r}")
        if keep_versions is not None:
            check_version("keep_versions", keep_versions, 1)
        self.ttl_seconds = ttl_seconds
        self.keep_versions = keep_versions

    @abstractmethod
    def create_conversation(
        self, owner: str, conversation_id: str | None = None, metadata: dict | None = None
    ) -> str:
        """Create an empty conversation (latest version 0); a duplicate id → StoreConflict."""

    @abstractmethod
    def get_conversation(self, owner: str, conversation_id: str) -> ConversationInfo | None:
        """The conversation, or None if missing or owned by someone else."""

    @abstractmethod
    def list_conversations(self, owner: str, limit: int = 100) -> list[ConversationInfo]:
        """This owner's conversations, most recently active first."""

    @abstractmethod
    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        """Delete a conversation with its versions and alias bindings; False if missing."""

    @abstractmethod
    def append_version(
        self, owner: str, conversation_id: str, expected_version: int, state: bytes, turn: dict
    ) -> int:
        """Store version ``expected_version + 1`` iff the latest is ``expected_version``.

        Returns the new version; StoreConflict if the latest differs, StoreNotFound if the
        conversation is missing. With ``keep_versions`` older versions are dropped here."""

    @abstractmethod
    def get_version(self, owner: str, conversation_id: str, version: int) -> StoredVersion | None:
        """One version (checksum verified), or None if missing or pruned."""

    @abstractmethod
    def latest(self, owner: str, conversation_id: str) -> StoredVersion | None:
        """The newest version (checksum verified), or None if there is none."""

    @abstractmethod
    def turns(self, owner: str, conversation_id: str) -> list[dict]:
        """The stored versions' turn dicts in version order ([] if missing)."""

    @abstractmethod
    def get_turn(self, owner: str, conversation_id: str, version: int) -> dict | None:
        """One version's turn dict without its state (cheap), or None if missing or pruned."""

    def bind(
        self, owner: str, key: str, conversation_id: str, version: int, *, pending: bool = False
    ) -> None:
        """Point alias ``key`` at a stored version (overwrites an earlier binding). With
        ``pending`` the version may also be the next one, ``latest + 1``, not yet appended; a
        reader must then check that the version, once there, is the one it was bound for
        (another writer may have won the compare-and-set)."""
        self.bind_many(owner, [key], conversation_id, version, pending=pending)

    def bind_many(
        self,
        owner: str,
        keys: list[str],
        conversation_id: str,
        version: int,
        *,
        pending: bool = False,
    ) -> None:
        """:meth:`bind` every key of ``keys`` to the same version, in one write."""
        for key in keys:
            check_id("key", key)
        check_version("version", version, 1)
        self._bind_many(owner, keys, conversation_id, version, pending)

    @abstractmethod
    def _bind_many(
        self, owner: str, keys: list[str], conversation_id: str, version: int, pending: bool
    ) -> None:
        """The backend's write of :meth:`bind_many`, its arguments already checked."""

    def lookup(self, owner: str, key: str) -> tuple[str, int] | None:
        """(conversation_id, version) for an alias whose version is stored, or None if unbound,
        pending, or its target is gone."""
        found = self.binding(owner, key)
        return (found.conversation_id, found.version) if found and found.committed else None

    @abstractmethod
    def binding(self, owner: str, key: str) -> Binding | None:
        """The alias's target, pending or stored; None if unbound or its target is gone
        (conversation deleted or expired, version pruned)."""

    @abstractmethod
    def unbind(self, owner: str, key: str) -> bool:
        """Remove an alias; False if it was not bound."""

    @abstractmethod
    def purge(self, now: float | None = None) -> int:
        """Delete conversations idle longer than ``ttl_seconds``; returns how many."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    url_or_path: str, *, ttl_seconds: float | None = None, keep_versions: int | None = None
) -> StateStore:
    """``redis://…``/``rediss://…`` → RedisStore; ``sqlite:///path`` or a plain path →
    SQLiteStore; anything else (another scheme, an empty string) → ValueError."""
    if not isinstance(url_or_path, str) or not url_or_path.strip():
        raise ValueError(f"state store URL must be a non-empty string, got {url_or_path!r}")
    kwargs = {"ttl_seconds": ttl_seconds, "keep_versions": keep_versions}
    scheme, sep, rest = url_or_path.partition("://")
    if not sep:
        path = url_or_path
    elif scheme.lower() in ("redis", "rediss"):
        from rxt.serve.store.redis import RedisStore

        return RedisStore(url_or_path, **kwargs)
    elif scheme.lower() == "sqlite" and rest.startswith("/") and rest != "/":
        path = rest  # sqlite:///tmp/x.db → /tmp/x.db
    else:
        raise ValueError(
            f"unsupported state store URL {url_or_path!r}: use redis://host:port/db, "
            "sqlite:///absolute/path.db, or a plain file path"
        )
    from rxt.serve.store.sqlite import SQLiteStore

    return SQLiteStore(path, **kwargs)
