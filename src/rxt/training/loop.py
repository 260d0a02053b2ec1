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
installed) and checkpoints.

Checkpoint layout, ``out_dir/checkpoint/`` (never a pickle of arbitrary objects)::

    config.json, model.safetensors (+ tokenizer.json)   model.save_pretrained
    optimizer.pt        optimizer + scheduler state dicts and RNG byte tensors (torch.save;
                        loaded with weights_only=True)
    trainer_state.json  step, stage name, TrainConfig, world size, Python RNG state,
                        log-window sums

Resuming restores all of it, so on CPU N steps straight equal K steps + resume + N − K steps
bit for bit (weights and log lines; only timing fields differ).

Gradient accumulation and data parallelism
------------------------------------------
``TrainConfig.grad_accum = A`` runs A micro-batches per optimiser step, each loss divided by A
before its backward. With W processes, micro-batch a of step s on rank r is
``stage.batch(s * W * A + r * A + a)``, so the effective batch of a step is W · A stage batches
and depends only on W · A: one process with ``grad_accum=2`` sees the same data per step as two
with ``grad_accum=1`` and takes the same step (bit for bit on CPU in the tests, up to float
summation order in general). With W = A = 1 the loop is exactly the single-process loop.

Launch the same training command under torchrun to train data-parallel (DDP)::

    torchrun --nproc_per_node 4 -m rxt train ...        # 4 GPUs of one node (NCCL)
    torchrun --nproc_per_node 2 -m rxt train ...        # 2 CPU processes (gloo)

:func:`train` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins the process group itself
(:mod:`rxt.training.distributed`; NCCL when the model is on CUDA, each rank moving it to
``cuda:LOCAL_RANK``, gloo on CPU). Each step, DDP all-reduces the gradients to their mean over
ranks; gradient clipping and AdamW then run identically on every rank, so the replicas stay
equal. The stage's loss runs as the forward of a DDP-wrapped module (stages call model methods,
not ``model.forward``); DDP registers only the parameters that require grad, so the wrapper is
rebuilt whenever the stage's trainable set changes (staged unfreezing); all but the last
micro-batch run under ``no_sync()``.

Logged metrics are averaged over micro-batches and ranks (``tokens`` summed, ``tokens_per_s``
is the whole job's), so the log equals a single-process log with the same effective batch.
Only rank 0 writes ``log.jsonl``, TensorBoard, the progress bar, checkpoints and
``out_dir/model``; the others wait at a barrier after each write. Every rank reads the
checkpoint on resume, so ``out_dir`` must be on a file system all ranks see (one node: any).
Rank r seeds its RNGs with ``config.seed`` for r = 0 and a seed derived from it otherwise
(different dropout masks per rank; the weights need no common seed, DDP broadcasts rank 0's at
wrap time). Checkpoints store every rank's RNG state (gathered by rank 0: ``rng_ranks`` in
``optimizer.pt``, ``python_rng_ranks`` in ``trainer_state.json``) and the world size; resume
restores each rank's own streams, so it stays exact under DDP, and refuses a different world
size or ``grad_accum`` (the batch indices and RNG streams depend on both).

