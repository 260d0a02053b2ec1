"""The stateless decoder-only baseline (``rxt.bench.stateless``): its size, its generation, and
the conversation wrapper that re-reads the history every turn."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM

from rxt.baselines.llama import llama_config_for
from rxt.bench.stateless import (
    StatelessConversation,
    TimedGeneration,
    build_stateless_baseline,
    timed_generate,
)

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

PRESETS = ("tiny", "small", "paper-nano")


@pytest.fixture(scope="module")
def baseline() -> LlamaForCausalLM:
    return build_stateless_baseline(RxTConfig.preset("tiny"), max_positions=96, seed=0)


def prompt(n: int, start: int = 8) -> list[int]:
    """``n`` ordinary (non-special) token ids."""
    return [start + (7 * i) % 900 for i in range(n)]


# ------------------------------------------------------------------ configuration and size
@pytest.mark.parametrize("preset", PRESETS)
def test_llama_config_matches_decoder(preset: str) -> None:
    config = RxTConfig.preset(preset)
    llama = llama_config_for(config, max_positions=1000)
    attn = config.decoder.self_attention
    assert llama.hidden_size == config.d_model
    assert llama.num_hidden_layers == config.num_layers
    assert llama.num_attention_heads == attn.query_heads
    assert llama.num_key_value_heads == attn.kv_heads
    assert llama.head_dim == config.d_model // attn.num_heads
    assert llama.vocab_size == config.vocab_size
    assert llama.max_position_embeddings == 1000
    assert llama.rms_norm_eps == config.norm_eps
    assert llama.rope_parameters["rope_theta"] == config.rope_theta
    assert llama.tie_word_embeddings == config.tie_embeddings
    assert llama.initializer_range == config.resolved_init_std
    assert (llama.pad_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)
    assert not llama.attention_bias and not llama.mlp_bias
    assert llama._attn_implementation == "sdpa"
    moe = config.decoder.moe
    if moe is None:
        assert llama.intermediate_size == config.decoder.ffn_dim
    else:  # paper-nano: the width of the experts one token runs through
        assert llama.intermediate_size == moe.top_k * moe.expert_dim


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_count_matches_rxt_decoder_minus_memory(preset: str) -> None:
    """Expected relation, exactly: the Llama decoder stack (layers + final norm) has the RxT
    decoder's parameters minus what reads memory (cross-attention and its two RMSNorms per
    layer) and, for MoE, minus the router and the experts a token does not use. So it is
    smaller than the whole RxT decoder, and at least half of its per-token-active part."""
    config = RxTConfig.preset(preset)
    with torch.device("meta"):
        rxt = ReactiveTransformer(config)
        llama = LlamaForCausalLM(llama_config_for(config, max_positions=512))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    rxt_decoder = rxt.parameter_counts()["decoder"]
    assert rxt_decoder == count(rxt.decoder)
    memory_read = sum(
        count(layer.cross_attn) + count(layer.norm_cross) + count(layer.norm_memory)
        for layer in rxt.decoder.layers
    )
    moe = config.decoder.moe
    idle = 0
    if moe is not None:
        idle = sum(
            count(layer.ffn.router) + (moe.num_experts - moe.top_k) * layer.ffn.expert_parameters()
            for layer in rxt.decoder.layers
        )
    llama_decoder = count(llama.model.layers) + count(llama.model.norm)
    assert llama_decoder == rxt_decoder - memory_read - idle
    assert llama_decoder < rxt_decoder
    assert 0.5 <= llama_decoder / (rxt_decoder - idle) < 1.0
    # Embeddings and LM head are the same shape as RxT's (tied or not).
    assert count(llama) == llama_decoder + count(rxt.embed) + (
        0 if config.tie_embeddings else count(rxt.lm_head)
    )


def test_build_is_seeded_eval_and_leaves_global_rng_alone() -> None:
    config = RxTConfig.preset("tiny")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_stateless_baseline(config, max_positions=64, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_stateless_baseline(config, max_positions=64, seed=5)
    c = build_stateless_baseline(config, max_positions=64, seed=6)
    assert not a.training
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert wa.std().item() == pytest.approx(config.resolved_init_std, rel=0.1)


# ------------------------------------------------------------------ timed generation
def greedy_without_cache(model: LlamaForCausalLM, ids: list[int], new_tokens: int) -> list[int]:
    """Reference: full forward over the whole sequence each step, argmax of the last logits,
    with EOS masked as ``min_new_tokens`` does until the reply is complete."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            x = torch.tensor([ids])
            logits = model(x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1]
            logits[model.config.eos_token_id] = float("-inf")
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
    return out


