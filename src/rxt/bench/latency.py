"""`rxt bench latency`: per-turn latency of RxT against a stateless model re-reading the history.

Both systems get the same queries (``query_tokens`` ids each) and produce exactly
``answer_tokens`` tokens per turn, greedy. Per turn, after warm-up:

- ``rxt``: ``repeats`` forks of the conversation each answer turn ``t`` from STM_{t-1}; medians
  of time to first token, reply time and memory-update time. A second, *live* pass then runs
  the conversation as a user would — answer, think for ``think_time``, send the next query —
  and records how long each next turn still waited for the previous memory update, i.e. how
  much of the update was hidden behind the gap (paper §4: the update is off the critical path).
- ``stateless``: Hugging Face ``LlamaForCausalLM`` of the same width and depth as the RxT
  decoder (:mod:`rxt.bench.stateless`), whose prompt is the whole history plus the query.

Both systems, and the live pass, are clocked the same way (:class:`~rxt.bench.common.TurnClock`):
from just before the system is handed the turn's prompt ids until the calling thread holds the
first (``ttft_s``) and the last (``reply_s``) new token. What the benchmark does around a run —
forking the conversation, collecting garbage — stays outside the clock and away from its start.

Output: a list of records ``{system, turn, prompt_tokens, ttft_s, reply_s, memory_update_s, ...}``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rxt.bench.common import BenchSettings, TurnClock, load_or_build, median, random_queries
from rxt.engine import Conversation, Engine
from rxt.results import environment
from rxt.tokenizer import SPECIAL_TOKENS

BOS, EOS, Q, A = (SPECIAL_TOKENS.index(t) for t in ("[BOS]", "[EOS]", "[Q]", "[A]"))


@dataclass(frozen=True)
class LatencySettings(BenchSettings):
    turns: int = 32
    warmup: int = 3
    think_time: float | None = None  # None: twice the median update time seen in warm-up
    baseline: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 0 or (self.think_time is not None and self.think_time < 0):
            raise ValueError("--warmup and --think-time must be >= 0")


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Move everything built so far (both models, the tokenizer, transformers' modules) out of
    the collector's generations for the measurement, as ``rxt serve`` does once it has loaded:
    the collections between timed runs then scan only the few objects made since.

    A full collection before every run instead (350k objects, 70-110 ms with the demo's models
    on a 2-core Xeon) left the next first token of either system 0.7-0.85 ms slower (1.6-1.7 ms
    at ``paper-micro-dense``; docs/benchmarks.md): a cost of the benchmark, not of the systems."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _no_gc_pause() -> Iterator[None]:
    """No collection inside a timed run, for both systems alike: one landing in a run would be
    charged to whichever system happened to trigger it."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _timed_turn(conv: Conversation, query: list[int], answer_tokens: int):
    """One forced-length greedy turn clocked in the caller's thread (:class:`TurnClock`);
    returns the clock and the consumed stream."""
    clock = TurnClock()
    clock.start()
    stream = conv.send(
        query, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, stop_at_eos=False
    )
    for piece in stream:
        if piece.token_id is not None:  # not the text held back to the end of the answer
            clock.token()
    return clock, stream


def _measure_turn(conv: Conversation, query: list[int], baseline, prompt, settings) -> list:
    """Records of one turn: ``repeats`` runs of each system, back to back after one untimed run
    of the same system (medians); the systems take turns turn by turn, so a slow spell of a
    shared machine still hits both. Returns the records and the stateless answer (which joins
    its history).

    A user's turn follows that system's previous turn, never the other system's. Run by run
    alternation charged each system for the other: RxT's first token right after a baseline
    run took 1.3-1.8x as long as right after its own turn, the baseline's right after RxT's
    1.1-1.3x (benchmarks/ttft_clock.py, docs/benchmarks.md)."""
    rxt: dict[str, list[float]] = {"ttft": [], "reply": [], "update": []}
    for run in range(settings.repeats + 1):
        fork = conv.fork()  # RxT answers from STM_{t-1}; the fork is thrown away
        with _no_gc_pause():
            clock, _ = _timed_turn(fork, query, settings.answer_tokens)
            fork.wait(timeout=60)
        if run:  # run 0 is untimed: it may follow the other system
            rxt["ttft"].append(clock.ttft_s)
            rxt["reply"].append(clock.reply_s)
            rxt["update"].append(fork.last_update.duration_s)
    runs = []
    if baseline is not None:
        from rxt.bench.stateless import timed_generate

        for _ in range(settings.repeats + 1):
            with _no_gc_pause():
                runs.append(timed_generate(baseline, prompt, new_tokens=settings.answer_tokens))
        runs = runs[1:]
    rxt_prompt = len(query) + 3  # [BOS][Q] query [A]
    records = [
        {
            "system": "rxt",
            "prompt_tokens": rxt_prompt,
            "ttft_s": median(rxt["ttft"]),
            "reply_s": median(rxt["reply"]),
            "memory_update_s": median(rxt["update"]),
            # decoder: prompt + answer; encoder (asynchronous): the whole interaction again
            "tokens_processed": 2 * (rxt_prompt + settings.answer_tokens),
        }
    ]
    if runs:
        records.append(
            {
                "system": "stateless",
                "prompt_tokens": len(prompt),
                "ttft_s": median([r.ttft_s for r in runs]),
                "reply_s": median([r.reply_s for r in runs]),
                "memory_update_s": None,
                "tokens_processed": len(prompt) + settings.answer_tokens,
            }
        )
    return records, (runs[-1].new_token_ids if runs else [])


