"""Where one turn's milliseconds go: time to first token, the reply and the memory update.

    python benchmarks/profile_turn.py --preset paper-micro-dense --threads 1 2

Runs the engine's own pieces on the calling thread, turn after turn of one conversation (random
weights, greedy, every reply forced to ``--answer-tokens``): the row pool's join (the first token:
per-turn memory keys/values, the prefill of ``[BOS][Q] query [A]``, the first sampling), its
decode steps (the rest of the reply), and ``update_memory`` on the interaction (encoder, then
memory attention). The engine runs the decoder and the update on two threads of one intra-op
thread each; ``--threads`` sets the intra-op threads here, so ``1`` is what the engine does and
``2`` what the same code gives with both cores. The parts of the first token and of the update
are timed again alone (same inputs), and ``torch.profiler`` lists each phase's heaviest
operators with how many operator calls it makes (dispatch count: at these sizes a call costs
about as much as its arithmetic). Medians over ``--turns`` turns after one warm-up turn.
``docs/benchmarks.md`` quotes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from rxt.bench.common import load_or_build, random_queries
from rxt.config import RxTConfig
from rxt.engine.rows import RowPool
from rxt.engine.sampling import SamplingParams

# The rows of the table, in order; "  " marks a part of the phase above, timed again alone.
PHASES = (
    "first token (join)",
    "  memory K/V projection",
    "  prefill forward",
    "  fused-weight check",
    "rest of the reply (decode steps)",
    "one decode step",
    "memory update",
    "  encoder",
    "  memory attention",
)


def _ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def _turn(model, pool: RowPool, stm, query: list[int], answer: int, times: dict) -> torch.Tensor:
    """One turn on the engine's code paths; appends each phase's milliseconds to ``times``."""
    tok = model.tokenizer
    prompt = [tok.bos_id, tok.query_id, *query, tok.answer_id]
    params = SamplingParams(max_new_tokens=answer, min_new_tokens=answer, stop_at_eos=False)
    with torch.inference_mode():  # as the engine's scheduler thread
        ms, first = _ms(lambda: pool.join([prompt], [stm], [params], [None], [params]))
        times["first token (join)"].append(ms)
        steps = []
        tokens = list(first)
        for _ in range(answer - 1):
            step_ms, new = _ms(lambda: pool.step([None]))
            steps.append(step_ms)
            tokens += new
        pool.remove(0, [])
        times["rest of the reply (decode steps)"].append(sum(steps))
        times["one decode step"].append(statistics.median(steps))
        # The parts of the join, alone: memory keys/values once per turn, then the prefill.
        ms, memory = _ms(lambda: model.memory_kv(stm))
        times["  memory K/V projection"].append(ms)
        ids = torch.tensor([prompt])
        cache = model.new_kv_cache(1)
        ms, _ = _ms(
            lambda: model.decoder_forward(ids, kv_cache=cache, memory_kv=memory, last_only=True)
        )
        times["  prefill forward"].append(ms)
        ms, _ = _ms(pool.fused.refresh)
        times["  fused-weight check"].append(ms)
    interaction = torch.tensor([[*prompt, *tokens, tok.eos_id]])
    with torch.no_grad():  # as the update thread
        ms, stm_next = _ms(lambda: model.update_memory(stm, interaction))
        times["memory update"].append(ms)
        ms, encoded = _ms(lambda: model.encode(interaction))
        times["  encoder"].append(ms)
        ms, _ = _ms(lambda: model.memory_attention(stm, encoded, None))
        times["  memory attention"].append(ms)
    return stm_next


def _operators(model, pool: RowPool, stm, query, answer: int, top: int) -> dict[str, Any]:
    """Each phase's operator calls and heaviest operators (self CPU time) over one turn."""
    tok = model.tokenizer
    prompt = [tok.bos_id, tok.query_id, *query, tok.answer_id]
    params = SamplingParams(max_new_tokens=answer, min_new_tokens=answer, stop_at_eos=False)
    out: dict[str, Any] = {}

    def table(name: str, fn: Callable[[], Any]) -> Any:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        heavy = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {
            "operator_calls": sum(e.count for e in events),
            "self_cpu_ms": round(total / 1e3, 2),
            "top": [
                {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2)}
                for e in heavy
            ],
        }
        return result

    with torch.inference_mode():
        first = table("first token", lambda: pool.join([prompt], [stm], [params], [None], [params]))
        tokens = list(first)

        def decode() -> None:
            for _ in range(answer - 1):
                tokens.extend(pool.step([None]))

        table("decode", decode)
        pool.remove(0, [])
    interaction = torch.tensor([[*prompt, *tokens, tok.eos_id]])
    with torch.no_grad():
        table("memory update", lambda: model.update_memory(stm, interaction))
    return out


def profile_turns(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = load_or_build(args.model_dir, args.preset, args.seed, "cpu")
    pool = RowPool(model, 1, model.tokenizer.eos_id)
    queries = random_queries(args.turns + 1, args.query_tokens, model.config.vocab_size, args.seed)
    stm = model.initial_stm(1, generator=torch.Generator().manual_seed(args.seed))
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for i, query in enumerate(queries):
        turn: dict[str, list[float]] = {name: [] for name in PHASES}
        stm = _turn(model, pool, stm, query, args.answer_tokens, turn)
        if i == 0:
            continue  # warm-up: first calls allocate and build the fused weights
        for name, values in turn.items():
            times[name] += values
    medians = {name: round(statistics.median(v), 3) for name, v in times.items()}
    operators = _operators(model, pool, stm, queries[0], args.answer_tokens, args.top)
    return {"threads": threads, "median_ms": medians, "operators": operators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper-micro-dense", choices=RxTConfig.presets())
    parser.add_argument("--model-dir", help="a saved model instead of a random preset model")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--top", type=int, default=6, help="operators listed per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", help="write the results here")
    args = parser.parse_args()
    results = [profile_turns(args, t) for t in args.threads]
    print("| phase | " + " | ".join(f"{r['threads']} thread(s), ms" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in PHASES:
        cells = " | ".join(f"{r['median_ms'][name]:.2f}" for r in results)
        label = f"· {name.strip()}" if name.startswith("  ") else name
        print(f"| {label} | {cells} |")
    for r in results:
        for phase, ops in r["operators"].items():
            top = ", ".join(f"{o['op']} {o['self_ms']} ms ({o['calls']})" for o in ops["top"])
            print(
                f"{r['threads']} thread(s), {phase}: {ops['operator_calls']} operator calls, "
                f"{ops['self_cpu_ms']} ms self CPU; {top}"
            )
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"settings": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