Models too large for one device: FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2) is the
path, not implemented here. What would change: instead of the DDP wrapper, ``fully_shard``
each block (encoder, decoder and memory-attention layers) and then the root model, and build
the optimiser *after* sharding (parameters become sharded DTensors). The root's hooks run only
for ``model(...)``, while stages call ``encode``/``memory_attention``/``decoder_forward``: those
need ``register_fsdp_forward_method`` (or the ``_StageLoss`` wrapper as the root). Sharding is
per parameter, so frozen and trainable parameters may share a unit (FSDP1's flat ones could not).
``no_sync`` becomes ``set_requires_gradient_sync(False)``; gradient clipping works on the
sharded gradients (``clip_grad_norm_`` over DTensors: the norm is global). Checkpoints change
most: no rank holds the full weights or optimiser state, so rank 0 alone cannot write them.
Use ``torch.distributed.checkpoint`` for the resumable state (every rank saves its shards of
model and optimiser) and gather a full state dict (``get_model_state_dict`` with
``full_state_dict=True, cpu_offload=True``) for ``model.safetensors`` and ``out_dir/model``.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rxt.memory.gate import ResidualGate
from rxt.memory.stm import StmInitializer
from rxt.training import distributed as dist_utils
from rxt.training.distributed import DistributedContext

__all__ = [
    "CheckpointMismatch",
    "Evaluator",
    "Stage",
    "TrainConfig",
    "lr_factor",
    "param_groups",
    "train",
]

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.jsonl"  # the evaluator's results: {"step": n, ...} per evaluation
_STATE_JSON = "trainer_state.json"
_STATE_PT = "optimizer.pt"
_FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed: missing, corrupt, or from a different set-up."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Invalid values raise ``ValueError`` naming the field."""

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

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"TrainConfig.{name}: {message}, got {getattr(self, name)!r}")

        for name in (
            "steps", "warmup_steps", "seed", "log_every", "checkpoint_every", "grad_accum"
        ):  # fmt: skip
            if type(getattr(self, name)) is not int:
                fail(name, "must be an int")
        if self.steps < 1:
            fail("steps", "must be >= 1")
        if self.warmup_steps < 0:
            fail("warmup_steps", "must be >= 0")
        if self.log_every < 1:
            fail("log_every", "must be >= 1")
        if self.checkpoint_every < 0:
            fail("checkpoint_every", "must be >= 0")
        if self.grad_accum < 1:
            fail("grad_accum", "must be >= 1")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(name, "must be a number")
            if not math.isfinite(value) or value < 0:
                fail(name, "must be finite and >= 0")
        if self.lr <= 0:
            fail("lr", "must be > 0")
        if self.min_lr_ratio > 1:
            fail("min_lr_ratio", "must be in [0, 1]")
        betas = self.betas
        if not (
            isinstance(betas, tuple | list)
            and len(betas) == 2
            and all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            fail("betas", "must be two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class Stage(Protocol):
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


# ---------------------------------------------------------------------------------- checkpoints
def _rng_state() -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors, _jsonable(random.getstate())


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _python_state(value: Any) -> Any:
    return tuple(_python_state(v) for v in value) if isinstance(value, list) else value


def _save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    rng: list[tuple[dict[str, torch.Tensor], list[Any]]],
) -> None:
    """Write everything to a temporary directory, then swap it in: a crash mid-write leaves the
    previous checkpoint intact. ``rng``: every rank's :func:`_rng_state`, in rank order; rank 0's
    goes where a single-process run puts it, and a multi-process run also stores the list."""
    final = out_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}.", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        rng_tensors, py_rng = rng[0]
        tensors: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_tensors,
        }
        payload = {**state, "format": _FORMAT, "python_rng": py_rng}
        if len(rng) > 1:
            tensors["rng_ranks"] = [t for t, _ in rng]
            payload["python_rng_ranks"] = [p for _, p in rng]
        torch.save(tensors, tmp / _STATE_PT)
        (tmp / _STATE_JSON).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        old = out_dir / f".{CHECKPOINT_DIR}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# TrainConfig fields added after the first checkpoints were written: a checkpoint without one
# was written with its default.
_NEW_FIELDS = {"grad_accum": 1}


