"""Synthetic memory probes: dialogues that can only be answered from memory.

A user states a fact once ("My dog is called Rex.", answered "Noted."), chats about other things,
and k turns later asks for it ("What is my dog's name?", answered "Rex"). RxT answers each turn
from the current query and its Short-Term Memory only, so an exact answer at distance k is
evidence that the memory carried the fact across k updates; a reset memory must fall to chance.

Chance is low and known exactly because values are drawn uniformly from pools of 15 to 990
values, and several kinds share a pool (dog and cat names, car and favourite colours, home and
birth cities, friend and neighbour names): remembering "a name was said" is not enough, the model
must bind the value to its kind. Probe kinds are a uniform sample without replacement, drawn
independently of the layout, so every probe's kind is uniform over the configured kinds and the
expected exact match of a guess from the right pool is the mean of 1/|pool| (``chance_level``).

Each value is stated once and recalled once: acknowledgements never repeat it, small talk never has
any pool value, and the values within a dialogue are distinct. See ``calibration.md`` for the set-up
this follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction

from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.validated import Validated

__all__ = [
    "ProbeConfig",
    "chance_level",
    "distance_histogram",
    "fact_kinds",
    "generate",
    "generate_apart",
    "generate_splits",
    "value_pool",
    "without_overlap",
]

GENERATOR_META = {"generator": "rxt.probes", "version": 1}

# One word each, so a word-level check finds every occurrence.
_PET_NAMES = (
    "Rex", "Max", "Bella", "Luna", "Charlie", "Milo", "Daisy", "Buddy", "Coco", "Rocky", "Lucy",
    "Toby", "Molly", "Oscar", "Ruby", "Leo", "Rosie", "Jack", "Ginger", "Teddy", "Lola", "Simba",
    "Pepper", "Bruno", "Bailey", "Zoe", "Felix", "Nala", "Misty", "Biscuit",
)  # fmt: skip
_PEOPLE = (
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "James", "Kate",
    "Liam", "Maria", "Noah", "Olga", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera",
    "Walt", "Xena", "Yuri", "Zara", "Alan", "Beth", "Carl", "Dora",
)  # fmt: skip
_COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "grey", "silver", "gold", "beige", "teal", "navy", "maroon", "violet", "cyan", "olive",
)  # fmt: skip
_CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Lisbon", "Oslo",
    "Warsaw", "Athens", "Cairo", "Tokyo", "Seoul", "Sydney", "Toronto", "Chicago", "Boston",
    "Denver", "Lima", "Quito", "Nairobi", "Mumbai",
)  # fmt: skip
_JOBS = (  # consonant-initial: "a {job}" never hints through "an"
    "teacher", "nurse", "pilot", "baker", "farmer", "doctor", "lawyer", "chef", "plumber",
    "dentist", "painter", "writer", "banker", "singer", "tailor", "butcher", "florist", "driver",
    "cashier", "dancer",
)  # fmt: skip
_LOCKERS = tuple(str(v) for v in range(10, 1000))
_AGES = tuple(str(v) for v in range(2, 17))


@dataclass(frozen=True)
class _Kind:
    pool: tuple[str, ...]
    statements: tuple[str, ...]  # the user states the fact; "{v}" is the value
    questions: tuple[str, ...]  # the user asks for it; the answer is exactly the value


def _pet(animal: str) -> _Kind:
    """Dog and cat differ only in the animal word: binding must come from that word."""
    return _Kind(
        _PET_NAMES,
        (
            f"My {animal} is called {{v}}.",
            f"I have a {animal} named {{v}}.",
            f"{{v}} is the name of my {animal}.",
            f"Our family {animal} is named {{v}}.",
        ),
        (
            f"What is my {animal}'s name?",
            f"What is my {animal} called?",
            f"Remind me, what did I name my {animal}?",
        ),
    )


_KINDS: dict[str, _Kind] = {
    "dog_name": _pet("dog"),
    "cat_name": _pet("cat"),
    "favourite_colour": _Kind(
        _COLOURS,
        ("My favourite colour is {v}.", "I like {v} more than any other colour.",
         "Of all colours I like {v} best.", "The colour I love most is {v}."),
        ("What is my favourite colour?", "Which colour do I like most?",
         "Remind me of my favourite colour."),
    ),
    "car_colour": _Kind(
        _COLOURS,
        ("My car is {v}.", "I drive a {v} car.", "The colour of my car is {v}.",
         "The car I own is painted {v}."),
        ("What colour is my car?", "Which colour is the car I drive?",
         "Remind me, what colour is my car?"),
    ),
    "home_city": _Kind(
        _CITIES,
        ("I live in {v}.", "My home is in {v}.", "{v} is where I live now.",
         "These days I live in {v}."),
        ("Where do I live?", "Which city do I live in?", "Remind me, where is my home?"),
    ),
    "birth_city": _Kind(
        _CITIES,
        ("I was born in {v}.", "My birthplace is {v}.", "{v} is where I was born.",
         "My birth city is {v}."),
        ("Where was I born?", "Which city was I born in?", "Remind me, where is my birthplace?"),
    ),
    "locker_number": _Kind(
        _LOCKERS,
        ("My locker number is {v}.", "I use locker {v} at the gym.", "{v} is my locker number.",
         "My locker at the gym is number {v}."),
        ("What is my locker number?", "Which locker do I use?", "Remind me of my locker number."),
    ),
    "friend_name": _Kind(
        _PEOPLE,
        ("My best friend is {v}.", "I have a best friend called {v}.", "{v} is my best friend.",
         "My best friend is named {v}."),
        ("Who is my best friend?", "What is my best friend's name?",
         "Remind me, who is my best friend?"),
    ),
    "neighbour_name": _Kind(
        _PEOPLE,
        ("My neighbour is {v}.", "I have a neighbour called {v}.", "{v} lives next door to me.",
         "My neighbour is named {v}."),
        ("Who is my neighbour?", "What is my neighbour's name?",
         "Remind me, who lives next door to me?"),
    ),
    "job": _Kind(
        _JOBS,
        ("I work as a {v}.", "I am a {v} by trade.", "My job is being a {v}.",
         "For a living I am a {v}."),
        ("What is my job?", "What do I do for a living?", "Remind me, what is my job?"),
    ),
    "parrot_age": _Kind(
        _AGES,
        ("My parrot is {v} years old.", "I have a parrot aged {v}.",
         "My parrot turned {v} this year.", "My parrot is now {v} years old."),
        ("How old is my parrot?", "What age is my parrot?", "Remind me, how old is my parrot?"),
    ),
}  # fmt: skip

# Fixed, value-free acknowledgements: the value must appear exactly once, in the user's statement.
ACKNOWLEDGEMENTS = ("Noted.", "Got it.", "I will remember that.", "Okay, thanks for telling me.")

# Small talk: no pool value, no digit, so a distractor can never leak or hint a fact.
SMALL_TALK = (
    ("How are you today?", "I am well, thank you."),
    ("Nice weather, isn't it?", "Yes, it is lovely outside."),
    ("Do you like music?", "I enjoy many kinds of music."),
    ("I had a long day.", "I hope you can rest soon."),
    ("What should I cook tonight?", "Maybe soup and fresh bread."),
    ("Any tips for sleeping better?", "Keep a regular bedtime."),
    ("I just finished a good book.", "That sounds like a nice evening."),
    ("Do you enjoy the rain?", "Rain can be very calming."),
    ("I went for a walk.", "Walks are good for the mind."),
    ("Tell me something fun.", "Octopuses have three hearts."),
    ("I am a bit tired.", "A short break might help."),
    ("What is a good hobby?", "Gardening is relaxing for many people."),
    ("I watched a film yesterday.", "I hope you enjoyed it."),
    ("Should I learn to play chess?", "Chess is a great game to learn."),
    ("It is quite cold today.", "A warm drink would be nice."),
    ("I like long summer evenings.", "They are very pleasant."),
    ("Can you recommend a snack?", "Nuts or fruit are good choices."),
    ("I started running again.", "Well done, keep it up."),
    ("My week has been busy.", "Busy weeks can be tiring."),
    ("Do you like coffee or tea?", "Both are nice in the morning."),
    ("I want to travel more.", "Travel can be very rewarding."),
    ("What a quiet morning.", "Quiet mornings are the best."),
    ("I am learning to draw.", "Drawing takes patience and practice."),
    ("Thanks for listening.", "You are welcome, any time."),
)


@dataclass(frozen=True)
class ProbeConfig(Validated):
    """Shape of the generated dialogues. Invalid values raise ``ConfigError`` naming the field;
    types are checked from the hints (:mod:`rxt.validated`; lists are stored as tuples)."""

    min_turns: int = 2  # short dialogues give a dense early training signal
    max_turns: int = 17  # must be >= max_distance + 1
    max_distance: int = 16  # every distance 1..max_distance is reachable
    facts_per_dialogue: tuple[int, int] = (1, 3)  # asked facts; fewer when the turns run out
    extra_turns: int = 3  # turns added beyond the first fact's span, so short k stays short
    unasked_fact_rate: float = 0.2  # chance a filler turn states a never-asked fact (interference)
    kinds: tuple[str, ...] | None = None  # None: all of ``fact_kinds()``
    # The first fact's distance is drawn from these (each <= max_distance) instead of
    # 1..max_distance: a test split of long distances only (e.g. (16, 32)) has enough probes
    # at each. Later facts of the dialogue take any distance that fits.
    distances: tuple[int, ...] | None = None

    def validate(self) -> None:
        fpd, kinds = self.facts_per_dialogue, self.active_kinds()
        if self.distances is not None:
            self.require("distances", bool(self.distances), "must be a non-empty list")
        ok = bool(kinds) and len(set(kinds)) == len(kinds) and all(k in _KINDS for k in kinds)
        self.require("kinds", ok, f"need distinct names from {fact_kinds()}")
        self.require("min_turns", self.min_turns >= 2, "must be >= 2")
        self.require(
            "max_turns",
            self.max_turns >= self.min_turns,
            f"must be >= min_turns = {self.min_turns}",
        )
        self.require("max_distance", self.max_distance >= 1, "must be >= 1")
        self.require(
            "max_turns",
            self.max_turns >= self.max_distance + 1,
            f"must be >= max_distance + 1 = {self.max_distance + 1} so every distance is reachable",
        )
        self.require(
            "facts_per_dialogue",
            1 <= fpd[0] <= fpd[1] <= len(kinds),
            f"need 1 <= low <= high <= {len(kinds)} (the number of kinds)",
        )
        self.require("extra_turns", self.extra_turns >= 0, "must be >= 0")
        if self.distances is not None:
            bad = [v for v in self.distances if not 1 <= v <= self.max_distance]
            if bad:
                raise self.error("distances", f"must be in 1..max_distance, got {bad}")
        rate = self.unasked_fact_rate
        self.require("unasked_fact_rate", 0 <= rate <= 1, "must be a number in [0, 1]")

    def active_kinds(self) -> tuple[str, ...]:
        return tuple(_KINDS) if self.kinds is None else self.kinds


def fact_kinds() -> list[str]:
    """All fact kinds, in a fixed order."""
    return list(_KINDS)


def value_pool(kind: str) -> tuple[str, ...]:
    """The values a fact of ``kind`` is drawn from (uniformly); shared pools are the same tuple."""
    return _KINDS[kind].pool


def chance_level(config: ProbeConfig = ProbeConfig()) -> float:
    """Expected exact match of a uniform guess from the right pool, averaged over probes.

    Exact: each probe's kind is uniform over the configured kinds (see the module docstring).
    """
    kinds = config.active_kinds()
    return float(sum(Fraction(1, len(_KINDS[k].pool)) for k in kinds) / len(kinds))


def distance_histogram(dialogues: Iterable[Dialogue]) -> dict[int, int]:
    """Probe counts by distance, sorted by distance."""
    counts = Counter(p.distance for d in dialogues for p in d.probes)
    return dict(sorted(counts.items()))


def _seed(seed: int, split: str) -> int:
    """A per-split seed that is stable across runs and platforms (``hash()`` is salted)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "big")


