"""The memory is learnt: a short SMAT run on two-turn probes recalls far above memory off.

The other SMAT tests check equivalences and that the loss falls; a change that breaks *learning
to use the memory* (an init scale, a gate that cannot open, a detached write) would pass them.
Here a fresh ``tiny`` model trains 300 SMAT steps (about 15 s on one thread) on dialogues of a
fact and its question, and must answer held-out questions from its memory: it must beat the
same model with its memory switched off by a wide margin (measured: 1.00 against 0.00, chance
0.04). Training and test dialogues are disjoint (``generate_splits``, checked below).
"""

from __future__ import annotations

import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data.probes import ProbeConfig, generate_splits
from rxt.eval.recall import evaluate_dialogues
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.smat import SmatConfig, SmatStage

# One fact, then its question; four kinds of 20-30 values each (chance 0.043).
TWO_TURN = ProbeConfig(
    min_turns=2,
    max_turns=2,
    max_distance=1,
    extra_turns=0,
    facts_per_dialogue=(1, 1),
    unasked_fact_rate=0.0,
    kinds=("dog_name", "favourite_colour", "job", "home_city"),
)


def test_smat_learns_to_recall_from_memory(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = generate_splits({"train": 4000, "test": 100}, seed=0, config=TWO_TURN)
        train_keys = {d.turns for d in splits["train"]}
        assert not any(d.turns in train_keys for d in splits["test"])
        texts = [x for d in splits["train"][:1000] for t in d.turns for x in (t.query, t.answer)]
        tokenizer = RxTTokenizer.train(texts, vocab_size=300)
        torch.manual_seed(0)
        model = ReactiveTransformer(RxTConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
        stage = SmatStage(splits["train"], tokenizer, SmatConfig(batch_size=16))
        config = TrainConfig(steps=300, lr=3e-3, warmup_steps=20, log_every=100)
        train(model, stage, config, tmp_path, progress=False)
        on, off = (
            evaluate_dialogues(model, tokenizer, splits["test"], memory=m, max_new_tokens=6)
            for m in ("on", "off")
        )
    finally:
        torch.set_num_threads(threads)
    assert on.chance < 0.05
    assert on.recall >= 0.6, f"memory on: recall {on.recall:.2f}; the memory was not learnt"
    assert on.recall - off.recall >= 0.5 and off.recall <= on.chance + 0.1
