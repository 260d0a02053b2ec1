"""Rotary position embedding (RoPE).

Where RoPE applies is part of the architecture (paper §3): decoder and encoder self-attention
rotate queries and keys; memory cross-attention rotates only the decoder's queries (memory slots
are a set and carry no position); the memory write rotates only the keys (the encoded
interaction has positions, the slots do not).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for ``max_positions`` positions of a ``head_dim``-wide head."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: (T, head_dim)
        # Non-persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x: (B, H, T, hd)`` by ``positions``: (T,) shared or (B, T) per row."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        if positions.dim() == 2:  # (B, T, hd) -> (B, 1, T, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