def test_timed_generate_equals_greedy_loop_without_cache(baseline: LlamaForCausalLM) -> None:
    ids = prompt(20)
    result = timed_generate(baseline, ids, new_tokens=12)
    assert isinstance(result, TimedGeneration)
    assert result.prompt_tokens == 20
    assert len(result.new_token_ids) == 12
    assert 0 < result.ttft_s <= result.reply_s
    assert result.new_token_ids == greedy_without_cache(baseline, ids, 12)


def test_timed_generate_ignores_eos_until_the_last_token(baseline: LlamaForCausalLM) -> None:
    """The reply is always ``new_tokens`` long, even when the model would rather stop."""
    eos = baseline.config.eos_token_id

    def prefer_eos(module: torch.nn.Module, args: object, logits: torch.Tensor) -> torch.Tensor:
        logits[..., eos] += 1e4
        return logits

    hook = baseline.lm_head.register_forward_hook(prefer_eos)
    try:
        result = timed_generate(baseline, prompt(5), new_tokens=4)
    finally:
        hook.remove()
    assert len(result.new_token_ids) == 4
    assert eos not in result.new_token_ids


@pytest.mark.parametrize(
    ("ids", "new_tokens", "match"),
    [
        ([], 4, "must not be empty"),
        ([5, 1024], 4, "vocab_size=1024"),
        ([5, -1], 4, "vocab_size"),
        ([5, 6], 0, "new_tokens"),
        (list(range(8, 98)), 7, "max_position_embeddings=96"),
    ],
)
def test_timed_generate_rejects_bad_input(
    baseline: LlamaForCausalLM, ids: list[int], new_tokens: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        timed_generate(baseline, ids, new_tokens=new_tokens)


def test_generation_emits_no_warnings(baseline: LlamaForCausalLM) -> None:
    """Neither ``warnings`` nor transformers' own logger (which does not propagate to the
    root logger, so a handler is attached to it directly) report anything."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_stateless_baseline(RxTConfig.preset("tiny"), max_positions=64)
            timed_generate(model, prompt(6), new_tokens=3)
            StatelessConversation(model).turn(prompt(4), new_tokens=2)
    finally:
        hf_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []


# ------------------------------------------------------------------ conversation
def test_conversation_rereads_growing_history(baseline: LlamaForCausalLM) -> None:
    chat = StatelessConversation(baseline, max_positions=80)
    queries = [prompt(6, 10), prompt(4, 20), prompt(9, 30)]
    expected_prompt = 0
    history: list[int] = []
    for turn, query in enumerate(queries, start=1):
        expected_prompt += len(query)
        result = chat.turn(query, new_tokens=5)
        assert result.prompt_tokens == expected_prompt
        assert len(result.new_token_ids) == 5
        history += query + result.new_token_ids
        assert chat.history == history
        assert chat.turns == turn
        expected_prompt += 5  # this answer is part of the next prompt
    # The turn answers exactly what a one-shot call on the full prompt would.
    last = timed_generate(baseline, history[:-5], new_tokens=5)
    assert last.new_token_ids == history[-5:]
    chat.reset()
    assert chat.history == [] and chat.turns == 0


def test_conversation_overflow_fails_before_any_compute(
    baseline: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = StatelessConversation(baseline, max_positions=30)
    chat.turn(prompt(10), new_tokens=5)  # 15 tokens of history
    before = chat.history
    calls = []
    monkeypatch.setattr(baseline, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"max_positions=30"):
        chat.turn(prompt(10), new_tokens=6)  # 15 + 10 + 6 = 31 > 30
    assert calls == []
    assert chat.history == before and chat.turns == 1


def test_conversation_max_positions_cannot_exceed_the_model(baseline: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="max_position_embeddings=96"):
        StatelessConversation(baseline, max_positions=97)
    assert StatelessConversation(baseline).max_positions == 96
