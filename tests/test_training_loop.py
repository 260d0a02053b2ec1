"""The shared training loop: schedule, clipping, decay groups, logs, checkpoints and resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import build_model
from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import (
    CheckpointMismatch,
    TrainConfig,
    lr_factor,
    param_groups,
    train,
)
from rxt.training.stages.smat import SmatConfig, SmatStage

VOCAB = 464
SHORT = probes.ProbeConfig(max_turns=4, max_distance=3)


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(60, seed=0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train(texts, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def stage(tokenizer) -> SmatStage:
    return SmatStage(probes.generate(8, seed=1, config=SHORT), tokenizer, SmatConfig(batch_size=4))


def model(**overrides) -> ReactiveTransformer:
    return build_model(RxTConfig.preset("tiny", vocab_size=VOCAB, **overrides))


def log_lines(path, drop=("tokens_per_s",)):
    lines = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def test_lr_schedule_warmup_then_cosine_to_floor():
    config = TrainConfig(steps=12, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    values = [lr_factor(s, config) for s in range(13)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0  # cosine starts at the peak
    assert values[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert values[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    assert lr_factor(0, TrainConfig(steps=5)) == 1.0


def test_logged_lr_follows_the_schedule(stage, tmp_path):
    config = TrainConfig(steps=5, lr=1e-3, warmup_steps=2, log_every=1)
    train(model(), stage, config, tmp_path, progress=False)
    logged = [line["lr"] for line in log_lines(tmp_path)]
    assert logged == pytest.approx([1e-3 * lr_factor(s, config) for s in range(5)])


def test_param_groups_decay_matrices_only():
    m = model()
    decay, plain = param_groups(m, 0.1)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]).isdisjoint(ids(plain["params"]))
    assert ids(decay["params"]) | ids(plain["params"]) == ids(m.parameters())
    assert all(p.dim() >= 2 for p in decay["params"])
    assert id(m.embed.weight) in ids(plain["params"])  # embeddings: no decay
    assert id(m.lm_head.weight) in ids(decay["params"])
    gates = [p for n, p in m.named_parameters() if ".gate." in n or n.endswith("gate.weight")]
    assert gates and ids(gates) <= ids(plain["params"])
    assert all(p.dim() == 1 for p in plain["params"] if id(p) != id(m.embed.weight) and
               id(p) not in ids(gates))  # fmt: skip


def test_gradients_are_clipped_and_the_pre_clip_norm_is_logged(stage, tmp_path):
    m = model()
    config = TrainConfig(steps=2, grad_clip=0.05, log_every=1)
    train(m, stage, config, tmp_path, progress=False)
    logged = log_lines(tmp_path)[-1]["grad_norm"]
    left = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None])
    ).item()
    assert logged > 0.05
    assert left == pytest.approx(0.05, rel=1e-4)  # the last step's grads, after clipping


def test_log_jsonl_content(stage, tmp_path):
    result = train(model(), stage, TrainConfig(steps=7, log_every=3), tmp_path, progress=False)
    lines = log_lines(tmp_path, drop=())
    assert [line["step"] for line in lines] == [3, 6, 7]
    for line in lines:
        assert {"step", "lr", "loss", "grad_norm", "tokens_per_s", "ce", "tokens"} <= line.keys()
        assert line["tokens_per_s"] > 0 and line["tokens"] > 0 and math.isfinite(line["loss"])
    assert result == lines[-1]
    reloaded = ReactiveTransformer.from_pretrained(tmp_path / "model")
    assert (tmp_path / "checkpoint" / "trainer_state.json").is_file()
    assert reloaded.config == model().config


class Crash(Exception):
    pass


class CrashingStage:
    """Delegates to a stage but dies when asked for batch ``at`` (a killed run)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.name = inner, at, inner.name

    def trainable(self, model, step):
        return self.inner.trainable(model, step)

    def batch(self, index):
        if index == self.at:
            raise Crash
        return self.inner.batch(index)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)


