"""Learning curves: recall of a fixed set of probe dialogues, measured while a model trains.

:class:`RecallCurve` is an evaluator for :func:`rxt.training.loop.train` (``evaluator=``): every
``every`` steps the loop calls it in eval mode and logs its result to ``eval.jsonl``, so a
reader can see whether a system is still improving or has levelled off, and whether RxT
converges to the full-history baseline or stays below it. The same protocol as ``rxt eval``
(teacher forced on the gold history, greedy exact-match recall), without replies or reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from rxt.data.dialogue import Dialogue
from rxt.eval.recall import RecallReport, evaluate_dialogues
from rxt.tokenizer import RxTTokenizer

__all__ = ["RecallCurve"]


@dataclass
class RecallCurve:
    """``mode``: None for an RxT model (its own memory), ``"full"`` or ``"current"`` for a
    stateless baseline (:func:`rxt.eval.stateless.evaluate_stateless`)."""

    dialogues: Sequence[Dialogue]
    tokenizer: RxTTokenizer
    every: int
    mode: str | None = None
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if not any(d.probes for d in self.dialogues):
            raise ValueError("RecallCurve: the evaluation dialogues hold no probe")

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        report = self._report(model)
        return {
            "recall": report.recall,
            "recall_by_distance": {str(k): v for k, v in report.recall_by_distance.items()},
        }

    def _report(self, model: nn.Module) -> RecallReport:
        if self.mode is None:
            return evaluate_dialogues(
                model, self.tokenizer, self.dialogues, max_new_tokens=self.max_new_tokens
            )
        from rxt.eval.stateless import evaluate_stateless

        return evaluate_stateless(
            model, self.tokenizer, self.dialogues, self.mode, max_new_tokens=self.max_new_tokens
        )
