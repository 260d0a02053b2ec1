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


def cmd_demo(
    out: str | None, quick: bool, workers: int, ablations: bool = False, long: bool = False
) -> int:
    from rxt.demo import run_demo

    if long:
        from rxt.demo.long import SEEDS, run_long_demo
        from rxt.demo.plan import DemoPlan

        if ablations:
            raise ValueError("--long runs the main comparison only; drop --ablations")
        run_long_demo(
            out or "runs/demo-long",
            workers=0 if quick else workers,
            plan=DemoPlan.quick() if quick else None,
            seeds=SEEDS[:2] if quick else SEEDS,
            in_process=main,
        )
        return 0
    run_demo(out or "runs/demo", quick=quick, workers=workers, ablations=ablations, in_process=main)
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


def cmd_train(args: argparse.Namespace) -> int:
    """One curriculum stage of a recipe (also under ``torchrun``: data-parallel)."""
    from rxt.training.run import run_stage

    _set_threads(args.threads)
    last = run_stage(
        args.stage,
        args.config,
        args.out,
        resume=args.resume,
        init=args.init,
        progress=not args.no_progress,
        device=args.device,
    )
    print(json.dumps({"stage": args.stage, **last}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Recall by distance and kind, perplexity, accuracy, reward and the recall errors of a saved
    model on a JSONL file."""
    from rxt.data.dialogue import read_dialogues
    from rxt.eval.evaluate import evaluate_model_dir, summary_lines

    _set_threads(args.threads)
    dialogues = read_dialogues(args.data)
    if args.limit is not None:
        dialogues = dialogues[: args.limit]
    systems = evaluate_model_dir(
        args.model_dir,
        dialogues,
        memory_modes=args.memory,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        reward=not args.no_reward,
        device=args.device,
    )
    report = {
        "model_dir": args.model_dir,
        "data": args.data,
        "dialogues": len(dialogues),
        "systems": systems,
    }
    for name, entry in systems.items():
        print("\n".join(summary_lines(name, entry)))
    if args.json:
        from rxt.results import write_json

        write_json(args.json, report)
        print(f"report: {args.json}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Write dialogue JSONL: probe splits, or the Shakespeare plays."""
    from rxt.data.dialogue import write_dialogues

    out = args.out
    if args.source == "probes":
        from rxt.data.probes import ProbeConfig, chance_level, generate_splits

        config = ProbeConfig(max_turns=args.max_turns, max_distance=args.max_distance)
        sizes = dict(zip(("train", "validation", "test"), args.sizes, strict=True))
        for split, dialogues in generate_splits(sizes, seed=args.seed, config=config).items():
            n = write_dialogues(f"{out}/probes-{split}.jsonl", dialogues)
            print(f"{out}/probes-{split}.jsonl: {n} dialogues")
        print(f"chance level: {chance_level(config):.4f}")
        return 0
    from rxt.data.shakespeare import shakespeare_dialogues, split_by_play

    splits = split_by_play(
        shakespeare_dialogues(), test_plays=args.test_plays, valid_plays=args.valid_plays
    )
    for split, dialogues in splits.items():
        n = write_dialogues(f"{out}/shakespeare-{split}.jsonl", dialogues)
        print(f"{out}/shakespeare-{split}.jsonl: {n} dialogues")
    return 0


def _write_results(path: str | None, result: dict) -> None:
    """The records (a plain list) to ``path``; summary, settings and environment beside it."""
    if not path:
        return
    from rxt.results import write_json

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

    demo = sub.add_parser(
        "demo", help="train RxT and the baselines, evaluate, write a report (~20 min, 2 CPUs)"
    )
    demo.add_argument(
        "--out", default=None, help="output directory (runs/demo; with --long runs/demo-long)"
    )
    demo.add_argument("--quick", action="store_true", help="every step in under a minute")
    demo.add_argument(
        "--workers", type=int, default=2, help="parallel one-thread training processes"
    )
    demo.add_argument(
        "--long",
        action="store_true",
        help="RxT and the full-history baseline, 3000 SMAT steps, 3 seeds (57 min, 2-core Xeon)",
    )
    demo.add_argument(
        "--ablations",
        action="store_true",
        help="also train the two ablations (no stage 3; gradient horizon 1): ~1.5x the time",
    )

    from rxt import chat

    chat.add_arguments(sub.add_parser("chat", help="interactive chat with a saved model"))

    from rxt.serve import cli as serve_cli

    serve_cli.add_arguments(
        sub.add_parser("serve", help="OpenAI-compatible server keeping each conversation's STM")
    )

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

    from rxt.training.recipe import STAGES

    train = sub.add_parser("train", help="run one training stage of a recipe")
    train.add_argument(
        "stage", help=f"a stage of the recipe: {', '.join(STAGES)}, or a named variant"
    )
    train.add_argument("--config", required=True, metavar="RECIPE.yaml")
    train.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    train.add_argument("--resume", action="store_true", help="continue from DIR/STAGE/checkpoint")
    train.add_argument("--init", metavar="MODEL_DIR", help="start from this model instead")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("eval", help="evaluate a saved model on held-out dialogues")
    evaluate.add_argument("model_dir")
    evaluate.add_argument("--data", required=True, metavar="FILE.jsonl")
    evaluate.add_argument("--json", metavar="OUT.json")
    evaluate.add_argument(
        "--memory", nargs="+", default=["on", "off", "swapped"], choices=["on", "off", "swapped"]
    )
    evaluate.add_argument("--limit", type=int, help="only the first N dialogues")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, default=16)
    evaluate.add_argument("--no-reward", action="store_true", help="skip generating every reply")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")

    data = sub.add_parser("data", help="write dialogue JSONL files")
    data.add_argument("source", choices=["probes", "shakespeare"])
    data.add_argument("--out", default="data")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--sizes", type=int, nargs=3, default=[20000, 500, 500], metavar=("TRAIN", "VAL", "TEST")
    )
    data.add_argument("--max-turns", type=int, default=17)
    data.add_argument("--max-distance", type=int, default=16)
    data.add_argument(
        "--test-plays",
        nargs="+",
        default=["hamlet", "tempest"],
        help="Shakespeare plays held out for testing",
    )
    data.add_argument("--valid-plays", nargs="+", default=["twelfth_night"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args.preset, args.json, args.query_tokens, args.answer_tokens)
        if args.command == "demo":
            return cmd_demo(args.out, args.quick, args.workers, args.ablations, args.long)
        if args.command == "chat":
            from rxt.chat import run_chat

            return run_chat(args)
        if args.command == "serve":
            from rxt.serve.cli import run_server

            return run_server(args)
        if args.command == "bench":
            if args.bench == "latency":
                return cmd_bench_latency(args)
            return cmd_bench_throughput(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "data":
            return cmd_data(args)
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
