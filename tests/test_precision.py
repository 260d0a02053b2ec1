"""Reduced precision (bf16/fp16) and CUDA paths.

The half-precision tests run on the CPU everywhere (CI included) and again on CUDA where a GPU
is present; the CPU-vs-CUDA comparison needs a GPU and is skipped otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.nn import MoEFeedForward

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DENSE_NANO = {"decoder": {"moe": None}}


def _model(preset: str, device: str, dtype: torch.dtype, **overrides) -> ReactiveTransformer:
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset(preset, **overrides))
    return model.eval().to(device, dtype)


def _cached_and_full(model: ReactiveTransformer, device: str):
    g = torch.Generator().manual_seed(1)  # the same ids and STM_0 on every call
    ids = torch.randint(8, model.config.vocab_size, (3, 24), generator=g).to(device)
    stm = model.initial_stm(3, generator=g)
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


class _Routing:
    """Records every MoE layer's expert choices per position, or pins them to given ones.

    Inside ``with _Routing(model, pinned) as routing:`` each decoder MoE layer's ``route`` is
    wrapped. ``routing.chosen(B)`` is then ``(layers, B, T, k)``: the sorted experts each
    position went to, calls stitched along T (a prefill of w tokens covers w positions, a
    cached step one). With ``pinned`` (such a tensor), each position is sent to the pinned
    experts instead, weighted by this path's own router logits, as the module weights them."""

    def __init__(self, model: ReactiveTransformer, pinned: torch.Tensor | None = None) -> None:
        self.layers = [layer.ffn for layer in model.decoder.layers]
        assert all(isinstance(ffn, MoEFeedForward) for ffn in self.layers)
        self.pinned = pinned
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.layers]

    def __enter__(self) -> _Routing:
        for i, moe in enumerate(self.layers):
            moe.route = functools.partial(self._route, i, moe.route)
        return self

    def __exit__(self, *exc) -> None:
        for moe in self.layers:
            del moe.route  # back to the class's method

    def _route(self, i: int, route, flat: torch.Tensor):
        logits, top_idx, top_w = route(flat)
        if self.pinned is not None:
            b = self.pinned.shape[1]
            start = sum(c.shape[0] for c in self.calls[i]) // b
            width = flat.shape[0] // b
            top_idx = self.pinned[i, :, start : start + width].reshape(-1, top_idx.shape[-1])
            top_w = logits.gather(-1, top_idx).softmax(dim=-1).to(flat.dtype)
        self.calls[i].append(top_idx)
        return logits, top_idx, top_w

    def chosen(self, batch: int) -> torch.Tensor:
        per_layer = [
            torch.cat([c.reshape(batch, -1, c.shape[-1]) for c in calls], dim=1)
            for calls in self.calls
        ]
        return torch.stack(per_layer).sort(dim=-1).values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moe_decoding_matches_full_under_the_same_routing(device, dtype):
    """With every token sent to the experts the full pass chose, cached MoE decoding agrees
    with the full pass as a dense model does, at every position: the paths differ only in
    rounding, and only a routing flip (next test) can make them differ more."""
    model = _model("paper-nano", device, dtype)
    with _Routing(model) as full_routing:
        cached, full = _cached_and_full(model, device)
    # _cached_and_full runs the full pass first: positions 0..23, then the cached pass's.
    pinned = full_routing.chosen(3)[:, :, :24].repeat(1, 1, 2, 1)
    with _Routing(model, pinned) as pinned_routing:
        cached, _ = _cached_and_full(model, device)
    assert torch.equal(pinned_routing.chosen(3), pinned)
    assert torch.isfinite(cached).all()
    scale = max(full.abs().max().item(), 1.0)
    assert (cached - full).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moe_decoding_differs_only_downstream_of_routing_flips(device, dtype):
    """In half precision a near-tied router can pick another expert on one path: that token's
    logits then differ by O(1), and so may later tokens of its row, which attend to it. Flips
    are counted from the routers themselves; every position not downstream of one must agree
    as a dense model does. How many flips occur depends on the CPU's kernels, not on rxt."""
    model = _model("paper-nano", device, dtype)
    with _Routing(model) as routing:
        cached, full = _cached_and_full(model, device)
    chosen = routing.chosen(3)  # (layers, 3, 48, k): the full pass, then the cached pass
    flipped = (chosen[:, :, :24] != chosen[:, :, 24:]).any(-1).any(0)  # (3, 24)
    downstream = flipped.int().cummax(dim=1).values.bool()
    scale = max(full.abs().max().item(), 1.0)
    per_position = (cached - full).abs().amax(dim=-1)  # (3, 24)
    assert (per_position[~downstream] < 0.05 * scale).all()


# PyTorch 2.13's CPU flash attention packs bf16 for AMX when the CPU has AMX, but refuses to
# when ATEN_CPU_CAPABILITY forces a level below avx512 (training mode, head width 16).
_VNNI = "pack_vnni2 is only supported when avx512 is supported"


@contextlib.contextmanager
def _pytorch_forced_capability_limit():
    """Skip, naming the cause, only on PyTorch's own refusal under a forced capability."""
    try:
        yield
    except RuntimeError as err:
        forced = os.environ.get("ATEN_CPU_CAPABILITY", "")
        if _VNNI not in str(err) or forced not in ("default", "avx2"):
            raise
        pytest.skip(
            f"PyTorch limitation, not rxt's: bf16 SDPA raises {_VNNI!r} on this AMX CPU "
            f"under ATEN_CPU_CAPABILITY={forced}; the test runs without the forced capability"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["tiny", "paper-nano"])
def test_bfloat16_training_step_is_finite(device, preset):
    model = _model(preset, device, torch.bfloat16).train()
    ids = torch.randint(8, model.config.vocab_size, (2, 32), device=device)
    stm = model.initial_stm(2)
    with _pytorch_forced_capability_limit():
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
