"""``rxt info``: parameter counts and per-turn FLOPs of the presets."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rxt.config import RxTConfig

    parser.add_argument("--preset", choices=RxTConfig.presets())
    parser.add_argument(
        "--json", dest="as_json", action="store_true", help="machine-readable output"
    )
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)


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
