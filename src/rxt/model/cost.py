"""Analytic cost of one RxT turn, in matrix-multiply FLOPs (paper §4, Table 1).

Counts exactly the multiply-accumulates the PyTorch code performs (2 FLOPs each) in linear
layers, attention scores and attention-weighted values, the way ``torch.utils.flop_counter``
counts them; element-wise work (norms, RoPE, gates' scale-and-shift, softmax) is left out. A test
checks these formulas against ``FlopCounterMode`` on the real model, so the numbers describe the
code rather than an idealised model.

None of the formulas has the conversation length N as an input: that is the point of RxT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rxt.config import AttentionConfig, RxTConfig


def _attention_flops(
    d: int, heads: AttentionConfig, n_q: int, n_kv: int, *, project_kv: bool = True
) -> int:
    hd = d // heads.num_heads
    q_width, kv_width = heads.query_heads * hd, heads.kv_heads * hd
    flops = 2 * n_q * d * q_width + 2 * n_q * q_width * d  # q and output projections
    if project_kv:
        flops += 2 * 2 * n_kv * d * kv_width
    return flops + 2 * 2 * n_q * n_kv * q_width  # scores QK^T and weights·V


def _swiglu_flops(d: int, hidden: int, tokens: int) -> int:
    return 2 * 3 * tokens * d * hidden


def memory_kv_flops(config: RxTConfig, slots: int | None = None) -> int:
    """Projecting memory to every decoder layer's cross-attention keys/values (once a turn)."""
    s = config.memory.num_slots if slots is None else slots
    heads = config.decoder.cross_attention
    kv_width = heads.kv_heads * (config.d_model // heads.num_heads)
    return config.num_layers * 2 * 2 * s * config.d_model * kv_width


def decoder_flops(
    config: RxTConfig, new_tokens: int, cached_tokens: int = 0, logits_tokens: int | None = None
) -> int:
    """One decoder call over ``new_tokens`` after ``cached_tokens`` of this turn, memory K/V
    precomputed; ``logits_tokens`` positions go through the LM head (default: all new)."""
    d, s = config.d_model, config.memory.num_slots
    dec = config.decoder
    per_layer = _attention_flops(d, dec.self_attention, new_tokens, cached_tokens + new_tokens)
    # Self-attention K/V are projected only for the new tokens; the cache holds the rest.
    hd = d // dec.self_attention.num_heads
    per_layer -= 2 * 2 * cached_tokens * d * dec.self_attention.kv_heads * hd
    per_layer += _attention_flops(d, dec.cross_attention, new_tokens, s, project_kv=False)
    if dec.moe is None:
        per_layer += _swiglu_flops(d, dec.ffn_dim, new_tokens)
    else:
        per_layer += 2 * new_tokens * d * dec.moe.num_experts  # router
        per_layer += dec.moe.top_k * _swiglu_flops(d, dec.moe.expert_dim, new_tokens)
    n_logits = new_tokens if logits_tokens is None else logits_tokens
    return config.num_layers * per_layer + 2 * n_logits * d * config.vocab_size


def encoder_flops(config: RxTConfig, tokens: int) -> int:
    d = config.d_model
    per_layer = _attention_flops(d, config.encoder.self_attention, tokens, tokens)
    per_layer += _swiglu_flops(d, config.encoder.ffn_dim, tokens)
    return config.num_layers * per_layer


def memory_attention_flops(config: RxTConfig, tokens: int) -> int:
    """Writing ED of ``tokens`` tokens into all STM layers (pre-step, write and gates)."""
    d, s, mem = config.d_model, config.memory.num_slots, config.memory
    per_layer = _attention_flops(d, mem.attention, s, tokens)
    gates = 1
    if mem.variant != "simple":
        per_layer += _attention_flops(d, mem.attention, s, s)
        gates = 2
    if mem.gate == "dynamic" and (
        mem.gate_granularity == "slot" or mem.gate_projection == "linear"
    ):
        width = d if mem.gate_granularity == "feature" else 1
        per_layer += gates * 2 * s * d * width
    return config.num_layers * per_layer


@dataclass(frozen=True)
class TurnCost:
    """FLOPs of one turn with a ``query_tokens`` prompt and ``answer_tokens`` generated."""

    memory_kv: int  # STM → cross-attention K/V, once per turn
    prefill: int  # the prompt [BOS][Q] X_t [A]
    generation: int  # all answer tokens after the first, one cached step each
    memory_update: int  # Encoder(concat(X_t, Y_t)) + MemAttn: asynchronous, off the critical path
    decoder_tokens: int  # tokens the decoder processes this turn

    @property
    def user_facing(self) -> int:
        return self.memory_kv + self.prefill + self.generation

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "user_facing": self.user_facing}


def turn_cost(config: RxTConfig, query_tokens: int, answer_tokens: int) -> TurnCost:
    """Cost of a turn as the generation loop runs it: prefill with last-position logits, then
    one cached step per further answer token. Independent of how many turns came before."""
    generation = sum(
        decoder_flops(config, 1, query_tokens + i, logits_tokens=1)
        for i in range(max(answer_tokens - 1, 0))
    )
    interaction = query_tokens + answer_tokens
    return TurnCost(
        memory_kv=memory_kv_flops(config),
        prefill=decoder_flops(config, query_tokens, 0, logits_tokens=1),
        generation=generation,
        memory_update=encoder_flops(config, interaction)
        + memory_attention_flops(config, interaction),
        decoder_tokens=query_tokens + max(answer_tokens - 1, 0),
    )
