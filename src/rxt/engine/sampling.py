"""Vectorised token sampling whose result for a row never depends on the rest of the batch.

The engine batches unrelated conversations, so a row's answer must not change with whoever else
shares the batch. Two choices give that:

* every row owns its RNG (a ``torch.Generator`` seeded from ``SamplingParams.seed``, or the global
  RNG), and noise is drawn per row with shape ``(V,)``, so the random stream of one row is never
  consumed by another;
* sampling is an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` — equivalent to drawing
  from ``p`` (Gumbel-max) but a pure elementwise op plus an argmax, with no batch-wide
  ``multinomial`` whose draws could be shared out differently.

Logit processing follows Hugging Face ``generate``: repetition penalty → EOS suppression
(``min_new_tokens``) → temperature → top-k → top-p → sample. Per-row settings live in
``RowSampling`` tensors built once per batch composition; its Python flags let ``next_tokens`` skip
unused stages without reading tensors back, so a decoding step does no host sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rxt.validated import Validated

__all__ = [
    "RowSampling",
    "SamplingParams",
    "make_generator",
    "mark_seen",
    "next_tokens",
    "processed_logits",
]


@dataclass(frozen=True)
class SamplingParams(Validated):
    """How one turn's answer is decoded. ``temperature == 0`` is greedy; 0/1 turn filters off.
    Invalid values raise ``ConfigError`` (a ``ValueError``) naming the field; types are checked
    from the hints (:mod:`rxt.validated`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_at_eos: bool = True
    seed: int | None = None

    def validate(self) -> None:
        self.require("max_new_tokens", self.max_new_tokens >= 1, "must be an int >= 1")
        self.require("temperature", self.temperature >= 0, "must be a finite number >= 0")
        self.require("top_k", self.top_k >= 0, "must be an int >= 0")
        self.require("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        self.require(
            "repetition_penalty", self.repetition_penalty > 0, "must be a finite number > 0"
        )
        self.require(
            "min_new_tokens",
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"must be an int in [0, max_new_tokens={self.max_new_tokens}]",
        )
        seed = self.seed
        self.require(
            "seed", seed is None or 0 <= seed < 2**64, "must be None or an int in [0, 2**64)"
        )
        for name in ("temperature", "top_p", "repetition_penalty"):  # ints in, floats stored
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from ``params.seed`` on ``device``; None (global RNG) if unseeded."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


@dataclass
class RowSampling:
    """Per-row sampling settings of a batch as tensors, built once when the batch composition
    changes. The Python flags stand in for tensor reads, so the greedy-only path costs nothing."""

    temperature: torch.Tensor  # (B,) float32, 0 = greedy
    top_k: torch.Tensor  # (B,) long, 0 = off (always off on greedy rows)
    top_p: torch.Tensor  # (B,) float32, 1 = off (always off on greedy rows)
    repetition_penalty: torch.Tensor  # (B,) float32, 1 = off
    min_new_tokens: torch.Tensor  # (B,) long
    sampled: tuple[bool, ...]  # per row: temperature > 0 (which rows draw noise)
    any_sampling: bool
    any_top_k: bool
    any_top_p: bool
    any_penalty: bool
    any_min_new_tokens: bool

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str
    ) -> RowSampling:
        # Filters never change a greedy argmax, so greedy rows get them switched off.
        top_k = [0 if p.greedy else p.top_k for p in params]
        top_p = [1.0 if p.greedy else p.top_p for p in params]
        penalty = [p.repetition_penalty for p in params]
        min_new = [p.min_new_tokens for p in params]
        sampled = tuple(not p.greedy for p in params)
        return cls(
            temperature=torch.tensor(
                [p.temperature for p in params], dtype=torch.float32, device=device
            ),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            repetition_penalty=torch.tensor(penalty, dtype=torch.float32, device=device),
            min_new_tokens=torch.tensor(min_new, dtype=torch.long, device=device),
            sampled=sampled,
            any_sampling=any(sampled),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1 for p in top_p),
            any_penalty=any(p != 1 for p in penalty),
            any_min_new_tokens=any(m > 0 for m in min_new),
        )

    def __len__(self) -> int:
        return len(self.sampled)


