"""A small generated corpus for tokenizers of untrained models (benchmarks, tests)."""

from __future__ import annotations

import random

_NAMES = ["Ada", "Bo", "Cleo", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jun"]
_THINGS = ["dog", "cat", "car", "boat", "garden", "kite", "lamp", "violin", "bicycle", "tent"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "teal", "gold", "black"]
_PLACES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Tartu", "Lima", "Kyoto", "Bern"]


def synthetic_corpus(num_sentences: int, seed: int = 0) -> list[str]:
    """Small generated text for the demo tokenizer (no data download is possible or needed)."""
    rng = random.Random(seed)
    templates = [
        "My name is {n} and I live in {p}.",
        "The {t} is {c}.",
        "What colour is the {t}? It is {c}.",
        "{n} bought a {c} {t} in {p}.",
        "Where does {n} live? In {p}.",
        "Tell me about the {t}, please.",
    ]
    return [
        rng.choice(templates).format(
            n=rng.choice(_NAMES),
            t=rng.choice(_THINGS),
            c=rng.choice(_COLOURS),
            p=rng.choice(_PLACES),
        )
        for _ in range(num_sentences)
    ]
