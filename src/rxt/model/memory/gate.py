"""Residual gate G: how much of the memory each update rewrites (paper §3, "Residual gate").

``STM_t = (1 − G) ⊙ STM_{t-1} + G ⊙ Update`` with ``G = sigmoid(...)`` in (0, 1). The result is a
convex combination, so if updates are bounded the memory is bounded over any number of turns;
a plain residual (``gate="none"``: ``STM_{t-1} + Update``) has no such bound and drifts.

Kinds (``MemoryConfig``):
- ``dynamic`` + ``feature``: G per feature from (STM_{t-1} + Update), through an ``elementwise``
  scale-and-shift or a ``linear`` d→d map;
- ``dynamic`` + ``slot``: one G per slot from a d→1 map;
- ``static``: a learned constant per feature (d) or per slot (S);
- ``none``: plain residual, for ablations.
Weights start at zero and biases at logit(gate_init), so G = gate_init exactly at initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rxt.config import MemoryConfig


class ResidualGate(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig) -> None:
        super().__init__()
        self.kind = cfg.gate
        per_feature = cfg.gate_granularity == "feature"
        bias = math.log(cfg.gate_init / (1.0 - cfg.gate_init))
        if self.kind == "none":
            return
        width = d_model if per_feature else 1
        if self.kind == "static":
            shape = (d_model,) if per_feature else (cfg.num_slots, 1)
            self.bias = nn.Parameter(torch.full(shape, bias))
        elif per_feature and cfg.gate_projection == "elementwise":
            self.weight = nn.Parameter(torch.zeros(d_model))
            self.bias = nn.Parameter(torch.full((d_model,), bias))
        else:  # linear map d -> width (per-feature linear, or per-slot scalar)
            self.weight = nn.Parameter(torch.zeros(d_model, width))
            self.bias = nn.Parameter(torch.full((width,), bias))

    def gate_values(self, previous: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """G, broadcastable to ``previous: (..., S, d)``."""
        if self.kind == "static":
            return torch.sigmoid(self.bias)
        z = previous + update
        if self.weight.dim() == 1:
            return torch.sigmoid(z * self.weight + self.bias)
        return torch.sigmoid(z @ self.weight + self.bias)

    def forward(self, previous: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return previous + update
        g = self.gate_values(previous, update)
        return previous + g * (update - previous)  # = (1 − G) ⊙ previous + G ⊙ update
