"""Shared fixtures: small, seeded configurations and models.

Every model here is built under a fixed seed and returned in eval mode, so two tests that ask
for the same fixture get bit-identical weights. Keep models small: the whole suite runs on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig

MODEL_SEED = 0

# The suite's models are tiny: one intra-op thread is faster than two, and immune to the
# OpenMP oversubscription that slows small ops ~100x when another process shares the cores.
torch.set_num_threads(1)


def build_model(config: RxTConfig, seed: int = MODEL_SEED) -> ReactiveTransformer:
    """A ``ReactiveTransformer`` initialised under ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return ReactiveTransformer(config).eval()


def moe_sqa_overrides() -> dict[str, Any]:
    """A scaled-down paper-nano: SQA heads (8 heads, 4 query, 2 kv) everywhere, MoE decoder
    (6 experts, top-2), interlayer memory. Small enough for per-test construction."""
    sqa = {"num_heads": 8, "num_query_heads": 4, "num_kv_heads": 2}
    return {
        "vocab_size": 256,
        "d_model": 64,
        "num_layers": 2,
        "max_seq_len": 64,
        "decoder": {
            "self_attention": sqa,
            "cross_attention": sqa,
            "ffn_dim": 128,
            "moe": {"num_experts": 6, "top_k": 2, "expert_dim": 32, "aux_loss_weight": 0.01},
        },
        "encoder": {"self_attention": sqa, "ffn_dim": 128},
        "memory": {"num_slots": 16, "variant": "interlayer", "attention": sqa},
    }


@pytest.fixture
def make_model() -> Callable[..., ReactiveTransformer]:
    """Factory: ``make_model(config, seed=0)`` → seeded model in eval mode."""
    return build_model


@pytest.fixture
def tiny_config() -> RxTConfig:
    """The ``tiny`` preset (d=64, 2 layers, GQA decoder, 32 slots, vocab 1024)."""
    return RxTConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config: RxTConfig) -> ReactiveTransformer:
    return build_model(tiny_config)


@pytest.fixture
def moe_sqa_config() -> RxTConfig:
    """Paper-nano-like MoE + SQA configuration, shrunk (d=64, 2 layers, 16 slots, vocab 256)."""
    return RxTConfig.preset("paper-nano", **moe_sqa_overrides())


@pytest.fixture
def moe_sqa_model(moe_sqa_config: RxTConfig) -> ReactiveTransformer:
    return build_model(moe_sqa_config)
