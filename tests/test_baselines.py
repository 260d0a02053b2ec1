"""Stateless baselines (rxt.baselines): parameter matching, SMAT's data and token budget in both
modes, RxT's evaluation protocol, and training with the shared loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from rxt import RxTConfig
from rxt.baselines import (
    BASELINE_FILE,
    build_baseline,
    build_matched_baseline,
    full_sequence,
    llama_parameter_count,
    load_baseline,
    matched_llama_config,
    reply_prompts,
    rxt_parameter_count,
    scored_rows,
)
from rxt.baselines.llama import llama_config_for
from rxt.data import probes
from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.data.order import EpochOrder
from rxt.eval.recall import RecallReport
from rxt.eval.stateless import evaluate_stateless
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.smat import SmatConfig, SmatStage
from rxt.training.stages.stateless import StatelessStage

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

SHORT = probes.ProbeConfig(max_turns=5, max_distance=3)
CODES = ("red", "blue", "green", "gold", "pink", "grey", "teal", "navy")


def copy_dialogues(n: int, seed: int) -> list[Dialogue]:
    """A trivial recall task: a code is stated at turn 0 and asked for at turn 1."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        code = rng.choice(CODES)
        turns = (Turn(f"The code is {code}.", "Noted."), Turn("What is the code?", code))
        probe = Probe(turn=1, distance=1, fact_turn=0, kind="code", answer=code,
                      chance=1 / len(CODES))  # fmt: skip
        out.append(Dialogue(f"copy-{seed}-{i}", turns, probes=(probe,)))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(60, seed=0) for t in d.turns for x in (t.query, t.answer)]
    texts += [x for d in copy_dialogues(40, 0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train([*texts, "Answer briefly."], vocab_size=256 + 8 + 200)


@pytest.fixture(scope="module")
def dialogues() -> list[Dialogue]:
    """Eight short dialogues of mixed length, one with a system prompt."""
    found = probes.generate(8, seed=1, config=SHORT)
    found[3] = dataclasses.replace(found[3], system="Answer briefly.")
    assert len({len(d.turns) for d in found}) > 1
    return found


def tiny(tokenizer: RxTTokenizer) -> RxTConfig:
    return RxTConfig.preset("tiny", vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    """An untrained 2-layer Llama of the tiny RxT decoder's shape (random but varied replies)."""
    return build_baseline(llama_config_for(tiny(tokenizer), max_positions=256), seed=0).eval()


# ------------------------------------------------------------------ parameter matching
def count(config: LlamaConfig, **changes) -> int:
    return llama_parameter_count(LlamaConfig(**{**config.to_dict(), **changes}))


@pytest.mark.parametrize(
    ("preset", "layers", "width", "params"),
    [("tiny", 7, 132, 395_456), ("small", 14, 365, 4_843_360)],
)
def test_matched_config_rule_and_counts(preset, layers, width, params):
    config = RxTConfig.preset(preset)
    target = rxt_parameter_count(config)
    matched = matched_llama_config(config, target, max_positions=512)
    llama = matched.config
    assert (llama.num_hidden_layers, llama.intermediate_size, matched.parameters) == (
        layers, width, params,
    )  # fmt: skip
    assert matched.target == target and abs(matched.relative_error) < 0.002
    with torch.device("meta"):
        assert sum(p.numel() for p in LlamaForCausalLM(llama).parameters()) == params
    # The shape is the decoder's: only depth and (here, since depth alone is > 1% off) width.
    base = llama_config_for(config, max_positions=512)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "tie_word_embeddings", "max_position_embeddings"):  # fmt: skip
        assert getattr(llama, key) == getattr(base, key), key
    # Depth first: the decoder's FFN width with one layer more or fewer is further off.
    at = {n: count(base, num_hidden_layers=n) for n in (layers - 1, layers)}
    assert abs(at[layers] - target) < abs(at[layers - 1] - target)
    assert abs(at[layers] - target) > 0.01 * target
    # Width: the closest integer; one unit either way is further off.
    for other in (width - 1, width + 1):
        assert abs(count(llama, intermediate_size=other) - target) > abs(params - target)


def test_matched_config_keeps_the_ffn_width_when_depth_suffices():
    config = RxTConfig.preset("tiny")
    five = count(llama_config_for(config, max_positions=64), num_hidden_layers=5)
    matched = matched_llama_config(config, five + 100, max_positions=64)
    assert matched.config.num_hidden_layers == 5
    assert matched.config.intermediate_size == config.decoder.ffn_dim
    assert matched.parameters == five
    assert matched_llama_config(config, max_positions=64).target == rxt_parameter_count(config)
    with pytest.raises(ValueError, match="target_params"):
        matched_llama_config(config, 0, max_positions=64)


def test_build_matched_baseline(tokenizer, dialogues):
    config = tiny(tokenizer)
    torch.manual_seed(3)
    model = build_matched_baseline(config, tokenizer, dialogues, mode="full")
    matched = matched_llama_config(config, max_positions=1)
    assert sum(p.numel() for p in model.parameters()) == matched.parameters
    longest = max(len(full_sequence(tokenizer, d).input_ids) for d in dialogues)
    assert model.config.max_position_embeddings == longest
    assert (model.tokenizer, model.mode, model.training) == (tokenizer, "full", True)
    torch.manual_seed(3)  # seed=None: the weights come from the global RNG as seeded
    again = build_matched_baseline(config, tokenizer, dialogues)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(),
                                                 strict=True))  # fmt: skip


