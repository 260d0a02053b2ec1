"""RMSNorm (pre-norm everywhere, paper §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-feature scale.

    Uses PyTorch's fused ``rms_norm``. Reduced-precision inputs are normalised in float32 and
    cast back, so bf16/fp16 activations do not lose the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.weight.shape
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.rms_norm(x.float(), shape, self.weight.float(), self.eps).to(x.dtype)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, shape, weight, self.eps)
