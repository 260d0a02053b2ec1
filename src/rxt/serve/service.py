"""Turns on stored conversations: where a turn starts, how it runs, and how its state is kept.

The HTTP routes describe a turn (:class:`TurnSpec`); :meth:`TurnService.start` finds the state
it continues from, replays any earlier turns the server has not seen, and sends the query to the
batched :class:`~rxt.engine.Engine`. The route streams the answer; :meth:`ActiveTurn.seal` then
binds the turn's alias keys (response id, transcript hash) as *pending* on the version about to
be written, before the client hears ``[DONE]``; after the response, the turn's own task
(:meth:`TurnService.finish`) waits for the engine's asynchronous memory update and appends the
new STM as the next version with a compare-and-set.

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rxt.engine import Engine, EngineError, SamplingParams, StateError, TurnResult
from rxt.engine.conversation import Conversation
from rxt.engine.state import stm_to_bytes
from rxt.engine.stream import TurnStream
from rxt.serve.errors import APIError, bad_request, not_found, store_status
from rxt.serve.metrics import Metrics
from rxt.serve.settings import ServerSettings
from rxt.serve.store import StateStore, StoreConflict

log = logging.getLogger("rxt.serve")

NEXT_KEY = "next:"  # pending binding of a conversation's turn in progress
_POLL_S = 0.01
_END = object()
_WAIT = object()  # "another process is committing what this needs: ask again shortly"


# ---------------------------------------------------------------------------- where a turn starts
@dataclass(frozen=True)
class NewConversation:
    system: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FromConversation:
    """Continue a conversation at its latest version (``create``: make it if missing)."""

    conversation_id: str
    create: bool = False
    system: str | None = None  # for a conversation created here


@dataclass(frozen=True)
class FromKey:
    """Continue from the version an alias key points at (a response id, a transcript hash);
    a version older than the conversation's latest forks it."""

    key: str
    what: str  # for the 404 message: "response"
    ident: str
    param: str | None = None


Start = NewConversation | FromConversation | FromKey


@dataclass
class TurnSpec:
    owner: str
    query: str
    sampling: SamplingParams  # its max_new_tokens is replaced by max_tokens' resolution
    max_tokens: int | None  # None: as many as the model's max_seq_len leaves (capped)
    api: str  # "chat" | "responses"
    start: Start
    system: str | None = None  # instructions given with a continuation: must match the stored
    replay: list[tuple[str, str]] = field(default_factory=list)  # earlier turns to encode first
    replay_keys: list[list[str]] = field(default_factory=list)  # alias keys of each replayed turn
    keys: Callable[[str], list[str]] = lambda reply: []  # alias keys of the new state
    record: dict[str, Any] = field(default_factory=dict)  # extra fields of the stored turn
    commit: bool = True  # False: answer only, store nothing (``store: false``)


