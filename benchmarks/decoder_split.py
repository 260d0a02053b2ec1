"""Where RxT's parameters go: the demo's RxT chain with the decoder/encoder FFN split varied.

    python benchmarks/decoder_split.py --out runs/decoder-split --splits 128:128 192:64 224:32

Each ``DEC:ENC`` split trains the demo's RxT curriculum (``rxt demo``'s data, recipe and steps;
``tiny`` preset, vocabulary 512) with ``DemoPlan.ffn_dims = (DEC, ENC)`` (the demo: 224:32). On
``tiny`` every FFN-width step of 64 moves 24,576 parameters (3 matrices x 64 x 64 x 2 layers), so
``128:128``, ``192:64`` and ``224:32`` hold exactly the same total: the question is whether
parameters moved from the encoder (which only writes memory) to the decoder (which writes every
answer token) buy answer perplexity on Shakespeare without costing recall. ``--current`` also
trains the current-turn baseline once, matched to the first split (the splits have the same
count, but the matched Llama's shape follows the RxT decoder's FFN width:
:func:`rxt.baselines.model.matched_llama_config`), for the perplexity it has to beat. Each run
lives in ``OUT/dDEC-eENC[-KEYVALUE...]-seedS`` (the demo's layout: ``recipe.yaml``, ``runs/``,
``eval/``). All jobs share one scheduler of one-thread workers (two on two cores, as the
demo). Prints one JSON line per run: parameter counts, recall by distance (memory on, off),
recall at k = 16 and 32, Shakespeare answer perplexity; then a Markdown table.
``docs/training.md`` quotes its figures.

``--memory KEY=VALUE ...`` overrides fields of the memory config in every run (e.g.
``--memory num_slots=64`` or ``--memory variant=gated-self-interlayer``; values are read as JSON
where they parse, else as strings) and tags the run directories with them: the same chain, the
same data, another memory. ``--plan KEY=VALUE ...`` overrides fields of :class:`DemoPlan` the
same way (e.g. ``--plan long_train_dialogues=2000``: more long training dialogues; the test
splits do not depend on it), also tagged in the run directories.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rxt.config import ConfigError, RxTConfig
from rxt.demo.jobs import run_tasks
from rxt.demo.pipeline import real_text, run_jobs, train_tokenizer, write_run
from rxt.demo.plan import DemoPlan, model_overrides
from rxt.demo.report import eval_systems
from rxt.model.reactive_transformer import ReactiveTransformer

CURRENT = ("stateless-current-warmup", "stateless-current")
BASELINES = ("stateless-full-warmup", "stateless-full", *CURRENT)


def _split(text: str) -> tuple[int, int]:
    try:
        dec, enc = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DEC:ENC FFN widths, got {text!r}") from None
    if dec <= 0 or enc <= 0:
        raise argparse.ArgumentTypeError(f"FFN widths must be positive, got {text!r}")
    return dec, enc


def _override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def run_name(plan: DemoPlan, seed: int, plan_overrides: Sequence[tuple[str, Any]] = ()) -> str:
    """``dDEC-eENC[-KEYVALUE...]-seedS``: the split, the memory and plan overrides, the seed."""
    tags = "".join(f"-{key}{value}" for key, value in (*plan.memory, *plan_overrides))
    decoder, encoder = plan.ffn_dims
    return f"d{decoder}-e{encoder}{tags}-seed{seed}"


def parameters(plan: DemoPlan) -> dict[str, int]:
    config = RxTConfig.preset(plan.preset, vocab_size=plan.vocab_size, **model_overrides(plan))
    counts = ReactiveTransformer(config).parameter_counts()
    return {k: counts[k] for k in ("inference", "decoder", "encoder", "memory_attention")}


def prepare(plan: DemoPlan, run: Path, seed: int, current: bool) -> list:
    """The run's data, recipe (the plan's FFN split and memory overrides) and tokenizer;
    returns its tasks."""
    data = write_run(plan, run, seed)
    train_tokenizer(plan, run, data)
    skip = tuple(b for b in BASELINES if not (current and b in CURRENT))
    return run_jobs(plan, run, real_text(data), prefix=f"{run.name}-", skip=skip)


def summary(plan: DemoPlan, run: Path, seed: int) -> dict[str, Any]:
    evals = run / "eval"
    test = eval_systems(evals, names=("rxt", "stateless-current"))
    long = eval_systems(evals, "long-", ("rxt",))
    shakespeare = eval_systems(evals, "shakespeare-", ("rxt", "stateless-current"))

    def by_k(entry: dict[str, Any]) -> dict[str, float]:
        return {k: round(v, 3) for k, v in entry["recall_by_distance"].items()}

    out: dict[str, Any] = {
        "split": "{}:{}".format(*plan.ffn_dims),
        "memory": dict(plan.memory),
        "seed": seed,
        "parameters": parameters(plan),
        "recall": round(test["rxt"]["recall"], 3),
        "recall_by_distance": by_k(test["rxt"]),
        "recall_memory_off": round(test["rxt-memory-off"]["recall"], 3),
        "recall_long": by_k(long["rxt"]) if "rxt" in long else None,
        "shakespeare_ppl": {k: round(v["perplexity"], 2) for k, v in shakespeare.items()},
    }
    if "stateless-current-turn" in test:
        out["current_turn_recall"] = round(test["stateless-current-turn"]["recall"], 3)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| split DEC:ENC | seed | decoder | encoder | inference | recall | k=1 | k=2 | k=16 "
        "| k=32 | ppl RxT | ppl off | ppl current |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, k, far, ppl = (
            r["parameters"],
            r["recall_by_distance"],
            r["recall_long"] or {},
            r["shakespeare_ppl"],
        )
        split = r["split"] + "".join(f" {field}={value}" for field, value in r["memory"].items())
        cells = [split, r["seed"], p["decoder"], p["encoder"], p["inference"], r["recall"],
                 k.get("1"), k.get("2"), far.get("16"), far.get("32"), ppl.get("rxt"),
                 ppl.get("rxt-memory-off"), ppl.get("stateless-current-turn", "–")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/decoder-split"))
    parser.add_argument("--splits", type=_split, nargs="+", default=[(128, 128), (224, 32)])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--memory",
        type=_override,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="memory config overrides for every run (e.g. num_slots=64)",
    )
    parser.add_argument(
        "--plan",
        type=_override,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="DemoPlan overrides for every run (e.g. long_train_dialogues=2000)",
    )
    parser.add_argument("--smat", type=int, help="SMAT steps (default: the demo's)")
    parser.add_argument("--current", action="store_true", help="also the current-turn baseline")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the quick demo's plan (a smoke run)")
    args = parser.parse_args()

    plan = DemoPlan.quick() if args.quick else DemoPlan()
    if args.smat is not None:
        plan = dataclasses.replace(plan, smat_steps=args.smat)
    plan = dataclasses.replace(plan, memory=tuple(args.memory))
    try:
        parameters(plan)  # an unknown field or bad value fails here, by name, not in a job
    except ConfigError as exc:
        parser.error(f"--memory: {exc}")
    fields = {f.name for f in dataclasses.fields(DemoPlan)} - {"memory", "ffn_dims"}
    unknown = sorted(key for key, _ in args.plan if key not in fields)
    if unknown:
        parser.error(f"--plan: unknown DemoPlan field(s) {unknown}; known: {sorted(fields)}")
    plan = dataclasses.replace(plan, **dict(args.plan))
    started = time.perf_counter()
    runs, tasks = [], []
    for seed in args.seeds:
        for i, (dec, enc) in enumerate(args.splits):
            split = dataclasses.replace(plan, ffn_dims=(dec, enc))
            run = args.out / run_name(split, seed, args.plan)
            tasks += prepare(split, run, seed, current=args.current and i == 0)
            runs.append((split, run, seed))
    job_times = run_tasks(tasks, args.out / "logs", workers=args.workers)
    rows = [summary(*run) for run in runs]
    for row in rows:
        print(json.dumps(row))
    print(table(rows))
    smat = ", ".join(f"{k} {v:.0f}" for k, v in job_times.items() if k.endswith("-smat"))
    print(f"wall time {time.perf_counter() - started:.0f} s; SMAT jobs (s): {smat}")


if __name__ == "__main__":
    main()
