"""Token sampling: validation, greedy/EOS rules, parity with Hugging Face's logits processors,
batch invariance, reproducibility and the sampled distribution. Every draw uses a seeded
``torch.Generator``, so the statistical checks are deterministic."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rxt.engine.sampling import (
    RowSampling,
    SamplingParams,
    make_generator,
    mark_seen,
    next_tokens,
    processed_logits,
)

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

EOS = 3


def step(logits, params, *, generated=None, seen=None, generators=None, eos_id=EOS):
    """``next_tokens`` for a list of ``SamplingParams`` (seeded rows get fresh generators)."""
    rows = RowSampling.from_params(params, logits.device)
    if generated is None:
        generated = torch.zeros(len(params), dtype=torch.long)
    if generators is None:
        generators = [make_generator(p, "cpu") for p in params]
    return next_tokens(
        logits, rows, generated=generated, seen=seen, generators=generators, eos_id=eos_id
    )


# --- validation --------------------------------------------------------------------------------

BAD_FIELDS = [
    ("max_new_tokens", 0),
    ("max_new_tokens", True),
    ("max_new_tokens", 2.0),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", True),
    ("temperature", "1"),
    ("top_k", -1),
    ("top_k", True),
    ("top_k", 1.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("min_new_tokens", -1),
    ("min_new_tokens", 65),
    ("min_new_tokens", False),
    ("stop_at_eos", 1),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", True),
    ("seed", 1.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_bad_field_is_named_in_the_error(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must be .*got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


def test_params_defaults_replace_and_to_dict():
    p = SamplingParams()
    assert p.greedy and p.stop_at_eos and p.seed is None
    q = p.replace(temperature=1, top_p=1)  # ints accepted, stored as floats
    assert not q.greedy and isinstance(q.temperature, float) and isinstance(q.top_p, float)
    assert SamplingParams(**q.to_dict()) == q
    with pytest.raises(ValueError, match=re.escape("top_p: must be in (0, 1], got 1.5")):
        p.replace(top_p=1.5)
    assert SamplingParams(max_new_tokens=4, min_new_tokens=4).min_new_tokens == 4


def test_row_sampling_flags_and_filters_off_on_greedy_rows():
    params = [SamplingParams(top_k=5, top_p=0.5), SamplingParams(temperature=1.0, top_k=7)]
    rows = RowSampling.from_params(params, "cpu")
    assert rows.top_k.tolist() == [0, 7] and rows.top_p.tolist() == [1.0, 1.0]
    assert rows.sampled == (False, True) and rows.any_sampling and rows.any_top_k
    assert not (rows.any_top_p or rows.any_penalty or rows.any_min_new_tokens)
    assert rows.top_k.dtype == torch.long and rows.temperature.dtype == torch.float32


# --- greedy, EOS suppression, repetition penalty ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_leaves_logits_untouched(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen).to(dtype)
    before = logits.clone()
    tokens = step(logits, [SamplingParams()] * 4)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert torch.equal(logits, before)


def test_min_new_tokens_suppresses_eos_until_reached():
    logits = torch.zeros(4, 8)
    logits[:, EOS] = 10.0
    logits[:, 5] = 1.0
    params = [
        SamplingParams(min_new_tokens=2),
        SamplingParams(min_new_tokens=2),
        SamplingParams(),
        SamplingParams(temperature=1.0, min_new_tokens=3, seed=0),
    ]
    generated = torch.tensor([1, 2, 0, 2])
    tokens = step(logits, params, generated=generated)
    assert tokens[:3].tolist() == [5, EOS, EOS] and tokens[3] != EOS
    # A sampling row never draws EOS before min_new_tokens, however likely it is.
    p = [SamplingParams(temperature=1.0, min_new_tokens=3)] * 256
    gens = [torch.Generator().manual_seed(0)] * 256
    zeros = torch.zeros(256, dtype=torch.long)
    drawn = step(logits[:1].expand(256, -1), p, generated=zeros, generators=gens)
    assert (drawn != EOS).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[4.0, 3.0, 0.5, -1.0, -2.0], [-3.0, -1.0, -1.5, -4.0, -5.0]])
    seen = torch.zeros(2, 5, dtype=torch.bool)
    mark_seen(seen, torch.tensor([[0, 0], [1, 1]]))
    params = [SamplingParams(repetition_penalty=2.0)] * 2
    # 4/2 = 2 < 3 → token 1; -1*2 = -2 < -1.5 → token 2 (dividing -1 would have raised it).
    assert step(logits, params, seen=seen, eos_id=4).tolist() == [1, 2]
    with pytest.raises(ValueError, match="seen"):
        step(logits, params, seen=None, eos_id=4)


def test_mark_seen_accepts_vectors_and_matrices():
    seen = torch.zeros(2, 6, dtype=torch.bool)
    mark_seen(seen, torch.tensor([1, 4]))
    mark_seen(seen, torch.tensor([[2, 2, 5], [0, 4, 4]]))
    assert seen.nonzero().tolist() == [[0, 1], [0, 2], [0, 5], [1, 0], [1, 4]]


# --- parity with Hugging Face --------------------------------------------------------------------

MIXED = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.6, repetition_penalty=1.3),
    SamplingParams(temperature=0.5, repetition_penalty=0.8, min_new_tokens=4),
    SamplingParams(repetition_penalty=1.5, top_k=3),  # greedy: filters do not apply
]


def hf_processed(lp, logits_row, seen_row, params, generated):
    """One row through HF's processors, in ``generate``'s order."""
    ids = seen_row.nonzero().T  # (1, n): the turn so far, as HF's input_ids
    procs = []
    if params.repetition_penalty != 1:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if generated < params.min_new_tokens:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(ids.shape[1], 1, EOS))
    if not params.greedy:
        procs.append(lp.TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(lp.TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            procs.append(lp.TopPLogitsWarper(params.top_p))
    scores = logits_row.unsqueeze(0).clone()
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0]


@pytest.mark.parametrize("trial", range(3))
def test_processed_logits_match_hugging_face(trial):
    lp = pytest.importorskip("transformers.generation.logits_process")
    gen = torch.Generator().manual_seed(100 + trial)
    batch, vocab = len(MIXED), 64
    logits = 3 * torch.randn(batch, vocab, generator=gen)
    logits[:, EOS] = logits.max() + 1  # EOS would win unless suppressed
    seen = torch.rand(batch, vocab, generator=gen) < 0.3
    generated = torch.randint(0, 8, (batch,), generator=gen)
    rows = RowSampling.from_params(MIXED, "cpu")
    ours = processed_logits(logits, rows, generated=generated, seen=seen, eos_id=EOS)
    for b, params in enumerate(MIXED):
        ref = hf_processed(lp, logits[b], seen[b], params, int(generated[b]))
        assert torch.equal(torch.isfinite(ours[b]), torch.isfinite(ref)), (trial, b)
        torch.testing.assert_close(ours[b].softmax(-1), ref.softmax(-1), rtol=1e-5, atol=1e-7)


# --- batch invariance, reproducibility -----------------------------------------------------------

INVARIANCE = [
    SamplingParams(),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.2, top_k=8, seed=2),
    SamplingParams(temperature=1.0, top_p=0.9, seed=3),
    SamplingParams(temperature=0.7, repetition_penalty=1.4, seed=4),
    SamplingParams(temperature=1.0, top_k=4, top_p=0.7, min_new_tokens=3, seed=2),
]


def run_steps(params, logits_per_step, prompts):
    """Decode len(logits_per_step) tokens for ``params``, tracking seen/generated as an engine.
    prompts: (B, T) ids seeding each row's repetition-penalty mask."""
    batch, vocab = logits_per_step[0].shape
    rows = RowSampling.from_params(params, "cpu")
    gens = [make_generator(p, "cpu") for p in params]
    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    mark_seen(seen, prompts)
    generated = torch.zeros(batch, dtype=torch.long)
    out = []
    for logits in logits_per_step:
        tok = next_tokens(logits, rows, generated=generated, seen=seen, generators=gens, eos_id=EOS)
        mark_seen(seen, tok)
        generated += 1
        out.append(tok)
    return torch.stack(out, dim=1)  # (B, steps)


