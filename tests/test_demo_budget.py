"""The demo's time budget: step times from the timing runs' logs, the prediction, the choice,
and the two-phase plan (rxt.demo.budget, rxt.demo.plan)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rxt.cli import main as rxt_main
from rxt.demo.budget import (
    JOB_OVERHEAD_STEPS,
    STEP_GRAIN,
    TAIL_STEPS,
    choose_steps,
    predicted_seconds,
    seconds_per_step,
    wrap_split,
)
from rxt.demo.pipeline import run_demo, run_jobs
from rxt.demo.plan import CALIBRATION, SIZED, DemoPlan, by_stage, jobs, recipe, sized_jobs

DATA = {"text": ["t"], "interactions": ["i"], "dialogues": ["d"], "warmup": ["w"], "valid": ["v"]}
PER_STEP = {"smat": 0.2, "stateless-full": 0.15, "stateless-current": 0.1}


def schedule(steps: int, cut: int | None = None):
    """Phase 2's jobs at ``steps`` SMAT steps (the full-history baseline cut after ``cut``)."""
    return sized_jobs(DemoPlan(smat_steps=steps, full_first_steps=cut))


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
    # Two workers: RxT on one; the full-history baseline, then the current-turn one, on the other.
    expected = (1000 + JOB_OVERHEAD_STEPS) * 0.25 + TAIL_STEPS * 0.2
    assert predicted_seconds(schedule(1000), PER_STEP, workers=2) == pytest.approx(expected)
    one_worker = (1000 + JOB_OVERHEAD_STEPS) * 0.45 + TAIL_STEPS * 0.2
    assert predicted_seconds(schedule(1000), PER_STEP, workers=1) == pytest.approx(one_worker)
    # Cut after 860 steps: RxT, then the baseline's rest on one worker; its first part, then
    # the current-turn baseline on the other; both end at 249 s.
    rxt = (1000 + JOB_OVERHEAD_STEPS) * 0.2 + (140 + JOB_OVERHEAD_STEPS) * 0.15
    other = (860 + JOB_OVERHEAD_STEPS) * 0.15 + (1000 + JOB_OVERHEAD_STEPS) * 0.1
    assert rxt == pytest.approx(other) == pytest.approx(249)
    assert wrap_split(1000, 0.2, 0.15, 0.1) == 860
    assert predicted_seconds(schedule(1000, 860), PER_STEP, 2) == pytest.approx(
        249 + TAIL_STEPS * 0.2
    )
    # A worker takes whatever is ready first: with too early a cut the rest follows the
    # current-turn baseline on the same worker (282 s), as the scheduler would run it.
    assert predicted_seconds(schedule(1000, 200), PER_STEP, 2) == pytest.approx(
        280 * 0.15 + 1080 * 0.1 + 880 * 0.15 + TAIL_STEPS * 0.2
    )
    # The rest waits for its first part even when a worker is free (and nothing else is left).
    fast = {**PER_STEP, "smat": 0.01, "stateless-current": 0.01}
    waits = (900 + JOB_OVERHEAD_STEPS) * 0.15 + (100 + JOB_OVERHEAD_STEPS) * 0.15
    assert predicted_seconds(schedule(1000, 900), fast, 2) == pytest.approx(
        waits + TAIL_STEPS * 0.15
    )


def test_the_cut_ends_both_workers_together():
    for per_step in (PER_STEP, {"smat": 0.183, "stateless-full": 0.14, "stateless-current": 0.138}):
        speeds = [per_step[s] for s in ("smat", "stateless-full", "stateless-current")]
        for steps in (500, 3100, 12000):
            cut = wrap_split(steps, *speeds)
            assert 0 < cut < steps
            o = JOB_OVERHEAD_STEPS
            a = (steps + o) * speeds[0] + (steps - cut + o) * speeds[1]
            b = (cut + o) * speeds[1] + (steps + o) * speeds[2]
            assert abs(a - b) <= speeds[1]  # within one step (the cut is a whole step)
            whole = predicted_seconds(schedule(steps), per_step, 2)
            assert predicted_seconds(schedule(steps, cut), per_step, 2) < whole
    # RxT alone outlasts both baselines: nothing to balance.
    assert wrap_split(1000, 1.0, 0.3, 0.3) is None


