"""Stages 1–2 (joint LM pre-training, interaction SFT): data, masking, detached noisy memory,
determinism per batch index, learning and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_model, moe_sqa_overrides
from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.data.dialogue import Dialogue, Turn
from rxt.tokenizer import SPECIAL_TOKENS, RxTTokenizer, pad_sequences
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.joint import (
    IGNORE_INDEX,
    JointConfig,
    JointStage,
    interaction_sequences,
    mask_tokens,
    text_sequences,
)

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

VOCAB = 464
SHORT = probes.ProbeConfig(max_turns=5, max_distance=3)
NUM_SPECIAL = len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def dialogues() -> list[Dialogue]:
    return probes.generate(60, seed=0, config=SHORT)


@pytest.fixture(scope="module")
def texts(dialogues) -> list[str]:
    return [x for d in dialogues for t in d.turns for x in (t.query, t.answer)]


@pytest.fixture(scope="module")
def tokenizer(texts) -> RxTTokenizer:
    return RxTTokenizer.train(texts, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def text_stage_data(texts, tokenizer) -> list[list[int]]:
    return text_sequences(texts, tokenizer, max_len=24)


def model(**overrides) -> ReactiveTransformer:
    return build_model(RxTConfig.preset("tiny", vocab_size=VOCAB, **overrides))


def ids_of(params) -> set[int]:
    return {id(p) for p in params}


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"mask_rate": 1.5}, "mask_rate"),
        ({"mask_rate": -0.1}, "mask_rate"),
        ({"ar_weight": -1.0}, "ar_weight"),
        ({"mlm_weight": math.nan}, "mlm_weight"),
        ({"ar_weight": 0.0, "mlm_weight": 0.0}, "mlm_weight"),
        ({"noise_std": math.inf}, "noise_std"),
        ({"slot_dropout": 1.0}, "slot_dropout"),
        ({"answer_only": 1}, "answer_only"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"JointConfig.{field}"):
        JointConfig(**kwargs)


# ---------------------------------------------------------------------------------- data
def test_text_sequences_chunking(tokenizer):
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    long_text = "My dog is called Rex and my cat is called Luna. " * 4
    ids = tokenizer.encode(long_text)
    seqs = text_sequences([long_text, "", "Hello there."], tokenizer, max_len=10)
    *chunks, short = seqs
    assert short == [bos, *tokenizer.encode("Hello there."), eos]
    assert len(chunks) > 1
    assert all(c[0] == bos and 2 <= len(c) <= 10 for c in chunks)
    assert all(eos not in c for c in chunks[:-1]) and chunks[-1][-1] == eos
    assert [i for c in chunks for i in c[1:]] == [*ids, eos]  # nothing lost, nothing repeated

    # A text ending exactly at a chunk boundary: no [BOS][EOS] remainder.
    exact = "What is my dog's name?"
    n = len(tokenizer.encode(exact))
    (only,) = text_sequences([exact], tokenizer, max_len=n + 1)
    assert only == [bos, *tokenizer.encode(exact)]
    with pytest.raises(ValueError, match="max_len"):
        text_sequences(["x"], tokenizer, max_len=2)


def test_interaction_sequences_format_and_long_turns(tokenizer):
    d = Dialogue(
        id="a", turns=(Turn("Hi.", "Hello."), Turn("Tell me. " * 20, "Sure " * 20), Turn("x", "y"))
    )
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        seqs = interaction_sequences([d], tokenizer, max_len=40)
    assert len(seqs) == 2
    first = tokenizer.encode_interaction("Hi.", "Hello.")
    assert seqs[0] == (first.input_ids, first.loss_mask)
    ids, mask = seqs[0]
    assert ids[:2] == [tokenizer.bos_id, tokenizer.query_id] and ids[-1] == tokenizer.eos_id
    a = ids.index(tokenizer.answer_id)
    assert mask == [0] * (a + 1) + [1] * (len(ids) - a - 1)


def test_masking_statistics_and_protected_tokens(tokenizer, text_stage_data):
    seqs = text_stage_data * 3  # each copy draws its own masking
    ids, attn = pad_sequences(seqs, pad_id=tokenizer.pad_id)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(
        ids, attn, mask_rate=0.15, mask_id=tokenizer.mask_id, vocab_size=VOCAB, generator=g
    )
    chosen = labels != IGNORE_INDEX
    maskable = attn.bool() & (ids >= NUM_SPECIAL)
    # Never special tokens ([BOS], [EOS], ...) nor padding; those keep their ids.
    assert not (chosen & ~maskable).any()
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])
    # Exactly max(1, round(0.15 n)) per row.
    n = maskable.sum(dim=1)
    expected = torch.floor(n * 0.15 + 0.5).clamp(min=1).minimum(n)
    assert torch.equal(chosen.sum(dim=1), expected)
    # 80/10/10 within a few standard errors (about 1,000 chosen positions).
    total = chosen.sum().item()
    to_mask = (masked[chosen] == tokenizer.mask_id).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert total > 1000
    assert abs(to_mask - 0.8) < 0.05 and abs(kept - 0.1) < 0.04
    swapped = chosen & (masked != ids) & (masked != tokenizer.mask_id)
    assert abs(swapped.sum().item() / total - 0.1) < 0.04
    assert (masked[swapped] >= NUM_SPECIAL).all() and (masked < VOCAB).all()

    none, none_labels = mask_tokens(
        ids, attn, mask_rate=0.0, mask_id=6, vocab_size=VOCAB, generator=g
    )
    assert torch.equal(none, ids) and (none_labels == IGNORE_INDEX).all()


def test_batches_are_deterministic_per_index(tokenizer, text_stage_data):
    config = JointConfig(batch_size=8)
    stage = JointStage(text_stage_data, tokenizer, config, seed=3)
    again = JointStage(text_stage_data, tokenizer, config, seed=3)
    fields = ("input_ids", "masked_ids", "mlm_labels", "memory_mask", "target_mask")
    for index in (0, 7, 2):
        a, b = stage.batch(index), again.batch(index)
        assert a.indices == b.indices and a.noise_seed == b.noise_seed
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    b0, b1 = stage.batch(0), stage.batch(1)
    assert b0.indices != b1.indices and b0.noise_seed != b1.noise_seed
    # The same sequences at another index are masked differently.
    same = JointStage(text_stage_data[:8], tokenizer, config, seed=3)
    x, y = same.batch(0), same.batch(1)
    assert sorted(x.indices) == sorted(y.indices) == list(range(8))
    order = [y.indices.index(i) for i in x.indices]
    assert not torch.equal(x.mlm_labels, y.mlm_labels[order])
    # Every epoch is a permutation of the data.
    small = JointStage(text_stage_data[:5], tokenizer, JointConfig(batch_size=5))
    assert sorted(small.batch(0).indices) == sorted(small.batch(1).indices) == list(range(5))
    assert small.batch(0).indices != small.batch(1).indices


def test_slot_dropout_never_hides_a_whole_row(tokenizer, text_stage_data):
    stage = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=32, slot_dropout=0.1))
    batch = stage.batch(0)
    mem, attn = batch.memory_mask.bool(), batch.attention_mask.bool()
    assert not (mem & ~attn).any()  # padding is never visible
    hidden = (attn & ~mem).sum().item() / attn.sum().item()
    assert 0.04 < hidden < 0.2

    harsh = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=32, slot_dropout=0.99))
    mem = harsh.batch(0).memory_mask
    assert (mem.sum(dim=1) >= 1).all() and not (mem.bool() & ~attn).any()
    off = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=32, slot_dropout=0.0))
    assert torch.equal(off.batch(0).memory_mask, off.batch(0).attention_mask)


def test_answer_only_targets(tokenizer, dialogues):
    seqs = interaction_sequences(dialogues[:4], tokenizer, max_len=128)
    sft = JointStage(seqs, tokenizer, JointConfig(batch_size=4, answer_only=True), name="sft")
    batch = sft.batch(0)
    expected, _ = pad_sequences([seqs[i][1] for i in batch.indices])
    assert torch.equal(batch.target_mask, expected)
    every = JointStage(seqs, tokenizer, JointConfig(batch_size=4), name="sft").batch(0)
    assert torch.equal(every.target_mask, every.attention_mask)
    assert batch.ar_tokens < every.ar_tokens


# ---------------------------------------------------------------------------------- loss
def _grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in m.named_parameters()}


def test_decoder_memory_is_detached(tokenizer, text_stage_data):
    m = model()
    batch_of = lambda cfg: JointStage(text_stage_data, tokenizer, cfg).batch(0)  # noqa: E731
    ar_only = JointConfig(batch_size=8, mlm_weight=0.0)
    stage = JointStage(text_stage_data, tokenizer, ar_only)
    loss, metrics = stage.loss(m, batch_of(ar_only))
    assert metrics["mlm"] > 0  # still measured
    grads = _grads(m, loss)
    encoder = [g for n, g in grads.items() if n.startswith("encoder.")]
    assert encoder and all(g is None or not g.any() for g in encoder)
    assert grads["mlm_head.proj.weight"] is None or not grads["mlm_head.proj.weight"].any()
    decoder = [g for n, g in grads.items() if n.startswith("decoder.")]
    assert all(g is not None for g in decoder) and any(g.any() for g in decoder)
    # The cross-attention really reads ED: its key/value projections learn.
    assert any(g.any() for n, g in grads.items() if "cross_attn" in n and g is not None)

    both = JointConfig(batch_size=8)
    loss, _ = JointStage(text_stage_data, tokenizer, both).loss(m, batch_of(both))
    grads = _grads(m, loss)
    assert all(grads[n] is not None for n in grads if n.startswith("encoder."))
    assert any(grads[n].any() for n in grads if n.startswith("encoder."))
    assert all(g is None for n, g in grads.items() if n.startswith("memory_attention."))


def test_noise_and_slot_dropout_change_the_loss(tokenizer, text_stage_data):
    m = model()

    def ar(**kwargs):
        stage = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=8, **kwargs))
        batch = stage.batch(0)
        with torch.no_grad():
            first = stage.loss(m, batch)[1]["ar"]
            assert stage.loss(m, batch)[1]["ar"] == first  # noise is seeded per batch
        return first

    clean = ar(noise_std=0.0, slot_dropout=0.0)
    assert ar(noise_std=0.2, slot_dropout=0.0) != clean
    assert ar(noise_std=0.0, slot_dropout=0.3) != clean
    assert ar(noise_std=0.0, slot_dropout=0.0) == clean


def test_moe_aux_loss_is_added(tokenizer, text_stage_data):
    m = build_model(RxTConfig.preset("paper-nano", **{**moe_sqa_overrides(), "vocab_size": VOCAB}))
    stage = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=4, mlm_weight=0.5))
    loss, metrics = stage.loss(m, stage.batch(0))
    assert metrics["aux"] > 0
    expected = metrics["ar"] + 0.5 * metrics["mlm"] + metrics["aux"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_model_without_mlm_head(tokenizer, text_stage_data):
    m = model(mlm_head=False)
    ar_only = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=4, mlm_weight=0.0))
    loss, metrics = ar_only.loss(m, ar_only.batch(0))
    assert loss.item() == pytest.approx(metrics["ar"]) and metrics["mlm"] == 0
    with pytest.raises(RuntimeError, match="mlm_head"):
        JointStage(text_stage_data, tokenizer, JointConfig(batch_size=4)).loss(m, ar_only.batch(0))


def test_trainable_modules(tokenizer, text_stage_data):
    stage = JointStage(text_stage_data, tokenizer)
    for tied in (False, True):
        m = model(tie_embeddings=tied)
        chosen = stage.trainable(m, 0)
        expected = ids_of(
            [
                *m.encoder.parameters(),
                *m.decoder.parameters(),
                *m.embed.parameters(),
                *m.lm_head.parameters(),
                *m.mlm_head.parameters(),
            ]
        )
        assert ids_of(chosen) == expected and len(chosen) == len(expected)
        assert ids_of(m.memory_attention.parameters()).isdisjoint(expected)


def test_constructor_checks(tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        JointStage([], tokenizer)
    with pytest.raises(ValueError, match=r"sequences\[1\].*at least 2"):
        JointStage([[1, 9, 2], [1]], tokenizer)
    with pytest.raises(ValueError, match=r"sequences\[0\].*ids"):
        JointStage([[1, VOCAB, 2]], tokenizer)
    with pytest.raises(ValueError, match="loss_mask"):
        JointStage([([1, 9, 2], [0, 1])], tokenizer)
    with pytest.raises(TypeError, match="JointConfig"):
        JointStage([[1, 9, 2]], tokenizer, config={"batch_size": 2})


# ---------------------------------------------------------------------------------- training
def _trained(stage, tmp_path, steps=30):
    m = model()
    probe = stage.batch(0)
    with torch.no_grad():
        before = stage.loss(m, probe)[1]
    train(
        m, stage, TrainConfig(steps=steps, warmup_steps=3, log_every=10), tmp_path, progress=False
    )
    with torch.no_grad():
        after = stage.loss(m, probe)[1]
    return before, after


def test_stage_1_loss_decreases(tokenizer, text_stage_data, tmp_path):
    stage = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=16))
    before, after = _trained(stage, tmp_path)
    assert after["ar"] < 0.8 * before["ar"], (before, after)
    assert after["mlm"] < 0.9 * before["mlm"], (before, after)


def test_stage_2_loss_decreases(tokenizer, dialogues, tmp_path):
    seqs = interaction_sequences(dialogues, tokenizer, max_len=128)
    config = JointConfig(batch_size=16, answer_only=True)
    stage = JointStage(seqs, tokenizer, config, name="sft")
    before, after = _trained(stage, tmp_path)
    assert after["ar"] < 0.7 * before["ar"], (before, after)
    assert after["mlm"] < before["mlm"], (before, after)


class _Crash(Exception):
    pass


class _CrashingStage:
    """Delegates to a stage but dies when asked for batch ``at`` (a killed run)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.name = inner, at, inner.name

    def trainable(self, model, step):
        return self.inner.trainable(model, step)

    def batch(self, index):
        if index == self.at:
            raise _Crash
        return self.inner.batch(index)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)


def test_resume_is_exact(tokenizer, text_stage_data, tmp_path):
    stage = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=8), seed=1)
    config = TrainConfig(steps=6, warmup_steps=2, log_every=1, checkpoint_every=3)
    straight = model()
    train(straight, stage, config, tmp_path / "a", progress=False)
    with pytest.raises(_Crash):  # dies after the step-3 checkpoint
        train(model(), _CrashingStage(stage, at=3), config, tmp_path / "b", progress=False)
    fresh = JointStage(text_stage_data, tokenizer, JointConfig(batch_size=8), seed=1)
    resumed = model()
    train(resumed, fresh, config, tmp_path / "b", resume=True, progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
