"""What the wrong recall answers are (rxt.eval.errors), the one exact-match rule, and the
memory benchmark's data split."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmark_support import load_benchmark
from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.eval.errors import ERROR_CLASSES, edit_distance, first_difference, recall_errors
from rxt.eval.evaluate import summary_lines, system_entry
from rxt.eval.recall import evaluate_dialogues, exact_match
from rxt.tokenizer import RxTTokenizer

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


# A favourite colour is asked; the car's colour (the same pool) is also said.
COLOURS = Dialogue(
    id="colours",
    turns=(
        Turn("My favourite colour is red.", "Noted."),
        Turn("My car is blue.", "Got it."),
        Turn("What is my favourite colour?", "red"),
    ),
    probes=(
        Probe(turn=2, distance=2, fact_turn=0, kind="favourite_colour", answer="red", chance=0.05),
    ),
)


class Characters:
    """A stand-in tokenizer, one token per character, so token indices can be counted by hand."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


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
    index = first_difference(tokenizer.encode("Rx"), tokenizer.encode("Rex"))
    assert near["first_wrong_token"] == {str(index): 1}
    far = recall_errors([PETS], _replies("Bella"), tokenizer)
    assert far["within_edit_1"] == 0 and far["wrong_first_token"] == 1
    assert far["first_wrong_token"] == {"0": 1}


@pytest.mark.parametrize(
    ("a", "b", "index"),
    [([1, 2, 3], [1, 2, 4], 2), ([5], [6, 7], 0), ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1], 1),
     ([], [1], 0), ([1, 2], [1, 2], 2)],
)  # fmt: skip
def test_first_difference(a, b, index):
    assert first_difference(a, b) == first_difference(b, a) == index


def test_first_wrong_token_histogram_counted_by_hand():
    """Gold "Rex", one token per character: where each wrong reply first leaves the gold."""
    replies = {
        "Max": 0,  # wrong from the first token
        "": 0,  # nothing said: the first token is missing
        "Rax": 1,
        "Re": 2,  # stopped early: token 2 should have been "x"
        "Rexx": 3,  # ran on past the gold's end
        "Rex Rex": 3,
        " Rex ": None,  # right (stripped): not an error, not in the histogram
    }
    errors = recall_errors([PETS] * len(replies), [_replies(r)[0] for r in replies], Characters())
    assert errors["wrong"] == 6
    assert errors["first_wrong_token"] == {"0": 2, "1": 1, "2": 1, "3": 2}
    assert errors["wrong_first_token"] == 2 == errors["first_wrong_token"]["0"]


def test_errors_by_kind_counted_by_hand(tokenizer):
    dialogues = [PETS, PETS, PETS, COLOURS, COLOURS]
    answers = ["Rex", "Luna", "green", "blue", "red"]  # right, bound, other pool, bound, right
    replies = [["Noted.", "Noted.", a] for a in answers]
    errors = recall_errors(dialogues, replies, tokenizer)
    zero = dict.fromkeys(ERROR_CLASSES, 0)
    assert errors["by_kind"] == {
        "dog_name": {"probes": 3, "wrong": 2, **zero, "same_pool_in_dialogue": 1, "other_pool": 1},
        "favourite_colour": {"probes": 2, "wrong": 1, **zero, "same_pool_in_dialogue": 1},
    }
    assert list(errors["by_kind"]) == ["dog_name", "favourite_colour"]


def test_a_right_answer_is_no_error(tokenizer):
    errors = recall_errors([PETS], _replies(" Rex "), tokenizer)
    assert errors["probes"] == 1 and errors["wrong"] == 0
    assert errors["mean_edit_distance"] is None
    assert errors["first_wrong_token"] == {} and errors["wrong_first_token"] == 0
    assert errors["by_kind"] == {
        "dog_name": {"probes": 1, "wrong": 0, **dict.fromkeys(ERROR_CLASSES, 0)}
    }
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
    assert sum(errors["first_wrong_token"].values()) == errors["wrong"]
    by_kind = errors["by_kind"]
    assert {k: v["probes"] for k, v in by_kind.items()} == report.probes_by_kind
    for kind, counts in by_kind.items():
        assert counts["wrong"] == sum(counts[c] for c in ERROR_CLASSES)
        hits = report.recall_by_kind[kind] * counts["probes"]
        assert counts["wrong"] == counts["probes"] - round(hits)
    entry = system_entry(report, dialogues, 0.0, tokenizer)
    assert entry["errors"] == errors
    assert entry["recall_by_kind"] == report.recall_by_kind
    assert entry["probes_by_kind"] == report.probes_by_kind
    assert "errors" not in system_entry(report, dialogues, 0.0)  # no tokenizer, no breakdown


def test_summary_lines_are_short_and_tolerate_older_entries():
    entry = {
        "recall": 0.5,
        "perplexity": 1.25,
        "accuracy": 0.9,
        "reward": {"mean": 4.2},
        "recall_by_kind": {"dog_name": 0.75, "job": 0.25},
        "probes_by_kind": {"dog_name": 4, "job": 4},
        "errors": {"probes": 8, "wrong": 4, "same_pool_absent": 1, "same_pool_in_dialogue": 1,
                   "other_pool": 1, "not_a_value": 1, "wrong_first_token": 3},
    }  # fmt: skip
    first, kinds, wrong = summary_lines("rxt", entry)
    assert first == f"{'rxt':<24} recall 0.500  ppl 1.250  acc 0.900  reward 4.20"
    assert kinds == "  by kind: dog_name 0.75 (4), job 0.25 (4)"
    assert wrong == (
        "  wrong 4/8: same pool absent 1, in dialogue 1, other pool 1, malformed 1; "
        "wrong at first token 3"
    )
    # Eleven kinds wrap; an entry from an older `rxt eval` (no kinds, no errors) prints one line.
    many = {**entry, "recall_by_kind": {f"kind_{i}": 0.5 for i in range(11)}}
    assert all(len(line) <= 100 for line in summary_lines("rxt", many))
    old = {"recall": None, "perplexity": None, "accuracy": 0.5}
    assert summary_lines("rxt", old) == [f"{'rxt':<24} recall -  ppl inf  acc 0.500  reward -"]


def _memory_learning():
    return load_benchmark("memory_learning")


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


def test_memory_benchmark_denser_training_keeps_the_test_split():
    """``--train-facts 5 8`` draws other training dialogues (more asked facts each), disjoint from
    a test split that is exactly the default one."""
    module = _memory_learning()
    _, _, test = module.build_data(train=2000)
    dense, _, dense_test = module.build_data(train=2000, facts=(5, 8))
    assert dense_test == test
    assert not {d.turns for d in dense} & {d.turns for d in test}
    probes = sum(len(d.probes) for d in dense) / len(dense)
    assert probes > 1.4 * sum(len(d.probes) for d in test) / len(test)
