"""One training loop for every curriculum stage.

The paper's training curriculum (Filipek, arXiv:2510.03561): every stage trains through it.

A *stage* supplies three things and nothing else:

- ``trainable(model, step)``: the parameters that learn at ``step`` (may grow with the step, for
  staged unfreezing);
- ``batch(index)``: the batch with global index ``index`` — a pure function of the index, so a
  resumed run just continues from the saved index and no iterator state needs saving;
- ``loss(model, batch)``: ``(loss, metrics)``; ``metrics["tokens"]`` (trained tokens, padding
  excluded), when present, drives the tokens/s figure.

The loop owns the optimiser (AdamW, built once over *all* parameters so that unfreezing never
resets optimiser state; frozen parameters simply get no gradient and AdamW skips them), the
learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio * lr``), gradient
clipping, bf16 autocast on CUDA, logging (``log.jsonl``, a progress bar, TensorBoard when
installed; :mod:`rxt.training.log`) and checkpoints (``out_dir/checkpoint/``, layout in
:mod:`rxt.training.checkpoint`). DDP and FSDP2 are :mod:`rxt.training.parallel`.

Resuming restores the whole checkpoint, so on CPU N steps straight equal K steps + resume
+ N − K steps bit for bit (weights and log lines; only timing fields differ).

Gradient accumulation and data parallelism
------------------------------------------
``TrainConfig.grad_accum = A`` runs A micro-batches per optimiser step, each loss divided by A
before its backward. With W processes, micro-batch a of step s on rank r is
``stage.batch(s * W * A + r * A + a)``, so the effective batch of a step is W · A stage batches
and depends only on W · A: one process with ``grad_accum=2`` sees the same data per step as two
with ``grad_accum=1`` and takes the same step (bit for bit on CPU in the tests, up to float
summation order in general). With W = A = 1 the loop is exactly the single-process loop.

Launch the same training command under torchrun to train data-parallel::

    torchrun --nproc_per_node 4 -m rxt train ...        # 4 GPUs of one node (NCCL)
    torchrun --nproc_per_node 2 -m rxt train ...        # 2 CPU processes (gloo)

:func:`train` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins the process group itself
(:mod:`rxt.training.distributed`; NCCL when the model is on CUDA, each rank moving it to
``cuda:LOCAL_RANK``, gloo on CPU). ``TrainConfig.parallel`` picks how
(:mod:`rxt.training.parallel`). ``"ddp"`` (the default) replicates the model and all-reduces
the gradients to their mean each step, so clipping and AdamW run identically on every rank and
the replicas stay equal; the stage's loss runs as the forward of a DDP-wrapped module, rebuilt
whenever the stage's trainable set changes (staged unfreezing); all but the last micro-batch
run under ``no_sync()``. ``"fsdp"`` shards parameters, gradients and optimiser state over the
ranks (FSDP2, :mod:`rxt.training.sharding`: models whose training state does not fit one
device); it cannot run an evaluator and leaves the model sharded. With one process both are
the single-process loop.

Logged metrics are averaged over micro-batches and ranks (``tokens`` summed, ``tokens_per_s``
is the whole job's), so the log equals a single-process log with the same effective batch.
Only rank 0 writes ``log.jsonl``, TensorBoard, the progress bar, checkpoints and
``out_dir/model``; the others wait at a barrier after each write. Every rank reads the
checkpoint on resume, so ``out_dir`` must be on a file system all ranks see (one node: any).
Rank r seeds its RNGs with ``config.seed`` for r = 0 and a seed derived from it otherwise
(different dropout masks per rank; the weights need no common seed, rank 0's are broadcast at
wrap time). Checkpoints store every rank's RNG state (gathered by rank 0: ``rng_ranks`` in
``optimizer.pt``, ``python_rng_ranks`` in ``trainer_state.json``) and the world size; resume
restores each rank's own streams, so it stays exact, and refuses a different world size or
``grad_accum`` (the batch indices and RNG streams depend on both). A checkpoint holds full
weights and optimiser state under either ``parallel``, and may resume under the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rxt.model.memory.gate import ResidualGate
from rxt.model.memory.stm import StmInitializer
from rxt.training import distributed as dist_utils

# CHECKPOINT_DIR, CheckpointMismatch, EVAL_FILE and LOG_FILE are imported from here by users:
# re-exported (the `as` form) from the modules that now own them.
from rxt.training.checkpoint import CHECKPOINT_DIR as CHECKPOINT_DIR
from rxt.training.checkpoint import CheckpointMismatch as CheckpointMismatch
from rxt.training.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_model,
)
from rxt.training.distributed import DistributedContext
from rxt.training.log import EVAL_FILE as EVAL_FILE
from rxt.training.log import LOG_FILE as LOG_FILE
from rxt.training.log import Logger, truncate_log
from rxt.training.parallel import PARALLEL, parallelism, rank_seed
from rxt.validated import Validated

__all__ = [
    "CheckpointMismatch",
    "Evaluator",
    "Stage",
    "TrainConfig",
    "lr_factor",
    "param_groups",
    "train",
]


@dataclass(frozen=True)
class TrainConfig(Validated):
    """Optimisation settings. Invalid values raise ``ConfigError`` (a ``ValueError``) naming the
    field (``TrainConfig.lr: ...``); types are checked from the hints (:mod:`rxt.validated`)."""

    error_prefix = "TrainConfig."

    steps: int
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0  # linear warm-up, then cosine decay to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    seed: int = 0  # seeds torch and Python RNGs at the start of a fresh run (dropout, ...)
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    grad_accum: int = 1  # micro-batches per optimiser step, per process (module docstring)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards)

    def validate(self) -> None:
        self.require("steps", self.steps >= 1, "must be >= 1")
        self.require("warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        self.require("log_every", self.log_every >= 1, "must be >= 1")
        self.require("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0")
        self.require("grad_accum", self.grad_accum >= 1, "must be >= 1")
        self.require("parallel", self.parallel in PARALLEL, f"must be one of {PARALLEL}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            self.require(name, getattr(self, name) >= 0, "must be >= 0")
        self.require("lr", self.lr > 0, "must be > 0")
        self.require("min_lr_ratio", self.min_lr_ratio <= 1, "must be in [0, 1]")
        self.require("betas", all(0 <= b < 1 for b in self.betas), "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class Stage(Protocol):
    """Optional attribute ``varying_calls``: names of the model's modules that a step may call
    a batch-dependent number of times (``("memory_attention",)``); FSDP2 shards the layers of
    the others one by one, and keeps these, or all if the attribute is missing, in one unit
    (:mod:`rxt.training.sharding`)."""

    name: str

    def trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]: ...

    def batch(self, index: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


class Evaluator(Protocol):
    """Scores the model during training (a learning curve): called in eval mode at step 0 of a
    fresh run, every ``every`` steps and at the last step, on the main process only, with the
    RNG state saved and restored around it (a run with an evaluator trains exactly as one
    without). Its dict is logged to ``out_dir/eval.jsonl`` with the step."""

    every: int

    def __call__(self, model: nn.Module) -> dict[str, Any]: ...


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` for 0-based ``step``: linear warm-up over ``warmup_steps``
    (reaching 1 at the last warm-up step), then cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only. Excluded: vectors (norms, biases),
    embeddings (a decayed row shrinks whenever its token is rare), memory gates and a learned
    STM_0 (their scale *is* their meaning). Order is the model's parameter order, so a rebuilt
    optimiser maps saved state onto the same parameters."""
    exempt: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | ResidualGate | StmInitializer):
            exempt.update(id(p) for p in module.parameters())
    decay, plain = [], []
    for p in model.parameters():  # deduplicated: a tied lm_head is the embedding
        (decay if p.dim() >= 2 and id(p) not in exempt else plain).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------- the loop
