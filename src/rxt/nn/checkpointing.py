"""Activation (gradient) checkpointing: trade compute for memory when training large models.

Enabled per model with ``model.gradient_checkpointing_enable()``. A checkpointed layer keeps
only its input during the forward pass and recomputes its activations during backward; the RNG
state is replayed, so dropout masks are identical and gradients equal the plain computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, enabled: bool, *args: Any) -> Any:
    """``layer(*args)``, checkpointed when ``enabled`` and gradients are being recorded."""
    if enabled and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
