"""The conversation-state store: both backends against one set of behaviours.

Redis cases run against a real ``redis-server`` started on a free loopback port; they skip
when the binary is missing unless ``RXT_REQUIRE_REDIS=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from redis_support import redis_server
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.serve.store import (
    StateStore,
    StoreConflict,
    StoreCorrupt,
    StoreNotFound,
    open_store,
)
from rxt.serve.store.sqlite import SQLiteStore
from state_support import flip_stored_byte

ALICE, BOB = "owner-alice", "owner-bob"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Callable[..., StateStore]]:
    """Factory for a fresh, isolated store of the parametrized backend."""
    stores: list[StateStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        from rxt.serve.store.redis import RedisStore

        prefix = f"test-{uuid.uuid4().hex[:8]}:"

        def make(**kw) -> StateStore:
            stores.append(RedisStore(url, prefix=prefix, **kw))
            return stores[-1]
    else:

        def make(**kw) -> StateStore:
            stores.append(SQLiteStore(tmp_path / "state.db", **kw))
            return stores[-1]

    yield make
    for s in stores:
        s.close()


def _tamper(store: StateStore, owner: str, cid: str, version: int) -> None:
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:
            db.execute(
                "UPDATE versions SET state = ? WHERE owner = ? AND conversation_id = ? "
                "AND version = ?",
                (b"tampered", owner, cid, version),
            )
    else:
        store.redis.hset(store._key(owner, "state", cid), version, b"tampered")


def test_create_get_list_delete(make_store) -> None:
    with make_store() as store:
        cid = store.create_conversation(ALICE, metadata={"model": "tiny"})
        assert cid.startswith("conv_") and len(cid) > 10
        named = store.create_conversation(ALICE, "chat-1")
        assert named == "chat-1"
        with pytest.raises(StoreConflict, match="chat-1"):
            store.create_conversation(ALICE, "chat-1")
        info = store.get_conversation(ALICE, cid)
        assert info is not None
        assert (info.conversation_id, info.owner, info.latest_version) == (cid, ALICE, 0)
        assert info.metadata == {"model": "tiny"}
        assert store.get_conversation(ALICE, "nope") is None
        store.append_version(ALICE, cid, 0, b"s1", {"q": "hi"})
        listed = store.list_conversations(ALICE)
        assert [c.conversation_id for c in listed] == [cid, "chat-1"]  # most recent first
        assert len(store.list_conversations(ALICE, limit=1)) == 1
        store.bind(ALICE, "resp_1", cid, 1)
        assert store.delete_conversation(ALICE, cid) is True
        assert store.delete_conversation(ALICE, cid) is False
        assert store.get_conversation(ALICE, cid) is None
        assert store.latest(ALICE, cid) is None and store.turns(ALICE, cid) == []
        assert store.lookup(ALICE, "resp_1") is None
        assert [c.conversation_id for c in store.list_conversations(ALICE)] == ["chat-1"]


def test_ownership_isolation(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE, "shared-name")
    store.append_version(ALICE, cid, 0, b"alice-state", {"q": "a"})
    store.bind(ALICE, "k", cid, 1)
    assert store.get_conversation(BOB, cid) is None
    assert store.latest(BOB, cid) is None and store.get_version(BOB, cid, 1) is None
    assert store.turns(BOB, cid) == [] and store.list_conversations(BOB) == []
    assert store.lookup(BOB, "k") is None
    with pytest.raises(StoreNotFound, match="shared-name"):
        store.append_version(BOB, cid, 1, b"evil", {})
    with pytest.raises(StoreNotFound):
        store.bind(BOB, "k", cid, 1)
    assert store.delete_conversation(BOB, cid) is False
    # Bob's own conversation of the same name is independent of Alice's.
    assert store.create_conversation(BOB, "shared-name") == "shared-name"
    store.append_version(BOB, cid, 0, b"bob-state", {"q": "b"})
    assert store.latest(ALICE, cid).state == b"alice-state"
    assert store.latest(BOB, cid).state == b"bob-state"
    assert store.lookup(ALICE, "k") == (cid, 1)


def test_version_chain_and_compare_and_set(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE)
    assert store.latest(ALICE, cid) is None
    with pytest.raises(StoreNotFound):
        store.append_version(ALICE, "missing", 0, b"x", {})
    for n in range(1, 5):
        assert store.append_version(ALICE, cid, n - 1, f"state{n}".encode(), {"n": n}) == n
    with pytest.raises(StoreConflict, match=r"expected latest version 2, but it is 4") as e:
        store.append_version(ALICE, cid, 2, b"stale", {})
    assert cid in str(e.value)
    with pytest.raises(StoreConflict, match="expected latest version 5, but it is 4"):
        store.append_version(ALICE, cid, 5, b"ahead", {})
    latest = store.latest(ALICE, cid)
    assert (latest.version, latest.state, latest.turn) == (4, b"state4", {"n": 4})
    assert latest.sha256 == hashlib.sha256(b"state4").hexdigest()
    assert store.get_version(ALICE, cid, 2).state == b"state2"
    assert store.get_version(ALICE, cid, 9) is None
    assert store.turns(ALICE, cid) == [{"n": n} for n in range(1, 5)]
    assert store.get_conversation(ALICE, cid).latest_version == 4


def test_concurrent_appends_exactly_one_wins(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE)
    store.append_version(ALICE, cid, 0, b"base", {})
    barrier = threading.Barrier(8)
    results: list[object] = [None] * 8

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.append_version(ALICE, cid, 1, f"t{i}".encode(), {"i": i})
        except StoreConflict as e:
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, r in enumerate(results) if r == 2]
    assert len(winners) == 1, results
    assert sum(isinstance(r, StoreConflict) for r in results) == 7
    assert store.latest(ALICE, cid).state == f"t{winners[0]}".encode()
    assert store.turns(ALICE, cid) == [{}, {"i": winners[0]}]


def test_checksum_corruption_detected(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE, "c1")
    store.append_version(ALICE, cid, 0, b"good-1", {})
    store.append_version(ALICE, cid, 1, b"good-2", {})
    _tamper(store, ALICE, cid, 2)
    with pytest.raises(StoreCorrupt, match=r"'c1' version 2"):
        store.latest(ALICE, cid)
    with pytest.raises(StoreCorrupt, match=r"'c1' version 2"):
        store.get_version(ALICE, cid, 2)
    assert store.get_version(ALICE, cid, 1).state == b"good-1"


def test_store_verified_stm_blob_needs_no_second_check(make_store) -> None:
    """The server loads what the store returns without the blob's own tensor checksum: the
    store's sha256 of the whole blob already caught any byte changed since the write."""
    stm = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4) / 8 - 1.5
    fingerprint = "f" * 64
    blob = stm_to_bytes(stm, fingerprint=fingerprint, metadata={"turns": "1"})
    store = make_store()
    cid = store.create_conversation(ALICE, "c1")
    store.append_version(ALICE, cid, 0, blob, {})
    store.append_version(ALICE, cid, 1, blob, {})
    stored = store.get_version(ALICE, cid, 1)
    assert stored.state == blob
    loaded, meta = stm_from_bytes(
        stored.state, fingerprint=fingerprint, shape=(2, 3, 4), verify_checksum=False
    )
    assert torch.equal(loaded, stm) and meta == {"turns": "1"}
    flip_stored_byte(
        store, ALICE, cid, 2, len(blob) - 5
    )  # a tensor byte, as the inner checksum covers
    with pytest.raises(StoreCorrupt, match=r"'c1' version 2"):
        store.get_version(ALICE, cid, 2)
    with pytest.raises(StoreCorrupt, match=r"'c1' version 2"):
        store.latest(ALICE, cid)
    flip_stored_byte(store, ALICE, cid, 1, 20)  # a header byte, outside the tensor
    with pytest.raises(StoreCorrupt, match=r"'c1' version 1"):
        store.get_version(ALICE, cid, 1)