def test_batch_equals_each_row_alone():
    gen = torch.Generator().manual_seed(7)
    steps = [2 * torch.randn(len(INVARIANCE), 40, generator=gen) for _ in range(12)]
    prompts = torch.randint(0, 40, (len(INVARIANCE), 6), generator=gen)
    batched = run_steps(INVARIANCE, steps, prompts)
    for b, params in enumerate(INVARIANCE):
        alone = run_steps([params], [s[b : b + 1] for s in steps], prompts[b : b + 1])
        assert torch.equal(batched[b], alone[0]), b
    # Reordering the batch changes nothing either.
    order = [5, 2, 0, 4, 1, 3]
    shuffled = run_steps([INVARIANCE[i] for i in order], [s[order] for s in steps], prompts[order])
    assert torch.equal(shuffled, batched[order])


def test_same_seed_same_sequence_different_seed_different_sequence():
    logits, prompt = [torch.zeros(1, 16) for _ in range(50)], torch.zeros(1, 1, dtype=torch.long)

    def draws(seed):
        return run_steps([SamplingParams(temperature=1.0, seed=seed)], logits, prompt)[0]

    seq = {s: draws(s) for s in (0, 1)}
    again = draws(0)
    assert torch.equal(seq[0], again)
    assert not torch.equal(seq[0], seq[1])


