"""Reduced precision (bf16/fp16) and CUDA paths.

The half-precision tests run on the CPU everywhere (CI included) and again on CUDA where a GPU
is present; the CPU-vs-CUDA comparison needs a GPU and is skipped otherwise.
"""

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DENSE_NANO = {"decoder": {"moe": None}}


def _model(preset: str, device: str, dtype: torch.dtype, **overrides) -> ReactiveTransformer:
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset(preset, **overrides))
    return model.eval().to(device, dtype)


def _cached_and_full(model: ReactiveTransformer, device: str):
    ids = torch.randint(8, model.config.vocab_size, (3, 24), device=device)
    stm = model.initial_stm(3)
    with torch.no_grad():
        full = model.decode(ids, stm).float()
        memory = model.memory_kv(stm)
        cache = model.new_kv_cache(3)
        steps = [model.decode(ids[:, :8], memory_kv=memory, kv_cache=cache)]
        steps += [
            model.decode(ids[:, i : i + 1], memory_kv=memory, kv_cache=cache) for i in range(8, 24)
        ]
    return torch.cat(steps, dim=1).float(), full


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("preset", "overrides"), [("tiny", {}), ("paper-nano", DENSE_NANO)], ids=["tiny", "nano-dense"]
)
def test_half_precision_cached_decoding_matches_full(device, dtype, preset, overrides):
    model = _model(preset, device, dtype, **overrides)
    cached, full = _cached_and_full(model, device)
    assert torch.isfinite(cached).all()
    # Half precision keeps 3 (bf16) to 4 (fp16) significant digits; the two paths round
    # differently, so compare at 5% of the logits' scale (measured: <= 1.6%).
    scale = max(full.abs().max().item(), 1.0)
    assert (cached - full).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moe_decoding_differs_only_where_routing_flips(device, dtype):
    """In half precision a near-tied router can pick another expert on one path: that token's
    logits then differ by O(1), and so may later tokens that attend to it. Such flips must stay
    rare; everywhere else the paths agree as a dense model does."""
    model = _model("paper-nano", device, dtype)
    cached, full = _cached_and_full(model, device)
    scale = max(full.abs().max().item(), 1.0)
    per_position = (cached - full).abs().amax(dim=-1)  # (B, T)
    assert (per_position < 0.05 * scale).float().mean() >= 0.75
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["tiny", "paper-nano"])
def test_bfloat16_training_step_is_finite(device, preset):
    model = _model(preset, device, torch.bfloat16).train()
    ids = torch.randint(8, model.config.vocab_size, (2, 32), device=device)
    stm = model.initial_stm(2)
    out = model.decoder_forward(ids, model.update_memory(stm, ids))
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()
    )
    if out.aux_loss is not None:
        loss = loss + out.aux_loss.float()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny", "paper-nano"])
def test_cuda_float32_matches_cpu(preset):
    cpu = _model(preset, "cpu", torch.float32)
    gpu = _model(preset, "cpu", torch.float32)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    ids = torch.randint(8, cpu.config.vocab_size, (2, 40))
    stm = cpu.initial_stm(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits, ref_stm = cpu.decode(ids, stm), cpu.update_memory(stm, ids)
        logits = gpu.decode(ids.cuda(), stm.cuda()).cpu()
        new_stm = gpu.update_memory(stm.cuda(), ids.cuda()).cpu()
    # TF32 may be enabled for matmuls; the tolerance covers it.
    torch.testing.assert_close(logits, ref_logits, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(new_stm, ref_stm, atol=5e-3, rtol=5e-3)
