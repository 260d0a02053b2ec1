"""The state-bytes benchmark's figures (matplotlib, files only).

* ``recall_vs_state.png``: test recall against state bytes (log scale), one line per system,
  one panel per task (seed 0, each system's chosen rate). The full-attention model is one
  marker at its cache's size after the last turn of a test dialogue (it grows).
* ``recall_vs_distance.png``: recall by distance (turns; tokens for ``mqar-sequence``) at the
  headline state size, mean over the seeds, one panel per task.
* ``cost_vs_turn.png``: per-turn FLOPs and state bytes against the turn, headline size, for
  the first task's dialogues of mean turn length.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["plot_all"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plots need matplotlib: pip install 'rxt[bench]'") from exc
    return plt


def _ok(results: dict) -> list[dict]:
    return [r for r in results["records"] if "error" not in r]


def _by_task_system(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["task"]][r["system"]].append(r)
    return out


def _chosen(results: dict, task: str, system: str, rows: list[dict]) -> list[dict]:
    lr = results["best_lr"].get(f"{task}/{system}")
    return [r for r in rows if r["lr"] == lr]


def _task_panels(plt, tasks: int):
    """One panel per task, side by side."""
    return plt.subplots(1, max(1, tasks), figsize=(5 * max(1, tasks), 4), squeeze=False)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the three figures into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = results["config"]
    seed0, headline = config["seeds"][0], config["headline"]
    grouped = _by_task_system(_ok(results))
    tasks = [t for t in config["tasks"] if t in grouped]
    paths = []

    fig, axes = _task_panels(plt, len(tasks))
    for ax, task in zip(axes[0], tasks, strict=False):
        for system, rows in sorted(grouped[task].items()):
            rows = [r for r in _chosen(results, task, system, rows) if r["seed"] == seed0]
            if system == "llama":
                xs = [r["state_bytes_by_turn"][-1] for r in rows]
                ax.scatter(
                    xs, [r["test"]["recall"] for r in rows], marker="s", label="llama (grows)"
                )
                continue
            rows.sort(key=lambda r: r["state_bytes"])
            ax.plot(
                [r["state_bytes"] for r in rows],
                [r["test"]["recall"] for r in rows],
                "o-",
                label=system,
            )
        ax.set(
            xscale="log",
            xlabel="state bytes per conversation",
            ylabel="test recall",
            title=task,
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "recall_vs_state.png"))

    fig, axes = _task_panels(plt, len(tasks))
    for ax, task in zip(axes[0], tasks, strict=False):
        for system, rows in sorted(grouped[task].items()):
            rows = [
                r for r in _chosen(results, task, system, rows) if r["state_target"] == headline
            ]
            sums: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                for k, v in r["test"].get("recall_by_distance", {}).items():
                    sums[int(k)].append(v)
            ks = sorted(sums)
            ax.plot(ks, [sum(sums[k]) / len(sums[k]) for k in ks], "o-", label=system)
        unit = "tokens" if task == "mqar-sequence" else "turns"
        ax.set(
            xlabel=f"distance ({unit})",
            ylabel="test recall",
            title=f"{task}, state {headline}",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "recall_vs_distance.png"))

    fig, (flops_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    task = tasks[0] if tasks else None
    for system, rows in sorted(grouped.get(task, {}).items()):
        rows = [r for r in rows if r["state_target"] == headline and r["seed"] == seed0]
        if not rows:
            continue
        r = rows[0]
        turns = range(1, len(r["flops_by_turn"]) + 1)
        flops_ax.plot(turns, [f / 1e6 for f in r["flops_by_turn"]], "o-", label=system)
        bytes_ax.plot(turns, r["state_bytes_by_turn"], "o-", label=system)
    flops_ax.set(xlabel="turn", ylabel="MFLOPs per turn", title=f"per-turn compute ({task})")
    bytes_ax.set(
        xlabel="turn",
        ylabel="state bytes after the turn",
        yscale="log",
        title="state kept between turns",
    )
    flops_ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "cost_vs_turn.png"))
    return paths
