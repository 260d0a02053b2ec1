"""Per-turn caches used while generating one answer (paper §4, steps 1–2).

Neither is conversation state: both are scratch values for one turn, owned by the caller.
- ``MemoryKV``: the memory cross-attention keys/values of every decoder layer, projected from
  STM_{t-1} once per turn, since memory does not change while the answer is generated.
- ``KVCache``: self-attention keys/values of *this turn's* tokens only, preallocated so that
  appending a token never reallocates. Its size is bounded by one interaction, not by the
  conversation, which is what keeps per-token cost flat over turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MemoryKV:
    """Per-layer memory keys/values ``(B, H_kv, S, hd)`` and an optional mask ``(B, 1, 1, S)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class KVCache:
    """Preallocated self-attention cache: per layer ``(B, H_kv, capacity, hd)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    _pending: int = field(default=0, repr=False)

    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        return cls(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values for ``layer``; return views of everything cached."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        self._pending = t
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self) -> None:
        """Advance past the step just appended (called once after all layers ran)."""
        self.length += self._pending
        self._pending = 0
