"""The systems of the state-bytes benchmark, built to a state size: RxT and its peers.

``rxt`` is a :class:`~rxt.model.reactive_transformer.ReactiveTransformer` of a preset with as
many STM slots as the target needs (STM = L × S × d elements); the peers are the Hugging Face
models of :mod:`rxt.baselines.fixed_state`. :class:`BuiltSystem` carries what the report puts
beside recall: state elements and bytes, parameters, and per-turn FLOPs
(:meth:`BuiltSystem.turn_flops`):

* RxT: :func:`rxt.model.cost.turn_cost` (exact matrix-multiply FLOPs: memory K/V, prefill,
  generation, memory update), which has no conversation-length input;
* a peer: ``2 ×`` its weights per token (the LM head only for answer tokens, as RxT computes
  logits only there) plus its sequence mixing per token
  (:func:`rxt.baselines.fixed_state.mixing_flops_per_token`), which grows with the context for
  full attention only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from rxt.baselines.fixed_state import (
    PEERS,
    build_peer,
    grows,
    matmul_parameters,
    mixing_flops_per_token,
    peer_config,
    state_elements,
)
from rxt.config import RxTConfig
from rxt.model.cost import turn_cost
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.validated import Validated

__all__ = ["SYSTEMS", "BuiltSystem", "ModelShape", "build_system", "rxt_slots"]

SYSTEMS = ("rxt", *PEERS)


@dataclass(frozen=True)
class ModelShape(Validated):
    """Sizes every system shares: RxT's preset (its width and depth), and the peers' depth at
    the same width. ``dtype_bytes``: bytes per state element as served (4: float32)."""

    rxt_preset: str = "tiny"
    peer_layers: int = 4
    dtype_bytes: int = 4
    max_seq_len: int = 256  # RxT's longest interaction

    def validate(self) -> None:
        self.require("peer_layers", self.peer_layers >= 1, "must be >= 1")
        self.require("dtype_bytes", self.dtype_bytes in (1, 2, 4, 8), "must be 1, 2, 4 or 8")

    def rxt_config(self, vocab_size: int, slots: int) -> RxTConfig:
        base = RxTConfig.preset(self.rxt_preset)
        memory = {**base.memory.to_dict(), "num_slots": slots}
        return base.replace(vocab_size=vocab_size, max_seq_len=self.max_seq_len, memory=memory)


def rxt_slots(shape: ModelShape, state_target: int) -> int:
    """STM slots per layer closest to ``state_target`` elements (at least 1)."""
    base = RxTConfig.preset(shape.rxt_preset)
    return max(1, round(state_target / (base.num_layers * base.d_model)))


@dataclass
class BuiltSystem:
    name: str
    model: nn.Module
    state_elements: int  # per conversation; 0 for a growing state (see kv_elements)
    parameters: int
    settings: dict[str, Any]
    dtype_bytes: int

    @property
    def is_rxt(self) -> bool:
        return self.name == "rxt"

    @property
    def grows(self) -> bool:
        return not self.is_rxt and grows(self.model.config)

    def kv_elements(self, tokens: int) -> int:
        """State elements after ``tokens`` tokens of conversation (fixed unless it grows)."""
        if self.grows:
            return state_elements(self.model.config, tokens)
        return self.state_elements

    def turn_flops(self, turns: Sequence[tuple[int, int]]) -> list[int]:
        """FLOPs of each turn of a conversation whose turn t has ``turns[t] = (prompt tokens,
        answer tokens)`` (the prompt is ``[BOS][Q] query [A]``, the answer ends with [EOS])."""
        if self.is_rxt:
            config = self.model.config
            out = []
            for query, answer in turns:
                cost = turn_cost(config, query, answer)
                out.append(cost.user_facing + cost.memory_update)
            return out
        head = self.model.get_output_embeddings().weight.numel()
        body = matmul_parameters(self.model) - head
        config, context, out = self.model.config, 0, []
        for query, answer in turns:
            flops = 2 * body * (query + answer) + 2 * head * answer
            for _ in range(query + answer):
                context += 1
                flops += mixing_flops_per_token(config, context)
            out.append(flops)
        return out


def build_system(
    name: str, *, state_target: int, vocab_size: int, shape: ModelShape, seed: int
) -> BuiltSystem:
    """System ``name`` (:data:`SYSTEMS`) sized to ``state_target`` state elements (ignored by
    ``llama``), weights drawn from ``seed``."""
    if name not in SYSTEMS:
        raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {name!r}")
    if name == "rxt":
        import torch

        slots = rxt_slots(shape, state_target)
        config = shape.rxt_config(vocab_size, slots)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ReactiveTransformer(config)
        elements = config.num_layers * slots * config.d_model
        parameters = model.parameter_counts()["inference"]
        settings = {"preset": shape.rxt_preset, "num_slots": slots, "layers": config.num_layers}
        return BuiltSystem(name, model.train(), elements, parameters, settings, shape.dtype_bytes)
    rxt = RxTConfig.preset(shape.rxt_preset)
    config, elements = peer_config(
        name,
        vocab_size=vocab_size,
        d_model=rxt.d_model,
        num_layers=shape.peer_layers,
        state_target=None if name == "llama" else state_target,
        init_std=rxt.resolved_init_std,
    )
    model = build_peer(config, seed=seed)
    parameters = sum(p.numel() for p in model.parameters())
    settings = {"model_type": config.model_type, "layers": shape.peer_layers}
    for key in (
        "state_size", "num_heads", "qk_dim_factor", "v_dim_factor", "linear_num_value_heads",
        "linear_key_head_dim", "attention_hidden_size", "sliding_window",
    ):  # fmt: skip
        if key in config.to_dict():
            settings[key] = getattr(config, key)
    return BuiltSystem(name, model, elements, parameters, settings, shape.dtype_bytes)
