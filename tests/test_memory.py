"""Short-Term Memory: the memory update, the residual gate and STM_0 (rxt.model.memory; spec §3–4).

Tolerances: float32 comparisons of two computations that should agree mathematically but take a
different path (batching, padding, permutation) use ``atol = rtol = 1e-5``; values that must be
the very same tensor are compared with ``torch.equal``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.config import MemoryConfig
from rxt.model.memory import ResidualGate, StmInitializer

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

VARIANTS = ["simple", "self", "interlayer", "gated-self-interlayer"]
ATOL = RTOL = 1e-5  # float32, different but equivalent computation paths
FIRST_TEXT_ID = 8  # ids 0..7 are the special tokens

# Gate configurations that keep the slots a set (no per-slot parameter): the update must be
# equivariant to slot permutations for all of these.
SET_GATES: dict[str, dict[str, Any]] = {
    "dynamic-feature-elementwise": {"gate": "dynamic", "gate_granularity": "feature"},
    "dynamic-feature-linear": {
        "gate": "dynamic",
        "gate_granularity": "feature",
        "gate_projection": "linear",
    },
    "dynamic-slot": {"gate": "dynamic", "gate_granularity": "slot"},
    "static-feature": {"gate": "static", "gate_granularity": "feature"},
    "none": {"gate": "none"},
}


# ---------------------------------------------------------------------------- helpers
def _model(seed: int = 0, **memory: Any) -> ReactiveTransformer:
    config = RxTConfig.preset("tiny", memory=memory)
    torch.manual_seed(seed)
    return ReactiveTransformer(config).eval()


def _randomize_gates(model: ReactiveTransformer, seed: int = 123, scale: float = 1.0) -> None:
    """Give every gate and blend parameter random values (at init they are constant, so a
    dynamic gate would not yet depend on its input)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.memory_attention.named_parameters():
            if ".gate." in name or "blend" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _ids(gen: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(FIRST_TEXT_ID, vocab, (batch, length), generator=gen)


def _stm(model: ReactiveTransformer, batch: int, seed: int, std: float = 0.5) -> torch.Tensor:
    """A non-trivial STM (larger than STM_0's 0.02 so slot differences matter)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *model.config.stm_shape), generator=gen) * std


# ---------------------------------------------------------------------------- purity
@pytest.mark.parametrize("gate", ["dynamic", "static", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_memory_is_pure(variant: str, gate: str) -> None:
    model = _model(variant=variant, gate=gate)
    _randomize_gates(model)
    stm = _stm(model, batch=2, seed=1)
    before = stm.clone()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(torch.Generator().manual_seed(2), 2, 10, model.config.vocab_size)

    with torch.no_grad():
        out = model.update_memory(stm, ids)
        assert torch.equal(stm, before), "update_memory modified its input STM"
        assert not torch.equal(out, stm), "the update did not change the memory at all"
        # The result is a new tensor: writing to it must not reach the caller's STM.
        out.add_(1.0)
    assert torch.equal(stm, before)
    # ... and the model holds no conversation state: parameters and buffers are untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    # Same input twice -> same output (no hidden state carried between calls).
    with torch.no_grad():
        assert torch.equal(model.update_memory(stm, ids), model.update_memory(stm, ids))


# ---------------------------------------------------------------------------- batching
@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_update_equals_one_by_one(variant: str) -> None:
    model = _model(variant=variant)
    _randomize_gates(model)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 12, 9, 1]
    t = max(lengths) + 2  # every row is padded, the longest by 2
    ids = _ids(gen, len(lengths), t, model.config.vocab_size)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # [PAD] = 0 in padding positions
    stm = _stm(model, len(lengths), seed=4)

    with torch.no_grad():
        batched = model.update_memory(stm, ids, mask)
        for i, n in enumerate(lengths):
            single = model.update_memory(stm[i : i + 1], ids[i : i + 1, :n])
            torch.testing.assert_close(batched[i : i + 1], single, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_and_update_invariant_to_right_padding(variant: str) -> None:
    model = _model(variant=variant)
    _randomize_gates(model)
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    n = 11
    ids = _ids(gen, 1, n, vocab)
    stm = _stm(model, 1, seed=6)

    with torch.no_grad():
        ed_ref = model.encode(ids)
        stm_ref = model.update_memory(stm, ids)
        assert ed_ref.shape == (1, model.config.num_layers, n, model.config.d_model)
        for pad in (0, 1, 7):
            # Padding positions hold random *non-pad* ids: masked content must not leak.
            padded = torch.cat([ids, _ids(gen, 1, pad, vocab)], dim=1)
            mask = torch.cat([torch.ones(1, n), torch.zeros(1, pad)], dim=1).long()
            ed = model.encode(padded, mask)
            assert ed.shape[2] == n + pad
            torch.testing.assert_close(ed[:, :, :n], ed_ref, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(
                model.update_memory(stm, padded, mask), stm_ref, atol=ATOL, rtol=RTOL
            )


# ---------------------------------------------------------------------------- slots are a set
@pytest.mark.parametrize("gate", list(SET_GATES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_is_equivariant_to_slot_permutation(variant: str, gate: str) -> None:
    model = _model(variant=variant, **SET_GATES[gate])
    _randomize_gates(model)
    s = model.config.memory.num_slots
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(perm, torch.arange(s))
    stm = _stm(model, 2, seed=8)
    ids = _ids(torch.Generator().manual_seed(9), 2, 13, model.config.vocab_size)

    with torch.no_grad():
        out = model.update_memory(stm, ids)
        out_of_permuted = model.update_memory(stm[:, :, perm], ids)
    torch.testing.assert_close(out_of_permuted, out[:, :, perm], atol=ATOL, rtol=RTOL)
    # The check has teeth: slots differ, so a wrong permutation would not pass.
    assert not torch.allclose(out[:, :, perm], out, atol=1e-3)


def test_static_per_slot_gate_gives_slots_identity() -> None:
    """A static per-slot gate is the one configuration with a parameter per slot index: with a
    uniform bias (its initial state) the update is still equivariant; once the per-slot biases
    differ, slot i has its own plasticity and permuting slots changes the result. This is
    intended (slots may specialise), and it is why the equivariance test excludes it."""
    model = _model(variant="interlayer", gate="static", gate_granularity="slot")
    s = model.config.memory.num_slots
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(10))
    stm = _stm(model, 1, seed=11)
    ids = _ids(torch.Generator().manual_seed(12), 1, 9, model.config.vocab_size)

    def permuted_gap() -> float:
        with torch.no_grad():
            out = model.update_memory(stm, ids)
            out_p = model.update_memory(stm[:, :, perm], ids)
        return (out_p - out[:, :, perm]).abs().max().item()

    assert permuted_gap() < ATOL  # uniform bias at init: still a set
    _randomize_gates(model, scale=2.0)
    assert permuted_gap() > 1e-3  # per-slot biases differ: slot identity matters


# ---------------------------------------------------------------------------- boundedness
def _attention_bound(attn: torch.nn.Module, kv_norm_weight: torch.Tensor, blend: bool) -> float:
    """Upper bound on |element| of ``attn``'s output when its keys/values come from an RMSNorm.

    A normalised row has L2 norm <= max|w| * sqrt(d) (times sqrt(2) for the elementwise blend of
    two normalised rows); each head's output is a convex mix of its value rows; query heads that
    share a kv head repeat it (factor H_q/H_kv in the squared norm); output element i is bounded
    by the L2 norm of row i of W_o times the L2 norm of the concatenated heads.
    """
    wv, wo = attn.v_proj.weight, attn.o_proj.weight
    d = wv.shape[1]
    x_norm = kv_norm_weight.abs().max().item() * math.sqrt(d) * (math.sqrt(2) if blend else 1)
    heads = math.sqrt(attn.num_query_heads / attn.num_kv_heads) * wv.norm().item() * x_norm
    return wo.norm(dim=1).max().item() * heads


def _gated_elementwise_bound(model: ReactiveTransformer, stm0: torch.Tensor) -> float:
    """Every gated write is an elementwise convex combination of the old value and a bounded
    attention output, so by induction |STM_t| <= max(|STM_0|, bounds of every attention)."""
    blend = model.config.memory.variant == "gated-self-interlayer"
    bound = stm0.abs().max().item()
    for layer in model.memory_attention.layers:
        bound = max(bound, _attention_bound(layer.write, layer.norm_ed.weight, blend=False))
        if layer.pre_step is not None:
            pre = layer.pre_step
            bound = max(bound, _attention_bound(pre.attn, pre.norm_kv.weight, blend=blend))
    return bound


def _run_updates(model: ReactiveTransformer, stm: torch.Tensor, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    norms, max_abs = [], []
    with torch.no_grad():
        for _ in range(steps):
            length = int(torch.randint(2, 41, (1,), generator=gen))
            ids = _ids(gen, stm.shape[0], length, model.config.vocab_size)
            stm = model.update_memory(stm, ids)
            norms.append(stm.norm().item())
            max_abs.append(stm.abs().max().item())
    return torch.tensor(norms), torch.tensor(max_abs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gated_memory_stays_bounded_plain_residual_drifts(variant: str) -> None:
    """500 random interactions: the sigmoid-gated STM stays within its analytic bound and does
    not trend upward; the same model with a plain residual (gate="none") drifts far away."""
    steps = 500
    gated = _model(variant=variant)  # default gate: dynamic, per feature, elementwise
    _randomize_gates(gated)  # make G depend on its input (it is constant at init)
    plain = _model(variant=variant, gate="none")
    stm0 = gated.initial_stm(1, generator=torch.Generator().manual_seed(13))

    g_norms, g_max = _run_updates(gated, stm0, steps, seed=14)
    p_norms, p_max = _run_updates(plain, stm0, steps, seed=14)  # same interactions

    bound = _gated_elementwise_bound(gated, stm0)
    gated_max_norm = g_norms.max().item()
    print(
        f"\n{variant}: gated max|STM|={g_max.max():.3f} (analytic bound {bound:.1f}), "
        f"max norm={gated_max_norm:.2f}; plain residual max|STM|={p_max.max():.1f}, "
        f"final norm={p_norms[-1]:.1f}"
    )
    # Gated: the analytic bound holds (1e-4 relative slack for float32 rounding) ...
    assert g_max.max().item() <= bound * (1 + 1e-4)
    assert torch.isfinite(g_norms).all()
    # ... and there is no upward trend: last 100 updates vs the 100 before.
    assert g_norms[-100:].mean() <= 1.1 * g_norms[-200:-100].mean()
    # Plain residual: the norm keeps growing and ends far beyond anything the gate allowed.
    assert p_norms[-100:].mean() > 1.1 * p_norms[-200:-100].mean()
    assert p_norms[-1].item() > 20 * gated_max_norm
    # It even leaves the elementwise bound every gated memory must respect.
    assert p_max.max().item() > bound


# ---------------------------------------------------------------------------- residual gate
D, S, B = 16, 6, 3
GATE_KINDS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    # name: (MemoryConfig fields, shape of G for previous/update of shape (B, S, D))
    "dynamic-feature-elementwise": ({"gate": "dynamic", "gate_granularity": "feature"}, (B, S, D)),
    "dynamic-feature-linear": (
        {"gate": "dynamic", "gate_granularity": "feature", "gate_projection": "linear"},
        (B, S, D),
    ),
    "dynamic-slot": ({"gate": "dynamic", "gate_granularity": "slot"}, (B, S, 1)),
    "static-feature": ({"gate": "static", "gate_granularity": "feature"}, (D,)),
    "static-slot": ({"gate": "static", "gate_granularity": "slot"}, (S, 1)),
}


def _gate(kind: str, gate_init: float = 0.5) -> ResidualGate:
    fields, _ = GATE_KINDS[kind]
    return ResidualGate(D, MemoryConfig(num_slots=S, gate_init=gate_init, **fields))


def _prev_update(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=gen), torch.randn(B, S, D, generator=gen) * 3


@pytest.mark.parametrize("gate_init", [0.01, 0.1, 0.25, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_gate_starts_at_gate_init(kind: str, gate_init: float) -> None:
    gate = _gate(kind, gate_init)
    prev, update = _prev_update(0)
    g = gate.gate_values(prev, update).expand(B, S, D)
    # Exact up to float32 rounding of logit(gate_init): at most 2 ulp (~1.2e-7 near 1);
    # G = 0.5 (bias 0) is exact.
    torch.testing.assert_close(g, torch.full_like(g, gate_init), atol=1.2e-7, rtol=0)
    if gate_init == 0.5:
        assert torch.equal(g, torch.full_like(g, 0.5))
    # Independent of the input at init (weights are zero).
    other = gate.gate_values(*_prev_update(1)).expand(B, S, D)
    assert torch.equal(g, other)


@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_gate_is_convex_combination_with_right_granularity(kind: str) -> None:
    gate = _gate(kind)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in gate.parameters():  # moderate scale: float32 sigmoid saturates to 1 near 17
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    prev, update = _prev_update(3)
    g = gate.gate_values(prev, update)
    assert tuple(g.shape) == GATE_KINDS[kind][1]
    assert ((g > 0) & (g < 1)).all()
    assert g.unique().numel() > 1, "random parameters should give more than one gate value"
    out = gate(prev, update)
    torch.testing.assert_close(out, (1 - g) * prev + g * update, atol=1e-6, rtol=1e-6)
    # Convexity, elementwise: the result lies between the old value and the update.
    lo, hi = torch.minimum(prev, update), torch.maximum(prev, update)
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()
    if GATE_KINDS[kind][0]["gate_granularity"] == "slot":
        # One value per slot: every feature of a slot moves the same fraction of the way.
        frac = (out - prev) / (update - prev)
        torch.testing.assert_close(frac, frac[..., :1].expand_as(frac), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_gate_parameters_receive_gradients(kind: str) -> None:
    gate = _gate(kind, gate_init=0.3)
    params = dict(gate.named_parameters())
    assert params, "a gate must have trainable parameters"
    prev, update = _prev_update(4)
    gate(prev, update).square().sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_no_gate_is_plain_residual() -> None:
    gate = ResidualGate(D, MemoryConfig(num_slots=S, gate="none"))
    assert list(gate.parameters()) == []
    prev, update = _prev_update(5)
    assert torch.equal(gate(prev, update), prev + update)


# ---------------------------------------------------------------------------- STM_0
def test_random_stm_init_shape_std_and_seeding() -> None:
    config = RxTConfig.preset("tiny", memory={"stm_init_std": 0.05})
    init = StmInitializer(config)
    assert list(init.parameters()) == []
    stm = init(4, generator=torch.Generator().manual_seed(0))
    assert stm.shape == (4, *config.stm_shape) == (4, 2, 32, 64)
    assert stm.dtype == torch.float32
    # 16384 samples: the std estimate is within ~0.6% (1 s.e.); allow 5%.
    assert abs(stm.std().item() - 0.05) < 0.05 * 0.05
    assert abs(stm.mean().item()) < 4 * 0.05 / math.sqrt(stm.numel())
    # Same generator seed -> identical; another seed -> different; rows are distinct draws.
    assert torch.equal(stm, init(4, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(stm, init(4, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(stm[0], stm[1])
    # dtype is honoured.
    assert init(1, dtype=torch.float64, generator=torch.Generator()).dtype == torch.float64


def test_random_stm_init_via_model_uses_model_dtype() -> None:
    model = _model().double()
    stm = model.initial_stm(2, generator=torch.Generator().manual_seed(0))
    assert stm.dtype == torch.float64 and stm.shape == (2, *model.config.stm_shape)
    again = model.initial_stm(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stm, again)


def test_learned_stm_init_is_shared_and_trainable() -> None:
    model = _model(stm_init="learned")
    param = model.stm_init.stm
    assert isinstance(param, torch.nn.Parameter) and param.requires_grad
    assert param.shape == model.config.stm_shape
    assert any(p is param for p in model.parameters())
    assert "stm_init.stm" in model.state_dict()

    stm = model.initial_stm(3)
    assert stm.shape == (3, *model.config.stm_shape)
    for row in stm:
        assert torch.equal(row, param.detach())
    # A generator has no effect on a learned init.
    assert torch.equal(stm, model.initial_stm(3, generator=torch.Generator().manual_seed(9)))
    # The caller owns a copy: editing it does not touch the parameter.
    with torch.no_grad():
        stm.add_(1.0)
    assert not torch.equal(stm[0], param.detach())

    # Gradients reach the parameter through a memory update (summed over batch rows).
    ids = _ids(torch.Generator().manual_seed(1), 3, 6, model.config.vocab_size)
    model.update_memory(model.initial_stm(3), ids).sum().backward()
    assert param.grad is not None and param.grad.abs().sum() > 0
    assert torch.isfinite(param.grad).all()


@pytest.mark.parametrize("stm_init", ["random", "learned"])
@pytest.mark.parametrize("batch_size", [0, -1])
def test_stm_init_rejects_non_positive_batch(stm_init: str, batch_size: int) -> None:
    init = StmInitializer(RxTConfig.preset("tiny", memory={"stm_init": stm_init}))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        init(batch_size)


# ---------------------------------------------------------------------------- variants
def test_variants_have_the_expected_parameters() -> None:
    names = {}
    for variant in VARIANTS:
        model = _model(variant=variant)
        names[variant] = {n for n, _ in model.memory_attention.named_parameters()}
    assert not any("pre_step" in n for n in names["simple"])
    for variant in ("self", "interlayer", "gated-self-interlayer"):
        assert any("pre_step.attn" in n for n in names[variant]), variant
        assert any("pre_step.gate" in n for n in names[variant]), variant
    for variant in ("simple", "self", "interlayer"):
        assert not any("blend" in n for n in names[variant]), variant
    assert any("pre_step.blend_weight" in n for n in names["gated-self-interlayer"])
    # Self and interlayer pre-steps have the same parameters; only the source differs.
    assert names["self"] == names["interlayer"]
    assert names["simple"] < names["self"] < names["gated-self-interlayer"]


def _variant_models(num_layers: int = 2) -> dict[str, ReactiveTransformer]:
    """The four variants sharing every parameter they have in common (taken from one
    gated-self-interlayer model, which has them all)."""
    full = _model(variant="gated-self-interlayer")
    if num_layers != 2:
        config = full.config.replace(num_layers=num_layers)
        torch.manual_seed(0)
        full = ReactiveTransformer(config).eval()
    _randomize_gates(full)
    state = full.state_dict()
    models = {}
    for variant in VARIANTS:
        config = full.config.replace(memory={"variant": variant})
        model = ReactiveTransformer(config).eval()
        missing, _ = model.load_state_dict(state, strict=False)
        assert missing == [], (variant, missing)
        models[variant] = model
    return models


def test_variants_produce_different_updates_from_the_same_inputs() -> None:
    models = _variant_models()
    stm = _stm(models["simple"], 2, seed=20)
    ids = _ids(torch.Generator().manual_seed(21), 2, 12, models["simple"].config.vocab_size)
    with torch.no_grad():
        outs = {v: m.update_memory(stm, ids) for v, m in models.items()}
        # Same encoder in every model: the difference is in the memory attention only.
        eds = [m.encode(ids) for m in models.values()]
    for ed in eds[1:]:
        assert torch.equal(ed, eds[0])
    for i, a in enumerate(VARIANTS):
        for b in VARIANTS[i + 1 :]:
            gap = (outs[a] - outs[b]).abs().max().item()
            assert gap > 1e-3, f"{a} and {b} give the same update (max diff {gap:.2e})"


def test_interlayer_variants_reduce_to_self_with_one_layer() -> None:
    """With a single STM layer, the inter-layer mean is the layer itself: interlayer and the
    gated blend must then give exactly what the self variant gives."""
    models = _variant_models(num_layers=1)
    stm = _stm(models["self"], 2, seed=22)
    ids = _ids(torch.Generator().manual_seed(23), 2, 7, models["self"].config.vocab_size)
    with torch.no_grad():
        ref = models["self"].update_memory(stm, ids)
        for variant in ("interlayer", "gated-self-interlayer"):
            out = models[variant].update_memory(stm, ids)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        assert not torch.allclose(models["simple"].update_memory(stm, ids), ref, atol=1e-3)


# ---------------------------------------------------------------------------- errors
def _error_cases(model: ReactiveTransformer) -> dict[str, tuple[tuple, str]]:
    cfg = model.config
    stm = model.initial_stm(2, generator=torch.Generator().manual_seed(0))
    ids = _ids(torch.Generator().manual_seed(1), 2, 6, cfg.vocab_size)
    half_pad = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    too_long = _ids(torch.Generator().manual_seed(2), 2, cfg.max_seq_len + 1, cfg.vocab_size)
    return {
        "unbatched stm (L, S, d)": ((stm[0], ids), r"\(B, L, S, d\).*\(2, 32, 64\)"),
        "wrong layer count": ((stm[:, :1], ids), r"expects \(B, 2, S, 64\)"),
        "wrong width": ((stm[..., :32], ids), r"expects \(B, 2, S, 64\)"),
        "wrong slot count": ((stm[:, :, :8], ids), r"8 slots.*num_slots is 32"),
        "batch mismatch": ((stm, ids[:1]), r"batch size mismatch.*2 rows.*1"),
        "all-padding row": ((stm, ids, half_pad), r"rows \[1\] have no tokens \(all padding\)"),
        "too long": ((stm, too_long), rf"{cfg.max_seq_len + 1} tokens.*max_seq_len=128"),
        "mask shape": ((stm, ids, torch.ones(2, 4, dtype=torch.long)), r"mask must have shape"),
        "out-of-vocab id": ((stm, ids + cfg.vocab_size), r"out of range for vocab_size=1024"),
        "float ids": ((stm, ids.float()), r"integer token ids"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unbatched stm (L, S, d)",
        "wrong layer count",
        "wrong width",
        "wrong slot count",
        "batch mismatch",
        "all-padding row",
        "too long",
        "mask shape",
        "out-of-vocab id",
        "float ids",
    ],
)
def test_update_memory_rejects_bad_inputs(case: str) -> None:
    model = _model()
    args, message = _error_cases(model)[case]
    with pytest.raises(ValueError, match=message):
        model.update_memory(*args)


def test_encoder_rejects_left_padding():
    model = ReactiveTransformer(RxTConfig.preset("tiny")).eval()
    ids = torch.randint(8, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        model.update_memory(model.initial_stm(2), ids, mask)


@pytest.mark.parametrize("variant", ["self", "interlayer", "gated-self-interlayer"])
@pytest.mark.parametrize("reference", ["previous", "pre_step"])
def test_write_gate_mixes_the_update_with_the_reference(variant: str, reference: str) -> None:
    """Paper §3: STM_t = (1 − G) ⊙ STM_{t−1} + G ⊙ Update, G from (STM_{t−1} + Update), the
    pre-step feeding only the write's queries (``gate_reference="previous"``). ``"pre_step"``
    gates against the pre-stepped slots instead; the two must really differ."""
    model = _model(variant=variant, gate_reference=reference)
    _randomize_gates(model, scale=0.3)
    layer = model.memory_attention.layers[0]
    gen = torch.Generator().manual_seed(7)
    stm = torch.randn(2, 2, 32, 64, generator=gen)
    encoded = torch.randn(2, 2, 9, 64, generator=gen)
    positions = layer.write.rope.angles(torch.arange(9))
    with torch.no_grad():
        out = layer(stm[:, 0], encoded[:, 0], stm.mean(dim=1), None, positions)
        pre = layer.pre_step(stm[:, 0], stm.mean(dim=1))
        k, v = layer.write.project_kv(layer.norm_ed(encoded[:, 0]), positions)
        update = layer.write.attend(layer.write.project_q(layer.norm_q(pre)), k, v)
        base = stm[:, 0] if reference == "previous" else pre
        g = layer.gate.gate_values(base, update)
        other = pre if reference == "previous" else stm[:, 0]
    torch.testing.assert_close(out, (1 - g) * base + g * update, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, layer.gate(other, update), atol=1e-3)


def test_record_gates_sees_every_write_and_leaves_no_hook() -> None:
    from rxt.model.memory.gate_stats import record_gates

    model = _model()
    _randomize_gates(model, scale=0.3)
    gen = torch.Generator().manual_seed(3)
    stm = model.initial_stm(3, generator=gen)
    ids = torch.randint(8, model.config.vocab_size, (3, 12), generator=gen)
    expected: list[list[torch.Tensor]] = [[] for _ in model.memory_attention.layers]
    for i, layer in enumerate(model.memory_attention.layers):  # the gate's inputs, by hand
        layer.gate.register_forward_hook(
            lambda m, inp, out, i=i: expected[i].append(m.gate_values(*inp).expand_as(inp[0]))
        )
    with torch.no_grad(), record_gates(model) as gates:
        model.update_memory(model.update_memory(stm, ids), ids)
    stats = gates.quantiles()
    for i, values in enumerate(expected):
        g = torch.cat([v.reshape(-1) for v in values])
        assert len(values) == 2 and stats[i]["mean"] == pytest.approx(float(g.mean()), abs=1e-6)
        assert stats[i]["p50"] == pytest.approx(float(g.median()), abs=1e-3)
        assert 0 < stats[i]["p01"] < stats[i]["p50"] < stats[i]["p99"] < 1
    assert all(
        not layer.gate._forward_hooks or len(layer.gate._forward_hooks) == 1
        for layer in model.memory_attention.layers
    )  # only the test's own hook is left
    with record_gates(model, rows=1) as first_row:
        model.update_memory(stm, ids)
    assert first_row.values[0][0].numel() == model.config.memory.num_slots * 64
    with record_gates(_model(gate="none")) as none:
        pass
    assert none.quantiles() == [{}, {}]
