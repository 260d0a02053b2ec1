"""Process-group plumbing for data-parallel training (used by :func:`rxt.training.loop.train`).

``torchrun --nproc_per_node N ...`` starts N processes and tells each its place through the
environment: ``RANK`` (0..WORLD_SIZE-1 over all nodes), ``WORLD_SIZE``, ``LOCAL_RANK`` (the
process's index on its node, which picks its GPU) and ``MASTER_ADDR``/``MASTER_PORT`` (the
rendezvous that ``init_process_group`` reads). Without those variables, or with
``WORLD_SIZE=1``, everything here is a no-op for a single process.

Backends: NCCL when the model lives on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU.

The process group lives as long as the process: :func:`init_distributed` creates it once and
later calls reuse it (so several ``train`` calls, one per stage, share it); it is destroyed at
interpreter exit, or earlier by :func:`destroy_distributed`. Creating and destroying a group
repeatedly against torchrun's rendezvous store is not reliable (a new gloo group can read the
previous group's stale addresses and fail to connect), hence no per-call teardown.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "destroy_distributed",
    "init_distributed",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, the
    ``device`` it trains on and ``is_main`` (rank 0: the one that writes logs and checkpoints)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _device_for(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def init_distributed(device: torch.device | str | None = None) -> DistributedContext:
    """Join the process group torchrun describes, or return a single-process context.

    ``device``: where the model trains; its type picks the backend (``cuda`` → NCCL, with this
    process pinned to ``cuda:LOCAL_RANK``; anything else → gloo). Default: CUDA if available.
    An existing process group (from an earlier call, or one the caller set up) is reused.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistributedContext(rank, world, local_rank, _device_for(device_type, local_rank))

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    if world == 1:
        return DistributedContext(device=torch.device(device))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {name} is not set (launch with torchrun)")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    atexit.register(destroy_distributed)
    return DistributedContext(rank, world, local_rank, _device_for(device_type, local_rank))


def destroy_distributed() -> None:
    """Tear down the default process group, if any (also run at exit once one was created)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.local_rank])
        else:
            dist.barrier()


def _reduce(context: DistributedContext, values: Sequence[float], op: str) -> list[float]:
    if not context.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def all_reduce_sum(context: DistributedContext, values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (identity for one process)."""
    return _reduce(context, values, "SUM")


def all_reduce_max(context: DistributedContext, values: Sequence[float]) -> list[float]:
    """Element-wise maximum over ranks, in float64 (identity for one process)."""
    return _reduce(context, values, "MAX")


def all_gather_objects(context: DistributedContext, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` for one process."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered
