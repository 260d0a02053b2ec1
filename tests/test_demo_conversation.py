"""The demo's scripted conversation (rxt.demo.conversation) and the report's new sections."""

from __future__ import annotations

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data import probes
from rxt.demo import report, report_markdown
from rxt.demo.conversation import (
    SCRIPT,
    conversation_lines,
    play_script,
    recalled_every_fact,
)
from rxt.eval.recall import exact_match
from rxt.tokenizer import RxTTokenizer


def _kind_of(question: str) -> str:
    (kind,) = [k for k, spec in probes._KINDS.items() if question in spec.questions]
    return kind


def test_script_speaks_the_probe_generators_language():
    """Every line is one of the generator's own sentences, values drawn from its pools."""
    small_talk = {q for q, _ in probes.SMALL_TALK}
    questions = [line for line in SCRIPT if line.expected is not None]
    assert len(questions) >= 2
    statements = {
        template.format(v=q.expected)
        for q in questions
        for template in probes._KINDS[_kind_of(q.query)].statements
    }
    for q in questions:
        assert q.expected in probes.value_pool(_kind_of(q.query))
    assert len({q.expected for q in questions}) == len(questions)  # values are distinct
    stated = [line.query for line in SCRIPT if line.query in statements]
    assert len(stated) == len(questions)  # each asked fact is stated once ...
    first_question = SCRIPT.index(questions[0])
    assert all(SCRIPT.index(line) < first_question for line in SCRIPT if line.query in stated)
    between = [line.query for line in SCRIPT[:first_question] if line.query not in stated]
    assert between and set(between) <= small_talk  # ... small talk between, then the questions
    for line in SCRIPT:
        assert line.query in statements | small_talk | {q.query for q in questions}


@pytest.fixture(scope="module")
def model() -> ReactiveTransformer:
    texts = [x for d in probes.generate(40, seed=0) for t in d.turns for x in (t.query, t.answer)]
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset("tiny")).eval()
    model.tokenizer = RxTTokenizer.train(texts, vocab_size=512)
    return model


def test_play_script_is_deterministic_and_scored_by_exact_match(model):
    turns = play_script(model, max_new_tokens=6)
    assert turns == play_script(model, max_new_tokens=6)  # greedy from a seeded STM_0
    assert [t["query"] for t in turns] == [line.query for line in SCRIPT]
    for t, line in zip(turns, SCRIPT, strict=True):
        assert set(t) == {"query", "reply", "expected", "correct"}
        assert t["expected"] == line.expected
        if line.expected is None:
            assert t["correct"] is None
        else:
            assert t["correct"] is exact_match(t["reply"], line.expected)


ASKED = [
    {"query": "My dog is called Rex.", "reply": "Noted.", "expected": None, "correct": None},
    {"query": "What is my dog's name?", "reply": "Rex", "expected": "Rex", "correct": True},
    {"query": "What is my favourite colour?", "reply": "a\nb|c", "expected": "green",
     "correct": False},
]  # fmt: skip


def test_transcript_lines_and_the_recall_verdict():
    assert conversation_lines(ASKED) == [
        "user: My dog is called Rex.",
        "rxt:  Noted.",
        "user: What is my dog's name?",
        "rxt:  Rex  ✓",
        "user: What is my favourite colour?",
        "rxt:  a b|c  ✗ (expected green)",
    ]
    assert recalled_every_fact(ASKED) is False
    assert recalled_every_fact(ASKED[:2]) is True
    assert recalled_every_fact(ASKED[:1]) is None  # nothing asked


def _systems(**extra) -> dict:
    entry = {"recall_by_distance": {"1": 0.5}, "recall": 0.5, "chance": 0.05, **extra}
    return {name: dict(entry) for name in report_markdown.SYSTEMS}


def test_conversation_target():
    targets = report.check_targets(_systems(), {}, ASKED)
    (target,) = [t for t in targets if t["target"] == report.CONVERSATION_TARGET]
    assert target["measured"] == {"asked": 2, "recalled": 1} and target["met"] is False
    targets = report.check_targets(_systems(), {})  # no conversation played: no such target
    assert report.CONVERSATION_TARGET not in {t["target"] for t in targets}


def test_report_tables_tolerate_older_entries():
    old = _systems()  # an older `rxt eval`: no per-kind recall, no error breakdown
    assert report_markdown.kind_table(old) == [] and report_markdown.error_table(old) == []
    new = _systems(
        recall_by_kind={"dog_name": 0.5, "job": 1.0},
        probes_by_kind={"dog_name": 2, "job": 1},
        errors={"probes": 3, "wrong": 1, "same_pool_absent": 1, "same_pool_in_dialogue": 0,
                "other_pool": 0, "not_a_value": 0, "wrong_first_token": 1},
    )  # fmt: skip
    del new["rxt-memory-off"]["recall_by_kind"], new["stateless-current-turn"]["errors"]
    kinds = report_markdown.kind_table(new)
    assert "| system | dog_name | job |" in kinds
    assert "| rxt | 0.50 | 1.00 |" in kinds and "| rxt-memory-off | – | – |" in kinds
    errors = "\n".join(report_markdown.error_table(new))
    assert "| rxt | 1/3 | 1 | 0 | 0 | 0 | 1 |" in errors
    assert "stateless-current-turn" not in errors
    section = "\n".join(report_markdown.conversation_section(ASKED))
    assert "## A conversation" in section and "| 3 | What is my favourite colour? |" in section
    assert "a b\\|c" in section and "✗ (expected green)" in section
    assert report_markdown.conversation_section([]) == []