def _forked_turns(engine: Engine, queries, baseline, settings: LatencySettings, log) -> list:
    """Every turn measured from forks of one conversation (:func:`_measure_turn`), which then
    answers the turn itself so the next one starts from STM_t."""
    conv = engine.conversation(seed=settings.seed)
    history: list[int] = []
    records: list[dict] = []
    for turn, query in enumerate(queries, start=1):
        prompt = [*history, BOS, Q, *query, A]  # stateless: the whole history, then the query
        turn_records, answer = _measure_turn(conv, query, baseline, prompt, settings)
        turn_records = [{"turn": turn, **r} for r in turn_records]
        n = settings.answer_tokens
        conv.ask(query, max_new_tokens=n, min_new_tokens=n)
        history = [*prompt, *answer, EOS]
        records += turn_records
        if turn == 1 or turn % 8 == 0 or turn == len(queries):
            times = (f"{r['system']} ttft {r['ttft_s'] * 1e3:7.2f} ms" for r in turn_records)
            log(f"  turn {turn:>3}: " + ", ".join(times))
    return records


def _live_pass(engine: Engine, settings: LatencySettings, queries, think: float) -> list[dict]:
    """Turns sent like a user would: the next query ``think`` seconds after the answer ended,
    each clocked like the forked runs (so ``live_ttft_s`` and ``ttft_s`` are the same span)."""
    conv = engine.conversation(seed=settings.seed)
    rows, streams = [], []
    previous_end = None
    for turn, query in enumerate(queries, start=1):
        if previous_end is not None:
            time.sleep(max(0.0, previous_end + think - time.perf_counter()))
        with _no_gc_pause():
            clock, stream = _timed_turn(conv, query, settings.answer_tokens)
        previous_end = time.perf_counter()
        result = stream.result()
        rows.append({"turn": turn, "live_ttft_s": clock.ttft_s, "waited_s": result.waited_s})
        streams.append(stream)
    conv.wait(timeout=60)
    for row, stream in zip(rows, streams, strict=True):
        row["update_latency_s"] = stream.wait_update(60).latency_s
    return rows


def run_latency(settings: LatencySettings, log=print) -> dict:
    """Run the benchmark; returns ``{"records": [...], "summary": {...}, "environment": {...}}``."""
    s = settings
    model = load_or_build(s.model_dir, s.preset, s.seed, s.device)
    config = model.config
    s.check_fits(config.max_seq_len)
    queries = random_queries(s.turns, s.query_tokens, config.vocab_size, s.seed)
    warm_queries = random_queries(s.warmup, s.query_tokens, config.vocab_size, s.seed + 1)
    baseline = None
    if s.baseline:
        from rxt.bench.stateless import build_stateless_baseline, timed_generate

        per_turn = s.query_tokens + 3 + s.answer_tokens + 1  # + the [EOS] closing each answer
        baseline = build_stateless_baseline(
            config, max_positions=s.turns * per_turn + 8, seed=s.seed, device=s.device
        )
        for query in warm_queries:
            timed_generate(baseline, [BOS, Q, *query, A], new_tokens=s.answer_tokens)
    with Engine(model) as engine:
        warm = engine.conversation(seed=s.seed)
        warm_updates = []
        for query in warm_queries:
            _timed_turn(warm, query, s.answer_tokens)
            warm.wait(timeout=60)
            warm_updates.append(warm.last_update.duration_s)
        think = s.think_time
        if think is None:
            think = 2 * median(warm_updates) if warm_updates else 0.05
        log(
            f"{config.d_model}-wide, {config.num_layers}-layer decoders; {s.turns} turns of "
            f"{s.query_tokens} + {s.answer_tokens} tokens; think time {think * 1e3:.1f} ms"
        )
        with _frozen_heap():
            records = _forked_turns(engine, queries, baseline, s, log)
            live = _live_pass(engine, s, queries, think)
    for record in records:
        if record["system"] != "rxt":
            continue
        row = live[record["turn"] - 1]
        record["live_ttft_s"] = row["live_ttft_s"]
        # How long turn t+1 still waited for turn t's update, and the hidden share of it.
        if record["turn"] < len(live):
            wait = live[record["turn"]]["waited_s"]
            record["update_wait_s"] = wait
            record["update_hidden_fraction"] = max(0.0, 1.0 - wait / row["update_latency_s"])
    return {
        "records": records,
        "summary": summarise(records, s.answer_tokens, think),
        "settings": {**s.__dict__, "think_time": think},
        "environment": environment(s.device),
    }


