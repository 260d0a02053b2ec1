"""Teacher-forced recall / perplexity evaluation (rxt.eval.recall) on a tiny untrained model."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.engine.greedy import greedy_answer, greedy_batch
from rxt.eval import recall
from rxt.eval.recall import RecallReport, donor, evaluate_dialogues
from rxt.tokenizer import RxTTokenizer

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

MODES = ("on", "off", "swapped")


def build_model(config: RxTConfig, seed: int = 0) -> ReactiveTransformer:
    torch.manual_seed(seed)  # as conftest.build_model, usable from a module-scoped fixture
    return ReactiveTransformer(config).eval()


@pytest.fixture(scope="module")
def dialogues() -> list[Dialogue]:
    """Six probe dialogues of different lengths, one with a system prompt."""
    found = probes.generate(6, seed=3, config=probes.ProbeConfig(max_turns=9, max_distance=8))
    found[2] = dataclasses.replace(found[2], system="Answer briefly.")
    assert len({len(d.turns) for d in found}) > 2
    return found


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(40, seed=0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train([*texts, "Answer briefly."], vocab_size=1024)


@pytest.fixture(scope="module")
def model() -> ReactiveTransformer:
    return build_model(RxTConfig.preset("tiny"))


def run(model, tokenizer, dialogues, **kwargs) -> RecallReport:
    kwargs.setdefault("max_new_tokens", 4)
    return evaluate_dialogues(model, tokenizer, dialogues, **kwargs)


# --------------------------------------------------------------------------- a reference loop
def stm0(model, seed: int, index: int) -> torch.Tensor:
    return model.initial_stm(1, generator=torch.Generator().manual_seed(seed + index))


def trajectories(model, tokenizer, dialogues, seed=0) -> list[list[torch.Tensor]]:
    """Every dialogue's gold memory states M_0 .. M_len, one dialogue at a time, unpadded."""
    out = []
    with torch.inference_mode():
        for j, d in enumerate(dialogues):
            stm = stm0(model, seed, j)
            if d.system is not None:
                stm = model.update_memory(stm, torch.tensor([tokenizer.encode_system(d.system)]))
            states = [stm]
            for turn in d.turns:
                ids = tokenizer.encode_interaction(turn.query, turn.answer).input_ids
                stm = model.update_memory(stm, torch.tensor([ids]))
                states.append(stm)
            out.append(states)
    return out


def expected_reads(
    model, tokenizer, dialogues, mode, seed=0
) -> list[tuple[int, int, torch.Tensor]]:
    """(dialogue, turn, STM read) for every turn, in order."""
    states = trajectories(model, tokenizer, dialogues, seed)
    lengths = [len(d.turns) for d in dialogues]
    reads = []
    for i, d in enumerate(dialogues):
        for t in range(len(d.turns)):
            if mode == "on":
                stm = states[i][t]
            elif mode == "off":
                stm = stm0(model, seed, i)
            else:
                j, s = donor(lengths, i, t)
                stm = states[j][s]
            reads.append((i, t, stm))
    return reads


def reference(model, tokenizer, dialogues, mode, max_new_tokens=4):
    """Straightforward per-turn loop with the library's own greedy_answer: perplexity, accuracy,
    recall and recall by kind."""
    nll, correct, tokens, hits, count = 0.0, 0, 0, 0, 0
    kind_hits: Counter = Counter()
    kind_count: Counter = Counter()
    with torch.inference_mode():
        for i, t, stm in expected_reads(model, tokenizer, dialogues, mode):
            turn = dialogues[i].turns[t]
            enc = tokenizer.encode_interaction(turn.query, turn.answer)
            ids = torch.tensor([enc.input_ids])
            logits = model.decode(ids, stm)[0, :-1].float()
            scored = torch.tensor(enc.loss_mask[1:]).bool()
            targets = ids[0, 1:]
            nll -= logits.log_softmax(-1)[scored].gather(-1, targets[scored, None]).sum().item()
            correct += int((logits.argmax(-1) == targets)[scored].sum())
            tokens += int(scored.sum())
            for p in dialogues[i].probes:
                if p.turn == t:
                    prompt = torch.tensor([tokenizer.encode_query(turn.query)])
                    out = greedy_answer(
                        model, prompt, stm, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id
                    )
                    hit = tokenizer.decode(out).strip() == p.answer
                    hits += hit
                    count += 1
                    kind_hits[p.kind] += hit
                    kind_count[p.kind] += 1
    by_kind = {k: kind_hits[k] / kind_count[k] for k in kind_count}
    return math.exp(nll / tokens), correct / tokens, hits / count, by_kind


