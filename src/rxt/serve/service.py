"""Turns on stored conversations: where a turn starts, how it runs, and how its state is kept.

The HTTP routes describe a turn (:class:`~rxt.serve.turn.TurnSpec`); :meth:`TurnService.start`
finds the state it continues from, replays any earlier turns the server has not seen, and sends
the query to the batched :class:`~rxt.engine.Engine`. The route streams the answer; the turn
(:meth:`rxt.serve.turn.ActiveTurn.seal`) then binds its alias keys (response id, transcript
hash) as *pending* on the version about to be written, before the client hears ``[DONE]``;
after the response, the turn's own task (:meth:`TurnService.finish`) waits for the engine's
asynchronous memory update and appends the new STM as the next version with a compare-and-set.

Ordering guarantees:

* Within a process every turn of a conversation holds that conversation's lock from its start
  until its state is stored, so a following request waits for the update and never reads a
  stale memory, and concurrent requests on one conversation run one after the other.
* Across processes sharing a store (Redis), a request that finds a pending binding waits (up to
  ``commit_wait_s``) until the version is written. Two processes that start a turn on one
  conversation at the same time cannot both append: the second to commit is *forked* into a new
  conversation (its response id stays valid), never silently lost or reordered.
* A pending binding whose writer died (crash between answer and commit) is ignored once older
  than ``commit_wait_s``: the conversation stays at its last committed version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rxt.engine import Engine, EngineError, SamplingParams, StateError
from rxt.engine.conversation import Conversation
from rxt.serve.errors import APIError, bad_request, not_found
from rxt.serve.locks import LockTable
from rxt.serve.metrics import Metrics
from rxt.serve.settings import ServerSettings
from rxt.serve.store import StateStore, StoreConflict
from rxt.serve.turn import (
    NEXT_KEY,
    ActiveTurn,
    FromConversation,
    FromKey,
    NewConversation,
    TurnSpec,
)

log = logging.getLogger("rxt.serve")

_POLL_S = 0.01
_WAIT = object()  # "another process is committing what this needs: ask again shortly"


# ---------------------------------------------------------------------------- the service
class TurnService:
    def __init__(
        self, engine: Engine, store: StateStore, settings: ServerSettings, metrics: Metrics
    ) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.locks = LockTable()
        self.background: set[asyncio.Task] = set()
        self.pending: dict[tuple[str, str], ActiveTurn] = {}  # keys bound pending, by us
        # Store calls block (SQLite fsyncs, Redis round trips): they run here, off the loop.
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rxt-serve")

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def drain(self) -> None:
        """Wait for every turn's background commit (at shutdown)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ start
    async def start(self, spec: TurnSpec) -> ActiveTurn:
        started_at = time.perf_counter()
        owner = spec.owner
        sampling = self._sampling(spec)  # bad limits fail before any state is touched
        waited = 0.0  # for this conversation's previous turn to be stored (shown per turn)
        if isinstance(spec.start, FromKey):
            waited = await self._local_commit(owner, spec.start.key)
        cid, version = await self._until_ready(self._target, spec)
        waited += await self.locks.acquire((owner, cid))
        try:
            # Under the lock no turn of this process is in flight on ``cid``; another
            # process's may be: _prepare waits for its commit before reading the latest.
            prepared = await self._until_ready(self._prepare, spec, cid, version)
        except BaseException:
            self.locks.release((owner, cid))
            raise
        if prepared[0] != cid:  # forked: the turn belongs to the new conversation
            await self.locks.acquire((owner, prepared[0]))
            self.locks.release((owner, cid))
        cid, base, conv, system = prepared
        try:
            stream = conv.send(spec.query, sampling)
        except ValueError as exc:
            self.locks.release((owner, cid))
            raise bad_request(str(exc), code="context_length_exceeded") from exc
        except BaseException:
            self.locks.release((owner, cid))
            raise
        return ActiveTurn(self, spec, cid, base, conv, stream, started_at, system, waited)

    def longest_prefix(self, owner: str, keys: list[str]) -> int:
        """The largest ``k >= 1`` whose key is bound (stored, or pending and recent); 0 if
        none. ``keys`` as from :func:`~rxt.serve.transcript.prefix_keys`."""
        for k in range(len(keys) - 1, 0, -1):
            found = self.store.binding(owner, keys[k])
            if found is None:
                continue
            if time.time() - found.bound_at <= self.settings.commit_wait_s:
                return k  # stored, or being stored (resolve_key waits for it)
            if found.committed:
                turn = self.store.get_turn(owner, found.conversation_id, found.version)
                # A key left pending by a turn that was never stored (its server died) points
                # at the version another turn stored later: not this transcript's state.
                if turn is not None and keys[k] in turn.get("keys", ()):
                    return k
        return 0

    def _sampling(self, spec: TurnSpec) -> SamplingParams:
        """The turn's sampling with ``max_new_tokens`` resolved against the model's limit."""
        limit = self.engine.model.config.max_seq_len
        prompt = len(self.engine.tokenizer.encode_query(spec.query))
        room = limit - prompt
        if room < 1:
            raise bad_request(
                f"the message is {prompt} tokens with its markers; this model reads at most "
                f"{limit} tokens per turn (query and answer together)",
                param="messages" if spec.api == "chat" else "input",
                code="context_length_exceeded",
            )
        cap = self.settings.limits.max_output_tokens
        if spec.max_tokens is None:
            wanted = min(room, self.settings.default_max_tokens)
        else:
            wanted = spec.max_tokens
            if wanted > room or (cap is not None and wanted > cap):
                most = room if cap is None else min(room, cap)
                raise bad_request(
                    f"max tokens {wanted} is too large: with this {prompt}-token message the "
                    f"model has room for {most} (max_seq_len {limit} per turn)",
                    param="max_tokens" if spec.api == "chat" else "max_output_tokens",
                    code="context_length_exceeded",
                )
        if cap is not None:
            wanted = min(wanted, cap)
        return spec.sampling.replace(max_new_tokens=wanted)

    def _target(self, spec: TurnSpec, patient: bool) -> tuple[str, int | None] | object:
        """The conversation whose lock the turn takes (creating a new one), and for a key the
        version it names (None: the latest)."""
        start, owner = spec.start, spec.owner
        if isinstance(start, NewConversation):
            return self.create(owner, start.system, start.metadata), None
        if isinstance(start, FromConversation):
            if self.store.get_conversation(owner, start.conversation_id) is None:
                if not start.create:
                    raise not_found("conversation", start.conversation_id, "conversation")
                with contextlib.suppress(StoreConflict):  # a concurrent request created it
                    self.create(owner, start.system, {}, start.conversation_id)
            return start.conversation_id, None
        # A version _resolve returns holds this key's turn for good (versions never change),
        # so the locked part need not read the binding again.
        return self._resolve(owner, start, patient)

    def create(
        self,
        owner: str,
        system: str | None,
        metadata: dict,
        conversation_id: str | None = None,
        forked_from: dict | None = None,
        seed: int | None = None,
    ) -> str:
        meta = {
            "system": system,
            "stm_seed": secrets.randbits(62) if seed is None else seed,
            "metadata": metadata,
            "forked_from": forked_from,
            "created_at": int(time.time()),
        }
        return self.store.create_conversation(owner, conversation_id, meta)

    async def resolve_key(self, owner: str, start: FromKey) -> tuple[str, int]:
        """(conversation, version) of a key, waiting while its turn is being committed — by
        this process (its commit task is awaited) or by another (the store is polled)."""
        await self._local_commit(owner, start.key)
        return await self._until_ready(self._resolve, owner, start)

    async def _local_commit(self, owner: str, key: str) -> float:
        """Wait for this process's commit of ``key``'s turn, if pending; seconds waited."""
        local = self.pending.get((owner, key))
        if local is None:
            return 0.0
        began = time.perf_counter()
        await asyncio.wait([local.task])
        return time.perf_counter() - began

    async def _until_ready(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args, patient)`` in the pool until it stops answering ``_WAIT`` (another
        process is committing what it needs); after ``commit_wait_s`` it is called with
        ``patient=False`` and must decide."""
        deadline = time.monotonic() + self.settings.commit_wait_s  # immune to clock steps
        while True:
            result = await self.run(fn, *args, time.monotonic() < deadline)
            if result is not _WAIT:
                return result
            await asyncio.sleep(_POLL_S)

    def _resolve(self, owner: str, start: FromKey, patient: bool) -> tuple[str, int] | object:
        found = self.store.binding(owner, start.key)
        if found is None:
            raise not_found(start.what, start.ident, start.param)
        young = time.time() - found.bound_at <= self.settings.commit_wait_s
        if found.committed:
            turn = self.store.get_turn(owner, found.conversation_id, found.version)
            if turn is not None and start.key in turn.get("keys", ()):
                return found.conversation_id, found.version
            if turn is None or not young:
                raise not_found(start.what, start.ident, start.param)
            # Another turn took that version: this key's writer lost the compare-and-set and
            # is moving it to a fork. Wait for the move.
        elif not young:
            raise APIError(
                409,
                f"The state of {start.what} {start.ident!r} was never stored (the server "
                "answering it stopped before its memory update was saved).",
                param=start.param,
                code="state_not_committed",
            )
        if not patient:
            raise APIError(503, f"{start.what} {start.ident!r} is still being stored")
        return _WAIT

    def _next_pending(self, owner: str, cid: str) -> bool:
        """True while another process has a turn of ``cid`` pending: ``next:`` bound past the
        latest version (the store decides that in the same read), recently — an older one's
        writer died before committing."""
        found = self.store.binding(owner, NEXT_KEY + cid)
        return (
            found is not None
            and not found.committed
            and time.time() - found.bound_at <= self.settings.commit_wait_s
        )

    def _prepare(self, spec: TurnSpec, cid: str, version: int | None, patient: bool) -> Any:
        """(Runs under the conversation's lock, in a worker thread.) Load the state the turn
        continues from — forking if it is not the latest — and replay earlier turns."""
        owner, start = spec.owner, spec.start
        # The pending check comes first: a commit landing between the two reads then shows
        # in ``info``, never a stale latest version beside a committed binding.
        if patient and self._next_pending(owner, cid):
            return _WAIT
        info = self.store.get_conversation(owner, cid)
        if info is None:
            raise not_found("conversation", cid, "conversation")
        meta = info.metadata
        base = info.latest_version if version is None else version
        system = meta.get("system")
        if spec.system is not None and spec.system != (system or ""):
            raise bad_request(
                "instructions differ from the ones this conversation started with; RxT encodes "
                "instructions into memory at the start, so they cannot change mid-conversation",
                param="instructions",
            )
        conv = self.load(owner, cid, base, meta)
        if spec.commit and base < info.latest_version:
            parent = {"conversation_id": cid, "version": base}
            cid = self.create(owner, system, {}, forked_from=parent, seed=meta.get("stm_seed"))
            self.metrics.forks.inc()
            base = 0
        replay = spec.replay
        if isinstance(start, FromConversation) and base > 0:
            replay = []  # the server's memory is this conversation's history
        if spec.commit:
            base = self.replay(owner, cid, base, conv, replay, spec.replay_keys, spec.api)
        else:
            for user, assistant in replay:
                self._absorb(conv, user, assistant)
        return cid, base, conv, system

    def replay(
        self,
        owner: str,
        cid: str,
        base: int,
        conv: Conversation,
        turns: list[tuple[str, str]],
        keys: list[list[str]] | None = None,
        api: str = "conversations",
    ) -> int:
        """Encode turns that happened elsewhere into ``conv`` and store each as the next
        version of ``cid`` (bound to its ``keys``); returns the last version."""
        keys = keys or []
        for i, (user, assistant) in enumerate(turns):
            number = conv.turns + 1
            self._absorb(conv, user, assistant)
            bound = keys[i] if i < len(keys) else []
            turn = {"turn": number, "user": user, "assistant": assistant}
            turn |= {"api": api, "replayed": True, "keys": bound, "created_at": int(time.time())}
            base = self._append(owner, cid, base, conv.export_state(), turn)
            self.store.bind_many(owner, bound, cid, base)
        return base

    def _absorb(self, conv: Conversation, user: str, assistant: str) -> None:
        try:
            conv.absorb(user, assistant)
        except ValueError as exc:
            raise bad_request(f"an earlier turn cannot be encoded: {exc}") from exc
        self.metrics.replayed.inc()

    async def seed(self, owner: str, system: str | None, metadata: dict, turns) -> str:
        """A new conversation holding ``turns`` (``POST /v1/conversations`` with items)."""
        cid = await self.run(self.create, owner, system, metadata)
        if not turns:
            return cid
        await self.locks.acquire((owner, cid))
        try:

            def work() -> None:
                info = self.store.get_conversation(owner, cid)
                conv = self.load(owner, cid, 0, info.metadata)
                self.replay(owner, cid, 0, conv, turns)

            await self.run(work)
        except BaseException:
            await self.run(self.store.delete_conversation, owner, cid)
            raise
        finally:
            self.locks.release((owner, cid))
        return cid

    def load(self, owner: str, cid: str, version: int, meta: dict) -> Conversation:
        """An engine conversation holding the state after ``version`` (0: the start)."""
        engine = self.engine
        if version == 0:
            parent = meta.get("forked_from")
            if parent:  # a fork's version 0 is its parent's state at the fork
                pinfo = self.store.get_conversation(owner, parent["conversation_id"])
                if pinfo is None:
                    raise APIError(409, f"conversation {cid!r} forked from one since deleted")
                return self.load(owner, parent["conversation_id"], parent["version"], {})
            gen = torch.Generator().manual_seed(int(meta.get("stm_seed", 0)))
            conv = engine.conversation(stm=engine.model.initial_stm(1, generator=gen))
            if meta.get("system"):
                try:
                    conv.absorb_system(meta["system"])
                except ValueError as exc:
                    raise bad_request(str(exc), param="instructions") from exc
            return conv
        stored = self.store.get_version(owner, cid, version)
        if stored is None:
            raise APIError(
                404, f"conversation {cid!r} version {version} is no longer stored (retention)"
            )
        try:
            # The store has just checked the sha256 of the whole blob, taken when it was
            # appended; every blob appended here came from export_state, whose checksum was
            # right then. Hashing the tensor bytes again for that checksum would find nothing.
            return engine.conversation(state=stored.state, verify_checksum=False)
        except StateError as exc:
            raise APIError(409, f"conversation {cid!r}: {exc}", code="state_mismatch") from exc

    def _append(self, owner: str, cid: str, expected: int, state: bytes, turn: dict) -> int:
        started = time.perf_counter()
        version = self.store.append_version(owner, cid, expected, state, turn)
        self.metrics.commit_latency.observe(time.perf_counter() - started)
        return version

    # ------------------------------------------------------------------ seal and finish
    def bind_pending(self, turn: ActiveTurn) -> None:
        self.store.bind_many(
            turn.spec.owner, turn.bound_keys, turn.conversation_id, turn.version, pending=True
        )

    async def finish(self, turn: ActiveTurn) -> None:
        owner, cid = turn.spec.owner, turn.conversation_id
        try:
            if not turn.spec.commit:
                if isinstance(turn.spec.start, NewConversation):  # made for this turn alone
                    await self.run(self.store.delete_conversation, owner, cid)
                return
            while not turn.stream.update_finished:
                turn.ready.clear()
                if not turn.stream.update_finished:
                    await turn.ready.wait()
            timing = turn.stream.wait_update(0)  # EngineError if the update failed
            if timing is None:
                raise EngineError("the turn ended before it started: nothing to store")
            self.metrics.update_latency.observe(timing.latency_s)
            await self.run(self._commit, turn, turn.stored_turn(turn.result(), timing))
        except Exception:
            self.metrics.commit_failures.inc()
            log.exception("turn %d of conversation %s not stored", turn.turn, cid)
            await self.run(self._unbind, owner, turn.bound_keys)
        finally:
            for key in turn.bound_keys:
                if self.pending.get((owner, key)) is turn:
                    del self.pending[owner, key]
            self.locks.release((owner, cid))

    def _commit(self, turn: ActiveTurn, record: dict) -> None:
        owner, cid = turn.spec.owner, turn.conversation_id
        state = turn.conv.export_state()
        try:
            self._append(owner, cid, turn.base_version, state, record)
            return
        except StoreConflict:
            pass  # another process committed a turn of this conversation first
        parent = {"conversation_id": cid, "version": turn.base_version}
        info = self.store.get_conversation(owner, cid)
        seed = info.metadata.get("stm_seed") if info else None
        new = self.create(owner, turn.system, {}, forked_from=parent, seed=seed)
        self.metrics.forks.inc()
        self._append(owner, new, 0, state, record)
        moved = [key for key in turn.bound_keys if not key.startswith(NEXT_KEY)]
        self.store.bind_many(owner, moved, new, 1)
        log.warning("conversation %s: concurrent turn; this one was forked into %s", cid, new)

    def _unbind(self, owner: str, keys: list[str]) -> None:
        for key in keys:
            self.store.unbind(owner, key)

    # ------------------------------------------------------------------ reading
    def history(self, owner: str, cid: str, depth: int = 0) -> list[dict]:
        """Every turn of a conversation, a fork's inherited turns first."""
        info = self.store.get_conversation(owner, cid)
        if info is None:
            return []
        own = self.store.turns(owner, cid)
        parent = info.metadata.get("forked_from")
        if parent and depth < 256:
            inherited = self.history(owner, parent["conversation_id"], depth + 1)
            own = inherited[: parent["version"]] + own
        return own