def test_bind_and_lookup(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE)
    store.append_version(ALICE, cid, 0, b"s1", {})
    store.append_version(ALICE, cid, 1, b"s2", {})
    assert store.lookup(ALICE, "prefix:abc") is None
    store.bind(ALICE, "prefix:abc", cid, 1)
    store.bind(ALICE, "resp_9", cid, 2)
    assert store.lookup(ALICE, "prefix:abc") == (cid, 1)
    assert store.lookup(ALICE, "resp_9") == (cid, 2)
    store.bind(ALICE, "prefix:abc", cid, 2)  # rebinding moves the alias
    assert store.lookup(ALICE, "prefix:abc") == (cid, 2)
    with pytest.raises(StoreNotFound, match="version 3"):
        store.bind(ALICE, "x", cid, 3)


def test_pending_bindings_unbind_and_get_turn(make_store) -> None:
    """A pending binding names the version a writer is about to append: visible to
    ``binding`` (not to ``lookup``) until that version exists; only ``latest + 1`` may be
    bound pending; ``unbind`` removes an alias; ``get_turn`` reads a turn without its state."""
    store = make_store()
    cid = store.create_conversation(ALICE)
    store.append_version(ALICE, cid, 0, b"s1", {"turn": 1})
    before = time.time()
    store.bind(ALICE, "resp_next", cid, 2, pending=True)
    found = store.binding(ALICE, "resp_next")
    assert (found.conversation_id, found.version, found.committed) == (cid, 2, False)
    assert before - 1 <= found.bound_at <= time.time() + 1
    assert store.lookup(ALICE, "resp_next") is None
    assert store.binding(BOB, "resp_next") is None  # owners stay apart
    with pytest.raises(StoreNotFound):
        store.bind(ALICE, "too_far", cid, 3, pending=True)
    with pytest.raises(StoreNotFound):
        store.bind(ALICE, "not_pending", cid, 2)
    with pytest.raises(StoreNotFound):
        store.bind(ALICE, "nowhere", "no-such-conversation", 1, pending=True)
    store.append_version(ALICE, cid, 1, b"s2", {"turn": 2, "keys": ["resp_next"]})
    assert store.binding(ALICE, "resp_next").committed
    assert store.lookup(ALICE, "resp_next") == (cid, 2)
    assert store.get_turn(ALICE, cid, 2) == {"turn": 2, "keys": ["resp_next"]}
    assert store.get_turn(ALICE, cid, 3) is None and store.get_turn(BOB, cid, 2) is None
    assert store.unbind(ALICE, "resp_next") and not store.unbind(ALICE, "resp_next")
    assert store.binding(ALICE, "resp_next") is None
    store.bind_many(ALICE, ["a", "b"], cid, 3, pending=True)
    assert [store.binding(ALICE, k).version for k in ("a", "b")] == [3, 3]
    with pytest.raises(StoreNotFound):
        store.bind_many(ALICE, ["c", "d"], cid, 3)  # not stored, not pending
    assert store.binding(ALICE, "c") is None
    store.bind(ALICE, "doomed", cid, 3, pending=True)
    store.delete_conversation(ALICE, cid)
    assert store.binding(ALICE, "doomed") is None