def test_resume_is_bit_exact(stage, tmp_path):
    config = TrainConfig(steps=6, warmup_steps=2, log_every=1, checkpoint_every=3)
    straight = model(dropout=0.1)  # dropout: the RNG state must be restored too
    train(straight, stage, config, tmp_path / "a", progress=False)

    first = model(dropout=0.1)
    with pytest.raises(Crash):
        train(first, CrashingStage(stage, at=4), config, tmp_path / "b", progress=False)
    resumed = model(dropout=0.1)  # a fresh process: weights come from the checkpoint
    train(resumed, stage, config, tmp_path / "b", resume=True, progress=False)

    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(tmp_path / "a") == log_lines(tmp_path / "b")  # step 4 logged once


def test_stop_at_then_resume_equals_an_unbroken_run(stage, tmp_path):
    config = TrainConfig(steps=6, warmup_steps=2, log_every=2)
    straight = model(dropout=0.1)
    train(straight, stage, config, tmp_path / "a", progress=False, evaluator=WeightNorm())

    first = train(model(dropout=0.1), stage, config, tmp_path / "b", progress=False,
                  evaluator=WeightNorm(), stop_at=3)  # fmt: skip
    assert (tmp_path / "b" / "checkpoint").is_dir() and not (tmp_path / "b" / "model").exists()
    assert first["step"] == 2  # the last full log window; step 3 waits in the checkpoint
    resumed = model(dropout=0.1)  # another process: weights come from the checkpoint
    train(resumed, stage, config, tmp_path / "b", resume=True, progress=False,
          evaluator=WeightNorm())  # fmt: skip

    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(tmp_path / "a") == log_lines(tmp_path / "b")
    curves = [(tmp_path / d / "eval.jsonl").read_text() for d in ("a", "b")]
    assert curves[0] == curves[1]
    for bad in (0, 6, 2.5):
        with pytest.raises(ValueError, match=r"stop_at: must be an int in \[1, steps=6\)"):
            train(model(), stage, config, tmp_path / "c", progress=False, stop_at=bad)


def test_resume_may_extend_steps(stage, tmp_path):
    train(model(), stage, TrainConfig(steps=2, log_every=1), tmp_path, progress=False)
    result = train(model(), stage, TrainConfig(steps=3, log_every=1), tmp_path, resume=True,
                   progress=False)  # fmt: skip
    assert result["step"] == 3 and [x["step"] for x in log_lines(tmp_path)] == [1, 2, 3]


