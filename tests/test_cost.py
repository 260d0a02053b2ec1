"""Tests for rxt.model.cost: the analytic FLOP formulas describe the real code, and per-turn cost
does not depend on how long the conversation has been going (paper §4, Table 1).

FLOPs are measured with ``torch.utils.flop_counter.FlopCounterMode``. It has no formula for the
fused CPU attention kernels, so every measurement runs under the MATH SDPA backend, where
attention decomposes into the batched matmuls it does count. Counts are integers: compared
exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rxt import RxTConfig
from rxt.engine.greedy import greedy_answer
from rxt.model import cost


def measure_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(config: RxTConfig, b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (b, t), generator=_gen(seed))


def _stm(config: RxTConfig, b: int, seed: int) -> torch.Tensor:
    return torch.randn((b, *config.stm_shape), generator=_gen(seed))


# Memory-attention variants and gate kinds, as overrides of the tiny preset.
MEMORY_VARIANTS: dict[str, dict[str, Any]] = {
    "simple": {"variant": "simple"},
    "self": {"variant": "self"},
    "interlayer": {"variant": "interlayer"},
    "gated-self-interlayer": {"variant": "gated-self-interlayer"},
    "gate-linear": {"gate_projection": "linear"},
    "gate-slot": {"gate_granularity": "slot"},
    "gate-slot-simple": {"variant": "simple", "gate_granularity": "slot"},
    "gate-static": {"gate": "static"},
    "gate-none": {"gate": "none", "variant": "self"},
    "sqa-memory": {"attention": {"num_heads": 4, "num_query_heads": 2, "num_kv_heads": 1}},
}
CONFIGS = ["tiny", "moe-sqa", "paper-nano", *(f"memory:{name}" for name in MEMORY_VARIANTS)]


@pytest.fixture(params=CONFIGS)
def config(request) -> RxTConfig:
    name = request.param
    if name == "moe-sqa":
        return request.getfixturevalue("moe_sqa_config")
    if name == "paper-nano":
        return RxTConfig.preset("paper-nano")
    if name.startswith("memory:"):
        return RxTConfig.preset("tiny", memory=MEMORY_VARIANTS[name.split(":", 1)[1]])
    return RxTConfig.preset(name)


@pytest.mark.parametrize("query_tokens", [5, 20], ids=["q5", "q20"])
def test_analytic_flops_equal_measured_flops(config, make_model, query_tokens):
    """memory_kv, prefill (last_only), one cached step, a cached chunk and update_memory.

    With MoE, 5 tokens take the gathered expert path and 20 the dispatched one."""
    model = make_model(config)
    q = query_tokens
    ids = _ids(config, 1, q + 4, seed=1)
    stm = _stm(config, 1, seed=2)
    memory = model.memory_kv(stm)
    cache = model.new_kv_cache(1)

    assert measure_flops(lambda: model.memory_kv(stm)) == cost.memory_kv_flops(config)
    prefill = measure_flops(
        lambda: model.decode(ids[:, :q], memory_kv=memory, kv_cache=cache, last_only=True)
    )
    assert prefill == cost.decoder_flops(config, q, 0, logits_tokens=1)
    step = measure_flops(
        lambda: model.decode(ids[:, q : q + 1], memory_kv=memory, kv_cache=cache, last_only=True)
    )
    assert step == cost.decoder_flops(config, 1, q, logits_tokens=1)
    chunk = measure_flops(lambda: model.decode(ids[:, q + 1 :], memory_kv=memory, kv_cache=cache))
    assert chunk == cost.decoder_flops(config, 3, q + 1)
    assert cache.length == q + 4

    update = measure_flops(lambda: model.update_memory(stm, ids))
    expected = cost.encoder_flops(config, q + 4) + cost.memory_attention_flops(config, q + 4)
    assert update == expected
    assert update > 0 and prefill > step > 0


def test_flops_scale_with_batch_size(moe_sqa_model):
    model = moe_sqa_model
    config = model.config
    stm = _stm(config, 3, seed=2)
    ids = _ids(config, 3, 9, seed=1)
    assert measure_flops(lambda: model.memory_kv(stm)) == 3 * cost.memory_kv_flops(config)
    assert measure_flops(lambda: model.decode(ids, stm)) == 3 * (
        cost.memory_kv_flops(config) + cost.decoder_flops(config, 9)
    )
    assert measure_flops(lambda: model.update_memory(stm, ids)) == 3 * (
        cost.encoder_flops(config, 9) + cost.memory_attention_flops(config, 9)
    )


def test_turn_cost_equals_measured_greedy_generation(tiny_model):
    """turn_cost describes the real generation loop: memory K/V once, prefill, cached steps."""
    model = tiny_model
    config = model.config
    q, a = 9, 7
    prompt = _ids(config, 1, q, seed=1)
    stm = _stm(config, 1, seed=2)
    fed: list[int] = []
    hook = model.decoder.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[1]))
    try:
        answer: list[int] = []
        flops = measure_flops(
            lambda: answer.extend(greedy_answer(model, prompt, stm, max_new_tokens=a, eos_id=-1))
        )
    finally:
        hook.remove()
    assert len(answer) == a
    turn = cost.turn_cost(config, q, a)
    assert flops == turn.user_facing
    assert sum(fed) == turn.decoder_tokens == q + a - 1
    assert fed == [q] + [1] * (a - 1)


def test_per_turn_cost_does_not_depend_on_conversation_length(tiny_model):
    """A 50-turn conversation: turn 50 costs exactly what turn 1 cost, and the state is as big."""
    model = tiny_model
    config = model.config
    q, a, turns = 12, 20, 50
    before = cost.turn_cost(config, q, a)
    fed: list[int] = []
    hook = model.decoder.register_forward_pre_hook(lambda _m, args: fed.append(args[0].shape[1]))
    stm = model.initial_stm(1, generator=_gen(0))
    stm_0 = stm.clone()
    measured: dict[int, tuple[int, int, int]] = {}
    try:
        for turn in range(1, turns + 1):
            ids = _ids(config, 1, q + a, seed=turn)  # same shape every turn, new content
            if turn in (1, turns):
                fed.clear()
                answer = measure_flops(lambda ids=ids, stm=stm: model.decode(ids, stm))
                new: list[torch.Tensor] = []
                update = measure_flops(
                    lambda ids=ids, stm=stm, new=new: new.append(model.update_memory(stm, ids))
                )
                measured[turn] = (answer, update, sum(fed))
                stm = new[0]
            else:
                with torch.no_grad():
                    model.decode(ids, stm)
                    stm = model.update_memory(stm, ids)
            assert stm.shape == stm_0.shape  # the conversation state never grows
    finally:
        hook.remove()

    assert measured[1] == measured[turns]
    answer, update, tokens = measured[1]
    assert tokens == q + a  # the decoder reads this turn only, never the history
    assert answer == cost.memory_kv_flops(config) + cost.decoder_flops(config, q + a)
    assert update == before.memory_update
    assert (stm - stm_0).abs().max() > 1e-3  # the memory did evolve over the 50 turns
    # turn_cost is a pure function of shapes: unaffected by the conversation above.
    assert cost.turn_cost(config, q, a) == before
    assert list(inspect.signature(cost.turn_cost).parameters) == [
        "config",
        "query_tokens",
        "answer_tokens",
    ]


def test_user_facing_cost_is_affine_per_answer_token(tiny_config):
    """U(a) = cost of answering with a tokens. Each extra token costs one cached decoder step
    over this turn's tokens only: the increment grows by the attention over one more cached
    token (a constant, small next to the step itself), whatever turn this is."""
    config = tiny_config
    q = 16
    u = [cost.turn_cost(config, q, a).user_facing for a in range(1, 41)]
    first = [u[i + 1] - u[i] for i in range(len(u) - 1)]
    second = {first[i + 1] - first[i] for i in range(len(first) - 1)}
    for i, inc in enumerate(first):  # U(a+2) − U(a+1): one step after q + a cached tokens
        assert inc == cost.decoder_flops(config, 1, q + i, logits_tokens=1)
    heads = config.decoder.self_attention
    q_width = heads.query_heads * (config.d_model // heads.num_heads)
    assert second == {config.num_layers * 2 * 2 * q_width}  # scores + weights·V, per token
    assert max(second) < 0.01 * first[0]
    # The fixed part (memory K/V and prefill) does not depend on the answer length.
    costs = [cost.turn_cost(config, q, a) for a in (1, 10, 40)]
    assert len({(c.memory_kv, c.prefill) for c in costs}) == 1
    assert costs[0].generation == 0
