"""What the latency and throughput benchmarks share: the model under test, its queries and a
few statistics (the environment record is :func:`rxt.results.environment`)."""

from __future__ import annotations

import random
import statistics
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
