"""FSDP2 for the training loop (``TrainConfig.parallel="fsdp"`` under torchrun).

``torch.distributed.fsdp.fully_shard`` splits every parameter along its first dimension over
the W ranks; a unit's parameters are all-gathered just before it runs and freed after, its
gradients reduce-scattered to their mean, so each rank keeps 1/W of the weights, gradients and
AdamW state between uses. It runs on CPU over gloo (all-gather and reduce-scatter both exist
there) as on GPUs over NCCL.

Units
-----
Each layer of every ``nn.ModuleList`` named ``layers`` (RxT's decoder, encoder and
memory-attention layers; a Llama baseline's decoder layers) is one unit. The root unit is the
stage's loss (:class:`rxt.training.parallel.StageLoss`, holding the model) and owns the rest:
the embedding, the LM head (one tensor with the embedding under ``tie_embeddings``, so the two
must share a unit), the MLM head, final norms and STM_0. Stages call model methods, not
``model.forward``: the root's forward is the stage's loss, and a decoder layer's
``memory_kv`` (the STM's keys and values, projected outside the layer's forward) is
registered as a forward method so its parameters are gathered for it too.

Every rank must make the same sequence of unit calls: each call all-gathers, and each call's
backward reduce-scatters; a mismatch fails with a gloo size error or hangs. A stage whose
batches decide how often a module runs (SMAT: one memory update per turn of the longest
dialogue on *that* rank) names those modules in its ``varying_calls``; their layers stay in the
root unit, gathered once per micro-batch and kept through its backward. A stage without the
attribute keeps every layer there (safe, but only sharded between steps). Other repeated uses
are fine when every rank makes them.

Gradients: a trainable parameter that some rank did not use contributes zeros there
(``set_reduce_scatter_unused_params``, as DDP's ``find_unused_parameters``), so ranks' reduce-
scatters stay matched. One that *no* rank used gets a zero gradient, where DDP and a single
process leave none: AdamW then still applies weight decay (and earlier momentum) to it.
Frozen parameters (``requires_grad=False``; SMAT's staged unfreezing) get nothing. With
gradient accumulation every micro-batch is reduce-scattered (DDP's ``no_sync`` would keep
whole-model gradients on every rank, which is what FSDP is for avoiding).

Checkpoints keep the project's format (:mod:`rxt.training.checkpoint`): the full weights and
the full optimiser state are gathered to rank 0 with ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict``/``get_optimizer_state_dict``), the optimiser's keyed by parameter
index as ``Optimizer.state_dict`` writes them. A checkpoint therefore resumes under FSDP2 or
DDP alike (same world size) and ``out_dir/model`` loads with ``from_pretrained``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from rxt.training.distributed import DistributedContext
from rxt.training.parallel import LossFn, StageLoss

if TYPE_CHECKING:
    from rxt.training.loop import Stage

__all__ = ["Sharded", "layer_stacks"]

# Methods other than forward that run a unit's parameters (see the module docstring).
FORWARD_METHODS = ("memory_kv",)
# Gathered to rank 0 on the CPU: a rank never holds a second whole copy on its device.
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def layer_stacks(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    """``(name, layers)`` of every ``nn.ModuleList`` named ``layers`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            yield name, module


class Sharded:
    """FSDP2 over ``model`` for ``stage``; the same interface as
    :class:`rxt.training.parallel.Replicated`. The model stays sharded afterwards (DTensor
    parameters, FSDP hooks): the trained weights are what the loop saves."""

    def __init__(self, model: nn.Module, stage: Stage, context: DistributedContext) -> None:
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ValueError(
                "TrainConfig.parallel: the model is already sharded by an earlier FSDP run; "
                "start from the model that run saved (out_dir/model)"
            )
        self.model, self.context = model, context
        mesh = init_device_mesh(context.device.type, (context.world_size,))
        # Rank 0's weights on every rank, as DDP does at wrap time (sharding keeps each
        # rank's own slice of its own tensors); these references keep them alive until then.
        weights = model.state_dict() if context.is_main else {}
        varying = getattr(stage, "varying_calls", None)
        for name, layers in layer_stacks(model):
            if varying is None or name.split(".", 1)[0] in varying:
                continue
            for layer in layers:
                fully_shard(layer, mesh=mesh)
                for method in FORWARD_METHODS:
                    if callable(getattr(layer, method, None)):
                        register_fsdp_forward_method(layer, method)
        # memory_kv returns its keys and values as views (heads split off); FSDP2 warns that an
        # in-place op on a unit's output view would skip its backward hook. MemoryKV is never
        # modified in place (the training path only reads it), so the warning is noise.
        warnings.filterwarnings(
            "ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor"
        )
        self.root: Any = fully_shard(StageLoss(model, stage), mesh=mesh)
        self.root.set_reduce_scatter_unused_params(True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights, options=options)

    def loss_fn(self, params: list[nn.Parameter]) -> LossFn:
        # A parameter's requires_grad reaches its gathered copy at every all-gather, so
        # staged unfreezing needs no re-wrap.
        return self.root

    def micro_batch(self, last: bool) -> AbstractContextManager[Any]:
        return nullcontext()  # every micro-batch reduce-scatters (module docstring)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        # Over sharded gradients the norm is a replicated DTensor: the global norm.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full weights on rank 0 (empty elsewhere); every rank must call this."""
        return get_model_state_dict(self.model, options=_FULL)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimiser state on rank 0 (empty elsewhere), keyed by parameter index
        as ``optimizer.state_dict()`` keys it; every rank must call this."""
        state = get_optimizer_state_dict(self.model, optimizer, options=_FULL)
        if not state:
            return state
        index = {name: i for i, name in enumerate(self._names(optimizer))}
        return {
            "state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]}
                for group in state["param_groups"]
            ],
        }

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Shard a full, index-keyed optimiser state (every rank passes the same one)."""
        names = self._names(optimizer)
        by_name = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
        # set_optimizer_state_dict loads state for the parameters that require grad, and
        # refuses one without saved state (a module staged unfreezing has not reached yet);
        # with strict=False it would keep the state its lr-0 warm-up step gave it (a step
        # count of 1, not none). So exactly the saved ones require grad while it runs.
        params = dict(self.model.named_parameters())
        flags = {name: p.requires_grad for name, p in params.items()}
        try:
            for name, p in params.items():
                p.requires_grad_(name in by_name["state"])
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
        finally:
            for name, p in params.items():
                p.requires_grad_(flags[name])

    def close(self) -> None:
        """Nothing to release: the sharding is the model's from now on."""

    def _names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Parameter names in the optimiser's order: index i of ``optimizer.state_dict()``."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
