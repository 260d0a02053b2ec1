"""The state-bytes benchmark's grid: which runs, in which order, and the summary of their records.

:class:`GridConfig` is the whole benchmark as data (JSON/YAML through ``from_dict``). The
procedure, the same for every system:

1. **Learning-rate sweep**: at the headline state size, seed 0, every rate of ``lrs``. Each
   run is scored on the task's ``valid`` split (and on ``test``); the rate with the best
   validation recall (ties: the earlier in ``lrs``) is the system's for that task.
2. **Sizes and seeds**, at that rate: every other state size of ``states`` (seed 0), and the
   headline size with every other seed of ``seeds``.

The full-attention ``llama`` has no state size (its cache grows): it runs at the headline
only. ``mqar-sequence`` is one turn, which never reaches RxT's memory: RxT sits it out.

Runs are independent processes' work (``workers`` one-thread processes); each run's record is
written to ``out/runs/`` as it finishes and a rerun skips what is there, so an interrupted
grid resumes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from rxt.bench.memory_run import RunSpec, run_one
from rxt.bench.memory_systems import SYSTEMS, ModelShape
from rxt.bench.memory_tasks import TaskSpec, build_task, load_task
from rxt.data.babi import BabiConfig
from rxt.data.mqar import MqarConfig, MqarSequenceConfig
from rxt.validated import Validated

__all__ = ["GridConfig", "plan_runs", "run_grid", "summarise_grid"]

TASKS = ("mqar", "mqar-sequence", "babi-qa1", "babi-qa2")


@dataclass(frozen=True)
class GridConfig(Validated):
    """Everything the benchmark runs. ``states``: target state sizes in elements (RxT's STM is
    2 layers × S slots × 64 in the ``tiny`` preset: 4,096 = 32 slots); ``headline`` must be one
    of them. Data sizes are dialogues per split."""

    tasks: tuple[str, ...] = ("mqar", "babi-qa1", "mqar-sequence")
    systems: tuple[str, ...] = SYSTEMS
    # "task/system" pairs left out: RWKV-4's pure-PyTorch path loops over time in Python, 4.5 s
    # a step on the bAbI dialogues against 0.3-1.0 s for the others (docs/benchmarks.md).
    exclude: tuple[str, ...] = ("babi-qa1/rwkv", "babi-qa2/rwkv")
    states: tuple[int, ...] = (1024, 4096, 16384)
    headline: int = 4096
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Sized to finish in about an hour on 2 cores from measured step times (docs/benchmarks.md):
    # a budget at which most systems are still learning; raise steps for converged figures.
    steps: int = 320
    warmup_steps: int = 80
    batch_size: int = 8
    workers: int = 2
    train: int = 8000
    warmup: int = 2000
    valid: int = 100
    test: int = 300
    shape: ModelShape = field(default_factory=ModelShape)
    mqar: MqarConfig = field(default_factory=MqarConfig)
    sequence: MqarSequenceConfig = field(default_factory=MqarSequenceConfig)
    babi: BabiConfig = field(
        default_factory=lambda: BabiConfig(chat_turns=(4, 6), facts=(2, 4), max_chars=60)
    )

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        self.require("tasks", bool(self.tasks) and not bad, f"must be names from {TASKS}")
        bad = [s for s in self.systems if s not in SYSTEMS]
        self.require("systems", bool(self.systems) and not bad, f"must be names from {SYSTEMS}")
        self.require("states", bool(self.states) and min(self.states) >= 1, "need sizes >= 1")
        self.require("headline", self.headline in self.states, "must be one of states")
        self.require("lrs", bool(self.lrs) and min(self.lrs) > 0, "need rates > 0")
        self.require("seeds", bool(self.seeds), "need at least one seed")
        self.require("steps", self.steps >= 1, "must be >= 1")
        self.require("warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        self.require("workers", self.workers >= 1, "must be >= 1")

    @classmethod
    def quick(cls) -> GridConfig:
        """A smoke test of every system on the two MQAR forms and qa1: seconds per run."""
        return cls(
            tasks=("mqar", "mqar-sequence", "babi-qa1"),
            exclude=(),
            states=(1024,),
            headline=1024,
            lrs=(3e-3,),
            seeds=(0,),
            steps=3,
            warmup_steps=2,
            batch_size=4,
            workers=1,
            train=48,
            warmup=16,
            valid=8,
            test=8,
            shape=ModelShape(peer_layers=2),
            sequence=MqarSequenceConfig(pairs=8, queries=4),
            babi=BabiConfig(chat_turns=(2, 3), facts=(1, 2), max_chars=40),
        )

    def task_spec(self, kind: str) -> TaskSpec:
        return TaskSpec(
            kind=kind, train=self.train, warmup=self.warmup, valid=self.valid, test=self.test,
            mqar=self.mqar, sequence=self.sequence, babi=self.babi,
        )  # fmt: skip

    def systems_for(self, kind: str) -> tuple[str, ...]:
        return tuple(
            s
            for s in self.systems
            if (kind != "mqar-sequence" or s != "rxt") and f"{kind}/{s}" not in self.exclude
        )

    def run(self, task: str, system: str, state: int, lr: float, seed: int) -> RunSpec:
        return RunSpec(
            task, system, state, lr, seed, self.steps, self.warmup_steps, self.batch_size
        )


def _record_path(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / (spec.id.replace("/", "__") + ".json")


def plan_runs(config: GridConfig, best_lr: dict[tuple[str, str], float] | None = None):
    """Phase 1 (``best_lr`` None): the sweep; phase 2: sizes and seeds at each best rate."""
    runs = []
    for task in config.tasks:
        for system in config.systems_for(task):
            if best_lr is None:
                runs += [
                    config.run(task, system, config.headline, lr, config.seeds[0])
                    for lr in config.lrs
                ]
                continue
            lr = best_lr[task, system]
            if system != "llama":
                runs += [
                    config.run(task, system, s, lr, config.seeds[0])
                    for s in config.states
                    if s != config.headline
                ]
            runs += [
                config.run(task, system, config.headline, lr, seed) for seed in config.seeds[1:]
            ]
    return runs


_TASKS: dict[str, object] = {}


def _job(spec: RunSpec, config: GridConfig, out: str) -> dict:
    """One run in a worker process (the task's data loaded once per process)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars, one per saved model
    hf_logging.set_verbosity_error()  # the pure-PyTorch fallback notes, once per model
    if spec.task not in _TASKS:
        _TASKS[spec.task] = load_task(config.task_spec(spec.task), Path(out) / "tasks" / spec.task)
    task = _TASKS[spec.task]
    try:
        record = run_one(spec, task, config.shape, Path(out) / "work" / spec.id)
    except Exception as exc:  # a system that fails on this version is reported, not fatal
        record = {"id": spec.id, "task": spec.task, "system": spec.system, "error": repr(exc)}
    record_path = _record_path(Path(out), spec)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record) + "\n")
    return record


