"""`rxt demo`: build the data, train RxT and the baselines, evaluate, write the report.

Layout of ``OUT`` (``runs/demo`` by default)::

    data/         probes-train.jsonl, probes-test.jsonl, warmup.jsonl, shakespeare-*.jsonl,
                  chitchat-*.jsonl
    recipe.yaml   the recipe every stage below was trained from (`rxt train NAME --config ...`)
    runs/NAME/    one directory per stage: model/, checkpoint/, log.jsonl
    eval/NAME.json  `rxt eval` output of each system
    logs/NAME.log   each job's console output
    rxt/          the trained RxT (`rxt chat OUT/rxt`)
    report.json, report.md, recall_vs_distance.png, latency_vs_turn.png

The run ends with a scripted conversation with the trained RxT (:mod:`rxt.demo.conversation`),
printed and written into the report.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from rxt.data.chitchat import CorpusMissing
from rxt.data.dialogue import write_dialogues
from rxt.data.probes import (
    ProbeConfig,
    chance_level,
    generate,
    generate_apart,
    generate_splits,
)
from rxt.demo.budget import fit_budget
from rxt.demo.jobs import Task, run_tasks
from rxt.demo.plan import DemoPlan, by_stage, data_files, jobs, recipe, sized_jobs
from rxt.demo.report import write_report

__all__ = [
    "build_data",
    "real_text",
    "run_demo",
    "run_jobs",
    "train_tokenizer",
    "write_recipe",
    "write_run",
]

REAL_TEXT = ("shakespeare", "chitchat")
SHAKESPEARE_TEST_PLAYS = ("hamlet", "tempest")
SHAKESPEARE_VALID_PLAYS = ("twelfth_night",)


def build_data(plan: DemoPlan, directory: Path, seed: int) -> dict[str, Any]:
    """Write the demo's JSONL files; returns counts and what was left out."""
    config = ProbeConfig(max_turns=plan.max_turns, max_distance=plan.max_turns - 1)
    # The validation split (learning curves) comes after the test split, so adding it left the
    # test split as it was; each later split skips dialogues of the earlier ones.
    sizes = {"train": plan.train_dialogues, "test": plan.test_dialogues}
    splits = generate_splits({**sizes, "valid": plan.valid_dialogues}, seed=seed, config=config)
    # Long dialogues: facts up to long_max_distance turns back, mixed into training; and a test
    # split asking only at long_test_distances.
    long = ProbeConfig(
        max_turns=plan.long_max_distance + 1 + 3,
        max_distance=plan.long_max_distance,
    )
    long_test_config = dataclasses.replace(long, distances=plan.long_test_distances)
    long_test = generate(plan.long_test_dialogues, seed=seed, config=long_test_config, split="long")
    held_out = [*splits["test"], *splits["valid"], *long_test]  # every split evaluated on
    long_train = generate_apart(
        plan.long_train_dialogues, seed=seed, config=long, held_out=held_out, split="long-train"
    )
    # Training dialogues ask more facts than the test split's (1..3): every recall answer is a
    # gradient for the memory, and 5..8 asked facts (about 3.0 probes per dialogue against
    # 1.8, at the same number of turns) learnt faster per step (docs/training.md, "Denser
    # training probes"). They come from a stream of their own, minus every held-out dialogue;
    # the test and validation splits are drawn exactly as before.
    if plan.train_facts != config.facts_per_dialogue:
        dense = dataclasses.replace(config, facts_per_dialogue=plan.train_facts)
        splits["train"] = generate_apart(
            plan.train_dialogues, seed=seed, config=dense, held_out=held_out, split="train-dense"
        )
    # Two-turn dialogues (a fact, its question), disjoint from every held-out split.
    two_turn = ProbeConfig(max_turns=2, max_distance=1, extra_turns=0)
    warmup = generate_apart(
        plan.warmup_dialogues, seed=seed, config=two_turn, held_out=held_out, split="warmup"
    )
    files = {
        "probes-train": splits["train"],
        "probes-test": splits["test"],
        "probes-valid": splits["valid"],
        "probes-long-train": long_train,
        "probes-long-test": long_test,
        "warmup": warmup,
    }
    info: dict[str, Any] = {
        "probe_config": {"max_turns": config.max_turns, "max_distance": config.max_distance},
        "train_facts": list(plan.train_facts),
        "chance": chance_level(config),
        "long_test_distances": list(plan.long_test_distances),
        **{name: write_dialogues(directory / f"{name}.jsonl", d) for name, d in files.items()},
    }
    sizes = {
        "shakespeare": (plan.shakespeare_dialogues, plan.shakespeare_test),
        "chitchat": (plan.chitchat_dialogues, plan.chitchat_test),
    }
    for corpus, (n_train, n_test) in sizes.items():
        if n_train == 0:
            info[corpus] = "left out by the plan"
            continue
        try:
            parts = _real_text_splits(corpus)
        except (ImportError, FileNotFoundError, CorpusMissing) as err:
            info[corpus] = f"not installed ({err}); its real-text evaluation is skipped"
            continue
        rng = random.Random(seed)
        train = rng.sample(parts["train"], min(n_train, len(parts["train"])))
        test = rng.sample(parts["test"], min(n_test, len(parts["test"])))
        info[f"{corpus}-train"] = write_dialogues(directory / f"{corpus}-train.jsonl", train)
        info[f"{corpus}-test"] = write_dialogues(directory / f"{corpus}-test.jsonl", test)
    if "shakespeare-test" in info:
        info["shakespeare_test_plays"] = list(SHAKESPEARE_TEST_PLAYS)
    return info


