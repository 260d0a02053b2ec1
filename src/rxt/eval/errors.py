"""What the wrong recall answers are: a breakdown of probe errors by what was answered instead.

``rxt eval`` adds it to every system's entry (``"errors"``), so a diagnosis of recall errors in
the docs can be reproduced with one command. Each probe whose greedy reply is not an exact
match (:func:`rxt.eval.recall.exact_match`) is counted in exactly one class:

- ``same_pool_absent``: another value of the probe's own pool (a dog's name for a dog's name)
  that occurs nowhere in the dialogue: the model knew *what kind* of answer, not *which*;
- ``same_pool_in_dialogue``: a value of the right pool said elsewhere in the dialogue (e.g. the
  cat's name for the dog's): a binding error;
- ``other_pool``: a value of another kind's pool;
- ``not_a_value``: anything else (several words, a fragment, an empty reply): "malformed" in
  the summaries of ``rxt eval`` and the demo report.

Also counted over the wrong answers:

- ``first_wrong_token``: a histogram (``{"0": n, "1": n, ...}``, indices as str) of the index of
  the first answer token where the reply, re-encoded by the tokenizer (``tokenizer.encode``),
  differs from the gold answer's tokens; where one is a prefix of the other, the index is the
  prefix's length (the reply stopped early, or ran on past the gold's end). "0" means the very
  first answer token was already wrong; ``wrong_first_token`` is that count;
- ``within_edit_1`` (character edit distance ≤ 1 to the gold value), and the mean edit distance
  to the gold value beside the mean over the gold's pool (every other value of the pool): a
  "near miss" explanation needs the first to be clearly below the second.

Per probe kind (``by_kind``, sorted by kind): its ``probes``, its ``wrong`` answers and their
four class counts, to tell a kind the model never learnt from a general memory failure.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from rxt.data.dialogue import Dialogue
from rxt.data.probes import fact_kinds, value_pool
from rxt.eval.recall import exact_match
from rxt.tokenizer import RxTTokenizer

__all__ = ["ERROR_CLASSES", "edit_distance", "first_difference", "recall_errors"]

ERROR_CLASSES = ("same_pool_absent", "same_pool_in_dialogue", "other_pool", "not_a_value")
_KIND_FIELDS = ("probes", "wrong", *ERROR_CLASSES)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first index where ``a`` and ``b`` differ; the shorter length if one is a prefix of
    the other (so equal sequences give their length)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # lengths may differ
        if x != y:
            return i
    return min(len(a), len(b))


def _occurs(value: str, dialogue: Dialogue) -> bool:
    word = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")
    return any(word.search(t.query) or word.search(t.answer) for t in dialogue.turns)


def _classify(reply: str, kind: str, dialogue: Dialogue, pools: dict[str, set[str]]) -> str:
    if reply in pools[kind]:
        return "same_pool_in_dialogue" if _occurs(reply, dialogue) else "same_pool_absent"
    if any(reply in pool for other, pool in pools.items() if other != kind):
        return "other_pool"
    return "not_a_value"


def recall_errors(
    dialogues: Sequence[Dialogue], replies: Sequence[Sequence[str]], tokenizer: RxTTokenizer
) -> dict[str, Any]:
    """The breakdown of the module docstring. ``replies[i][t]`` is the reply to turn t of
    dialogue i (``RecallReport.replies``). Probes of unknown kinds count as ``not_a_value``
    unless matched exactly."""
    if len(replies) != len(dialogues):
        raise ValueError(f"replies: {len(replies)} dialogues, expected {len(dialogues)}")
    pools = {kind: set(value_pool(kind)) for kind in fact_kinds()}
    counts = dict.fromkeys(ERROR_CLASSES, 0)
    by_kind: dict[str, dict[str, int]] = {}
    first_wrong: Counter[int] = Counter()
    probes = within_1 = 0
    distances: list[int] = []
    pool_distances: list[float] = []
    for dialogue, dialogue_replies in zip(dialogues, replies, strict=True):
        for probe in dialogue.probes:
            probes += 1
            kind = by_kind.setdefault(probe.kind, dict.fromkeys(_KIND_FIELDS, 0))
            kind["probes"] += 1
            reply, gold = dialogue_replies[probe.turn], probe.answer.strip()
            if exact_match(reply, gold):
                continue
            pool = pools.get(probe.kind, set())
            error = _classify(reply, probe.kind, dialogue, pools) if pool else "not_a_value"
            counts[error] += 1
            kind["wrong"] += 1
            kind[error] += 1
            first_wrong[first_difference(tokenizer.encode(reply), tokenizer.encode(gold))] += 1
            distance = edit_distance(reply, gold)
            distances.append(distance)
            within_1 += distance <= 1
            others = [edit_distance(v, gold) for v in pool if v != gold]
            if others:
                pool_distances.append(fmean(others))
    wrong = len(distances)
    return {
        "probes": probes,
        "wrong": wrong,
        **counts,
        "wrong_first_token": first_wrong[0],
        "first_wrong_token": {str(k): first_wrong[k] for k in sorted(first_wrong)},
        "within_edit_1": within_1,
        "mean_edit_distance": round(fmean(distances), 3) if distances else None,
        "mean_edit_distance_same_pool": round(fmean(pool_distances), 3) if pool_distances else None,
        "by_kind": dict(sorted(by_kind.items())),
    }