def _execute(runs: list[RunSpec], config: GridConfig, out: Path, log) -> list[dict]:
    done, todo = [], []
    for spec in runs:
        path = _record_path(out, spec)
        if path.is_file():
            done.append(json.loads(path.read_text()))
        else:
            todo.append(spec)
    if config.workers == 1 or len(todo) <= 1:
        for spec in todo:
            done.append(_job(spec, config, str(out)))
            log(done[-1])
        return done
    with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn")) as pool:
        for record in pool.map(_job, todo, [config] * len(todo), [str(out)] * len(todo)):
            done.append(record)
            log(record)
    return done


def _valid_recall(record: dict) -> float:
    value = record.get("valid", {}).get("recall", float("nan"))
    return -1.0 if math.isnan(value) else value


def run_grid(config: GridConfig, out: str | Path, log=print) -> dict:
    """Build the tasks, run both phases, write ``out/results.json``; returns it."""
    out = Path(out)
    start = time.perf_counter()
    for task in config.tasks:
        directory = out / "tasks" / task
        if not (directory / "tokenizer.json").is_file():
            build_task(config.task_spec(task), directory)
    sweep = _execute(plan_runs(config), config, out, log)
    best: dict[tuple[str, str], float] = {}
    for task in config.tasks:
        for system in config.systems_for(task):
            rows = [
                r for r in sweep if r["task"] == task and r["system"] == system and "error" not in r
            ]
            rows.sort(key=lambda r: (-_valid_recall(r), config.lrs.index(r["lr"])))
            best[task, system] = rows[0]["lr"] if rows else config.lrs[0]
    rest = _execute(plan_runs(config, best), config, out, log)
    results = summarise_grid(config, sweep + rest, best)
    results["seconds"] = round(time.perf_counter() - start, 1)
    from rxt.results import environment, write_json

    results["environment"] = environment("cpu")
    write_json(out / "results.json", results)
    return results


def summarise_grid(config: GridConfig, records: list[dict], best: dict) -> dict:
    """``{"config", "records", "summary"}``: per task and system the chosen rate, recall at
    each state size in bytes (seed 0; for the growing cache, its size after the last turn of
    a test dialogue), and at the headline size the mean and spread over the seeds."""
    summary: dict = {}
    for task in config.tasks:
        summary[task] = {}
        for system in config.systems_for(task):
            lr = best[task, system]
            mine = [r for r in records if r["task"] == task and r["system"] == system]
            errors = sorted({r["error"] for r in mine if "error" in r})
            ok = [r for r in mine if "error" not in r]
            chosen = [r for r in ok if r["lr"] == lr]
            head = [r for r in chosen if r["state_target"] == config.headline]
            recalls = [r["test"]["recall"] for r in head]
            entry = {
                "lr": lr,
                "sweep": {str(r["lr"]): r["valid"]["recall"] for r in ok
                          if r["state_target"] == config.headline and r["seed"] == config.seeds[0]},
                "by_state": {
                    str(r["state_bytes_by_turn"][-1]): r["test"]["recall"]
                    for r in sorted(chosen, key=lambda r: r["state_bytes"])
                    if r["seed"] == config.seeds[0]
                },
                "headline_recall": statistics.fmean(recalls) if recalls else None,
                "headline_spread": (min(recalls), max(recalls)) if recalls else None,
                "headline_seeds": len(recalls),
            }  # fmt: skip
            if head:
                first = head[0]
                keys = ("state_bytes", "state_grows", "parameters", "settings")
                entry.update({k: first[k] for k in keys})
                entry["final_state_bytes"] = first["state_bytes_by_turn"][-1]
                entry["flops_by_turn"] = first["flops_by_turn"]
            if errors:
                entry["errors"] = errors
            summary[task][system] = entry
    return {"config": config.to_dict(), "best_lr": {f"{t}/{s}": v for (t, s), v in best.items()},
            "summary": summary, "records": records}  # fmt: skip
