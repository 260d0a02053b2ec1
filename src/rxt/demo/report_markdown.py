"""``report.md``: the demo report's tables and text, rendered from ``report.json``'s dict.

Which systems the tables compare, the error classes' column names, and the ablations' labels
live here (the report's JSON side, :mod:`rxt.demo.report`, reads the same names).
"""

from __future__ import annotations

import json
from typing import Any

from rxt.demo.conversation import one_line
from rxt.demo.curves import curve_lines, long_lines

__all__ = [
    "ABLATIONS",
    "ERROR_COLUMNS",
    "MAIN_SYSTEMS",
    "SYSTEMS",
    "conversation_section",
    "error_table",
    "kind_table",
    "latency_section",
    "markdown",
]

SYSTEMS = (
    "rxt",
    "rxt-memory-off",
    "rxt-memory-swapped",
    "stateless-full-history",
    "stateless-current-turn",
)
# The systems the per-kind table compares: RxT with and without memory, and both baselines.
MAIN_SYSTEMS = (
    "rxt",
    "rxt-memory-off",
    "stateless-full-history",
    "stateless-current-turn",
)
# rxt.eval.errors' classes as the error table names them (column → key of "errors").
ERROR_COLUMNS = {
    "same pool absent": "same_pool_absent",
    "in dialogue": "same_pool_in_dialogue",
    "other pool": "other_pool",
    "malformed": "not_a_value",
    "wrong at first token": "wrong_first_token",
}
# Real-text corpora in the report (answer perplexity and accuracy of every system).
REAL_TEXT_TITLES = {
    "shakespeare": "Shakespeare (held-out plays)",
    "chitchat": "Chit Chat (held-out conversations)",
}

ABLATIONS = {
    "ablation-no-memory": "without stage 3",
    "ablation-horizon-1": "gradient horizon 1, not full",
}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    systems, ablations = report["systems"], report["ablations"]
    distances = sorted({int(k) for e in systems.values() for k in e["recall_by_distance"]})
    lines = ["# rxt demo report", ""]
    facts = report["data"].get("train_facts")
    asked = f" (each asking {facts[0]}–{facts[1]} facts, turns allowing)" if facts else ""
    lines += [
        f"Data: {report['data']['probes-train']} training probe dialogues{asked} + "
        f"{report['data']['warmup']} two-turn warm-up dialogues; test: "
        f"{report['data']['probes-test']} held-out dialogues; chance level "
        f"{report['data']['chance']:.4f}. Wall time {report['timings']['total']:.0f} s "
        f"on {report['environment'].get('cpu_count', '?')} CPU cores.",
        "",
    ]
    budget = report.get("budget")
    steps = report["settings"]["smat_steps"]
    if budget:
        per_step = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in budget["per_step_s"].items())
        lines += [
            f"Training length: {steps} SMAT steps for RxT and each baseline, as many as the "
            f"{budget['budget_s'] / 60:.1f}-minute budget allowed on this machine (step times "
            f"measured before choosing: {per_step}; predicted end "
            f"{budget['predicted_total_s']:.0f} s, actual {budget.get('actual_total_s', 0):.0f} "
            "s). Another machine trains another number of steps: compare runs by their steps.",
            "",
        ]
        first = budget.get("full_first_steps")
        if first is not None:
            lines += [
                f"The full-history baseline trained in two parts ({first} steps, then the other "
                f"{steps - first} resumed from its checkpoint on the other worker, exactly as one "
                "run), so both workers ended together.",
                "",
            ]
    else:
        lines += [f"Training length: {steps} SMAT steps for RxT and each baseline (fixed).", ""]
    lines += ["## Recall (exact match) by distance, held-out probe dialogues", ""]
    header = (
        "| system | " + " | ".join(f"k={k}" for k in distances) + " | all | ppl | acc | reward |"
    )
    lines += [header, "|" + "---|" * (len(distances) + 5)]
    rows = [(n, systems[n]) for n in SYSTEMS if n in systems]
    rows += [(f"{n} ({ABLATIONS[n]})", e) for n, e in ablations.items()]
    for name, e in rows:
        cells = [fmt(e["recall_by_distance"].get(str(k)), 2) for k in distances]
        reward = e.get("reward", {}).get("mean")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fmt(e['recall'], 3)} | "
            f"{fmt(e['perplexity'])} | {fmt(e['accuracy'])} | {fmt(reward, 2)} |"
        )
    baselines = report.get("baselines", {})
    for name in ("stateless-full", "stateless-current"):
        if name in baselines:
            lines += ["", f"`{name}-*`: {baselines[name]}."]
    lines += [
        "",
        "Probes per distance: "
        + ", ".join(f"{k}: {v}" for k, v in systems["rxt"]["probes_by_distance"].items()),
        "",
    ]
    lines += long_lines(report.get("long", {}), report["data"].get("long_test_distances", []))
    lines += curve_lines(report.get("learning_curves", {}), report["settings"].get("eval_every"))
    lines += kind_table(systems)
    lines += error_table(systems)
    for key, title in REAL_TEXT_TITLES.items():
        if not report.get(key):
            continue
        lines += [f"## {title}, answer tokens", "", "| system | ppl | acc |", "|---|---|---|"]
        for name, e in report[key].items():
            lines.append(f"| {name} | {fmt(e['perplexity'])} | {fmt(e['accuracy'])} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | `{json.dumps(t['measured'])}` | {met} |")
    lines += conversation_section(report.get("conversation", []))
    lines += latency_section(report["latency_summary"], baselines.get("latency"))
    lines += [
        "",
        "## Training",
        "",
        "| stage | steps | seconds | final loss |",
        "|---|---|---|---|",
    ]
    for name, t in report["training"].items():
        lines.append(
            f"| {name} | {t['steps']} | {t['seconds']} | {fmt(t['final'].get('loss'), 4)} |"
        )
    lines += ["", f"Parameters: {json.dumps(report['parameters'])}", ""]
    return "\n".join(lines)


