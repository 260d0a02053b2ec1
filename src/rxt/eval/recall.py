"""Teacher-forced evaluation on held-out dialogues: memory recall by distance, perplexity, accuracy.

For each dialogue, turn by turn, the model reads an STM and

- scores the gold interaction ``[BOS][Q] query [A] answer [EOS]`` teacher forced: the NLL and
  next-token argmax accuracy of the answer tokens and the closing ``[EOS]`` (the tokenizer's
  ``loss_mask``), over every turn;
- at a probe's turn, also *generates* greedily from the prompt ``[BOS][Q] query [A]`` (up to
  ``max_new_tokens``, stopping at ``[EOS]``) and scores an exact match of the decoded text
  (whitespace stripped) with ``Probe.answer``, pooled by distance and by ``Probe.kind``;

and the memory then follows the **gold** history, ``STM_t = update_memory(STM_{t-1}, gold
interaction)``, so a wrong answer never derails later turns. Which STM a turn reads is the
``memory`` mode:

- ``"on"``: the dialogue's own ``STM_{t-1}``. STM_0 is ``model.initial_stm(1, generator=
  torch.Generator().manual_seed(seed + i))`` for the i-th dialogue, updated with
  ``tokenizer.encode_system(system)`` first when the dialogue has a system prompt.
- ``"off"``: a fresh STM_0 at every turn (the same seeded draw, before any system prompt): the
  memory is switched off, so recall of a trained model should fall to ``chance``.
- ``"swapped"``: the memory of a *different* dialogue j after the same number of turns,
  ``STM^j_{min(t, len_j)}`` for turn t (0-based), from the donor rule of :func:`donor`: the next
  dialogue in list order (cyclically) with at least t turns, or, when no other dialogue is that
  long, the first longest other one at its final memory. The rule depends on the list only, not
  on batching. Tests whether answers really come from this dialogue's own memory.

Dialogues are processed ``batch_size`` at a time and turn by turn: interactions right-padded with
attention masks, rows leaving the batch as their dialogue ends. Probe answers are generated for
all of a turn's probe rows at once: prompts left-padded with an attention mask, memory K/V
projected once, one KV cache, one cached step per token until every row has emitted ``[EOS]``
(:func:`rxt.engine.greedy.greedy_batch`, equal to :func:`rxt.engine.greedy.greedy_answer` row by
row). Results equal those of ``batch_size=1`` up to floating-point summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from rxt.data.dialogue import Dialogue, Probe
from rxt.engine.greedy import greedy_batch
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import EncodedInteraction, RxTTokenizer, pad_sequences

__all__ = [
    "MemoryMode",
    "ProbeTally",
    "RecallReport",
    "check_eval_args",
    "donor",
    "evaluate_dialogues",
    "exact_match",
]

MemoryMode = Literal["on", "off", "swapped"]
_MODES = ("on", "off", "swapped")


@dataclass
class RecallReport:
    """Scores of :func:`evaluate_dialogues`.

    - ``recall_by_distance``: distance → exact-match rate of the probe answers (sorted by
      distance; only distances present); ``probes_by_distance``: distance → probe count;
    - ``recall_by_kind``, ``probes_by_kind``: the same by ``Probe.kind`` (sorted by name);
    - ``recall``: exact-match rate over all probes; ``chance``: mean ``Probe.chance`` of those
      probes (both NaN when there are no probes);
    - ``perplexity``: ``exp`` of the mean NLL of every turn's answer tokens (+ ``[EOS]``),
      teacher forced; ``accuracy``: next-token argmax accuracy on the same tokens;
    - ``replies``: with ``replies=True``, the greedy reply to every turn (``replies[i][t]``,
      decoded and stripped), generated from the same STM the turn reads; for the reward.
    """

    recall_by_distance: dict[int, float]
    probes_by_distance: dict[int, int]
    recall: float
    chance: float
    perplexity: float
    accuracy: float
    replies: list[list[str]] | None = None
    # Defaults (after `replies`) keep older keyword constructions of the report valid.
    recall_by_kind: dict[str, float] = field(default_factory=dict)
    probes_by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (copies of the per-distance dicts; ``json.dumps`` turns keys into str)."""
        return asdict(self)


def exact_match(reply: str, gold: str) -> bool:
    """The one recall rule: the reply equals the gold answer, both stripped of surrounding
    whitespace; case and punctuation count."""
    return reply.strip() == gold.strip()


def donor(lengths: Sequence[int], i: int, t: int) -> tuple[int, int]:
    """The ``"swapped"`` memory source for dialogue ``i`` at turn ``t`` (0-based).

    ``lengths`` are the dialogues' turn counts. Returns ``(j, s)``: read dialogue j's memory
    after its first ``s`` turns. j is the first of i+1, i+2, ... (cyclically, never i) with
    ``lengths[j] >= t`` and s = t; if no other dialogue has t turns, j is the first longest other
    dialogue and s its length (its final memory).
    """
    n = len(lengths)
    if n < 2:
        raise ValueError("memory='swapped' needs at least 2 dialogues")
    others = [(i + k) % n for k in range(1, n)]
    for j in others:
        if lengths[j] >= t:
            return j, t
    j = max(others, key=lambda k: lengths[k])  # max keeps the first of equal lengths
    return j, lengths[j]


