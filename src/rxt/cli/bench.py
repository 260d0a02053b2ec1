"""``rxt bench latency|throughput``: per-turn latency against a stateless baseline, and the
batched engine's tokens/s."""

from __future__ import annotations

import argparse
from typing import Any

from rxt.cli.common import set_threads, write_results


def _add_common(parser: argparse.ArgumentParser) -> None:
    from rxt.config import RxTConfig

    parser.add_argument("--preset", default="small", choices=RxTConfig.presets())
    parser.add_argument("--model-dir", help="a saved model instead of a random preset model")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the calling thread")
    parser.add_argument(
        "--json", dest="json_out", metavar="OUT.json", help="write the records here"
    )


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--turns", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="untimed turns first")
    parser.add_argument(
        "--think-time",
        type=float,
        help="seconds between an answer and the next query in the live pass "
        "(default: twice the median memory-update time)",
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="RxT only")
    parser.add_argument("--plot", metavar="OUT.png", help="latency-vs-turn figure")


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--turns", type=int, default=2, help="turns per conversation")


def cmd_bench_latency(
    *,
    threads: int | None,
    json_out: str | None,
    plot: str | None,
    **settings: Any,
) -> int:
    """Per-turn latency of RxT vs the stateless transformers baseline; the other flags are
    exactly the fields of :class:`rxt.bench.latency.LatencySettings`."""
    from rxt.bench.latency import LatencySettings, format_summary, run_latency

    set_threads(threads)
    options = LatencySettings(**settings)
    result = run_latency(options)
    print(format_summary(result["summary"]))
    write_results(json_out, result)
    if plot:
        from rxt.bench.plot import plot_latency

        plot_latency(result["records"], plot, title=f"rxt bench latency ({options.preset})")
        print(f"plot: {plot}")
    return 0


def cmd_bench_throughput(*, threads: int | None, json_out: str | None, **settings: Any) -> int:
    """Aggregate tokens/s of the batched engine at several concurrencies; the other flags are
    exactly the fields of :class:`rxt.bench.throughput.ThroughputSettings`."""
    from rxt.bench.throughput import ThroughputSettings, run_throughput

    set_threads(threads)
    options = ThroughputSettings(**{**settings, "concurrency": tuple(settings["concurrency"])})
    result = run_throughput(options)
    speedups = ", ".join(f"{c}: ×{x:.2f}" for c, x in result["summary"]["speedup_vs_first"].items())
    print(f"tokens/s relative to {options.concurrency[0]} conversation(s): {speedups}")
    write_results(json_out, result)
    return 0