def record_generations(monkeypatch) -> Counter:
    seen: Counter = Counter()

    def wrapped(model, prompts, stm, **kwargs):
        answers = greedy_batch(model, prompts, stm, **kwargs)  # the real one, never a wrapper
        seen.update((tuple(p), tuple(a)) for p, a in zip(prompts, answers, strict=True))
        return answers

    monkeypatch.setattr(recall, "greedy_batch", wrapped)
    return seen


# --------------------------------------------------------------------------- tests
def test_report_mechanics(model, tokenizer, dialogues):
    report = run(model, tokenizer, dialogues)
    all_probes = [p for d in dialogues for p in d.probes]
    distances = sorted({p.distance for p in all_probes})
    assert list(report.recall_by_distance) == distances
    assert list(report.probes_by_distance) == distances
    assert report.probes_by_distance == dict(Counter(p.distance for p in all_probes))
    kinds = Counter(p.kind for p in all_probes)
    assert list(report.probes_by_kind) == sorted(kinds) == list(report.recall_by_kind)
    assert report.probes_by_kind == dict(kinds)
    assert report.chance == pytest.approx(sum(p.chance for p in all_probes) / len(all_probes))
    assert all(0.0 <= v <= 1.0 for v in report.recall_by_distance.values())
    assert 0.0 <= report.recall <= 1.0 and 0.0 <= report.accuracy <= 1.0
    vocab = model.config.vocab_size
    assert math.isfinite(report.perplexity) and vocab / 4 < report.perplexity < 4 * vocab
    back = json.loads(json.dumps(report.to_dict()))
    assert back["probes_by_distance"] == {str(k): v for k, v in report.probes_by_distance.items()}
    assert set(back) == {f.name for f in dataclasses.fields(RecallReport)}


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_loop(model, tokenizer, dialogues, mode):
    ppl, acc, rec, by_kind = reference(model, tokenizer, dialogues, mode)
    report = run(model, tokenizer, dialogues, memory=mode, batch_size=4)
    assert report.perplexity == pytest.approx(ppl, rel=1e-4)
    assert report.accuracy == pytest.approx(acc)
    assert report.recall == pytest.approx(rec)
    assert report.recall_by_kind == pytest.approx(by_kind)


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_unbatched(model, tokenizer, dialogues, mode, monkeypatch):
    seen1 = record_generations(monkeypatch)
    one = run(model, tokenizer, dialogues, memory=mode, batch_size=1)
    seen4 = record_generations(monkeypatch)
    four = run(model, tokenizer, dialogues, memory=mode, batch_size=4)
    assert seen1 == seen4 and sum(seen1.values()) == sum(len(d.probes) for d in dialogues)
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert four.accuracy == pytest.approx(one.accuracy)
    assert four.recall_by_distance == one.recall_by_distance
    assert four.probes_by_distance == one.probes_by_distance
    assert four.recall_by_kind == one.recall_by_kind
    assert four.probes_by_kind == one.probes_by_kind


def record_updates(model, monkeypatch) -> list[list[int]]:
    """Every row update_memory receives, as its real (unpadded) token ids."""
    rows: list[list[int]] = []
    original = model.update_memory

    def wrapped(stm, ids, attention_mask=None):
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        rows.extend(r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True))
        return original(stm, ids, attention_mask)

    monkeypatch.setattr(model, "update_memory", wrapped)
    return rows


def gold_history(tokenizer, dialogues) -> list[list[int]]:
    """System prompt, then every turn but the last (the final state is never read)."""
    rows = []
    for d in dialogues:
        if d.system is not None:
            rows.append(tokenizer.encode_system(d.system))
        for turn in d.turns[:-1]:
            rows.append(tokenizer.encode_interaction(turn.query, turn.answer).input_ids)
    return rows


def test_memory_follows_gold_history(model, tokenizer, dialogues, monkeypatch):
    rows = record_updates(model, monkeypatch)
    run(model, tokenizer, dialogues, memory="on", batch_size=1)
    assert rows == gold_history(tokenizer, dialogues)
    rows.clear()
    run(model, tokenizer, dialogues, memory="on", batch_size=4)
    assert Counter(map(tuple, rows)) == Counter(map(tuple, gold_history(tokenizer, dialogues)))