_HF_BOOKKEEPING = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def _config_content(model: nn.Module) -> Any:
    """A model's config for comparison. A ``transformers`` config also records where and how it
    was loaded (path, library version, dtype): a fresh model would never equal its checkpoint."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        return config
    return {k: v for k, v in to_dict().items() if k not in _HF_BOOKKEEPING}


def _load_checkpoint(
    out_dir: Path,
    model: nn.Module,
    stage_name: str,
    config: TrainConfig,
    context: DistributedContext,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and read ``out_dir/checkpoint``; load the weights into ``model``. Returns the JSON
    state and the torch.save payload, with this rank's RNG states under ``"rng"`` and
    ``"python_rng"``."""
    directory = out_dir / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointMismatch(f"cannot resume: no checkpoint at {str(directory)!r}")
    try:
        state = json.loads((directory / _STATE_JSON).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"unknown {_STATE_JSON} format")
        step = state["step"]
        saved_config = state["config"]
        if type(step) is not int or step < 0 or not isinstance(saved_config, dict):
            raise ValueError(f"bad step or config in {_STATE_JSON}")
        payload = torch.load(directory / _STATE_PT, map_location="cpu", weights_only=True)
        for key in ("optimizer", "scheduler", "rng"):
            if key not in payload:
                raise ValueError(f"{_STATE_PT} lacks {key!r}")
        world = state.setdefault("world_size", 1)  # written by a single process before DDP
        if type(world) is not int or world < 1:
            raise ValueError(f"bad world_size in {_STATE_JSON}")
        if world > 1 and (
            len(payload.get("rng_ranks", ())) != world
            or len(state.get("python_rng_ranks", ())) != world
        ):
            raise ValueError(f"the per-rank RNG states of {world} processes are incomplete")
        loaded = type(model).from_pretrained(directory)
    except CheckpointMismatch:
        raise
    except Exception as err:  # missing file, bad JSON, truncated tensors, ...
        raise CheckpointMismatch(
            f"cannot resume: checkpoint {str(directory)!r} is unreadable ({err})"
        ) from err

    if state.get("stage") != stage_name:
        raise CheckpointMismatch(
            f"cannot resume: checkpoint is from stage {state.get('stage')!r}, not {stage_name!r}"
        )
    current = config.to_json()
    saved_config = {**_NEW_FIELDS, **saved_config}
    diff = sorted(
        k for k in current.keys() | saved_config.keys()
        if k != "steps" and current.get(k) != saved_config.get(k)
    )  # fmt: skip
    if diff:
        detail = ", ".join(f"{k}: {saved_config.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise CheckpointMismatch(
            f"cannot resume: TrainConfig differs from the checkpoint's ({detail}); only `steps` "
            "may change on resume"
        )
    if state["world_size"] != context.world_size:
        raise CheckpointMismatch(
            f"cannot resume: checkpoint was written by {state['world_size']} process(es), this "
            f"run has {context.world_size}; the world size fixes which batches each step sees "
            "and each rank's RNG stream, so it may not change on resume"
        )
    if _config_content(model) != _config_content(loaded):
        raise CheckpointMismatch("cannot resume: the model's config differs from the checkpoint's")
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())
    if context.world_size > 1:
        payload["rng"] = payload["rng_ranks"][context.rank]
        state["python_rng"] = state["python_rng_ranks"][context.rank]
    return state, payload


# ---------------------------------------------------------------------------------- logging
class _Logger:
    def __init__(self, out_dir: Path, start: int, total: int, progress: bool) -> None:
        self.path = out_dir / LOG_FILE
        self.bar = None
        self.plain = False
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                self.plain = True
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
        except ImportError:  # tensorboard is optional
            pass

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
        elif self.plain:
            print(
                f"step {entry['step']}: loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                f"grad_norm {entry['grad_norm']:.3f} tokens/s {entry['tokens_per_s']:.0f}",
                file=sys.stderr,
            )
        if self.tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step (written by a run that died after it)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


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


class _StageLoss(nn.Module):
    """``stage.loss(model, batch)`` as a module's forward. DistributedDataParallel syncs the
    gradients of a backward only when the forward ran through its wrapper, and stages call model
    methods (``encode``, ``memory_attention``, ``decoder_forward``), not ``model.forward``."""

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage_loss = stage.loss

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.stage_loss(self.model, batch)


def _data_parallel(model: nn.Module, stage: Stage, context: DistributedContext) -> nn.Module:
    """A DDP wrapper over the parameters that require grad *now* (DDP registers those at
    construction only, so the loop builds a new one whenever the trainable set changes).

    ``find_unused_parameters=True`` always: a trainable parameter may get no gradient from a
    batch (MoE experts no token reached, the joint stage's MLM head on a batch without masked
    tokens, a module a stage does not call); without it DDP fails at the next step. Globally
    unused parameters keep ``grad=None``, so AdamW skips them as in one process. The cost is
    one walk of the autograd graph per forward: about 5 ms a SMAT step on 2 gloo CPU processes
    (~5% of a ``tiny``-preset step, ~1% of a ``small`` one); DDP also warns once per wrapper
    when a step happens to use every parameter. Buffers are not re-sent every forward: the
    model's are constant (RoPE tables)."""
    from torch.nn.parallel import DistributedDataParallel

    options = inspect.signature(DistributedDataParallel).parameters
    # torch >= 2.13 renamed the option (and still syncs buffers once at construction).
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(
        _StageLoss(model, stage),
        device_ids=[context.device.index] if context.device.type == "cuda" else None,
        find_unused_parameters=True,
        **{buffers: False},
    )


