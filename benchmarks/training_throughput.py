"""Training throughput of every curriculum stage on the demo's data, one thread.

    python benchmarks/training_throughput.py                 # tiny, 150 steps per stage
    python benchmarks/training_throughput.py --stages smat --steps 300 --json out.json
    python benchmarks/training_throughput.py --stages smat --compile decoder encoder

Builds the demo's data (probe dialogues of 2..9 turns mixed with two-turn dialogues, test split
removed, a 512-token BPE), a ``tiny`` model, and trains each stage with the project's own loop
(:func:`rxt.training.loop.train`: AdamW, clipping, logging) at the demo's batch sizes. Prints
training tokens/s per stage: real (non-padding) tokens of the inputs, forward + backward +
optimiser step, the median of the log windows after the first (which holds warm-up). Stages
run in order on one model, as in the curriculum, so SMAT trains a model that has seen stages
1-3. ``--compile`` wraps each layer of the named modules in ``torch.compile(dynamic=True)``
(the first log window, which the median skips, holds the compilation). A figure-printing
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_learning import build_data

from rxt.config import RxTConfig
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer
from rxt.training.loop import LOG_FILE, TrainConfig, train
from rxt.training.stages.joint import JointConfig, JointStage, interaction_sequences, text_sequences
from rxt.training.stages.memory import MemoryPretrainConfig, MemoryPretrainStage
from rxt.training.stages.smat import SmatConfig, SmatStage

STAGES = ("joint", "sft", "memory", "smat")


def _stages(tok: RxTTokenizer, train_dialogues, short) -> dict[str, object]:
    pool = train_dialogues[:8000]
    texts = [t for d in pool for turn in d.turns for t in (turn.query, turn.answer)]
    mix = train_dialogues + short
    # The demo's settings (rxt.demo.plan): batch 32 for stages 1-2, 16 dialogues otherwise.
    return {
        "joint": JointStage(text_sequences(texts, tok, 128), tok, JointConfig(batch_size=32)),
        "sft": JointStage(
            interaction_sequences(pool, tok, 128),
            tok,
            JointConfig(batch_size=32, answer_only=True),
            name="sft",
        ),
        "memory": MemoryPretrainStage(mix, tok, MemoryPretrainConfig(batch_size=16)),
        "smat": SmatStage(mix, tok, SmatConfig(batch_size=16, length_groups=4)),
    }


def _windows(log: Path) -> list[float]:
    rates = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if "tokens_per_s" in entry:
            rates.append(entry["tokens_per_s"])
    return rates


def _profile(model: ReactiveTransformer, stage, steps: int) -> None:
    """The top operators by self CPU time over ``steps`` training steps (forward, backward,
    optimiser), to see where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            loss, _ = stage.loss(model, stage.batch(10_000 + i))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--steps", type=int, default=150, help="steps per stage")
    p.add_argument("--window", type=int, default=25, help="steps per log window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="then profile N more steps per stage"
    )
    p.add_argument(
        "--compile",
        nargs="+",
        default=[],
        choices=("decoder", "encoder", "memory_attention"),
        help="torch.compile each layer of these modules (dynamic shapes)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    train_dialogues, short, _ = build_data()
    texts = [
        t for d in train_dialogues[:5000] for turn in d.turns for t in (turn.query, turn.answer)
    ]
    tok = RxTTokenizer.train(texts, vocab_size=512)
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset("tiny", vocab_size=tok.vocab_size))
    model.tokenizer = tok
    for name in args.compile:
        for layer in getattr(model, name).layers:
            layer.compile(dynamic=True)
    stages = _stages(tok, train_dialogues, short)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in STAGES:
            if name not in args.stages:
                continue
            config = TrainConfig(steps=args.steps, warmup_steps=10, log_every=args.window)
            train(model, stages[name], config, Path(tmp) / name, progress=False)
            rates = _windows(Path(tmp) / name / LOG_FILE)[1:]
            results[name] = {
                "tokens_per_s": round(statistics.median(rates)),
                "windows": [round(r) for r in rates],
            }
            threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
            print(
                f"{name:<7} {results[name]['tokens_per_s']:>7,} training tokens/s (median of "
                f"{len(rates)} windows of {args.window} steps, {threads})",
                flush=True,
            )
            if args.profile:
                _profile(model, stages[name], args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "stages": results}, indent=2))


if __name__ == "__main__":
    main()
