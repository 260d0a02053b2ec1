"""Stage 3 (self-supervised memory-attention pre-training): schedule, the slot-shaped read of ED,
the pseudo-target, batching against a per-dialogue loop, gradients and learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.data.dialogue import Dialogue
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.memory import (
    MemoryPretrainConfig,
    MemoryPretrainStage,
    interaction_read,
    pseudo_target,
    rms_norm,
)
from rxt.training.stages.smat import initial_stm

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

VOCAB = 464
SHORT = probes.ProbeConfig(max_turns=5, max_distance=3)
QUIET = {"jitter": 0.0, "input_noise": 0.0, "target_noise": 0.0}


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(60, seed=0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train(texts, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def dialogues() -> list[Dialogue]:
    found = probes.generate(32, seed=1, config=SHORT)
    assert len({len(d.turns) for d in found[:8]}) > 1
    return found


def model(**overrides) -> ReactiveTransformer:
    return build_model(RxTConfig.preset("tiny", vocab_size=VOCAB, **overrides))


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"w_first": 1.0}, "w_first"),
        ({"w_start": 0.0}, "w_start"),
        ({"w_step": -0.1}, "w_step"),
        ({"w_floor": 0.6}, "w_floor"),
        ({"jitter": 1.0}, "jitter"),
        ({"input_noise": math.nan}, "input_noise"),
        ({"target_noise": -1.0}, "target_noise"),
        ({"stm_seed": -1}, "stm_seed"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MemoryPretrainConfig.{field}"):
        MemoryPretrainConfig(**kwargs)


def test_weight_schedule():
    config = MemoryPretrainConfig()
    values = [config.weight_schedule(t) for t in range(1, 14)]
    expected = [0.9, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.05, 0.05]
    assert values == pytest.approx(expected)
    assert config.weight_schedule(100) == 0.05
    with pytest.raises(ValueError, match="1-based"):
        config.weight_schedule(0)


def test_batch_weights_are_jittered_around_the_schedule(tokenizer, dialogues):
    config = MemoryPretrainConfig(batch_size=8)
    stage = MemoryPretrainStage(dialogues, tokenizer, config, seed=2)
    batch = stage.batch(0)
    base = torch.tensor([stage.weight_schedule(t + 1) for t in range(len(batch.active))])
    offset = batch.weights - base[:, None]
    assert batch.weights.shape == (len(batch.active), 8)
    assert (offset.abs() <= 0.15 + 1e-6).all() and offset.abs().max() > 0.05
    assert (batch.weights >= 0.01).all() and (batch.weights <= 0.99).all()
    assert torch.equal(batch.weights, stage.batch(0).weights)
    assert not torch.equal(batch.weights, stage.batch(1).weights[: len(batch.active)])
    quiet = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8, **QUIET))
    b = quiet.batch(0)
    assert torch.equal(b.weights, base[: len(b.active), None].expand_as(b.weights).float())


def test_batches_are_deterministic_and_active_is_a_prefix(tokenizer, dialogues):
    config = MemoryPretrainConfig(batch_size=8)
    a = MemoryPretrainStage(dialogues, tokenizer, config, seed=4).batch(3)
    b = MemoryPretrainStage(dialogues, tokenizer, config, seed=4).batch(3)
    assert a.indices == b.indices and torch.equal(a.input_ids, b.input_ids)
    assert a.noise_seed == b.noise_seed
    lengths = [len(dialogues[i].turns) for i in a.indices]
    assert lengths == sorted(lengths, reverse=True)
    assert a.active == [sum(n > t for n in lengths) for t in range(lengths[0])]
    assert a.input_ids.shape[0] == sum(a.active)


# ---------------------------------------------------------------------------------- target
def test_interaction_read_shapes_padding_and_slot_permutation():
    g = torch.Generator().manual_seed(0)
    b, layers, s, t, d = 3, 2, 5, 11, 16  # T != S
    stm = torch.randn(b, layers, s, d, generator=g)
    ed = torch.randn(b, layers, t, d, generator=g) * 4
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0
    read = interaction_read(stm, ed, mask)
    assert read.shape == (b, layers, s, d)
    # Padding never contributes: changing padded states changes nothing.
    other = ed.clone()
    other[1, :, 7:] = 100.0
    torch.testing.assert_close(interaction_read(stm, other, mask), read)
    # Slots are a set: permuting them permutes the read the same way.
    perm = torch.randperm(s, generator=g)
    torch.testing.assert_close(interaction_read(stm[:, :, perm], ed, mask), read[:, :, perm])
    # A convex mix of the real positions: a read by a single position returns that position.
    single = torch.zeros(b, t, dtype=torch.long)
    single[:, 4] = 1
    one = interaction_read(stm, ed, single)
    torch.testing.assert_close(one, ed[:, :, 4:5].expand_as(one))
    # More slots than positions works too.
    assert interaction_read(torch.randn(1, layers, 40, d), ed[:1, :, :3]).shape == (1, 2, 40, d)


def test_pseudo_target_weighs_normalised_terms():
    g = torch.Generator().manual_seed(1)
    prev = torch.randn(2, 2, 4, 64, generator=g) * 0.02  # a random STM_0 is tiny ...
    read = torch.randn(2, 2, 4, 64, generator=g) * 30  # ... and encoder states are not
    w = torch.tensor([0.0, 1.0])
    target = pseudo_target(prev, read, w)
    torch.testing.assert_close(target[0], rms_norm(prev)[0])
    torch.testing.assert_close(target[1], rms_norm(read)[1])
    half = pseudo_target(prev, read, torch.tensor([0.5, 0.5]))
    cos_prev = F.cosine_similarity(half, prev, dim=-1)
    cos_read = F.cosine_similarity(half, read, dim=-1)
    # With equal weights neither term dominates despite the 1500x difference in scale (about
    # 1/sqrt(2) each for independent directions), where a raw blend would be all `read`.
    assert (cos_prev > 0.5).all() and (cos_read > 0.5).all()
    assert (F.cosine_similarity(0.5 * prev + 0.5 * read, read, dim=-1) > 0.999).all()


def naive_cos(m, tokenizer, dialogues, positions, weights):
    """Reference: one dialogue, one turn at a time, no padding; noise and jitter off."""
    total, count = torch.zeros(()), 0
    for row, (d, p) in enumerate(zip(dialogues, positions, strict=True)):
        stm = initial_stm(m, 0, [p])
        for t, turn in enumerate(d.turns):
            ids = torch.tensor([tokenizer.encode_interaction(turn.query, turn.answer).input_ids])
            with torch.no_grad():
                ed = m.encode(ids)
            new = m.memory_attention(stm, ed)
            target = pseudo_target(stm, interaction_read(stm, ed), weights[t, row : row + 1])
            cos = F.cosine_similarity(new, target, dim=-1)
            total, count = total + cos.sum(), count + cos.numel()
            stm = new.detach()
    return total / count


def test_batched_loss_equals_per_dialogue_loop(tokenizer, dialogues):
    m = model()
    stage = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8, **QUIET))
    batch = stage.batch(0)
    loss, metrics = stage.loss(m, batch)
    ordered = [dialogues[i] for i in batch.indices]
    reference = naive_cos(m, tokenizer, ordered, batch.positions, batch.weights)
    torch.testing.assert_close(-loss, reference, atol=1e-5, rtol=0)
    assert metrics["cos"] == pytest.approx(-loss.item())
    assert metrics["tokens"] == batch.attention_mask.sum().item()


def test_noise_is_seeded_and_applied(tokenizer, dialogues):
    m = model()
    stage = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8))
    batch = stage.batch(0)
    with torch.no_grad():
        a, b = stage.loss(m, batch)[0], stage.loss(m, batch)[0]
        quiet = MemoryPretrainConfig(batch_size=8, jitter=0.15, input_noise=0, target_noise=0)
        c = MemoryPretrainStage(dialogues, tokenizer, quiet).loss(m, batch)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------- gradients
def test_only_memory_attention_gets_gradients(tokenizer, dialogues):
    m = model()
    stage = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8))
    loss, _ = stage.loss(m, stage.batch(0))
    loss.backward()
    for name, p in m.named_parameters():
        if name.startswith("memory_attention."):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name  # the encoder (and everything else) is frozen
    assert any(p.grad.any() for p in m.memory_attention.parameters())


def test_trainable_and_learned_stm_0(tokenizer, dialogues):
    stage = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=4))
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    m = model()
    assert ids(stage.trainable(m, 0)) == ids(m.memory_attention.parameters())
    learned = model(memory={"stm_init": "learned"})
    expected = ids([*learned.memory_attention.parameters(), *learned.stm_init.parameters()])
    assert ids(stage.trainable(learned, 5)) == expected and len(list(learned.stm_init.parameters()))
    loss, _ = stage.loss(learned, stage.batch(0))
    loss.backward()
    assert learned.stm_init.stm.grad is not None and learned.stm_init.stm.grad.any()


# ---------------------------------------------------------------------------------- training
def test_cosine_rises_over_training(tokenizer, dialogues, tmp_path):
    m = model()
    stage = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8))
    probe = MemoryPretrainStage(dialogues, tokenizer, MemoryPretrainConfig(batch_size=8, **QUIET))
    batch = probe.batch(0)
    with torch.no_grad():
        before = probe.loss(m, batch)[1]["cos"]
    encoder = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    config = TrainConfig(steps=30, warmup_steps=3, log_every=10)
    result = train(m, stage, config, tmp_path, progress=False)
    with torch.no_grad():
        after = probe.loss(m, batch)[1]["cos"]
    assert after > before + 0.2 and after > 0.8, (before, after)
    assert result["cos"] > 0.8
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in encoder.items())
