"""Language models with a state, sized to a number of state elements: RxT's peers.

Each peer is a Hugging Face ``transformers`` causal LM of one family; :func:`peer_config` builds
its config for a width, a depth and a *target* number of state elements, by moving the one knob
of that family that sizes its state, and :func:`state_elements` counts what the model must keep
between two turns to continue a conversation (per conversation, every layer):

============== ============================================ ===================================
family         state per layer                              knob
============== ============================================ ===================================
mamba2         ``H·p·N`` (SSM) + ``(d_in + 2·G·N)·(k−1)``   ``state_size`` N
               (the last k−1 inputs of the causal conv)
xlstm          ``H·(d_qk·d_v + d_qk + 1)`` (C, n, m)         heads H, ``qk/v_dim_factor``
gated-deltanet ``H_v·d_k·d_v`` + ``(2·H_k·d_k + H_v·d_v)·(k−1)`` heads and head widths
               (Qwen3-Next's linear-attention layers only)
rwkv           ``2·d + 3·a`` (two token-shift vectors;       ``attention_hidden_size`` a
               the WKV numerator, denominator, max)
sliding-window ``2·H_kv·h·(W−1)`` (keys and values of the    window W
               last W−1 tokens; Mistral)
llama          ``2·H_kv·h`` per token of the conversation   none: it grows
============== ============================================ ===================================

Counted in elements; bytes are elements × the served dtype's size. The target is matched as
closely as the knob allows (:func:`peer_config` returns the count reached). Everything runs
the models' pure-PyTorch paths (no fused kernels are installed on CPU).

Known limits on this transformers version (5.x): xLSTM's ``mode="train"`` needs sequence
lengths divisible by ``chunk_size`` (its chunkwise kernel raises otherwise), so the peer uses
``mode="inference"``, which handles any length and back-propagates; Qwen3-Next with only
linear-attention layers works without a cache (every benchmark pass here is a full forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from rxt.baselines.llama import BOS_ID, EOS_ID, PAD_ID

__all__ = [
    "PEERS",
    "build_peer",
    "grows",
    "matmul_parameters",
    "mixing_flops_per_token",
    "peer_config",
    "state_elements",
]

PEERS = ("mamba2", "xlstm", "gated-deltanet", "rwkv", "sliding-window", "llama")
_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
_CONV = 4  # causal-conv width of Mamba-2 and the gated DeltaNet (both libraries' default)


def _mamba2(vocab: int, d: int, layers: int, knob: int, init_std: float) -> PretrainedConfig:
    head_dim = 16
    return transformers.Mamba2Config(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, expand=2,
        head_dim=head_dim, num_heads=2 * d // head_dim, n_groups=1, state_size=knob,
        conv_kernel=_CONV, chunk_size=64, tie_word_embeddings=False, **_IDS,
    )  # fmt: skip


def _xlstm(vocab: int, d: int, layers: int, knob: tuple, init_std: float) -> PretrainedConfig:
    heads, qk, v = knob
    return transformers.xLSTMConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_heads=heads,
        qk_dim_factor=qk, v_dim_factor=v, mode="inference", chunk_size=16,
        autocast_kernel_dtype="float32", inference_state_dtype="float32",
        tie_word_embeddings=False, **_IDS,
    )  # fmt: skip


def _deltanet(vocab: int, d: int, layers: int, knob: tuple, init_std: float) -> PretrainedConfig:
    heads, width = knob
    return transformers.Qwen3NextConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d,
        num_attention_heads=4, num_key_value_heads=4, head_dim=d // 4,
        layer_types=["linear_attention"] * layers, mlp_only_layers=list(range(layers)),
        num_experts=0, linear_num_key_heads=heads, linear_num_value_heads=heads,
        linear_key_head_dim=width, linear_value_head_dim=width,
        linear_conv_kernel_dim=_CONV, initializer_range=init_std, tie_word_embeddings=False,
        **_IDS,
    )  # fmt: skip


def _rwkv(vocab: int, d: int, layers: int, knob: int, init_std: float) -> PretrainedConfig:
    return transformers.RwkvConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, attention_hidden_size=knob,
        intermediate_size=4 * d, context_length=4096, tie_word_embeddings=False, **_IDS,
    )  # fmt: skip


def _mistral(vocab: int, d: int, layers: int, knob: int, init_std: float) -> PretrainedConfig:
    return transformers.MistralConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d,
        num_attention_heads=4, num_key_value_heads=4, head_dim=d // 4, sliding_window=knob,
        max_position_embeddings=4096, initializer_range=init_std, tie_word_embeddings=False,
        attn_implementation="sdpa", **_IDS,
    )  # fmt: skip


def _llama(vocab: int, d: int, layers: int, knob: Any, init_std: float) -> PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d,
        num_attention_heads=4, num_key_value_heads=4, head_dim=d // 4,
        max_position_embeddings=4096, initializer_range=init_std, tie_word_embeddings=False,
        attn_implementation="sdpa", **_IDS,
    )  # fmt: skip


_BUILDERS: dict[str, Callable[..., PretrainedConfig]] = {
    "mamba2": _mamba2,
    "xlstm": _xlstm,
    "gated-deltanet": _deltanet,
    "rwkv": _rwkv,
    "sliding-window": _mistral,
    "llama": _llama,
}


def _family(config: PretrainedConfig) -> str:
    kind = {
        "mamba2": "mamba2",
        "xlstm": "xlstm",
        "qwen3_next": "gated-deltanet",
        "rwkv": "rwkv",
        "mistral": "sliding-window",
        "llama": "llama",
    }.get(config.model_type)
    if kind is None:
        raise ValueError(f"not a peer model: model_type {config.model_type!r}")
    return kind


def _kv_per_token(c: PretrainedConfig) -> int:
    return 2 * c.num_key_value_heads * c.head_dim


def state_elements(config: PretrainedConfig, tokens: int = 0) -> int:
    """Elements a model of ``config`` keeps between turns (module table), all layers; for the
    full-attention ``llama``, after ``tokens`` tokens of conversation."""
    c, layers = config, config.num_hidden_layers
    kind = _family(c)
    if kind == "mamba2":
        inner = c.expand * c.hidden_size
        per = c.num_heads * c.head_dim * c.state_size
        per += (inner + 2 * c.n_groups * c.state_size) * (c.conv_kernel - 1)
    elif kind == "xlstm":
        per = c.num_heads * (c.qk_head_dim * c.v_head_dim + c.qk_head_dim + 1)
    elif kind == "gated-deltanet":
        hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
        per = hv * dk * dv + (2 * hk * dk + hv * dv) * (c.linear_conv_kernel_dim - 1)
    elif kind == "rwkv":
        per = 2 * c.hidden_size + 3 * c.attention_hidden_size
    elif kind == "sliding-window":
        per = _kv_per_token(c) * (c.sliding_window - 1)
    else:
        per = _kv_per_token(c) * tokens
    return layers * per


def grows(config: PretrainedConfig) -> bool:
    """Whether the state grows with the conversation (full attention)."""
    return _family(config) == "llama"


def _around(x: float, low: int) -> list[int]:
    return sorted({max(low, math.floor(x)), max(low, math.ceil(x))})


def _candidates(kind: str, d: int, layers: int, target: int) -> list[Any]:
    """Knob values to try: the two integers around the closed-form solution where the state is
    linear in the knob, a small grid otherwise."""
    per = target / layers
    if kind == "mamba2":  # per = 2d·N + (2d + 2N)(k-1)
        return _around((per - 2 * d * (_CONV - 1)) / (2 * d + 2 * (_CONV - 1)), 1)
    if kind == "xlstm":
        factors = (0.5, 1.0, 2.0, 4.0)
        return [(h, q, v) for h in (1, 2, 4, 8, 16) for q in factors for v in factors]
    if kind == "gated-deltanet":
        return [(h, w) for h in (1, 2, 4, 8) for w in (4, 8, 16, 24, 32, 48, 64, 96, 128)]
    if kind == "rwkv":  # per = 2d + 3a
        return _around((per - 2 * d) / 3, 1)
    if kind == "sliding-window":  # per = 2·d·(W-1) with H_kv·h = d
        return _around(1 + per / (2 * d), 2)
    return [None]


def peer_config(
    kind: str,
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    state_target: int | None,
    init_std: float = 0.02,
) -> tuple[PretrainedConfig, int]:
    """``(config, state elements reached)`` of a ``kind`` peer (:data:`PEERS`) whose state is
    closest to ``state_target`` in ratio (ties: the smaller state); ``llama`` ignores the
    target and reports 0 (its state grows, :func:`state_elements` with ``tokens``).
    ``init_std``: weight init of the attention models (Llama, Mistral) and the DeltaNet; the
    others keep their library's initialisation."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {', '.join(PEERS)}, got {kind!r}")
    build = _BUILDERS[kind]
    if kind == "llama":
        return build(vocab_size, d_model, num_layers, None, init_std), 0
    if state_target is None or state_target < 1:
        raise ValueError(f"state_target must be a positive int for {kind}, got {state_target!r}")
    best = None
    for knob in _candidates(kind, d_model, num_layers, state_target):
        try:
            config = build(vocab_size, d_model, num_layers, knob, init_std)
        except (ValueError, TypeError):  # e.g. heads that do not divide the width
            continue
        n = state_elements(config)
        score = (abs(math.log(n / state_target)), n)
        if best is None or score < best[0]:
            best = (score, config, n)
    if best is None:
        raise ValueError(f"no {kind} configuration reaches a state of {state_target}")
    return best[1], best[2]


def build_peer(config: PretrainedConfig, *, seed: int) -> PreTrainedModel:
    """The causal LM of ``config``, weights drawn on the CPU under ``torch.manual_seed(seed)``
    (the global RNG left as it was), in float32, train mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().train()


def matmul_parameters(model: nn.Module) -> int:
    """Weights a token is multiplied by: every matrix but the input embeddings (a lookup);
    the LM head counts. FLOPs per token are about twice this (:func:`mixing_flops_per_token`
    adds the part that depends on the state)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for p in model.parameters():
        if p.dim() >= 2 and (id(p) not in embeddings or (head is not None and p is head.weight)):
            total += p.numel()
    return total


def mixing_flops_per_token(config: PretrainedConfig, context: int) -> int:
    """FLOPs per token of the sequence mixing that is not a weight multiply: attention scores
    and the weighted sum (``4·H·h`` per attended token per layer) for the attention models; for
    the recurrent ones about 4 per state element (decay and write, then the read-out)."""
    kind = _family(config)
    if kind in ("llama", "sliding-window"):
        span = context if kind == "llama" else min(context, config.sliding_window)
        heads = config.num_attention_heads * config.head_dim
        return config.num_hidden_layers * 4 * heads * span
    return 4 * state_elements(config)
