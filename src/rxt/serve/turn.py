"""One turn as the service sees it: where it starts (:class:`TurnSpec` and its start types) and
the turn while it runs (:class:`ActiveTurn`: streams the answer, seals its keys as pending).

:class:`~rxt.serve.service.TurnService` creates an :class:`ActiveTurn`, and the turn's own task
calls back :meth:`~rxt.serve.service.TurnService.finish` once the answer has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rxt.engine import EngineError, SamplingParams, TurnResult, UpdateTiming
from rxt.engine.conversation import Conversation
from rxt.engine.stream import TurnStream
from rxt.serve.errors import APIError, store_status

if TYPE_CHECKING:
    from rxt.serve.service import TurnService

__all__ = [
    "NEXT_KEY",
    "ActiveTurn",
    "FromConversation",
    "FromKey",
    "NewConversation",
    "Start",
    "TurnSpec",
]

log = logging.getLogger("rxt.serve")

NEXT_KEY = "next:"  # pending binding of a conversation's turn in progress
_END = object()


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
        waited_s: float = 0.0,
    ) -> None:
        self.service = service
        self.spec = spec
        self.conversation_id = conversation_id
        self.base_version = base_version  # the stored version this turn continues
        self.version = base_version + 1  # the version its state will be (unless forked)
        self.system = system
        self.conv = conv
        self.stream = stream
        self.ready = asyncio.Event()  # set from engine threads: tokens, end, update done
        self._started_at = started_at
        self._waited_s = waited_s  # for the previous turn's commit, before this one began
        self._first_at: float | None = None
        self.bound_keys: list[str] = []  # alias keys bound pending on ``version`` (seal)
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
        ready = self.ready

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
        self.bound_keys = [*self.spec.keys(result.text), NEXT_KEY + self.conversation_id]
        for key in self.bound_keys:
            self.service.pending[self.spec.owner, key] = self
        await self.service.run(self.service.bind_pending, self)

    def stored_turn(self, result: TurnResult, timing: UpdateTiming) -> dict[str, Any]:
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
            "keys": self.bound_keys,
            "memory_update": self._update_record(result, timing),
            **self.spec.record,
        }

    def _update_record(self, result: TurnResult, timing: UpdateTiming) -> dict[str, float]:
        """When this turn's memory update ran, in ms from the turn's start (request parsed),
        and how long the turn first waited for the previous turn's update and commit — what
        the web page shows to make the asynchronous update visible."""

        def ms(instant: float) -> float:
            return round((instant - self._started_at) * 1000, 3)

        return {
            "waited_ms": round((self._waited_s + result.waited_s) * 1000, 3),
            "answer_ms": ms(timing.queued_at),  # the last token: the update is queued then
            "started_ms": ms(timing.started_at),
            "finished_ms": ms(timing.finished_at),
        }
