"""How the training loop spreads a step over processes (``TrainConfig.parallel``).

:func:`parallelism` picks one of two strategies with one interface, so the loop reads the same
for both:

- :class:`Replicated`: every process holds the whole model. One process, or DDP under torchrun
  (``parallel="ddp"``, the default): gradients all-reduced to their mean each step.
- :class:`rxt.training.sharding.Sharded`: FSDP2 under torchrun (``parallel="fsdp"``): each rank
  holds 1/W of every parameter, gradient and optimiser state (models whose training state does
  not fit one device).

With one process both train exactly as a single process (nothing to replicate or shard).
Process-group set-up is :mod:`rxt.training.distributed`; each rank's seed is :func:`rank_seed`.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rxt.training.distributed import DistributedContext

if TYPE_CHECKING:  # loop.py imports this module: the protocol is for annotations only
    from rxt.training.loop import Stage

__all__ = [
    "PARALLEL",
    "Replicated",
    "StageLoss",
    "data_parallel",
    "parallelism",
    "rank_seed",
    "release",
]

PARALLEL = ("ddp", "fsdp")  # the values of TrainConfig.parallel

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


class StageLoss(nn.Module):
    """``stage.loss(model, batch)`` as a module's forward. DistributedDataParallel syncs the
    gradients of a backward only when the forward ran through its wrapper, and FSDP2 gathers
    a root unit's parameters only in its forward; stages call model methods (``encode``,
    ``memory_attention``, ``decoder_forward``), not ``model.forward``."""

    def __init__(self, model: nn.Module, stage: Stage) -> None:
        super().__init__()
        self.model = model
        self.stage_loss = stage.loss

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.stage_loss(self.model, batch)


def parallelism(kind: str, model: nn.Module, stage: Stage, context: DistributedContext) -> Any:
    """The strategy for ``TrainConfig.parallel = kind`` in ``context`` (a :class:`Replicated`
    or a :class:`rxt.training.sharding.Sharded`), set up on ``model``: build the optimiser
    after this call (FSDP2 replaces the parameters with sharded ones)."""
    if kind == "fsdp" and context.distributed:
        from rxt.training.sharding import Sharded

        return Sharded(model, stage, context)
    return Replicated(model, stage, context)


class Replicated:
    """The whole model on every process: one process, or DDP. The DDP wrapper covers the
    parameters that require grad *now* (DDP registers those at construction only), so
    :meth:`loss_fn` builds a new one whenever the trainable set changes (staged unfreezing)."""

    def __init__(self, model: nn.Module, stage: Stage, context: DistributedContext) -> None:
        self.model, self.stage, self.context = model, stage, context
        self.wrapper: nn.Module | None = None
        self.wrapped: tuple[int, ...] = ()

    def loss_fn(self, params: list[nn.Parameter]) -> LossFn:
        """This step's ``batch -> (loss, metrics)``; ``params``: the parameters that train."""
        if not self.context.distributed:
            return lambda batch: self.stage.loss(self.model, batch)
        if tuple(map(id, params)) != self.wrapped:
            self.close()  # the old reducer's gradient-sized buckets go before the new ones come
            self.wrapper = data_parallel(self.model, self.stage, self.context)
            self.wrapped = tuple(map(id, params))
        return self.wrapper

    def micro_batch(self, last: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: DDP all-reduces only the last one's."""
        return nullcontext() if last or self.wrapper is None else self.wrapper.no_sync()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Clip to ``max_norm``; the global norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """Full weights for rank 0 to save; None: ``save_pretrained`` reads the model itself."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def close(self) -> None:
        """Take the DDP wrapper's gradient hooks off the model's parameters."""
        if self.wrapper is not None:
            release(self.wrapper)
            self.wrapper, self.wrapped = None, ()
            gc.collect()  # the reducer's buckets are freed once it is collected


def data_parallel(model: nn.Module, stage: Stage, context: DistributedContext) -> nn.Module:
    """A DDP wrapper over the parameters that require grad now.

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
