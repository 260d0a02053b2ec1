"""Vectorised BLEU on token ids, for many sentences at once, on CPU or CUDA.

The paper's composite reward scores each generated answer against its reference with BLEU. Doing
that in a Python loop over decoded strings (NLTK) is slow and forces a device-to-host copy; this
module computes the same numbers on the id tensors themselves:

* n-grams are the windows of the padded id grid (what ``unfold`` would give), but they are never
  materialised as ``(…, n)`` rows: a compact dictionary of the *(sentence, n-gram)* pairs present
  in the batch is built with ``torch.unique(return_inverse=True)`` on one int64 key per window
  start. The key of an n-gram at position ``p`` is ``id(sentence, (n-1)-gram at p) * U +
  id(token at p+n-1)`` (``U``: distinct tokens in the batch), so each order is one 1-D
  ``unique`` and no vocabulary-sized or ``batch × dictionary`` table is ever allocated;
* counts per pair are ``scatter_add`` over the inverse indices (per reference for the references,
  then the maximum over references), candidate counts are clipped by that maximum and summed per
  sentence. There is no Python loop over sentences and no ``.item()`` (``torch.unique`` itself
  still synchronises on CUDA, once per order plus once for the tokens, since its output size
  depends on the data).

Results follow NLTK's ``nltk.translate.bleu_score`` (checked against NLTK 3.10.4 in
``tests/test_eval_bleu.py``):

* modified precision per order with the denominator ``max(1, number of candidate n-grams)`` per
  sentence (so a candidate shorter than ``n`` has precision ``0/1`` at that order);
* brevity penalty with the closest reference length, ties going to the shorter reference;
  ``1`` if the candidate is longer, ``0`` for an empty candidate, else ``exp(1 - r/c)``;
* BLEU is 0 whenever no unigram matches (NLTK returns early there, whatever the smoothing);
* ``corpus_bleu`` sums clipped counts, denominators and lengths over the corpus before taking the
  precisions, as NLTK's ``corpus_bleu`` and sacrebleu do.

Smoothing (``SmoothingFunction`` of NLTK, after Chen & Cherry 2014):

* ``"none"`` = ``method0``: a zero precision at an order with a positive weight gives BLEU 0.
  (NLTK substitutes ``sys.float_info.min`` and returns ``exp(w·log(2.2e-308))``-sized values,
  about 1e-77 for ``w = 1/4``; this module returns exactly 0.)
* ``"floor"`` = ``method1``: a zero count becomes ``epsilon`` (0.1) matches.
* ``"add-k"`` = ``method2``: 1 is added to numerator and denominator of every order ``n > 1``,
  matched or not; the unigram precision is left unsmoothed.
* ``"exp"`` = ``method3``: the ``k``-th order with zero matches gets precision
  ``1 / (2**k · denominator)`` (NIST geometric sequence, as in ``mteval-v13a.pl``).

NLTK's ``auto_reweigh`` (off by default) is not implemented. Everything is computed in float64
and returned as float64 on the inputs' device (cast with ``.float()`` for a float32 reward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

__all__ = ["BleuStats", "Smoothing", "bleu_statistics", "corpus_bleu", "sentence_bleu"]

Smoothing = Literal["none", "floor", "add-k", "exp"]
_SMOOTHINGS = ("none", "floor", "add-k", "exp")

IdsLike = torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]
RefsLike = IdsLike | Sequence[Sequence[Sequence[int]]]
LengthsLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None


class BleuStats(NamedTuple):
    """Sufficient statistics of BLEU, per sentence.

    ``matches`` and ``denominators`` are ``(B, max_n)`` int64: clipped n-gram matches and
    ``max(1, candidate n-grams)`` per order (NLTK's denominators). ``hyp_len`` and ``ref_len``
    are ``(B,)`` int64: candidate length and closest reference length.
    """

    matches: torch.Tensor
    denominators: torch.Tensor
    hyp_len: torch.Tensor
    ref_len: torch.Tensor

    def sum(self) -> BleuStats:
        """Corpus statistics: every field summed over the batch (leading) dimension."""
        return BleuStats(*(t.sum(0) for t in self))


# ---------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------


def _is_seq(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() > 0
    return isinstance(x, Sequence) and not isinstance(x, str | bytes)


def _as_ints(row: object) -> list[int]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise ValueError(f"expected a 1-D sequence of ids, got shape {tuple(row.shape)}")
        return [int(v) for v in row.tolist()]
    return [int(v) for v in row]  # type: ignore[union-attr]


def _pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids with zeros: ``(len(rows), T)`` ids and ``(len(rows),)`` lengths."""
    lengths = [len(r) for r in rows]
    width = max(lengths, default=0)
    data = [r + [0] * (width - len(r)) for r in rows]
    ids = torch.tensor(data, dtype=torch.long, device=device).reshape(len(rows), width)
    return ids, torch.tensor(lengths, dtype=torch.long, device=device)


def _lengths_from_pad(ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Length of each row along the last dim: position of the first ``pad_id`` (or full)."""
    if pad_id is None:
        return torch.full(ids.shape[:-1], ids.shape[-1], dtype=torch.long, device=ids.device)
    return (ids != pad_id).long().cumprod(-1).sum(-1)


def _check_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def _prepare_candidates(
    candidates: IdsLike, lengths: LengthsLike, pad_id: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(candidates, torch.Tensor):
        if lengths is not None:
            raise ValueError("candidate_lengths is only for tensor candidates (lists carry theirs)")
        return _pad([_as_ints(r) for r in candidates], device)
    if candidates.dim() != 2:
        raise ValueError(f"candidates must be (B, T), got shape {tuple(candidates.shape)}")
    ids = _check_ids(candidates, "candidates")
    if lengths is None:
        return ids, _lengths_from_pad(ids, pad_id)
    lens = torch.as_tensor(lengths, dtype=torch.long, device=ids.device)
    if lens.shape != ids.shape[:1]:
        raise ValueError(f"candidate_lengths must be ({ids.shape[0]},), got {tuple(lens.shape)}")
    return ids, lens.clamp(0, ids.shape[1])


def _prepare_references(
    references: RefsLike, lengths: LengthsLike, pad_id: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, R, T)`` ids and ``(B, R)`` lengths; a length of -1 marks an absent reference."""
    if not isinstance(references, torch.Tensor):
        if lengths is not None:
            raise ValueError("reference_lengths is only for tensor references (lists carry theirs)")
        refs = list(references)
        multi = any(
            (isinstance(r, torch.Tensor) and r.dim() == 2)
            or (not isinstance(r, torch.Tensor) and any(_is_seq(x) for x in r))
            for r in refs
        )
        per_cand = [
            [_as_ints(x) for x in r] if multi else [_as_ints(r)]  # type: ignore[union-attr]
            for r in refs
        ]
        num_refs = max((len(r) for r in per_cand), default=1) or 1
        flat = [x for r in per_cand for x in r + [[]] * (num_refs - len(r))]
        ids, lens = _pad(flat, device)
        present = torch.tensor(
            [i < len(r) for r in per_cand for i in range(num_refs)], dtype=torch.bool, device=device
        )
        lens = torch.where(present, lens, -1)
        return ids.view(len(refs), num_refs, ids.shape[1]), lens.view(len(refs), num_refs)
    if references.dim() not in (2, 3):
        raise ValueError(f"references must be (B, T) or (B, R, T), got {tuple(references.shape)}")
    ids = _check_ids(references, "references")
    single = ids.dim() == 2
    if single:
        ids = ids.unsqueeze(1)
    if lengths is None:
        return ids, _lengths_from_pad(ids, pad_id)
    lens = torch.as_tensor(lengths, dtype=torch.long, device=ids.device)
    if single and lens.dim() == 1:
        lens = lens.unsqueeze(1)
    if lens.shape != ids.shape[:2]:
        want = ids.shape[:1] if single else ids.shape[:2]
        raise ValueError(f"reference_lengths must be {tuple(want)}, got {tuple(lens.shape)}")
    return ids, torch.where(lens < 0, -1, lens.clamp(max=ids.shape[2]))


def _prepare(candidates, references, candidate_lengths, reference_lengths, pad_id):
    device = next(
        (x.device for x in (candidates, references) if isinstance(x, torch.Tensor)),
        torch.device("cpu"),
    )
    cand, cand_len = _prepare_candidates(candidates, candidate_lengths, pad_id, device)
    refs, ref_len = _prepare_references(references, reference_lengths, pad_id, device)
    if refs.device != cand.device:
        raise ValueError(f"candidates on {cand.device} but references on {refs.device}")
    if refs.shape[0] != cand.shape[0]:
        raise ValueError(f"{cand.shape[0]} candidates but references for {refs.shape[0]} sentences")
    return cand, cand_len, refs, ref_len


def _resolve_order(max_n: int | None, weights: Sequence[float] | None) -> tuple[int, list[float]]:
    if weights is None:
        n = 4 if max_n is None else max_n
        if n < 1:
            raise ValueError(f"max_n must be >= 1, got {n}")
        return n, [1.0 / n] * n
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("weights must not be empty")
    if max_n is not None and max_n != len(w):
        raise ValueError(f"max_n={max_n} but {len(w)} weights")
    return len(w), w


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _closest_ref_len(hyp_len: torch.Tensor, ref_len: torch.Tensor, width: int) -> torch.Tensor:
    """NLTK's ``closest_ref_length``: the nearest reference length, ties to the shorter one."""
    present = ref_len >= 0
    lens = ref_len.clamp(min=0)
    key = (lens - hyp_len[:, None]).abs() * (width + 1) + lens  # lens <= width: order-preserving
    key = torch.where(present, key, torch.iinfo(torch.long).max)
    closest = lens.gather(1, key.argmin(1, keepdim=True)).squeeze(1)
    return torch.where(present.any(1), closest, 0)


def _statistics(
    cand: torch.Tensor,
    cand_len: torch.Tensor,
    refs: torch.Tensor,
    ref_len: torch.Tensor,
    max_n: int,
) -> BleuStats:
    batch, t_cand = cand.shape
    num_refs, t_ref = refs.shape[1:]
    device = cand.device
    matches = torch.zeros(batch, max_n, dtype=torch.long, device=device)
    totals = torch.zeros(batch, max_n, dtype=torch.long, device=device)
    hyp_len = cand_len
    closest = _closest_ref_len(cand_len, ref_len, t_ref)
    if batch == 0:
        return BleuStats(matches, totals.clamp(min=1), hyp_len, closest)

    # Token dictionary over everything in the batch, then (sentence, token) keys.
    vocab, tok = torch.unique(torch.cat([cand.reshape(-1), refs.reshape(-1)]), return_inverse=True)
    size = vocab.numel()
    tok_c = tok[: cand.numel()].view(batch, t_cand)
    tok_r = tok[cand.numel() :].view(batch, num_refs, t_ref)
    rows = torch.arange(batch, device=device)
    slot = torch.arange(num_refs, device=device).view(1, num_refs, 1)
    key_c = rows.view(batch, 1) * size + tok_c
    key_r = rows.view(batch, 1, 1) * size + tok_r
    sentence_of = None  # pair id -> sentence index, chained order to order

    for n in range(1, max_n + 1):
        pairs, inverse = torch.unique(
            torch.cat([key_c.reshape(-1), key_r.reshape(-1)]), return_inverse=True
        )
        num_pairs = pairs.numel()
        ids_c = inverse[: key_c.numel()].view_as(key_c)
        ids_r = inverse[key_c.numel() :].view_as(key_r)
        prev = pairs // size
        sentence_of = prev if sentence_of is None else sentence_of[prev]

        pos_c = torch.arange(key_c.shape[-1], device=device)
        valid_c = (pos_c + n <= cand_len[:, None]).long()
        pos_r = torch.arange(key_r.shape[-1], device=device)
        valid_r = (pos_r + n <= ref_len[:, :, None]).long()  # absent references (-1): none

        cand_count = torch.zeros(num_pairs, dtype=torch.long, device=device)
        cand_count.scatter_add_(0, ids_c.reshape(-1), valid_c.reshape(-1))
        ref_count = torch.zeros(num_pairs * num_refs, dtype=torch.long, device=device)
        ref_count.scatter_add_(0, (ids_r * num_refs + slot).reshape(-1), valid_r.reshape(-1))
        clipped = torch.minimum(cand_count, ref_count.view(num_pairs, num_refs).amax(1))
        matches[:, n - 1].scatter_add_(0, sentence_of, clipped)
        totals[:, n - 1] = valid_c.sum(1)

        if n < max_n:  # keys of the (n+1)-grams: this (sentence, n-gram) id, then next token
            key_c = ids_c[:, :-1] * size + tok_c[:, n:]
            key_r = ids_r[..., :-1] * size + tok_r[..., n:]

    return BleuStats(matches, totals.clamp(min=1), hyp_len, closest)


def bleu_statistics(
    candidates: IdsLike,
    references: RefsLike,
    *,
    candidate_lengths: LengthsLike = None,
    reference_lengths: LengthsLike = None,
    max_n: int = 4,
    pad_id: int | None = 0,
) -> BleuStats:
    """Per-sentence BLEU statistics (see :class:`BleuStats`); inputs as in :func:`sentence_bleu`."""
    cand, cand_len, refs, ref_len = _prepare(
        candidates, references, candidate_lengths, reference_lengths, pad_id
    )
    return _statistics(cand, cand_len, refs, ref_len, max_n)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _score(stats: BleuStats, weights: list[float], smoothing: str, epsilon: float) -> torch.Tensor:
    """BLEU from statistics with any leading shape: ``(..., N)`` counts, ``(...)`` lengths."""
    if smoothing not in _SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {_SMOOTHINGS}, got {smoothing!r}")
    num = stats.matches.double()
    den = stats.denominators.double()
    w = torch.tensor(weights, dtype=torch.float64, device=num.device)
    zero = num == 0
    if smoothing == "floor":  # NLTK method1
        p = torch.where(zero, epsilon / den, num / den)
    elif smoothing == "add-k":  # NLTK method2: every order but the first, matched or not
        p = torch.cat([num[..., :1] / den[..., :1], (num[..., 1:] + 1) / (den[..., 1:] + 1)], -1)
    elif smoothing == "exp":  # NLTK method3: k-th zero order -> 1 / (2^k * den)
        k = zero.to(torch.float64).cumsum(-1)
        p = torch.where(zero, 1.0 / (torch.pow(2.0, k) * den), num / den)
    else:  # NLTK method0
        p = num / den
    log_p = torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0)), 0.0)  # NLTK skips p == 0
    bleu = torch.exp((w * log_p).sum(-1))

    c = stats.hyp_len.double()
    r = stats.ref_len.double()
    bp = torch.exp(1.0 - r / c.clamp(min=1.0))
    bp = torch.where(c > r, 1.0, torch.where(c == 0, 0.0, bp))
    bleu = bp * bleu
    dead = zero[..., 0]  # no unigram match: NLTK returns 0 before smoothing
    if smoothing == "none":
        dead = dead | (zero & (w > 0)).any(-1)
    return torch.where(dead, 0.0, bleu)


