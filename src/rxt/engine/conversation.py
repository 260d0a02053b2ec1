"""A conversation: its STM (the whole state between turns, paper §4) and the turns sent on it.

The conversation owns a value, not a model: ``stm`` is replaced — never modified in place — when
each turn's asynchronous memory update commits. Turns on one conversation are serialised: the
engine admits a turn only after the previous turn's update committed, so no turn ever reads a
stale memory, while other conversations keep decoding meanwhile.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rxt.engine.sampling import SamplingParams, make_generator
from rxt.engine.slot import ConversationSlot, EngineLink, UpdateEvent, UpdateListener
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.engine.stream import EngineError, TurnRequest, TurnResult, TurnStream
from rxt.engine.updater import UpdateTiming

if TYPE_CHECKING:
    from rxt.engine.engine import Engine

__all__ = ["Conversation", "UpdateEvent", "UpdateListener"]

log = logging.getLogger(__name__)


class Conversation:
    """Create with :meth:`Engine.conversation`; talk with :meth:`send` or :meth:`ask`."""

    def __init__(
        self,
        engine: Engine,
        link: EngineLink,
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
        self._generator = generator or self._new_generator(seed)
        stm = stm if stm is not None else self._fresh_stm()
        self._slot = ConversationSlot(link, self.id, stm, turns=turns, notify=self._notify)

    # ------------------------------------------------------------------ state
    @property
    def stm(self) -> torch.Tensor:
        """The committed STM (1, L, S, d) after every turn sent so far (waits for updates).

        Treat it as read-only: the engine never modifies it in place, and neither should you."""
        self.wait()
        return self._slot.stm

    @property
    def turns(self) -> int:
        """Turns committed to memory."""
        return self._slot.turns

    @property
    def last_update(self) -> UpdateTiming | None:
        """Timing of the last memory update that ended, or None."""
        return self._slot.last_update

    @property
    def updating(self) -> bool:
        """True while a turn or memory update of this conversation is in flight."""
        return self._slot.pending > 0

    @property
    def error(self) -> BaseException | None:
        """Why the last memory update failed, or None. While set, ``send`` and ``stm`` refuse;
        ``reset()`` or ``load_state()`` recover."""
        return self._slot.error

    def wait(self, timeout: float | None = None) -> None:
        """Block until every turn sent so far has been answered and committed to memory."""
        self._slot.wait_idle(timeout)
        if self._slot.error is not None:
            raise EngineError(self._slot.error_message())

    def fork(self) -> Conversation:
        """A new conversation continuing from this one's current memory (and sampling state)."""
        self.wait()
        generator = None
        if self._generator is not None:
            generator = torch.Generator(self._generator.device)
            generator.set_state(self._generator.get_state())
        return Conversation(
            self.engine,
            self._slot.link,
            system_prompt=self.system_prompt,
            seed=self.seed,
            stm=self._slot.stm,
            turns=self.turns,
            generator=generator,
        )

    def reset(self) -> None:
        """Forget every turn: back to STM_0 (and the system prompt, if one was given)."""
        self._slot.wait_idle()
        self._slot.restore(self._fresh_stm(), turns=0)
        if self.system_prompt:
            self.absorb_system(self.system_prompt)

    def export_state(self) -> bytes:
        """The committed STM as safetensors bytes, tagged with the model's fingerprint."""
        self.wait()
        meta = {"turns": str(self.turns), "conversation_id": self.id}
        return stm_to_bytes(self._slot.stm, fingerprint=self.engine.fingerprint, metadata=meta)

    def load_state(self, data: bytes, *, verify_checksum: bool = True) -> None:
        """Replace the memory with an exported state (refused if another model saved it).

        ``verify_checksum=False``: see :func:`~rxt.engine.state.stm_from_bytes` — only for
        bytes just verified otherwise (a store's whole-blob sha256)."""
        self._slot.wait_idle()
        model = self.engine.model
        stm, meta = stm_from_bytes(
            data,
            fingerprint=self.engine.fingerprint,
            shape=model.config.stm_shape,
            device=model.device,
            dtype=model.dtype,
            verify_checksum=verify_checksum,
        )
        turns = meta.get("turns", "0")
        self._slot.restore(stm, turns=int(turns) if turns.isdigit() else 0)

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
        if self._slot.error is not None:
            raise EngineError(self._slot.error_message())
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
        turn = self._slot.reserve()
        request = TurnRequest(self._slot, text, prompt, params, generator, turn)
        self._slot.submit(request)
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
        self._slot.replay(ids, turn)

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

    # ------------------------------------------------------------------ helpers
    def _new_generator(self, seed: int | None) -> torch.Generator:
        # Every conversation samples from its own generator, so a batch never couples rows.
        device = self.engine.model.device
        return torch.Generator(device).manual_seed(
            seed if seed is not None else secrets.randbits(63)
        )

    def _fresh_stm(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        return self.engine.model.initial_stm(1, generator=generator)

    def _notify(self, event: UpdateEvent) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a UI callback must never break the update worker
                log.exception("memory-update listener failed")

    def __repr__(self) -> str:
        return f"Conversation(id={self.id[:8]}, turns={self.turns}, updating={self.updating})"
