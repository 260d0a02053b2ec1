"""The stateless decoder-only baseline that RxT is compared against (paper §7, "Baseline").

A stateless LLM has no memory between turns: to answer turn ``N`` it must re-read the whole
conversation so far, so its prompt grows by one query and one answer every turn, and the
cost of a turn grows with the history (prompt processing O((N·T)²), each generated token
attends over O(N·T) cached positions). RxT instead reads a fixed-size Short-Term Memory, so
its per-turn cost does not depend on ``N``.

The baseline here is Hugging Face ``transformers``' ``LlamaForCausalLM`` with random weights,
sized by :func:`rxt.baselines.llama.llama_config_for` to the RxT *decoder*: the same width
``d_model``, depth ``num_layers``, self-attention heads (query, key/value and head width),
SwiGLU feed-forward width (for an MoE decoder, the width of the experts a token actually runs
through), RMSNorm, RoPE, vocabulary and embedding tying. The only thing it lacks is RxT's memory
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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

try:
    from transformers import LlamaForCausalLM, PreTrainedModel
    from transformers.generation.streamers import BaseStreamer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rxt.bench.stateless needs Hugging Face transformers: pip install transformers"
    ) from exc

from rxt.baselines.llama import BOS_ID, EOS_ID, PAD_ID, llama_config_for
from rxt.bench.common import TurnClock
from rxt.config import RxTConfig

__all__ = [
    "StatelessConversation",
    "TimedGeneration",
    "build_stateless_baseline",
    "timed_generate",
]


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
    ttft_s: float  # time to first token: from the call until the caller holds the first new one
    reply_s: float  # from the call until the caller holds the last new token
    new_token_ids: list[int]


class _TokenClock(BaseStreamer):
    """Tells a :class:`~rxt.bench.common.TurnClock` when ``generate`` hands over each new token.

    ``generate`` calls ``put`` once with the prompt, then once per new token, on the calling
    thread and with the token already on the host (so on an accelerator it has been computed by
    then): the token is in the caller's hands, as RxT's are when its stream yields them. On MPS,
    transformers streams one step late, which would overstate the time to first token by one
    step.
    """

    def __init__(self, clock: TurnClock) -> None:
        self.clock = clock
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            self.clock.token()

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
    clock = TurnClock()
    with torch.inference_mode():
        clock.start()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=gen,
            streamer=_TokenClock(clock),
        )
    new_ids = out[0, len(prompt) :].tolist()
    if len(new_ids) != new_tokens or clock.tokens != new_tokens:
        raise RuntimeError(f"generate returned {len(new_ids)} new tokens, expected {new_tokens}")
    return TimedGeneration(
        prompt_tokens=len(prompt),
        ttft_s=clock.ttft_s,
        reply_s=clock.reply_s,
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
