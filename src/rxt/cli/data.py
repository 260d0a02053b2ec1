"""``rxt data probes|shakespeare``: write dialogue JSONL files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["probes", "shakespeare"])
    parser.add_argument("--out", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=[20000, 500, 500], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--max-turns", type=int, default=17)
    parser.add_argument("--max-distance", type=int, default=16)
    parser.add_argument(
        "--test-plays",
        nargs="+",
        default=["hamlet", "tempest"],
        help="Shakespeare plays held out for testing",
    )
    parser.add_argument("--valid-plays", nargs="+", default=["twelfth_night"])


def cmd_data(
    *,
    source: str,
    out: str = "data",
    seed: int = 0,
    sizes: Sequence[int] = (20000, 500, 500),
    max_turns: int = 17,
    max_distance: int = 16,
    test_plays: Sequence[str] = ("hamlet", "tempest"),
    valid_plays: Sequence[str] = ("twelfth_night",),
) -> int:
    """Write dialogue JSONL: probe splits, or the Shakespeare plays."""
    from rxt.data.dialogue import write_dialogues

    if source == "probes":
        from rxt.data.probes import ProbeConfig, chance_level, generate_splits

        config = ProbeConfig(max_turns=max_turns, max_distance=max_distance)
        counts = dict(zip(("train", "validation", "test"), sizes, strict=True))
        for split, dialogues in generate_splits(counts, seed=seed, config=config).items():
            n = write_dialogues(f"{out}/probes-{split}.jsonl", dialogues)
            print(f"{out}/probes-{split}.jsonl: {n} dialogues")
        print(f"chance level: {chance_level(config):.4f}")
        return 0
    from rxt.data.shakespeare import shakespeare_dialogues, split_by_play

    splits = split_by_play(shakespeare_dialogues(), test_plays=test_plays, valid_plays=valid_plays)
    for split, dialogues in splits.items():
        n = write_dialogues(f"{out}/shakespeare-{split}.jsonl", dialogues)
        print(f"{out}/shakespeare-{split}.jsonl: {n} dialogues")
    return 0