def test_resume_refuses_a_different_config(stage, tmp_path):
    train(model(), stage, TrainConfig(steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointMismatch, match=r"lr: 0\.003 -> 0\.001"):
        train(model(), stage, TrainConfig(steps=2, lr=1e-3), tmp_path, resume=True, progress=False)


def test_resume_refuses_missing_or_corrupt_checkpoints(stage, tmp_path):
    with pytest.raises(CheckpointMismatch, match="no checkpoint"):
        train(model(), stage, TrainConfig(steps=2), tmp_path, resume=True, progress=False)
    train(model(), stage, TrainConfig(steps=1), tmp_path, progress=False)
    (tmp_path / "checkpoint" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointMismatch, match="unreadable"):
        train(model(), stage, TrainConfig(steps=2), tmp_path, resume=True, progress=False)
    train(model(), stage, TrainConfig(steps=1), tmp_path, progress=False)
    optimizer = tmp_path / "checkpoint" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(CheckpointMismatch, match="unreadable"):
        train(model(), stage, TrainConfig(steps=2), tmp_path, resume=True, progress=False)


def test_staged_unfreezing_keeps_frozen_weights_and_optimizer_state(tokenizer, tmp_path):
    data = probes.generate(8, seed=1, config=SHORT)
    schedule = ((0, ("decoder", "lm_head", "embed")), (2, ("memory_attention",)))
    smat = SmatStage(data, tokenizer, SmatConfig(batch_size=4, unfreeze=schedule))
    m = model()
    initial = {k: v.clone() for k, v in m.state_dict().items()}
    seen = {}

    class Spy(CrashingStage):
        def batch(self, index):
            if index == 2:  # after two decoder-only steps, before memory attention trains
                seen.update({k: v.clone() for k, v in m.state_dict().items()})
            return self.inner.batch(index)

    train(m, Spy(smat, at=None), TrainConfig(steps=4), tmp_path, progress=False)
    assert all(p.requires_grad for p in m.parameters())  # freezing ends with training
    final = m.state_dict()
    for name in initial:
        part = name.split(".")[0]
        if part == "encoder" or part == "stm_init":
            assert torch.equal(final[name], initial[name]), name  # never trainable
        if part == "memory_attention":
            assert torch.equal(seen[name], initial[name]), name
            assert not torch.equal(final[name], initial[name]), name
        if part == "decoder" and name.endswith("weight"):
            assert not torch.equal(seen[name], initial[name]), name

    payload = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    position = {
        id(p): i for i, p in enumerate(p for g in param_groups(m, 0.0) for p in g["params"])
    }
    state = payload["optimizer"]["state"]
    steps = {
        part: {int(state[position[id(p)]]["step"]) for p in getattr(m, part).parameters()}
        for part in ("decoder", "memory_attention")
    }
    assert steps == {"decoder": {4}, "memory_attention": {2}}  # no reset at the switch
    assert not any(position[id(p)] in state for p in m.encoder.parameters())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1, "lr": 0.0}, "lr"),
        ({"steps": 1, "betas": (0.9, 1.0)}, "betas"),
        ({"steps": 1, "warmup_steps": -1}, "warmup_steps"),
        ({"steps": 1, "min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"steps": 1, "grad_clip": float("nan")}, "grad_clip"),
        ({"steps": 1, "log_every": 0}, "log_every"),
    ],
)
def test_train_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kwargs)


class WeightNorm:
    """An evaluator that also draws from the global RNG (which the loop must restore)."""

    every = 2

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, m):
        self.calls.append(m.training)
        torch.rand(5)
        return {"norm": float(sum(p.detach().norm() for p in m.parameters()))}


def test_evaluator_logs_a_curve_and_changes_no_step(stage, tmp_path):
    config = TrainConfig(steps=5, warmup_steps=2, log_every=1)
    plain = model(dropout=0.1)
    train(plain, stage, config, tmp_path / "plain", progress=False)
    watched, evaluator = model(dropout=0.1), WeightNorm()
    train(watched, stage, config, tmp_path / "eval", progress=False, evaluator=evaluator)
    a, b = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # RNG restored: the same dropout masks
    assert log_lines(tmp_path / "plain") == log_lines(tmp_path / "eval")
    curve = [json.loads(x) for x in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 2, 4, 5]  # the start, every 2 steps, the end
    assert evaluator.calls == [False] * 4 and len({c["norm"] for c in curve}) == 4
    assert not (tmp_path / "plain" / "eval.jsonl").exists()


def test_evaluator_curve_survives_a_resume(stage, tmp_path):
    config = TrainConfig(steps=6, log_every=1, checkpoint_every=3)
    with pytest.raises(Crash):
        train(model(), CrashingStage(stage, at=4), config, tmp_path, progress=False,
              evaluator=WeightNorm())  # fmt: skip
    train(model(), stage, config, tmp_path, resume=True, progress=False, evaluator=WeightNorm())
    curve = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 2, 4, 6]  # step 4 once: truncated past step 3
    with pytest.raises(ValueError, match=r"evaluator\.every"):
        bad = WeightNorm()
        bad.every = 0
        train(model(), stage, config, tmp_path / "x", progress=False, evaluator=bad)