def summarise(records: list[dict], answer_tokens: int, think: float) -> dict:
    """The figures the targets are stated in, from the first and last turn of each system."""
    by = {}
    for r in records:
        by.setdefault(r["system"], []).append(r)
    out: dict[str, object] = {"think_time_s": think}
    for system, rows in by.items():
        first, last = rows[0], rows[-1]
        k = max(1, min(4, len(rows) // 2))  # turn 1 vs N alone is hostage to one noisy turn

        def growth(key: str, rows=rows, k=k) -> float:
            return median([r[key] for r in rows[-k:]]) / median([r[key] for r in rows[:k]])

        out[system] = {
            "turns": len(rows),
            "ttft_first_s": first["ttft_s"],
            "ttft_last_s": last["ttft_s"],
            "ttft_growth": last["ttft_s"] / first["ttft_s"],
            "reply_growth": last["reply_s"] / first["reply_s"],
            f"ttft_growth_last{k}_vs_first{k}": growth("ttft_s"),
            f"reply_growth_last{k}_vs_first{k}": growth("reply_s"),
            "decode_tokens_per_s_turn1": (answer_tokens - 1) / (first["reply_s"] - first["ttft_s"]),
            "prompt_tokens_last": last["prompt_tokens"],
        }
    if "rxt" in by:
        hidden = [r["update_hidden_fraction"] for r in by["rxt"] if "update_hidden_fraction" in r]
        out["rxt"]["memory_update_median_s"] = median([r["memory_update_s"] for r in by["rxt"]])
        out["rxt"]["update_hidden_fraction_median"] = median(hidden) if hidden else None
        out["rxt"]["update_wait_max_s"] = max(
            (r["update_wait_s"] for r in by["rxt"] if "update_wait_s" in r), default=None
        )
    if "rxt" in by and "stateless" in by:
        out["ttft_speedup_last_turn"] = by["stateless"][-1]["ttft_s"] / by["rxt"][-1]["ttft_s"]
        out["decode_throughput_ratio_turn1"] = (
            out["rxt"]["decode_tokens_per_s_turn1"] / out["stateless"]["decode_tokens_per_s_turn1"]
        )
    return out


def format_summary(summary: dict) -> str:
    lines = []
    for system in ("rxt", "stateless"):
        if system not in summary:
            continue
        s = summary[system]
        lines.append(
            f"{system:<10} ttft turn 1 {s['ttft_first_s'] * 1e3:8.2f} ms → turn {s['turns']} "
            f"{s['ttft_last_s'] * 1e3:8.2f} ms (×{s['ttft_growth']:.2f}); reply ×"
            f"{s['reply_growth']:.2f}; decode {s['decode_tokens_per_s_turn1']:.0f} tok/s; "
            f"prompt at last turn {s['prompt_tokens_last']} tokens"
        )
    if "rxt" in summary:
        r = summary["rxt"]
        hidden = r["update_hidden_fraction_median"]
        lines.append(
            f"memory update {r['memory_update_median_s'] * 1e3:.2f} ms median; with "
            f"{summary['think_time_s'] * 1e3:.1f} ms think time, "
            + (f"{hidden:.0%} hidden (median)" if hidden is not None else "n/a")
            + (
                f", longest wait {r['update_wait_max_s'] * 1e3:.2f} ms"
                if r["update_wait_max_s"] is not None
                else ""
            )
        )
    if "ttft_speedup_last_turn" in summary:
        lines.append(
            f"at the last turn RxT's first token comes {summary['ttft_speedup_last_turn']:.1f}× "
            f"sooner; turn-1 decode throughput ratio rxt/stateless "
            f"{summary['decode_throughput_ratio_turn1']:.2f}"
        )
    return "\n".join(lines)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
