"""What ``rxt bench latency`` once charged to a first token that the first token did not cost.

    python benchmarks/ttft_clock.py --model-dir runs/demo/runs/smat/model      # the demo's
    python benchmarks/ttft_clock.py --preset paper-micro-dense --threads 2 \\
        --query-tokens 32 --answer-tokens 64                                   # issue 15's

Times turn 1 of RxT (the engine, forks of one conversation) and of the stateless baseline, both
clocked as the benchmark does now (:class:`rxt.bench.common.TurnClock`: from the call to the
first token in the calling thread), every timed run prepared one of five ways, the ways taking
turns run by run:

- ``after itself``: an untimed run of the same system, the heap frozen, no collection in the
  run (what the benchmark does now);
- ``after a full collection``: the same, then ``gc.collect()`` of the whole heap just before
  the run (what the benchmark did before every run);
- ``after an idle pause``: the same, then the calling thread sleeps as long as that collection
  took: a guess at why the collection costs the next first token (the machine idles);
- ``after the other system``: an untimed run of the other system just before (the benchmark
  used to alternate the systems run by run);
- ``after the other + 20 ms``: the same, then a 20 ms pause.

For RxT it also splits the first token into the engine's part (``TurnResult.ttft_s``: the turn
queued → its first token made, on the engine's thread) and the rest (the call itself and the
hand-off of the token back to the calling thread). Prints medians; ``docs/benchmarks.md``
quotes them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from rxt.bench.common import TurnClock, load_or_build, random_queries
from rxt.bench.stateless import build_stateless_baseline, timed_generate
from rxt.config import RxTConfig
from rxt.engine import Engine
from rxt.tokenizer import SPECIAL_TOKENS

BOS, Q, A = (SPECIAL_TOKENS.index(t) for t in ("[BOS]", "[Q]", "[A]"))
WAYS = (
    "after itself",
    "after a full collection",
    "after an idle pause",
    "after the other system",
    "after the other + 20 ms",
)
COLUMNS = ("rxt", "stateless", "rxt engine part", "rxt call + hand-off")


def _rxt_turn(conv, query: list[int], answer: int) -> tuple[float, float]:
    """(caller-side, engine-side) time to first token of one turn of a fork of ``conv``."""
    fork = conv.fork()
    clock = TurnClock()
    clock.start()
    stream = fork.send(query, max_new_tokens=answer, min_new_tokens=answer, stop_at_eos=False)
    for piece in stream:
        if piece.token_id is not None:
            clock.token()
    result = stream.result()
    fork.wait(timeout=60)
    return clock.ttft_s, result.ttft_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a saved RxT, e.g. the demo's runs/smat/model")
    parser.add_argument("--preset", default="tiny", choices=RxTConfig.presets())
    parser.add_argument("--query-tokens", type=int, default=16, help="the demo's: 16")
    parser.add_argument("--answer-tokens", type=int, default=16, help="the demo's: 16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="the demo's: one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_or_build(args.model_dir, args.preset, 0, "cpu")
    query = random_queries(1, args.query_tokens, model.config.vocab_size, 0)[0]
    prompt = [BOS, Q, *query, A]
    answer = args.answer_tokens
    baseline = build_stateless_baseline(model.config, max_positions=len(prompt) + answer + 8)
    objects = len(gc.get_objects())
    start = time.perf_counter()
    gc.collect()
    collect_s = time.perf_counter() - start
    print(f"{objects:,} objects tracked; a full collection takes {collect_s * 1e3:.0f} ms")
    rows: dict[tuple[str, str], list[float]] = {}
    with Engine(model) as engine:
        conv = engine.conversation(seed=0)
        runs = {
            "rxt": lambda: _rxt_turn(conv, query, answer),
            "stateless": lambda: timed_generate(baseline, prompt, new_tokens=answer),
        }
        for _ in range(2):  # warm-up
            runs["rxt"]()
            runs["stateless"]()
        for _ in range(args.rounds):
            for way in WAYS:
                for system, other in (("rxt", "stateless"), ("stateless", "rxt")):
                    runs[other if "other" in way else system]()
                    gc.freeze()
                    if way == "after a full collection":
                        gc.unfreeze()
                        gc.collect()
                    elif way == "after an idle pause":
                        time.sleep(collect_s)
                    elif way == "after the other + 20 ms":
                        time.sleep(0.02)
                    gc.disable()
                    if system == "rxt":
                        caller, engine_side = runs["rxt"]()
                        rows.setdefault((way, "rxt engine part"), []).append(engine_side)
                        rows.setdefault((way, "rxt call + hand-off"), []).append(
                            caller - engine_side
                        )
                    else:
                        caller = runs["stateless"]().ttft_s
                    rows.setdefault((way, system), []).append(caller)
                    gc.enable()
                    gc.unfreeze()
    print("| timed run | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for way in WAYS:
        cells = " | ".join(f"{statistics.median(rows[way, c]) * 1e3:.2f}" for c in COLUMNS)
        print(f"| {way} | {cells} |")
    print(f"(ms, time to first token, median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
