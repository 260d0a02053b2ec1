"""``rxt demo --long``: the demo's main comparison at a longer budget, over three seeds.

Seeds are how an effect is told from noise: at this size one run's recall moves by about ±0.05
from seed to seed. Each seed ``s`` is a whole demo run in ``OUT/seed-s`` (its own data, drawn
with seed s, its own tokenizer, weights, data order and dropout), training RxT and the
full-history baseline for :meth:`DemoPlan.long`'s steps; all seeds' jobs share one scheduler of
one-thread workers. The report (``OUT/report-long.json``, ``report-long.md``,
``recall_vs_distance_seeds.png``) gives per distance the mean over seeds and the spread (min,
max, standard deviation), on the usual test split and on the long one (k = 16, 32).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rxt.demo.curves import DISTANCE_LABEL, save_recall_plot
from rxt.demo.jobs import run_tasks
from rxt.demo.plan import DemoPlan
from rxt.demo.report import eval_systems
from rxt.results import environment, write_json

__all__ = ["SEEDS", "aggregate", "run_long_demo"]

SEEDS = (0, 1, 2)
# The current-turn baseline is a control at chance by construction; --long leaves it out.
SKIP = ("stateless-current-warmup", "stateless-current")
SYSTEMS = ("rxt", "rxt-memory-off", "stateless-full-history")
MODELS = ("rxt", "stateless-full")  # the trained models whose evaluations are read


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{system: {distance or "all": {mean, sd, min, max, n}}}`` over the seeds' entries
    (``per_seed[i][system]`` is seed i's ``rxt eval`` entry)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for system in SYSTEMS:
        entries = [seed[system] for seed in per_seed if system in seed]
        if not entries:
            continue
        keys = sorted({k for e in entries for k in e["recall_by_distance"]}, key=int)
        values = {k: [e["recall_by_distance"][k] for e in entries if k in e["recall_by_distance"]]
                  for k in keys}  # fmt: skip
        values["all"] = [e["recall"] for e in entries]
        out[system] = {k: _spread(v) for k, v in values.items()}
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# rxt demo --long report",
        "",
        f"Seeds {report['seeds']}; SMAT and the baseline {report['settings']['smat_steps']} "
        f"steps each; wall time {report['timings']['total']:.0f} s on "
        f"{report['environment'].get('cpu_count', '?')} CPU cores. Cells: mean over seeds "
        "(min–max).",
        "",
    ]
    for title, table in (("Test split", report["recall"]), ("Long test split", report["long"])):
        keys = sorted({k for s in table.values() for k in s if k != "all"}, key=int)
        lines += [f"## {title}", "", "| system | " + " | ".join(f"k={k}" for k in keys)
                  + " | all |", "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
        for system, cells in table.items():
            row = [_cell(cells.get(k)) for k in [*keys, "all"]]
            lines.append(f"| {system} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join([*lines, ""])


def _cell(s: dict[str, float] | None) -> str:
    return "–" if s is None else f"{s['mean']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def _targets(recall: dict[str, Any], long: dict[str, Any]) -> list[dict[str, Any]]:
    rxt, rxt_long = recall.get("rxt", {}), long.get("rxt", {})
    near = {k: round(rxt[str(k)]["mean"], 3) for k in range(1, 9) if str(k) in rxt}
    far = {k: round(rxt_long[str(k)]["mean"], 3) for k in (16, 32) if str(k) in rxt_long}
    return [
        {
            "target": "RxT >= 0.90 at every k = 1-8, mean of the seeds",
            "measured": near,
            "met": len(near) == 8 and all(v >= 0.9 for v in near.values()),
        },
        {
            "target": "RxT >= 0.85 at k = 16 and 32, mean of the seeds",
            "measured": far,
            "met": len(far) == 2 and all(v >= 0.85 for v in far.values()),
        },
    ]


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in ("rxt", "stateless-full-history"):
        cells = {**report["recall"].get(system, {}), **report["long"].get(system, {})}
        keys = sorted((k for k in cells if k != "all"), key=int)
        mean = [cells[k]["mean"] for k in keys]
        low = [cells[k]["mean"] - cells[k]["min"] for k in keys]
        high = [cells[k]["max"] - cells[k]["mean"] for k in keys]
        ax.errorbar([int(k) for k in keys], mean, yerr=[low, high], marker="o", capsize=3,
                    label=f"{system} (mean, min–max of {len(report['seeds'])} seeds)")  # fmt: skip
    ax.set_xscale("log", base=2)
    save_recall_plot(fig, ax, path, DISTANCE_LABEL, "exact-match recall")


def run_long_demo(
    out: str | Path = "runs/demo-long",
    *,
    seeds: tuple[int, ...] = SEEDS,
    workers: int = 2,
    progress: bool = True,
    plan: DemoPlan | None = None,
    in_process: Callable[[list[str]], int] | None = None,
) -> dict[str, Any]:
    """Every seed's run, then the report over seeds (module docstring). ``plan``: for tests;
    ``in_process``: as in :func:`~rxt.demo.jobs.run_tasks` (needed for ``workers=0``)."""
    from rxt.demo.pipeline import run_jobs, train_tokenizer, write_run

    plan = plan or DemoPlan.long()
    out = Path(out)
    started = time.perf_counter()
    tasks = []
    for seed in seeds:
        run = out / f"seed-{seed}"
        train_tokenizer(plan, run, write_run(plan, run, seed))
        tasks += run_jobs(plan, run, prefix=f"seed{seed}-", skip=SKIP)
        print(f"[seed {seed}] data and tokenizer in {run}", flush=True)
    job_times = run_tasks(
        tasks, out / "logs", workers=workers, progress=progress, in_process=in_process
    )
    per_seed = [eval_systems(out / f"seed-{s}" / "eval", names=MODELS) for s in seeds]
    per_seed_long = [eval_systems(out / f"seed-{s}" / "eval", "long-", MODELS) for s in seeds]
    recall, long = aggregate(per_seed), aggregate(per_seed_long)
    report = {
        "seeds": list(seeds),
        "recall": recall,
        "long": long,
        "targets": _targets(recall, long),
        "per_seed": {
            str(s): {"test": a, "long": b}
            for s, a, b in zip(seeds, per_seed, per_seed_long, strict=True)
        },
        "settings": {"smat_steps": plan.smat_steps, "eval_every": plan.eval_every},
        "job_seconds": {k: round(v, 1) for k, v in job_times.items()},
        "timings": {"total": round(time.perf_counter() - started, 1)},
        "environment": environment("cpu"),
    }
    write_json(out / "report-long.json", report)
    (out / "report-long.md").write_text(_markdown(report), encoding="utf-8")
    _plot(report, out / "recall_vs_distance_seeds.png")
    met = sum(t["met"] is True for t in report["targets"])
    print(f"targets met: {met}/{len(report['targets'])}; report: {out / 'report-long.md'}")
    return report