# ---------------------------------------------------------------------------- locks
class LockTable:
    """One asyncio lock per (owner, conversation), dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], list] = {}

    async def acquire(self, key: tuple[str, str]) -> None:
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(key, entry)
            raise

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


# ---------------------------------------------------------------------------- a running turn
class ActiveTurn:
    """One turn being answered: iterate :meth:`text`, then read :meth:`result`."""

    def __init__(
        self,
        service: TurnService,
        spec: TurnSpec,
        conversation_id: str,
        base_version: int,
        conv: Conversation,
        stream: TurnStream,
        started_at: float,
        system: str | None,
    ) -> None:
        self.service = service
        self.spec = spec
        self.conversation_id = conversation_id
        self.base_version = base_version  # the stored version this turn continues
        self.version = base_version + 1  # the version its state will be (unless forked)
        self.system = system
        self.conv = conv
        self.stream = stream
        self._ready = asyncio.Event()  # set from engine threads: tokens, end, update done
        self._started_at = started_at
        self._first_at: float | None = None
        self._keys: list[str] = []
        self._result: TurnResult | None = None
        self.turn = stream.turn
        self._queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())
        service.background.add(self.task)
        self.task.add_done_callback(service.background.discard)
        self.created = int(time.time())

    async def text(self) -> AsyncIterator[str]:
        """The answer's text as it is generated (pieces that arrive together come as one).
        It ends after :meth:`seal`, so the caller's final event follows the pending binds."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def abandon(self) -> None:
        """The client went away: stop generating (what was generated is still committed)."""
        if not self.stream.finished:
            self.stream.cancel()

    def result(self) -> TurnResult:
        """The finished turn (call once the answer has ended); built once, then reused."""
        if self._result is None:
            self._result = self.stream.result()
        return self._result

    async def _pump(self) -> None:
        """Runs as a task of its own, so the turn is sealed, committed and its conversation
        released whatever happens to the HTTP response that reads it."""
        try:
            async for text in self._pieces():
                self._queue.put_nowait(text)
            await self.seal()
            self._queue.put_nowait(_END)
        except APIError as exc:
            self._queue.put_nowait(exc)
        except Exception as exc:  # the store failed while sealing: the client hears why
            log.exception("turn %d of conversation %s failed", self.turn, self.conversation_id)
            status, message = store_status(exc)
            self._queue.put_nowait(APIError(status, message))
        except BaseException as exc:
            self._queue.put_nowait(APIError(503, "the server is shutting down"))
            raise exc
        finally:
            self.stream.cancel()  # a no-op once the answer is complete
            await self.service.finish(self)

    async def _pieces(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        ready = self._ready

        def wake() -> None:  # engine thread: must never raise into the decoder
            # Already set: the loop has not polled since, and will see this event too (it is
            # queued before this check) — skip the cross-thread call, one syscall per token.
            if ready.is_set():
                return
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(ready.set)

        self.stream.on_event(wake)
        while True:
            ready.clear()
            try:
                pieces, done = self.stream.poll()
            except EngineError as exc:
                raise APIError(503, f"generation failed: {exc}", code="engine_error") from exc
            if pieces and self._first_at is None:
                self._first_at = time.perf_counter()
                self.service.metrics.ttft.observe(self._first_at - self._started_at)
            text = "".join(p.text for p in pieces)
            if text:
                yield text
            if done:
                return
            if not pieces:
                await ready.wait()

    async def seal(self) -> None:
        """Bind the turn's keys as pending on its next version: from now on any process that
        looks one up waits for the commit instead of missing it."""
        result = self.result()
        metrics = self.service.metrics
        metrics.tokens.inc(len(result.token_ids))
        if len(result.token_ids) > 1 and result.reply_s > result.ttft_s:
            metrics.tokens_per_second.observe(
                (len(result.token_ids) - 1) / (result.reply_s - result.ttft_s)
            )
        metrics.turns.labels(self.spec.api).inc()
        if not self.spec.commit:
            return
        self._keys = [*self.spec.keys(result.text), NEXT_KEY + self.conversation_id]
        for key in self._keys:
            self.service.pending[self.spec.owner, key] = self
        await self.service.run(self.service.bind_pending, self)

    def stored_turn(self, result: TurnResult) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "user": self.spec.query,
            "assistant": result.text,
            "finish_reason": result.finish_reason,
            "api": self.spec.api,
            "usage": {
                "input_tokens": result.prompt_tokens,
                "output_tokens": len(result.token_ids),
            },
            "created_at": self.created,
            "keys": self._keys,
            **self.spec.record,
        }


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
        if isinstance(spec.start, FromKey):
            await self._local_commit(owner, spec.start.key)
        cid, version = await self._until_ready(self._target, spec)
        await self.locks.acquire((owner, cid))
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
        return ActiveTurn(self, spec, cid, base, conv, stream, started_at, system)

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
            return self._create(owner, start.system, start.metadata), None
        if isinstance(start, FromConversation):
            if self.store.get_conversation(owner, start.conversation_id) is None:
                if not start.create:
                    raise not_found("conversation", start.conversation_id, "conversation")
                with contextlib.suppress(StoreConflict):  # a concurrent request created it
                    self._create(owner, start.system, {}, start.conversation_id)
            return start.conversation_id, None
        # A version _resolve returns holds this key's turn for good (versions never change),
        # so the locked part need not read the binding again.
        return self._resolve(owner, start, patient)

    def _create(
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

    async def _local_commit(self, owner: str, key: str) -> None:
        local = self.pending.get((owner, key))
        if local is not None:
            await asyncio.wait([local.task])

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
        conv = self._load(owner, cid, base, meta)
        if spec.commit and base < info.latest_version:
            parent = {"conversation_id": cid, "version": base}
            cid = self._create(owner, system, {}, forked_from=parent, seed=meta.get("stm_seed"))
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
        cid = await self.run(self._create, owner, system, metadata)
        if not turns:
            return cid
        await self.locks.acquire((owner, cid))
        try:

            def work() -> None:
                info = self.store.get_conversation(owner, cid)
                conv = self._load(owner, cid, 0, info.metadata)
                self.replay(owner, cid, 0, conv, turns)

            await self.run(work)
        except BaseException:
            await self.run(self.store.delete_conversation, owner, cid)
            raise
        finally:
            self.locks.release((owner, cid))
        return cid

    def _load(self, owner: str, cid: str, version: int, meta: dict) -> Conversation:
        """An engine conversation holding the state after ``version`` (0: the start)."""
        engine = self.engine
        if version == 0:
            parent = meta.get("forked_from")
            if parent:  # a fork's version 0 is its parent's state at the fork
                pinfo = self.store.get_conversation(owner, parent["conversation_id"])
                if pinfo is None:
                    raise APIError(409, f"conversation {cid!r} forked from one since deleted")
                return self._load(owner, parent["conversation_id"], parent["version"], {})
            gen = torch.Generator().manual_seed(int(meta.get("stm_seed", 0)))
            stm = engine.model.initial_stm(1, generator=gen)
            state = stm_to_bytes(stm, fingerprint=engine.fingerprint, metadata={"turns": "0"})
            conv = engine.conversation(state=state)
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
            return engine.conversation(state=stored.state)
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
            turn.spec.owner, turn._keys, turn.conversation_id, turn.version, pending=True
        )

    async def finish(self, turn: ActiveTurn) -> None:
        owner, cid = turn.spec.owner, turn.conversation_id
        try:
            if not turn.spec.commit:
                if isinstance(turn.spec.start, NewConversation):  # made for this turn alone
                    await self.run(self.store.delete_conversation, owner, cid)
                return
            while not turn.stream.update_finished:
                turn._ready.clear()
                if not turn.stream.update_finished:
                    await turn._ready.wait()
            timing = turn.stream.wait_update(0)  # EngineError if the update failed
            if timing is None:
                raise EngineError("the turn ended before it started: nothing to store")
            self.metrics.update_latency.observe(timing.latency_s)
            await self.run(self._commit, turn, turn.stored_turn(turn.result()))
        except Exception:
            self.metrics.commit_failures.inc()
            log.exception("turn %d of conversation %s not stored", turn.turn, cid)
            await self.run(self._unbind, owner, turn._keys)
        finally:
            for key in turn._keys:
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
        new = self._create(owner, turn.system, {}, forked_from=parent, seed=seed)
        self.metrics.forks.inc()
        self._append(owner, new, 0, state, record)
        moved = [key for key in turn._keys if not key.startswith(NEXT_KEY)]
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
