"""CUDA and reduced-precision paths. Skipped where no GPU is present (CI has none); run on a GPU
machine with `pytest tests/test_gpu.py`."""

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PRESETS = ["tiny", "paper-nano"]


def _model(preset: str, dtype=torch.float32) -> ReactiveTransformer:
    torch.manual_seed(0)
    return ReactiveTransformer(RxTConfig.preset(preset)).eval().to("cuda", dtype)


@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_float32_matches_cpu(preset):
    cpu = ReactiveTransformer(RxTConfig.preset(preset)).eval()
    gpu = ReactiveTransformer(RxTConfig.preset(preset)).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    ids = torch.randint(8, cpu.config.vocab_size, (2, 40))
    stm = cpu.initial_stm(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits, ref_stm = cpu.decode(ids, stm), cpu.update_memory(stm, ids)
        logits = gpu.decode(ids.cuda(), stm.cuda()).cpu()
        new_stm = gpu.update_memory(stm.cuda(), ids.cuda()).cpu()
    # TF32 may be on for matmuls; tolerances cover it.
    torch.testing.assert_close(logits, ref_logits, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(new_stm, ref_stm, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", PRESETS)
def test_reduced_precision_cached_decoding_matches_full(preset, dtype):
    model = _model(preset, dtype)
    ids = torch.randint(8, model.config.vocab_size, (3, 24), device="cuda")
    stm = model.initial_stm(3)
    with torch.no_grad():
        full = model.decode(ids, stm).float()
        memory = model.memory_kv(stm)
        cache = model.new_kv_cache(3)
        steps = [model.decode(ids[:, :8], memory_kv=memory, kv_cache=cache)]
        steps += [
            model.decode(ids[:, i : i + 1], memory_kv=memory, kv_cache=cache) for i in range(8, 24)
        ]
        cached = torch.cat(steps, dim=1).float()
    assert torch.isfinite(cached).all()
    # Half precision: compare at the level of a few ulps of the logits' scale.
    scale = full.abs().max().item()
    assert (cached - full).abs().max().item() < 2e-2 * max(scale, 1.0)
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("preset", PRESETS)
def test_bfloat16_training_step_is_finite(preset):
    model = _model(preset, torch.bfloat16).train()
    ids = torch.randint(8, model.config.vocab_size, (4, 64), device="cuda")
    stm = model.initial_stm(4)
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
