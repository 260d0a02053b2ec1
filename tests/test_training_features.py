"""Training switches of the model: dropout and gradient checkpointing."""

import pytest
import torch

from rxt import ConfigError, ReactiveTransformer, RxTConfig

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability


def _pair(dropout: float, **overrides):
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset("tiny", dropout=dropout, **overrides))
    ids = torch.randint(8, 1000, (2, 12))
    stm = model.initial_stm(2, generator=torch.Generator().manual_seed(1))
    return model, ids, stm


def _two_turn_loss(model, ids, stm):
    """Loss on turn-2 logits read from the memory written by turn 1, so every component
    (decoder, encoder, memory attention) sits on the gradient path."""
    out = model.decoder_forward(ids, model.update_memory(stm, ids))
    loss = out.logits.float().pow(2).mean()
    return loss + out.aux_loss if out.aux_loss is not None else loss


def test_dropout_is_inactive_in_eval_mode_and_active_in_training():
    model, ids, stm = _pair(0.2)
    plain, _, _ = _pair(0.0)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.eval()
        plain.eval()
        assert torch.equal(model.decode(ids, stm), plain.decode(ids, stm))
        model.train()
        first, second = model.decode(ids, stm), model.decode(ids, stm)
        assert not torch.allclose(first, second)
        # Memory attention itself has no dropout (the encoder feeding it does).
        encoded = model.encode(ids)
        assert torch.equal(
            model.memory_attention(stm, encoded), model.memory_attention(stm, encoded)
        )


def test_zero_dropout_training_equals_eval():
    model, ids, stm = _pair(0.0)
    with torch.no_grad():
        train_logits = model.train().decode(ids, stm)
        eval_logits = model.eval().decode(ids, stm)
    assert torch.equal(train_logits, eval_logits)


def test_dropout_must_be_a_probability():
    with pytest.raises(ConfigError, match="dropout"):
        RxTConfig.preset("tiny", dropout=1.0)


MOE = {
    "decoder": {"moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32}},
    "memory": {"variant": "gated-self-interlayer"},
}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("overrides", [{}, MOE], ids=["dense", "moe"])
def test_gradient_checkpointing_gives_the_same_gradients(dropout, overrides):
    grads = []
    for checkpointing in (False, True):
        model, ids, stm = _pair(dropout, **overrides)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(123)  # same dropout masks in both runs
        _two_turn_loss(model, ids, stm).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert any(n.startswith("encoder.") for n in plain)
    assert any(n.startswith("memory_attention.") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_checkpointing_is_skipped_with_a_kv_cache_and_in_eval():
    model, ids, stm = _pair(0.0)
    model.gradient_checkpointing_enable()
    model.train()
    cache = model.new_kv_cache(2)
    logits = model.decode(ids, stm, kv_cache=cache)  # would append twice if recomputed
    logits.sum().backward()
    assert cache.length == ids.shape[1]
    model.gradient_checkpointing_disable()
    assert not model.decoder.gradient_checkpointing
