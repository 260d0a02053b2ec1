"""Command-line interface: ``rxt <command>`` (also ``python -m rxt``).

Each sub-command maps to one function with a typed signature; argument parsing stays here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def cmd_info(preset: str | None, as_json: bool, query_tokens: int, answer_tokens: int) -> int:
    """Parameter counts and per-turn FLOPs of the presets."""
    import torch

    from rxt.config import RxTConfig
    from rxt.model.cost import turn_cost
    from rxt.model.reactive_transformer import ReactiveTransformer

    names = [preset] if preset else RxTConfig.presets()
    report = {}
    for name in names:
        config = RxTConfig.preset(name)
        with torch.device("meta"):  # shapes only: no memory, no init time
            counts = ReactiveTransformer(config).parameter_counts()
        report[name] = {
            "config": config.to_dict(),
            "parameters": counts,
            "turn_flops": turn_cost(config, query_tokens, answer_tokens).to_dict(),
        }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{'preset':<12} {'total':>12} {'inference':>12} {'active/token':>13} "
        f"{'prompt GFLOP':>13} {'update GFLOP':>13}"
    )
    for name, entry in report.items():
        p, f = entry["parameters"], entry["turn_flops"]
        print(
            f"{name:<12} {p['total']:>12,} {p['inference']:>12,} {p['active_per_token']:>13,} "
            f"{(f['memory_kv'] + f['prefill']) / 1e9:>13.4f} {f['memory_update'] / 1e9:>13.4f}"
        )
    print(
        f"(FLOPs for a {query_tokens}-token query and a {answer_tokens}-token answer; "
        "independent of the turn number)"
    )
    return 0


def cmd_demo(out: str, preset: str, turns: int, quick: bool, threads: int | None) -> int:
    from rxt.demo import run_demo

    if quick:
        preset, turns = "tiny", min(turns, 4)
    run_demo(out, preset=preset, turns=turns, answer_tokens=8 if quick else 24, threads=threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rxt import __version__
    from rxt.config import RxTConfig

    parser = argparse.ArgumentParser(
        prog="rxt", description="Reactive Transformer: stateful, event-driven language models."
    )
    parser.add_argument("--version", action="version", version=f"rxt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and per-turn cost of the presets")
    info.add_argument("--preset", choices=RxTConfig.presets())
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--query-tokens", type=int, default=32)
    info.add_argument("--answer-tokens", type=int, default=64)

    demo = sub.add_parser("demo", help="run the end-to-end demo")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--preset", default="small", choices=RxTConfig.presets())
    demo.add_argument("--turns", type=int, default=8)
    demo.add_argument("--quick", action="store_true", help="tiny model, 4 turns (seconds)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args.preset, args.json, args.query_tokens, args.answer_tokens)
        if args.command == "demo":
            return cmd_demo(args.out, args.preset, args.turns, args.quick, args.threads)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"rxt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
