"""The order in which a training stage visits its examples, as a pure function of the position.

Position ``p`` of the stream holds example ``perm_e[p % n]`` of epoch ``e = p // n``, where
``perm_e`` is ``range(n)`` shuffled by ``random.Random(f"{tag}:{seed}:{e}")``. Because a batch is
a function of its index alone, a resumed run continues from the saved step with no iterator state,
and two stages with the same tag and seed (SMAT and the stateless baselines) see the same
examples at every step.

:func:`length_groups` splits a batch's rows into runs of similar length, the same way for SMAT
and the stateless baselines.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from rxt.data.dialogue import Dialogue

__all__ = ["DialogueRows", "DialogueStream", "EpochOrder", "length_groups"]


class EpochOrder:
    def __init__(self, n: int, seed: int = 0, tag: str = "smat") -> None:
        if n < 1:
            raise ValueError(f"need at least one example, got {n}")
        self.n, self.seed, self.tag = n, seed, tag
        self._perms: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"{self.tag}:{self.seed}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # batches move forward: keep only the current epoch
        return self._perms[epoch]

    def batch(self, index: int, batch_size: int) -> list[tuple[int, int]]:
        """``(stream position, example index)`` of batch ``index``, in stream order."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        positions = range(index * batch_size, (index + 1) * batch_size)
        return [(p, self.permutation(p // self.n)[p % self.n]) for p in positions]


@dataclass(frozen=True)
class DialogueRows:
    """One batch of dialogues laid out for turn-by-turn training.

    - ``chosen``: ``(stream position, dialogue index)``, sorted longest dialogue first (stable:
      ties keep stream order), so the dialogues still active at turn t form a prefix;
    - ``dialogues``: those dialogues, in that order;
    - ``active[t]``: how many of them have more than t turns (non-increasing);
    - ``pairs``: ``(query, answer)`` of every turn, turn-major: turn t's rows are dialogues
      ``0..active[t]-1``.
    """

    chosen: list[tuple[int, int]]
    dialogues: list[Dialogue]
    active: list[int]
    pairs: list[tuple[str, str]]


class DialogueStream:
    """Checked dialogues and their :class:`EpochOrder`: the data side shared by every stage
    that trains on whole dialogues (stage 3, SMAT, the stateless baselines)."""

    def __init__(self, dialogues: Sequence[Dialogue], seed: int, tag: str, what: str) -> None:
        self.dialogues = list(dialogues)
        if not self.dialogues:
            raise ValueError(f"{what} needs at least one dialogue")
        for k, d in enumerate(self.dialogues):
            if not isinstance(d, Dialogue):
                raise TypeError(f"dialogues[{k}] must be a Dialogue, got {type(d).__name__}")
        self.order = EpochOrder(len(self.dialogues), seed, tag=tag)

    def rows(self, index: int, batch_size: int) -> DialogueRows:
        chosen = self.order.batch(index, batch_size)
        chosen.sort(key=lambda pi: -len(self.dialogues[pi[1]].turns))
        dialogues = [self.dialogues[i] for _, i in chosen]
        most = len(dialogues[0].turns)
        active = [sum(len(d.turns) > t for d in dialogues) for t in range(most)]
        pairs = [
            (d.turns[t].query, d.turns[t].answer)
            for t in range(most)
            for d in dialogues[: active[t]]
        ]
        return DialogueRows(chosen, dialogues, active, pairs)


def length_groups(lengths: Sequence[int], groups: int) -> list[tuple[list[int], int]]:
    """``lengths`` split into at most ``groups`` runs of rows of similar length (sorted, equal
    counts): ``[(rows, longest), ...]``; one group keeps the rows in order."""
    if groups <= 1:  # one pass, rows in their own order
        return [(list(range(len(lengths))), max(lengths))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = -(-len(order) // max(1, groups))
    runs = [order[s : s + size] for s in range(0, len(order), size)]
    return [(rows, max(lengths[r] for r in rows)) for rows in runs]
