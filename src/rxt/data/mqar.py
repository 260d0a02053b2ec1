"""Multi-query associative recall (MQAR) as dialogues: Zoology's task, stated across turns.

MQAR (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models",
arXiv:2312.04927) shows a model key–value pairs drawn from a vocabulary and then asks for the
values of some of the keys; it separates architectures by how much they can recall from a
fixed-size state. Written here from the paper's description (the reference generator is not
used): keys and values come from disjoint vocabularies (``k0 k1 ...`` and ``v0 v1 ...``, one
word, hence one token of the word-level tokenizer, each), the keys of one example are distinct,
its values distinct where the vocabulary allows, and the score is exact match of each value.

Two forms, both :class:`~rxt.data.dialogue.Dialogue`s:

* **Multi-turn** (:func:`generate_mqar`, :class:`MqarConfig`): *store* turns state
  ``pairs_per_turn`` pairs (``"k3 v17 k9 v2"``, answered ``"ok"``), *query* turns ask one key
  (``"k9"``, answered ``"v2"``). Turn 0 is a store turn and the last turn a query; between them
  the remaining store and query turns come in a random order. A query asks a key no earlier
  query asked, stated in an earlier store turn at most ``max_distance`` turns back, choosing
  first the distance (uniformly among the distances that still have an unasked key), then the
  key: distances spread evenly instead of following the layout. Each query is a
  :class:`~rxt.data.dialogue.Probe` (``distance = turn - fact_turn``, ``kind = "mqar"``,
  ``chance = 1 / num_values``); ``meta["pairs_before"][j]`` is how many pairs had been stated
  before probe j's turn (the memory's load).
* **Single sequence** (:func:`generate_mqar_sequences`, :class:`MqarSequenceConfig`):
  Zoology's original layout in one turn. The query holds all pairs, the answer holds the
  queries, each key followed by its value (``"k9 v2 k3 v17"``), so the value is predicted right
  after its key as in Zoology. ``meta["targets"]``: one ``[word, distance, value]`` per query —
  the value's word index in the answer, and the distance in tokens from the value's statement
  to that target (the query's later words, ``[A]``, the answer's earlier words). No probes: a
  probe is a whole turn's answer.

Splits: every split has its own random stream (``seed`` and ``split`` name), and
:func:`mqar_splits` drops any dialogue whose turns equal one of an earlier split, so train and
test are disjoint (with 64 keys and values the chance of a repeat is negligible anyway).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rxt.data.dialogue import Dialogue, Probe, Turn
from rxt.validated import Validated

__all__ = [
    "ACK",
    "MqarConfig",
    "MqarSequenceConfig",
    "generate_mqar",
    "generate_mqar_sequences",
    "mqar_splits",
    "mqar_words",
]

ACK = "ok"
GENERATOR_META = {"generator": "rxt.mqar", "version": 1}


@dataclass(frozen=True)
class MqarConfig(Validated):
    """Shape of a multi-turn MQAR dialogue (module docstring)."""

    num_keys: int = 64
    num_values: int = 64
    pairs_per_turn: int = 4
    store_turns: tuple[int, int] = (2, 4)  # (low, high): store turns per dialogue
    query_turns: tuple[int, int] = (2, 6)  # (low, high): query turns per dialogue
    max_distance: int = 8

    def validate(self) -> None:
        self.require("num_keys", self.num_keys >= 1, "must be >= 1")
        self.require("num_values", self.num_values >= 1, "must be >= 1")
        self.require("pairs_per_turn", self.pairs_per_turn >= 1, "must be >= 1")
        for name in ("store_turns", "query_turns"):
            low, high = getattr(self, name)
            self.require(name, 1 <= low <= high, "need 1 <= low <= high")
        most = self.store_turns[1] * self.pairs_per_turn
        self.require("num_keys", self.num_keys >= most, f"must be >= {most} (keys per dialogue)")
        most_queries = self.query_turns[1]
        self.require(
            "query_turns",
            most_queries <= self.store_turns[0] * self.pairs_per_turn,
            "high must be <= store_turns low * pairs_per_turn (a key is asked once)",
        )
        self.require("max_distance", self.max_distance >= 1, "must be >= 1")


@dataclass(frozen=True)
class MqarSequenceConfig(Validated):
    """Zoology's single-sequence MQAR: ``pairs`` pairs, then ``queries`` of them asked."""

    num_keys: int = 64
    num_values: int = 64
    pairs: int = 16
    queries: int = 8

    def validate(self) -> None:
        self.require("pairs", self.pairs >= 1, "must be >= 1")
        self.require("num_keys", self.num_keys >= self.pairs, f"must be >= pairs = {self.pairs}")
        self.require("num_values", self.num_values >= 1, "must be >= 1")
        self.require("queries", 1 <= self.queries <= self.pairs, "must be in 1..pairs")


def mqar_words(config: MqarConfig | MqarSequenceConfig) -> list[str]:
    """Every word the generator can write: keys, values and the acknowledgement."""
    keys = [f"k{i}" for i in range(config.num_keys)]
    return keys + [f"v{i}" for i in range(config.num_values)] + [ACK]