def test_keep_versions_prunes_old(make_store) -> None:
    store = make_store(keep_versions=2)
    cid = store.create_conversation(ALICE)
    for n in range(1, 6):
        store.append_version(ALICE, cid, n - 1, f"s{n}".encode(), {"n": n})
        if n == 2:
            store.bind(ALICE, "old", cid, 2)
    assert [store.get_version(ALICE, cid, n) is not None for n in range(1, 6)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    assert store.turns(ALICE, cid) == [{"n": 4}, {"n": 5}]
    assert store.latest(ALICE, cid).version == 5
    assert store.lookup(ALICE, "old") is None  # its version was pruned


def test_ttl_retention(make_store) -> None:
    store = make_store(ttl_seconds=100)
    cid = store.create_conversation(ALICE)
    store.append_version(ALICE, cid, 0, b"s1", {})
    store.bind(ALICE, "resp", cid, 1)
    if isinstance(store, SQLiteStore):
        other = store.create_conversation(BOB)
        assert store.purge(now=time.time() + 50) == 0
        assert store.purge(now=time.time() + 150) == 2
        assert store.get_conversation(ALICE, cid) is None
        assert store.get_conversation(BOB, other) is None
        assert store.lookup(ALICE, "resp") is None
    else:
        keys = [store._key(ALICE, kind, cid) for kind in ("conv", "state", "meta", "binds")]
        keys += [store._key(ALICE, "alias", "resp"), store._key(ALICE, "convs")]
        for key in keys:
            assert 0 < store.redis.ttl(key) <= 100, key
        assert store.purge() == 0  # Redis expires the keys itself


def test_no_ttl_keeps_forever(make_store) -> None:
    store = make_store()
    cid = store.create_conversation(ALICE)
    assert store.purge(now=time.time() + 10**9) == 0
    assert store.get_conversation(ALICE, cid) is not None
    if not isinstance(store, SQLiteStore):
        assert store.redis.ttl(store._key(ALICE, "conv", cid)) == -1


def test_open_store_urls(tmp_path) -> None:
    for bad in ("", "http://example.com/x", "postgres://db/x", "sqlite://rel.db", "sqlite:///"):
        with pytest.raises(ValueError, match="URL") as e:
            open_store(bad)
        if bad:
            assert bad in str(e.value)
    with pytest.raises(ValueError, match="memory"):
        open_store(":memory:")
    with open_store(f"sqlite://{tmp_path}/a.db", keep_versions=3) as s:
        assert isinstance(s, SQLiteStore) and s.keep_versions == 3
        assert s.path == f"{tmp_path}/a.db"
    with open_store(str(tmp_path / "b.db")) as s:
        assert isinstance(s, SQLiteStore)
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


def test_open_store_redis(redis_url) -> None:
    from rxt.serve.store.redis import RedisStore

    with open_store(redis_url, ttl_seconds=5) as s:
        assert isinstance(s, RedisStore) and s.ttl_seconds == 5


def test_redis_list_skips_expired(redis_url) -> None:
    from rxt.serve.store.redis import RedisStore

    with RedisStore(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:") as store:
        ids = [store.create_conversation(ALICE, f"c{i}") for i in range(5)]
        for cid in ("c1", "c3"):  # as if their TTL ran out
            store.redis.delete(store._key(ALICE, "conv", cid))
        listed = [c.conversation_id for c in store.list_conversations(ALICE, limit=2)]
        assert listed == ["c4", "c2"]
        assert [c.conversation_id for c in store.list_conversations(ALICE)] == ["c4", "c2", "c0"]
        assert store.redis.zcard(store._key(ALICE, "convs")) == 3
        assert len(ids) == 5


_CRASH_WRITER = """
import os, sys
from rxt.serve.store.sqlite import SQLiteStore
store = SQLiteStore(sys.argv[1])
version = 0
while True:
    version = store.append_version("o", "c", version, os.urandom(256 * 1024), {"n": version + 1})
    print(version, flush=True)
"""


def test_sqlite_survives_sigkill_mid_write(tmp_path) -> None:
    path = tmp_path / "crash.db"
    with SQLiteStore(path) as store:
        store.create_conversation("o", "c")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        seen = 0
        while seen < 12:
            line = proc.stdout.readline()
            assert line, f"writer exited early with {proc.wait()}"
            seen = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with SQLiteStore(path) as store:
        assert store._db().execute("PRAGMA integrity_check").fetchone() == ("ok",)
        n = store.latest("o", "c").version
        assert n >= seen
        assert store.get_conversation("o", "c").latest_version == n
        for v in range(1, n + 1):
            stored = store.get_version("o", "c", v)  # raises StoreCorrupt on a bad checksum
            assert stored is not None and stored.turn == {"n": v}
        assert store.turns("o", "c") == [{"n": v} for v in range(1, n + 1)]
        assert store.append_version("o", "c", n, b"after", {}) == n + 1
