"""What the latency and throughput benchmarks share: the model under test, its queries, the
clock of a turn and a few statistics (the environment record is :func:`rxt.results.environment`)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rxt.config import RxTConfig
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import SPECIAL_TOKENS, RxTTokenizer


def load_or_build(
    model_dir: str | None, preset: str, seed: int, device: str
) -> ReactiveTransformer:
    """A trained model from ``model_dir``, or a seeded random ``preset`` model.

    Latency does not depend on the weights, and every reply is forced to the same length, so a
    random model measures the same work as a trained one of the same shape."""
    if model_dir:
        model = ReactiveTransformer.from_pretrained(model_dir)
    else:
        torch.manual_seed(seed)
        model = ReactiveTransformer(RxTConfig.preset(preset))
    if model.tokenizer is None:
        # Only needed to turn ids into text for the stream; any tokenizer within the vocabulary.
        from rxt.data.synthetic import synthetic_corpus

        vocab = min(model.config.vocab_size, 1024)
        model.tokenizer = RxTTokenizer.train(synthetic_corpus(2000, seed=seed), vocab_size=vocab)
    return model.to(device).eval()


def random_queries(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``count`` queries of exactly ``length`` ordinary (non-special) token ids."""
    rng = random.Random(seed)
    low = len(SPECIAL_TOKENS)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(count)]


@dataclass(frozen=True)
class BenchSettings:
    """What both benchmarks are configured with (each adds its own fields)."""

    preset: str = "small"
    turns: int = 2
    query_tokens: int = 32
    answer_tokens: int = 64
    repeats: int = 5
    seed: int = 0
    device: str = "cpu"
    model_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("turns", "query_tokens", "answer_tokens", "repeats"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    def check_fits(self, max_seq_len: int) -> None:
        if self.query_tokens + 3 + self.answer_tokens > max_seq_len:
            raise ValueError(
                f"query ({self.query_tokens} + 3 markers) + answer ({self.answer_tokens}) tokens "
                f"exceed the model's max_seq_len={max_seq_len}"
            )


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class TurnClock:
    """One turn timed as its caller sees it, the same way for every system under test.

    :meth:`start` just before the system is handed the turn's prompt ids (RxT's
    ``Conversation.send``, the baseline's ``generate``), :meth:`token` each time the *calling*
    thread holds a new token. Time to first token is start → first token in the caller's hands:
    it includes the system's own hand-offs (RxT's engine thread and back) and nothing the
    benchmark does around the call (forking a conversation, collecting garbage)."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.tokens = 0

    def start(self) -> None:
        self.started_at = time.perf_counter()

    def token(self) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.tokens += 1

    @property
    def ttft_s(self) -> float:
        return self._since_start(self.first_at)

    @property
    def reply_s(self) -> float:
        """Start → the last token in the caller's hands."""
        return self._since_start(self.last_at)

    def _since_start(self, at: float | None) -> float:
        if self.started_at is None or at is None:
            raise RuntimeError("the turn was not started, or no token reached the caller")
        return at - self.started_at
