"""Feed-forward blocks: SwiGLU, and a Mixture-of-Experts of SwiGLU experts (paper §3).

The paper's decoders are MoE so the decoder can hold more parameters than the encoder at the
same width while spending the same compute per token (top-k of E experts are active).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoEBlockConfig:
    """What one MoE block needs: ``num_experts`` SwiGLU experts of hidden width ``expert_dim``,
    ``top_k`` of them active per token."""

    d_model: int
    num_experts: int
    top_k: int
    expert_dim: int

    def __post_init__(self) -> None:
        # The model validates its config with field paths; this guards direct use of the block.
        if min(self.d_model, self.expert_dim) < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need sizes >= 1 and 1 <= top_k <= num_experts, got {self}")


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=False)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts with a Switch-Transformer load-balancing loss.

    Routing is per token and has no capacity limit, so no token is ever dropped and a token's
    output does not depend on which other tokens share its batch (batched == one-by-one).
    Experts are stored as stacked weights ``(E, ...)`` rather than E small modules.
    """

    def __init__(self, cfg: MoEBlockConfig) -> None:
        super().__init__()
        d_model = cfg.d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        e, h = cfg.num_experts, cfg.expert_dim
        self.w_gate = nn.Parameter(torch.empty(e, d_model, h))
        self.w_up = nn.Parameter(torch.empty(e, d_model, h))
        self.w_down = nn.Parameter(torch.empty(e, h, d_model))

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, T, d)``, ``token_mask: (B, T)`` (1 = real token; padding is excluded from
        the balancing statistics). Returns the output and the unweighted balancing loss."""
        out, logits, top_idx = self._route_and_mix(x)
        return out, self._balance_loss(logits, top_idx, token_mask)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The output only (inference: no balancing loss is computed)."""
        return self._route_and_mix(x)[0]

    def _route_and_mix(self, x: torch.Tensor):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, top_idx, top_w = self.route(flat)
        threshold = self.gather_threshold
        if threshold is None:
            threshold = 0 if flat.device.type == "cpu" else 16
        if flat.shape[0] <= threshold:
            out = self._gathered(flat, top_idx, top_w)
        else:
            out = self._dispatched(flat, top_idx, top_w)
        return out.view(shape), logits, top_idx

    def route(self, flat: torch.Tensor):
        """``flat: (N, d)`` → router logits ``(N, E)``, chosen experts ``(N, k)`` and their
        mixing weights ``(N, k)``. One public method: the engine's fused decode step routes
        through it, and tests record or pin the routing by replacing it."""
        # Routing in float32: in bf16 the rounding of near-tied router logits alone would flip
        # expert choices between otherwise equal computations (e.g. cached vs full decoding).
        logits = F.linear(flat.float(), self.router.weight.float())  # (N, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (N, k)
        return logits, top_idx, top_logits.softmax(dim=-1).to(flat.dtype)

    # Decoding feeds one token per conversation. On an accelerator, gathering each token's k
    # experts' weights avoids a host sync; longer inputs, and any input on a CPU (where a host
    # sync costs nothing and copying the gathered weights dominates: 3.0 vs 0.9 ms per layer
    # for 16 tokens, paper-nano), group tokens by expert so each expert's weights are read once.
    gather_threshold: int | None = None  # None: 16 tokens on an accelerator, 0 on a CPU

    def _gathered(self, flat: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor):
        x = flat.unsqueeze(1).unsqueeze(2)  # (N, 1, 1, d)
        h = F.silu(x @ self.w_gate[top_idx]) * (x @ self.w_up[top_idx])  # (N, k, 1, h)
        y = (h @ self.w_down[top_idx]).squeeze(2)  # (N, k, d)
        return (y * top_w.unsqueeze(-1)).sum(dim=1)

    def _dispatched(self, flat: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor):
        out = torch.zeros_like(flat)
        # Group (token, choice) pairs by expert with one sort instead of E boolean scans.
        flat_idx = top_idx.reshape(-1)
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()
        tokens = order // self.top_k
        weights = top_w.reshape(-1)[order].unsqueeze(-1)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = tokens[start : start + n]
            h = F.silu(flat[idx] @ self.w_gate[e]) * (flat[idx] @ self.w_up[e])
            out.index_add_(0, idx, (h @ self.w_down[e]) * weights[start : start + n])
            start += n
        return out

    def _balance_loss(
        self, logits: torch.Tensor, top_idx: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # Switch loss E · Σ_e f_e · P_e: f_e = share of routing choices given to expert e,
        # P_e = mean router probability of e. Equals 1 when routing is uniform.
        probs = logits.float().softmax(dim=-1)
        chosen = F.one_hot(top_idx, self.num_experts).sum(dim=1).float()  # (N, E)
        if token_mask is not None:
            m = token_mask.reshape(-1, 1).to(probs.dtype)
            n = m.sum().clamp(min=1.0)
            f = (chosen * m).sum(0) / (n * self.top_k)
            p = (probs * m).sum(0) / n
        else:
            f = chosen.mean(0) / self.top_k
            p = probs.mean(0)
        return self.num_experts * (f * p).sum()

    def expert_parameters(self) -> int:
        """Parameters of one expert (for active-parameter counts)."""
        return self.w_gate[0].numel() + self.w_up[0].numel() + self.w_down[0].numel()
