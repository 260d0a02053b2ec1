"""The demo's report: ``report.json``, ``report.md`` and the two figures.

``report.json`` = ``{"systems": {name: entry}, "ablations": {...}, "shakespeare": {...},
"targets": [...], "training": {...}, "latency": [...], "settings": {...}, ...}``; each system
entry holds ``recall_by_distance`` (distance → exact match), ``perplexity``, ``accuracy`` and
``reward`` (mean/max/min of the composite reward), as written by ``rxt eval``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from rxt.bench.common import environment, write_json

__all__ = ["check_targets", "write_report"]

SYSTEMS = (
    "rxt",
    "rxt-memory-off",
    "rxt-memory-swapped",
    "stateless-full-history",
    "stateless-current-turn",
)
ABLATIONS = {
    "ablation-no-memory": "without stage 3",
    "ablation-horizon-1": "gradient horizon 1, not full",
}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _recall(entry: dict[str, Any], distance: int) -> float | None:
    return entry.get("recall_by_distance", {}).get(str(distance))


def check_targets(systems: dict[str, Any], shakespeare: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
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
    mid = at(rxt, range(4, 9))
    add(
        "RxT recall >= 0.70 at distances 4-8",
        mid,
        all(v is not None and v >= 0.7 for v in mid.values()),
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
        "RxT within 0.10 of the full-history baseline at every distance <= 8",
        {"full_minus_rxt": gaps},
        bool(gaps) and all(g <= 0.10 for g in gaps.values()),
    )
    if shakespeare:
        ppl = {k: v["perplexity"] for k, v in shakespeare.items()}
        met = None
        if ppl.get("rxt") is not None and ppl.get("stateless-current-turn") is not None:
            met = ppl["rxt"] < ppl["stateless-current-turn"]
        add("Shakespeare: RxT answer perplexity below the current-turn baseline", ppl, met)
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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(report: dict[str, Any]) -> str:
    systems, ablations = report["systems"], report["ablations"]
    distances = sorted({int(k) for e in systems.values() for k in e["recall_by_distance"]})
    lines = ["# rxt demo report", ""]
    lines += [
        f"Data: {report['data']['probes-train']} training probe dialogues + "
        f"{report['data']['warmup']} two-turn warm-up dialogues; test: "
        f"{report['data']['probes-test']} held-out dialogues; chance level "
        f"{report['data']['chance']:.4f}. Wall time {report['timings']['total']:.0f} s "
        f"on {report['environment'].get('cpu_count', '?')} CPU cores.",
        "",
    ]
    lines += ["## Recall (exact match) by distance, held-out probe dialogues", ""]
    header = (
        "| system | " + " | ".join(f"k={k}" for k in distances) + " | all | ppl | acc | reward |"
    )
    lines += [header, "|" + "---|" * (len(distances) + 5)]
    rows = [(n, systems[n]) for n in SYSTEMS if n in systems]
    rows += [(f"{n} ({ABLATIONS[n]})", e) for n, e in ablations.items()]
    for name, e in rows:
        cells = [_fmt(e["recall_by_distance"].get(str(k)), 2) for k in distances]
        reward = e.get("reward", {}).get("mean")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_fmt(e['recall'], 3)} | "
            f"{_fmt(e['perplexity'])} | {_fmt(e['accuracy'])} | {_fmt(reward, 2)} |"
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
    if report["shakespeare"]:
        lines += [
            "## Shakespeare (held-out plays), answer tokens",
            "",
            "| system | ppl | acc |",
            "|---|---|---|",
        ]
        for name, e in report["shakespeare"].items():
            lines.append(f"| {name} | {_fmt(e['perplexity'])} | {_fmt(e['accuracy'])} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | `{json.dumps(t['measured'])}` | {met} |")
    lines += ["", "## Latency per turn (trained RxT vs a stateless transformers model)", ""]
    lat = report["latency_summary"]
    if "latency" in baselines:
        lines += [f"The stateless model here: {baselines['latency']}.", ""]
    lines += [
        f"Time to first token, median of turns: first {lat['first_turns']}, last "
        f"{lat['last_turns']} (ms). See `latency_vs_turn.png`.",
        "",
        "| system | first turns | last turns |",
        "|---|---|---|",
    ]
    for system, v in lat["ttft_ms"].items():
        lines.append(f"| {system} | {v['first']:.2f} | {v['last']:.2f} |")
    lines += [
        "",
        "## Training",
        "",
        "| stage | steps | seconds | final loss |",
        "|---|---|---|---|",
    ]
    for name, t in report["training"].items():
        lines.append(
            f"| {name} | {t['steps']} | {t['seconds']} | {_fmt(t['final'].get('loss'), 4)} |"
        )
    lines += ["", f"Parameters: {json.dumps(report['parameters'])}", ""]
    return "\n".join(lines)


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
    return {"first_turns": n, "last_turns": n, "ttft_ms": ttft}


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
    ax.set_xlabel("distance (turns between the fact and its question)")
    ax.set_ylabel("exact-match recall")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path,
    plan: Any,
    data: dict[str, Any],
    job_times: dict[str, float],
    latency: list[dict[str, Any]],
    timings: dict[str, float],
) -> dict[str, Any]:
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
    shakespeare: dict[str, Any] = {}
    for name in ("rxt", "stateless-full", "stateless-current"):
        path = evals / f"shakespeare-{name}.json"
        if path.is_file():
            shakespeare.update(_read(path)["systems"])
    parameters = _parameters(out / "runs")
    report = {
        "systems": systems,
        "ablations": ablations,
        "shakespeare": shakespeare,
        "targets": check_targets(systems, shakespeare),
        "training": _training(out / "runs", job_times),
        "parameters": parameters,
        "baselines": _baselines(out / "runs", parameters),
        "latency": latency,
        "latency_summary": _latency_summary(latency),
        "data": data,
        "settings": dataclasses.asdict(plan),
        "timings": {k: round(v, 1) for k, v in timings.items()},
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
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    _plot_recall(report, out / "recall_vs_distance.png")
    plot_latency(latency, out / "latency_vs_turn.png", title="latency per turn (trained RxT)")
    return report
