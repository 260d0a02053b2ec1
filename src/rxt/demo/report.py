"""The demo's report: ``report.json``, ``report.md`` and the figures (recall by distance, by
training step, latency by turn).

``report.json`` = ``{"systems": {name: entry}, "ablations": {...}, "long": {name: entry},
"learning_curves": {name: [{step, recall, ...}]}, "shakespeare": {...}, "chitchat": {...},
"targets": [...], "training": {...}, "latency": [...], "conversation": [...], "settings": {...},
...}``; each system entry holds ``recall_by_distance`` (distance → exact match),
``recall_by_kind`` (probe kind → exact match), ``perplexity``, ``accuracy``, ``reward``
(mean/max/min of the composite reward) and ``errors`` (:func:`rxt.eval.errors.recall_errors`), as
written by ``rxt eval``; entries of an older ``rxt eval`` may lack the per-kind fields and the
errors, and their tables then say so with "–". ``conversation`` is the scripted conversation of
:mod:`rxt.demo.conversation`, one ``{query, reply, expected, correct}`` per turn.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from rxt.demo.conversation import recalled_every_fact
from rxt.demo.curves import DISTANCE_LABEL, learning_curves, plot_curves, save_recall_plot
from rxt.demo.report_markdown import ABLATIONS, SYSTEMS, markdown
from rxt.results import environment, write_json

__all__ = ["check_targets", "eval_systems", "write_report"]

# The trained models whose `rxt eval` outputs the report reads (eval/NAME.json).
MAIN_MODELS = ("rxt", "stateless-full", "stateless-current")
CONVERSATION_TARGET = "The scripted conversation recalls every fact it is asked about"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def eval_systems(
    evals: Path, prefix: str = "", names: tuple[str, ...] = MAIN_MODELS
) -> dict[str, Any]:
    """The ``systems`` of every ``evals/{prefix}{name}.json`` that exists, merged (one ``rxt
    eval`` output per trained model; RxT's holds its memory on/off/swapped entries)."""
    systems: dict[str, Any] = {}
    for name in names:
        path = evals / f"{prefix}{name}.json"
        if path.is_file():
            systems.update(_read(path)["systems"])
    return systems


def _recall(entry: dict[str, Any], distance: int) -> float | None:
    return entry.get("recall_by_distance", {}).get(str(distance))


def check_targets(
    systems: dict[str, Any],
    shakespeare: dict[str, Any],
    conversation: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met (the scripted
    conversation's only when one was played)."""
    rxt, off = systems["rxt"], systems["rxt-memory-off"]
    full, current = systems["stateless-full-history"], systems["stateless-current-turn"]
    targets = []

    def add(name: str, measured: Any, met: bool | None) -> None:
        targets.append({"target": name, "measured": measured, "met": met})

    def at(entry: dict[str, Any], distances: range) -> dict[str, float | None]:
        return {str(k): _recall(entry, k) for k in distances}

    near = at(rxt, range(1, 3))
    add(
        "RxT recall >= 0.90 at distances 1-2",
        near,
        all(v is not None and v >= 0.9 for v in near.values()),
    )
    mid = at(rxt, range(3, 9))
    add(
        "RxT recall >= 0.80 at every distance 3-8",
        mid,
        all(v is not None and v >= 0.8 for v in mid.values()),
    )
    chance = rxt.get("chance") or 0.0
    add(
        "memory-off recall within 0.05 of chance",
        {"recall": off["recall"], "chance": chance},
        abs(off["recall"] - chance) <= 0.05,
    )
    add(
        "current-turn baseline recall near chance (within 0.05)",
        {"recall": current["recall"], "chance": chance},
        abs(current["recall"] - chance) <= 0.05,
    )
    gaps = {}
    for k in range(1, 9):
        a, b = _recall(rxt, k), _recall(full, k)
        if a is not None and b is not None:
            gaps[str(k)] = round(b - a, 4)
    add(
        "RxT within 0.05 of the full-history baseline (or above it) at every distance <= 8",
        {"full_minus_rxt": gaps},
        bool(gaps) and all(g <= 0.05 for g in gaps.values()),
    )
    if shakespeare:
        ppl = {k: v["perplexity"] for k, v in shakespeare.items()}
        met = None
        if ppl.get("rxt") is not None and ppl.get("stateless-current-turn") is not None:
            met = ppl["rxt"] < ppl["stateless-current-turn"]
        add("Shakespeare: RxT answer perplexity below the current-turn baseline", ppl, met)
    if conversation is not None:
        asked = [t for t in conversation if t["expected"] is not None]
        recalled = sum(bool(t["correct"]) for t in asked)
        add(
            CONVERSATION_TARGET,
            {"asked": len(asked), "recalled": recalled},
            recalled_every_fact(conversation),
        )
    return targets


def _training(runs: Path, job_times: dict[str, float]) -> dict[str, Any]:
    out = {}
    for name, seconds in job_times.items():
        log = runs / name / "log.jsonl"
        if not log.is_file():
            continue
        lines = log.read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
        out[name] = {
            "seconds": round(seconds, 1),
            "steps": last.get("step"),
            "final": {k: v for k, v in last.items() if k not in ("step", "lr")},
        }
    return out


def _parameters(runs: Path) -> dict[str, Any]:
    """RxT's counts (total, at inference, ...) and each baseline's total."""
    from rxt.model.reactive_transformer import ReactiveTransformer

    counts: dict[str, Any] = {}
    if (runs / "smat" / "model").is_dir():
        counts["rxt"] = ReactiveTransformer.from_pretrained(
            runs / "smat" / "model"
        ).parameter_counts()
    for name in ("stateless-full", "stateless-current"):
        path = runs / name / "model" / "model.safetensors"
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                counts[name] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return counts


def _baselines(runs: Path, parameters: dict[str, Any]) -> dict[str, str]:
    """What each stateless baseline in the report is: the recall table's trained,
    parameter-matched models and the latency section's untrained one differ in depth."""
    labels: dict[str, str] = {}
    for name in ("stateless-full", "stateless-current"):
        path = runs / name / "model" / "config.json"
        if path.is_file():
            c = _read(path)
            labels[name] = (
                f"transformers Llama, {c['num_hidden_layers']} layers, d {c['hidden_size']}, "
                f"{parameters.get(name, 0):,} parameters (RxT at inference: "
                f"{parameters.get('rxt', {}).get('inference', 0):,}), trained on the same dialogues"
            )
    path = runs / "smat" / "model" / "config.json"
    if path.is_file():
        c = _read(path)
        labels["latency"] = (
            f"transformers Llama of the RxT decoder's size ({c['num_layers']} layers, d "
            f"{c['d_model']}, no memory cross-attention), random weights: timing only, not the "
            "recall baselines"
        )
    return labels


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _latency_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["system"], []).append(r)
    n = max(1, min(4, min(len(v) for v in by.values()) // 2)) if by else 1
    ttft = {
        s: {
            "first": statistics.median(r["ttft_s"] for r in rows[:n]) * 1e3,
            "last": statistics.median(r["ttft_s"] for r in rows[-n:]) * 1e3,
        }
        for s, rows in by.items()
    }
    prompts = {s: rows[-1]["prompt_tokens"] for s, rows in by.items()}
    return {"first_turns": n, "last_turns": n, "ttft_ms": ttft, "prompt_tokens_last": prompts}


def _plot_recall(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    entries = {
        **{n: report["systems"][n] for n in SYSTEMS if n in report["systems"]},
        **report["ablations"],
    }
    for name, e in entries.items():
        ks = sorted(int(k) for k in e["recall_by_distance"])
        style = "--" if name.startswith("ablation") else "-"
        ax.plot(ks, [e["recall_by_distance"][str(k)] for k in ks], style, marker="o", label=name)
    ax.axhline(report["data"]["chance"], color="grey", ls=":", label="chance")
    save_recall_plot(fig, ax, path, DISTANCE_LABEL, "exact-match recall")


def write_report(
    out: Path,
    plan: Any,
    data: dict[str, Any],
    job_times: dict[str, float],
    latency: list[dict[str, Any]],
    timings: dict[str, float],
    conversation: list[dict[str, Any]] | None = None,
    budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md and the figures from the eval JSONs under ``out/eval``;
    ``conversation`` is :func:`rxt.demo.conversation.play_script`'s, when one was played;
    ``budget``: what the time budget measured and chose (a budgeted run)."""
    from rxt.bench.plot import plot_latency

    evals = out / "eval"
    systems: dict[str, Any] = {}
    for name in ("rxt", "stateless-full", "stateless-current"):
        systems.update(_read(evals / f"{name}.json")["systems"])
    ablations = {
        name: _read(evals / f"{name}.json")["systems"]["rxt"]
        for name in ABLATIONS
        if (evals / f"{name}.json").is_file()
    }
    shakespeare = eval_systems(evals, "shakespeare-")
    chitchat = eval_systems(evals, "chitchat-")
    long_systems = eval_systems(evals, "long-")
    parameters = _parameters(out / "runs")
    curves = learning_curves(out / "runs")
    report = {
        "systems": systems,
        "ablations": ablations,
        "long": long_systems,
        "learning_curves": curves,
        "shakespeare": shakespeare,
        "chitchat": chitchat,
        "targets": check_targets(systems, shakespeare, conversation),
        "training": _training(out / "runs", job_times),
        "parameters": parameters,
        "baselines": _baselines(out / "runs", parameters),
        "latency": latency,
        "latency_summary": _latency_summary(latency),
        "conversation": conversation or [],
        "data": data,
        "settings": dataclasses.asdict(plan),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "budget": budget,
        "environment": environment("cpu"),
    }
    met = sum(t["met"] is True for t in report["targets"])
    report["summary"] = (
        f"targets met: {met}/{len(report['targets'])}; RxT recall {systems['rxt']['recall']:.3f}, "
        f"memory off {systems['rxt-memory-off']['recall']:.3f}, full history "
        f"{systems['stateless-full-history']['recall']:.3f}, current turn "
        f"{systems['stateless-current-turn']['recall']:.3f} (chance {data['chance']:.3f})"
    )
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    _plot_recall(report, out / "recall_vs_distance.png")
    if curves:
        plot_curves(curves, data["chance"], out / "recall_vs_steps.png")
    plot_latency(latency, out / "latency_vs_turn.png", title="latency per turn (trained RxT)")
    return report