def _layout(rng: random.Random, config: ProbeConfig) -> tuple[int, list[tuple[int, int]]]:
    """Dialogue length and (fact_turn, question_turn) spans; distances are sampled first."""
    d = (
        rng.randint(1, config.max_distance)
        if config.distances is None
        else rng.choice(config.distances)
    )
    n = min(config.max_turns, max(config.min_turns, d + 1 + rng.randint(0, config.extra_turns)))
    start = rng.randint(0, n - 1 - d)
    spans = [(start, start + d)]
    used = {start, start + d}
    for _ in range(rng.randint(*config.facts_per_dialogue) - 1):
        free = [i for i in range(n) if i not in used]
        pairs = [(a, b) for a in free for b in free if 0 < b - a <= config.max_distance]
        if not pairs:
            break
        d = rng.choice(sorted({b - a for a, b in pairs}))
        a, b = rng.choice([p for p in pairs if p[1] - p[0] == d])
        spans.append((a, b))
        used |= {a, b}
    return n, spans


def _dialogue(rng: random.Random, config: ProbeConfig, dialogue_id: str) -> Dialogue:
    n, spans = _layout(rng, config)
    kinds = list(config.active_kinds())
    asked = rng.sample(kinds, len(spans))  # independent of the layout: keeps chance exact
    spare = [k for k in kinds if k not in asked]
    turns: list[Turn | None] = [None] * n
    values: list[str] = []

    def state(kind: str) -> tuple[str, str]:
        spec = _KINDS[kind]
        value = rng.choice(spec.pool)
        while value in values:  # one occurrence per value per dialogue
            value = rng.choice(spec.pool)
        values.append(value)
        return value, rng.choice(spec.statements).format(v=value)

    probes = []
    for kind, (fact, ask) in zip(asked, spans, strict=True):
        value, query = state(kind)
        turns[fact] = Turn(query=query, answer=rng.choice(ACKNOWLEDGEMENTS))
        turns[ask] = Turn(query=rng.choice(_KINDS[kind].questions), answer=value)
        probes.append(Probe(ask, ask - fact, fact, kind, value, 1 / len(_KINDS[kind].pool)))
    free = [i for i in range(n) if turns[i] is None]
    talk = rng.sample(SMALL_TALK, len(SMALL_TALK))
    for j, i in enumerate(free):
        if spare and rng.random() < config.unasked_fact_rate:
            _, query = state(spare.pop(rng.randrange(len(spare))))
            turns[i] = Turn(query=query, answer=rng.choice(ACKNOWLEDGEMENTS))
        else:
            query, answer = talk[j % len(talk)]
            turns[i] = Turn(query=query, answer=answer)
    probes.sort(key=lambda p: p.turn)
    return Dialogue(
        id=dialogue_id,
        turns=tuple(t for t in turns if t is not None),
        probes=tuple(probes),
        meta=dict(GENERATOR_META),
    )