def _set_trainable(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    chosen = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the stage made no parameter trainable")
    return params


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()  # CPU (and GPUs without bf16) stay in full precision


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: nn.Module,
    stage: Stage,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    evaluator: Evaluator | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``stage`` for ``config.steps`` optimiser steps (in total, counting the
    steps of a resumed checkpoint). ``stop_at``: end this run after that step instead, with a
    checkpoint and without ``out_dir/model`` (the stage is unfinished); ``resume=True``
    continues it. The schedule stays the whole stage's, so a run stopped and resumed trains
    exactly as an unbroken one (tested): one stage can be split over two workers.

    Returns the last log entry: ``step``, ``lr`` (of that step), ``loss``, ``grad_norm``
    (before clipping) and the stage's metrics, each averaged over the log window (and over
    micro-batches and ranks); ``tokens`` summed over the window (and over micro-batches and
    ranks) and ``tokens_per_s``. The model is left in eval mode and also
    saved to ``out_dir/model`` (with its tokenizer, if attached).

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this with the same arguments and
    trains data-parallel (module docstring); a CUDA model moves to ``cuda:LOCAL_RANK``. Every
    rank returns the same entry (only ``tokens_per_s`` differs)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    context = dist_utils.init_distributed(_model_device(model))  # kept for the process's life
    if context.distributed and _model_device(model) != context.device:
        model.to(context.device)
    if evaluator is not None and (type(evaluator.every) is not int or evaluator.every < 1):
        raise ValueError(f"evaluator.every: must be an int >= 1, got {evaluator.every!r}")
    if evaluator is not None and config.parallel == "fsdp" and context.distributed:
        raise ValueError(
            "TrainConfig.parallel: 'fsdp' cannot run an evaluator (it runs on rank 0 alone, "
            "and under FSDP no rank holds the whole model); score out_dir/model afterwards"
        )
    if stop_at is not None and not (type(stop_at) is int and 1 <= stop_at < config.steps):
        raise ValueError(f"stop_at: must be an int in [1, steps={config.steps}), got {stop_at!r}")
    end = config.steps if stop_at is None else stop_at
    return _train(model, stage, config, Path(out_dir), resume, progress, context, evaluator, end)


