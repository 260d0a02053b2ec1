"""``rxt.nn`` blocks sized from the validated ``RxTConfig``: the one place that reads the
model's config on the blocks' behalf, so the blocks themselves know nothing of RxT."""

from __future__ import annotations

from torch import nn

from rxt.config import AttentionConfig, MoEConfig, RxTConfig
from rxt.nn import Attention, AttentionBlockConfig, MoEBlockConfig, MoEFeedForward, SwiGLU


def attention(
    config: RxTConfig,
    heads: AttentionConfig,
    *,
    rope_queries: bool,
    rope_keys: bool,
    dropout: bool = False,
) -> Attention:
    """An attention block of ``config``'s width and RoPE range with ``heads``; ``dropout``
    enables ``config.dropout`` on its attention weights."""
    return Attention(
        AttentionBlockConfig(
            d_model=config.d_model,
            num_heads=heads.num_heads,
            query_heads=heads.query_heads,
            kv_heads=heads.kv_heads,
            rope_queries=rope_queries,
            rope_keys=rope_keys,
            max_positions=config.max_seq_len,
            rope_theta=config.rope_theta,
            dropout=config.dropout if dropout else 0.0,
        )
    )


def feedforward(d_model: int, ffn_dim: int, moe: MoEConfig | None) -> nn.Module:
    """A dense SwiGLU of hidden width ``ffn_dim``, or the MoE that ``moe`` describes."""
    if moe is None:
        return SwiGLU(d_model, ffn_dim)
    return MoEFeedForward(
        MoEBlockConfig(
            d_model=d_model,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            expert_dim=moe.expert_dim,
        )
    )
