"""SQLite backend of the conversation-state store (standard-library ``sqlite3``).

Guarantees and why:

* **WAL journal, ``synchronous=FULL``.** WAL lets readers run while one writer commits. FULL
  fsyncs the WAL on every commit, so a version the server acknowledged (its response id is
  already with the client) survives an OS crash or power loss, not just a process crash
  (NORMAL in WAL mode may roll back the last commits on power loss). The cost is one fsync per
  turn, small next to generating a reply.
* **One ``BEGIN IMMEDIATE`` transaction per write.** The write lock is taken before the
  compare-and-set reads the latest version, so the read and the insert are one atomic step
  across threads *and* processes sharing the file; a crash mid-write rolls back to the
  previous version. Lock waits use ``busy_timeout`` (30 s).
* **A connection per thread** (``threading.local``), all closed by :meth:`close`: reads from
  several threads do not queue behind one lock, and sqlite3 connections are never shared.
* Rows are keyed by ``(owner, conversation_id)``; owners are stored as given.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rxt.serve.store import (
    Binding,
    ConversationInfo,
    StateStore,
    StoreConflict,
    StoredVersion,
    check_id,
    check_version,
    conflict,
    dump_json,
    new_conversation_id,
    not_found,
    sha256_hex,
    verified,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    latest_version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (owner, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_by_activity ON conversations (updated_at);
CREATE TABLE IF NOT EXISTS versions (
    owner TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    state BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    turn TEXT NOT NULL,
    PRIMARY KEY (owner, conversation_id, version)
);
CREATE TABLE IF NOT EXISTS bindings (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    bound_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bindings_by_conversation ON bindings (owner, conversation_id);
"""

_CONV_COLUMNS = "id, owner, created_at, updated_at, latest_version, metadata"
_VERSION_COLUMNS = "version, state, sha256, created_at, turn"


def _info(row: tuple) -> ConversationInfo:
    cid, owner, created, updated, latest, metadata = row
    return ConversationInfo(cid, owner, created, updated, latest, json.loads(metadata))


