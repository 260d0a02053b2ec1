"""The training loop's resumable checkpoint: what is written, how, and what a resume accepts.

Layout, ``out_dir/checkpoint/`` (never a pickle of arbitrary objects)::

    config.json, model.safetensors (+ tokenizer.json)   model.save_pretrained
    optimizer.pt        optimizer + scheduler state dicts and RNG byte tensors (torch.save;
                        loaded with weights_only=True)
    trainer_state.json  step, stage name, TrainConfig, world size, Python RNG state,
                        log-window sums

Under data parallelism rank 0 writes it alone, with every rank's RNG state (``rng_ranks`` in
``optimizer.pt``, ``python_rng_ranks`` in ``trainer_state.json``); every rank reads it on resume
and takes its own streams back (:mod:`rxt.training.loop`). Under FSDP2 the weights and the
optimiser state are first gathered whole to rank 0 (:mod:`rxt.training.sharding`), so the files
are the same whichever ``TrainConfig.parallel`` wrote them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rxt.training.distributed import DistributedContext

if TYPE_CHECKING:  # loop.py imports this module: the config type is for annotations only
    from rxt.training.loop import TrainConfig

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointMismatch",
    "load_checkpoint",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "save_model",
]

CHECKPOINT_DIR = "checkpoint"
_STATE_JSON = "trainer_state.json"
_STATE_PT = "optimizer.pt"
_FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed: missing, corrupt, or from a different set-up."""


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], list[Any]]:
    """This process's RNG streams: torch's (and each CUDA device's) as byte tensors for
    ``optimizer.pt``, Python's as JSON for ``trainer_state.json``."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors, _jsonable(random.getstate())


def restore_rng_state(tensors: dict[str, torch.Tensor], python_rng: Any) -> None:
    """Put back the streams :func:`rng_state` captured (as :func:`load_checkpoint` returns
    them). CUDA states are restored only onto the same number of devices they came from."""
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_python_state(python_rng))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _python_state(value: Any) -> Any:
    # JSON turned random.getstate()'s nested tuples into lists; random.setstate wants tuples.
    return tuple(_python_state(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------- writing
def save_model(model: nn.Module, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """``model.save_pretrained(directory)``, with ``weights`` (full, gathered from shards) in
    place of the model's own tensors when given."""
    if weights is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, state_dict=weights)


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    weights: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    rng: list[tuple[dict[str, torch.Tensor], list[Any]]],
) -> None:
    """Write everything to a temporary directory, then swap it in: a crash mid-write leaves the
    previous checkpoint intact. ``weights``: as for :func:`save_model`; ``optimizer_state``: a
    full ``optimizer.state_dict()``. ``rng``: every rank's :func:`rng_state`, in rank order; rank
    0's goes where a single-process run puts it, and a multi-process run also stores the list."""
    final = out_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}.", dir=out_dir))
    try:
        save_model(model, tmp, weights)
        rng_tensors, py_rng = rng[0]
        tensors: dict[str, Any] = {
            "optimizer": optimizer_state,
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


# ---------------------------------------------------------------------------------- reading
# TrainConfig fields added after the first checkpoints were written: a checkpoint without one
# was written with its default.
_NEW_FIELDS = {"grad_accum": 1, "parallel": "ddp"}
# Fields a resume may change: the files are the same for every `parallel`, and only the batch
# indices and RNG streams (world size, grad_accum) must stay.
_RESUMABLE = ("steps", "parallel")


_HF_BOOKKEEPING = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def _config_content(model: nn.Module) -> Any:
    """A model's config for comparison. A ``transformers`` config also records where and how it
    was loaded (path, library version, dtype): a fresh model would never equal its checkpoint."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        return config
    return {k: v for k, v in to_dict().items() if k not in _HF_BOOKKEEPING}


def load_checkpoint(
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
        if k not in _RESUMABLE and current.get(k) != saved_config.get(k)
    )  # fmt: skip
    if diff:
        detail = ", ".join(f"{k}: {saved_config.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise CheckpointMismatch(
            f"cannot resume: TrainConfig differs from the checkpoint's ({detail}); only `steps` "
            "and `parallel` may change on resume"
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
