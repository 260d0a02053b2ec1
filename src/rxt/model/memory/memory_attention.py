"""Memory-attention network: writes the encoded interaction ED_t into STM (paper §3).

One layer per STM layer. Each layer is the same parameterised module; the paper's four variants
differ only in the *pre-step* applied to the slots before the write:

=========================  ======================================================================
variant                    pre-step (a gated-residual attention of the slots)
=========================  ======================================================================
``simple``                 none
``self``                   slots attend to themselves
``interlayer``             slots of layer l attend to the mean of all STM layers
``gated-self-interlayer``  keys/values are a gated blend of the layer's slots and the mean
=========================  ======================================================================

Then the write: ``Update = Attn(Q = norm(s), K = V = norm(ED_t[l]))`` (RoPE on keys only, ED
padding masked), where ``s`` is the pre-stepped slots, and the paper's gated residual against the
old memory, ``STM_t[l] = (1 − G) ⊙ STM_{t−1}[l] + G ⊙ Update`` (``gate_reference="previous"``,
the default). ``gate_reference="pre_step"`` gates against ``s`` instead (rxt 0.1's form).

Boundedness: every attention output is a convex mix of normalised values pushed through one
linear map, so it is bounded whatever the memory holds; the gates are convex combinations;
hence the STM norm stays bounded over any number of turns (tested over 500 updates).
"""

from __future__ import annotations

import torch
from torch import nn

from rxt.config import RxTConfig
from rxt.model import blocks
from rxt.model.memory.gate import ResidualGate
from rxt.nn import RMSNorm, run_layer

_PRE_STEP_SOURCE = {
    "simple": None,
    "self": "self",
    "interlayer": "interlayer",
    "gated-self-interlayer": "blend",
}


class SlotPreStep(nn.Module):
    """Gated-residual attention of the slots over ``source`` (self, inter-layer mean, or blend)."""

    def __init__(self, config: RxTConfig, source: str) -> None:
        super().__init__()
        d = config.d_model
        self.source = source
        self.norm_q = RMSNorm(d, config.norm_eps)
        self.norm_kv = RMSNorm(d, config.norm_eps)
        self.attn = blocks.attention(
            config, config.memory.attention, rope_queries=False, rope_keys=False
        )
        self.gate = ResidualGate(d, config.memory)
        if source == "blend":
            # Per-feature blend weight between the layer's own slots and the inter-layer mean.
            self.blend_weight = nn.Parameter(torch.zeros(d))
            self.blend_bias = nn.Parameter(torch.zeros(d))

    def forward(self, slots: torch.Tensor, layer_mean: torch.Tensor) -> torch.Tensor:
        if self.source == "self":
            kv = self.norm_kv(slots)
        elif self.source == "interlayer":
            kv = self.norm_kv(layer_mean)
        else:
            g = torch.sigmoid((slots + layer_mean) * self.blend_weight + self.blend_bias)
            kv = g * self.norm_kv(slots) + (1.0 - g) * self.norm_kv(layer_mean)
        return self.gate(slots, self.attn(self.norm_q(slots), kv))


class MemoryAttentionLayer(nn.Module):
    """Writes ED_t[l] into STM[l], after the variant's pre-step."""

    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        d = config.d_model
        source = _PRE_STEP_SOURCE[config.memory.variant]
        self.pre_step = SlotPreStep(config, source) if source else None
        self.norm_q = RMSNorm(d, config.norm_eps)
        self.norm_ed = RMSNorm(d, config.norm_eps)
        self.write = blocks.attention(
            config, config.memory.attention, rope_queries=False, rope_keys=True
        )
        self.gate = ResidualGate(d, config.memory)
        self.gate_reference = config.memory.gate_reference

    def forward(
        self,
        slots: torch.Tensor,
        encoded: torch.Tensor,
        layer_mean: torch.Tensor,
        ed_mask: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """``slots: (B, S, d)`` = STM_{t-1}[l], ``encoded: (B, T, d)``, ``ed_mask: (B, 1, 1, T)``
        or None."""
        queries = slots if self.pre_step is None else self.pre_step(slots, layer_mean)
        k, v = self.write.project_kv(self.norm_ed(encoded), positions)
        update = self.write.attend(self.write.project_q(self.norm_q(queries)), k, v, ed_mask)
        # Paper: STM_t = (1 − G) ⊙ STM_{t−1} + G ⊙ Update; "pre_step" gates against the
        # pre-stepped slots instead.
        return self.gate(slots if self.gate_reference == "previous" else queries, update)


class MemoryAttention(nn.Module):
    """STM_t = MemAttn(STM_{t-1}, ED_t), layer by layer. Pure: never modifies its input."""

    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(config) for _ in range(config.num_layers))
        self.gradient_checkpointing = False

    def forward(
        self,
        stm: torch.Tensor,
        encoded: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``stm: (B, L, S, d)``, ``encoded`` = ED_t ``(B, L, T, d)``, ``attention_mask: (B, T)``
        (1 = real token). Returns STM_t ``(B, L, S, d)``."""
        t = encoded.shape[2]
        # RoPE tables of the encoded positions, gathered once for all layers.
        positions = self.layers[0].write.rope.angles(torch.arange(t, device=encoded.device))
        ed_mask = None
        if attention_mask is not None:
            ed_mask = attention_mask.bool()[:, None, None, :]
        # The inter-layer mean is taken once from STM_{t-1}, so every layer sees the same
        # summary of the old memory regardless of update order.
        layer_mean = stm.mean(dim=1)
        new_layers = [
            run_layer(
                layer,
                self.gradient_checkpointing,
                stm[:, i],
                encoded[:, i],
                layer_mean,
                ed_mask,
                positions,
            )
            for i, layer in enumerate(self.layers)
        ]
        return torch.stack(new_layers, dim=1)
