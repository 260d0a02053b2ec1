"""One training loop for every curriculum stage (``rxt.md`` §6).

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
    trainer_state.json  step, stage name, TrainConfig, Python RNG state, log-window sums

Resuming restores all of it, so on CPU N steps straight equal K steps + resume + N − K steps
bit for bit (weights and log lines; only timing fields differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rxt.memory.gate import ResidualGate
from rxt.memory.stm import StmInitializer

__all__ = ["CheckpointMismatch", "Stage", "TrainConfig", "lr_factor", "param_groups", "train"]

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.jsonl"
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

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"TrainConfig.{name}: {message}, got {getattr(self, name)!r}")

        for name in ("steps", "warmup_steps", "seed", "log_every", "checkpoint_every"):
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
) -> None:
    """Write everything to a temporary directory, then swap it in: a crash mid-write leaves the
    previous checkpoint intact."""
    final = out_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}.", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        rng_tensors, py_rng = _rng_state()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_tensors,
            },
            tmp / _STATE_PT,
        )
        payload = {**state, "format": _FORMAT, "python_rng": py_rng}
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


def _load_checkpoint(
    out_dir: Path, model: nn.Module, stage_name: str, config: TrainConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and read ``out_dir/checkpoint``; load the weights into ``model``. Returns the JSON
    state and the torch.save payload."""
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
    if getattr(model, "config", None) != getattr(loaded, "config", None):
        raise CheckpointMismatch("cannot resume: the model's config differs from the checkpoint's")
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())
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


def train(
    model: nn.Module,
    stage: Stage,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` on ``stage`` for ``config.steps`` optimiser steps (in total, counting the
    steps of a resumed checkpoint). Returns the last log entry: ``step``, ``lr`` (of that
    step), ``loss``, ``grad_norm`` (before clipping) and the stage's metrics, each averaged over
    the log window; ``tokens`` summed over the window and ``tokens_per_s``. The model is left in
    eval mode and also saved to ``out_dir/model`` (with its tokenizer, if attached)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE

    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
    )
    factor: Callable[[int], float] = lambda s: lr_factor(s, config)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    start = 0
    window: dict[str, float] = {}
    if resume:
        state, payload = _load_checkpoint(out_dir, model, stage.name, config)
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
        _truncate_log(log_path, start)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        log_path.unlink(missing_ok=True)

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "stage": stage.name,
            "config": config.to_json(),
            "window": window,
        }
        _save_checkpoint(out_dir, model, optimizer, scheduler, state)

    logger = _Logger(out_dir, start, config.steps, progress)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    last: dict[str, Any] = {}
    clock = time.perf_counter()
    model.train()
    try:
        for step in range(start, config.steps):
            params = _set_trainable(model, stage.trainable(model, step))
            optimizer.zero_grad(set_to_none=True)
            batch = stage.batch(step)
            with _autocast(next(model.parameters()).device):
                loss, metrics = stage.loss(model, batch)
            if not torch.isfinite(loss.detach()).item():
                raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
            loss.backward()
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()

            done = step + 1
            sums = {"loss": loss.item(), "grad_norm": grad_norm, **metrics, "_n": 1.0}
            for key, value in sums.items():
                window[key] = window.get(key, 0.0) + float(value)
            logger.step()
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                n = window.pop("_n")
                tokens = window.get("tokens", 0.0)
                last = {"step": done, "lr": lr}
                last.update({k: v / n for k, v in window.items() if k != "tokens"})
                last["tokens"] = int(tokens)
                last["tokens_per_s"] = tokens / max(now - clock, 1e-9)
                logger.record(last)
                window = {}
                clock = now
            if done == config.steps or (
                config.checkpoint_every and done % config.checkpoint_every == 0
            ):
                checkpoint(done)
    finally:
        logger.close()
        for p, flag in flags:  # the stage's freezing is for training only
            p.requires_grad_(flag)

    if not last and log_path.exists():  # resumed at or past `steps`: nothing left to do
        lines = log_path.read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
    model.eval()
    model.save_pretrained(out_dir / "model")
    return last
