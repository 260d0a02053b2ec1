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


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """Per-turn latency of RxT vs the stateless transformers baseline."""
    from rxt.bench.latency import LatencySettings, format_summary, run_latency

    _set_threads(args.threads)
    settings = LatencySettings.from_args(args, baseline=not args.no_baseline)
    result = run_latency(settings)
    print(format_summary(result["summary"]))
    _write_results(args.json, result)
    if args.plot:
        from rxt.bench.plot import plot_latency

        plot_latency(result["records"], args.plot, title=f"rxt bench latency ({args.preset})")
        print(f"plot: {args.plot}")
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    """Aggregate tokens/s of the batched engine at several concurrencies."""
    from rxt.bench.throughput import ThroughputSettings, run_throughput

    _set_threads(args.threads)
    settings = ThroughputSettings.from_args(args, concurrency=tuple(args.concurrency))
    result = run_throughput(settings)
    speedups = ", ".join(f"{c}: ×{x:.2f}" for c, x in result["summary"]["speedup_vs_first"].items())
    print(f"tokens/s relative to {settings.concurrency[0]} conversation(s): {speedups}")
    _write_results(args.json, result)
    return 0


def _write_results(path: str | None, result: dict) -> None:
    """The records (a plain list) to ``path``; summary, settings and environment beside it."""
    if not path:
        return
    from rxt.bench.common import write_json

    write_json(path, result["records"])
    write_json(_summary_path(path), {k: v for k, v in result.items() if k != "records"})
    print(f"records: {path}; summary: {_summary_path(path)}")


def _summary_path(path: str) -> str:
    """``OUT.json`` → ``OUT.summary.json`` (the records file stays a plain list)."""
    stem = path[:-5] if path.endswith(".json") else path
    return f"{stem}.summary.json"


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _add_bench_common(parser: argparse.ArgumentParser, presets: list[str]) -> None:
    parser.add_argument("--preset", default="small", choices=presets)
    parser.add_argument("--model-dir", help="a saved model instead of a random preset model")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the calling thread")
    parser.add_argument("--json", metavar="OUT.json", help="write the records here")


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

    from rxt import chat

    chat.add_arguments(sub.add_parser("chat", help="interactive chat with a saved model"))

    bench = sub.add_parser("bench", help="latency and throughput benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    presets = RxTConfig.presets()
    latency = bench_sub.add_parser("latency", help="per-turn latency, RxT vs stateless")
    _add_bench_common(latency, presets)
    latency.add_argument("--turns", type=int, default=32)
    latency.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    latency.add_argument(
        "--think-time",
        type=float,
        help="seconds between an answer and the next query in the live pass "
        "(default: twice the median memory-update time)",
    )
    latency.add_argument("--no-baseline", action="store_true", help="RxT only")
    latency.add_argument("--plot", metavar="OUT.png", help="latency-vs-turn figure")
    throughput = bench_sub.add_parser("throughput", help="batched engine tokens/s")
    _add_bench_common(throughput, presets)
    throughput.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    throughput.add_argument("--turns", type=int, default=2, help="turns per conversation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args.preset, args.json, args.query_tokens, args.answer_tokens)
        if args.command == "demo":
            return cmd_demo(args.out, args.preset, args.turns, args.quick, args.threads)
        if args.command == "chat":
            from rxt.chat import run_chat

            return run_chat(args)
        if args.command == "bench":
            if args.bench == "latency":
                return cmd_bench_latency(args)
            return cmd_bench_throughput(args)
    except (
        ValueError,
        FileNotFoundError,
        ImportError,
    ) as exc:  # user errors: one clear line, no traceback
        print(f"rxt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