def _train(
    model: nn.Module,
    stage: Stage,
    config: TrainConfig,
    out_dir: Path,
    resume: bool,
    progress: bool,
    context: DistributedContext,
    evaluator: Evaluator | None,
    end: int,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE
    eval_path = out_dir / EVAL_FILE
    main = context.is_main
    world, accum = context.world_size, config.grad_accum

    if resume:  # the weights go into the model before it is sharded
        state, payload = load_checkpoint(out_dir, model, stage.name, config, context)
    parallel = parallelism(config.parallel, model, stage, context)
    optimizer = torch.optim.AdamW(  # after sharding: FSDP2 replaces the parameters
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
    )
    factor: Callable[[int], float] = lambda s: lr_factor(s, config)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    start = 0
    window: dict[str, float] = {}
    if resume:
        start = state["step"]
        parallel.load_optimizer_state(optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        restore_rng_state(payload["rng"], state["python_rng"])
        window = {k: float(v) for k, v in state.get("window", {}).items()}
        if main:
            truncate_log(log_path, start)
            truncate_log(eval_path, start)
    else:
        seed = rank_seed(config.seed, context.rank)
        torch.manual_seed(seed)
        random.seed(seed)
        if main:
            log_path.unlink(missing_ok=True)
            eval_path.unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "stage": stage.name,
            "config": config.to_json(),
            "world_size": world,
            "window": window,
        }
        rng = dist_utils.all_gather_objects(context, rng_state())
        weights, optim = parallel.model_state(), parallel.optimizer_state(optimizer)  # all ranks
        if main:
            save_checkpoint(out_dir, model, weights, optim, scheduler, state, rng)
        dist_utils.barrier(context)  # every rank leaves with the checkpoint on disk

    def evaluate(step: int) -> None:
        if evaluator is None or not main:
            return
        device = _model_device(model)
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = evaluator(model)
        model.train()
        with open(eval_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **result}) + "\n")

    logger = Logger(out_dir, start, config.steps, progress) if main else None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    last: dict[str, Any] = {}
    model.train()
    if not resume:
        evaluate(0)
    clock = time.perf_counter()
    try:
        for step in range(start, end):
            params = _set_trainable(model, stage.trainable(model, step))
            loss_fn = parallel.loss_fn(params)
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            finite = True
            for micro in range(accum):
                batch = stage.batch((step * world + context.rank) * accum + micro)
                with parallel.micro_batch(last=micro == accum - 1):
                    with _autocast(_model_device(model)):
                        loss, metrics = loss_fn(batch)
                    if not torch.isfinite(loss.detach()).item():
                        if not context.distributed:
                            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
                        finite = False  # every rank must still join the gradient reduction
                    (loss if accum == 1 else loss / accum).backward()
                for key, value in {"loss": loss.item(), **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            means = _reduce_metrics(context, sums, finite, step, accum * world)
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = parallel.clip_grad_norm(params, max_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()

            done = step + 1
            rest = {k: v for k, v in means.items() if k != "loss"}
            values = {"loss": means["loss"], "grad_norm": grad_norm, **rest, "_n": 1.0}
            for key, value in values.items():
                window[key] = window.get(key, 0.0) + value
            if logger is not None:
                logger.step()
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                n = window.pop("_n")
                tokens = window.get("tokens", 0.0)
                last = {"step": done, "lr": lr}
                last.update({k: v / n for k, v in window.items() if k != "tokens"})
                last["tokens"] = int(tokens)
                last["tokens_per_s"] = tokens / max(now - clock, 1e-9)
                if logger is not None:
                    logger.record(last)
                window = {}
                clock = now
            if evaluator is not None and (done % evaluator.every == 0 or done == config.steps):
                begin = time.perf_counter()
                evaluate(done)
                clock += time.perf_counter() - begin  # evaluation is not training throughput
            if done == end or (config.checkpoint_every and done % config.checkpoint_every == 0):
                checkpoint(done)
    finally:
        if logger is not None:
            logger.close()
        parallel.close()  # the model leaves with no DDP hooks on its parameters
        for p, flag in flags:  # the stage's freezing is for training only
            p.requires_grad_(flag)

    model.eval()
    if end == config.steps:  # else stopped early (stop_at): the checkpoint is the result
        weights = parallel.model_state()  # every rank: FSDP gathers the shards
        if main:
            save_model(model, out_dir / "model", weights)
        dist_utils.barrier(context)
    if not last and log_path.exists():  # resumed at or past `steps`: nothing left to do
        lines = log_path.read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
    return last


def _reduce_metrics(
    context: DistributedContext, sums: dict[str, float], finite: bool, step: int, count: int
) -> dict[str, float]:
    """One step's metrics over its ``count`` micro-batches (all ranks): each averaged, except
    ``tokens``, summed. Raises on every rank if any rank's loss was not finite."""
    keys = list(sums)
    if context.distributed:
        signature = float(zlib.crc32("\0".join(keys).encode()))
        top, neg_low, bad = dist_utils.all_reduce_max(
            context, [signature, -signature, 0.0 if finite else 1.0]
        )
        if bad:
            raise FloatingPointError(f"loss is not finite at step {step + 1} (on some rank)")
        if top != -neg_low:
            raise ValueError(f"the stage's metric names differ between ranks at step {step + 1}")
        totals = dict(
            zip(keys, dist_utils.all_reduce_sum(context, list(sums.values())), strict=True)
        )
    else:
        totals = sums
    return {k: v if k == "tokens" else v / count for k, v in totals.items()}
