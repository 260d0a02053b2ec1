"""BABILong-style dialogues: bAbI qa1/qa2 supporting facts hidden in real conversation.

BABILong (Kuratov et al., 2024, arXiv:2406.10149) hides the facts of a bAbI task (Weston et al.,
2015) in long natural text and asks the bAbI question at the end. Here the "long text" is a
conversation: real dialogue turns (the Chit Chat corpus, :mod:`rxt.data.chitchat`, passed in as
``background``), with each fact appended to the user's message of one turn ("hey how are you?
Mary went to the kitchen."), and a last turn that asks the question ("Where is Mary?",
answered "kitchen"). Written from the papers' descriptions; no bAbI file is read.

* **qa1, single supporting fact**: people move between places ("Mary went to the kitchen.");
  the question asks where one of them is: the place of their last move.
* **qa2, two supporting facts**: people also pick up and drop objects ("John picked up the
  football."); the question asks where an object is: where its holder is now, or where it was
  dropped — two facts (the pick-up or drop, and the holder's move) are needed.

The question is one :class:`~rxt.data.dialogue.Probe` on the last turn: ``fact_turn`` is the
*earliest* supporting fact's turn (the one memory must keep longest), ``distance = turn -
fact_turn``, ``kind`` the task, ``chance`` one over the number of places. ``meta["supporting"]``
lists every supporting fact's turn. The other facts are distractors of the same form, as in
bAbI.

Splits stay disjoint when their ``background`` dialogues are (split the corpus by conversation,
:func:`rxt.data.chitchat.split_chitchat`); each split also has its own random stream.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.data.limits import truncate
from rxt.validated import Validated

__all__ = ["PEOPLE", "PLACES", "BabiConfig", "babi_texts", "generate_babi"]

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
_MOVES = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
_GETS = ("picked up", "got", "grabbed", "took")
_DROPS = ("dropped", "discarded", "put down", "left")
GENERATOR_META = {"generator": "rxt.babi", "version": 1}


@dataclass(frozen=True)
class BabiConfig(Validated):
    """``chat_turns``: real dialogue turns before the question; ``facts``: facts spread over
    them (supporting and distractors, at most one per turn); ``max_chars``: each message of the
    background clipped at a word boundary (:func:`rxt.data.limits.truncate`)."""

    task: Literal["qa1", "qa2"] = "qa1"
    chat_turns: tuple[int, int] = (4, 8)
    facts: tuple[int, int] = (2, 4)
    max_chars: int = 80

    def validate(self) -> None:
        low, high = self.chat_turns
        self.require("chat_turns", 1 <= low <= high, "need 1 <= low <= high")
        f_low, f_high = self.facts
        need = 2 if self.task == "qa2" else 1
        self.require("facts", need <= f_low <= f_high, f"need {need} <= low <= high")
        self.require("facts", f_high <= low, "high must be <= chat_turns low (one fact a turn)")
        self.require("max_chars", self.max_chars >= 1, "must be >= 1")


def babi_texts() -> list[str]:
    """Sentences of every form the generator writes (for training a tokenizer)."""
    out = [f"{p} {m} the {place}." for p in PEOPLE for m in _MOVES for place in PLACES]
    out += [f"{p} {g} the {o}." for p in PEOPLE for g in _GETS + _DROPS for o in OBJECTS]
    out += [f"Where is {p}?" for p in PEOPLE] + [f"Where is the {o}?" for o in OBJECTS]
    return out + list(PLACES)


def _rng(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"babi/{seed}/{split}".encode()).digest()[:8]
    return random.Random(int.from_bytes(digest, "big"))


def _qa1(rng: random.Random, n: int) -> tuple[list[str], str, str, list[int]]:
    """``n`` move facts; (facts, question, answer, supporting fact indices)."""
    facts, last = [], {}
    for i in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        facts.append(f"{person} {rng.choice(_MOVES)} the {place}.")
        last[person] = (i, place)
    person = rng.choice(sorted(last))
    i, place = last[person]
    return facts, f"Where is {person}?", place, [i]


def _qa2(rng: random.Random, n: int) -> tuple[list[str], str, str, list[int]] | None:
    """``n`` events (moves, pick-ups, drops) simulated; None when no object can be asked."""
    where: dict[str, tuple[int, str]] = {}  # person -> (fact index of last move, place)
    holder: dict[str, tuple[str, int]] = {}  # object -> (person, fact index of the pick-up)
    dropped: dict[str, tuple[str, list[int]]] = {}  # object -> (place, supporting facts)
    facts = []
    for i in range(n):
        holding = {p for p, _ in holder.values()}
        free = [o for o in OBJECTS if o not in holder]
        options = ["move"]
        if free and any(p in where for p in PEOPLE):
            options.append("get")
        if holder:
            options.append("drop")
        kind = rng.choice(options)
        if kind == "move":
            person, place = rng.choice(PEOPLE), rng.choice(PLACES)
            facts.append(f"{person} {rng.choice(_MOVES)} the {place}.")
            where[person] = (i, place)
        elif kind == "get":
            person = rng.choice([p for p in PEOPLE if p in where and p not in holding] or [None])
            if person is None:
                person, place = rng.choice(PEOPLE), rng.choice(PLACES)
                facts.append(f"{person} {rng.choice(_MOVES)} the {place}.")
                where[person] = (i, place)
                continue
            thing = rng.choice(free)
            facts.append(f"{person} {rng.choice(_GETS)} the {thing}.")
            holder[thing] = (person, i)
            dropped.pop(thing, None)
        else:
            thing = rng.choice(sorted(holder))
            person, got = holder.pop(thing)
            facts.append(f"{person} {rng.choice(_DROPS)} the {thing}.")
            move, place = where[person]
            dropped[thing] = (place, sorted({move, i}))
    answerable = {}
    for thing, (person, got) in holder.items():
        move, place = where[person]
        answerable[thing] = (place, sorted({got, move}))
    answerable.update(dropped)
    if not answerable:
        return None
    thing = rng.choice(sorted(answerable))
    place, support = answerable[thing]
    return facts, f"Where is the {thing}?", place, support


def _dialogue(
    rng: random.Random, config: BabiConfig, background: Sequence[Dialogue], dialogue_id: str
) -> Dialogue | None:
    chat = rng.randint(*config.chat_turns)
    sources = [d for d in background if len(d.turns) >= chat]
    if not sources:
        raise ValueError(
            f"background: no dialogue has {chat} turns (chat_turns={config.chat_turns})"
        )
    source = rng.choice(sources)
    start = rng.randint(0, len(source.turns) - chat)
    window = source.turns[start : start + chat]
    n = rng.randint(*config.facts)
    made = _qa1(rng, n) if config.task == "qa1" else _qa2(rng, n)
    if made is None:
        return None
    facts, question, answer, support = made
    at = sorted(rng.sample(range(chat), n))  # the turn of each fact, in order
    turns = []
    for t, turn in enumerate(window):
        query = truncate(turn.query, config.max_chars)
        if t in at:
            query = f"{query} {facts[at.index(t)]}"
        turns.append(Turn(query, truncate(turn.answer, config.max_chars)))
    turns.append(Turn(question, answer))
    supporting = [at[i] for i in support]
    first = min(supporting)
    probe = Probe(chat, chat - first, first, config.task, answer, 1 / len(PLACES))
    meta = dict(GENERATOR_META, supporting=supporting, background=source.id)
    return Dialogue(id=dialogue_id, turns=tuple(turns), probes=(probe,), meta=meta)


def generate_babi(
    n: int,
    *,
    seed: int,
    background: Sequence[Dialogue],
    config: BabiConfig = BabiConfig(),
    split: str = "train",
) -> list[Dialogue]:
    """``n`` dialogues; the same arguments (and background) give the same dialogues."""
    rng = _rng(seed, f"{config.task}/{split}")
    out: list[Dialogue] = []
    while len(out) < n:
        dialogue = _dialogue(
            rng, config, background, f"babi-{config.task}-{split}-{seed}-{len(out)}"
        )
        if dialogue is not None:
            out.append(dialogue)
    return out