def record_reads(model, monkeypatch) -> list[torch.Tensor]:
    """Every STM row the decoder reads (teacher forcing and generation both call memory_kv)."""
    reads: list[torch.Tensor] = []
    original = model.memory_kv

    def wrapped(memory, memory_mask=None):
        reads.extend(memory.clone())
        return original(memory, memory_mask)

    monkeypatch.setattr(model, "memory_kv", wrapped)
    return reads


def assert_reads(reads, expected, dialogues):
    """Batch size 1: per turn one teacher-forced read, plus one per probe turn."""
    it = iter(reads)
    for i, t, stm in expected:
        calls = 1 + any(p.turn == t for p in dialogues[i].probes)
        for _ in range(calls):
            got = next(it)
            assert torch.allclose(got, stm[0], atol=1e-5), (i, t)
    assert next(it, None) is None


@pytest.mark.parametrize("mode", MODES)
def test_each_turn_reads_the_mode_memory(model, tokenizer, dialogues, mode, monkeypatch):
    reads = record_reads(model, monkeypatch)
    run(model, tokenizer, dialogues, memory=mode, batch_size=1)
    assert_reads(reads, expected_reads(model, tokenizer, dialogues, mode), dialogues)


def test_off_never_carries_memory(model, tokenizer, dialogues, monkeypatch):
    updates = record_updates(model, monkeypatch)
    reads = record_reads(model, monkeypatch)
    run(model, tokenizer, dialogues, memory="off", batch_size=4, seed=5)
    assert updates == []  # not even the system prompt: memory off is a fresh STM_0
    fresh = torch.cat([stm0(model, 5, i) for i in range(len(dialogues))])
    assert reads and all((fresh == r).flatten(1).all(1).any() for r in reads)


def test_swapped_reads_another_dialogues_memory(model, tokenizer, dialogues, monkeypatch):
    states = trajectories(model, tokenizer, dialogues)
    reads = record_reads(model, monkeypatch)
    run(model, tokenizer, dialogues, memory="swapped", batch_size=1)
    lengths = [len(d.turns) for d in dialogues]
    it = iter(reads)
    for i, d in enumerate(dialogues):
        for t in range(len(d.turns)):
            got = next(it)
            j, s = donor(lengths, i, t)
            assert j != i
            assert torch.allclose(got, states[j][s][0], atol=1e-5)
            assert not torch.allclose(got, states[i][t][0], atol=1e-3)
            if any(p.turn == t for p in d.probes):
                assert torch.equal(next(it), got)  # generation reads the same memory


def test_donor_rule():
    lengths = [3, 1, 5, 2]
    assert donor(lengths, 0, 0) == (1, 0)
    assert donor(lengths, 0, 2) == (2, 2)  # dialogue 1 has only 1 turn
    assert donor(lengths, 3, 2) == (0, 2)  # wraps around
    assert donor(lengths, 2, 4) == (0, 3)  # nobody else has 4 turns: longest other, final state
    assert donor([2, 2, 2], 1, 1) == (2, 1)
    with pytest.raises(ValueError, match="at least 2"):
        donor([3], 0, 0)


def oracle(monkeypatch, tokenizer, answers: list[str]) -> list[str]:
    queue = list(answers)

    def fake(model, prompts, stm, *, max_new_tokens, eos_id):
        return [[*tokenizer.encode(queue.pop(0)), eos_id] for _ in prompts]

    monkeypatch.setattr(recall, "greedy_batch", fake)
    return queue


def test_exact_match_with_an_oracle(model, tokenizer, dialogues, monkeypatch):
    gold = [p.answer for d in dialogues for p in sorted(d.probes, key=lambda p: p.turn)]
    left = oracle(monkeypatch, tokenizer, [f" {a}\n" for a in gold])  # whitespace is stripped
    report = run(model, tokenizer, dialogues, batch_size=1)
    assert left == [] and report.recall == 1.0
    assert set(report.recall_by_distance.values()) == {1.0}

    for wrong in ([f"{a}!" for a in gold], [a.lower() + "x" for a in gold], ["nope"] * len(gold)):
        oracle(monkeypatch, tokenizer, wrong)
        report = run(model, tokenizer, dialogues, batch_size=4)
        assert report.recall == 0.0 and set(report.recall_by_distance.values()) == {0.0}