# ------------------------------------------------------------------ sequences and batches
def test_full_sequence_is_the_concatenation_of_interactions(tokenizer, dialogues):
    d = dialogues[3]
    assert d.system is not None and len(d.turns) >= 2
    seq = full_sequence(tokenizer, d)
    system = tokenizer.encode_system(d.system)
    parts = [tokenizer.encode_interaction(t.query, t.answer) for t in d.turns]
    assert seq.input_ids == system + [i for p in parts for i in p.input_ids]
    assert seq.loss_mask == [0] * len(system) + [m for p in parts for m in p.loss_mask]
    # The mask covers exactly every answer and its [EOS].
    scored = [i for i, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m]
    assert scored == [i for t in d.turns for i in [*tokenizer.encode(t.answer), tokenizer.eos_id]]
    assert seq.turns == tuple(range(len(d.turns)))
    assert scored_rows(tokenizer, d, "full") == [seq]


def test_full_sequence_keeps_the_most_recent_whole_turns(tokenizer, dialogues):
    d = max(dialogues, key=lambda x: len(x.turns))
    d = dataclasses.replace(d, system="Answer briefly.")
    whole = full_sequence(tokenizer, d)
    system = tokenizer.encode_system(d.system)
    parts = [tokenizer.encode_interaction(t.query, t.answer).input_ids for t in d.turns]
    limit = len(system) + sum(map(len, parts[-2:]))  # room for exactly the last two turns
    cut = full_sequence(tokenizer, d, max_len=limit + len(parts[-3]) - 1)
    assert cut.turns == (len(d.turns) - 2, len(d.turns) - 1)
    assert cut.input_ids == system + parts[-2] + parts[-1]
    masks = [tokenizer.encode_interaction(t.query, t.answer).loss_mask for t in d.turns[-2:]]
    assert cut.loss_mask == [0] * len(system) + masks[0] + masks[1]
    assert sum(cut.loss_mask) < sum(whole.loss_mask)  # the dropped turns' answers are not trained
    with pytest.raises(ValueError, match="turn"):
        full_sequence(tokenizer, d, max_len=len(system) + len(parts[-1]) - 1)


