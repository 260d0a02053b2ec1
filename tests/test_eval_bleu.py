"""Token-id BLEU (rxt.eval.bleu) against NLTK's reference implementation (and sacrebleu)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from rxt.eval.bleu import bleu_statistics, corpus_bleu, sentence_bleu

SMOOTHINGS = ("none", "floor", "add-k", "exp")
NLTK_METHOD = {"none": "method0", "floor": "method1", "add-k": "method2", "exp": "method3"}
TOL = 1e-9  # observed: ~1e-16 (float64 sums in a different order than NLTK's math.fsum)


def _nltk():
    return pytest.importorskip("nltk.translate.bleu_score")


def _smoother(name: str):
    return getattr(_nltk().SmoothingFunction(), NLTK_METHOD[name])


def _words(ids: list[int]) -> list[str]:
    return [str(t) for t in ids]


def _random_corpus(seed: int, size: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Lengths 0..30, 1–3 references, small vocabularies (2..12 ids) so n-grams repeat."""
    rng = random.Random(seed)
    cands, refs = [], []
    for _ in range(size):
        vocab = rng.choice((2, 3, 5, 12))
        cands.append([rng.randint(1, vocab) for _ in range(rng.randint(0, 30))])
        refs.append(
            [
                [rng.randint(1, vocab) for _ in range(rng.randint(0, 30))]
                for _ in range(rng.randint(1, 3))
            ]
        )
    return cands, refs


def _nltk_sentence(cands, refs, smoothing, weights=(0.25, 0.25, 0.25, 0.25)) -> torch.Tensor:
    bleu, smooth = _nltk(), _smoother(smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0 warns about zero counts
        scores = [
            bleu.sentence_bleu(
                [_words(r) for r in rr], _words(c), weights, smoothing_function=smooth
            )
            for c, rr in zip(cands, refs, strict=True)
        ]
    return torch.tensor(scores, dtype=torch.float64)


def _nltk_corpus(cands, refs, smoothing, weights=(0.25, 0.25, 0.25, 0.25)) -> float:
    bleu, smooth = _nltk(), _smoother(smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bleu.corpus_bleu(
            [[_words(r) for r in rr] for rr in refs],
            [_words(c) for c in cands],
            weights,
            smoothing_function=smooth,
        )


def _to_tensors(cands, refs, extra: int = 0, fill: int = 0):
    """Right-padded ``(B, T)`` candidates and ``(B, R, T')`` references with lengths (-1: absent),
    ``extra`` columns wider than needed, padding filled with ``fill``."""
    b = len(cands)
    t = max(map(len, cands), default=0) + extra
    r = max(map(len, refs), default=1)
    tr = max((len(x) for rr in refs for x in rr), default=0) + extra
    c_ids = torch.full((b, t), fill, dtype=torch.long)
    r_ids = torch.full((b, r, tr), fill, dtype=torch.long)
    r_len = torch.full((b, r), -1, dtype=torch.long)
    for i, (c, rr) in enumerate(zip(cands, refs, strict=True)):
        c_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        for j, x in enumerate(rr):
            r_ids[i, j, : len(x)] = torch.tensor(x, dtype=torch.long)
            r_len[i, j] = len(x)
    c_len = torch.tensor([len(c) for c in cands], dtype=torch.long)
    return c_ids, c_len, r_ids, r_len


# --- agreement with NLTK ------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_sentence_bleu_matches_nltk(smoothing):
    cands, refs = _random_corpus(seed=1, size=400)
    ours = sentence_bleu(cands, refs, smoothing=smoothing)
    assert ours.shape == (400,) and ours.dtype == torch.float64
    theirs = _nltk_sentence(cands, refs, smoothing)
    assert (ours - theirs).abs().max().item() <= TOL
    # The sample exercises the interesting regimes: zeros, partial matches, perfect scores.
    assert (theirs == 0).any() and ((theirs > 0.05) & (theirs < 0.95)).any()


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_corpus_bleu_matches_nltk(smoothing):
    for seed in range(6):
        cands, refs = _random_corpus(seed=100 + seed, size=60)
        ours = corpus_bleu(cands, refs, smoothing=smoothing)
        assert ours.dim() == 0
        assert abs(ours.item() - _nltk_corpus(cands, refs, smoothing)) <= TOL


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0,), (0.1, 0.2, 0.3, 0.4), (0.2,) * 5])
@pytest.mark.parametrize("smoothing", ["none", "exp", "add-k"])
def test_custom_weights_match_nltk(weights, smoothing):
    cands, refs = _random_corpus(seed=7, size=120)
    ours = sentence_bleu(cands, refs, weights=weights, smoothing=smoothing)
    assert (ours - _nltk_sentence(cands, refs, smoothing, weights)).abs().max() <= TOL
    ours_c = corpus_bleu(cands, refs, weights=weights, smoothing=smoothing).item()
    assert abs(ours_c - _nltk_corpus(cands, refs, smoothing, weights)) <= TOL