# Three kinds, two distances, four probes; answered by QUERY_REPLIES (keyed by query, so the
# answers do not depend on the order in which a batch size asks them).
KINDS = (
    Dialogue(
        "a",
        (
            Turn("My dog is called Rex.", "Noted."),
            Turn("My favourite colour is red.", "Got it."),
            Turn("What is my dog called?", "Rex"),
            Turn("What is my favourite colour?", "red"),
        ),
        probes=(
            Probe(2, 2, 0, "dog_name", "Rex", 1 / 30),
            Probe(3, 2, 1, "favourite_colour", "red", 1 / 20),
        ),
    ),
    Dialogue(
        "b",
        (
            Turn("I have a dog named Bella.", "Noted."),
            Turn("What is my dog's name?", "Bella"),
            Turn("My car is blue.", "Noted."),
            Turn("What colour is my car?", "blue"),
        ),
        probes=(
            Probe(1, 1, 0, "dog_name", "Bella", 1 / 30),
            Probe(3, 1, 2, "car_colour", "blue", 1 / 20),
        ),
    ),
)
QUERY_REPLIES = {
    "What is my dog called?": "Rex",  # right
    "What is my favourite colour?": "blue",  # wrong: the car's colour
    "What is my dog's name?": " Bella ",  # right (whitespace is stripped)
    "What colour is my car?": "blue",  # right
}
# By hand: dog_name 2/2, favourite_colour 0/1, car_colour 1/1; distance 1: 2/2, distance 2: 1/2.
HAND_COUNT = {
    "recall_by_kind": {"car_colour": 1.0, "dog_name": 1.0, "favourite_colour": 0.0},
    "probes_by_kind": {"car_colour": 1, "dog_name": 2, "favourite_colour": 1},
    "recall_by_distance": {1: 1.0, 2: 0.5},
    "probes_by_distance": {1: 2, 2: 2},
    "recall": 0.75,
}


def reply_for(tokenizer, prompt) -> list[int]:
    """QUERY_REPLIES' answer to the prompt ending in that query's ``[BOS][Q] query [A]``."""
    for query, reply in QUERY_REPLIES.items():
        ids = tokenizer.encode_query(query)
        if list(prompt[-len(ids) :]) == ids:
            return [*tokenizer.encode(reply), tokenizer.eos_id]
    raise AssertionError("a prompt the oracle does not know")


def by_query(monkeypatch, module, name, tokenizer) -> None:
    def fake(model, prompts, *args, **kwargs):
        return [reply_for(tokenizer, p) for p in prompts]

    monkeypatch.setattr(module, name, fake)


def hand_counted(report: RecallReport) -> dict:
    return {k: getattr(report, k) for k in HAND_COUNT}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_recall_by_kind_matches_a_hand_count(model, tokenizer, monkeypatch, batch_size):
    by_query(monkeypatch, recall, "greedy_batch", tokenizer)
    report = run(model, tokenizer, KINDS, batch_size=batch_size)
    assert hand_counted(report) == HAND_COUNT


def test_stateless_report_has_the_same_per_kind_fields(tokenizer, monkeypatch):
    """The baseline's report is built by the same tally: same fields, same hand count."""
    pytest.importorskip("transformers")
    import rxt.eval.stateless as stateless
    from rxt.baselines import build_baseline
    from rxt.baselines.llama import llama_config_for

    config = llama_config_for(RxTConfig.preset("tiny"), max_positions=256)
    baseline = build_baseline(config, seed=0).eval()
    by_query(monkeypatch, stateless, "greedy_replies", tokenizer)
    for mode in ("full", "current"):
        report = stateless.evaluate_stateless(baseline, tokenizer, KINDS, mode, batch_size=3)
        assert isinstance(report, RecallReport) and hand_counted(report) == HAND_COUNT


def test_probe_counted_once_per_probe_and_generated_once_per_turn(model, tokenizer, monkeypatch):
    turns = (Turn("My dog is called Rex.", "Noted."), Turn("What is my dog's name?", "Rex"))
    twice = (Probe(1, 1, 0, "dog_name", "Rex", 0.5), Probe(1, 1, 0, "dog_alias", "Rex", 0.25))
    d = Dialogue("x", turns, probes=twice)
    seen = record_generations(monkeypatch)
    report = run(model, tokenizer, [d])
    assert sum(seen.values()) == 1
    assert report.probes_by_distance == {1: 2} and report.chance == pytest.approx(0.375)
    assert report.probes_by_kind == {"dog_alias": 1, "dog_name": 1}


