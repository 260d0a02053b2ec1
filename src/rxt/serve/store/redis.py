"""Redis backend of the conversation-state store, shared by several server processes.

Guarantees and why:

* **Every write is one Lua script**, which Redis runs atomically: the compare-and-set of
  :meth:`RedisStore.append_version` reads the latest version and stores the next one with no
  other command in between, whichever process or connection sends it, so of N concurrent
  appends with the same expected version exactly one wins. Reads of a version (``latest``
  included) are one script too, so a concurrent prune cannot split them.
* **Key layout** (``P`` = prefix, ``O`` = sha256 hex of the owner, which keeps arbitrary owner
  strings out of key syntax and separates owners completely)::

      P O :conv:<id>    hash   owner, created_at, updated_at, latest, oldest, metadata
      P O :state:<id>   hash   version -> state bytes
      P O :meta:<id>    hash   version -> JSON {sha256, created_at, turn}
      P O :binds:<id>   set    alias keys bound to this conversation (deleted with it)
      P O :alias:<key>  string "<version>:<bound_at>:<id>"
      P O :convs        zset   id scored by last activity (for listing)

* **Retention by EXPIRE.** With ``ttl_seconds`` every create and append (re)sets the TTL of
  all of the conversation's keys, and a bind sets its alias key's TTL, so Redis drops idle
  conversations by itself and :meth:`RedisStore.purge` returns 0. An alias therefore lives
  ``ttl_seconds`` from its bind, even if its conversation stays active. ``lookup`` returns
  None once an alias's target version is gone (pruned, expired or deleted).
* Durability is whatever the Redis server is configured for (AOF/RDB); the scripts touch keys
  derived inside them, so this backend needs one Redis (or primary), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from rxt.serve.store import (
    Binding,
    ConversationInfo,
    StateStore,
    StoreConflict,
    StoreCorrupt,
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

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[3], 'updated_at', ARGV[3],
           'latest', 0, 'oldest', 1, 'metadata', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: conv, state, meta, binds, convs. ARGV: expected, state, meta, now, keep, ttl, id.
_APPEND = """
local latest = redis.call('HGET', KEYS[1], 'latest')
if not latest then return {0, 0} end
latest = tonumber(latest)
if latest ~= tonumber(ARGV[1]) then return {1, latest} end
local new = latest + 1
redis.call('HSET', KEYS[2], new, ARGV[2])
redis.call('HSET', KEYS[3], new, ARGV[3])
redis.call('HSET', KEYS[1], 'latest', new, 'updated_at', ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[7])
local keep = tonumber(ARGV[5])
if keep > 0 and new > keep then
  local oldest = tonumber(redis.call('HGET', KEYS[1], 'oldest') or '1')
  for v = oldest, new - keep do
    redis.call('HDEL', KEYS[2], v)
    redis.call('HDEL', KEYS[3], v)
  end
  redis.call('HSET', KEYS[1], 'oldest', new - keep + 1)
end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
end
return {2, new}
"""

# KEYS: conv, state, meta. ARGV: version (0 = latest).
_READ = """
local v = tonumber(ARGV[1])
if v == 0 then
  local latest = redis.call('HGET', KEYS[1], 'latest')
  if not latest or tonumber(latest) == 0 then return false end
  v = tonumber(latest)
