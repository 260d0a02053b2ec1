"""`rxt bench throughput`: aggregate tokens/s of the batched engine at several concurrencies.

Each of ``c`` client threads holds one conversation and sends ``turns`` turns back to back
(the next query as soon as its answer ended, so it also waits for its own memory update), each
answer forced to ``answer_tokens`` tokens. Throughput is all answer tokens over the wall time
of the run; the median of ``repeats`` runs is reported, as records ``{concurrency, tokens_per_s}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rxt.bench.common import BenchSettings, load_or_build, median, random_queries
from rxt.engine import Engine
from rxt.results import environment


@dataclass(frozen=True)
class ThroughputSettings(BenchSettings):
    concurrency: Sequence[int] = field(default=(1, 4, 16))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency values must be >= 1, got {list(self.concurrency)}")


def _one_run(engine: Engine, settings: ThroughputSettings, clients: int, seed: int) -> dict:
    s = settings
    vocab = engine.model.config.vocab_size
    queries = random_queries(clients * s.turns, s.query_tokens, vocab, seed)
    ttfts: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        try:
            conv = engine.conversation(seed=seed + index)
            barrier.wait()
            for turn in range(s.turns):
                result = conv.ask(
                    queries[index * s.turns + turn],
                    max_new_tokens=s.answer_tokens,
                    min_new_tokens=s.answer_tokens,
                    stop_at_eos=False,
                )
                with lock:
                    ttfts.append(result.ttft_s)
            conv.wait(timeout=120)
        except BaseException as exc:  # reported after the run, never lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    tokens = clients * s.turns * s.answer_tokens
    return {"tokens_per_s": tokens / wall, "ttft_s": median(ttfts), "wall_s": wall}


def run_throughput(settings: ThroughputSettings, log=print) -> dict:
    """Returns ``{"records": [{concurrency, tokens_per_s, ...}], "summary", "environment"}``."""
    s = settings
    model = load_or_build(s.model_dir, s.preset, s.seed, s.device)
    s.check_fits(model.config.max_seq_len)
    records = []
    with Engine(model, max_batch_size=max(s.concurrency)) as engine:
        _one_run(engine, s, min(4, max(s.concurrency)), s.seed + 99)  # warm-up
        for clients in s.concurrency:
            runs = [_one_run(engine, s, clients, s.seed + r) for r in range(s.repeats)]
            record = {
                "concurrency": clients,
                "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                "ttft_s": median([r["ttft_s"] for r in runs]),
                "wall_s": median([r["wall_s"] for r in runs]),
            }
            records.append(record)
            log(
                f"  {clients:>3} concurrent: {record['tokens_per_s']:8.0f} tokens/s "
                f"(median ttft {record['ttft_s'] * 1e3:.1f} ms)"
            )
    base = records[0]["tokens_per_s"]
    summary = {
        "speedup_vs_first": {r["concurrency"]: r["tokens_per_s"] / base for r in records},
    }
    return {
        "records": records,
        "summary": summary,
        "settings": {**s.__dict__, "concurrency": list(s.concurrency)},
        "environment": environment(s.device),
    }
