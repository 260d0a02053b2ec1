"""What a caller holds while a turn is answered: a stream of text pieces and the turn's result.

The engine's scheduler thread produces token ids into a per-turn queue; the caller's thread turns
them into text. Detokenising on the caller's side keeps the shared decode loop lean, and a caller
that stops reading costs the engine nothing: the answer is still completed and the memory still
updated (paper §4, step 3). ``cancel()`` is the explicit way to stop generation early; the memory
is then updated with the answer as far as it went.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rxt.engine.sampling import SamplingParams
from rxt.engine.updater import UpdateTiming

if TYPE_CHECKING:
    import torch

    from rxt.engine.slot import ConversationSlot
    from rxt.tokenizer import RxTTokenizer


class EngineError(RuntimeError):
    """The engine could not complete a turn (the message says why); the conversation's memory is
    left at its last committed state."""


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it completes (``""`` while a multi-byte character is
    still incomplete)."""

    text: str
    token_id: int | None  # None for text held back until the end of the answer


@dataclass(frozen=True)
class TurnResult:
    """A finished turn. Times are seconds from ``send`` (caller side of the queue excluded)."""

    query: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "length" | "cancelled"
    ttft_s: float  # time to first token
    reply_s: float  # time to the last token
    waited_s: float  # part of ttft spent waiting for this conversation's previous update
    turn: int


_DONE = object()


@dataclass(eq=False)
class TurnRequest:
    """Engine-side record of one turn (internal; callers use :class:`TurnStream`)."""

    slot: ConversationSlot  # the conversation, as the scheduler sees it
    query: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    turn: int
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    blocked_until: float = 0.0  # when the previous update, if it was pending, finished
    answer: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    ended: threading.Event = field(default_factory=threading.Event)  # every event is queued
    update_done: threading.Event = field(default_factory=threading.Event)
    update_timing: UpdateTiming | None = None
    update_error: BaseException | None = None
    waker: Callable[[], None] | None = None  # called on the engine thread after each event

    def emit(self, token: int, now: float) -> None:
        if not self.answer:
            self.first_token_at = now
        self.last_token_at = now
        self.answer.append(token)
        self.events.put(token)
        self._wake()

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.events.put(_DONE)
        self.ended.set()
        self._wake()

    def end_update(self, timing: UpdateTiming, error: BaseException | None) -> None:
        """The memory update of this turn has ended (update thread)."""
        self.update_timing, self.update_error = timing, error
        self.update_done.set()
        self._wake()

    def _wake(self) -> None:
        waker = self.waker
        if waker is not None:
            waker()

    def drop(self) -> None:
        """Cancelled before it started: no answer, no memory update."""
        self.finish("cancelled")
        self.update_done.set()

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.update_error = error
        self.update_done.set()
        self.events.put(error)
        self.ended.set()
        self._wake()


class TurnStream:
    """Iterate for :class:`Piece` objects as tokens are generated; ``result()`` for the rest."""

    def __init__(self, request: TurnRequest, tokenizer: RxTTokenizer) -> None:
        self._request = request
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""
        self._prefix = self._read = 0  # detokenisation window: see _decode
        self._finished = False

    def __iter__(self) -> Iterator[Piece]:
        while (token := self._next_token()) is not None:
            self._ids.append(token)
            yield Piece(self._decode(final=False), token)
        tail = self._decode(final=True)
        if tail:
            yield Piece(tail, None)

    def _next_token(self, block: bool = True) -> int | None:
        """The next token id, or None at the end of the answer (or, with ``block=False``,
        when no token is queued yet)."""
        if self._finished:
            return None
        try:
            event = self._request.events.get(block=block)
        except queue.Empty:
            return None
        if event is _DONE:
            self._finished = True
            return None
        if isinstance(event, BaseException):
            self._finished = True
            raise EngineError(f"turn {self._request.turn} failed: {event}") from event
        return event

    def _decode(self, *, final: bool) -> str:
        # Incremental detokenisation over a short window (as in TGI/vLLM): decode the ids
        # since ``_prefix`` with and without the newest ones, emit the difference. BPE pieces
        # that only form a character together decode to U+FFFD until complete: hold them back.
        ids = self._ids
        start = self._prefix == 0  # the window begins the answer (tokenizer.decode's start)
        before = self._tokenizer.decode(ids[self._prefix : self._read], start=start)
        after = self._tokenizer.decode(ids[self._prefix :], start=start)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(ids)
        self._text += new
        return new

    def on_event(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on an engine thread; keep it short and non-blocking) whenever
        a token or the end of the answer is queued, when the memory update has ended, and once
        now. With :meth:`poll` this lets an event loop consume the stream without a thread per
        turn."""
        self._request.waker = callback
        callback()

    def poll(self) -> tuple[list[Piece], bool]:
        """The pieces queued since the last call, without blocking, and whether the answer has
        ended (the last pieces are in this list then). Raises :class:`EngineError` like
        iteration if the turn failed."""
        pieces: list[Piece] = []
        while (token := self._next_token(block=False)) is not None:
            self._ids.append(token)
            pieces.append(Piece(self._decode(final=False), token))
        if self._finished:
            tail = self._decode(final=True)
            if tail:
                pieces.append(Piece(tail, None))
        return pieces, self._finished

    @property
    def update_finished(self) -> bool:
        """True once this turn's memory update has ended (or the turn ended without one);
        :meth:`wait_update` then returns at once."""
        return self._request.update_done.is_set()

    @property
    def turn(self) -> int:
        """This turn's number in its conversation (1 = the first after the system prompt)."""
        return self._request.turn

    @property
    def finished(self) -> bool:
        """True once the end of the answer has been read (by iteration, ``poll`` or ``result``)."""
        return self._finished

    @property
    def text(self) -> str:
        """Text streamed so far."""
        return self._text

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    def cancel(self) -> None:
        """Stop generating; the memory is updated with the answer generated so far."""
        self._request.cancelled = True

    def result(self) -> TurnResult:
        """Wait for the answer to finish (consuming the rest of the stream) and describe it.

        Tokens not yet read are taken without detokenising each, and without waking up for
        each (a non-streaming caller costs the decoding thread nothing per token)."""
        self._request.ended.wait()
        while (token := self._next_token()) is not None:
            self._ids.append(token)
        r = self._request
        start = r.submitted_at
        first = r.first_token_at or r.last_token_at or start
        return TurnResult(
            query=r.query,
            text=self._tokenizer.decode(r.answer),
            token_ids=list(r.answer),
            prompt_tokens=len(r.prompt_ids),
            finish_reason=r.finish_reason or "error",
            ttft_s=first - start,
            reply_s=(r.last_token_at or start) - start,
            waited_s=max(0.0, r.blocked_until - start),
            turn=r.turn,
        )

    def wait_update(self, timeout: float | None = None) -> UpdateTiming | None:
        """Block until this turn's memory update finished; return its timing (None for a turn
        cancelled before it started, which has no update)."""
        r = self._request
        if not r.update_done.wait(timeout):
            raise TimeoutError(f"memory update of turn {r.turn} not finished after {timeout} s")
        if r.update_error is not None:
            raise EngineError(f"memory update of turn {r.turn} failed: {r.update_error}")
        return r.update_timing
