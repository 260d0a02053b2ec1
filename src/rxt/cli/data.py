"""``rxt data probes|shakespeare|chitchat``: write dialogue JSONL files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["probes", "shakespeare", "chitchat"])
    parser.add_argument("--out", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sizes", type=int, nargs=3, default=[20000, 500, 500], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument(
        "--max-turns",
        type=int,
        default=None,
        help="probes: 17 (default); shakespeare, chitchat: 8 turns per dialogue (default)",
    )
    parser.add_argument("--max-distance", type=int, default=16)
    parser.add_argument(
        "--test-plays",
        nargs="+",
        default=["hamlet", "tempest"],
        help="Shakespeare plays held out for testing",
    )
    parser.add_argument("--valid-plays", nargs="+", default=["twelfth_night"])
    parser.add_argument(
        "--valid-fraction", type=float, default=0.05, help="chitchat: conversations held out"
    )
    parser.add_argument("--test-fraction", type=float, default=0.05)


def cmd_data(
    *,
    source: str,
    out: str = "data",
    seed: int = 0,
    sizes: Sequence[int] = (20000, 500, 500),
    max_turns: int | None = None,
    max_distance: int = 16,
    test_plays: Sequence[str] = ("hamlet", "tempest"),
    valid_plays: Sequence[str] = ("twelfth_night",),
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> int:
    """Write dialogue JSONL: probe splits, the Shakespeare plays, or the Chit Chat corpus."""
    from rxt.data.dialogue import write_dialogues

    if source == "probes":
        from rxt.data.probes import ProbeConfig, chance_level, generate_splits

        config = ProbeConfig(
            max_turns=17 if max_turns is None else max_turns, max_distance=max_distance
        )
        counts = dict(zip(("train", "validation", "test"), sizes, strict=True))
        for split, dialogues in generate_splits(counts, seed=seed, config=config).items():
            n = write_dialogues(f"{out}/probes-{split}.jsonl", dialogues)
            print(f"{out}/probes-{split}.jsonl: {n} dialogues")
        print(f"chance level: {chance_level(config):.4f}")
        return 0
    turns = 8 if max_turns is None else max_turns
    if source == "chitchat":
        from rxt.data.chitchat import chitchat_dialogues, split_chitchat

        splits = split_chitchat(
            chitchat_dialogues(max_turns=turns),
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    else:
        from rxt.data.shakespeare import shakespeare_dialogues, split_by_play

        dialogues = shakespeare_dialogues(max_turns=turns)
        splits = split_by_play(dialogues, test_plays=test_plays, valid_plays=valid_plays)
    for split, part in splits.items():
        n = write_dialogues(f"{out}/{source}-{split}.jsonl", part)
        print(f"{out}/{source}-{split}.jsonl: {n} dialogues")
    return 0
