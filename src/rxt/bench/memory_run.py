"""One run of the state-bytes benchmark: build a system, train it, score it.

Every system trains with the project's one loop (:func:`rxt.training.loop.train`) on the same
dialogue stream, in two parts of the same lengths for all: ``warmup_steps`` on the task's
``warmup`` split (the shortest dialogues), then ``steps`` on ``train``. RxT trains with SMAT
(:class:`~rxt.training.stages.smat.SmatStage`, whole gradient horizon); every peer with the
stateless stage in ``"full"`` mode (:class:`~rxt.training.stages.stateless.StatelessStage`),
which takes SMAT's batch ``i`` at step ``i`` and the same answer tokens as targets. Same
optimiser (AdamW), schedule (linear warm-up over 10% of the steps, then cosine), clipping and
batch size for all; the learning rate is the run's (the grid sweeps it per system).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rxt.bench.memory_score import score_dialogues, summarise
from rxt.bench.memory_systems import ModelShape, build_system
from rxt.bench.memory_tasks import TaskData
from rxt.training.loop import TrainConfig, train
from rxt.training.stages.smat import SmatConfig, SmatStage
from rxt.training.stages.stateless import StatelessStage

__all__ = ["RunSpec", "run_one"]


@dataclass(frozen=True)
class RunSpec:
    """Which run: task, system, state target (elements), learning rate, seed, and steps."""

    task: str
    system: str
    state: int
    lr: float
    seed: int
    steps: int
    warmup_steps: int
    batch_size: int = 16

    @property
    def id(self) -> str:
        return f"{self.task}/{self.system}/s{self.state}/lr{self.lr:g}/seed{self.seed}"


def _stage(system_is_rxt: bool, dialogues, tokenizer, spec: RunSpec):
    if system_is_rxt:
        return SmatStage(
            dialogues, tokenizer, SmatConfig(batch_size=spec.batch_size), seed=spec.seed
        )
    return StatelessStage(dialogues, tokenizer, "full", batch_size=spec.batch_size, seed=spec.seed)


def _turn_lengths(task: TaskData, split: str) -> list[tuple[int, int]]:
    """Mean prompt and answer tokens of turn t over ``split``, for t up to its longest dialogue."""
    tok, sums = task.tokenizer, {}
    for d in task.splits[split]:
        for t, turn in enumerate(d.turns):
            e = tok.encode_interaction(turn.query, turn.answer)
            answer = sum(e.loss_mask)
            q, a, n = sums.get(t, (0, 0, 0))
            sums[t] = (q + len(e.input_ids) - answer, a + answer, n + 1)
    return [(round(q / n), round(a / n)) for t, (q, a, n) in sorted(sums.items())]


def run_one(spec: RunSpec, task: TaskData, shape: ModelShape, out_dir: str | Path) -> dict:
    """Train and score one run; returns its record: ``valid`` and ``test`` scores
    (:func:`rxt.bench.memory_score.summarise`), state, parameters and per-turn cost."""
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    system = build_system(
        spec.system,
        state_target=spec.state,
        vocab_size=task.tokenizer.vocab_size,
        shape=shape,
        seed=spec.seed,
    )
    model = system.model
    start = time.perf_counter()
    logs = {}
    parts = (("warmup", spec.warmup_steps), ("main", spec.steps))
    for name, steps in parts:
        dialogues = task.splits["warmup" if name == "warmup" else "train"]
        if steps == 0 or not dialogues:
            continue
        config = TrainConfig(
            steps=steps,
            lr=spec.lr,
            warmup_steps=max(1, steps // 10),
            log_every=max(1, min(50, steps)),
            seed=spec.seed,
        )
        stage = _stage(system.is_rxt, dialogues, task.tokenizer, spec)
        logs[name] = train(model, stage, config, out_dir / name, progress=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = {
        split: summarise(score_dialogues(model, task.tokenizer, task.splits[split]))
        for split in ("valid", "test")
    }
    score_s = time.perf_counter() - start
    turns = _turn_lengths(task, "test")
    flops = system.turn_flops(turns)
    tokens, kv = 0, []
    for q, a in turns:
        tokens += q + a
        kv.append(system.kv_elements(tokens) * system.dtype_bytes)
    return {
        "id": spec.id,
        "task": spec.task,
        "system": spec.system,
        "state_target": spec.state,
        "lr": spec.lr,
        "seed": spec.seed,
        "steps": spec.steps,
        "warmup_steps": spec.warmup_steps,
        "batch_size": spec.batch_size,
        "state_elements": system.state_elements,
        "state_bytes": system.state_elements * system.dtype_bytes,
        "state_grows": system.grows,
        "state_bytes_by_turn": kv,
        "parameters": system.parameters,
        "settings": system.settings,
        "turn_tokens": turns,
        "flops_by_turn": flops,
        "train_s": round(train_s, 1),
        "score_s": round(score_s, 1),
        "final_loss": {k: round(v.get("loss", float("nan")), 4) for k, v in logs.items()},
        **scores,
    }
