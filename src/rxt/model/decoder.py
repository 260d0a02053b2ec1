"""Generator-decoder (paper §3): causal self-attention → memory cross-attention → FFN.

Each layer l reads STM[l] through cross-attention whose keys/values are projected once per turn
(``memory_kv``) and whose queries carry RoPE while the memory keys do not (slots are a set).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rxt.config import RxTConfig
from rxt.model import blocks
from rxt.model.cache import KVCache, MemoryKV
from rxt.nn import MoEFeedForward, RMSNorm, RopeAngles, run_layer


@dataclass
class DecodeContext:
    """What every layer of one decoder call shares, besides the hidden states.

    ``positions``: (T,) or (B, T) RoPE positions of the new tokens; ``self_mask``: boolean
    (B, 1, T, cached + T) or None; ``is_causal``: let SDPA apply the causal mask itself;
    ``token_mask``: (B, T) real tokens, for MoE balance statistics."""

    positions: torch.Tensor
    self_mask: torch.Tensor | None
    is_causal: bool
    memory: MemoryKV
    cache: KVCache | None
    token_mask: torch.Tensor | None
    # RoPE tables of ``positions`` for self- and cross-attention, set once per call by
    # GeneratorDecoder (a decode step is dispatch-bound: no need to gather them per layer).
    self_angles: RopeAngles | None = None
    cross_angles: RopeAngles | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm_self = RMSNorm(d, config.norm_eps)
        self.self_attn = blocks.attention(
            config, config.decoder.self_attention, rope_queries=True, rope_keys=True, dropout=True
        )
        self.norm_cross = RMSNorm(d, config.norm_eps)
        self.norm_memory = RMSNorm(d, config.norm_eps)
        self.cross_attn = blocks.attention(
            config, config.decoder.cross_attention, rope_queries=True, rope_keys=False, dropout=True
        )
        self.norm_ffn = RMSNorm(d, config.norm_eps)
        self.ffn = blocks.feedforward(d, config.decoder.ffn_dim, config.decoder.moe)
        self.drop = nn.Dropout(config.dropout)  # residual dropout, training mode only

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project one memory layer ``(B, S, d)`` to cross-attention keys/values."""
        return self.cross_attn.project_kv(self.norm_memory(memory))

    def forward(
        self, x: torch.Tensor, index: int, ctx: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        at_self = ctx.self_angles if ctx.self_angles is not None else ctx.positions
        at_cross = ctx.cross_angles if ctx.cross_angles is not None else ctx.positions
        h = self.norm_self(x)
        q = self.self_attn.project_q(h, at_self)
        k, v = self.self_attn.project_kv(h, at_self)
        if ctx.cache is not None:
            k, v = ctx.cache.append(index, k, v)
        x = x + self.drop(self.self_attn.attend(q, k, v, ctx.self_mask, ctx.is_causal))

        q = self.cross_attn.project_q(self.norm_cross(x), at_cross)
        memory = ctx.memory
        x = x + self.drop(
            self.cross_attn.attend(q, memory.keys[index], memory.values[index], memory.mask)
        )

        h = self.norm_ffn(x)
        if isinstance(self.ffn, MoEFeedForward):
            out, aux = self.ffn(h, ctx.token_mask)
            return x + self.drop(out), aux
        return x + self.drop(self.ffn(h)), None


class GeneratorDecoder(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.gradient_checkpointing = False

    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> MemoryKV:
        """``memory: (B, L, S, d)`` → per-layer keys/values; ``memory_mask: (B, S)`` optional."""
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.memory_kv(memory[:, i])
            keys.append(k)
            values.append(v)
        mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        return MemoryKV(keys, values, mask)

    def rope_angles(self, positions: torch.Tensor) -> tuple[RopeAngles, RopeAngles]:
        """RoPE tables of ``positions`` for self- and cross-attention queries (one gather for
        both when their head widths agree), shared by every layer of a call."""
        first = self.layers[0]
        angles = first.self_attn.rope.angles(positions)
        if first.cross_attn.head_dim == first.self_attn.head_dim:
            return angles, angles
        return angles, first.cross_attn.rope.angles(positions)

    def forward(
        self, x: torch.Tensor, ctx: DecodeContext
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns final-normed hidden states ``(B, T, d)`` and the summed MoE balance loss."""
        self_angles, cross_angles = self.rope_angles(ctx.positions)
        ctx = replace(ctx, self_angles=self_angles, cross_angles=cross_angles)
        aux_total = None
        # A KV cache is appended to inside the layer; recomputing it would append twice.
        checkpointed = self.gradient_checkpointing and ctx.cache is None
        for i, layer in enumerate(self.layers):
            x, aux = run_layer(layer, checkpointed, x, i, ctx)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if ctx.cache is not None:
            ctx.cache.commit()
        return self.norm(x), aux_total
