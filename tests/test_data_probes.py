"""The memory-probe generator: deterministic, consistent, unguessable, chance level exact."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict

import pytest

from rxt.config import ConfigError
from rxt.data.dialogue import Dialogue, read_dialogues, write_dialogues
from rxt.data.probes import (
    ACKNOWLEDGEMENTS,
    SMALL_TALK,
    ProbeConfig,
    chance_level,
    distance_histogram,
    fact_kinds,
    generate,
    generate_apart,
    generate_splits,
    value_pool,
    without_overlap,
)

# sha256 of the JSON of generate(20, seed=0): pins the output across runs, platforms and Python
# versions. If a deliberate change breaks it, bump GENERATOR_META["version"] and update this.
GOLDEN_SHA256 = "24466d405cbdd8e10221ed7fdf9a9f8851e682ca329a14271278c762c68f4f3b"

ALL_VALUES = {v.lower() for k in fact_kinds() for v in value_pool(k)}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def digest(dialogues: list[Dialogue]) -> str:
    text = json.dumps([d.to_json() for d in dialogues], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def data() -> list[Dialogue]:
    return generate(2000, seed=0)


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Dialogue]]:
    return generate_splits({"train": 2000, "test": 1000}, seed=1)


def test_same_seed_same_output_and_pinned_digest():
    assert generate(30, seed=7) == generate(30, seed=7)
    assert digest(generate(20, seed=0)) == GOLDEN_SHA256


def test_seed_and_split_change_the_stream():
    base = generate(30, seed=7)
    assert generate(30, seed=8) != base
    assert [d.turns for d in generate(30, seed=7, split="test")] != [d.turns for d in base]
    assert [d.id for d in base[:2]] == ["train-7-0", "train-7-1"]


def test_every_probe_is_consistent_and_its_value_appears_once(data):
    for d in data:
        assert d.probes and d.meta == {"generator": "rxt.probes", "version": 1}
        assert len({p.kind for p in d.probes}) == len(d.probes)  # each fact asked once
        for p in d.probes:
            value = p.answer.lower()
            assert p.distance == p.turn - p.fact_turn >= 1
            assert d.turns[p.turn].answer == p.answer
            assert p.answer in value_pool(p.kind)
            assert p.chance == 1 / len(value_pool(p.kind))
            assert value in words(d.turns[p.fact_turn].query)
            assert all(value not in words(t.answer) for t in d.turns[: p.turn])
            assert all(value not in words(t.query) for t in d.turns[p.fact_turn + 1 : p.turn + 1])
            # Stated exactly once in the whole dialogue, besides the recall answer itself.
            texts = [t.query for t in d.turns] + [t.answer for t in d.turns]
            texts.remove(p.answer)
            assert sum(words(text).count(value) for text in texts) == 1


def test_distances_cover_the_range(data):
    hist = distance_histogram(data)
    assert list(hist) == list(range(1, 17))
    assert min(hist.values()) >= 50  # spread, not just reachable
    assert sum(hist.values()) == sum(len(d.probes) for d in data)


def test_lengths_within_bounds_and_short_dialogues_mixed_in(data):
    lengths = Counter(len(d.turns) for d in data)
    assert min(lengths) == 2 and max(lengths) == 17
    config = ProbeConfig(min_turns=4, max_turns=6, max_distance=5, facts_per_dialogue=(3, 3))
    for d in generate(300, seed=2, config=config):
        assert 4 <= len(d.turns) <= 6 and 1 <= len(d.probes) <= 3
        assert all(p.distance <= 5 for p in d.probes)


def test_turns_are_short(data):
    assert (
        max(len(text.split()) for d in data for t in d.turns for text in (t.query, t.answer)) <= 12
    )


def test_fillers_never_contain_a_value():
    for text in [*ACKNOWLEDGEMENTS, *(s for pair in SMALL_TALK for s in pair)]:
        assert not set(words(text)) & ALL_VALUES, text


def test_shared_pools_really_share_values(data):
    for a, b in [
        ("dog_name", "cat_name"),
        ("favourite_colour", "car_colour"),
        ("home_city", "birth_city"),
        ("friend_name", "neighbour_name"),
    ]:
        assert value_pool(a) == value_pool(b) and len(value_pool(a)) >= 20
        seen = defaultdict(set)
        for p in (p for d in data for p in d.probes):
            seen[p.kind].add(p.answer)
        assert len(seen[a] & seen[b]) >= 10


def test_phrasing_varies_within_each_kind(data):
    questions = defaultdict(set)
    for d in data:
        for p in d.probes:
            questions[p.kind].add(d.turns[p.turn].query)
    assert set(questions) == set(fact_kinds())
    assert all(len(q) >= 3 for q in questions.values())


def test_chance_level_is_exact_and_low(data):
    level = chance_level()
    assert level < 0.1
    assert math.isclose(
        chance_level(ProbeConfig(kinds=("dog_name", "locker_number"), facts_per_dialogue=(1, 2))),
        (1 / 30 + 1 / 990) / 2,
    )
    probes = [p for d in data for p in d.probes]
    rng = random.Random(0)
    hits = sum(rng.choice(value_pool(p.kind)) == p.answer for p in probes for _ in range(5))
    assert abs(hits / (5 * len(probes)) - level) < 0.01  # Monte-Carlo guess from the right pool
    assert abs(sum(p.chance for p in probes) / len(probes) - level) < 0.003


def test_unasked_facts_add_interference_only_when_enabled():
    def statements(d: Dialogue) -> int:
        return sum(t.answer in ACKNOWLEDGEMENTS for t in d.turns)

    quiet = generate(300, seed=3, config=ProbeConfig(unasked_fact_rate=0.0))
    assert all(statements(d) == len(d.probes) for d in quiet)
    noisy = generate(300, seed=3, config=ProbeConfig(unasked_fact_rate=0.5))
    assert sum(statements(d) - len(d.probes) for d in noisy) > 300


def test_splits_are_disjoint_even_when_collisions_are_likely():
    config = ProbeConfig(min_turns=2, max_turns=2, max_distance=1, facts_per_dialogue=(1, 1))
    out = generate_splits({"train": 3000, "val": 500, "test": 500}, seed=0, config=config)
    assert {k: len(v) for k, v in out.items()} == {"train": 3000, "val": 500, "test": 500}
    assert out["train"] == generate(3000, seed=0, config=config, split="train")
    keys = {k: {tuple(d.turns) for d in v} for k, v in out.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    naive = {tuple(d.turns) for d in generate(500, seed=0, config=config, split="test")}
    assert naive & keys["train"]  # without de-duplication the splits would overlap
    ids = [d.id for v in out.values() for d in v]
    assert len(set(ids)) == len(ids) and out["test"][-1].id == "test-0-499"


def test_template_only_baseline_scores_near_chance(splits):
    """Answering the most frequent train value per kind, or per question text, is a guess."""
    train = [(d.turns[p.turn].query, p) for d in splits["train"] for p in d.probes]
    test = [(d.turns[p.turn].query, p) for d in splits["test"] for p in d.probes]
    for key in (lambda q, p: p.kind, lambda q, p: q):
        counts = defaultdict(Counter)
        for q, p in train:
            counts[key(q, p)][p.answer] += 1
        best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
        accuracy = sum(best.get(key(q, p)) == p.answer for q, p in test) / len(test)
        assert abs(accuracy - chance_level()) < 0.03


def test_json_round_trip(data, tmp_path):
    for d in data[:200]:
        assert Dialogue.from_json(json.loads(json.dumps(d.to_json()))) == d
    path = tmp_path / "probes.jsonl"
    assert write_dialogues(path, data[:200]) == 200
    assert read_dialogues(path) == data[:200]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_turns": 1}, "min_turns"),
        ({"min_turns": 2.0}, "min_turns"),
        ({"min_turns": 5, "max_turns": 4, "max_distance": 3}, "max_turns"),
        ({"max_distance": 0}, "max_distance"),
        ({"max_turns": 12}, "max_turns"),  # distance 16 is unreachable in 12 turns
        ({"facts_per_dialogue": (0, 1)}, "facts_per_dialogue"),
        ({"facts_per_dialogue": (3, 2)}, "facts_per_dialogue"),
        ({"facts_per_dialogue": (1, 99)}, "facts_per_dialogue"),
        ({"facts_per_dialogue": (1,)}, "facts_per_dialogue"),
        ({"extra_turns": -1}, "extra_turns"),
        ({"unasked_fact_rate": 1.5}, "unasked_fact_rate"),
        ({"unasked_fact_rate": float("nan")}, "unasked_fact_rate"),
        ({"kinds": ("unicorn_name",)}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"kinds": ("dog_name", "dog_name")}, "kinds"),
        ({"kinds": ("dog_name",), "facts_per_dialogue": (1, 2)}, "facts_per_dialogue"),
        ({"distances": ()}, "distances"),
        ({"distances": (1.5,)}, "distances"),
        ({"distances": (17,)}, "distances"),  # beyond max_distance = 16
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        ProbeConfig(**kwargs)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"^n: "):
        generate(-1, seed=0)
    with pytest.raises(ValueError, match=r"^sizes\['test'\]: "):
        generate_splits({"test": -1}, seed=0)
    tiny = ProbeConfig(
        max_turns=2, max_distance=1, kinds=("parrot_age",), facts_per_dialogue=(1, 1)
    )
    with pytest.raises(ValueError, match="cannot find"):  # only 720 distinct dialogues exist
        generate_splits({"train": 5000, "test": 100}, seed=0, config=tiny)


def test_without_overlap_drops_exactly_the_held_out_dialogues():
    config = ProbeConfig(min_turns=2, max_turns=2, max_distance=1, facts_per_dialogue=(1, 1))
    test = generate(200, seed=0, config=config, split="test")
    other = generate(2000, seed=0, config=config, split="train")
    kept = without_overlap(other, test)
    held_out = {tuple(d.turns) for d in test}
    dropped = [d for d in other if tuple(d.turns) in held_out]
    assert dropped  # collisions are likely in this small config space
    assert kept == [d for d in other if tuple(d.turns) not in held_out]
    assert without_overlap(other, []) == other
    # generate_apart: the same stream, minus the same dialogues.
    assert generate_apart(2000, seed=0, config=config, held_out=test) == kept


def test_distances_fix_the_first_facts_distance():
    config = ProbeConfig(max_turns=36, max_distance=32, distances=(16, 32))
    dialogues = generate(200, seed=0, config=config, split="test")
    assert all(any(p.distance in (16, 32) for p in d.probes) for d in dialogues)
    counts = {k: sum(p.distance == k for d in dialogues for p in d.probes) for k in (16, 32)}
    assert min(counts.values()) >= 60
    assert max(len(d.turns) for d in dialogues) <= 36
    assert generate(20, seed=0) == generate(20, seed=0, config=ProbeConfig(distances=None))