def _rng(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"mqar/{seed}/{split}".encode()).digest()[:8]
    return random.Random(int.from_bytes(digest, "big"))


def _pairs(rng: random.Random, n: int, num_keys: int, num_values: int) -> list[tuple[str, str]]:
    keys = rng.sample(range(num_keys), n)
    if num_values >= n:
        values = rng.sample(range(num_values), n)
    else:
        values = [rng.randrange(num_values) for _ in range(n)]
    return [(f"k{k}", f"v{v}") for k, v in zip(keys, values, strict=True)]


def _layout(rng: random.Random, config: MqarConfig) -> list[str]:
    """Turn kinds: ``"store"`` first, ``"query"`` last, the rest shuffled."""
    stores = rng.randint(*config.store_turns)
    queries = rng.randint(*config.query_turns)
    middle = ["store"] * (stores - 1) + ["query"] * (queries - 1)
    rng.shuffle(middle)
    return ["store", *middle, "query"]


def _dialogue(rng: random.Random, config: MqarConfig, dialogue_id: str) -> Dialogue | None:
    kinds = _layout(rng, config)
    stores = kinds.count("store")
    pairs = _pairs(rng, stores * config.pairs_per_turn, config.num_keys, config.num_values)
    turns: list[Turn] = []
    probes: list[Probe] = []
    loads: list[int] = []
    unasked: dict[int, list[tuple[str, str]]] = {}  # store turn -> its pairs not yet asked
    stated = 0
    for t, kind in enumerate(kinds):
        if kind == "store":
            chunk = pairs[stated : stated + config.pairs_per_turn]
            stated += len(chunk)
            unasked[t] = list(chunk)
            turns.append(Turn(" ".join(f"{k} {v}" for k, v in chunk), ACK))
            continue
        distances = sorted(
            t - s for s, left in unasked.items() if left and t - s <= config.max_distance
        )
        if not distances:
            return None  # nothing left in reach: the caller draws another layout
        distance = rng.choice(distances)
        source = unasked[t - distance]
        key, value = source.pop(rng.randrange(len(source)))
        turns.append(Turn(key, value))
        probes.append(Probe(t, distance, t - distance, "mqar", value, 1 / config.num_values))
        loads.append(stated)
    meta = dict(GENERATOR_META, pairs_before=loads)
    return Dialogue(id=dialogue_id, turns=tuple(turns), probes=tuple(probes), meta=meta)


def generate_mqar(
    n: int, *, seed: int, config: MqarConfig = MqarConfig(), split: str = "train"
) -> list[Dialogue]:
    """``n`` multi-turn MQAR dialogues; the same arguments give the same dialogues."""
    rng = _rng(seed, split)
    out: list[Dialogue] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 10 * n + 100:
            raise ValueError(
                "MqarConfig: layouts keep leaving queries out of reach; raise max_distance"
            )
        dialogue = _dialogue(rng, config, f"mqar-{split}-{seed}-{len(out)}")
        if dialogue is not None:
            out.append(dialogue)
    return out


def generate_mqar_sequences(
    n: int, *, seed: int, config: MqarSequenceConfig = MqarSequenceConfig(), split: str = "train"
) -> list[Dialogue]:
    """``n`` single-sequence MQAR examples as one-turn dialogues (module docstring)."""
    rng = _rng(seed, f"sequence/{split}")
    out = []
    for i in range(n):
        pairs = _pairs(rng, config.pairs, config.num_keys, config.num_values)
        asked = rng.sample(range(config.pairs), config.queries)
        answer: list[str] = []
        targets = []
        query_words = 2 * config.pairs
        for j in asked:
            key, value = pairs[j]
            answer += [key, value]
            word = len(answer) - 1
            # Tokens from the value's statement (query word 2j+1) to its prediction target:
            # the rest of the query, then [A], then the answer's words before it.
            distance = (query_words - (2 * j + 1)) + 1 + word
            targets.append([word, distance, value])
        query = " ".join(f"{k} {v}" for k, v in pairs)
        meta = dict(GENERATOR_META, targets=targets, form="sequence")
        turn = Turn(query, " ".join(answer))
        out.append(Dialogue(id=f"mqar-seq-{split}-{seed}-{i}", turns=(turn,), meta=meta))
    return out


def _key(dialogue: Dialogue) -> tuple[tuple[str, str], ...]:
    return tuple((t.query, t.answer) for t in dialogue.turns)


def mqar_splits(
    sizes: Mapping[str, int],
    *,
    seed: int,
    generate: Callable[..., list[Dialogue]],
    config: MqarConfig | MqarSequenceConfig,
) -> dict[str, list[Dialogue]]:
    """Disjoint splits (``sizes`` in order: a dialogue equal to one of an earlier split is
    dropped, so a later split may hold a few fewer); ``generate`` is :func:`generate_mqar` or
    :func:`generate_mqar_sequences`."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    out = {}
    for split, size in sizes.items():
        kept = [
            d for d in generate(size, seed=seed, config=config, split=split) if _key(d) not in seen
        ]
        seen.update(_key(d) for d in kept)
        out[split] = kept
    return out
