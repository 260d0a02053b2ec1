"""Data parallelism for the training loop: the DDP wrapper around a stage's loss, its release,
and each rank's seed. Process-group set-up is :mod:`rxt.training.distributed`."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rxt.training.distributed import DistributedContext

if TYPE_CHECKING:  # loop.py imports this module: the protocol is for annotations only
    from rxt.training.loop import Stage

__all__ = ["StageLoss", "data_parallel", "rank_seed", "release"]


class StageLoss(nn.Module):
    """``stage.loss(model, batch)`` as a module's forward. DistributedDataParallel syncs the
    gradients of a backward only when the forward ran through its wrapper, and stages call model
    methods (``encode``, ``memory_attention``, ``decoder_forward``), not ``model.forward``."""

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage_loss = stage.loss

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.stage_loss(self.model, batch)


def data_parallel(model: nn.Module, stage: Stage, context: DistributedContext) -> nn.Module:
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
        StageLoss(model, stage),
        device_ids=[context.device.index] if context.device.type == "cuda" else None,
        find_unused_parameters=True,
        **{buffers: False},
    )


def release(wrapper: nn.Module) -> None:
    """Take a DDP wrapper's gradient hooks off the model's parameters now (its reducer's
    destructor does the same, but only once the wrapper is collected)."""
    remove = getattr(wrapper, "_remove_autograd_hooks", None)
    if remove is not None:
        remove()


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 uses ``seed`` itself (a single process is rank 0), every other rank its own
    stream (dropout masks must differ between ranks, as between micro-batches)."""
    return seed if rank == 0 else (seed * 0x9E3779B97F4A7C15 + rank) % (1 << 63)