LATENCY_ROWS = {"rxt": "RxT (trained)", "stateless": "stateless baseline"}
LATENCY_BASELINE = "transformers Llama of the RxT decoder's size, random weights (timing only)"


def latency_section(summary: dict[str, Any], baseline: str | None) -> list[str]:
    """Time to first token of RxT and of the stateless baseline, saying what the baseline is
    and what the clock holds (rxt.bench.latency: the same span for both systems)."""
    lines = ["", "## Latency per turn (trained RxT vs a stateless transformers model)", ""]
    lines += [
        f"Stateless baseline: {baseline or LATENCY_BASELINE}. It re-reads the whole "
        "conversation every turn; RxT reads its fixed-size memory instead.",
        "",
        "Time to first token: from the call that hands a system the turn's prompt ids until the "
        "calling thread holds the first new token, clocked the same way for both systems, each "
        "run after an untimed turn of the same system (docs/benchmarks.md). Medians of turns: "
        f"first {summary['first_turns']}, last {summary['last_turns']} (ms). See "
        "`latency_vs_turn.png`.",
        "",
        "| system | prompt tokens at the last turn | first turns | last turns |",
        "|---|---|---|---|",
    ]
    prompts = summary.get("prompt_tokens_last", {})
    for system, v in summary["ttft_ms"].items():
        name = LATENCY_ROWS.get(system, system)
        lines.append(
            f"| {name} | {fmt(prompts.get(system))} | {v['first']:.2f} | {v['last']:.2f} |"
        )
    return lines


def kind_table(systems: dict[str, Any]) -> list[str]:
    """Recall by fact kind of the main systems; nothing when no entry has it (an older eval)."""
    rows = [(n, systems[n]) for n in MAIN_SYSTEMS if n in systems]
    kinds = sorted({k for _, e in rows for k in e.get("recall_by_kind", {})})
    if not kinds:
        return []
    lines = ["## Recall (exact match) by fact kind, held-out probe dialogues", ""]
    lines += ["| system | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for name, e in rows:
        cells = [fmt(e.get("recall_by_kind", {}).get(k), 2) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = next((e["probes_by_kind"] for _, e in rows if e.get("probes_by_kind")), {})
    if counts:
        lines += ["", "Probes per kind: " + ", ".join(f"{k}: {v}" for k, v in counts.items())]
    return [*lines, ""]


def error_table(systems: dict[str, Any]) -> list[str]:
    """What the wrong answers were (rxt.eval.errors), one row per system that has the
    breakdown; nothing when none has it."""
    rows = [(n, systems[n]["errors"]) for n in SYSTEMS if systems.get(n, {}).get("errors")]
    if not rows:
        return []
    lines = [
        "## Wrong recall answers, by what was answered instead",
        "",
        "| system | wrong | " + " | ".join(ERROR_COLUMNS) + " |",
        "|" + "---|" * (len(ERROR_COLUMNS) + 2),
    ]
    for name, errors in rows:
        wrong = f"{fmt(errors.get('wrong'))}/{fmt(errors.get('probes'))}"
        cells = [fmt(errors.get(key)) for key in ERROR_COLUMNS.values()]
        lines.append(f"| {name} | {wrong} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Same pool absent: a value of the right kind said nowhere in the dialogue; in dialogue: "
        "a value of the right kind said for another fact; other pool: a value of another kind; "
        "malformed: not a value at all. Wrong at first token: the reply's first token already "
        "differs from the gold answer's.",
        "",
    ]
    return lines


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return one_line(text).replace("|", "\\|")


def conversation_section(turns: list[dict[str, Any]]) -> list[str]:
    if not turns:
        return []
    lines = [
        "",
        "## A conversation",
        "",
        "The trained RxT through the inference engine, greedy, from a fixed script in the probe "
        "generator's words; it reads only its memory of the earlier turns (its own replies "
        "included), not the transcript.",
        "",
        "| turn | user | rxt | recalled |",
        "|---|---|---|---|",
    ]
    for i, t in enumerate(turns, 1):
        mark = ""
        if t["expected"] is not None:
            mark = "✓" if t["correct"] else f"✗ (expected {cell(t['expected'])})"
        lines.append(f"| {i} | {cell(t['query'])} | {cell(t['reply'])} | {mark} |")
    return lines
