"""What the wrong recall answers are (rxt.eval.errors), the one exact-match rule, and the
memory benchmark's data split."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.eval.errors import ERROR_CLASSES, edit_distance, recall_errors
from rxt.eval.evaluate import system_entry
from rxt.eval.recall import evaluate_dialogues, exact_match
from rxt.tokenizer import RxTTokenizer

ROOT = Path(__file__).resolve().parents[1]

# The dog's name is asked; the cat's name (the same pool) is also said in the dialogue.
PETS = Dialogue(
    id="pets",
    turns=(
        Turn("My dog is called Rex.", "Noted."),
        Turn("My cat is called Luna.", "Noted."),
        Turn("What is my dog called?", "Rex"),
    ),
    probes=(Probe(turn=2, distance=2, fact_turn=0, kind="dog_name", answer="Rex", chance=1 / 30),),
)


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    texts = [x for d in probes.generate(40, seed=0) for t in d.turns for x in (t.query, t.answer)]
    return RxTTokenizer.train(texts, vocab_size=512)


def _replies(answer: str) -> list[list[str]]:
    return [["Noted.", "Noted.", answer]]


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("Rex", "Rex", 0), ("Rex", "Max", 2), ("243", "234", 2), ("", "abc", 3),
     ("kitten", "sitting", 3), ("Beth", "Ben", 2)],
)  # fmt: skip
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == edit_distance(b, a) == distance


def test_exact_match_strips_whitespace_only():
    assert exact_match(" Rex\n", "Rex") and exact_match("Rex", " Rex ")
    assert not exact_match("rex", "Rex") and not exact_match("Rex.", "Rex")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Max", "same_pool_absent"),  # a dog's name said nowhere in the dialogue
        ("Luna", "same_pool_in_dialogue"),  # the cat's name: bound to the wrong kind
        ("green", "other_pool"),  # a colour for a name
        ("Rex Rex", "not_a_value"),
        ("", "not_a_value"),
    ],
)
def test_each_wrong_answer_lands_in_exactly_one_class(tokenizer, answer, expected):
    errors = recall_errors([PETS], _replies(answer), tokenizer)
    assert errors["probes"] == errors["wrong"] == 1
    assert {c: errors[c] for c in ERROR_CLASSES} == {c: int(c == expected) for c in ERROR_CLASSES}
    assert errors["mean_edit_distance"] == edit_distance(answer, "Rex")
    pool = [v for v in probes.value_pool("dog_name") if v != "Rex"]
    expected_pool = sum(edit_distance(v, "Rex") for v in pool) / len(pool)
    assert errors["mean_edit_distance_same_pool"] == pytest.approx(expected_pool, abs=1e-3)


def test_first_token_and_near_misses(tokenizer):
    near = recall_errors([PETS], _replies("Rx"), tokenizer)
    assert near["within_edit_1"] == 1
    assert near["wrong_first_token"] == int(
        tokenizer.encode("Rx")[:1] != tokenizer.encode("Rex")[:1]
    )
    far = recall_errors([PETS], _replies("Bella"), tokenizer)
    assert far["within_edit_1"] == 0 and far["wrong_first_token"] == 1


def test_a_right_answer_is_no_error(tokenizer):
    errors = recall_errors([PETS], _replies(" Rex "), tokenizer)
    assert errors["probes"] == 1 and errors["wrong"] == 0
    assert errors["mean_edit_distance"] is None
    with pytest.raises(ValueError, match="replies: 2 dialogues, expected 1"):
        recall_errors([PETS], _replies("Rex") * 2, tokenizer)


def test_errors_count_exactly_the_probes_recall_missed(tokenizer):
    """On a real (untrained) model: the breakdown and the recall report agree probe for probe,
    and ``rxt eval``'s entry carries it."""
    dialogues = probes.generate(12, seed=5, config=probes.ProbeConfig(max_turns=5, max_distance=4))
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    report = evaluate_dialogues(model, tokenizer, dialogues, max_new_tokens=4, replies=True)
    errors = recall_errors(dialogues, report.replies, tokenizer)
    hits = sum(r * report.probes_by_distance[k] for k, r in report.recall_by_distance.items())
    assert errors["probes"] == sum(report.probes_by_distance.values())
    assert errors["wrong"] == errors["probes"] - round(hits)
    assert sum(errors[c] for c in ERROR_CLASSES) == errors["wrong"]
    entry = system_entry(report, dialogues, 0.0, tokenizer)
    assert entry["errors"] == errors
    assert "errors" not in system_entry(report, dialogues, 0.0)  # no tokenizer, no breakdown


def _memory_learning():
    spec = importlib.util.spec_from_file_location(
        "memory_learning", ROOT / "benchmarks" / "memory_learning.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_trains_on_no_test_dialogue():
    """benchmarks/memory_learning.py: no training dialogue, long or two-turn, is a test one —
    at the sizes the docs' figures were measured with."""
    train, short, test = _memory_learning().build_data()
    assert (len(train), len(test)) == (20000, 300)
    assert 19950 < len(short) < 20000  # the few repeats of test dialogues are gone

    def key(d: Dialogue) -> tuple[Turn, ...]:
        return d.turns

    test_keys = {key(d) for d in test}
    assert not any(key(d) in test_keys for d in itertools.chain(train, short))
    assert any(len(d.turns) == 2 for d in test)  # two-turn test dialogues exist to collide with