def test_unseeded_rows_use_the_global_rng():
    logits = torch.zeros(3, 16)
    params = [SamplingParams(temperature=1.0)] * 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = step(logits, params, generators=[None] * 3)
        torch.manual_seed(0)
        assert torch.equal(first, step(logits, params, generators=[None] * 3))
    with pytest.raises(ValueError, match="one generator per row"):
        step(logits, params, generators=[None])


# --- sampled distribution ------------------------------------------------------------------------

PROBS = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
DRAWS = 20_000


def frequencies(params, eos_id=99):
    """Token frequencies of DRAWS rows over log(PROBS), all drawn from one seeded generator."""
    logits = PROBS.log().expand(DRAWS, -1)
    gens = [torch.Generator().manual_seed(1234)] * DRAWS  # one stream shared by every row
    tokens = step(logits, [params] * DRAWS, generators=gens, eos_id=eos_id)
    return torch.bincount(tokens, minlength=len(PROBS)).float() / DRAWS


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=1.0), PROBS),
        (SamplingParams(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
        (SamplingParams(temperature=1.0, top_k=2), torch.tensor([0.4, 0.25, 0, 0, 0]) / 0.65),
        # Mass above token 2 is 0.65 < 0.7, above token 3 it is 0.85: keep {0, 1, 2}.
        (SamplingParams(temperature=1.0, top_p=0.7), torch.tensor([0.4, 0.25, 0.2, 0, 0]) / 0.85),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.5), torch.tensor([0.4, 0.25, 0, 0, 0])),
    ],
)
def test_sampled_frequencies_match_the_distribution(params, expected):
    expected = expected / expected.sum()
    freq = frequencies(params)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)


def test_no_host_reads_inside_next_tokens(monkeypatch):
    """Every tensor → Python conversion raises while a full-featured batch is sampled: on an
    accelerator each would be a device sync per decoding step."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(len(INVARIANCE), 40, generator=gen)
    rows = RowSampling.from_params(INVARIANCE, "cpu")
    seen = torch.rand(len(INVARIANCE), 40, generator=gen) < 0.2
    generated = torch.arange(len(INVARIANCE))
    gens = [make_generator(p, "cpu") for p in INVARIANCE]

    def host_read(*_args, **_kwargs):
        raise AssertionError("host read inside next_tokens")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    tokens = next_tokens(logits, rows, generated=generated, seen=seen, generators=gens, eos_id=EOS)
    monkeypatch.undo()
    assert tokens.shape == (len(INVARIANCE),)
