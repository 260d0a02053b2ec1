"""Generator-decoder (paper §3): causal self-attention → memory cross-attention → FFN.

Each layer l reads STM[l] through cross-attention whose keys/values are projected once per turn
(``memory_kv``) and whose queries carry RoPE while the memory keys do not (slots are a set).
"""

from __future__ import annotations

import torch
from torch import nn

from rxt.config import RxTConfig
from rxt.model.attention import Attention
from rxt.model.cache import KVCache, MemoryKV
from rxt.model.feedforward import MoEFeedForward, SwiGLU
from rxt.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.d_model
        common = {"max_positions": config.max_seq_len, "rope_theta": config.rope_theta}
        self.norm_self = RMSNorm(d, config.norm_eps)
        self.self_attn = Attention(
            d, config.decoder.self_attention, rope_queries=True, rope_keys=True, **common
        )
        self.norm_cross = RMSNorm(d, config.norm_eps)
        self.norm_memory = RMSNorm(d, config.norm_eps)
        self.cross_attn = Attention(
            d, config.decoder.cross_attention, rope_queries=True, rope_keys=False, **common
        )
        self.norm_ffn = RMSNorm(d, config.norm_eps)
        moe = config.decoder.moe
        self.ffn = MoEFeedForward(d, moe) if moe else SwiGLU(d, config.decoder.ffn_dim)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project one memory layer ``(B, S, d)`` to cross-attention keys/values."""
        return self.cross_attn.project_kv(self.norm_memory(memory))

    def forward(
        self,
        x: torch.Tensor,
        *,
        layer_index: int,
        positions: torch.Tensor,
        self_mask: torch.Tensor | None,
        is_causal: bool,
        memory: MemoryKV,
        cache: KVCache | None,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm_self(x)
        q = self.self_attn.project_q(h, positions)
        k, v = self.self_attn.project_kv(h, positions)
        if cache is not None:
            k, v = cache.append(layer_index, k, v)
        x = x + self.self_attn.attend(q, k, v, self_mask, is_causal)

        q = self.cross_attn.project_q(self.norm_cross(x), positions)
        mem_k, mem_v = memory.keys[layer_index], memory.values[layer_index]
        x = x + self.cross_attn.attend(q, mem_k, mem_v, memory.mask)

        h = self.norm_ffn(x)
        if isinstance(self.ffn, MoEFeedForward):
            out, aux = self.ffn(h, token_mask)
            return x + out, aux
        return x + self.ffn(h), None


class GeneratorDecoder(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)

    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> MemoryKV:
        """``memory: (B, L, S, d)`` → per-layer keys/values; ``memory_mask: (B, S)`` optional."""
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.memory_kv(memory[:, i])
            keys.append(k)
            values.append(v)
        mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        return MemoryKV(keys, values, mask)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        self_mask: torch.Tensor | None,
        is_causal: bool,
        memory: MemoryKV,
        cache: KVCache | None,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns final-normed hidden states ``(B, T, d)`` and the summed MoE balance loss."""
        aux_total = None
        for i, layer in enumerate(self.layers):
            x, aux = layer(
                x,
                layer_index=i,
                positions=positions,
                self_mask=self_mask,
                is_causal=is_causal,
                memory=memory,
                cache=cache,
                token_mask=token_mask,
            )
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.commit()
        return self.norm(x), aux_total
