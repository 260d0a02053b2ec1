"""Recall per state byte: RxT against fixed-state language models on MQAR and bAbI-in-dialogue.

    python benchmarks/state_bytes.py --out runs/state-bytes                 # the default grid
    python benchmarks/state_bytes.py --quick --out runs/state-bytes-quick   # a smoke run
    python benchmarks/state_bytes.py --config grid.json --out runs/x        # a grid of your own

The grid (``rxt.bench.memory_grid.GridConfig``; a JSON or YAML file of its fields overrides the
default, ``--set KEY=VALUE`` single fields) trains every system on every task with the same
data, steps, batch, optimiser and learning-rate sweep, scores test exact match with one rule
(``rxt.bench.memory_score``), and writes ``OUT/results.json`` and three figures
(``rxt.bench.memory_plot``). Interrupted runs resume: finished runs are kept in ``OUT/runs``.
Every worker process runs one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rxt.bench.memory_grid import GridConfig, run_grid
from rxt.bench.memory_plot import plot_all


def load_config(path: str | None, quick: bool, sets: list[str]) -> GridConfig:
    base = GridConfig.quick() if quick else GridConfig()
    data = base.to_dict()
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data.update(yaml.safe_load(text) or {})
        else:
            data.update(json.loads(text))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            data[key] = json.loads(raw)
        except ValueError:
            data[key] = raw
    return GridConfig.from_dict(data)


def _line(record: dict) -> None:
    if "error" in record:
        print(f"{record['id']}: ERROR {record['error']}", flush=True)
        return
    print(
        f"{record['id']}: test recall {record['test']['recall']:.3f} "
        f"(valid {record['valid']['recall']:.3f}), state {record['state_bytes']} B, "
        f"{record['parameters']} params, train {record['train_s']} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/state-bytes")
    p.add_argument("--config", help="JSON or YAML file of GridConfig fields")
    p.add_argument("--quick", action="store_true", help="a smoke grid: seconds per run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    config = load_config(args.config, args.quick, args.set)
    results = run_grid(config, args.out, log=_line)
    for task, systems in results["summary"].items():
        print(f"\n{task}")
        for system, entry in systems.items():
            head = entry["headline_recall"]
            shown = "error" if head is None else f"{head:.3f}"
            print(
                f"  {system:15s} lr {entry['lr']:g}  headline {shown}  by state {entry['by_state']}"
            )
    if not args.no_plots:
        for path in plot_all(results, args.out):
            print(path)
    print(f"{args.out}/results.json ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
