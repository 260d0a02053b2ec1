"""Initial Short-Term Memory STM_0 (paper §3, §4).

STM is a value, never module state: this module only knows how to make a *fresh* one.
- ``random``: N(0, stm_init_std²) per conversation, so the decoder cannot rely on any fixed
  initial content (and a stored state is distinguishable from a fresh one);
- ``learned``: one trained tensor shared by every conversation.
"""

from __future__ import annotations

import torch
from torch import nn

from rxt.config import RxTConfig


class StmInitializer(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.shape = config.stm_shape
        self.kind = config.memory.stm_init
        self.std = config.memory.stm_init_std
        if self.kind == "learned":
            self.stm = nn.Parameter(torch.randn(self.shape) * self.std)

    def forward(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A fresh STM_0 of shape (B, L, S, d)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.kind == "learned":
            stm = self.stm.unsqueeze(0).expand(batch_size, *self.shape)
            return stm.to(device=device, dtype=dtype).contiguous()
        # Draw on the generator's device (a CPU generator keeps seeds portable), then move.
        draw_on = generator.device if generator is not None else device
        noise = torch.randn((batch_size, *self.shape), generator=generator, device=draw_on)
        return (noise * self.std).to(device=device, dtype=dtype or torch.get_default_dtype())
