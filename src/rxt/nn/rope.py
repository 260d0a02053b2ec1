"""Rotary position embedding (RoPE).

Where RoPE applies is part of the architecture (paper §3): decoder and encoder self-attention
rotate queries and keys; memory cross-attention rotates only the decoder's queries (memory slots
are a set and carry no position); the memory write rotates only the keys (the encoded
interaction has positions, the slots do not).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class RopeAngles(NamedTuple):
    """cos/sin of a set of positions, computed once and shared by every layer of a forward
    pass (the tables are the same for all layers of one head width)."""

    cos: torch.Tensor
    sin: torch.Tensor  # sign-folded: see RotaryEmbedding.forward


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for ``max_positions`` positions of a ``head_dim``-wide head."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: (T, head_dim)
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with the first half's sign
        # folded into the table: one roll instead of two slices, a negation and a concat.
        sin = angles.sin()
        sin[:, : head_dim // 2] *= -1
        # Non-persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)

    def angles(self, positions: torch.Tensor) -> RopeAngles:
        """Tables for ``positions``: (T,) shared, or (B, T) per row (broadcast over heads)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # (B, T, hd) -> (B, 1, T, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return RopeAngles(cos, sin)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | RopeAngles) -> torch.Tensor:
        """Rotate ``x: (B, H, T, hd)`` by ``positions`` (or angles from :meth:`angles`)."""
        cos, sin = positions if isinstance(positions, RopeAngles) else self.angles(positions)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + x.roll(self.head_dim // 2, dims=-1) * sin
