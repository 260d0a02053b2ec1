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


@pytest.mark.parametrize(
    "plan", [DemoPlan(), DemoPlan.quick(), DemoPlan(ablations=True)], ids=["demo", "quick", "abl"]
)
def test_plan_jobs_match_the_recipe_and_budgets(plan):
    data = {"text": ["t"], "interactions": ["i"], "dialogues": ["d"], "warmup": ["w"],
            "valid": ["v"]}  # fmt: skip
    stages = recipe(plan, data)["stages"]
    planned = jobs(plan)
    ablations = {n for n in stages if n.startswith("ablation-")}
    assert ablations and {j.name for j in planned} == set(stages) - (
        set() if plan.ablations else ablations
    )  # the recipe always holds the ablations; they run only when asked for
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
    # Learning curves for RxT and the full-history baseline, on the same validation dialogues.
    assert stages["smat"]["eval"] == stages["stateless-full"]["eval"]
    assert stages["smat"]["eval"] == {"data": ["v"], "every": plan.eval_every}


def test_demo_training_files_share_no_dialogue_with_any_held_out_split(tmp_path):
    """Every file the demo trains on against every split it evaluates on (test, validation,
    long test): no dialogue in common, by the rule the generator uses (equal turns)."""
    from rxt.data.dialogue import read_dialogues
    from rxt.demo.pipeline import build_data

    plan = DemoPlan.quick()
    build_data(plan, tmp_path, seed=0)

    def keys(name: str) -> set:
        dialogues = read_dialogues(tmp_path / f"{name}.jsonl")
        assert dialogues, name
        return {tuple((t.query, t.answer) for t in d.turns) for d in dialogues}

    held_out = keys("probes-test") | keys("probes-valid") | keys("probes-long-test")
    for name in ("probes-train", "probes-long-train", "warmup"):
        assert not keys(name) & held_out, name
    assert not keys("probes-valid") & keys("probes-test")
    # The real-text corpora: held out by play and by conversation, nothing shared.
    for corpus in ("shakespeare", "chitchat"):
        assert not keys(f"{corpus}-train") & keys(f"{corpus}-test"), corpus
        sources = {
            d.meta.get("conversation") or d.meta.get("play")
            for d in read_dialogues(tmp_path / f"{corpus}-train.jsonl")
        }
        held = {
            d.meta.get("conversation") or d.meta.get("play")
            for d in read_dialogues(tmp_path / f"{corpus}-test.jsonl")
        }
        assert sources and held and not sources & held, corpus
    # The long splits reach the distances they are for.
    long_test = read_dialogues(tmp_path / "probes-long-test.jsonl")
    wanted = set(plan.long_test_distances)
    assert all(wanted & {p.distance for p in d.probes} for d in long_test)
    long_train = read_dialogues(tmp_path / "probes-long-train.jsonl")
    assert max(p.distance for d in long_train for p in d.probes) <= plan.long_max_distance
    # Training dialogues ask more facts (plan.train_facts) than the test split's 1..3 (its
    # distribution taken from 2,000 dialogues: the quick test split is only 12).
    from rxt.data.probes import ProbeConfig, generate

    def probes_per_dialogue(dialogues) -> float:
        return sum(len(d.probes) for d in dialogues) / len(dialogues)

    test_like = ProbeConfig(max_turns=plan.max_turns, max_distance=plan.max_turns - 1)
    reference = probes_per_dialogue(generate(2000, seed=1, config=test_like))
    assert plan.train_facts[0] > test_like.facts_per_dialogue[1]
    train = read_dialogues(tmp_path / "probes-train.jsonl")
    assert probes_per_dialogue(train) > 1.1 * reference


def test_denser_training_dialogues_leave_every_held_out_split_as_it_was(tmp_path):
    """``train_facts`` changes only the training file: the test, validation and long test
    splits are byte for byte those of training dialogues drawn like the test split."""
    import dataclasses

    from rxt.demo.pipeline import build_data

    plan = DemoPlan.quick()
    build_data(plan, tmp_path / "dense", seed=0)
    build_data(dataclasses.replace(plan, train_facts=(1, 3)), tmp_path / "plain", seed=0)
    for name in ("probes-test", "probes-valid", "probes-long-test"):
        dense = (tmp_path / "dense" / f"{name}.jsonl").read_bytes()
        assert dense == (tmp_path / "plain" / f"{name}.jsonl").read_bytes(), name
    train = "probes-train.jsonl"
    assert (tmp_path / "dense" / train).read_bytes() != (tmp_path / "plain" / train).read_bytes()