class SQLiteStore(StateStore):
    def __init__(
        self,
        path: str | Path,
        *,
        ttl_seconds: float | None = None,
        keep_versions: int | None = None,
    ) -> None:
        self._init_retention(ttl_seconds, keep_versions)
        self.path = str(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            # Each thread's connection would see its own empty in-memory database.
            raise ValueError(f"SQLiteStore needs a file path, got {self.path!r}")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._db().executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")

    # -- connections and transactions -------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("SQLiteStore is closed")
                db = sqlite3.connect(
                    self.path, timeout=30.0, isolation_level=None, check_same_thread=False
                )
                self._connections.append(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    # -- conversations ----------------------------------------------------------------------

    def create_conversation(
        self, owner: str, conversation_id: str | None = None, metadata: dict | None = None
    ) -> str:
        check_id("owner", owner)
        cid = check_id("conversation_id", conversation_id or new_conversation_id())
        meta = dump_json("metadata", metadata)
        now = time.time()
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO conversations ({_CONV_COLUMNS}) VALUES (?, ?, ?, ?, 0, ?)",
                    (cid, owner, now, now, meta),
                )
        except sqlite3.IntegrityError:
            raise StoreConflict(f"conversation {cid!r} already exists") from None
        return cid

    def get_conversation(self, owner: str, conversation_id: str) -> ConversationInfo | None:
        row = (
            self._db()
            .execute(
                f"SELECT {_CONV_COLUMNS} FROM conversations WHERE owner = ? AND id = ?",
                (owner, conversation_id),
            )
            .fetchone()
        )
        return None if row is None else _info(row)

    def list_conversations(self, owner: str, limit: int = 100) -> list[ConversationInfo]:
        rows = self._db().execute(
            f"SELECT {_CONV_COLUMNS} FROM conversations WHERE owner = ? "
            "ORDER BY updated_at DESC, id LIMIT ?",
            (owner, check_version("limit", limit, 0)),
        )
        return [_info(r) for r in rows]

    @staticmethod
    def _delete(db: sqlite3.Connection, owner: str, conversation_id: str) -> bool:
        key = (owner, conversation_id)
        gone = db.execute("DELETE FROM conversations WHERE owner = ? AND id = ?", key).rowcount
        db.execute("DELETE FROM versions WHERE owner = ? AND conversation_id = ?", key)
        db.execute("DELETE FROM bindings WHERE owner = ? AND conversation_id = ?", key)
        return gone > 0

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        with self._write() as db:
            return self._delete(db, owner, conversation_id)

    # -- versions ---------------------------------------------------------------------------

    def append_version(
        self, owner: str, conversation_id: str, expected_version: int, state: bytes, turn: dict
    ) -> int:
        check_version("expected_version", expected_version, 0)
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes, got {type(state).__name__}")
        state = bytes(state)
        turn_json = dump_json("turn", turn)
        digest = sha256_hex(state)
        new = expected_version + 1
        with self._write() as db:
            row = db.execute(
                "SELECT latest_version FROM conversations WHERE owner = ? AND id = ?",
                (owner, conversation_id),
            ).fetchone()
            if row is None:
                raise not_found(conversation_id)
            if row[0] != expected_version:
                raise conflict(conversation_id, expected_version, row[0])
            now = time.time()
            db.execute(
                f"INSERT INTO versions (owner, conversation_id, {_VERSION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (owner, conversation_id, new, state, digest, now, turn_json),
            )
            db.execute(
                "UPDATE conversations SET latest_version = ?, updated_at = ? "
                "WHERE owner = ? AND id = ?",
                (new, now, owner, conversation_id),
            )
            if self.keep_versions is not None and new > self.keep_versions:
                cutoff = (owner, conversation_id, new - self.keep_versions)
                for table in ("versions", "bindings"):
                    db.execute(
                        f"DELETE FROM {table} WHERE owner = ? AND conversation_id = ? "
                        "AND version <= ?",
                        cutoff,
                    )
        return new

    def get_version(self, owner: str, conversation_id: str, version: int) -> StoredVersion | None:
        row = (
            self._db()
            .execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions "
                "WHERE owner = ? AND conversation_id = ? AND version = ?",
                (owner, conversation_id, version),
            )
            .fetchone()
        )
        return None if row is None else verified(conversation_id, *row)

    def latest(self, owner: str, conversation_id: str) -> StoredVersion | None:
        # One statement, so it cannot interleave with a concurrent append's prune.
        row = (
            self._db()
            .execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions "
                "WHERE owner = ? AND conversation_id = ? ORDER BY version DESC LIMIT 1",
                (owner, conversation_id),
            )
            .fetchone()
        )
        return None if row is None else verified(conversation_id, *row)

    def turns(self, owner: str, conversation_id: str) -> list[dict]:
        rows = self._db().execute(
            "SELECT turn FROM versions WHERE owner = ? AND conversation_id = ? ORDER BY version",
            (owner, conversation_id),
        )
        return [json.loads(t) for (t,) in rows]

    def get_turn(self, owner: str, conversation_id: str, version: int) -> dict | None:
        row = (
            self._db()
            .execute(
                "SELECT turn FROM versions WHERE owner = ? AND conversation_id = ? AND version = ?",
                (owner, conversation_id, version),
            )
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    # -- aliases ----------------------------------------------------------------------------

    def _bind_many(
        self, owner: str, keys: list[str], conversation_id: str, version: int, pending: bool
    ) -> None:
        db = self._db()
        if pending:
            # A pending binding is a hint that a commit is coming, worth no fsync: lost in an
            # OS crash it is the same as its writer dying first, which readers handle.
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._write() as db:
                row = db.execute(
                    "SELECT latest_version FROM conversations WHERE owner = ? AND id = ?",
                    (owner, conversation_id),
                ).fetchone()
                exists = db.execute(
                    "SELECT 1 FROM versions WHERE owner = ? AND conversation_id = ? "
                    "AND version = ?",
                    (owner, conversation_id, version),
                ).fetchone()
                if row is None or not (exists or (pending and version == row[0] + 1)):
                    raise not_found(conversation_id, version)
                now = time.time()
                db.executemany(
                    "INSERT OR REPLACE INTO bindings "
                    "(owner, key, conversation_id, version, bound_at) VALUES (?, ?, ?, ?, ?)",
                    [(owner, key, conversation_id, version, now) for key in keys],
                )
        finally:
            if pending:
                db.execute("PRAGMA synchronous=FULL")

    def binding(self, owner: str, key: str) -> Binding | None:
        row = (
            self._db()
            .execute(
                "SELECT b.conversation_id, b.version, b.bound_at, c.latest_version, "
                "EXISTS (SELECT 1 FROM versions v WHERE v.owner = b.owner AND "
                "v.conversation_id = b.conversation_id AND v.version = b.version) "
                "FROM bindings b JOIN conversations c ON c.owner = b.owner "
                "AND c.id = b.conversation_id WHERE b.owner = ? AND b.key = ?",
                (owner, key),
            )
            .fetchone()
        )
        if row is None:
            return None
        cid, version, bound_at, latest, exists = row
        if exists:
            return Binding(cid, version, bound_at, committed=True)
        return Binding(cid, version, bound_at, committed=False) if version > latest else None

    def unbind(self, owner: str, key: str) -> bool:
        with self._write() as db:
            gone = db.execute(
                "DELETE FROM bindings WHERE owner = ? AND key = ?", (owner, key)
            ).rowcount
        return gone > 0

    # -- retention --------------------------------------------------------------------------

    def purge(self, now: float | None = None) -> int:
        if self.ttl_seconds is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.ttl_seconds
        with self._write() as db:
            stale = db.execute(
                "SELECT owner, id FROM conversations WHERE updated_at < ?", (cutoff,)
            ).fetchall()
            for owner, cid in stale:
                self._delete(db, owner, cid)
        return len(stale)