def _real_text_splits(corpus: str) -> dict[str, list]:
    """A real-text corpus's train/valid/test dialogues, held out by play (Shakespeare) or by
    conversation (Chit Chat). Short messages keep every interaction inside the tiny model's
    128-token window."""
    if corpus == "shakespeare":
        from rxt.data.shakespeare import shakespeare_dialogues, split_by_play

        return split_by_play(
            shakespeare_dialogues(max_turns=4, max_chars=120),
            test_plays=SHAKESPEARE_TEST_PLAYS,
            valid_plays=SHAKESPEARE_VALID_PLAYS,
        )
    from rxt.data.chitchat import chitchat_dialogues, split_chitchat

    return split_chitchat(chitchat_dialogues(max_turns=4, max_chars=120))


def real_text(data: dict[str, Any]) -> tuple[str, ...]:
    """The real-text corpora :func:`build_data` wrote (trained on, and evaluated by perplexity)."""
    return tuple(c for c in REAL_TEXT if f"{c}-test" in data)


def write_run(plan: DemoPlan, out: Path, seed: int) -> dict[str, Any]:
    """A run directory's data (:func:`build_data`) and ``recipe.yaml`` (``plan``'s recipe, seeded
    with ``seed``); returns the data counts. One layout for ``rxt demo``, each ``--long`` seed and
    ``benchmarks/decoder_split.py``."""
    data = build_data(plan, out / "data", seed)
    write_recipe(plan, out, data, seed)
    return data


