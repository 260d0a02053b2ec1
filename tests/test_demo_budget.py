"""The demo's time budget: step times from the timing runs' logs, the prediction, the choice,
and the two-phase plan (rxt.demo.budget, rxt.demo.plan)."""

from __future__ import annotations

import json

import pytest

from rxt.demo.budget import (
    JOB_OVERHEAD_STEPS,
    STEP_GRAIN,
    TAIL_STEPS,
    choose_steps,
    predicted_seconds,
    seconds_per_step,
)
from rxt.demo.pipeline import run_jobs
from rxt.demo.plan import CALIBRATION, SIZED, DemoPlan, jobs, recipe

DATA = {"text": ["t"], "interactions": ["i"], "dialogues": ["d"], "warmup": ["w"], "valid": ["v"]}
ORDER = ["smat", "stateless-full", "stateless-current"]


def _log(path, windows):
    """A log.jsonl of ``(step, tokens, seconds)`` windows, as the training loop writes them."""
    path.write_text(
        "".join(
            json.dumps({"step": step, "tokens": tokens, "tokens_per_s": tokens / seconds}) + "\n"
            for step, tokens, seconds in windows
        )
    )
    return path


def test_seconds_per_step_is_the_median_window_after_the_first(tmp_path):
    # 10 steps per window: 5 s (start-up), then 1.0, 3.0 and 1.2 s.
    log = _log(
        tmp_path / "log.jsonl", [(10, 500, 5.0), (20, 400, 1.0), (30, 450, 3.0), (40, 90, 1.2)]
    )
    assert seconds_per_step(log) == pytest.approx(0.12)


def test_seconds_per_step_needs_two_windows_and_a_readable_log(tmp_path):
    with pytest.raises(ValueError, match="1 timed log window"):
        seconds_per_step(_log(tmp_path / "one.jsonl", [(10, 500, 5.0)]))
    with pytest.raises(ValueError, match="cannot read"):
        seconds_per_step(tmp_path / "missing.jsonl")


def test_prediction_follows_the_schedulers_assignment():
    per_step = {"smat": 0.2, "stateless-full": 0.15, "stateless-current": 0.1}
    # Two workers: RxT on one; the full-history baseline, then the current-turn one, on the other.
    expected = (1000 + JOB_OVERHEAD_STEPS) * 0.25 + TAIL_STEPS * 0.2
    assert predicted_seconds(1000, per_step, ORDER, workers=2) == pytest.approx(expected)
    one_worker = (1000 + JOB_OVERHEAD_STEPS) * 0.45 + TAIL_STEPS * 0.2
    assert predicted_seconds(1000, per_step, ORDER, workers=1) == pytest.approx(one_worker)


def test_choice_is_the_largest_count_that_fits():
    per_step = {"smat": 0.2, "stateless-full": 0.15, "stateless-current": 0.1}
    choice = choose_steps(1080, 120, per_step, ORDER, 2, low=500, high=12000)
    assert choice.fits and choice.steps % STEP_GRAIN == 0
    assert choice.predicted_total_s <= 1080
    longer = 120 + predicted_seconds(choice.steps + STEP_GRAIN, per_step, ORDER, 2)
    assert longer > 1080  # one grain more would overrun
    assert choice.to_dict()["per_step_s"] == per_step
    # More budget never means fewer steps; the bounds hold.
    counts = [
        choose_steps(b, 120, per_step, ORDER, 2, 500, 12000).steps for b in range(600, 4000, 97)
    ]
    assert counts == sorted(counts) and min(counts) >= 500 and max(counts) <= 12000
    assert choose_steps(10**6, 0, per_step, ORDER, 2, 500, 12000).steps == 12000


def test_a_budget_too_small_runs_the_minimum_and_says_so():
    per_step = {"smat": 1.0, "stateless-full": 1.0, "stateless-current": 1.0}
    choice = choose_steps(60, 50, per_step, ORDER, 2, low=500, high=12000)
    assert (choice.steps, choice.fits) == (500, False)
    with pytest.raises(ValueError, match="low"):
        choose_steps(60, 0, per_step, ORDER, 2, low=10, high=5)


def test_a_budgeted_recipe_times_each_main_stage_as_it_will_run():
    plan = DemoPlan(budget_s=1080.0)
    stages = recipe(plan, DATA)["stages"]
    for timing, main in CALIBRATION.items():
        run, target = stages[timing], stages[main]
        assert run["kind"] == main and "eval" not in run
        assert (run["data"], run["config"], run.get("from")) == (
            target["data"], target["config"], target.get("from"),
        )  # fmt: skip
        assert run["train"]["steps"] == plan.calibration_steps
        assert run["train"]["log_every"] == plan.calibration_steps // 4
    assert not set(CALIBRATION) & set(recipe(DemoPlan(), DATA)["stages"])
    after = {j.name: j.after for j in jobs(plan)}
    # The current-turn baseline's timing run starts with RxT's, so both run beside each other.
    assert "smat-warmup" in after["calibrate-stateless-current"]
    assert set(CALIBRATION) <= set(after) and not set(CALIBRATION) & {
        j.name for j in jobs(DemoPlan())
    }


def test_phases_run_apart(tmp_path):
    plan = DemoPlan(budget_s=1080.0)
    fixed = {j.name for j in jobs(plan)} - SIZED
    first = run_jobs(plan, tmp_path, ("shakespeare",), only=fixed)
    names = {t.name for t in first}
    assert names == fixed  # no evaluation: no evaluated model trains in this phase
    second = run_jobs(plan, tmp_path, ("shakespeare",), only=SIZED)
    trained = {t.name for t in second if not t.name.startswith("eval-")}
    assert trained == {"smat", "stateless-full", "stateless-current"}
    assert {"eval-rxt", "eval-shakespeare-stateless-current"} <= {t.name for t in second}
    # What a phase waits for in the other phase has run already: no link across phases.
    assert all(set(t.after) <= {u.name for u in second} for t in second)
