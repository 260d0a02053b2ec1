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
   prediction ends within the budget. With RxT's SMAT shorter than the two baselines
   together, the full-history baseline is cut in two so both workers end together
   (:func:`wrap_split`). The recipe is rewritten with it and phase 2 runs.

The prediction's constants were measured on the 2-core Xeon of 2026-12-04 (``docs/training.md``,
"The demo's time budget"): a main job's start, learning-curve evaluations and save cost about
``JOB_OVERHEAD_STEPS`` of its own steps, and what follows training (the final evaluations,
latency, report) about ``TAIL_STEPS`` steps of the slowest main stage. Both scale with the
machine's speed because they are counted in its measured steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rxt.demo.plan import CALIBRATION, SIZED, DemoPlan, sized_jobs

__all__ = [
    "JOB_OVERHEAD_STEPS",
    "TAIL_STEPS",
    "BudgetChoice",
    "Scheduled",
    "choose_steps",
    "fit_budget",
    "predicted_seconds",
    "seconds_per_step",
    "wrap_split",
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


class Scheduled(Protocol):
    """What the prediction reads of a job (:class:`rxt.demo.plan.Job`)."""

    name: str
    stage: str  # the recipe stage it trains: its seconds per step
    steps: int
    after: tuple[str, ...]


def predicted_seconds(
    schedule: Sequence[Scheduled], per_step: Mapping[str, float], workers: int
) -> float:
    """Seconds from now until the demo ends if the jobs of ``schedule`` run now: the jobs in
    that order on ``workers`` workers, a free one taking the first whose ``after`` (among the
    schedule's jobs) have ended, as :func:`rxt.demo.jobs.run_tasks` hands them out; then the
    evaluations and the rest."""
    names = {job.name for job in schedule}
    free = [0.0] * max(workers, 1)
    ends: dict[str, float] = {}
    pending = list(schedule)
    while pending:
        worker = free.index(min(free))
        now = free[worker]
        ready = [
            job
            for job in pending
            if all(a not in names or ends.get(a, math.inf) <= now for a in job.after)
        ]
        if not ready:  # wait for the next job to end
            later = [end for end in ends.values() if end > now]
            if not later:
                raise ValueError(f"jobs {[j.name for j in pending]} wait for jobs that never run")
            free[worker] = min(later)
            continue
        job = ready[0]
        pending.remove(job)
        free[worker] = ends[job.name] = now + (job.steps + JOB_OVERHEAD_STEPS) * per_step[job.stage]
    return max(ends.values(), default=0.0) + TAIL_STEPS * max(per_step.values())


def wrap_split(steps: int, first: float, split: float, last: float) -> int | None:
    """Where to cut the middle one of three equally long stages on two workers so both end
    together (McNaughton's wrap-around rule): worker A trains ``first`` then the cut stage's
    rest; worker B the cut stage's first part, then ``last``. The arguments are the stages'
    seconds per step; each part pays :data:`JOB_OVERHEAD_STEPS`. Returns the first part's
    steps, or None when no cut helps (``first`` alone outlasts the other two)."""
    o = JOB_OVERHEAD_STEPS
    # (steps + o) * first + (steps - k + o) * split == (k + o) * split + (steps + o) * last
    k = ((steps + o) * (first + split - last) - o * split) / (2 * split)
    k = round(k)
    return k if 0 < k < steps else None


def choose_steps(
    budget_s: float,
    elapsed_s: float,
    per_step: Mapping[str, float],
    schedule: Callable[[int], Sequence[Scheduled]],
    workers: int,
    low: int,
    high: int,
) -> BudgetChoice:
    """The largest step count in ``[low, high]`` (a multiple of :data:`STEP_GRAIN` above
    ``low``) whose predicted end, ``elapsed_s`` from now, is within ``budget_s``; ``low`` with
    ``fits=False`` if none is. ``schedule(steps)``: the jobs left to run at that count."""
    if low < 1 or high < low:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")

    def total(steps: int) -> float:
        return elapsed_s + predicted_seconds(schedule(steps), per_step, workers)

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


def fit_budget(
    plan: DemoPlan, out: Path, elapsed: float, workers: int
) -> tuple[DemoPlan, dict[str, Any]]:
    """The plan with the SMAT steps the rest of the budget allows, ``elapsed`` seconds into
    the demo, from the timing runs' logs in ``out/runs``; and what was measured and chosen,
    for the report."""
    per_step = {
        main: seconds_per_step(out / "runs" / timing / "log.jsonl")
        for timing, main in CALIBRATION.items()
    }
    if plan.ablations:  # they run SMAT's stage: timed as SMAT
        per_step.update({name: per_step["smat"] for name in SIZED - set(per_step)})

    def planned(steps: int) -> DemoPlan:
        cut = None
        if workers == 2 and not plan.ablations:  # three main stages on two workers
            speeds = (per_step[s] for s in ("smat", "stateless-full", "stateless-current"))
            cut = wrap_split(steps, *speeds)
        return dataclasses.replace(plan, smat_steps=steps, full_first_steps=cut)

    choice = choose_steps(
        plan.budget_s,
        elapsed,
        per_step,
        lambda steps: sized_jobs(planned(steps)),
        workers,
        low=plan.min_smat_steps,
        high=plan.max_smat_steps,
    )
    steps = choice.steps
    plan = dataclasses.replace(planned(steps), eval_every=max(1, steps // 4))
    minutes = plan.budget_s / 60
    summary = (
        f"budget {minutes:.1f} min: {steps} SMAT steps per system, predicted to end at "
        f"{choice.predicted_total_s / 60:.1f} min"
    )
    if plan.full_first_steps is not None:
        summary += (
            f"; the full-history baseline in two parts ({plan.full_first_steps} + "
            f"{steps - plan.full_first_steps} steps), one on each worker"
        )
    if not choice.fits:
        summary += f" (the minimum, {plan.min_smat_steps}, does not fit: this machine is slow)"
    report = {"budget_s": plan.budget_s, "elapsed_at_choice_s": round(elapsed, 1)}
    split = {"full_first_steps": plan.full_first_steps}
    return plan, {**report, **choice.to_dict(), **split, "summary": summary}
