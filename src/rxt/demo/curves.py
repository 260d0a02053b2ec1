"""The demo report's learning curves and long-distance results.

Learning curves: SMAT and the full-history baseline score the validation dialogues every
``eval_every`` steps while they train (``runs/STAGE/eval.jsonl``, written by the training loop's
evaluator). Plotted together (``recall_vs_steps.png``) they show whether RxT converges to the
baseline, is still rising when the budget ends, or has levelled off below it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "CURVE_STAGES",
    "DISTANCE_LABEL",
    "curve_lines",
    "learning_curves",
    "long_lines",
    "plot_curves",
    "save_recall_plot",
]

DISTANCE_LABEL = "distance (turns between the fact and its question)"

# report system name -> the stage whose eval.jsonl holds its curve
CURVE_STAGES = {"rxt": "smat", "stateless-full-history": "stateless-full"}


def learning_curves(runs: Path) -> dict[str, list[dict[str, Any]]]:
    """``{system: [{"step", "recall", "recall_by_distance"}, ...]}`` for the systems that
    logged a curve (none in a run without ``eval`` in its recipe)."""
    curves = {}
    for system, stage in CURVE_STAGES.items():
        path = runs / stage / "eval.jsonl"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            curves[system] = [json.loads(line) for line in lines if line.strip()]
    return curves


def curve_lines(curves: dict[str, list[dict[str, Any]]], every: int) -> list[str]:
    """The curves as a markdown table: recall of the validation dialogues by SMAT step."""
    if not curves:
        return []
    steps = sorted({p["step"] for points in curves.values() for p in points})
    by = {s: {p["step"]: p["recall"] for p in points} for s, points in curves.items()}
    lines = [
        f"## Learning curves (validation dialogues, every {every} steps; `recall_vs_steps.png`)",
        "",
        "| step | " + " | ".join(curves) + " |",
        "|---|" + "---|" * len(curves),
    ]
    for step in steps:
        cells = [by[s].get(step) for s in curves]
        lines.append(
            f"| {step} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |"
        )
    return [*lines, ""]


def long_lines(systems: dict[str, Any], distances: list[int]) -> list[str]:
    """Recall at the long test split's distances, per system."""
    if not systems:
        return []
    lines = [
        "## Long distances (a test split asking only at k = "
        + ", ".join(map(str, distances))
        + ")",
        "",
        "| system | " + " | ".join(f"k={k}" for k in distances) + " | all | probes |",
        "|---|" + "---|" * (len(distances) + 2),
    ]
    for name, e in systems.items():
        cells = [e["recall_by_distance"].get(str(k)) for k in distances]
        probes = sum(e["probes_by_distance"].get(str(k), 0) for k in distances)
        lines.append(
            f"| {name} | "
            + " | ".join("–" if v is None else f"{v:.2f}" for v in cells)
            + f" | {e['recall']:.3f} | {probes} |"
        )
    return [*lines, ""]


def plot_curves(curves: dict[str, list[dict[str, Any]]], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p["recall"] for p in points], marker="o", label=name)
    ax.axhline(chance, color="grey", ls=":", label="chance")
    save_recall_plot(
        fig,
        ax,
        path,
        "training step (SMAT, after the two-turn warm-up)",
        "exact-match recall, validation dialogues",
    )


def save_recall_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str) -> None:
    """The demo's recall figures' common frame (labels, 0-1 axis, grid, legend), then save."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
