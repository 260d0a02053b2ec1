"""One decode step (one new token per row) with fewer, larger operations (paper §4, step 2).

At inference sizes a decode step is dispatch-bound: the arithmetic of a 160-wide layer takes
microseconds, while each PyTorch call costs one to a few. This step computes exactly what
:class:`~rxt.model.decoder.GeneratorDecoder` computes for a single token in eval mode, but with
the projections that read the same input fused (q/k/v as one matrix, gate/up as one), RoPE
applied to queries and keys together, rows kept 2-D between attentions, and modules entered
through ``forward`` (no hook dispatch): about half the dispatches.
``tests/test_engine_fast_path.py`` checks it against the module path.

The fused matrices are copies of the model's weights; :meth:`FusedDecodeStep.refresh` rebuilds
them when a parameter changed (the engine calls it once per admitted batch of turns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rxt.model.cache import MemoryKV
from rxt.model.decoder import DecoderLayer
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.nn import MoEFeedForward, RopeAngles


class _FusedLayer:
    """One decoder layer's single-token step; rows stay ``(B, d)`` throughout."""

    def __init__(self, layer: DecoderLayer) -> None:
        self.layer = layer
        sa, ca = layer.self_attn, layer.cross_attn
        self.hq, self.hkv, self.hd = sa.num_query_heads, sa.num_kv_heads, sa.head_dim
        self.cq, self.ckv, self.chd = ca.num_query_heads, ca.num_kv_heads, ca.head_dim
        self.w_qkv = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
        ffn = layer.ffn
        self.moe = isinstance(ffn, MoEFeedForward)
        if self.moe:  # (E, d, 2h): each expert's gate and up projections as one matrix
            self.w_gate_up = torch.cat([ffn.w_gate, ffn.w_up], dim=-1)
            self.ffn_dim = ffn.w_gate.shape[-1]
        else:
            self.w_gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
            self.ffn_dim = ffn.gate_proj.weight.shape[0]

    def __call__(self, x, index, cache, self_mask, angles_self, angles_cross, memory):
        layer, b = self.layer, x.shape[0]
        hq, hkv, hd = self.hq, self.hkv, self.hd
        # Self-attention: one projection; RoPE on queries and keys in one go.
        heads = F.linear(layer.norm_self.forward(x), self.w_qkv).view(b, hq + 2 * hkv, hd)
        qk = layer.self_attn.rope.forward(heads[:, : hq + hkv], angles_self)
        keys, values = cache.append(index, qk[:, hq:, None], heads[:, hq + hkv :, None])
        out = F.scaled_dot_product_attention(
            qk[:, :hq, None], keys, values, attn_mask=self_mask, enable_gqa=hq != hkv
        )
        x = x + F.linear(out.reshape(b, hq * hd), layer.self_attn.o_proj.weight)
        # Memory cross-attention over keys/values projected once for the turn.
        cross = layer.cross_attn
        q = F.linear(layer.norm_cross.forward(x), cross.q_proj.weight).view(b, self.cq, self.chd)
        out = F.scaled_dot_product_attention(
            cross.rope.forward(q, angles_cross)[:, :, None],
            memory.keys[index],
            memory.values[index],
            enable_gqa=self.ckv != self.cq,
        )
        x = x + F.linear(out.reshape(b, self.cq * self.chd), cross.o_proj.weight)
        # Feed-forward.
        h = layer.norm_ffn.forward(x)
        if self.moe:
            return x + self._experts(h)
        gate, up = F.linear(h, self.w_gate_up).split(self.ffn_dim, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.ffn.down_proj.weight)

    def _experts(self, h: torch.Tensor) -> torch.Tensor:
        """Top-k MoE for a few rows. On a CPU a host sync is free, so the chosen experts are read
        on the host and each runs once on its rows, straight from its weights (the module's
        paths copy gathered weights, or sort and count). Elsewhere: the module."""
        moe: MoEFeedForward = self.layer.ffn
        if h.device.type != "cpu":
            return moe.infer(h)
        _, top_idx, top_w = moe.route(h)  # the module's own (float32) routing
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for row, experts in enumerate(top_idx.tolist()):
            for slot, e in enumerate(experts):
                by_expert.setdefault(e, []).append((row, slot))
        out = torch.zeros_like(h)
        for e, pairs in by_expert.items():
            rows = torch.tensor([r for r, _ in pairs], device=h.device)
            gate, up = (h[rows] @ self.w_gate_up[e]).split(self.ffn_dim, dim=-1)
            y = (F.silu(gate) * up) @ moe.w_down[e]
            weight = top_w[rows, torch.tensor([s for _, s in pairs], device=h.device)]
            out.index_add_(0, rows, y * weight.unsqueeze(-1))
        return out


class FusedDecodeStep:
    """``step(tokens, positions, cache, self_mask, memory)`` → next-token logits ``(B, V)``."""

    def __init__(self, model: ReactiveTransformer) -> None:
        self.model = model
        self._key: tuple = ()
        self._storages: list = []
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the fused weights if any parameter changed since the last build: in place
        (its version counter moves) or replaced, e.g. by ``p.data = t`` or ``model.to(dtype)``
        (its storage moves; the old storages are held so an address cannot be reused)."""
        params = list(self.model.parameters())
        key = tuple((p.data_ptr(), p.dtype, p.device, p._version) for p in params)
        if key == self._key:
            return
        with torch.no_grad():
            self.layers = [_FusedLayer(layer) for layer in self.model.decoder.layers]
        self._key = key
        self._storages = [p.untyped_storage() for p in params]

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache,
        self_mask: torch.Tensor | None,
        memory: MemoryKV,
    ) -> torch.Tensor:
        """``tokens, positions: (B,)``; ``cache`` has ``append(layer, k, v)`` taking
        ``(B, H_kv, 1, hd)`` and returning the keys/values to attend, and ``commit()``;
        ``memory``: this turn's memory keys/values of the B rows."""
        model = self.model
        # (B, hd) tables → (B, 1, hd): rows stay 2-D here, so broadcast over heads.
        angles_self, angles_cross = (
            RopeAngles(a.cos[:, None], a.sin[:, None]) for a in model.decoder.rope_angles(positions)
        )
        x = F.embedding(tokens, model.embed.weight)  # (B, d)
        for index, layer in enumerate(self.layers):
            x = layer(x, index, cache, self_mask, angles_self, angles_cross, memory)
        cache.commit()
        return F.linear(model.decoder.norm.forward(x), model.lm_head.weight)
