"""What makes a small RxT learn to use its memory: one curriculum run, then held-out recall.

    python benchmarks/memory_learning.py --variant interlayer --vocab 1024 \\
        --joint 300 --sft 200 --memory 150 --warmup 300 --smat 2000

Data: probe dialogues of 2..9 turns (facts asked 1..8 turns later) mixed 1:1 with two-turn
dialogues, none of them in the test split (:func:`build_data`); a tokenizer trained on them; the
``tiny`` preset. Each ``--STAGE N`` trains that stage
for N steps (0 skips it): ``--warmup`` is SMAT on the two-turn dialogues only, then ``--smat`` on
the mix. ``--train-facts LOW HIGH`` asks more facts per training dialogue (the test split is
unchanged), ``--mix-short F`` keeps only that share of the two-turn dialogues in the SMAT mix,
``--batch`` and ``--gate-init`` set SMAT's dialogues per step and G at initialisation. Prints one
JSON line: per-stage seconds and last log entry, and recall by distance with
memory on and off on 300 held-out dialogues, with what the wrong answers were
(:mod:`rxt.eval.errors`). One CPU thread; the docs quote its figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from rxt.config import RxTConfig
from rxt.data.dialogue import Dialogue
from rxt.data.probes import ProbeConfig, generate_apart, generate_splits
from rxt.eval.errors import recall_errors
from rxt.eval.recall import evaluate_dialogues
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.joint import JointConfig, JointStage, interaction_sequences, text_sequences
from rxt.training.stages.memory import MemoryPretrainConfig, MemoryPretrainStage
from rxt.training.stages.smat import SmatConfig, SmatStage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/memory_learning")
    p.add_argument("--variant", default="interlayer")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--horizon", type=int, default=None, help="SMAT gradient horizon (None=full)")
    for stage in ("joint", "sft", "memory", "warmup", "smat"):
        p.add_argument(f"--{stage}", type=int, default=0, metavar="STEPS")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gate-projection", choices=("linear", "elementwise"), default="linear")
    p.add_argument("--gate-reference", choices=("previous", "pre_step"), default="previous")
    p.add_argument("--gate-init", type=float, default=0.5, help="G at initialisation")
    p.add_argument(
        "--stm-init",
        choices=("random", "learned"),
        default="random",
        help="STM_0: fresh noise per dialogue, or one trained tensor",
    )
    p.add_argument("--batch", type=int, default=16, help="SMAT dialogues per step")
    p.add_argument(
        "--train-facts",
        type=int,
        nargs=2,
        default=(1, 3),
        metavar=("LOW", "HIGH"),
        help="asked facts per training dialogue (the test split keeps 1..3)",
    )
    p.add_argument(
        "--mix-short",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="share of the two-turn dialogues mixed into SMAT (1 = all, 1:1 with the rest)",
    )
    p.add_argument(
        "--prefix-space",
        action="store_true",
        help="tokenizer encodes every text as ' ' + text (a value has one spelling in ids)",
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=[],
        type=_override,
        metavar="KEY=VALUE",
        help="tiny preset overrides, dotted for nested fields (d_model=128 decoder.ffn_dim=256); "
        "values are read as JSON",
    )
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and training")
    p.add_argument("--save", metavar="DIR", help="save the trained model (and tokenizer) here")
    args = p.parse_args()
    torch.set_num_threads(1)

    train_dialogues, short, test = build_data(seed=args.seed, facts=tuple(args.train_facts))
    texts = [
        t for d in train_dialogues[:5000] for turn in d.turns for t in (turn.query, turn.answer)
    ]
    tok = RxTTokenizer.train(texts, vocab_size=args.vocab, prefix_space=args.prefix_space)
    memory = {
        "variant": args.variant,
        "gate_projection": args.gate_projection,
        "gate_reference": args.gate_reference,
        "gate_init": args.gate_init,
        "stm_init": args.stm_init,
    }
    overrides: dict = {"vocab_size": tok.vocab_size, "memory": memory}
    for key, value in args.model:
        *parents, leaf = key.split(".")
        node = overrides
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    model_config = RxTConfig.preset("tiny", **overrides)
    torch.manual_seed(args.seed)
    model = ReactiveTransformer(model_config)
    model.tokenizer = tok
    stages: dict[str, object] = {}

    def run(stage: object, steps: int, name: str) -> None:
        if steps == 0:
            return
        start = time.perf_counter()
        config = TrainConfig(
            steps=steps, lr=args.lr, warmup_steps=min(50, steps // 5), log_every=50, seed=args.seed
        )
        last = train(model, stage, config, f"{args.out}/{name}", progress=False)
        stages[name] = {"seconds": round(time.perf_counter() - start), "last": last}

    pool = train_dialogues[:8000]
    text = text_sequences(
        [t for d in pool for turn in d.turns for t in (turn.query, turn.answer)], tok, 128
    )
    seed = args.seed  # every stage's data order
    run(JointStage(text, tok, JointConfig(), seed=seed), args.joint, "joint")
    sft = interaction_sequences(pool, tok, 128)
    sft_stage = JointStage(sft, tok, JointConfig(answer_only=True), seed=seed, name="sft")
    run(sft_stage, args.sft, "sft")
    mix = train_dialogues + short
    run(MemoryPretrainStage(mix, tok, MemoryPretrainConfig(), seed=seed), args.memory, "memory")
    run(SmatStage(short, tok, SmatConfig(batch_size=args.batch), seed=seed), args.warmup, "warmup")
    smat = SmatConfig(batch_size=args.batch, gradient_horizon=args.horizon)
    smat_mix = train_dialogues + short[: round(args.mix_short * len(short))]
    run(SmatStage(smat_mix, tok, smat, seed=seed), args.smat, "smat")

    if args.save:
        model.save_pretrained(args.save)
    result = {}
    for memory in ("on", "off"):
        r = evaluate_dialogues(model, tok, test, memory=memory, replies=memory == "on")
        result[memory] = {
            "recall": round(r.recall, 3),
            "chance": round(r.chance, 3),
            "by_distance": {k: round(v, 2) for k, v in r.recall_by_distance.items()},
        }
        if r.replies is not None:
            result[memory]["errors"] = recall_errors(test, r.replies, tok)
    parameters = model.parameter_counts()["inference"]
    summary = {"args": vars(args), "parameters": parameters, "stages": stages, "eval": result}
    print(json.dumps(summary))


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def build_data(
    seed: int = 0,
    train: int = 20000,
    short: int = 20000,
    test: int = 300,
    facts: tuple[int, int] = (1, 3),
) -> tuple[list[Dialogue], list[Dialogue], list[Dialogue]]:
    """``(train, short, test)``: probe dialogues of 2..9 turns split into train and test, and
    two-turn dialogues (a fact, its question) with every dialogue of the test split removed
    (the short dialogues are drawn from another stream, which repeats a few test dialogues).
    ``facts``: asked facts per training dialogue; other than (1, 3) the training dialogues come
    from their own stream with the test split removed, and the test split is unchanged."""
    config = ProbeConfig(max_turns=9, max_distance=8)
    splits = generate_splits({"train": train, "test": test}, seed=seed, config=config)
    if facts != config.facts_per_dialogue:
        dense = dataclasses.replace(config, facts_per_dialogue=facts)
        splits["train"] = generate_apart(
            train, seed=seed, config=dense, held_out=splits["test"], split="dense"
        )
    two_turn = ProbeConfig(max_turns=2, max_distance=1, extra_turns=0)
    two_turn_dialogues = generate_apart(
        short, seed=seed + 1, config=two_turn, held_out=splits["test"]
    )
    return splits["train"], two_turn_dialogues, splits["test"]


if __name__ == "__main__":
    main()