def test_scored_rows_with_a_context_limit_score_every_turn_once(tokenizer, dialogues):
    """Over-long dialogues in evaluation: every turn scored once, with the most recent history
    that fits (turns sharing a history start share a row)."""
    d = dataclasses.replace(max(dialogues, key=lambda x: len(x.turns)), system="Answer briefly.")
    system = tokenizer.encode_system(d.system)
    parts = [tokenizer.encode_interaction(t.query, t.answer) for t in d.turns]
    limit = len(system) + max(
        len(a.input_ids) + len(b.input_ids) for a, b in itertools.pairwise(parts)
    )
    rows = scored_rows(tokenizer, d, "full", max_len=limit)
    assert len(rows) > 1 and all(len(r.input_ids) <= limit for r in rows)
    scored_turns = []
    for row in rows:
        assert row.input_ids == system + [i for t in row.turns for i in parts[t].input_ids]
        offset = len(system)
        for t in row.turns:
            mask = row.loss_mask[offset : offset + len(parts[t].loss_mask)]
            if any(mask):
                assert mask == parts[t].loss_mask
                scored_turns.append(t)
                # The history is the longest suffix that fits: one more turn would not.
                first = row.turns[0]
                if first > 0:
                    need = len(system) + sum(
                        len(parts[k].input_ids) for k in range(first - 1, t + 1)
                    )
                    assert need > limit
            offset += len(parts[t].loss_mask)
    assert scored_turns == list(range(len(d.turns)))


def test_current_rows_are_single_interactions(tokenizer, dialogues):
    d = dialogues[3]
    rows = scored_rows(tokenizer, d, "current")
    for t, (turn, row) in enumerate(zip(d.turns, rows, strict=True)):
        enc = tokenizer.encode_interaction(turn.query, turn.answer)
        assert (row.input_ids, row.loss_mask, row.turns) == (enc.input_ids, enc.loss_mask, (t,))
    assert reply_prompts(tokenizer, d, "current") == [
        tokenizer.encode_query(t.query) for t in d.turns
    ]


def test_reply_prompts_read_the_gold_history(tokenizer, dialogues):
    d = dialogues[3]
    seq = full_sequence(tokenizer, d)
    prompts = reply_prompts(tokenizer, d, "full")
    system = tokenizer.encode_system(d.system)
    history = list(system)
    for t, turn in enumerate(d.turns):
        assert prompts[t] == history + tokenizer.encode_query(turn.query)
        history += tokenizer.encode_interaction(turn.query, turn.answer).input_ids
    assert history == seq.input_ids
    last = len(d.turns) - 1
    tight = reply_prompts(tokenizer, d, "full", [last], max_len=len(prompts[last]) - 1,
                          max_new_tokens=0)[0]  # fmt: skip
    assert len(tight) < len(prompts[last]) and tight[: len(system)] == system
    assert prompts[last][-(len(tight) - len(system)) :] == tight[len(system) :]


def test_epoch_order_is_smats(tokenizer, dialogues):
    smat = SmatStage(dialogues, tokenizer, SmatConfig(batch_size=3), seed=5)
    order = EpochOrder(len(dialogues), seed=5)
    for index in range(9):  # 27 positions: crosses three epoch boundaries mid-batch
        batch = smat.batch(index)
        members = order.batch(index, 3)
        assert sorted(zip(batch.positions, batch.indices, strict=True)) == members


@pytest.mark.parametrize("mode", ["full", "current"])
def test_stages_see_smats_dialogues_and_answer_tokens(tokenizer, dialogues, mode):
    smat = SmatStage(dialogues, tokenizer, SmatConfig(batch_size=3), seed=2)
    stage = StatelessStage(dialogues, tokenizer, mode, batch_size=3, seed=2)
    assert stage.name == f"stateless-{mode}"
    for index in range(6):
        ours, theirs = stage.batch(index), smat.batch(index)
        assert (ours.indices, ours.positions) == (theirs.indices, theirs.positions)
        assert ours.answer_tokens == theirs.answer_tokens  # the same supervised budget
        if mode == "current":  # exactly SMAT's decoder rows
            assert torch.equal(ours.input_ids, theirs.input_ids)
            assert torch.equal(ours.attention_mask, theirs.attention_mask)
            assert torch.equal(ours.loss_mask, theirs.loss_mask)
        else:
            for row, i in enumerate(ours.indices):
                seq = full_sequence(tokenizer, dialogues[i])
                n = len(seq.input_ids)
                assert ours.input_ids[row, :n].tolist() == seq.input_ids
                assert ours.attention_mask[row].sum() == n
                assert ours.loss_mask[row, :n].tolist() == seq.loss_mask
            # It reads the same interactions, plus the system prompts SMAT writes to memory.
            systems = [tokenizer.encode_system(dialogues[i].system) for i in ours.indices
                       if dialogues[i].system is not None]  # fmt: skip
            assert ours.tokens == theirs.tokens + sum(map(len, systems))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("mode", ["full", "current"])