def write_recipe(plan: DemoPlan, out: Path, data: dict[str, Any], seed: int) -> None:
    """``out/recipe.yaml``: ``plan``'s recipe over the files :func:`build_data` wrote."""
    import yaml

    spec = recipe(plan, data_files(out, real_text(data)), seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def train_tokenizer(plan: DemoPlan, out: Path, data: dict[str, Any]) -> None:
    """The recipe's tokenizer stage, then the test files cut to what the model can read."""
    from rxt.training.run import run_stage

    run_stage("tokenizer", out / "recipe.yaml", out / "runs")
    _fit_test_files(out, plan, data)


def _fit_test_files(out: Path, plan: DemoPlan, data: dict[str, Any]) -> None:
    """Cut test dialogues before any interaction the model cannot read in one event, as the
    training stages do with theirs (counted in ``data``)."""
    from rxt.config import RxTConfig
    from rxt.data.dialogue import read_dialogues
    from rxt.tokenizer import RxTTokenizer
    from rxt.training.run import fit_dialogues

    tokenizer = RxTTokenizer.from_file(out / "runs" / "tokenizer" / "tokenizer.json")
    max_len = RxTConfig.preset(plan.preset).max_seq_len
    tests = ("probes-test", "probes-long-test", "probes-valid", *(f"{c}-test" for c in REAL_TEXT))
    for name in tests:
        path = out / "data" / f"{name}.jsonl"
        if path.is_file():
            kept, cut = fit_dialogues(read_dialogues(path), tokenizer, max_len)
            data[f"{name}-cut"] = cut
            if cut:
                data[name] = write_dialogues(path, kept)


def run_jobs(
    plan: DemoPlan,
    out: Path,
    corpora: tuple[str, ...] = (),
    prefix: str = "",
    skip: tuple[str, ...] = (),
    only: Collection[str] | None = None,
) -> list[Task]:
    """Training and evaluation jobs of one run in ``out``. ``corpora``: the real-text corpora
    whose test split every system is evaluated on (:func:`real_text`); ``prefix`` names its tasks
    apart from another run's in the same scheduler (``rxt demo --long``: one run per seed);
    ``skip``: jobs and evaluations (by system name) to leave out; ``only``: run just these
    training jobs (and the evaluations of their models), those they wait for having run before
    (the budgeted demo's two phases)."""
    runs = out / "runs"
    planned = [j for j in jobs(plan) if only is None or j.name in only]
    selected = {j.name for j in planned}
    tasks = [
        Task(
            prefix + job.name,
            (
                "train",
                job.stage,
                "--config",
                str(out / "recipe.yaml"),
                "--out",
                str(runs),
                "--threads",
                "1",
                "--no-progress",
                *(("--stop-at", str(job.stop_at)) if job.stop_at is not None else ()),
                *(("--resume",) if job.first_step else ()),
            ),
            after=tuple(prefix + a for a in job.after if a in selected),
            steps=job.steps,
            log_jsonl=runs / job.stage / "log.jsonl",
            first_step=job.first_step,
        )
        for job in planned
        if job.name not in skip
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
        return Task(f"{prefix}eval-{name}", args, after=(prefix + model,))

    long = "probes-long-test.jsonl"
    tasks += [
        evaluate("rxt", "smat", "probes-test.jsonl"),
        evaluate("stateless-full", "stateless-full", "probes-test.jsonl"),
        evaluate("stateless-current", "stateless-current", "probes-test.jsonl"),
        evaluate("long-rxt", "smat", long, "--memory", "on", "off", "--no-reward"),
        evaluate("long-stateless-full", "stateless-full", long, "--no-reward"),
        evaluate("long-stateless-current", "stateless-current", long, "--no-reward"),
    ]
    if plan.ablations:
        tasks += [
            evaluate(name, name, "probes-test.jsonl", "--memory", "on")
            for name in ("ablation-no-memory", "ablation-horizon-1")
        ]
    for corpus in corpora:
        data = f"{corpus}-test.jsonl"
        tasks += [
            evaluate(f"{corpus}-rxt", "smat", data, "--memory", "on", "off", "--no-reward"),
            evaluate(f"{corpus}-stateless-full", "stateless-full", data, "--no-reward"),
            evaluate(f"{corpus}-stateless-current", "stateless-current", data, "--no-reward"),
        ]
    skipped = {prefix + name for name in skip}
    trained = {prefix + name for name in selected}
    return [
        t
        for t in tasks
        if not (set(t.after) & skipped)
        and (not t.name.startswith(f"{prefix}eval-") or set(t.after) <= trained)
    ]


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


def _conversation(model_dir: Path, seed: int) -> list[dict[str, Any]]:
    """Play the scripted conversation with the trained model and print it."""
    from rxt.demo.conversation import conversation_lines, play_script
    from rxt.model.reactive_transformer import ReactiveTransformer

    turns = play_script(ReactiveTransformer.from_pretrained(model_dir), seed=seed)
    for line in conversation_lines(turns):
        print(f"      {line}")
    return turns


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
    ablations: bool = False,
    in_process: Callable[[list[str]], int] | None = None,
    plan: DemoPlan | None = None,
) -> dict[str, Any]:
    """The demo (module docstring). ``workers``: training processes of one thread each (two on
    two cores: one trains the RxT chain, the other the two baselines).
    ``ablations``: also train and evaluate the two ablations (about 1.5 x the time).
    ``in_process``: the ``rxt`` entry point; given, the quick demo runs its jobs in this
    process (see :func:`~rxt.demo.jobs.run_tasks`). ``plan``: another plan than the demo's (or
    the quick one's), for experiments; ``ablations`` still applies."""
    plan = plan or (DemoPlan.quick() if quick else DemoPlan())
    plan = dataclasses.replace(plan, ablations=ablations)
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(label: str) -> None:
        print(f"[{label}] {time.perf_counter() - started:6.1f} s", flush=True)

    step("1/7 data: probe dialogues, two-turn warm-up dialogues, Shakespeare, Chit Chat")
    data = write_run(plan, out, seed)
    corpora = real_text(data)
    for corpus in REAL_TEXT:
        if corpus not in corpora:
            print(f"      {corpus}: {data[corpus]}")
    timings["data"] = time.perf_counter() - started

    step("2/7 tokenizer")
    clock = time.perf_counter()
    train_tokenizer(plan, out, data)
    timings["tokenizer"] = time.perf_counter() - clock

    if quick and in_process is not None:
        workers = 0  # in this process: start-up costs more than the quick jobs themselves
    where = f"{workers} worker processes" if workers else "in this process"
    step(f"3/7 training and evaluation ({where}, logs in {out / 'logs'})")
    clock = time.perf_counter()

    def run(only: Collection[str] | None, description: str) -> dict[str, float]:
        tasks = run_jobs(plan, out, corpora, only=only)
        return run_tasks(
            tasks,
            out / "logs",
            workers=workers,
            progress=progress,
            description=description,
            in_process=in_process,
        )

    budget = None
    if plan.budget_s is None:
        job_times = run(None, "training")
    else:  # fixed-length stages and timing runs first, then as many steps as the budget allows
        fixed = {j.name for j in jobs(plan)} - {j.name for j in sized_jobs(plan)}
        job_times = run(fixed, "fixed stages")
        plan, budget = fit_budget(plan, out, time.perf_counter() - started, workers)
        write_recipe(plan, out, data, seed)
        print(f"      {budget['summary']}", flush=True)
        job_times.update(run({j.name for j in sized_jobs(plan)}, "training"))
    job_times = by_stage(job_times, plan)  # a stage cut in two parts: one time
    timings["train_and_eval"] = time.perf_counter() - clock

    rxt_dir = out / "rxt"
    if rxt_dir.exists():
        shutil.rmtree(rxt_dir)
    shutil.copytree(out / "runs" / "smat" / "model", rxt_dir)

    step("4/7 latency per turn: trained RxT vs a stateless transformers model")
    clock = time.perf_counter()
    latency = _latency(plan, rxt_dir)
    timings["latency"] = time.perf_counter() - clock

    step("5/7 a scripted conversation with the trained RxT")
    clock = time.perf_counter()
    conversation = _conversation(rxt_dir, seed)
    timings["conversation"] = time.perf_counter() - clock

    step("6/7 report")
    timings["total"] = time.perf_counter() - started
    if budget is not None:
        budget["actual_total_s"] = round(timings["total"], 1)
    report = write_report(out, plan, data, job_times, latency, timings, conversation, budget)
    step("7/7 done")
    print(report["summary"])
    print(f"report: {out / 'report.md'}; chat with the model: rxt chat {rxt_dir}")
    return report
