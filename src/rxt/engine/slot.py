"""A conversation's place in the engine: its committed memory and the work it has in flight.

The scheduler sees a conversation only through its :class:`ConversationSlot`, and the
conversation reaches its engine only through the slot's :class:`EngineLink`, so neither side
depends on the other's internals. Three threads meet in a slot:

- the caller's thread (``Conversation.send``/``absorb``/``wait``/``reset``...): :meth:`reserve`,
  :meth:`submit`, :meth:`replay`, :meth:`wait_idle`, :meth:`restore`;
- the scheduler thread: :meth:`admit`, :attr:`busy`, :attr:`stm`, :meth:`commit`,
  :meth:`abandon`;
- the memory-update thread: the callback :meth:`commit` and :meth:`replay` hand to the updater.

``cond`` guards ``pending`` and ``submitted``; a finished update writes ``stm``, ``turns``,
``error``, ``last_update`` and ``committed_at`` under it, and ``active`` is cleared (or set to
:data:`REPLAYING`) under it. The scheduler sets ``active`` to a turn under the *engine's* lock
alone, and reads ``active``, ``error``, ``committed_at`` and ``stm`` without ``cond``: a
finished update clears ``active`` and then calls :attr:`EngineLink.wake`, and :meth:`abandon`
runs on the scheduler thread itself, so a stale read only defers a turn to the next admission
pass.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rxt.engine.updater import MemoryUpdater, UpdateJob, UpdateTiming

if TYPE_CHECKING:
    import torch

    from rxt.engine.stream import TurnRequest


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


class Replaying(enum.Enum):
    """The type of :data:`REPLAYING`: what ``ConversationSlot.active`` holds while an absorbed
    turn's update runs — memory work in flight with no turn being decoded."""

    REPLAYING = "replaying"


REPLAYING = Replaying.REPLAYING


@dataclass(frozen=True)
class EngineLink:
    """Everything a slot may ask of its engine; the engine builds one from its own methods."""

    submit: Callable[[TurnRequest], None]
    """Queue a turn for admission (caller thread; takes the engine's lock; RuntimeError once
    the engine is closed)."""
    wake: Callable[[], None]
    """Run admission again (any thread; takes the engine's lock)."""
    updater: MemoryUpdater


class ConversationSlot:
    """One conversation's memory and in-flight work, shared by its caller and the engine."""

    def __init__(
        self,
        link: EngineLink,
        conversation_id: str,
        stm: torch.Tensor,
        *,
        turns: int = 0,
        notify: UpdateListener,
    ) -> None:
        self.link = link
        self.conversation_id = conversation_id
        self.notify = notify  # tells the conversation's listeners; must not raise
        self.cond = threading.Condition()
        self.pending = 0  # turns (and system-prompt updates) not yet committed
        self.active: TurnRequest | Replaying | None = None  # being answered or updated
        self.committed_at = 0.0
        self.error: BaseException | None = None
        self.submitted = turns
        self.turns = turns  # committed turns
        self.last_update: UpdateTiming | None = None
        self.stm = stm  # replaced, never modified in place, when an update commits

    def error_message(self) -> str:
        return (
            f"conversation {self.conversation_id}: memory update failed ({self.error}); "
            "its memory is at the last committed turn — call reset() or load_state()"
        )

    # ------------------------------------------------------------------ caller thread
    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until nothing is pending (takes ``cond``); TimeoutError after ``timeout``."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.pending == 0, timeout):
                raise TimeoutError(
                    f"conversation {self.conversation_id} still busy after {timeout} s"
                )

    def restore(self, stm: torch.Tensor, turns: int) -> None:
        """Replace the memory and clear the error (``reset``/``load_state``). No lock: called
        only after :meth:`wait_idle`, when no other thread writes the slot."""
        self.stm, self.error = stm, None
        self.turns = self.submitted = turns

    def reserve(self) -> int:
        """Count a new turn as pending and return its number (takes ``cond``)."""
        with self.cond:
            self.pending += 1
            self.submitted += 1
            return self.submitted

    def submit(self, request: TurnRequest) -> None:
        """Queue the turn :meth:`reserve` numbered; if the engine refuses it, undo the
        reservation (takes ``cond``) and re-raise."""
        try:
            self.link.submit(request)
        except BaseException:
            with self.cond:
                self.pending -= 1
                self.submitted -= 1
                self.cond.notify_all()
            raise

    def replay(self, interaction: list[int], turn: int | None = None) -> None:
        """Update the memory with a turn that was not decoded here (``turn`` None: the next
        turn number; 0: a system prompt). The caller has waited for the slot to be idle; marks
        it :data:`REPLAYING` under ``cond`` so no queued turn is admitted before it commits."""
        with self.cond:
            self.pending += 1
            self.active = REPLAYING
            if turn is None:
                self.submitted += 1
                turn = self.submitted
        self._update(interaction, turn, None, None)

    # ------------------------------------------------------------------ scheduler thread
    @property
    def busy(self) -> bool:
        """A turn or replay of this conversation is in flight (read under the engine's lock)."""
        return self.active is not None

    def admit(self, request: TurnRequest) -> None:
        """Make ``request`` the turn in flight (under the engine's lock, on a slot not busy)."""
        self.active = request
        request.blocked_until = self.committed_at

    def commit(
        self,
        request: TurnRequest,
        interaction: list[int],
        ready: torch.cuda.Event | None = None,
    ) -> None:
        """Queue the memory update that commits ``request``'s answered ``interaction``; it runs
        on the update thread after the CUDA event ``ready`` (no lock held by the caller)."""
        self._update(interaction, request.turn, request, ready)

    def abandon(self, request: TurnRequest) -> None:
        """``request`` ended without an update (cancelled while queued, the conversation had
        failed, or the decoder failed). Scheduler thread, with or without the engine's lock;
        takes ``cond``."""
        with self.cond:
            if self.active is request:  # a queued turn must not release an earlier one
                self.active = None
            self.pending -= 1
            self.cond.notify_all()

    # -------------------------------------------------- the update (callbacks: update thread)
    def _update(
        self,
        interaction: list[int],
        turn: int,
        request: TurnRequest | None,
        ready: torch.cuda.Event | None,
    ) -> None:
        def started() -> None:
            self.notify(UpdateEvent("started", self.conversation_id, turn, time.perf_counter()))

        def done(stm_next, error, timing: UpdateTiming) -> None:
            with self.cond:
                if error is None:
                    self.stm = stm_next
                    self.turns = max(self.turns, turn)
                else:
                    self.error = error
                self.last_update = timing
                self.committed_at = timing.finished_at
            # Listeners hear of the update before anyone waiting on it is released, so a UI
            # has printed "updated" by the time the next turn can start.
            kind = "finished" if error is None else "failed"
            at = timing.finished_at
            self.notify(UpdateEvent(kind, self.conversation_id, turn, at, timing, error))
            if request is not None:
                request.end_update(timing, error)
            with self.cond:
                self.active = None
                self.pending -= 1
                self.cond.notify_all()
            self.link.wake()

        job = UpdateJob(self.stm, interaction, done, started=started, ready=ready)
        self.link.updater.submit(job)
