"""The paper's composite MRL reward (0–10), in one fixed, model-independent text space.

Per follow-up turn the reward of a generated answer is a weighted mean of three terms in [0, 1],
times 10:

* **fluency**: sentence BLEU(generated, reference), computed by :func:`rxt.eval.bleu.sentence_bleu`
  (max order 4, uniform weights, smoothing ``"floor"`` = NLTK ``method1``, so a short answer with
  no 3- or 4-gram match is not scored 0) on a *shared* word tokenisation (:func:`word_tokenize`:
  lower-cased ``\\w+`` runs and single punctuation marks), mapped to ids by a vocabulary built
  per call. BLEU therefore does not depend on any model's tokenizer. An answer identical to a
  reference of at least 4 words gets BLEU 1; a shorter one gets less (floored precisions).
* **relevance**: cosine(generated, reference answer), clamped at 0;
* **memory use**: cosine(generated, earlier interactions of the dialogue: the previous turns'
  queries and answers, joined), clamped at 0.

Cosines are taken in the space of :class:`TextEmbedder`, which is fixed (no parameters, no
training, no model tokenizer), so RxT and stateless baselines with different tokenizers get
comparable scores. **Empty history** (first turn, or only blank strings): the memory term is
undefined and dropped, and the weights are renormalised over the remaining terms (so an answer
equal to its reference still scores 10). If no term with positive weight remains (e.g. weights
``(0, 0, 1)`` with no history) the reward is 0.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

from rxt.data.dialogue import Dialogue
from rxt.eval.bleu import sentence_bleu

__all__ = [
    "RewardTerms",
    "TextEmbedder",
    "dialogue_rewards",
    "reward",
    "reward_summary",
    "reward_terms",
    "word_tokenize",
]

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Shared, model-independent tokenisation: lower-cased word runs and punctuation marks."""
    return _WORD.findall(text.lower())


