"""Memory encoder (paper §3): bidirectional, dense FFN, no memory access.

It reads the finished interaction concat(X_t, Y_t) and returns the hidden state after every
layer — the Encoded Data ED_t ``(B, L, T, d)`` that the memory-attention network writes into
STM. Stages 1–2 train it with an MLM head that inference never uses.
"""

from __future__ import annotations

import torch
from torch import nn

from rxt.config import RxTConfig
from rxt.model import blocks
from rxt.nn import RMSNorm, SwiGLU, padding_mask, run_layer


class EncoderLayer(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm_attn = RMSNorm(d, config.norm_eps)
        self.self_attn = blocks.attention(
            config, config.encoder.self_attention, rope_queries=True, rope_keys=True, dropout=True
        )
        self.norm_ffn = RMSNorm(d, config.norm_eps)
        self.ffn = SwiGLU(d, config.encoder.ffn_dim)
        self.drop = nn.Dropout(config.dropout)  # residual dropout, training mode only

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.drop(
            self.self_attn(h, q_positions=positions, kv_positions=positions, mask=mask)
        )
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class MemoryEncoder(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (B, T, d)`` embeddings, ``attention_mask: (B, T)`` with right padding.
        Returns ED ``(B, L, T, d)``."""
        t = x.shape[1]
        # RoPE tables gathered once for all layers.
        positions = self.layers[0].self_attn.rope.angles(torch.arange(t, device=x.device))
        mask = None
        if attention_mask is not None:
            mask = padding_mask(attention_mask, t, causal=False)
        states = []
        for layer in self.layers:
            x = run_layer(layer, self.gradient_checkpointing, x, positions, mask)
            states.append(x)
        return torch.stack(states, dim=1)


class MLMHead(nn.Module):
    """Masked-LM head for stages 1–2: norm → linear to the vocabulary."""

    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))