end
local s = redis.call('HGET', KEYS[2], v)
local m = redis.call('HGET', KEYS[3], v)
if not s and not m then return false end
return {v, s or '', m or ''}
"""

# KEYS: conv, state, meta, binds, convs. ARGV: id.
_DELETE = """
local existed = redis.call('EXISTS', KEYS[1])
for _, alias in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local val = redis.call('GET', alias)
  if val then
    local a = string.find(val, ':', 1, true)
    local b = a and string.find(val, ':', a + 1, true)
    if b and string.sub(val, b + 1) == ARGV[1] then redis.call('DEL', alias) end
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
return existed
"""

# KEYS: meta, binds, alias, conv. ARGV: version, id, ttl, pending (0/1), now.
_BIND = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local latest = redis.call('HGET', KEYS[4], 'latest')
  if ARGV[4] == '0' or not latest or tonumber(latest) + 1 ~= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[3], ARGV[1] .. ':' .. ARGV[5] .. ':' .. ARGV[2])
redis.call('SADD', KEYS[2], KEYS[3])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[3], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS: alias. Reads the binding and, in the same step, its target's state.
_BINDING = """
local val = redis.call('GET', KEYS[1])
if not val then return false end
local a = string.find(val, ':', 1, true)
local b = string.find(val, ':', a + 1, true)
local version = string.sub(val, 1, a - 1)
local cid = string.sub(val, b + 1)
local prefix = ARGV[1]
local latest = redis.call('HGET', prefix .. ':conv:' .. cid, 'latest')
if not latest then return false end
local stored = redis.call('HEXISTS', prefix .. ':meta:' .. cid, version)
return {version, string.sub(val, a + 1, b - 1), cid, latest, stored}
"""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore(StateStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rxt:",
        ttl_seconds: float | None = None,
        keep_versions: int | None = None,
    ) -> None:
        import redis  # optional dependency: the `serve` extra

        self._init_retention(ttl_seconds, keep_versions)
        self.url = url
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, decode_responses=False)
        self.redis.ping()  # fail at startup, not on the first request
        self._ttl = 0 if ttl_seconds is None else max(1, math.ceil(ttl_seconds))
        self._keep = keep_versions or 0
        scripts = {"create": _CREATE, "append": _APPEND, "read": _READ}
        scripts |= {"delete": _DELETE, "bind": _BIND, "binding": _BINDING}
        self._scripts = {name: self.redis.register_script(src) for name, src in scripts.items()}

    def _owner_prefix(self, owner: str) -> str:
        return self.prefix + hashlib.sha256(owner.encode()).hexdigest()

    def _key(self, owner: str, kind: str, name: str = "") -> str:
        return f"{self._owner_prefix(owner)}:{kind}" + (f":{name}" if name else "")

    def _conv_keys(self, owner: str, cid: str) -> list[str]:
        kinds = ("conv", "state", "meta", "binds")
        return [self._key(owner, k, cid) for k in kinds] + [self._key(owner, "convs")]

    def close(self) -> None:
        self.redis.close()

    # -- conversations ----------------------------------------------------------------------

    def create_conversation(
        self, owner: str, conversation_id: str | None = None, metadata: dict | None = None
    ) -> str:
        check_id("owner", owner)
        cid = check_id("conversation_id", conversation_id or new_conversation_id())
        meta = dump_json("metadata", metadata)
        keys = [self._key(owner, "conv", cid), self._key(owner, "convs")]
        if not self._scripts["create"](keys, [owner, cid, repr(time.time()), meta, self._ttl]):
            raise StoreConflict(f"conversation {cid!r} already exists")
        return cid

    def _info(self, owner: str, cid: str, h: dict[bytes, bytes]) -> ConversationInfo | None:
        if not h or _s(h[b"owner"]) != owner:
            return None
        return ConversationInfo(
            cid,
            owner,
            float(h[b"created_at"]),
            float(h[b"updated_at"]),
            int(h[b"latest"]),
            json.loads(h[b"metadata"]),
        )

    def get_conversation(self, owner: str, conversation_id: str) -> ConversationInfo | None:
        h = self.redis.hgetall(self._key(owner, "conv", conversation_id))
        return self._info(owner, conversation_id, h)

    def list_conversations(self, owner: str, limit: int = 100) -> list[ConversationInfo]:
        check_version("limit", limit, 0)
        index = self._key(owner, "convs")
        out: list[ConversationInfo] = []
        start = 0
        while len(out) < limit:
            ids = [_s(c) for c in self.redis.zrevrange(index, start, start + limit - 1)]
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for cid in ids:
                pipe.hgetall(self._key(owner, "conv", cid))
            for cid, h in zip(ids, pipe.execute(), strict=True):
                info = self._info(owner, cid, h)
                if info is None:  # expired by TTL: drop it from the index too
                    self.redis.zrem(index, cid)
                    start -= 1
                elif len(out) < limit:
                    out.append(info)
        return out

    def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        keys = self._conv_keys(owner, conversation_id)
        return bool(self._scripts["delete"](keys, [conversation_id]))

    # -- versions ---------------------------------------------------------------------------

    def append_version(
        self, owner: str, conversation_id: str, expected_version: int, state: bytes, turn: dict
    ) -> int:
        check_version("expected_version", expected_version, 0)
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes, got {type(state).__name__}")
        state = bytes(state)
        now = time.time()
        meta = {
            "sha256": sha256_hex(state),
            "created_at": now,
            "turn": json.loads(dump_json("turn", turn)),
        }
        args = [expected_version, state, json.dumps(meta), repr(now), self._keep, self._ttl]
        keys = self._conv_keys(owner, conversation_id)
        status, value = self._scripts["append"](keys, [*args, conversation_id])
        if status == 0:
            raise not_found(conversation_id)
        if status == 1:
            raise conflict(conversation_id, expected_version, int(value))
        return int(value)

    def _read(self, owner: str, cid: str, version: int) -> StoredVersion | None:
        keys = self._conv_keys(owner, cid)[:3]
        got = self._scripts["read"](keys, [version])
        if not got:
            return None
        v, state, meta = int(got[0]), got[1], got[2]
        try:
            m = json.loads(meta)
            digest, created, turn = m["sha256"], float(m["created_at"]), m["turn"]
        except (ValueError, KeyError, TypeError):
            raise StoreCorrupt(
                f"conversation {cid!r} version {v}: unreadable version record"
            ) from None
        return verified(cid, v, state, digest, created, json.dumps(turn))

    def get_version(self, owner: str, conversation_id: str, version: int) -> StoredVersion | None:
        if not isinstance(version, int) or version < 1:
            return None
        return self._read(owner, conversation_id, version)

    def latest(self, owner: str, conversation_id: str) -> StoredVersion | None:
        return self._read(owner, conversation_id, 0)

    def turns(self, owner: str, conversation_id: str) -> list[dict]:
        metas = self.redis.hgetall(self._key(owner, "meta", conversation_id))
        return [json.loads(metas[v])["turn"] for v in sorted(metas, key=int)]

    def get_turn(self, owner: str, conversation_id: str, version: int) -> dict | None:
        meta = self.redis.hget(self._key(owner, "meta", conversation_id), version)
        return None if meta is None else json.loads(meta)["turn"]

    # -- aliases ----------------------------------------------------------------------------

    def _bind_many(
        self, owner: str, keys: list[str], conversation_id: str, version: int, pending: bool
    ) -> None:
        args = [version, conversation_id, self._ttl, int(pending), repr(time.time())]
        pipe = self.redis.pipeline(transaction=False)  # one round trip for every key
        for key in keys:
            script_keys = [
                self._key(owner, "meta", conversation_id),
                self._key(owner, "binds", conversation_id),
                self._key(owner, "alias", key),
                self._key(owner, "conv", conversation_id),
            ]
            self._scripts["bind"](script_keys, args, client=pipe)
        if not all(pipe.execute()):
            raise not_found(conversation_id, version)

    def binding(self, owner: str, key: str) -> Binding | None:
        # The script derives the target's keys itself (the alias names the conversation), so
        # it reads them in the same atomic step as the alias.
        alias = self._key(owner, "alias", key)
        got = self._scripts["binding"]([alias], [self._owner_prefix(owner)])
        if not got:
            return None
        version, bound_at, cid, latest, stored = (_s(v) if isinstance(v, bytes) else v for v in got)
        version = int(version)  # Lua returns numbers as ints and strings as bytes
        if int(stored):
            return Binding(cid, version, float(bound_at), committed=True)
        if version > int(latest):
            return Binding(cid, version, float(bound_at), committed=False)
        return None  # pruned, expired or deleted since it was bound

    def unbind(self, owner: str, key: str) -> bool:
        return bool(self.redis.delete(self._key(owner, "alias", key)))

    # -- retention --------------------------------------------------------------------------

    def purge(self, now: float | None = None) -> int:
        """Always 0: with ``ttl_seconds`` Redis expires idle conversations' keys itself."""
        return 0