def test_max_n_means_uniform_weights():
    cands, refs = _random_corpus(seed=8, size=50)
    a = sentence_bleu(cands, refs, max_n=2, smoothing="floor")
    b = sentence_bleu(cands, refs, weights=(0.5, 0.5), smoothing="floor")
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sentence_bleu(cands, refs, max_n=3, weights=(0.5, 0.5))


def test_zero_weight_order_is_ignored_without_smoothing():
    # No 4-gram can match (candidate too short) but its weight is 0: NLTK scores the unigrams.
    cands, refs = [[1, 2, 3]], [[[1, 2, 3, 4]]]
    ours = sentence_bleu(cands, refs, weights=(1.0, 0.0, 0.0, 0.0))
    assert ours.item() == pytest.approx(_nltk_sentence(cands, refs, "none", (1, 0, 0, 0)).item())
    assert ours.item() > 0


# --- batching, padding, input forms -------------------------------------------------------------


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_batched_equals_row_by_row(smoothing):
    cands, refs = _random_corpus(seed=2, size=40)
    c_ids, c_len, r_ids, r_len = _to_tensors(cands, refs)
    batched = sentence_bleu(
        c_ids, r_ids, candidate_lengths=c_len, reference_lengths=r_len, smoothing=smoothing
    )
    for i in range(len(cands)):
        row = sentence_bleu(
            c_ids[i : i + 1],
            r_ids[i : i + 1],
            candidate_lengths=c_len[i : i + 1],
            reference_lengths=r_len[i : i + 1],
            smoothing=smoothing,
        )
        assert row.item() == pytest.approx(batched[i].item(), abs=1e-12)
        single = sentence_bleu([cands[i]], [refs[i]], smoothing=smoothing)
        assert single.item() == pytest.approx(batched[i].item(), abs=1e-12)
    assert torch.allclose(batched, sentence_bleu(cands, refs, smoothing=smoothing), atol=1e-12)


def test_padding_amount_and_content_do_not_matter():
    cands, refs = _random_corpus(seed=3, size=50)
    base = sentence_bleu(cands, refs, smoothing="exp")
    for extra, fill in [(0, 0), (7, 0), (3, 1), (11, 5)]:  # fill 1/5 collide with real ids
        c_ids, c_len, r_ids, r_len = _to_tensors(cands, refs, extra=extra, fill=fill)
        out = sentence_bleu(
            c_ids, r_ids, candidate_lengths=c_len, reference_lengths=r_len, smoothing="exp"
        )
        assert torch.allclose(out, base, atol=1e-12)
        corpus = corpus_bleu(
            c_ids, r_ids, candidate_lengths=c_len, reference_lengths=r_len, smoothing="exp"
        )
        assert corpus.item() == pytest.approx(corpus_bleu(cands, refs, smoothing="exp").item())


def test_lengths_from_pad_id():
    rng = random.Random(4)
    cands = [[rng.randint(1, 4) for _ in range(rng.randint(0, 20))] for _ in range(30)]
    refs = [[rng.randint(1, 4) for _ in range(rng.randint(0, 20))] for _ in range(30)]
    for extra in (0, 5):
        c_ids, _, r_ids, _ = _to_tensors(cands, [[r] for r in refs], extra=extra, fill=0)
        out = sentence_bleu(c_ids, r_ids[:, 0], smoothing="floor")  # (B, T) refs, pad_id=0
        assert torch.allclose(out, sentence_bleu(cands, refs, smoothing="floor"), atol=1e-12)
        shifted = sentence_bleu(c_ids + 10, r_ids[:, 0] + 10, pad_id=10, smoothing="floor")
        assert torch.allclose(shifted, out, atol=1e-12)


def test_single_reference_forms_agree():
    cands, refs = _random_corpus(seed=5, size=30)
    one = [rr[0] for rr in refs]
    a = sentence_bleu(cands, one)  # list of id lists: one reference each
    b = sentence_bleu(cands, [[r] for r in one])  # nested lists: several (here one) each
    c = sentence_bleu([torch.tensor(c, dtype=torch.long) for c in cands], one)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(a, _nltk_sentence(cands, [[r] for r in one], "none"), atol=TOL)


