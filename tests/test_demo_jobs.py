"""The demo's job runner: dependencies, parallel worker processes, failures, the demo's plan."""

from __future__ import annotations

import pytest

from rxt.demo.jobs import JobError, Task, run_tasks
from rxt.demo.plan import DemoPlan, jobs, recipe


def test_jobs_run_after_their_dependencies_in_worker_processes(tmp_path):
    info = ("info", "--preset", "tiny", "--json")
    tasks = [Task("b", info, after=("a",)), Task("a", info), Task("c", info)]
    times = run_tasks(tasks, tmp_path, workers=2, progress=False)
    assert set(times) == {"a", "b", "c"}
    for name in times:
        assert '"tiny"' in (tmp_path / f"{name}.log").read_text()


def test_a_failed_job_stops_the_run_and_shows_its_log(tmp_path):
    bad = ("train", "smat", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path))
    tasks = [Task("bad", bad), Task("later", ("info",), after=("bad",))]
    with pytest.raises(JobError, match=r"job 'bad' failed \(exit code 2\)[\s\S]*no such recipe"):
        run_tasks(tasks, tmp_path, workers=2, progress=False)
    assert not (tmp_path / "later.log").exists()


def test_unknown_dependency_is_refused(tmp_path):
    with pytest.raises(ValueError, match="waits for unknown job"):
        run_tasks([Task("a", ("info",), after=("nope",))], tmp_path, progress=False)


@pytest.mark.parametrize("plan", [DemoPlan(), DemoPlan.quick()])
def test_plan_jobs_match_the_recipe_and_budgets(plan):
    data = {"text": ["t"], "interactions": ["i"], "dialogues": ["d"], "warmup": ["w"]}
    stages = recipe(plan, data)["stages"]
    planned = jobs(plan)
    assert {j.name for j in planned} == set(stages)
    for job in planned:
        assert stages[job.name]["train"]["steps"] == job.steps
        start = stages[job.name].get("from")
        if start:
            assert start in job.after
    # The baselines follow RxT's SMAT schedule (warm-up, then the mix); ablations as long.
    for mode in ("full", "current"):
        for suffix in ("-warmup", ""):
            base, rxt = stages[f"stateless-{mode}{suffix}"], stages[f"smat{suffix}"]
            assert (base["data"], base["train"]) == (rxt["data"], rxt["train"])
    assert stages["ablation-horizon-1"]["train"]["steps"] == stages["smat"]["train"]["steps"]
    assert stages["ablation-horizon-1"]["config"]["gradient_horizon"] == 1