def test_no_probes_gives_nan_recall(model, tokenizer):
    d = Dialogue("x", (Turn("Hello there.", "Hi."),))
    report = run(model, tokenizer, [d])
    assert report.recall_by_distance == {} and math.isnan(report.recall)
    assert report.recall_by_kind == {} == report.probes_by_kind
    assert math.isnan(report.chance) and math.isfinite(report.perplexity)


def test_greedy_batch_matches_greedy_answer(model, tokenizer, dialogues):
    queries = [t.query for d in dialogues[:3] for t in d.turns[:2]]
    prompts = [tokenizer.encode_query(q) for q in queries]
    stm = torch.cat([stm0(model, 0, k) for k in range(len(prompts))])
    got = greedy_batch(model, prompts, stm, max_new_tokens=6, eos_id=tokenizer.eos_id)
    for k, prompt in enumerate(prompts):
        ref = greedy_answer(
            model, torch.tensor([prompt]), stm[k : k + 1], max_new_tokens=6, eos_id=tokenizer.eos_id
        )
        assert got[k] == ref


def test_greedy_batch_stops_at_eos(model, tokenizer):
    prompts = [tokenizer.encode_query("Hi."), tokenizer.encode_query("How are you today?")]
    stm = model.initial_stm(2, generator=torch.Generator().manual_seed(0))
    free = greedy_batch(model, prompts, stm, max_new_tokens=3, eos_id=tokenizer.eos_id)
    eos = free[0][0]  # pretend the first generated token is EOS: row 0 stops right there
    out = greedy_batch(model, prompts, stm, max_new_tokens=3, eos_id=eos)
    assert out[0] == [eos]
    assert len(out[1]) <= 3 and (eos not in out[1][:-1])


def test_restores_training_mode_and_runs_without_grad(tokenizer, dialogues):
    model = build_model(RxTConfig.preset("tiny")).train()
    report = run(model, tokenizer, dialogues[:2], memory="swapped")
    assert model.training and math.isfinite(report.perplexity)
    assert all(p.grad is None for p in model.parameters())


def test_rejects_bad_arguments(model, tokenizer, dialogues):
    with pytest.raises(ValueError, match="memory must be one of"):
        run(model, tokenizer, dialogues, memory="both")
    with pytest.raises(ValueError, match="batch_size"):
        run(model, tokenizer, dialogues, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(model, tokenizer, dialogues, max_new_tokens=0)
    with pytest.raises(ValueError, match="no dialogues"):
        run(model, tokenizer, [])
    with pytest.raises(ValueError, match="at least 2"):
        run(model, tokenizer, dialogues[:1], memory="swapped")
    long = Dialogue("long", (Turn("word " * 200, "ok"),))
    with pytest.raises(ValueError, match="'long' turn 0"):
        run(model, tokenizer, [long])
    with pytest.raises(ValueError, match="max_seq_len"):
        run(model, tokenizer, dialogues, max_new_tokens=model.config.max_seq_len)


def test_replies_are_the_greedy_answers_of_every_turn(model, tokenizer, dialogues):
    plain = run(model, tokenizer, dialogues[:4])
    with_replies = run(model, tokenizer, dialogues[:4], replies=True, batch_size=3)
    assert plain.replies is None
    assert with_replies.recall == plain.recall  # generating more rows changes no score
    assert with_replies.perplexity == pytest.approx(plain.perplexity)
    # Each reply is what greedy_answer gives from the STM that turn reads.
    stm = model.initial_stm(1, generator=torch.Generator().manual_seed(0))
    d = dialogues[0]
    for t, turn in enumerate(d.turns):
        prompt = torch.tensor([tokenizer.encode_query(turn.query)])
        ids = greedy_answer(model, prompt, stm, max_new_tokens=4, eos_id=tokenizer.eos_id)
        assert with_replies.replies[0][t] == tokenizer.decode(ids).strip()
        encoded = tokenizer.encode_interaction(turn.query, turn.answer)
        stm = model.update_memory(stm, torch.tensor([encoded.input_ids]))
    assert [len(r) for r in with_replies.replies] == [len(d.turns) for d in dialogues[:4]]