def test_candidate_without_references_scores_zero():
    out = sentence_bleu([[1, 2, 3, 4], [1, 2, 3, 4]], [[], [[1, 2, 3, 4]]])
    assert out.tolist() == [0.0, 1.0]
    c_ids = torch.tensor([[1, 2, 3, 4]])
    r_ids = torch.tensor([[[1, 2, 3, 4], [1, 2, 3, 4]]])
    absent = sentence_bleu(c_ids, r_ids, reference_lengths=torch.tensor([[-1, -1]]))
    assert absent.item() == 0.0


def test_large_ids_need_no_vocabulary_table():
    big = 10**15
    cands = torch.tensor([[big, big + 1, big + 2, big + 3, 7]])
    refs = torch.tensor([[big, big + 1, big + 2, big + 3, 7]])
    assert sentence_bleu(cands, refs).item() == pytest.approx(1.0)


# --- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_edge_cases(smoothing):
    identical = list(range(1, 12))
    assert sentence_bleu([identical], [identical], smoothing=smoothing).item() == pytest.approx(1)
    assert sentence_bleu([[]], [[1, 2, 3]], smoothing=smoothing).item() == 0.0
    assert sentence_bleu([[]], [[]], smoothing=smoothing).item() == 0.0
    assert sentence_bleu([[5, 6]], [[1, 2, 3]], smoothing=smoothing).item() == 0.0
    # Shorter than n (no n-grams of that order: precision 0/1, as NLTK), and a length tie
    # between references 11 and 13 for a 12-token candidate (NLTK takes the shorter).
    cands = [[1, 2], [1, 2, 3], [3], list(range(1, 13))]
    refs = [[[1, 2]], [[1, 2, 3, 4]], [[3, 3]], [list(range(1, 14)), list(range(2, 13))]]
    ours = sentence_bleu(cands, refs, smoothing=smoothing)
    assert torch.allclose(ours, _nltk_sentence(cands, refs, smoothing), atol=TOL)
    stats = bleu_statistics(cands, refs)
    assert stats.ref_len.tolist() == [2, 4, 2, 11]
    assert stats.denominators[0].tolist() == [2, 1, 1, 1]
    assert stats.matches[0].tolist() == [2, 1, 0, 0]


def test_empty_batch_and_corpus():
    assert sentence_bleu([], []).shape == (0,)
    assert corpus_bleu([], []).item() == 0.0
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert sentence_bleu(empty, empty).shape == (0,)
    assert corpus_bleu([[]], [[1, 2]]).item() == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        sentence_bleu([[1]], [[1], [2]])  # batch sizes differ
    with pytest.raises(TypeError):
        sentence_bleu(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        sentence_bleu([[1]], [[1]], smoothing="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sentence_bleu(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError):
        sentence_bleu([[1]], [[1]], candidate_lengths=[1])


# --- other references and devices ---------------------------------------------------------------


def test_corpus_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(6)
    num_refs = 2  # sacrebleu wants the same number of reference streams for every sentence
    cands = [[rng.randint(1, 6) for _ in range(rng.randint(4, 30))] for _ in range(80)]
    refs = [
        [[rng.randint(1, 6) for _ in range(rng.randint(4, 30))] for _ in range(num_refs)]
        for _ in cands
    ]
    hyps = [" ".join(_words(c)) for c in cands]
    streams = [[" ".join(_words(rr[k])) for rr in refs] for k in range(num_refs)]
    for smoothing in ("none", "floor", "add-k", "exp"):
        theirs = sacrebleu.corpus_bleu(
            hyps, streams, tokenize="none", smooth_method=smoothing, force=True
        ).score
        ours = 100 * corpus_bleu(cands, refs, smoothing=smoothing).item()
        assert ours == pytest.approx(theirs, abs=1e-6)
        assert 1 < theirs < 99  # a real score: every order has matches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cands, refs = _random_corpus(seed=9, size=200)
    c_ids, c_len, r_ids, r_len = _to_tensors(cands, refs)
    for smoothing in SMOOTHINGS:
        kw = {"candidate_lengths": c_len, "reference_lengths": r_len, "smoothing": smoothing}
        cpu = sentence_bleu(c_ids, r_ids, **kw)
        gpu = sentence_bleu(c_ids.cuda(), r_ids.cuda(), **{**kw, "candidate_lengths": c_len.cuda()})
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-12)
        corpus = corpus_bleu(c_ids.cuda(), r_ids.cuda(), **kw)
        assert corpus.item() == pytest.approx(corpus_bleu(c_ids, r_ids, **kw).item())
    # List inputs follow the tensor argument's device.
    assert sentence_bleu(cands, r_ids.cuda(), reference_lengths=r_len).device.type == "cuda"