def _stream(seed: int, split: str, config: ProbeConfig) -> Iterator[Dialogue]:
    rng = random.Random(_seed(seed, split))
    i = 0
    while True:
        yield _dialogue(rng, config, f"{split}-{seed}-{i}")
        i += 1


def _key(dialogue: Dialogue) -> tuple[tuple[str, str], ...]:
    return tuple((t.query, t.answer) for t in dialogue.turns)


def generate(
    n: int, *, seed: int, config: ProbeConfig = ProbeConfig(), split: str = "train"
) -> list[Dialogue]:
    """``n`` probe dialogues; identical for identical arguments. ``split`` changes the stream."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    stream = _stream(seed, split, config)
    return [next(stream) for _ in range(n)]


def without_overlap(dialogues: Iterable[Dialogue], held_out: Iterable[Dialogue]) -> list[Dialogue]:
    """``dialogues`` minus every one whose turns equal a ``held_out`` dialogue's (the rule of
    :func:`generate_splits`): training data drawn apart from a test split stays disjoint."""
    keys = {_key(d) for d in held_out}
    return [d for d in dialogues if _key(d) not in keys]


def generate_apart(
    n: int,
    *,
    seed: int,
    config: ProbeConfig,
    held_out: Iterable[Dialogue],
    split: str = "train",
) -> list[Dialogue]:
    """:func:`generate`'s ``n`` dialogues minus every ``held_out`` one (:func:`without_overlap`):
    training data from a stream of its own that stays disjoint from the evaluation splits."""
    return without_overlap(generate(n, seed=seed, config=config, split=split), held_out)


def generate_splits(
    sizes: Mapping[str, int], *, seed: int, config: ProbeConfig = ProbeConfig()
) -> dict[str, list[Dialogue]]:
    """Disjoint splits, generated in ``sizes`` order: a dialogue whose turns equal one in an
    earlier split is skipped (so later splits slightly under-represent the shortest dialogues)."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    out: dict[str, list[Dialogue]] = {}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"sizes[{split!r}]: must be >= 0, got {size}")
        kept: list[Dialogue] = []
        for tries, dialogue in enumerate(_stream(seed, split, config)):
            if len(kept) == size:
                break
            if tries > 10 * size + 1000:  # a tiny config space cannot fill the split
                raise ValueError(
                    f"sizes[{split!r}]: cannot find {size} dialogues unseen in "
                    "earlier splits; widen the config or shrink the split"
                )
            if _key(dialogue) not in seen:
                kept.append(dialogue)
        # ids are renumbered so they stay dense after skips
        out[split] = [_renumber(d, f"{split}-{seed}-{i}") for i, d in enumerate(kept)]
        seen.update(_key(d) for d in kept)
    return out


def _renumber(dialogue: Dialogue, dialogue_id: str) -> Dialogue:
    return dialogue if dialogue.id == dialogue_id else dataclasses.replace(dialogue, id=dialogue_id)
