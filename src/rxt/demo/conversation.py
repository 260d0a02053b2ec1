"""The demo's last act: a scripted conversation with the trained RxT, played free running.

A fixed, hand-written script in the probe generator's own words (:mod:`rxt.data.probes`: its
fact statements, a small-talk line, its questions, values from its pools): two facts stated,
small talk, then both questions. It runs through the inference engine (:mod:`rxt.engine`) as a
user would chat, greedily (temperature 0) from a seeded STM_0, so it is deterministic. Unlike
``rxt eval`` there is no gold history: the memory encodes the model's own replies. Each question
is scored by ``rxt eval``'s rule, :func:`rxt.eval.recall.exact_match`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rxt.engine import Engine
from rxt.eval.recall import exact_match
from rxt.model.reactive_transformer import ReactiveTransformer

__all__ = [
    "SCRIPT",
    "Line",
    "conversation_lines",
    "one_line",
    "play_script",
    "recalled_every_fact",
]


@dataclass(frozen=True)
class Line:
    """One user turn; ``expected`` is the value a question must be answered with."""

    query: str
    expected: str | None = None


# Phrasings and values the generator itself uses (tests/test_demo_conversation.py checks it), so
# a model trained on probe dialogues has seen every sentence shape. Rex and green come from
# different pools: answering one for the other is a binding error, never a lucky guess.
SCRIPT: tuple[Line, ...] = (
    Line("My dog is called Rex."),
    Line("My favourite colour is green."),
    Line("How are you today?"),
    Line("What is my dog's name?", "Rex"),
    Line("What is my favourite colour?", "green"),
)


def play_script(
    model: ReactiveTransformer,
    script: Sequence[Line] = SCRIPT,
    *,
    seed: int = 0,
    max_new_tokens: int = 16,
) -> list[dict[str, Any]]:
    """Play ``script`` with ``model`` (its tokenizer attached) through the engine, greedily.

    Returns one dict per turn: ``query``, ``reply`` (the engine's text), ``expected`` and
    ``correct`` (exact match; both None for a turn that is not a question)."""
    turns = []
    with Engine(model) as engine:
        conv = engine.conversation(seed=seed)
        for line in script:
            reply = conv.ask(line.query, temperature=0, max_new_tokens=max_new_tokens).text
            correct = None if line.expected is None else exact_match(reply, line.expected)
            turns.append(
                {"query": line.query, "reply": reply, "expected": line.expected, "correct": correct}
            )
    return turns


def recalled_every_fact(turns: Sequence[dict[str, Any]]) -> bool | None:
    """Whether every question was answered exactly (None when the script asked none)."""
    asked = [t["correct"] for t in turns if t["expected"] is not None]
    return all(asked) if asked else None


def conversation_lines(turns: Sequence[dict[str, Any]]) -> list[str]:
    """The conversation for a terminal: ``user: ...`` / ``rxt: ...``, questions marked ✓ or ✗
    (with the expected value when wrong)."""
    lines = []
    for t in turns:
        mark = ""
        if t["expected"] is not None:
            mark = "  ✓" if t["correct"] else f"  ✗ (expected {t['expected']})"
        lines += [f"user: {t['query']}", f"rxt:  {one_line(t['reply'])}{mark}"]
    return lines


def one_line(text: str) -> str:
    """``text`` with every run of whitespace as one space: a reply of a barely trained model
    may hold newlines, which would break the transcript's one line per turn."""
    return " ".join(text.split()) or "(empty)"