def test_choice_is_the_largest_count_that_fits():
    choice = choose_steps(1080, 120, PER_STEP, schedule, 2, low=500, high=12000)
    assert choice.fits and choice.steps % STEP_GRAIN == 0
    assert choice.predicted_total_s <= 1080
    longer = 120 + predicted_seconds(schedule(choice.steps + STEP_GRAIN), PER_STEP, 2)
    assert longer > 1080  # one grain more would overrun
    assert choice.to_dict()["per_step_s"] == PER_STEP
    # More budget never means fewer steps; the bounds hold.
    counts = [
        choose_steps(b, 120, PER_STEP, schedule, 2, 500, 12000).steps for b in range(600, 4000, 97)
    ]
    assert counts == sorted(counts) and min(counts) >= 500 and max(counts) <= 12000
    assert choose_steps(10**6, 0, PER_STEP, schedule, 2, 500, 12000).steps == 12000


def test_a_budget_too_small_runs_the_minimum_and_says_so():
    per_step = {"smat": 1.0, "stateless-full": 1.0, "stateless-current": 1.0}
    choice = choose_steps(60, 50, per_step, schedule, 2, low=500, high=12000)
    assert (choice.steps, choice.fits) == (500, False)
    with pytest.raises(ValueError, match="low"):
        choose_steps(60, 0, per_step, schedule, 2, low=10, high=5)


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


def test_a_cut_stage_runs_as_two_jobs_the_second_resuming_the_first(tmp_path):
    plan = DemoPlan(smat_steps=1000, full_first_steps=300)
    by_name = {j.name: j for j in jobs(plan)}
    first, rest = by_name["stateless-full-first"], by_name["stateless-full"]
    assert (first.stage, first.steps, first.stop_at, first.first_step) == (
        "stateless-full", 300, 300, 0,
    )  # fmt: skip
    assert (rest.stage, rest.steps, rest.first_step, rest.after) == (
        "stateless-full", 700, 300, ("stateless-full-first",),
    )  # fmt: skip
    # The scheduler's order: the first part before the current-turn baseline, the rest last.
    order = [j.name for j in sized_jobs(plan)]
    assert order == ["smat", "stateless-full-first", "stateless-current", "stateless-full"]
    tasks = {t.name: t for t in run_jobs(plan, tmp_path)}
    one, two = tasks["stateless-full-first"], tasks["stateless-full"]
    assert one.args[:2] == two.args[:2] == ("train", "stateless-full")
    assert one.args[-2:] == ("--stop-at", "300") and "--resume" not in one.args
    assert two.args[-1] == "--resume" and "--stop-at" not in two.args
    assert one.log_jsonl == two.log_jsonl and (one.first_step, two.first_step) == (0, 300)
    assert tasks["eval-stateless-full"].after == ("stateless-full",)  # the whole model
    # Both parts count as the stage's time in the report.
    times = by_stage({"smat": 5.0, "stateless-full-first": 2.0, "stateless-full": 3.0}, plan)
    assert times == {"smat": 5.0, "stateless-full": 5.0}
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="full_first_steps"):
            jobs(replace(plan, full_first_steps=bad))


def test_a_cut_stage_trains_exactly_as_the_whole_stage(tmp_path):
    plan = replace(DemoPlan.quick(), full_first_steps=2)  # of 4 steps
    out = tmp_path / "demo"
    calls: list[list[str]] = []

    def command(argv: list[str]) -> int:
        calls.append(argv)
        return rxt_main(argv)

    report = run_demo(out, quick=True, progress=False, in_process=command, plan=plan)
    full = [a for a in calls if a[:2] == ["train", "stateless-full"]]
    parts = [a[a.index("--no-progress") + 1 :] for a in full]
    assert parts == [["--stop-at", "2"], ["--resume"]]
    assert report["training"]["stateless-full"]["steps"] == plan.smat_steps
    assert "stateless-full-first" not in report["training"]
    whole = tmp_path / "whole"
    for stage in ("tokenizer", "stateless-full-warmup"):
        shutil.copytree(out / "runs" / stage, whole / stage)
    recipe_file = str(out / "recipe.yaml")
    args = ["train", "stateless-full", "--config", recipe_file, "--out", str(whole)]
    assert rxt_main([*args, "--threads", "1", "--no-progress"]) == 0
    for name in ("log.jsonl", "eval.jsonl"):
        cut, full = (d / "stateless-full" / name for d in (out / "runs", whole))
        entries = [[json.loads(x) for x in f.read_text().splitlines()] for f in (cut, full)]
        for entry in (e for run in entries for e in run):
            entry.pop("tokens_per_s", None)  # timing, not training
        assert entries[0] == entries[1]
    weights = [
        load_file(d / "stateless-full" / "model" / "model.safetensors")
        for d in (out / "runs", whole)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
