"""The state-bytes benchmark's task generators: MQAR (both forms) and bAbI facts in dialogue."""

from __future__ import annotations

import pytest

from rxt.data.babi import PEOPLE, PLACES, BabiConfig, generate_babi
from rxt.data.dialogue import Dialogue, Turn
from rxt.data.mqar import (
    ACK,
    MqarConfig,
    MqarSequenceConfig,
    generate_mqar,
    generate_mqar_sequences,
    mqar_splits,
)
from rxt.validated import ConfigError


def _stated(dialogue: Dialogue, turn: int) -> dict[str, str]:
    words = dialogue.turns[turn].query.split()
    return dict(zip(words[::2], words[1::2], strict=True))


def test_mqar_probes_ask_values_stated_at_their_distance():
    config = MqarConfig(store_turns=(2, 4), query_turns=(2, 5), max_distance=6)
    dialogues = generate_mqar(200, seed=3, config=config)
    probes = 0
    for d in dialogues:
        assert d.turns[0].answer == ACK and d.probes[-1].turn == len(d.turns) - 1
        asked = set()
        for j, p in enumerate(d.probes):
            key = d.turns[p.turn].query
            assert p.distance == p.turn - p.fact_turn and 1 <= p.distance <= 6
            assert _stated(d, p.fact_turn)[key] == p.answer == d.turns[p.turn].answer
            assert key not in asked  # each key asked once
            asked.add(key)
            stores = [t for t in range(p.turn) if d.turns[t].answer == ACK]
            assert d.meta["pairs_before"][j] == 4 * len(stores)
            probes += 1
    assert probes >= 400
    distances = {p.distance for d in dialogues for p in d.probes}
    assert distances == set(range(1, 7))  # every distance in reach occurs


def test_mqar_keys_distinct_and_deterministic():
    a = generate_mqar(50, seed=1)
    assert a == generate_mqar(50, seed=1)
    assert a != generate_mqar(50, seed=2)
    for d in a:
        keys = [k for t in d.turns if t.answer == ACK for k in t.query.split()[::2]]
        assert len(keys) == len(set(keys))


def test_mqar_splits_are_disjoint():
    tiny = MqarConfig(
        num_keys=4, num_values=2, pairs_per_turn=1, store_turns=(1, 2), query_turns=(1, 1)
    )
    splits = mqar_splits({"test": 40, "train": 400}, seed=0, generate=generate_mqar, config=tiny)
    test = {tuple(d.turns) for d in splits["test"]}
    assert test and not test & {tuple(d.turns) for d in splits["train"]}
    assert len(splits["train"]) < 400  # this tiny space repeats: repeats were dropped


def test_mqar_sequence_targets_follow_their_keys():
    config = MqarSequenceConfig(pairs=8, queries=5)
    for d in generate_mqar_sequences(50, seed=0, config=config):
        (turn,) = d.turns
        pairs = _stated(d, 0)
        answer = turn.answer.split()
        assert len(d.meta["targets"]) == 5
        query_words = turn.query.split()
        for word, distance, value in d.meta["targets"]:
            assert answer[word] == value == pairs[answer[word - 1]]
            stated_at = 2 + query_words.index(value)  # after [BOS][Q]
            assert distance == (2 + len(query_words) + 1 + word) - stated_at


def test_mqar_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="query_turns"):
        MqarConfig(store_turns=(1, 1), pairs_per_turn=1, query_turns=(2, 2))
    with pytest.raises(ConfigError, match="queries"):
        MqarSequenceConfig(pairs=2, queries=3)


def _background(prefix: str, n: int = 30) -> list[Dialogue]:
    return [
        Dialogue(
            f"{prefix}{i}",
            tuple(Turn(f"{prefix} q{i}.{t}", f"{prefix} a{i}.{t}") for t in range(9)),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_babi_answers_follow_the_facts(task):
    config = BabiConfig(task=task, chat_turns=(4, 6), facts=(2, 4))
    for d in generate_babi(100, seed=0, background=_background("bg"), config=config):
        (probe,) = d.probes
        last = d.turns[-1]
        assert probe.turn == len(d.turns) - 1 and last.answer == probe.answer in PLACES
        assert probe.distance == probe.turn - probe.fact_turn >= 1
        assert probe.fact_turn == min(d.meta["supporting"])
        # Replay the facts in order: the answer is what they imply.
        where, holder, place_of = {}, {}, {}
        for t in d.turns[:-1]:
            starts = [i for name in PEOPLE if (i := t.query.find(f" {name} ")) >= 0]
            if not starts:
                continue
            fact = t.query[min(starts) + 1 :]
            words = fact.rstrip(".").split()
            who, thing = words[0], words[-1]
            if thing in PLACES:
                where[who] = thing
                for obj, person in holder.items():
                    if person == who:
                        place_of[obj] = thing
            elif any(v in fact for v in ("picked up", "got", "grabbed", "took")):
                holder[thing] = who
                place_of[thing] = where[who]
            else:
                holder.pop(thing, None)
        subject = last.query.removeprefix("Where is ").rstrip("?").removeprefix("the ")
        expected = where[subject] if task == "qa1" else place_of[subject]
        assert probe.answer == expected
        for turn in d.meta["supporting"]:
            assert turn < probe.turn and d.turns[turn].query.startswith("bg")


def test_babi_is_deterministic_and_splits_keep_their_background():
    train_bg, test_bg = _background("train"), _background("test")
    a = generate_babi(30, seed=0, background=train_bg)
    assert a == generate_babi(30, seed=0, background=train_bg)
    test = generate_babi(30, seed=0, background=test_bg, split="test")
    assert all(t.query.startswith("train") for d in a for t in d.turns[:-1])
    assert all(t.query.startswith("test") for d in test for t in d.turns[:-1])
    assert not {tuple(d.turns) for d in a} & {tuple(d.turns) for d in test}


def test_babi_needs_long_enough_background():
    short = [Dialogue("x", (Turn("q", "a"),))]
    with pytest.raises(ValueError, match="no dialogue has"):
        generate_babi(1, seed=0, background=short)