def _release(wrapper: nn.Module) -> None:
    """Take a DDP wrapper's gradient hooks off the model's parameters now (its reducer's
    destructor does the same, but only once the wrapper is collected)."""
    remove = getattr(wrapper, "_remove_autograd_hooks", None)
    if remove is not None:
        remove()


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 uses ``seed`` itself (a single process is rank 0), every other rank its own
    stream (dropout masks must differ between ranks, as between micro-batches)."""
    return seed if rank == 0 else (seed * 0x9E3779B97F4A7C15 + rank) % (1 << 63)


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
) -> dict[str, Any]:
    """Train ``model`` on ``stage`` for ``config.steps`` optimiser steps (in total, counting the
    steps of a resumed checkpoint). Returns the last log entry: ``step``, ``lr`` (of that
    step), ``loss``, ``grad_norm`` (before clipping) and the stage's metrics, each averaged over
    the log window (and over micro-batches and ranks); ``tokens`` summed over the window (and
    over micro-batches and ranks) and ``tokens_per_s``. The model is left in eval mode and also
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
    return _train(model, stage, config, Path(out_dir), resume, progress, context, evaluator)


def _train(
    model: nn.Module,
    stage: Stage,
    config: TrainConfig,
    out_dir: Path,
    resume: bool,
    progress: bool,
    context: DistributedContext,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE
    eval_path = out_dir / EVAL_FILE
    main = context.is_main
    world, accum = context.world_size, config.grad_accum

    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
    )
    factor: Callable[[int], float] = lambda s: lr_factor(s, config)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    start = 0
    window: dict[str, float] = {}
    if resume:
        state, payload = _load_checkpoint(out_dir, model, stage.name, config, context)
        start = state["step"]
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng"]["torch"])
        if torch.cuda.is_available():
            cuda = [payload["rng"][k] for k in sorted(payload["rng"]) if k.startswith("cuda")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        random.setstate(_python_state(state["python_rng"]))
        window = {k: float(v) for k, v in state.get("window", {}).items()}
        if main:
            _truncate_log(log_path, start)
            _truncate_log(eval_path, start)
    else:
        seed = _rank_seed(config.seed, context.rank)
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
        rng = dist_utils.all_gather_objects(context, _rng_state())
        if main:
            _save_checkpoint(out_dir, model, optimizer, scheduler, state, rng)
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

    logger = _Logger(out_dir, start, config.steps, progress) if main else None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    last: dict[str, Any] = {}
    wrapper: nn.Module | None = None
    wrapped: tuple[int, ...] = ()
    model.train()
    if not resume:
        evaluate(0)
    clock = time.perf_counter()
    try:
        for step in range(start, config.steps):
            params = _set_trainable(model, stage.trainable(model, step))
            if context.distributed and tuple(map(id, params)) != wrapped:
                if wrapper is not None:  # staged unfreezing: DDP must see the new trainable set
                    _release(wrapper)
                    wrapper = None
                    gc.collect()  # free the old reducer's gradient-sized buckets first
                wrapper, wrapped = _data_parallel(model, stage, context), tuple(map(id, params))
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            finite = True
            for micro in range(accum):
                batch = stage.batch((step * world + context.rank) * accum + micro)
                sync = wrapper is None or micro == accum - 1
                with nullcontext() if sync else wrapper.no_sync():  # type: ignore[union-attr]
                    with _autocast(_model_device(model)):
                        if wrapper is None:
                            loss, metrics = stage.loss(model, batch)
                        else:
                            loss, metrics = wrapper(batch)
                    if not torch.isfinite(loss.detach()).item():
                        if wrapper is None:
                            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
                        finite = False  # every rank must still join the gradient all-reduce
                    (loss if accum == 1 else loss / accum).backward()
                for key, value in {"loss": loss.item(), **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            means = _reduce_metrics(context, sums, finite, step, accum * world)
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
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
            if done == config.steps or (
                config.checkpoint_every and done % config.checkpoint_every == 0
            ):
                checkpoint(done)
    finally:
        if logger is not None:
            logger.close()
        if wrapper is not None:  # the model leaves with no DDP hooks on its parameters
            _release(wrapper)
            wrapper = None
        for p, flag in flags:  # the stage's freezing is for training only
            p.requires_grad_(flag)

    model.eval()
    if main:
        model.save_pretrained(out_dir / "model")
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
