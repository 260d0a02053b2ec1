"""Latency-vs-turn figure for `rxt bench latency --plot` (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def plot_latency(records: list[dict], path: str | Path, title: str = "") -> None:
    """Time to first token, reply time and prompt size per turn, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'rxt[bench]')"
        ) from exc

    systems: dict[str, list[dict]] = {}
    for record in records:
        systems.setdefault(record["system"], []).append(record)
    panels = [
        ("ttft_s", "time to first token (ms)", 1e3),
        ("reply_s", "full reply (ms)", 1e3),
        ("prompt_tokens", "prompt tokens", 1),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for system, rows in systems.items():
            turns = [r["turn"] for r in rows]
            ax.plot(turns, [r[key] * scale for r in rows], marker=".", label=system)
        if key == "ttft_s" and "rxt" in systems:
            rows = systems["rxt"]
            updates = [r["memory_update_s"] * 1e3 for r in rows]
            ax.plot([r["turn"] for r in rows], updates, ls=":", label="rxt memory update (async)")
        ax.set_xlabel("turn")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
