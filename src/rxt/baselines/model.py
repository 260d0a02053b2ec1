"""A parameter-matched ``LlamaForCausalLM``: the stateless opponent for quality comparisons.

:func:`rxt.baselines.llama.llama_config_for` gives a Llama of the RxT *decoder's* shape, which is
the right opponent for latency (same per-token compute). For quality, the usual claim is "at the
same parameter count": RxT also spends parameters on its encoder and memory attention, so the
baseline here keeps that shape (width, heads, vocabulary, FFN width, norms, RoPE, tying) and
grows its depth until its total parameter count matches a target, normally the RxT model's
``parameter_counts()["inference"]`` (everything but the MLM head, which only pre-training uses).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rxt.baselines.data import MODES, Mode, check_mode, full_sequence
from rxt.baselines.llama import llama_config_for
from rxt.config import RxTConfig
from rxt.data.dialogue import Dialogue
from rxt.tokenizer import TOKENIZER_FILE, RxTTokenizer

__all__ = [
    "BASELINE_FILE",
    "MatchedLlama",
    "StatelessLlama",
    "build_baseline",
    "build_matched_baseline",
    "llama_parameter_count",
    "load_baseline",
    "matched_llama_config",
    "rxt_parameter_count",
]

BASELINE_FILE = "baseline.json"  # {"mode": "full" | "current"} beside a saved baseline

# What a transformers config records about where and how it was loaded, not what model it
# describes: left out when a config is copied.
_BOOKKEEPING = frozenset(
    {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
)


def llama_parameter_count(config: LlamaConfig) -> int:
    """Parameters of ``LlamaForCausalLM(config)``, counted from the config (tied weights once).

    ``V·d`` embedding (+ ``V·d`` untied LM head) + final RMSNorm ``d`` + per layer: attention
    ``d·H_q·h`` (q) + ``2·d·H_kv·h`` (k, v) + ``H_q·h·d`` (o), SwiGLU ``3·d·I``, two RMSNorms
    ``2·d`` (no biases).
    """
    d, h = config.hidden_size, config.head_dim
    attention = 2 * d * config.num_attention_heads * h + 2 * d * config.num_key_value_heads * h
    layer = attention + 3 * d * config.intermediate_size + 2 * d
    embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embeddings + d + config.num_hidden_layers * layer


def rxt_parameter_count(config: RxTConfig, kind: str = "inference") -> int:
    """``ReactiveTransformer(config).parameter_counts()[kind]``, built on the meta device (no
    memory, no initialisation). ``"inference"`` excludes the MLM head; ``"active_per_token"``
    also excludes the MoE experts a token does not use."""
    from rxt.model.reactive_transformer import ReactiveTransformer

    with torch.device("meta"):
        counts = ReactiveTransformer(config).parameter_counts()
    if kind not in counts:
        raise ValueError(f"kind must be one of {', '.join(counts)}, got {kind!r}")
    return counts[kind]


class MatchedLlama(NamedTuple):
    """The matched configuration, its exact parameter count and the target it was matched to."""

    config: LlamaConfig
    parameters: int
    target: int

    @property
    def relative_error(self) -> float:
        return (self.parameters - self.target) / self.target


def matched_llama_config(
    rxt_config: RxTConfig,
    target_params: int | None = None,
    *,
    max_positions: int,
    rtol: float = 0.01,
) -> MatchedLlama:
    """A ``LlamaConfig`` of the RxT decoder's shape whose parameter count is closest to
    ``target_params`` (default: :func:`rxt_parameter_count` of ``rxt_config``, i.e. the RxT
    model at inference).

    Rule, in this order:

    1. Start from :func:`rxt.baselines.llama.llama_config_for` (width, heads, head width,
       vocabulary, tying, norms, RoPE, FFN width ``I₀`` of the decoder; for an MoE decoder
       ``I₀ = top_k · expert_dim``).
    2. Depth: the number of layers ``L ≥ 1`` whose count with ``I₀`` is closest to the target
       (ties: fewer layers). The count is ``F + L·(A + 3·d·I)`` (:func:`llama_parameter_count`),
       so depth moves it in steps of one layer.
    3. Only if that count is off by more than ``rtol`` of the target: keep ``L`` and set the
       FFN width to the integer ``I ≥ 1`` closest to the target (ties: the smaller ``I``), which
       lands within ``1.5·d·L`` parameters of it. Depth is matched first so that the FFN width
       stays the decoder's whenever the count allows.

    Returns ``(config, parameters, target)``; ``parameters`` is exact (tested against a built
    model).
    """
    if target_params is None:
        target_params = rxt_parameter_count(rxt_config)
    if isinstance(target_params, bool) or not isinstance(target_params, int) or target_params < 1:
        raise ValueError(f"target_params must be a positive int, got {target_params!r}")
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    base = llama_config_for(rxt_config, max_positions=max_positions)

    def count(layers: int, intermediate: int) -> int:
        return llama_parameter_count(
            _with(base, num_hidden_layers=layers, intermediate_size=intermediate)
        )

    width = base.intermediate_size
    fixed = count(0, width)
    per_layer = count(1, width) - fixed
    guess = max(1, round((target_params - fixed) / per_layer))
    layers = min(
        range(max(1, guess - 1), guess + 2),
        key=lambda n: (abs(count(n, width) - target_params), n),
    )
    if abs(count(layers, width) - target_params) > rtol * target_params:
        step = count(layers, width + 1) - count(layers, width)  # 3·d·L per unit of width
        guess = max(1, round(width + (target_params - count(layers, width)) / step))
        width = min(
            range(max(1, guess - 1), guess + 2),
            key=lambda i: (abs(count(layers, i) - target_params), i),
        )
    config = _with(base, num_hidden_layers=layers, intermediate_size=width)
    return MatchedLlama(config, llama_parameter_count(config), target_params)


def _with(config: LlamaConfig, **changes: Any) -> LlamaConfig:
    """A copy of ``config`` with ``changes`` applied."""
    data = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
    data.pop("model_type", None)
    data.update(changes)
    # to_dict() leaves out the attention implementation; carry it over explicitly.
    return LlamaConfig(**data, attn_implementation=config._attn_implementation)


class StatelessLlama(LlamaForCausalLM):
    """``LlamaForCausalLM`` that saves what evaluating it needs beside its weights, as an RxT
    model directory does: ``tokenizer.json`` when ``tokenizer`` is attached, and
    :data:`BASELINE_FILE` (``{"mode": ...}``) when ``mode`` is set. Loads as a plain
    ``LlamaForCausalLM`` too (same ``model_type``, same tensors)."""

    def __init__(self, config: LlamaConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.tokenizer: RxTTokenizer | None = None
        self.mode: str | None = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory / TOKENIZER_FILE)
        if self.mode is not None:
            text = json.dumps({"mode": self.mode}) + "\n"
            (directory / BASELINE_FILE).write_text(text, encoding="utf-8")


def build_baseline(
    config: LlamaConfig,
    *,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    tokenizer: RxTTokenizer | None = None,
    mode: Mode | None = None,
) -> StatelessLlama:
    """A :class:`StatelessLlama` with weights drawn on the CPU in float32, moved to ``device``,
    in train mode, its generation config set for greedy decoding with rxt's special ids.
    ``seed``: drawn under ``torch.manual_seed(seed)`` with the global RNG left untouched;
    ``None``: drawn from the global RNG as it stands (a caller that seeded it)."""
    if mode is not None:
        check_mode(mode)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device("cpu"):
            model = StatelessLlama(config)
    model = model.to(device)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    gen.do_sample, gen.num_beams = False, 1
    gen.temperature = gen.top_p = gen.top_k = None
    model.tokenizer, model.mode = tokenizer, mode
    return model.train()


def build_matched_baseline(
    rxt_config: RxTConfig,
    tokenizer: RxTTokenizer,
    dialogues: Sequence[Dialogue],
    *,
    mode: Mode | None = None,
    target_params: int | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> StatelessLlama:
    """The baseline for a recipe: :func:`matched_llama_config` of ``rxt_config`` (target: the RxT
    model's inference parameters unless given), ``max_position_embeddings`` = the longest
    dialogue of ``dialogues`` as one full-history sequence (RoPE has no position parameters,
    so this does not change the count, and both modes get the same model), with ``tokenizer``
    and ``mode`` attached so that saving writes them (:class:`StatelessLlama`). ``seed=None``
    draws the weights from the global RNG (seed it first)."""
    dialogues = list(dialogues)
    if not dialogues:
        raise ValueError("need at least one dialogue to size the context")
    longest = max(len(full_sequence(tokenizer, d).input_ids) for d in dialogues)
    matched = matched_llama_config(rxt_config, target_params, max_positions=longest)
    return build_baseline(matched.config, seed=seed, device=device, tokenizer=tokenizer, mode=mode)


def load_baseline(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[StatelessLlama, RxTTokenizer]:
    """A saved baseline and its tokenizer (``tokenizer.json`` beside the weights), in eval mode;
    ``model.mode`` from :data:`BASELINE_FILE` when present. Raises ``FileNotFoundError`` if the
    tokenizer is missing."""
    path = Path(path)
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} beside the baseline")
    tokenizer = RxTTokenizer.from_file(tokenizer_file)
    model = StatelessLlama.from_pretrained(path).to(device).eval()
    model.tokenizer = tokenizer
    marker = path / BASELINE_FILE
    if marker.is_file():
        mode = json.loads(marker.read_text(encoding="utf-8")).get("mode")
        if mode not in MODES:
            raise ValueError(f"{marker}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        model.mode = mode
    return model, tokenizer
