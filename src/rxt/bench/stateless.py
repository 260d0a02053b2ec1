"""The stateless decoder-only baseline that RxT is compared against (paper §7, "Baseline").

A stateless LLM has no memory between turns: to answer turn ``N`` it must re-read the whole
conversation so far, so its prompt grows by one query and one answer every turn, and the
cost of a turn grows with the history (prompt processing O((N·T)²), each generated token
attends over O(N·T) cached positions). RxT instead reads a fixed-size Short-Term Memory, so
its per-turn cost does not depend on ``N``.

The baseline here is Hugging Face ``transformers``' ``LlamaForCausalLM`` with random weights,
sized by :func:`llama_config_for` to the RxT *decoder*: the same width ``d_model``, depth
``num_layers``, self-attention heads (query, key/value and head width), SwiGLU feed-forward
width (for an MoE decoder, the width of the experts a token actually runs through), RMSNorm,
RoPE, vocabulary and embedding tying. The only thing it lacks is RxT's memory
cross-attention, which is exactly the difference under test. It is a fair opponent because:

* the architecture is the same family (pre-norm, RoPE, GQA, SwiGLU, RMSNorm) at the same size,
  so per-token compute over a given context is comparable;
* generation uses transformers' own optimised, KV-cached ``generate`` with SDPA attention,
  not a hand-written loop that could be slower than necessary;
* what it is charged for is only what a stateless model must do: re-read the history.

Random weights are enough for latency: the cost of a forward pass does not depend on the
weight values, and every run generates exactly ``new_tokens`` tokens (EOS cannot end a reply
early), so two runs with the same lengths do the same work.

``transformers`` is not a dependency of ``rxt``; this module needs it installed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
    from transformers.generation.streamers import BaseStreamer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rxt.bench.stateless needs Hugging Face transformers: pip install transformers"
    ) from exc

from rxt.config import RxTConfig
from rxt.tokenizer import SPECIAL_TOKENS

__all__ = [
    "StatelessConversation",
    "TimedGeneration",
    "build_stateless_baseline",
    "llama_config_for",
    "timed_generate",
]

PAD_ID = SPECIAL_TOKENS.index("[PAD]")
BOS_ID = SPECIAL_TOKENS.index("[BOS]")
EOS_ID = SPECIAL_TOKENS.index("[EOS]")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
    _check_positive_int(max_positions, "max_positions")
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


def build_stateless_baseline(
    config: RxTConfig,
    *,
    max_positions: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """The baseline for ``config``: a ``LlamaForCausalLM`` with seeded random weights, in eval mode.

    Weights are drawn on the CPU in float32 under ``seed`` (the global RNG is left untouched),
    then moved to ``device`` and ``dtype``, so a seed gives the same model on every device.
    The model's generation config is set for greedy decoding with rxt's special ids.
    """
    llama_config = llama_config_for(config, max_positions=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = LlamaForCausalLM(llama_config)
    model = model.to(device=device, dtype=dtype).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gen.do_sample, gen.num_beams, gen.use_cache = False, 1, True
    gen.temperature = gen.top_p = gen.top_k = None
    return model


@dataclass
class TimedGeneration:
    """One timed ``generate`` call of the baseline."""

    prompt_tokens: int  # tokens the model had to read before answering
    ttft_s: float  # time to first token: from the call until the first new token exists
    reply_s: float  # the whole call, until all new ids are on the host
    new_token_ids: list[int]


class _FirstTokenClock(BaseStreamer):
    """Notes when ``generate`` hands over its first new token.

    ``generate`` calls ``put`` once with the prompt, then once per new token (moved to the
    CPU, so on an accelerator the token has been computed by then). On MPS, transformers
    streams one step late, which would overstate the time to first token by one step.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _generation_config(model: PreTrainedModel, new_tokens: int):
    gen = copy.deepcopy(model.generation_config)
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    gen.update(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS from a random model must not end the reply early
        max_length=None,
        min_length=None,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=pad if pad is not None else eos,
        eos_token_id=eos,
    )
    return gen


def timed_generate(
    model: PreTrainedModel, prompt_ids: Sequence[int], *, new_tokens: int
) -> TimedGeneration:
    """Greedy, KV-cached ``model.generate`` of exactly ``new_tokens`` tokens after ``prompt_ids``.

    ``min_new_tokens = max_new_tokens``, so EOS is suppressed until the last step and the reply
    always has ``new_tokens`` tokens (the tokens equal a greedy argmax loop with the EOS logit
    masked). Runs under ``torch.inference_mode``; sampling settings are cleared so
    ``generate`` has nothing to warn about.
    """
    _check_positive_int(new_tokens, "new_tokens")
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("prompt_ids must not be empty")
    vocab = model.config.vocab_size
    for i in prompt:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise ValueError(f"prompt_ids: {i!r} is not a token id in [0, vocab_size={vocab})")
    limit = model.config.max_position_embeddings
    if len(prompt) + new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt)}) + new_tokens ({new_tokens}) = {len(prompt) + new_tokens} "
            f"tokens exceeds the model's max_position_embeddings={limit}"
        )
    gen = _generation_config(model, new_tokens)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    attention_mask = torch.ones_like(input_ids)
    clock = _FirstTokenClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen,
            streamer=clock,
        )
        new_ids = out[0, len(prompt) :].tolist()
        end = time.perf_counter()
    if len(new_ids) != new_tokens or clock.first_token_at is None:
        raise RuntimeError(f"generate returned {len(new_ids)} new tokens, expected {new_tokens}")
    return TimedGeneration(
        prompt_tokens=len(prompt),
        ttft_s=clock.first_token_at - start,
        reply_s=end - start,
        new_token_ids=new_ids,
    )


class StatelessConversation:
    """A multi-turn conversation with the stateless baseline: every turn re-reads the history.

    Each :meth:`turn` prompts the model with ``history + query_ids``, then appends the query
    and the generated reply to the history, so ``prompt_tokens`` grows by one query and one
    answer per turn (O(N·T) at turn N).
    """

    def __init__(self, model: PreTrainedModel, *, max_positions: int | None = None) -> None:
        limit = model.config.max_position_embeddings
        if max_positions is None:
            max_positions = limit
        _check_positive_int(max_positions, "max_positions")
        if max_positions > limit:
            raise ValueError(
                f"max_positions={max_positions} exceeds the model's max_position_embeddings={limit}"
            )
        self.model = model
        self.max_positions = max_positions
        self._history: list[int] = []
        self.turns = 0

    @property
    def history(self) -> list[int]:
        """All tokens so far (queries and replies), as a copy."""
        return list(self._history)

    def reset(self) -> None:
        """Start a new conversation."""
        self._history.clear()
        self.turns = 0

    def turn(self, query_ids: Sequence[int], *, new_tokens: int) -> TimedGeneration:
        """Answer one query (already formatted prompt ids) after re-reading the history."""
        _check_positive_int(new_tokens, "new_tokens")
        query = list(query_ids)
        if not query:
            raise ValueError("query_ids must not be empty")
        total = len(self._history) + len(query) + new_tokens
        if total > self.max_positions:
            raise ValueError(
                f"turn {self.turns + 1}: history ({len(self._history)}) + query ({len(query)}) "
                f"+ new_tokens ({new_tokens}) = {total} tokens exceeds "
                f"max_positions={self.max_positions}; the stateless baseline re-reads the whole "
                "history every turn. Build it with a larger max_positions or reset()."
            )
        result = timed_generate(self.model, self._history + query, new_tokens=new_tokens)
        self._history += query + result.new_token_ids
        self.turns += 1
        return result
