"""The event-driven engine: one scheduler thread decodes every active turn as one batch.

Per turn (paper §4): the conversation's STM is projected to memory keys/values once; the query is
prefilled; the answer is decoded with a cache of this turn only; when it is complete the turn is
handed to the :class:`~rxt.engine.updater.MemoryUpdater`, which runs the memory update on its own
thread. Conversations join the batch when their turn is admitted and leave when it ends, so one
model serves many conversations at once. A turn is admitted only when its conversation's previous
update has committed; the scheduler never blocks on it — other rows keep decoding.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from rxt.engine.conversation import Conversation, UpdateListener
from rxt.engine.rows import RowPool
from rxt.engine.sampling import SamplingParams
from rxt.engine.slot import EngineLink
from rxt.engine.state import model_fingerprint, stm_from_tensor
from rxt.engine.stream import TurnRequest
from rxt.engine.updater import MemoryUpdater, set_intra_op_threads
from rxt.model.reactive_transformer import ReactiveTransformer

if TYPE_CHECKING:
    from rxt.tokenizer import RxTTokenizer


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for monitoring: rows decoding, turns queued, memory updates in flight."""

    active: int
    waiting: int
    updates_pending: int


class Engine:
    """Serve conversations with one model.

    >>> engine = Engine(model)                       # model.tokenizer must be set
    >>> conv = engine.conversation()
    >>> for piece in conv.send("Hello"): print(piece.text, end="")

    On CPU the decoder and the memory updater each run on their own thread with
    ``decode_threads`` / ``update_threads`` intra-op threads (default 1 each): on a 2-core
    machine the update then runs on the other core instead of competing for both, and small
    per-token ops lose more to OpenMP hand-offs than they gain (measured: a decode step at
    batch 1 takes 2.7 ms with one thread, 4.0 ms with two; 5.4 vs 13.0 ms at batch 16).
    """

    def __init__(
        self,
        model: ReactiveTransformer,
        tokenizer: RxTTokenizer | None = None,
        *,
        max_batch_size: int = 32,
        update_batch_size: int | None = None,
        default_sampling: SamplingParams | None = None,
        decode_threads: int = 1,
        update_threads: int = 1,
        fused_decode: bool = True,
    ) -> None:
        tokenizer = tokenizer or model.tokenizer
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: pass `tokenizer=` or load one with it")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the model only "
                f"{model.config.vocab_size}"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if decode_threads < 1 or update_threads < 1:
            raise ValueError("decode_threads and update_threads must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.default_sampling = default_sampling or SamplingParams()
        self.decode_threads = decode_threads
        self.fused_decode = fused_decode
        if update_batch_size is None:
            # A CPU gains little from batching updates (measured 8.3 vs 8.0 ms per update at
            # batch 4 vs 16, `small`) but a conversation waits for its whole batch; a GPU gains.
            update_batch_size = 4 if model.device.type == "cpu" else 32
        self.updater = MemoryUpdater(model, max_batch=update_batch_size, threads=update_threads)
        self._cv = threading.Condition()
        self._waiting: deque[TurnRequest] = deque()
        self._rows: list[TurnRequest] = []  # row i of the pool answers self._rows[i]
        self._closing = False
        self._pool: RowPool | None = None
        # All a conversation may ask of the engine; its slot calls these, nothing else.
        self._link = EngineLink(submit=self._submit, wake=self._wake, updater=self.updater)
        self._thread = threading.Thread(target=self._loop, name="rxt-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @cached_property
    def fingerprint(self) -> str:
        """Identifies the model's config and weights; exported states carry it."""
        return model_fingerprint(self.model)

    def conversation(
        self,
        system_prompt: str | None = None,
        *,
        seed: int | None = None,
        state: bytes | None = None,
        stm: torch.Tensor | None = None,
        verify_checksum: bool = True,
        on_update: UpdateListener | None = None,
    ) -> Conversation:
        """A new conversation, from STM_0 (encoding ``system_prompt`` as turn 0), from an
        exported ``state``, or from an STM tensor ``stm`` ``(1, L, S, d)`` or ``(L, S, d)``.
        ``seed`` makes STM_0 and sampling reproducible.

        A ``state`` or ``stm`` is the memory to resume: ``system_prompt`` is then recorded but
        not encoded again. ``stm`` is checked like a loaded state (shape, floating point,
        finite; StateError otherwise) and copied to the model's device and dtype; it carries
        no fingerprint, so that it came from this model is the caller's word. With ``state``,
        ``verify_checksum=False`` skips only the blob's tensor checksum, for bytes the caller
        has just verified otherwise (:func:`~rxt.engine.state.stm_from_bytes`)."""
        if self._closing:
            raise RuntimeError("engine is closed")
        if state is not None and stm is not None:
            raise ValueError("pass state= (exported bytes) or stm= (a tensor), not both")
        if stm is not None:
            # Checked before the conversation exists, so a bad tensor leaves nothing behind;
            # given to the constructor, so no STM_0 is drawn only to be replaced.
            model = self.model
            stm = stm_from_tensor(
                stm, shape=model.config.stm_shape, device=model.device, dtype=model.dtype
            )
        conv = Conversation(
            self, self._link, system_prompt=system_prompt, seed=seed, stm=stm, on_update=on_update
        )
        if state is not None:
            conv.load_state(state, verify_checksum=verify_checksum)
        elif stm is None and system_prompt:
            conv.absorb_system(system_prompt)  # turn 0 (paper §4, step 4), asynchronously
        return conv

    def stats(self) -> EngineStats:
        return EngineStats(len(self._rows), len(self._waiting), self.updater.pending)

    def close(self) -> None:
        """Finish every queued turn and memory update, then stop the threads."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self.updater.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ EngineLink (slots call)
    def _submit(self, request: TurnRequest) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError("engine is closed")
            self._waiting.append(request)
            self._cv.notify_all()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        set_intra_op_threads(self.model.device, self.decode_threads)
        with torch.inference_mode():
            while True:
                with self._cv:
                    admitted = self._admissible()
                    while not admitted and not self._rows:
                        if self._closing and not self._waiting:
                            return
                        self._cv.wait()
                        admitted = self._admissible()
                if admitted:
                    self._guarded(self._prefill, admitted)
                if self._rows:
                    self._guarded(self._step, list(self._rows))

    def _admissible(self) -> list[TurnRequest]:
        """Queued turns that may start now (caller holds ``_cv``): in order, at most one per
        conversation, none whose conversation still has a turn in flight."""
        chosen: list[TurnRequest] = []
        seen: set[int] = set()
        room = self.max_batch_size - len(self._rows)
        for request in list(self._waiting):
            slot = request.slot
            if id(slot) in seen:
                continue
            seen.add(id(slot))
            if request.cancelled or slot.error is not None:
                self._waiting.remove(request)
                if request.cancelled:
                    request.drop()
                else:
                    request.fail(RuntimeError(slot.error_message()))
                slot.abandon(request)
                continue
            if slot.busy or len(chosen) >= room:
                continue
            self._waiting.remove(request)
            slot.admit(request)
            chosen.append(request)
        return chosen

    def _guarded(self, work, requests: list[TurnRequest]) -> None:
        # A failure in the decoder (a bug, out of memory) must not hang the callers' streams:
        # it fails the turns in the batch; their conversations keep their last committed memory.
        try:
            work(requests)
        except Exception as exc:
            victims = {id(r): r for r in [*requests, *self._rows]}
            for request in victims.values():
                request.fail(exc)
                request.slot.abandon(request)
            self._rows = []
            self._pool = None  # its rows may be half-written; a fresh one is made on demand

    def _prefill(self, requests: list[TurnRequest]) -> None:
        if self._pool is None:
            self._pool = RowPool(
                self.model, self.max_batch_size, self.tokenizer.eos_id, fused=self.fused_decode
            )
        old = self._rows
        rows = old + requests
        tokens = self._pool.join(
            [r.prompt_ids for r in requests],
            [r.slot.stm for r in requests],
            [r.params for r in requests],
            [r.generator for r in requests],
            [r.params for r in rows],
        )
        self._rows = rows
        self._deliver(tokens, start=len(old))

    def _step(self, rows: list[TurnRequest]) -> None:
        tokens = self._pool.step([r.generator for r in rows])
        self._deliver(tokens, start=0)

    def _deliver(self, tokens: list[int], start: int) -> None:
        """Stream each row's new token; retire rows whose answer is complete."""
        now = time.perf_counter()
        done: list[tuple[int, str]] = []
        eos = self.tokenizer.eos_id
        limit = self.model.config.max_seq_len
        pool = self._pool
        for offset, token in enumerate(tokens):
            index = start + offset
            request = self._rows[index]
            request.emit(token, now)
            params = request.params
            if token == eos and params.stop_at_eos:
                done.append((index, "eos"))
            elif len(request.answer) >= params.max_new_tokens:
                done.append((index, "length"))
            elif request.cancelled:
                done.append((index, "cancelled"))
            elif pool.host_lengths[index] >= limit:  # no position left for the next token
                done.append((index, "length"))
        for index, reason in sorted(done, reverse=True):
            self._retire(index, reason)

    def _retire(self, index: int, reason: str) -> None:
        request = self._rows[index]
        last = len(self._rows) - 1
        self._rows[index] = self._rows[last]
        self._rows.pop()
        self._pool.remove(index, [r.params for r in self._rows])
        request.finish(reason)  # the answer is out before its memory update starts
        ready = None
        if self.model.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        interaction = request.prompt_ids + request.answer
        eos = self.tokenizer.eos_id
        if interaction[-1] != eos and len(interaction) < self.model.config.max_seq_len:
            interaction.append(eos)  # the encoder sees turns as they were trained: ending in EOS
        request.slot.commit(request, interaction, ready)