def mark_seen(seen: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Mark tokens for the repetition penalty, in place: ``seen[b, token_ids[b, ...]] = True``.

    seen: (B, V) bool; token_ids: (B,) or (B, T) long, all valid ids (no padding)."""
    ids = token_ids.unsqueeze(1) if token_ids.dim() == 1 else token_ids
    seen.scatter_(1, ids.to(device=seen.device, dtype=torch.long), True)


def _penalise_and_suppress(
    logits: torch.Tensor,
    rows: RowSampling,
    generated: torch.Tensor,
    seen: torch.Tensor | None,
    eos_id: int,
) -> torch.Tensor:
    """(B, V) float32 copy of ``logits`` after repetition penalty and EOS suppression."""
    x = logits.to(torch.float32, copy=True)
    if rows.any_penalty:
        if seen is None:
            raise ValueError("seen is required when a row uses repetition_penalty")
        pen = rows.repetition_penalty.unsqueeze(1)
        x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)  # CTRL: shrink toward 0
    if rows.any_min_new_tokens:
        early = generated.to(rows.min_new_tokens.device) < rows.min_new_tokens
        x[:, eos_id].masked_fill_(early, -math.inf)
    return x


def _warp(x: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """Temperature, top-k, top-p on (B, V) float32 logits, in place; one sort for both filters."""
    temperature = torch.where(rows.temperature > 0, rows.temperature, 1.0)
    x.div_(temperature.unsqueeze(1))
    if not (rows.any_top_k or rows.any_top_p):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    if rows.any_top_k:
        # Threshold on the k-th value (ties at the boundary survive, as in HF's TopKLogitsWarper).
        k = rows.top_k.clamp(1, x.shape[-1]).unsqueeze(1)
        kth = sorted_x.gather(1, k - 1)
        on = (rows.top_k > 0).unsqueeze(1)
        x.masked_fill_(on & (x < kth), -math.inf)
        sorted_x.masked_fill_(on & (sorted_x < kth), -math.inf)
    if rows.any_top_p:
        # Drop a token once the mass strictly above it reaches p, which keeps the smallest prefix
        # whose mass reaches p (HF's TopPLogitsWarper, written over a descending sort).
        probs = sorted_x.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        drop = (mass_above >= rows.top_p.unsqueeze(1)) & (rows.top_p < 1).unsqueeze(1)
        drop[:, 0] = False
        x.masked_fill_(drop.scatter(1, order, drop), -math.inf)
    return x


def processed_logits(
    logits: torch.Tensor,
    rows: RowSampling,
    *,
    generated: torch.Tensor,
    seen: torch.Tensor | None,
    eos_id: int,
) -> torch.Tensor:
    """(B, V) float32 logits the sampler draws from, filtered tokens at -inf. Greedy rows get
    only penalty and EOS suppression. Exposed for tests against reference processors."""
    return _warp(_penalise_and_suppress(logits, rows, generated, seen, eos_id), rows)


def next_tokens(
    logits: torch.Tensor,
    rows: RowSampling,
    *,
    generated: torch.Tensor,
    seen: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
    eos_id: int,
) -> torch.Tensor:
    """(B,) long next token per row from (B, V) last-position logits.

    ``generated`` (B,) counts this turn's tokens so far (for ``min_new_tokens``); ``seen`` (B, V)
    bool marks this turn's prompt + answer tokens (for the penalty; may be None when unused);
    ``generators`` holds one RNG per row (None = global). No host sync.
    """
    x = _penalise_and_suppress(logits, rows, generated, seen, eos_id)
    greedy = x.argmax(dim=-1)
    if not rows.any_sampling:
        return greedy
    if len(generators) != len(rows):
        raise ValueError(f"need one generator per row ({len(rows)}), got {len(generators)}")
    probs = _warp(x, rows).softmax(dim=-1)
    vocab = probs.shape[-1]
    noise = torch.ones_like(probs)
    for i, (draws, gen) in enumerate(zip(rows.sampled, generators, strict=True)):
        if draws:  # the row's own stream, shape (V,): independent of the batch around it
            e = torch.empty(vocab, device=probs.device, dtype=torch.float32)
            noise[i] = e.exponential_(generator=gen)
    # Exp(1) may round to 0; a tiny floor keeps p/E finite and 0/E == 0 for filtered tokens.
    sampled = probs.div_(noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    return torch.where(rows.temperature > 0, sampled, greedy)