class TextEmbedder:
    """Hashed character n-gram embedding: a fixed, deterministic lexical-semantic proxy.

    Each word of :func:`word_tokenize` is wrapped in boundary markers (``<cat>``) and cut into
    character n-grams for ``n`` in ``ngram_range`` (a word shorter than ``n`` contributes its
    whole wrapped form once); every n-gram is hashed with ``zlib.crc32`` of its UTF-8 bytes (not
    Python's salted ``hash``) into one of ``dim`` buckets. Counts are scaled by ``log1p`` and the
    vector is L2-normalised (an empty text gives the zero vector, whose cosines are 0). The
    result is identical across processes, platforms and ``PYTHONHASHSEED``.

    Limits, stated plainly: no pretrained sentence encoder is available offline, so this space
    only sees *surface* overlap (shared words, stems, morphology), not meaning. Paraphrases with
    different words score low, and texts sharing words but saying opposite things score high.
    Word order is ignored (bag of n-grams within words). All vectors are non-negative, so
    cosines lie in [0, 1]; unrelated texts still get small positive cosines from common short
    n-grams and from hash collisions (rarer with larger ``dim``). A long history diluted over
    many words gives lower cosines than a short one. Treat absolute values as a proxy only;
    comparisons are fair because every system is scored in this same space.
    """

    def __init__(self, dim: int = 4096, ngram_range: tuple[int, int] = (3, 5)) -> None:
        lo, hi = ngram_range
        if dim < 1 or lo < 1 or hi < lo:
            raise ValueError(f"need dim >= 1 and 1 <= n_min <= n_max, got {dim}, {ngram_range}")
        self.dim, self.ngram_range = dim, (lo, hi)

    def buckets(self, text: str) -> list[int]:
        """Bucket index of every character n-gram of ``text`` (with repeats)."""
        lo, hi = self.ngram_range
        out: list[int] = []
        for word in word_tokenize(text):
            w = f"<{word}>"
            for n in range(lo, hi + 1):
                grams = [w[i : i + n] for i in range(len(w) - n + 1)] or ([w] if n == lo else [])
                out.extend(zlib.crc32(g.encode("utf-8")) % self.dim for g in grams)
        return out

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, dim)`` float32 L2-normalised embeddings of ``texts`` (zero rows for empty text)."""
        rows: list[int] = []
        cols: list[int] = []
        for i, text in enumerate(texts):
            b = self.buckets(text)
            rows.extend([i] * len(b))
            cols.extend(b)
        counts = torch.zeros(len(texts) * self.dim, dtype=torch.float64)
        flat = torch.tensor(rows, dtype=torch.long) * self.dim + torch.tensor(
            cols, dtype=torch.long
        )
        counts.index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))
        vec = torch.log1p(counts.view(len(texts), self.dim))
        return torch.nn.functional.normalize(vec, dim=-1).float()

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """Row-wise cosine of ``embed(a)`` and ``embed(b)``: ``(N,)`` in [0, 1]."""
        return (self.embed(a) * self.embed(b)).sum(-1).clamp(0.0, 1.0)


class RewardTerms(NamedTuple):
    """The three reward terms per answer, each ``(N,)`` float64 in [0, 1], and ``has_history``
    (``(N,)`` bool): whether the memory term is defined (non-empty earlier interactions)."""

    bleu: torch.Tensor
    cos_reference: torch.Tensor
    cos_history: torch.Tensor
    has_history: torch.Tensor


def _check_weights(weights: Sequence[float]) -> torch.Tensor:
    w = [float(x) for x in weights]
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be 3 finite non-negative numbers with sum > 0, got {w}")
    return torch.tensor(w, dtype=torch.float64)


def reward_terms(
    generated: Sequence[str],
    references: Sequence[str],
    histories: Sequence[Sequence[str]],
    *,
    embedder: TextEmbedder | None = None,
    tokenize: Callable[[str], Sequence[Hashable]] | None = None,
) -> RewardTerms:
    """The three terms of :func:`reward`, unweighted (arguments as there)."""
    n = len(generated)
    if len(references) != n or len(histories) != n:
        raise ValueError(f"{n} answers, {len(references)} references, {len(histories)} histories")
    if any(isinstance(h, str) for h in histories):
        raise TypeError("each history must be a sequence of earlier interaction texts, not a str")
    tok = tokenize or word_tokenize
    vocab: dict[Hashable, int] = {}

    def ids(text: str) -> list[int]:
        return [vocab.setdefault(t, len(vocab) + 1) for t in tok(text)]

    bleu = sentence_bleu([ids(g) for g in generated], [ids(r) for r in references],
                         smoothing="floor")  # fmt: skip
    emb = embedder or TextEmbedder()
    e_gen = emb.embed(generated).double()
    e_ref = emb.embed(references).double()
    e_hist = emb.embed(["\n".join(h) for h in histories]).double()
    cos_ref = (e_gen * e_ref).sum(-1).clamp(0.0, 1.0)
    cos_hist = (e_gen * e_hist).sum(-1).clamp(0.0, 1.0)
    return RewardTerms(bleu.cpu().double(), cos_ref, cos_hist, e_hist.abs().sum(-1) > 0)


def reward(
    generated: Sequence[str],
    references: Sequence[str],
    histories: Sequence[Sequence[str]],
    *,
    weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    embedder: TextEmbedder | None = None,
    tokenize: Callable[[str], Sequence[Hashable]] | None = None,
) -> torch.Tensor:
    """Composite reward of each generated answer: ``(N,)`` float64 in [0, 10].

    Args:
        generated: decoded answers, one per follow-up turn scored.
        references: the reference answers of those turns.
        histories: per answer, the texts of the dialogue's earlier interactions (previous
            queries and answers, in order; the current query may be included). They are joined
            with newlines and embedded once. Empty → the memory term is dropped (module doc).
        weights: ``(bleu, cos_reference, cos_history)``, finite, non-negative, sum > 0; the
            reward is ``10 · Σ w·term / Σ w`` over the terms that are defined.
        embedder: the shared text space; a default :class:`TextEmbedder` if omitted. Pass the
            *same* one for every compared system.
        tokenize: text → tokens (any hashable) for BLEU; :func:`word_tokenize` by default. Keep
            it model-independent, or BLEU stops being comparable across tokenizers.
    """
    w = _check_weights(weights)
    t = reward_terms(generated, references, histories, embedder=embedder, tokenize=tokenize)
    terms = torch.stack([t.bleu, t.cos_reference, t.cos_history], -1)
    avail = torch.stack([torch.ones_like(t.has_history), torch.ones_like(t.has_history),
                         t.has_history], -1).double()  # fmt: skip
    w_eff = w * avail
    total = w_eff.sum(-1)
    score = (w_eff * terms).sum(-1) / total.clamp(min=1e-300)
    return (10.0 * torch.where(total > 0, score, 0.0)).clamp(0.0, 10.0)


def reward_summary(rewards: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """``{"mean", "max", "min"}`` of the rewards, as in the paper's table; raises if empty."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if r.numel() == 0:
        raise ValueError("no rewards to summarise")
    return {"mean": r.mean().item(), "max": r.max().item(), "min": r.min().item()}


def dialogue_rewards(
    dialogues: Sequence[Dialogue],
    replies: Sequence[Sequence[str]],
    *,
    embedder: TextEmbedder | None = None,
) -> torch.Tensor:
    """:func:`reward` of every follow-up turn (turn 2 onwards) of ``dialogues``: ``replies[i][t]``
    is scored against the gold answer, with the gold earlier turns (queries and answers) as the
    history. Every system is scored by this one function, so their numbers are comparable."""
    if len(replies) != len(dialogues):
        raise ValueError(f"{len(replies)} reply lists for {len(dialogues)} dialogues")
    generated, references, histories = [], [], []
    for i, (dialogue, answers) in enumerate(zip(dialogues, replies, strict=True)):
        if len(answers) != len(dialogue.turns):
            raise ValueError(
                f"dialogue {i} ({dialogue.id!r}): {len(answers)} replies for "
                f"{len(dialogue.turns)} turns"
            )
        history: list[str] = []
        for t, turn in enumerate(dialogue.turns):
            if t > 0:
                generated.append(answers[t])
                references.append(turn.answer)
                histories.append(list(history))
            history += [turn.query, turn.answer]
    if not generated:
        raise ValueError("no follow-up turns to score (every dialogue has one turn)")
    return reward(generated, references, histories, embedder=embedder)
