"""The Llama sizing shared by every stateless baseline: a ``LlamaConfig`` of the RxT decoder's
shape (the latency opponent of :mod:`rxt.bench.stateless`, the starting point of the
parameter-matched quality opponent of :mod:`rxt.baselines.model`)."""

from __future__ import annotations

from transformers import LlamaConfig

from rxt.config import RxTConfig
from rxt.tokenizer import SPECIAL_TOKENS

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "llama_config_for"]

PAD_ID = SPECIAL_TOKENS.index("[PAD]")
BOS_ID = SPECIAL_TOKENS.index("[BOS]")
EOS_ID = SPECIAL_TOKENS.index("[EOS]")


def llama_config_for(config: RxTConfig, *, max_positions: int) -> LlamaConfig:
    """A ``LlamaConfig`` matching the RxT decoder of ``config``, minus memory cross-attention.

    Dimensions:

    * ``hidden_size = d_model``, ``num_hidden_layers = num_layers``, ``vocab_size``,
      ``rms_norm_eps = norm_eps``, RoPE base ``rope_theta``, ``tie_word_embeddings``, and
      ``initializer_range = config.resolved_init_std`` (RxT's own init scale).
    * Self-attention: ``num_attention_heads`` is the decoder's *query* head count ``H_q`` and
      ``num_key_value_heads`` its ``H_kv``, with ``head_dim = d_model / H`` (``H`` =
      ``num_heads``). Without SQA (``H_q = H``, the ``tiny`` and ``small`` presets) this is
      plain MHA/GQA with ``H`` heads. With SQA (``H_q < H``, ``paper-nano``) the query and
      output projections are ``d → H_q·d/H → d``, exactly as in RxT's decoder, so the two
      self-attentions have the same parameters and the same score FLOPs per token.
    * Feed-forward: SwiGLU with ``intermediate_size = decoder.ffn_dim`` for a dense decoder.
      For an MoE decoder it is ``top_k * expert_dim``: a SwiGLU of that width has
      ``3·d·top_k·expert_dim`` weights, the same parameters and FLOPs per token as the
      ``top_k`` experts each token is routed through. The baseline thus matches RxT's
      *active* (per-token) compute, not its total parameter count; the router (``d × E``)
      and the idle experts have no counterpart.
    * ``max_position_embeddings = max_positions``: the longest conversation (history + query
      + reply) the baseline is meant to hold. Pick it from the benchmark's longest run, not
      from ``config.max_seq_len``, which bounds one RxT interaction.
    * ``bos/eos/pad_token_id`` are rxt's special ids ([BOS]=1, [EOS]=2, [PAD]=0); no biases;
      SDPA attention.
    """
    if not isinstance(config, RxTConfig):
        raise TypeError(f"config must be an RxTConfig, got {type(config).__name__}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    attn = config.decoder.self_attention
    moe = config.decoder.moe
    intermediate = moe.top_k * moe.expert_dim if moe is not None else config.decoder.ffn_dim
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=intermediate,
        num_hidden_layers=config.num_layers,
        num_attention_heads=attn.query_heads,
        num_key_value_heads=attn.kv_heads,
        head_dim=config.d_model // attn.num_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        initializer_range=config.resolved_init_std,
        rms_norm_eps=config.norm_eps,
        use_cache=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
