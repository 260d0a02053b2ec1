"""Composite MRL reward (rxt.eval.reward): fixed embedding space, BLEU term, weighting, range."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rxt.eval.bleu import sentence_bleu
from rxt.eval.reward import (
    TextEmbedder,
    reward,
    reward_summary,
    reward_terms,
    word_tokenize,
)

TEXTS = [
    "The little cat sat on the mat, and it was happy.",
    "Lily went to the park with her red ball!",
    "",
    "Ünïcödé wörds — and 123 numbers.",
]
ANSWER = "Tom found a shiny blue stone near the river and gave it to his sister."


def test_embedder_deterministic_across_calls_and_processes() -> None:
    emb = TextEmbedder()
    a, b = emb.embed(TEXTS), TextEmbedder().embed(TEXTS)
    assert a.shape == (len(TEXTS), 4096) and a.dtype == torch.float32
    assert torch.equal(a, b)
    code = (
        "import sys; from rxt.eval.reward import TextEmbedder; "
        f"v = TextEmbedder().embed({TEXTS!r}); "
        "sys.stdout.write(repr(v.nonzero().tolist()) + '|' + repr(v[v != 0].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out == repr(a.nonzero().tolist()) + "|" + repr(a[a != 0].tolist())


def test_embedder_cosines() -> None:
    emb = TextEmbedder()
    v = emb.embed(TEXTS)
    norms = v.norm(dim=-1)
    assert torch.allclose(norms[[0, 1, 3]], torch.ones(3)) and norms[2] == 0  # empty -> zero row
    assert torch.allclose(emb.cosine(TEXTS[:2], TEXTS[:2]), torch.ones(2))
    # Disjoint character sets: no shared n-gram, only (rare) hash collisions.
    cos = emb.cosine(["abc def ghi abcdef"], ["xyz uvw rst qrstuvwxyz"])
    assert cos.item() < 0.05
    # Related texts sit between unrelated and identical.
    related = emb.cosine(["the cat sat on the mat"], ["a cat was sitting on a mat"]).item()
    unrelated = emb.cosine(["the cat sat on the mat"], ["quantum chromodynamics lecture"]).item()
    assert unrelated < related < 1.0
    with pytest.raises(ValueError):
        TextEmbedder(dim=0)
    with pytest.raises(ValueError):
        TextEmbedder(ngram_range=(4, 3))


def test_identical_answer_scores_max() -> None:
    r = reward([ANSWER], [ANSWER], [[ANSWER]])
    assert r.dtype == torch.float64 and torch.allclose(r, torch.tensor([10.0], dtype=r.dtype))
    # Case and spacing differences do not matter (shared normalised tokenisation).
    r2 = reward([ANSWER.upper().replace(" ", "  ")], [ANSWER], [[ANSWER]])
    assert torch.allclose(r2, r)


def test_unrelated_answer_scores_low_and_ranking() -> None:
    history = ["[Q] What did Tom find? [A] " + ANSWER]
    bad = "Quantum chromodynamics describes gluons binding quarks inside hadrons."
    partial = "Tom found a stone near the river."
    r = reward([ANSWER, partial, bad], [ANSWER] * 3, [history] * 3)
    assert r[2] < 1.5
    assert r[0] > r[1] > r[2]
    assert ((r >= 0) & (r <= 10)).all()


def test_bleu_term_matches_sentence_bleu_on_shared_tokens() -> None:
    gen = ["the cat sat on the mat .", "a dog !", "", "Lily likes red balls and blue kites"]
    ref = ["the cat is on the mat .", "a dog barked !", "nothing", "lily likes blue kites"]
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab) + 1) for t in word_tokenize(s)] for s in gen + ref]
    want = sentence_bleu(ids[: len(gen)], ids[len(gen) :], smoothing="floor")
    terms = reward_terms(gen, ref, [[]] * len(gen))
    assert torch.allclose(terms.bleu, want, atol=1e-12)
    only_bleu = reward(gen, ref, [["x"]] * len(gen), weights=(1, 0, 0))
    assert torch.allclose(only_bleu, 10 * want, atol=1e-9)
    # A custom tokenizer is honoured (here: characters).
    chars = reward_terms(gen[:1], ref[:1], [[]], tokenize=list).bleu
    c_ids = [[ord(c) for c in gen[0]]], [[ord(c) for c in ref[0]]]
    assert torch.allclose(chars, sentence_bleu(*c_ids, smoothing="floor"), atol=1e-12)


def test_empty_history_renormalises_weights() -> None:
    gen, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
    t = reward_terms(gen, ref, [[]])
    assert not t.has_history.item() and t.cos_history.item() == 0
    assert reward_terms(gen, ref, [["", "   "]]).has_history.item() is False
    expected = 10 * (t.bleu + t.cos_reference) / 2
    assert torch.allclose(reward(gen, ref, [[]]), expected)
    assert torch.allclose(
        reward([ANSWER], [ANSWER], [[]]), torch.tensor([10.0], dtype=torch.float64)
    )
    # Only the (undefined) memory term weighted -> 0; with history it is the cosine alone.
    assert reward(gen, ref, [[]], weights=(0, 0, 1)).item() == 0
    with_h = reward(gen, ref, [["the cat"]], weights=(0, 0, 2))
    assert torch.allclose(with_h, 10 * reward_terms(gen, ref, [["the cat"]]).cos_history)


def test_weights_and_input_validation() -> None:
    args = (["a"], ["a"], [["a"]])
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0), (float("nan"), 1, 1), (1, float("inf"), 1)]:
        with pytest.raises(ValueError):
            reward(*args, weights=bad)
    with pytest.raises(ValueError):
        reward(["a", "b"], ["a"], [["a"]])
    with pytest.raises(TypeError):
        reward(["a"], ["a"], ["a history given as a plain string"])
    assert reward([], [], []).shape == (0,)


def test_reward_summary() -> None:
    s = reward_summary(torch.tensor([2.0, 4.0, 3.0]))
    assert s == {"mean": 3.0, "max": 4.0, "min": 2.0}
    assert reward_summary([1.5]) == {"mean": 1.5, "max": 1.5, "min": 1.5}
    with pytest.raises(ValueError):
        reward_summary([])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(max_size=40), st.text(max_size=40), st.lists(st.text(max_size=30))),
        min_size=1,
        max_size=4,
    ),
    st.tuples(*[st.floats(0, 5)] * 3).filter(lambda w: sum(w) > 0),
)
def test_range_on_random_strings(rows, weights) -> None:
    gen, ref, hist = (list(x) for x in zip(*rows, strict=True))
    r = reward(gen, ref, hist, weights=weights)
    assert r.shape == (len(rows),)
    assert torch.isfinite(r).all() and ((r >= 0) & (r <= 10)).all()


def test_dialogue_rewards_score_follow_up_turns_against_gold_history():
    from rxt.data.dialogue import Dialogue, Turn
    from rxt.eval.reward import dialogue_rewards

    d = Dialogue(
        "a",
        (
            Turn("My cat is Tom.", "Noted."),
            Turn("Who is my cat?", "Tom"),
            Turn("And the dog?", "Rex"),
        ),
    )
    scores = dialogue_rewards([d], [["x", "Tom", "Rex"]])
    expected = reward(
        ["Tom", "Rex"],
        ["Tom", "Rex"],
        [["My cat is Tom.", "Noted."], ["My cat is Tom.", "Noted.", "Who is my cat?", "Tom"]],
    )
    assert torch.equal(scores, expected)  # turn 1 (no history) is not scored
    with pytest.raises(ValueError, match="2 replies for 3 turns"):
        dialogue_rewards([d], [["x", "y"]])
    with pytest.raises(ValueError, match="no follow-up turns"):
        dialogue_rewards([Dialogue("b", (Turn("q", "a"),))], [["a"]])
