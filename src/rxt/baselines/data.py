"""What a stateless baseline reads: dialogue order, training sequences, scored rows, prompts.

Two modes, both trained and scored on exactly the tokens RxT is (every turn's answer tokens and
its closing ``[EOS]``, the tokenizer's ``loss_mask``):

- ``"full"``: a dialogue is one sequence, ``[system] I_1 I_2 ... I_N`` with
  ``I_t = [BOS][Q] q_t [A] a_t [EOS]`` (:meth:`RxTTokenizer.encode_interaction`) and the system
  prompt, if any, as :meth:`RxTTokenizer.encode_system`. This is the usual stateless chat model:
  every answer is conditioned on the whole gold history.
- ``"current"``: every interaction is its own sequence ``I_t``; no history and no system prompt
  (RxT's ``memory="off"`` ablation also reads a fresh memory, before any system prompt).

Context limit (``max_len``): the history keeps the system prompt and the most recent *whole*
turns that fit; older turns are dropped, never cut in half. The current turn (with the system
prompt, in ``"full"`` mode) must fit by itself, else ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rxt.data.dialogue import Dialogue
from rxt.tokenizer import EncodedInteraction, RxTTokenizer

__all__ = [
    "MODES",
    "EncodedSequence",
    "Mode",
    "full_sequence",
    "history_start",
    "reply_prompts",
    "scored_rows",
]

Mode = Literal["full", "current"]
MODES: tuple[str, ...] = ("full", "current")


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


@dataclass(frozen=True)
class EncodedSequence:
    """One row: ``input_ids`` and ``loss_mask`` (1 = scored), and the turns it holds:
    ``turns[k]`` is the turn index of the k-th interaction in it (the system prompt, if present,
    precedes them)."""

    input_ids: list[int]
    loss_mask: list[int]
    turns: tuple[int, ...]


def encode_turns(
    tokenizer: RxTTokenizer, dialogue: Dialogue, limit: int | None = None
) -> list[EncodedInteraction]:
    """Every turn as ``encode_interaction(q, a)``; errors name the dialogue and turn."""
    out = []
    for t, turn in enumerate(dialogue.turns):
        try:
            out.append(tokenizer.encode_interaction(turn.query, turn.answer, limit))
        except ValueError as err:
            raise ValueError(f"dialogue {dialogue.id!r} turn {t}: {err}") from None
    return out


def history_start(lengths: Sequence[int], end: int, budget: int | None) -> int:
    """The first turn kept when turns ``[s, end)`` must fit in ``budget`` tokens: the smallest
    ``s`` with ``sum(lengths[s:end]) <= budget`` (``end`` when not even turn ``end - 1`` fits).
    ``budget=None``: no limit, 0."""
    if budget is None:
        return 0
    start, total = end, 0
    while start > 0 and total + lengths[start - 1] <= budget:
        start -= 1
        total += lengths[start]
    return start


def _system(tokenizer: RxTTokenizer, dialogue: Dialogue) -> list[int]:
    return [] if dialogue.system is None else tokenizer.encode_system(dialogue.system)


def _concat(
    system: list[int], turns: Sequence[EncodedInteraction], first: int, scored: range
) -> EncodedSequence:
    ids, mask = list(system), [0] * len(system)
    for k, enc in enumerate(turns):
        ids += enc.input_ids
        mask += enc.loss_mask if first + k in scored else [0] * len(enc.loss_mask)
    return EncodedSequence(ids, mask, tuple(range(first, first + len(turns))))


def _too_long(dialogue: Dialogue, t: int, need: int, max_len: int) -> ValueError:
    return ValueError(
        f"dialogue {dialogue.id!r} turn {t}: needs {need} tokens with no history, "
        f"exceeding max_len={max_len}"
    )


def full_sequence(
    tokenizer: RxTTokenizer, dialogue: Dialogue, max_len: int | None = None
) -> EncodedSequence:
    """The whole dialogue as one training sequence, every answer scored. Over ``max_len``: the
    system prompt and the most recent turns that fit (the dropped turns' answers are not
    trained on; ``len(turns)`` tells how many were kept)."""
    encoded = encode_turns(tokenizer, dialogue)
    system = _system(tokenizer, dialogue)
    n = len(encoded)
    budget = None if max_len is None else max_len - len(system)
    first = history_start([len(e.input_ids) for e in encoded], n, budget)
    if first == n:
        raise _too_long(dialogue, n - 1, len(system) + len(encoded[-1].input_ids), max_len)
    return _concat(system, encoded[first:], first, range(first, n))


def scored_rows(
    tokenizer: RxTTokenizer, dialogue: Dialogue, mode: Mode, max_len: int | None = None
) -> list[EncodedSequence]:
    """Rows that score every turn's answer once, each turn with the gold history ``mode`` gives.

    ``"current"``: one row per interaction. ``"full"``: turn ``t`` reads the system prompt and
    turns ``[s_t, t)``, ``s_t`` the earliest start that fits ``max_len``
    (:func:`history_start`). Turns sharing a start share a row (causal attention: a prefix's
    scores do not depend on what follows), so a dialogue that fits is one row, equal to
    :func:`full_sequence`.
    """
    check_mode(mode)
    encoded = encode_turns(tokenizer, dialogue)
    if mode == "current":
        rows = []
        for t, enc in enumerate(encoded):
            if max_len is not None and len(enc.input_ids) > max_len:
                raise _too_long(dialogue, t, len(enc.input_ids), max_len)
            rows.append(EncodedSequence(enc.input_ids, enc.loss_mask, (t,)))
        return rows
    system = _system(tokenizer, dialogue)
    lengths = [len(e.input_ids) for e in encoded]
    budget = None if max_len is None else max_len - len(system)
    starts = []
    for t in range(len(encoded)):
        s = history_start(lengths, t + 1, budget)
        if s > t:
            raise _too_long(dialogue, t, len(system) + lengths[t], max_len)
        starts.append(s)
    rows = []
    t = 0
    while t < len(encoded):
        end = t
        while end + 1 < len(encoded) and starts[end + 1] == starts[t]:
            end += 1
        s = starts[t]
        rows.append(_concat(system, encoded[s : end + 1], s, range(t, end + 1)))
        t = end + 1
    return rows


def reply_prompts(
    tokenizer: RxTTokenizer,
    dialogue: Dialogue,
    mode: Mode,
    turns: Sequence[int] | None = None,
    *,
    max_len: int | None = None,
    max_new_tokens: int = 0,
) -> list[list[int]]:
    """The generation prompt of each of ``turns`` (default: all): ``[BOS][Q] q_t [A]``
    (:meth:`RxTTokenizer.encode_query`), preceded in ``"full"`` mode by the system prompt and
    the gold turns ``[s, t)``, ``s`` the earliest start that leaves room for ``max_new_tokens``
    within ``max_len``."""
    check_mode(mode)
    turns = range(len(dialogue.turns)) if turns is None else turns
    if mode == "full":
        system = _system(tokenizer, dialogue)
        encoded = encode_turns(tokenizer, dialogue)
        lengths = [len(e.input_ids) for e in encoded]
    prompts = []
    for t in turns:
        query = tokenizer.encode_query(dialogue.turns[t].query)
        history: list[int] = []
        if mode == "full":
            history = list(system)
            budget = None
            if max_len is not None:
                budget = max_len - len(system) - len(query) - max_new_tokens
            s = t if budget is not None and budget < 0 else history_start(lengths, t, budget)
            for enc in encoded[s:t]:
                history += enc.input_ids
        if max_len is not None and len(history) + len(query) + max_new_tokens > max_len:
            raise _too_long(dialogue, t, len(history) + len(query) + max_new_tokens, max_len)
        prompts.append(history + query)
    return prompts
