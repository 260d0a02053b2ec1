"""Attention with independent query and key/value head counts (MHA, GQA, MQA, SQA).

One module serves every attention in RxT. What differs between uses is only where RoPE applies
and where keys/values come from, so the module exposes its three steps separately:
``project_q`` and ``project_kv`` (each optionally rotating), and ``attend``. That lets the decoder
project the memory's keys/values once per turn (paper §4, step 1) and reuse them for every token.

Shapes: ``x: (B, T, d)``; queries ``(B, H_q, T, hd)``; keys/values ``(B, H_kv, T, hd)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rxt.nn.rope import RotaryEmbedding


@dataclass(frozen=True)
class AttentionBlockConfig:
    """What one attention block needs. ``num_heads`` (H) fixes the head width ``d_model / H``;
    ``query_heads`` (H_q ≤ H: SQA) and ``kv_heads`` (H_kv | H_q: GQA/MQA) are the heads used.
    RoPE tables cover ``max_positions`` positions; ``dropout`` applies to the attention weights
    in training mode only."""

    d_model: int
    num_heads: int
    query_heads: int
    kv_heads: int
    rope_queries: bool = False
    rope_keys: bool = False
    max_positions: int = 2048
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # The model validates its config with field paths; these guard direct use of the block.
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads must divide d_model={self.d_model}, got {self.num_heads}")
        if not 1 <= self.query_heads <= self.num_heads:
            raise ValueError(
                f"query_heads must be in [1, {self.num_heads}], got {self.query_heads}"
            )
        if self.kv_heads < 1 or self.query_heads % self.kv_heads:
            raise ValueError(
                f"kv_heads must divide query_heads={self.query_heads}, got {self.kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class Attention(nn.Module):
    def __init__(self, config: AttentionBlockConfig) -> None:
        super().__init__()
        d_model = config.d_model
        self.dropout = config.dropout  # on attention weights, training mode only
        self.head_dim = config.head_dim
        self.num_query_heads = config.query_heads
        self.num_kv_heads = config.kv_heads
        self.q_proj = nn.Linear(d_model, self.num_query_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_query_heads * self.head_dim, d_model, bias=False)
        self.rope_queries = config.rope_queries
        self.rope_keys = config.rope_keys
        self.rope = (
            RotaryEmbedding(self.head_dim, config.max_positions, config.rope_theta)
            if config.rope_queries or config.rope_keys
            else None
        )

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def project_q(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.q_proj(x), self.num_query_heads)
        if self.rope_queries:
            q = self.rope(q, positions)
        return q

    def project_kv(
        self, x: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        if self.rope_keys:
            k = self.rope(k, positions)
        return k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Scaled dot-product attention and output projection.

        ``mask``: boolean, True = may attend, broadcastable to (B, H_q, T_q, T_k).
        """
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_query_heads,
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_query_heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor | None = None,
        *,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention of ``x`` over ``source`` (self-attention when ``source`` is None)."""
        src = x if source is None else source
        k, v = self.project_kv(src, kv_positions)
        return self.attend(self.project_q(x, q_positions), k, v, mask, is_causal)


def padding_mask(
    key_valid: torch.Tensor, num_queries: int, *, causal: bool, offset: int = 0
) -> torch.Tensor:
    """Boolean attention mask (B, 1, T_q, T_k) from ``key_valid: (B, T_k)``.

    Query i sits at key position ``offset + i``. Every query may always attend to its own
    position: otherwise a padding query would see no key at all, SDPA would return NaN for it,
    and that NaN would reach real rows through the next layer's values (0 · NaN = NaN).
    """
    t_k = key_valid.shape[1]
    q_pos = torch.arange(num_queries, device=key_valid.device).unsqueeze(1) + offset
    k_pos = torch.arange(t_k, device=key_valid.device).unsqueeze(0)
    allowed = key_valid.bool().unsqueeze(1) | (k_pos == q_pos).unsqueeze(0)  # (B, T_q, T_k)
    if causal:
        allowed = allowed & (k_pos <= q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)