class ProbeTally:
    """Exact-match counts of scored probes, by distance and by kind.

    Every evaluator (RxT here, the stateless baselines in :mod:`rxt.eval.stateless`) scores
    its replies through this one class, so their reports agree in form and in rule."""

    def __init__(self) -> None:
        self.hits: dict[int, int] = {}
        self.probes: dict[int, int] = {}
        self.kind_hits: dict[str, int] = {}
        self.kind_probes: dict[str, int] = {}
        self.chance = 0.0

    def add(self, probe: Probe, reply: str) -> None:
        """Score ``reply`` (decoded text) against ``probe`` by :func:`exact_match`."""
        hit = int(exact_match(reply, probe.answer))
        for hits, probes, key in (
            (self.hits, self.probes, probe.distance),
            (self.kind_hits, self.kind_probes, probe.kind),
        ):
            hits[key] = hits.get(key, 0) + hit
            probes[key] = probes.get(key, 0) + 1
        self.chance += probe.chance

    def scores(self) -> dict[str, Any]:
        """The recall fields of :class:`RecallReport` (rates, counts, recall, chance)."""
        count = sum(self.probes.values())
        nan = float("nan")
        return {
            "recall_by_distance": _rates(self.hits, self.probes),
            "probes_by_distance": dict(sorted(self.probes.items())),
            "recall_by_kind": _rates(self.kind_hits, self.kind_probes),
            "probes_by_kind": dict(sorted(self.kind_probes.items())),
            "recall": sum(self.hits.values()) / count if count else nan,
            "chance": self.chance / count if count else nan,
        }


def _rates(hits: dict, probes: dict) -> dict:
    return {k: hits.get(k, 0) / probes[k] for k in sorted(probes)}


def _right_pad(seqs: Sequence[Sequence[int]], device: torch.device):
    ids, mask = pad_sequences(seqs)
    return ids.to(device), mask.to(device)


class _Totals:
    def __init__(self, device: torch.device) -> None:
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0
        self.probes = ProbeTally()
        self.replies: dict[tuple[int, int], str] = {}