def sentence_bleu(
    candidates: IdsLike,
    references: RefsLike,
    *,
    candidate_lengths: LengthsLike = None,
    reference_lengths: LengthsLike = None,
    max_n: int | None = None,
    weights: Sequence[float] | None = None,
    smoothing: Smoothing = "none",
    epsilon: float = 0.1,
    pad_id: int | None = 0,
) -> torch.Tensor:
    """BLEU of each candidate against its own reference(s): a ``(B,)`` float64 tensor in [0, 1].

    Args:
        candidates: ``(B, T)`` right-padded integer ids, or a list of ``B`` id lists / 1-D
            tensors (then lengths are the lists' lengths, built on CPU unless ``references``
            is a tensor).
        references: ``(B, T')`` (one reference each) or ``(B, R, T')`` (``R`` each) ids; or a
            list of ``B`` id lists (one each) or of ``B`` lists of id lists (any number each,
            including none, which scores 0).
        candidate_lengths: ``(B,)`` lengths; if omitted, each row ends at its first ``pad_id``
            (the whole row if ``pad_id`` is None). Lengths beyond ``T`` are read as ``T``.
        reference_lengths: ``(B,)`` or ``(B, R)``, as above; a negative length marks an absent
            reference slot (so rows of a ``(B, R, T')`` tensor can have fewer than ``R``).
            Without lengths, an all-pad reference is an *empty* reference, not an absent one.
        max_n: highest n-gram order; 4 by default, else ``len(weights)``.
        weights: per-order weights of the geometric mean (uniform ``1/max_n`` by default).
        smoothing: ``"none"`` / ``"floor"`` / ``"add-k"`` / ``"exp"`` = NLTK's
            ``SmoothingFunction().method0`` / ``method1`` / ``method2`` / ``method3``.
        epsilon: the ``"floor"`` count for orders with no match (NLTK's default 0.1).
        pad_id: padding id used to infer lengths that are not given.

    Equals ``nltk.translate.bleu_score.sentence_bleu`` row by row (see module docstring for the
    one deliberate difference, exact zeros under ``"none"``).
    """
    n, w = _resolve_order(max_n, weights)
    stats = bleu_statistics(
        candidates,
        references,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        max_n=n,
        pad_id=pad_id,
    )
    return _score(stats, w, smoothing, epsilon)


def corpus_bleu(
    candidates: IdsLike,
    references: RefsLike,
    *,
    candidate_lengths: LengthsLike = None,
    reference_lengths: LengthsLike = None,
    max_n: int | None = None,
    weights: Sequence[float] | None = None,
    smoothing: Smoothing = "none",
    epsilon: float = 0.1,
    pad_id: int | None = 0,
) -> torch.Tensor:
    """Corpus BLEU: a 0-dim float64 tensor in [0, 1].

    Clipped matches, denominators, candidate lengths and closest reference lengths are summed
    over the corpus first, then turned into one score (NLTK's ``corpus_bleu``; sacrebleu's
    ``corpus_score`` / 100 when every candidate has at least ``max_n`` tokens). Arguments as in
    :func:`sentence_bleu`; an empty corpus scores 0.
    """
    n, w = _resolve_order(max_n, weights)
    stats = bleu_statistics(
        candidates,
        references,
        candidate_lengths=candidate_lengths,
        reference_lengths=reference_lengths,
        max_n=n,
        pad_id=pad_id,
    )
    return _score(stats.sum(), w, smoothing, epsilon)