def test_loss_is_the_mean_ce_of_the_answer_tokens(tokenizer, dialogues, model, mode, groups):
    """Padding (and length grouping) changes nothing: the batch loss equals the token-weighted
    mean of each row's CE computed alone, without padding."""
    stage = StatelessStage(dialogues, tokenizer, mode, batch_size=4, length_groups=groups)
    batch = stage.batch(1)
    with torch.no_grad():
        loss, metrics = stage.loss(model, batch)
        total, count = 0.0, 0
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[row].sum())
            ids = batch.input_ids[row : row + 1, :n]
            logits = model(input_ids=ids).logits[0, :-1]
            keep = batch.loss_mask[row, 1:n].bool()
            total += F.cross_entropy(logits[keep], ids[0, 1:][keep], reduction="sum").item()
            count += int(keep.sum())
    assert metrics["answer_tokens"] == count == batch.answer_tokens
    assert metrics["tokens"] == batch.tokens
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["ce"] == pytest.approx(loss.item())


# ------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("mode", ["full", "current"])
def test_perplexity_equals_a_hand_computed_value(tokenizer, dialogues, model, mode):
    d = dialogues[3]
    if mode == "full":
        seqs = [full_sequence(tokenizer, d)]
    else:
        seqs = [tokenizer.encode_interaction(t.query, t.answer) for t in d.turns]
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].double()
            keep = torch.tensor(s.loss_mask[1:]).bool()
            targets = ids[0, 1:]
            nll -= logits.log_softmax(-1)[keep].gather(-1, targets[keep, None]).sum().item()
            correct += int((logits.argmax(-1) == targets)[keep].sum())
            count += int(keep.sum())
    report = evaluate_stateless(model, tokenizer, [d], mode, max_new_tokens=4)
    assert report.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert report.accuracy == pytest.approx(correct / count)


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """One prompt, no cache, no padding: argmax of a full forward pass per token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


@pytest.mark.parametrize("mode", ["full", "current"])
def test_batched_evaluation_equals_batch_size_one(tokenizer, dialogues, model, mode):
    batched = evaluate_stateless(model, tokenizer, dialogues, mode, batch_size=5, max_new_tokens=6)
    single = evaluate_stateless(model, tokenizer, dialogues, mode, batch_size=1, max_new_tokens=6)
    assert isinstance(batched, RecallReport)
    assert batched.probes_by_distance == single.probes_by_distance
    assert batched.recall_by_distance == single.recall_by_distance
    assert batched.chance == single.chance
    assert batched.perplexity == pytest.approx(single.perplexity, rel=1e-5)
    assert batched.accuracy == pytest.approx(single.accuracy, abs=1e-9)
    assert sum(single.probes_by_distance.values()) == sum(len(d.probes) for d in dialogues)

    # Replies: batched (left-padded, cached) = one at a time = a no-cache reference loop.
    def replies_at(batch_size: int) -> list[list[str]]:
        report = evaluate_stateless(model, tokenizer, dialogues, mode, batch_size=batch_size,
                                    max_new_tokens=6, replies=True)  # fmt: skip
        return report.replies

    replies = replies_at(7)
    alone = replies_at(1)
    assert replies == alone
    assert [len(r) for r in replies] == [len(d.turns) for d in dialogues]
    d = dialogues[3]
    for t, prompt in enumerate(reply_prompts(tokenizer, d, mode)):
        ref = greedy_reference(model, prompt, 6, tokenizer.eos_id)
        assert replies[3][t] == tokenizer.decode(ref).strip()
    assert len({r for rs in replies for r in rs}) > 3  # varied replies: a real comparison
    assert model.training is False

    # replies=True: the same generations, returned in the report as RxT's evaluation does.
    with_replies = evaluate_stateless(model, tokenizer, dialogues, mode, batch_size=5,
                                      max_new_tokens=6, replies=True)  # fmt: skip
    assert with_replies.replies == replies and batched.replies is None
    assert dataclasses.replace(with_replies, replies=None) == batched


@pytest.fixture(scope="module")
def copy_model(tokenizer, tmp_path_factory) -> LlamaForCausalLM:
    """The decoder-shaped Llama trained 60 steps on the copy task, full mode, via the loop."""
    stage = StatelessStage(copy_dialogues(256, 1), tokenizer, "full", batch_size=16)
    model = build_baseline(llama_config_for(tiny(tokenizer), max_positions=64), seed=0)
    config = TrainConfig(steps=60, lr=3e-3, warmup_steps=10, log_every=20)
    result = train(model, stage, config, tmp_path_factory.mktemp("copy"), progress=False)
    assert result["ce"] < 0.1
    return model


def test_full_mode_learns_to_recall_and_current_mode_cannot(tokenizer, copy_model):
    test = copy_dialogues(48, 2)
    full = evaluate_stateless(copy_model, tokenizer, test, "full", max_new_tokens=4)
    assert full.chance == pytest.approx(1 / len(CODES))
    assert full.recall >= 0.9 and full.recall_by_distance == {1: full.recall}
    # The same model shown only the current turn has nothing to copy from.
    current = evaluate_stateless(copy_model, tokenizer, test, "current", max_new_tokens=4)
    assert current.recall <= 2 * current.chance
    assert current.perplexity > full.perplexity


# ------------------------------------------------------------------ the training loop
def log_lines(path):
    lines = [json.loads(x) for x in (path / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in lines]


class Crash(Exception):
    pass


class CrashingStage(StatelessStage):
    """The same stage, dying when asked for batch ``at`` (a run killed mid-training)."""

    at = -1

    def batch(self, index):
        if index == self.at:
            raise Crash
        return super().batch(index)


@pytest.mark.parametrize("mode", ["full", "current"])
def test_training_with_the_loop_resumes_exactly(tokenizer, dialogues, tmp_path, mode):
    stage = StatelessStage(dialogues, tokenizer, mode, batch_size=3)
    llama = llama_config_for(tiny(tokenizer), max_positions=stage.longest)
    config = TrainConfig(steps=5, warmup_steps=1, log_every=1, checkpoint_every=2)
    straight = build_baseline(llama, seed=1, tokenizer=tokenizer, mode=mode)
    result = train(straight, stage, config, tmp_path / "a", progress=False)
    assert {"ce", "tokens", "answer_tokens"} <= result.keys()
    assert result["answer_tokens"] > 0 and result["tokens"] > 0

    crashing = CrashingStage(dialogues, tokenizer, mode, batch_size=3)
    crashing.at = 3  # after the checkpoint of step 2, with step 3 logged
    with pytest.raises(Crash):
        train(build_baseline(llama, seed=1), crashing, config, tmp_path / "b", progress=False)
    resumed = build_baseline(llama, seed=7)  # other weights: they must come from the checkpoint
    train(resumed, stage, config, tmp_path / "b", resume=True, progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(tmp_path / "a") == log_lines(tmp_path / "b")
    # The saved model directory evaluates on its own: weights, tokenizer and mode.
    loaded, loaded_tokenizer = load_baseline(tmp_path / "a" / "model")
    assert (loaded.mode, loaded.training) == (mode, False)
    assert json.loads((tmp_path / "a" / "model" / BASELINE_FILE).read_text()) == {"mode": mode}
    assert loaded_tokenizer.backend.to_str() == tokenizer.backend.to_str()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in a.items())
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "b" / "model")  # a plain Llama too
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in b.items())


def test_loop_resumes_a_plain_llama(tokenizer, dialogues, tmp_path):
    """The loop's checkpoint (training/checkpoint.py) compares a transformers config by content,
    not by its load bookkeeping (``_name_or_path``, ``transformers_version``, ``dtype``), so a
    plain Llama resumes."""
    stage = StatelessStage(dialogues, tokenizer, "current", batch_size=3)

    def plain() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(llama_config_for(tiny(tokenizer), max_positions=64))

    train(plain(), stage, TrainConfig(steps=1), tmp_path, progress=False)
    last = train(plain(), stage, TrainConfig(steps=2), tmp_path, resume=True, progress=False)
    assert last["step"] == 2