def check_eval_args(tokenizer, dialogues, batch_size, max_new_tokens) -> list[Dialogue]:
    """The checks every system's evaluation shares (RxT here, the stateless baselines in
    :mod:`rxt.eval.stateless`); returns the dialogues as a list."""
    if not isinstance(tokenizer, RxTTokenizer):
        raise TypeError(f"tokenizer must be an RxTTokenizer, got {type(tokenizer).__name__}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dialogues = list(dialogues)
    if not dialogues:
        raise ValueError("no dialogues to evaluate")
    for k, d in enumerate(dialogues):
        if not isinstance(d, Dialogue):
            raise TypeError(f"dialogues[{k}] must be a Dialogue, got {type(d).__name__}")
    return dialogues


def _check(model, tokenizer, dialogues, memory, batch_size, max_new_tokens) -> list[Dialogue]:
    if not isinstance(model, ReactiveTransformer):
        raise TypeError(f"model must be a ReactiveTransformer, got {type(model).__name__}")
    if memory not in _MODES:
        raise ValueError(f"memory must be one of {', '.join(_MODES)}, got {memory!r}")
    dialogues = check_eval_args(tokenizer, dialogues, batch_size, max_new_tokens)
    if memory == "swapped" and len(dialogues) < 2:
        raise ValueError("memory='swapped' needs at least 2 dialogues")
    return dialogues


def evaluate_dialogues(
    model: ReactiveTransformer,
    tokenizer: RxTTokenizer,
    dialogues: Sequence[Dialogue],
    *,
    memory: MemoryMode = "on",
    batch_size: int = 32,
    max_new_tokens: int = 16,
    seed: int = 0,
    replies: bool = False,
) -> RecallReport:
    """Score ``dialogues`` teacher forced; see the module docstring for the exact protocol.

    Runs in eval mode under ``torch.inference_mode()`` on the model's device (the model's
    training flag is restored afterwards). Raises ``ValueError`` for an interaction longer than
    ``model.config.max_seq_len`` or a probe prompt that leaves no room for ``max_new_tokens``.
    """
    dialogues = _check(model, tokenizer, dialogues, memory, batch_size, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            totals = _Totals(model.device)
            lengths = [len(d.turns) for d in dialogues]
            for start in range(0, len(dialogues), batch_size):
                members = list(range(start, min(start + batch_size, len(dialogues))))
                _evaluate_batch(
                    model,
                    tokenizer,
                    dialogues,
                    lengths,
                    members,
                    memory,
                    seed,
                    max_new_tokens,
                    totals,
                    replies,
                )
    finally:
        model.train(was_training)

    mean_nll = totals.nll.item() / totals.tokens
    return RecallReport(
        **totals.probes.scores(),
        perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,
        accuracy=totals.correct.item() / totals.tokens,
        replies=[
            [totals.replies[i, t] for t in range(len(d.turns))] for i, d in enumerate(dialogues)
        ]
        if replies
        else None,
    )


def _evaluate_batch(
    model: ReactiveTransformer,
    tokenizer: RxTTokenizer,
    dialogues: list[Dialogue],
    lengths: list[int],
    members: list[int],
    memory: str,
    seed: int,
    max_new_tokens: int,
    totals: _Totals,
    replies: bool,
) -> None:
    device = model.device
    limit = model.config.max_seq_len

    # Which memory each (member, turn) reads: (dialogue, turns seen), or None for a fresh STM_0.
    reads: dict[tuple[int, int], tuple[int, int] | None] = {}
    for i in members:
        for t in range(lengths[i]):
            if memory == "on":
                reads[i, t] = (i, t)
            elif memory == "off":
                reads[i, t] = None
            else:
                reads[i, t] = donor(lengths, i, t)
    # Memory rows: every dialogue whose trajectory is read, up to the last state read.
    last: dict[int, int] = {}
    for source in reads.values():
        if source is not None:
            last[source[0]] = max(last.get(source[0], 0), source[1])
    rows = sorted(last)
    row_of = {j: r for r, j in enumerate(rows)}

    def interaction(j: int, t: int) -> EncodedInteraction:
        turn = dialogues[j].turns[t]
        try:
            return tokenizer.encode_interaction(turn.query, turn.answer, limit)
        except ValueError as err:
            raise ValueError(f"dialogue {dialogues[j].id!r} turn {t}: {err}") from None

    encoded = {j: [interaction(j, t) for t in range(lengths[j])] for j in {*members, *rows}}

    def stm0(indices: Sequence[int]) -> torch.Tensor:
        return torch.cat(
            [
                model.initial_stm(1, generator=torch.Generator().manual_seed(seed + j))
                for j in indices
            ]
        )

    fresh = stm0(members) if memory == "off" else None
    fresh_row = {i: r for r, i in enumerate(members)}
    stm = None
    if rows:
        stm = stm0(rows)
        with_system = [r for r, j in enumerate(rows) if dialogues[j].system is not None]
        if with_system:
            systems = [tokenizer.encode_system(dialogues[rows[r]].system) for r in with_system]
            ids, mask = _right_pad(systems, device)
            index = torch.tensor(with_system, device=device)
            stm[index] = model.update_memory(stm[index], ids, mask)

    for t in range(max(lengths[i] for i in members)):
        active = [i for i in members if lengths[i] > t]
        # Read: each active row's STM for this turn.
        if memory == "off":
            index = torch.tensor([fresh_row[i] for i in active], device=device)
            read = fresh[index]
        else:
            # STM rows hold exactly (t turns seen) here, or the final state of a shorter dialogue.
            index = torch.tensor([row_of[reads[i, t][0]] for i in active], device=device)
            read = stm[index]

        # Teacher-forced scores of the gold interactions.
        ids, mask = _right_pad([encoded[i][t].input_ids for i in active], device)
        loss, _ = _right_pad([encoded[i][t].loss_mask for i in active], device)
        logits = model.decode(ids, read, attention_mask=mask).float()
        targets = ids[:, 1:]
        scored = loss[:, 1:].bool()
        logp = logits[:, :-1].log_softmax(dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        correct = logits[:, :-1].argmax(dim=-1) == targets
        totals.nll += nll[scored].double().sum()
        totals.correct += correct[scored].double().sum()
        totals.tokens += sum(sum(encoded[i][t].loss_mask) for i in active)

        # Probes asked at this turn (every turn, with `replies`): generate from the query
        # prompt with the same STM.
        probe_rows = [
            r
            for r, i in enumerate(active)
            if replies or any(p.turn == t for p in dialogues[i].probes)
        ]
        if probe_rows:
            prompts = [
                tokenizer.encode_query(dialogues[active[r]].turns[t].query) for r in probe_rows
            ]
            index = torch.tensor(probe_rows, device=device)
            answers = greedy_batch(
                model, prompts, read[index], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id
            )
            for r, answer_ids in zip(probe_rows, answers, strict=True):
                text = tokenizer.decode(answer_ids).strip()
                totals.replies[active[r], t] = text
                for probe in dialogues[active[r]].probes:
                    if probe.turn == t:
                        totals.probes.add(probe, text)

        # Memory follows the gold history; only states that are read later are computed.
        update = [r for r, j in enumerate(rows) if t < last[j]]
        if update:
            ids, mask = _right_pad([encoded[rows[r]][t].input_ids for r in update], device)
            index = torch.tensor(update, device=device)
            stm[index] = model.update_memory(stm[index], ids, mask)
