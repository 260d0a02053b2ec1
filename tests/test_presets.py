"""Every preset builds and trains one step; parameter counts are reported and add up.

Run with ``pytest -s tests/test_presets.py`` to see the counts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rxt import ReactiveTransformer, RxTConfig

PRESETS = RxTConfig.presets()
COMPONENTS = (
    "embedding",
    "decoder",
    "encoder",
    "memory_attention",
    "lm_head",
    "mlm_head",
    "stm_init",
)
# Total parameter ranges (paper-nano: the paper's RxT-Alpha Nano has ~12M).
TOTAL_RANGE = {"tiny": (0, 1_000_000), "small": (4_000_000, 7_000_000)}
TOTAL_RANGE["paper-nano"] = (10_000_000, 14_000_000)
TOTAL_RANGE["paper-micro-dense"] = (19_000_000, 19_500_000)


def _build(config: RxTConfig, seed: int = 0) -> ReactiveTransformer:
    torch.manual_seed(seed)
    return ReactiveTransformer(config)


def test_expected_presets_exist() -> None:
    assert {"tiny", "small", "paper-nano", "paper-micro-dense"} <= set(PRESETS)


def test_paper_micro_dense_has_the_authors_sizes_and_17_1m_parameters() -> None:
    """Issue 15's configuration of the authors' framework: d 256, 6 layers, 8 heads (8 query /
    8 kv), 64 STM slots, vocabulary 8,192, gated self-interlayer memory attention with an
    elementwise gate, no MoE; 17.1M parameters at inference."""
    cfg = RxTConfig.preset("paper-micro-dense")
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size) == (256, 6, 8192)
    assert cfg.stm_shape == (6, 64, 256)
    for att in (
        cfg.decoder.self_attention,
        cfg.decoder.cross_attention,
        cfg.encoder.self_attention,
        cfg.memory.attention,
    ):
        assert (att.num_heads, att.query_heads, att.kv_heads) == (8, 8, 8)
    assert cfg.decoder.moe is None
    assert cfg.memory.variant == "gated-self-interlayer"
    assert (cfg.memory.gate, cfg.memory.gate_projection) == ("dynamic", "elementwise")
    with torch.device("meta"):  # sizes only: no weights drawn
        counts = ReactiveTransformer(cfg).parameter_counts()
    assert counts["inference"] == 17_064_192  # 17.1M
    assert counts["total"] == counts["inference"] + counts["mlm_head"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step(name: str) -> None:
    """decode (turn 1) -> update_memory -> decode (turn 2, from the new STM) + MLM, backward:
    every parameter gets a finite gradient, so every component is wired into the graph."""
    model = _build(RxTConfig.preset(name)).train()
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    b, t = 2, 12
    turn1 = torch.randint(8, cfg.vocab_size, (b, t), generator=gen)
    turn2 = torch.randint(8, cfg.vocab_size, (b, t), generator=gen)
    stm0 = model.initial_stm(b, generator=gen)

    def lm_loss(ids: torch.Tensor, stm: torch.Tensor) -> torch.Tensor:
        out = model(ids, stm)
        assert out.logits.shape == (b, t, cfg.vocab_size)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        if cfg.decoder.moe is not None:
            assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
            loss = loss + out.aux_loss
        else:
            assert out.aux_loss is None
        return loss

    loss1 = lm_loss(turn1, stm0)
    stm1 = model.update_memory(stm0, turn1)
    assert stm1.shape == stm0.shape == (b, *cfg.stm_shape)
    loss2 = lm_loss(turn2, stm1)
    mlm = model.mlm_logits(model.encode(turn1))
    mlm_loss = F.cross_entropy(mlm.flatten(0, 1), turn1.flatten())
    loss = loss1 + loss2 + mlm_loss
    assert torch.isfinite(loss)
    # Untrained: the LM loss is near log(V) (init logits are small but not zero).
    assert abs(loss1.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 2.0
    loss.backward()

    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    nonzero = sum(int(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero == len(list(model.parameters())), f"{name}: some gradients are all zero"


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_counts(name: str) -> None:
    model = _build(RxTConfig.preset(name))
    counts = model.parameter_counts()
    cfg = model.config
    print(
        f"\n[{name}] total={counts['total']:,} inference={counts['inference']:,} "
        f"active_per_token={counts['active_per_token']:,} | "
        + " ".join(f"{k}={counts[k]:,}" for k in COMPONENTS)
    )

    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["inference"] == counts["total"] - counts["mlm_head"]
    lo, hi = TOTAL_RANGE.get(name, (0, float("inf")))
    assert lo <= counts["total"] <= hi, f"{name}: {counts['total']:,} not in [{lo:,}, {hi:,}]"

    moe = cfg.decoder.moe
    if moe is None:
        assert counts["active_per_token"] == counts["inference"]
    else:
        # A token uses top_k of num_experts SwiGLU experts (3 matrices d x expert_dim each).
        inactive = cfg.num_layers * (moe.num_experts - moe.top_k) * 3 * cfg.d_model * moe.expert_dim
        assert counts["active_per_token"] == counts["inference"] - inactive
        assert counts["active_per_token"] < counts["inference"]

    # Components the count can be checked against by hand.
    assert counts["embedding"] == cfg.vocab_size * cfg.d_model
    assert counts["lm_head"] == (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"mlm_head": False},
        {"memory": {"stm_init": "learned", "variant": "gated-self-interlayer"}},
        {"decoder": {"moe": {"num_experts": 4, "top_k": 1, "expert_dim": 32}}},
        {"memory": {"gate": "none", "variant": "simple"}},
    ],
    ids=["tiny", "tied", "no-mlm", "learned-stm", "moe", "no-gate"],
)
def test_parameter_count_components_add_up(overrides: dict) -> None:
    model = _build(RxTConfig.preset("tiny", **overrides))
    counts = model.parameter_counts()
    assert sum(counts[k] for k in COMPONENTS) == counts["total"], counts
    # Each component is what it says (no double counting of shared/tied storage).
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts["total"] == sum(unique.values())
    assert counts["stm_init"] == (
        model.config.num_layers * model.config.memory.num_slots * model.config.d_model
        if model.config.memory.stm_init == "learned"
        else 0
    )
    cfg = model.config
    # MLM head: RMSNorm scale (d) + projection to the vocabulary (V x d).
    assert counts["mlm_head"] == ((cfg.vocab_size + 1) * cfg.d_model if cfg.mlm_head else 0)
    if not model.config.mlm_head:
        assert counts["inference"] == counts["total"]
    if model.config.tie_embeddings:
        assert counts["lm_head"] == 0
        untied = _build(RxTConfig.preset("tiny")).parameter_counts()
        assert untied["total"] - counts["total"] == model.config.vocab_size * model.config.d_model
