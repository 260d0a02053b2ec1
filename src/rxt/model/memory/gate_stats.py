"""Statistics of the residual gate G while the memory is written: is the gate learning?

A gate stuck near its initial value (G = 0.5 everywhere) makes the memory a fixed moving average;
a trained gate opens for what should be written and closes to keep the rest. ``record_gates``
watches the write gate of every memory-attention layer (the gate that produces STM_t[l]) and
keeps its G values, so training can log their quantiles per layer and ``rxt eval`` can print
them. The model keeps no state: the recorder lives outside it, in forward hooks, for the
duration of a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["QUANTILES", "GateRecorder", "record_gates"]

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


class GateRecorder:
    """G values of each layer's write gate, gathered while a :func:`record_gates` block runs.

    ``rows``: keep only the first ``rows`` batch rows of every write (None: all), so a training
    step pays for a small sample only."""

    def __init__(self, layers: int, rows: int | None = None) -> None:
        self.rows = rows
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def add(self, layer: int, gate: nn.Module, previous: torch.Tensor, update: torch.Tensor):
        if self.rows is not None:
            previous, update = previous[: self.rows], update[: self.rows]
        with torch.no_grad():
            g = gate.gate_values(previous.detach(), update.detach())
            self.values[layer].append(g.expand_as(previous).float().reshape(-1))

    def quantiles(self, qs: tuple[float, ...] = QUANTILES) -> list[dict[str, float]]:
        """Per layer, ``{"p01": ..., "p50": ..., "mean": ...}`` over every recorded write (an
        empty dict for a layer never written or with no dynamic gate)."""
        out = []
        for values in self.values:
            if not values:
                out.append({})
                continue
            g = torch.cat(values)
            if g.numel() > 1 << 20:  # torch.quantile's input limit; a strided sample suffices
                g = g[:: -(-g.numel() // (1 << 20))]
            q = torch.quantile(g, torch.tensor(qs, dtype=g.dtype))
            stats = {f"p{round(p * 100):02d}": float(v) for p, v in zip(qs, q, strict=True)}
            stats["mean"] = float(g.mean())
            out.append(stats)
        return out


@contextmanager
def record_gates(model: nn.Module, rows: int | None = None) -> Iterator[GateRecorder]:
    """``with record_gates(model) as gates:`` — every memory write inside the block records
    its G (see :class:`GateRecorder`); the hooks are removed on exit. A model whose gate is
    ``"none"`` (plain residual) records nothing."""
    layers = model.memory_attention.layers
    recorder = GateRecorder(len(layers), rows)
    handles = []
    for i, layer in enumerate(layers):
        gate = layer.gate
        if gate.kind == "none":
            continue

        def hook(module, inputs, output, i=i) -> None:
            recorder.add(i, module, *inputs)

        handles.append(gate.register_forward_hook(hook))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
