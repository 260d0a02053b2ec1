"""A conversation: its STM (the whole state between turns, paper §4) and the turns sent on it.

The conversation owns a value, not a model: ``stm`` is replaced — never modified in place — when
each turn's asynchronous memory update commits. Turns on one conversation are serialised: the
engine admits a turn only after the previous turn's update committed, so no turn ever reads a
stale memory, while other conversations keep decoding meanwhile.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rxt.engine.sampling import SamplingParams, make_generator
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.engine.stream import EngineError, TurnRequest, TurnResult, TurnStream
from rxt.engine.updater import UpdateJob, UpdateTiming

if TYPE_CHECKING:
    from rxt.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateEvent:
    """A memory update of ``conversation_id`` that ``"started"``, ``"finished"`` or ``"failed"``.

    ``turn`` 0 is the system prompt. ``timing`` is set once the update ended."""

    kind: str
    conversation_id: str
    turn: int
    time: float
    timing: UpdateTiming | None = None
    error: BaseException | None = None


UpdateListener = Callable[[UpdateEvent], None]


class Conversation:
    """Create with :meth:`Engine.conversation`; talk with :meth:`send` or :meth:`ask`."""

    def __init__(
        self,
        engine: Engine,
        *,
        system_prompt: str | None,
        seed: int | None,
        stm: torch.Tensor | None = None,
        turns: int = 0,
        on_update: UpdateListener | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.engine = engine
        self.id = uuid.uuid4().hex
        self.system_prompt = system_prompt
        self.seed = seed
        self.listeners: list[UpdateListener] = [on_update] if on_update else []
        self._cond = threading.Condition()
        self._pending = 0  # turns (and system-prompt updates) not yet committed
        self._active: object | None = None  # the turn being answered or updated
        self._committed_at = 0.0
        self._error: BaseException | None = None
        self._submitted = turns
        self.turns = turns  # committed turns
        self.last_update: UpdateTiming | None = None
        self._generator = generator or self._new_generator(seed)
        self._stm = stm if stm is not None else self._fresh_stm()

    # ------------------------------------------------------------------ state
    @property
    def stm(self) -> torch.Tensor:
        """The committed STM (1, L, S, d) after every turn sent so far (waits for updates).

        Treat it as read-only: the engine never modifies it in place, and neither should you."""
        self.wait()
        return self._stm

    @property
    def updating(self) -> bool:
        """True while a turn or memory update of this conversation is in flight."""
        return self._pending > 0

    @property
    def error(self) -> BaseException | None:
        """Why the last memory update failed, or None. While set, ``send`` and ``stm`` refuse;
        ``reset()`` or ``load_state()`` recover."""
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Block until every turn sent so far has been answered and committed to memory."""
        self._wait_idle(timeout)
        if self._error is not None:
            raise EngineError(self._error_message())

    def _wait_idle(self, timeout: float | None = None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"conversation {self.id} still busy after {timeout} s")

    def fork(self) -> Conversation:
        """A new conversation continuing from this one's current memory (and sampling state)."""
        self.wait()
        generator = None
        if self._generator is not None:
            generator = torch.Generator(self._generator.device)
            generator.set_state(self._generator.get_state())
        return Conversation(
            self.engine,
            system_prompt=self.system_prompt,
            seed=self.seed,
            stm=self._stm,
            turns=self.turns,
            generator=generator,
        )

    def reset(self) -> None:
        """Forget every turn: back to STM_0 (and the system prompt, if one was given)."""
        self._wait_idle()
        self._error = None
        self._stm = self._fresh_stm()
        self.turns = self._submitted = 0
        if self.system_prompt:
            self._start_system_prompt()

    def export_state(self) -> bytes:
        """The committed STM as safetensors bytes, tagged with the model's fingerprint."""
        self.wait()
        meta = {"turns": str(self.turns), "conversation_id": self.id}
        return stm_to_bytes(self._stm, fingerprint=self.engine.fingerprint, metadata=meta)

    def load_state(self, data: bytes, *, verify_checksum: bool = True) -> None:
        """Replace the memory with an exported state (refused if another model saved it).

        ``verify_checksum=False``: see :func:`~rxt.engine.state.stm_from_bytes` — only for
        bytes just verified otherwise (a store's whole-blob sha256)."""
        self._wait_idle()
        model = self.engine.model
        stm, meta = stm_from_bytes(
            data,
            fingerprint=self.engine.fingerprint,
            shape=model.config.stm_shape,
            device=model.device,
            dtype=model.dtype,
            verify_checksum=verify_checksum,
        )
        self._stm, self._error = stm, None
        turns = meta.get("turns", "0")
        self.turns = self._submitted = int(turns) if turns.isdigit() else 0

    # ------------------------------------------------------------------ turns
    def send(
        self,
        query: str | Sequence[int],
        sampling: SamplingParams | None = None,
        **overrides: Any,
    ) -> TurnStream:
        """Start a turn; iterate the returned stream for its text as it is generated.

        ``query`` is text, or already-tokenised query ids (without special tokens). ``sampling``
        defaults to the engine's; keyword overrides replace single fields, e.g.
        ``send("hi", temperature=0.8, max_new_tokens=32)``."""
        if self._error is not None:
            raise EngineError(self._error_message())
        engine = self.engine
        params = sampling or engine.default_sampling
        if overrides:
            params = params.replace(**overrides)
        text, prompt = self._format_query(query)
        limit = engine.model.config.max_seq_len
        if len(prompt) + params.max_new_tokens > limit:
            raise ValueError(
                f"query of {len(prompt)} tokens plus max_new_tokens={params.max_new_tokens} "
                f"exceeds the model's max_seq_len={limit}"
            )
        generator = make_generator(params, engine.model.device) or self._generator
        with self._cond:
            self._pending += 1
            self._submitted += 1
            turn = self._submitted
        request = TurnRequest(self, text, prompt, params, generator, turn)
        try:
            engine._submit(request)
        except BaseException:
            with self._cond:
                self._pending -= 1
                self._submitted -= 1
                self._cond.notify_all()
            raise
        return TurnStream(request, engine.tokenizer)

    def ask(
        self, query: str | Sequence[int], sampling: SamplingParams | None = None, **overrides: Any
    ) -> TurnResult:
        """``send`` and wait for the whole answer."""
        return self.send(query, sampling, **overrides).result()

    def absorb(self, query: str, answer: str) -> None:
        """Write a turn that happened elsewhere (a transcript being replayed) into memory.

        It gets the same asynchronous update as a generated turn — the encoder reads
        ``[BOS][Q] query [A] answer [EOS]`` — without decoding; the next turn waits for it.
        ValueError (nothing changed) if the interaction exceeds ``max_seq_len``."""
        limit = self.engine.model.config.max_seq_len
        ids = self.engine.tokenizer.encode_interaction(query, answer, max_length=limit).input_ids
        self._replay(ids)

    def absorb_system(self, text: str) -> None:
        """Encode ``text`` as a system prompt into the current memory (as turn 0 does for a
        conversation created with ``system_prompt``); the next turn waits for it."""
        ids = self.engine.tokenizer.encode_system(text)
        limit = self.engine.model.config.max_seq_len
        if len(ids) > limit:
            raise ValueError(
                f"system prompt is {len(ids)} tokens with its markers; max_seq_len is {limit}"
            )
        self.system_prompt = text
        self._replay(ids, turn=0)

    def _replay(self, ids: list[int], turn: int | None = None) -> None:
        self.wait()  # the update must start from the memory every earlier turn committed
        with self._cond:
            self._pending += 1
            self._active = "replay"
            if turn is None:
                self._submitted += 1
                turn = self._submitted
        self._submit_update(ids, turn=turn)

    def _format_query(self, query: str | Sequence[int]) -> tuple[str, list[int]]:
        tokenizer = self.engine.tokenizer
        if isinstance(query, str):
            return query, tokenizer.encode_query(query)
        ids = [int(i) for i in query]
        vocab = self.engine.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"query id {bad[0]} out of range for vocab_size={vocab}")
        prompt = [tokenizer.bos_id, tokenizer.query_id, *ids, tokenizer.answer_id]
        return tokenizer.decode(ids), prompt

    # ------------------------------------------------------------------ engine side
    def _new_generator(self, seed: int | None) -> torch.Generator:
        # Every conversation samples from its own generator, so a batch never couples rows.
        device = self.engine.model.device
        return torch.Generator(device).manual_seed(
            seed if seed is not None else secrets.randbits(63)
        )

    def _fresh_stm(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        return self.engine.model.initial_stm(1, generator=generator)

    def _start_system_prompt(self) -> None:
        """Encode the system prompt as turn 0 (paper §4, step 4), asynchronously."""
        self.absorb_system(self.system_prompt or "")

    def _submit_update(
        self, interaction: list[int], turn: int, request: TurnRequest | None = None, ready=None
    ) -> None:
        def started() -> None:
            self._notify(UpdateEvent("started", self.id, turn, time.perf_counter()))

        def done(stm_next, error, timing: UpdateTiming) -> None:
            with self._cond:
                if error is None:
                    self._stm = stm_next
                    self.turns = max(self.turns, turn)
                else:
                    self._error = error
                self.last_update = timing
                self._committed_at = timing.finished_at
            # Listeners hear of the update before anyone waiting on it is released, so a UI
            # has printed "updated" by the time the next turn can start.
            kind = "finished" if error is None else "failed"
            self._notify(UpdateEvent(kind, self.id, turn, timing.finished_at, timing, error))
            if request is not None:
                request.update_timing, request.update_error = timing, error
                request.update_done.set()
                request._wake()
            with self._cond:
                self._active = None
                self._pending -= 1
                self._cond.notify_all()
            self.engine._wake()

        job = UpdateJob(self._stm, interaction, done, started=started, ready=ready)
        self.engine.updater.submit(job)

    def _abandon(self, request: TurnRequest) -> None:
        """``request`` ended without an update (cancelled while queued, or the decoder failed)."""
        with self._cond:
            if self._active is request:  # a queued turn must not release an earlier one
                self._active = None
            self._pending -= 1
            self._cond.notify_all()

    def _notify(self, event: UpdateEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a UI callback must never break the update worker
                log.exception("memory-update listener failed")

    def _error_message(self) -> str:
        return (
            f"conversation {self.id}: memory update failed ({self._error}); "
            "its memory is at the last committed turn — call reset() or load_state()"
        )

    def __repr__(self) -> str:
        return f"Conversation(id={self.id[:8]}, turns={self.turns}, updating={self.updating})"
