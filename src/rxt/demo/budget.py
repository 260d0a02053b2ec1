"""How many SMAT steps fit the demo's time budget: measure, then choose.

``rxt demo`` promises to finish within a time budget on two cores, and to train RxT and both
baselines for as many steps as that budget allows (the same number for all three, on the same
dialogues). Machines differ by more than two to one in speed (the same plan took 6.5 min on one
2-core Xeon and 13-18 min on 2-core AMD EPYC hosts), so a fixed step count either wastes the
budget or overruns it. The demo therefore runs in two phases:

1. Every stage whose length is fixed (stages 1-3, the three two-turn warm-ups) and one short
   timing run of each main stage (``calibrate-*`` in the recipe: the stage itself, from the same
   model, for ``calibration_steps`` steps, with the other core busy as it will be).
2. :func:`choose_steps` reads the timing runs' logs (:func:`seconds_per_step`), predicts the rest
   of the run for a step count (:func:`predicted_seconds`: the main stages on the workers in the
   order the scheduler gives them out, then the evaluations), and picks the largest count whose
   prediction ends within the budget. The recipe is rewritten with it and phase 2 runs.

The prediction's constants were measured on the 2-core Xeon of 2026-12-04 (``docs/training.md``,
"The demo's time budget"): a main job's start, learning-curve evaluations and save cost about
``JOB_OVERHEAD_STEPS`` of its own steps, and what follows training (the final evaluations,
latency, report) about ``TAIL_STEPS`` steps of the slowest main stage. Both scale with the
machine's speed because they are counted in its measured steps.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "JOB_OVERHEAD_STEPS",
    "TAIL_STEPS",
    "BudgetChoice",
    "choose_steps",
    "predicted_seconds",
    "seconds_per_step",
]

JOB_OVERHEAD_STEPS = 80
TAIL_STEPS = 250
STEP_GRAIN = 50  # chosen counts are multiples of this (when above the minimum)


@dataclass(frozen=True)
class BudgetChoice:
    steps: int  # SMAT steps of every main stage
    fits: bool  # False: even the minimum is predicted to overrun the budget
    predicted_total_s: float  # the whole demo, as predicted when choosing
    per_step_s: dict[str, float]  # measured, per main stage

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "fits": self.fits,
            "predicted_total_s": round(self.predicted_total_s, 1),
            "per_step_s": {k: round(v, 4) for k, v in self.per_step_s.items()},
        }


def seconds_per_step(log_jsonl: Path) -> float:
    """Median training seconds per step over the log windows after the first (which holds
    start-up). A window's seconds are its ``tokens / tokens_per_s``, exactly as the loop timed
    them (evaluation excluded)."""
    try:
        entries = [json.loads(line) for line in log_jsonl.read_text("utf-8").splitlines() if line]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{log_jsonl}: cannot read the timing run's log ({exc})") from None
    per_step, previous = [], 0
    for entry in entries:
        steps = entry["step"] - previous
        previous = entry["step"]
        if steps > 0 and entry.get("tokens_per_s"):
            per_step.append(entry["tokens"] / entry["tokens_per_s"] / steps)
    if len(per_step) < 2:
        raise ValueError(f"{log_jsonl}: {len(per_step)} timed log window(s); need 2 or more")
    return statistics.median(per_step[1:])


def predicted_seconds(
    steps: int, per_step: Mapping[str, float], order: Sequence[str], workers: int
) -> float:
    """Seconds from now until the demo ends if every main stage trains ``steps`` steps: the
    stages in ``order`` on ``workers`` workers, each taken by the first free one (as
    :func:`rxt.demo.jobs.run_tasks` hands them out), then the evaluations and the rest."""
    free = [0.0] * max(workers, 1)
    for name in order:
        first = free.index(min(free))
        free[first] += (steps + JOB_OVERHEAD_STEPS) * per_step[name]
    return max(free) + TAIL_STEPS * max(per_step.values())


def choose_steps(
    budget_s: float,
    elapsed_s: float,
    per_step: Mapping[str, float],
    order: Sequence[str],
    workers: int,
    low: int,
    high: int,
) -> BudgetChoice:
    """The largest step count in ``[low, high]`` (a multiple of :data:`STEP_GRAIN` above
    ``low``) whose predicted end, ``elapsed_s`` from now, is within ``budget_s``; ``low`` with
    ``fits=False`` if none is."""
    if low < 1 or high < low:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")

    def total(steps: int) -> float:
        return elapsed_s + predicted_seconds(steps, per_step, order, workers)

    best = low
    candidates = range(high - high % STEP_GRAIN, low, -STEP_GRAIN)
    for steps in (high, *candidates):
        if steps > low and total(steps) <= budget_s:
            best = steps
            break
    return BudgetChoice(
        steps=best,
        fits=total(best) <= budget_s,
        predicted_total_s=total(best),
        per_step_s=dict(per_step),
    )
