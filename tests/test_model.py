"""Tests for the model (rxt.model, rxt.nn, rxt.engine.greedy).

Causality, KV-cached decoding, left-padded batches, how the decoder reads memory (permutation
invariance, every layer reads its own STM layer, memory masks), input validation, head sharing
(GQA/MQA/SQA) against a hand-written attention, Mixture-of-Experts routing and balance loss,
greedy generation, RoPE placement, statelessness, and gradient flow through the memory.

Float32 throughout. Two computations that differ only in kernel or summation order (cached vs
full, batched vs single, gathered vs dispatched experts) are compared with ATOL/RTOL below;
computations that run the very same operations are compared exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rxt import KVCache, ReactiveTransformer, RxTConfig
from rxt.engine.greedy import greedy_answer, iter_greedy
from rxt.model.decoder import DecodeContext
from rxt.nn import Attention, AttentionBlockConfig, MoEFeedForward, RotaryEmbedding

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

ATOL = 1e-5  # float32, results of different kernels / summation orders
RTOL = 1e-5
DIFFERENT = 1e-3  # "clearly different": max |Δlogit| at least this (logits are O(1))


def _heads(h: int, hq: int, hkv: int) -> dict[str, int]:
    return {"num_heads": h, "num_query_heads": hq, "num_kv_heads": hkv}


# Overrides of the tiny preset (d=64, 4 heads of width 16). "moe-sqa" is the conftest config.
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},  # tiny as shipped: decoder 4 query / 2 kv heads
    "mha": {"decoder": {"self_attention": _heads(4, 4, 4), "cross_attention": _heads(4, 4, 4)}},
    "mqa": {"decoder": {"self_attention": _heads(4, 4, 1), "cross_attention": _heads(4, 4, 1)}},
    "sqa": {"decoder": {"self_attention": _heads(4, 2, 1), "cross_attention": _heads(4, 2, 2)}},
    "tied": {"tie_embeddings": True},
}
ALL_VARIANTS = [*VARIANTS, "moe-sqa"]


@pytest.fixture(params=ALL_VARIANTS)
def variant_model(request, make_model) -> ReactiveTransformer:
    """A seeded eval-mode model for each head/FFN/embedding variant."""
    if request.param == "moe-sqa":
        config = request.getfixturevalue("moe_sqa_config")
    else:
        config = RxTConfig.preset("tiny", **VARIANTS[request.param])
    return make_model(config)


@pytest.fixture(params=["dense", "moe"])
def dense_or_moe(request, tiny_model, moe_sqa_model) -> ReactiveTransformer:
    return tiny_model if request.param == "dense" else moe_sqa_model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(model: ReactiveTransformer, b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (b, t), generator=_gen(seed))


def _stm(model: ReactiveTransformer, b: int, seed: int) -> torch.Tensor:
    return torch.randn((b, *model.config.stm_shape), generator=_gen(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- 1. causality
@pytest.mark.parametrize("with_mask", [False, True], ids=["is_causal", "explicit-mask"])
def test_future_tokens_never_change_earlier_logits(variant_model, with_mask):
    model = variant_model
    torch.manual_seed(0)
    t = 12
    ids = _ids(model, 1, t, seed=1)
    stm = _stm(model, 1, seed=2)
    kwargs = {"attention_mask": torch.ones(1, t, dtype=torch.long)} if with_mask else {}
    with torch.no_grad():
        base = model.decode(ids, stm, **kwargs)
        for k in (1, 5, t - 1):
            changed = ids.clone()
            changed[0, k] = (changed[0, k] + 1) % model.config.vocab_size
            out = model.decode(changed, stm, **kwargs)
            _close(out[:, :k], base[:, :k])
            # ...while position k itself does see the change (the test can fail).
            assert _max_diff(out[:, k], base[:, k]) > DIFFERENT


# ---------------------------------------------------------------------------- 2. KV cache
@pytest.mark.parametrize("chunk", [1, 4], ids=["token-by-token", "chunks-of-4"])
def test_kv_cached_decoding_matches_full_recomputation(variant_model, chunk):
    model = variant_model
    torch.manual_seed(0)
    b, prefill, total = 2, 5, 17
    ids = _ids(model, b, total, seed=1)
    stm = _stm(model, b, seed=2)
    with torch.no_grad():
        full = model.decode(ids, stm)
        memory = model.memory_kv(stm)
        cache = model.new_kv_cache(b)
        pieces = [model.decode(ids[:, :prefill], memory_kv=memory, kv_cache=cache)]
        for start in range(prefill, total, chunk):
            step = ids[:, start : start + chunk]
            pieces.append(model.decode(step, memory_kv=memory, kv_cache=cache))
    assert cache.length == total
    _close(torch.cat(pieces, dim=1), full)


def test_precomputed_memory_kv_equals_passing_stm(variant_model):
    model = variant_model
    torch.manual_seed(0)
    ids = _ids(model, 2, 9, seed=1)
    stm = _stm(model, 2, seed=2)
    with torch.no_grad():
        memory = model.memory_kv(stm)
        # Same operations either way: exactly equal.
        assert torch.equal(model.decode(ids, memory_kv=memory), model.decode(ids, stm))
        cache_a, cache_b = model.new_kv_cache(2), model.new_kv_cache(2)
        for start in range(0, 9, 3):
            step = ids[:, start : start + 3]
            a = model.decode(step, memory_kv=memory, kv_cache=cache_a)
            b = model.decode(step, stm, kv_cache=cache_b)
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- 3. batching
def _left_pad(rows: list[torch.Tensor], pad_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Left-pad 1-D rows into (B, T) with ``pad_ids`` filler; return ids and mask."""
    t = max(len(r) for r in rows)
    ids = pad_ids[: len(rows), :t].clone()
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask


def test_left_padded_batch_matches_unpadded_rows(variant_model):
    model = variant_model
    torch.manual_seed(0)
    lengths = [9, 4, 7]
    rows = [_ids(model, 1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    stm = _stm(model, 3, seed=2)
    with torch.no_grad():
        ids, mask = _left_pad(rows, torch.zeros(3, 9, dtype=torch.long))
        batched = model.decode(ids, stm, attention_mask=mask)
        # The filler under padding must not matter either.
        ids_other, _ = _left_pad(rows, _ids(model, 3, 9, seed=99))
        batched_other = model.decode(ids_other, stm, attention_mask=mask)
        for i, row in enumerate(rows):
            real = slice(9 - len(row), 9)
            single = model.decode(row[None], stm[i : i + 1])
            _close(batched[i : i + 1, real], single)
            _close(batched_other[i : i + 1, real], single)


def test_cached_steps_after_left_padded_prefill_match_single_rows(variant_model):
    model = variant_model
    torch.manual_seed(0)
    lengths = [6, 3, 5]
    prompts = [_ids(model, 1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    cont = _ids(model, 3, 7, seed=30)  # 4 single steps, then one chunk of 3
    stm = _stm(model, 3, seed=2)
    with torch.no_grad():
        ids, mask = _left_pad(prompts, torch.zeros(3, 6, dtype=torch.long))
        memory = model.memory_kv(stm)
        cache = model.new_kv_cache(3)
        out = [model.decode(ids, memory_kv=memory, kv_cache=cache, attention_mask=mask)]
        for j in range(4):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            step = cont[:, j : j + 1]
            out.append(model.decode(step, memory_kv=memory, kv_cache=cache, attention_mask=mask))
        mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)
        out.append(model.decode(cont[:, 4:], memory_kv=memory, kv_cache=cache, attention_mask=mask))
        got = torch.cat(out, dim=1)
        assert got.shape[1] == 6 + 7 == cache.length
        for i, prompt in enumerate(prompts):
            seq = torch.cat([prompt, cont[i]])[None]
            single = model.decode(seq, stm[i : i + 1])
            _close(got[i : i + 1, 6 - len(prompt) :], single)


def test_batched_rows_read_their_own_memory(variant_model):
    model = variant_model
    torch.manual_seed(0)
    ids = _ids(model, 1, 8, seed=1).expand(3, 8)  # same tokens, different memories
    stm = _stm(model, 3, seed=2)
    with torch.no_grad():
        batched = model.decode(ids, stm)
        for i in range(3):
            _close(batched[i : i + 1], model.decode(ids[i : i + 1], stm[i : i + 1]))
    assert _max_diff(batched[0], batched[1]) > DIFFERENT
    assert _max_diff(batched[1], batched[2]) > DIFFERENT


# ---------------------------------------------------------------------------- 4-5. memory
def test_memory_slots_are_a_set(variant_model):
    model = variant_model
    torch.manual_seed(0)
    ids = _ids(model, 2, 10, seed=1)
    stm = _stm(model, 2, seed=2)
    perm = torch.randperm(model.config.memory.num_slots, generator=_gen(3))
    assert not torch.equal(perm, torch.arange(len(perm)))
    with torch.no_grad():
        _close(model.decode(ids, stm[:, :, perm]), model.decode(ids, stm))


def test_memory_mask_hides_slots_and_permutes_with_them(tiny_model):
    model = tiny_model
    s = model.config.memory.num_slots
    ids = _ids(model, 2, 8, seed=1)
    stm = _stm(model, 2, seed=2)
    mask = torch.rand(2, s, generator=_gen(3)) < 0.6
    mask[:, 0] = True
    perm = torch.randperm(s, generator=_gen(4))
    with torch.no_grad():
        base = model.decode(ids, stm, memory_mask=mask)
        hidden_changed = torch.where(mask[:, None, :, None], stm, _stm(model, 2, seed=5))
        _close(model.decode(ids, hidden_changed, memory_mask=mask), base)
        _close(model.decode(ids, stm[:, :, perm], memory_mask=mask[:, perm]), base)
        assert _max_diff(model.decode(ids, stm), base) > DIFFERENT  # the mask does something


def test_different_memories_give_different_logits_in_every_layer(dense_or_moe):
    model = dense_or_moe
    torch.manual_seed(0)
    ids = _ids(model, 1, 10, seed=1)
    stm = _stm(model, 1, seed=2)
    other = _stm(model, 1, seed=3)
    with torch.no_grad():
        base = model.decode(ids, stm)
        assert _max_diff(model.decode(ids, other), base) > DIFFERENT
        for layer in range(model.config.num_layers):  # each decoder layer reads memory
            changed = stm.clone()
            changed[:, layer] = other[:, layer]
            assert _max_diff(model.decode(ids, changed), base) > DIFFERENT, layer


def test_decoder_layer_l_reads_stm_layer_l_without_rotation(tiny_model):
    model = tiny_model
    stm = _stm(model, 2, seed=2)
    with torch.no_grad():
        memory = model.memory_kv(stm)
        for i, layer in enumerate(model.decoder.layers):
            att = layer.cross_attn
            normed = layer.norm_memory(stm[:, i])
            k = att.k_proj(normed).view(2, -1, att.num_kv_heads, att.head_dim).transpose(1, 2)
            v = att.v_proj(normed).view(2, -1, att.num_kv_heads, att.head_dim).transpose(1, 2)
            assert torch.equal(memory.keys[i], k)  # no RoPE on memory keys: slots are a set
            assert torch.equal(memory.values[i], v)


# ---------------------------------------------------------------------------- 6. last_only
def test_last_only_logits_equal_last_position(variant_model):
    model = variant_model
    ids = _ids(model, 2, 11, seed=1)
    stm = _stm(model, 2, seed=2)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            full = model.decode(ids, stm, **kwargs)
            last = model.decode(ids, stm, last_only=True, **kwargs)
            assert last.shape == (2, 1, model.config.vocab_size)
            _close(last, full[:, -1:])  # the LM head's matmul shape differs: not bitwise


# ---------------------------------------------------------------------------- 7. errors
def test_sequence_longer_than_max_seq_len_is_rejected(tiny_model):
    model = tiny_model
    limit = model.config.max_seq_len
    stm = _stm(model, 1, seed=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.decode(_ids(model, 1, limit + 1, seed=1), stm)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.update_memory(stm, _ids(model, 1, limit + 1, seed=1))
    # cached + new > limit, with a cache big enough to hold it (built by hand, since
    # new_kv_cache refuses such a capacity): max_seq_len still rules.
    heads = model.config.decoder.self_attention
    cache = KVCache.empty(
        model.config.num_layers,
        1,
        heads.kv_heads,
        model.config.d_model // heads.num_heads,
        limit + 8,
    )
    with torch.no_grad():
        model.decode(_ids(model, 1, limit - 2, seed=1), stm, kv_cache=cache)
        with pytest.raises(ValueError, match=f"max_seq_len={limit}"):
            model.decode(_ids(model, 1, 3, seed=3), stm, kv_cache=cache)
        assert cache.length == limit - 2  # rejected before anything was written
        model.decode(_ids(model, 1, 2, seed=3), stm, kv_cache=cache)  # exactly at the limit
    assert cache.length == limit


def test_token_ids_out_of_vocabulary_are_rejected(tiny_model):
    model = tiny_model
    stm = _stm(model, 1, seed=2)
    ids = _ids(model, 1, 5, seed=1)
    for bad in (model.config.vocab_size, -1):
        bad_ids = ids.clone()
        bad_ids[0, 2] = bad
        with pytest.raises(ValueError, match="vocab_size"):
            model.decode(bad_ids, stm)
        with pytest.raises(ValueError, match="vocab_size"):
            model.update_memory(stm, bad_ids)


def test_malformed_ids_are_rejected(tiny_model):
    model = tiny_model
    stm = _stm(model, 1, seed=2)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model.decode(torch.tensor([1, 2, 3]), stm)
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.ones(1, 3), stm)
    with pytest.raises(ValueError, match="empty"):
        model.decode(torch.ones(1, 0, dtype=torch.long), stm)


def test_wrong_attention_mask_shape_is_rejected(tiny_model):
    model = tiny_model
    stm = _stm(model, 2, seed=2)
    ids = _ids(model, 2, 6, seed=1)
    for shape in ((2, 5), (1, 6), (2, 7)):
        with pytest.raises(ValueError, match="attention_mask"):
            model.decode(ids, stm, attention_mask=torch.ones(shape, dtype=torch.long))
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model.decode(ids, stm, kv_cache=cache)
    # After 6 cached tokens the mask must cover cached + new = 7 positions, not only the new one.
    with pytest.raises(ValueError, match=r"cached \+ new"):
        model.decode(ids[:, :1], stm, kv_cache=cache, attention_mask=torch.ones(2, 1))


@pytest.mark.parametrize("dim", [1, 3], ids=["wrong-L", "wrong-d"])
def test_stm_of_wrong_shape_is_rejected(tiny_model, dim):
    model = tiny_model
    shape = [1, *model.config.stm_shape]
    shape[dim] += 1
    bad = torch.zeros(shape)
    ids = _ids(model, 1, 4, seed=1)
    with pytest.raises(ValueError, match="expects"):
        model.decode(ids, bad)
    with pytest.raises(ValueError, match="expects"):
        model.memory_kv(bad)
    with pytest.raises(ValueError, match="expects"):
        model.update_memory(bad, ids)
    with pytest.raises(ValueError, match=r"\(B, L, S, d\)"):
        model.decode(ids, bad[0])  # 3-D: batch dimension missing


def test_update_memory_rejects_wrong_slot_count_and_empty_rows(tiny_model):
    model = tiny_model
    ids = _ids(model, 2, 4, seed=1)
    layers, slots, d = model.config.stm_shape
    with pytest.raises(ValueError, match="num_slots"):
        model.update_memory(torch.zeros(2, layers, slots + 1, d), ids)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.update_memory(_stm(model, 2, seed=2), ids, mask)


def test_decode_without_memory_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="memory"):
        tiny_model.decode(_ids(tiny_model, 1, 4, seed=1))


def test_kv_cache_overflow_is_rejected_and_leaves_cache_usable(tiny_model):
    model = tiny_model
    ids = _ids(model, 1, 8, seed=1)
    stm = _stm(model, 1, seed=2)
    with torch.no_grad():
        full = model.decode(ids, stm)
        cache = model.new_kv_cache(1, capacity=8)
        model.decode(ids[:, :6], stm, kv_cache=cache)
        with pytest.raises(ValueError, match="capacity 8"):
            model.decode(ids[:, :3], stm, kv_cache=cache)
        assert cache.length == 6
        rest = model.decode(ids[:, 6:], stm, kv_cache=cache)
    _close(rest, full[:, 6:])


def test_batch_size_mismatches_are_rejected(tiny_model):
    model = tiny_model
    ids = _ids(model, 2, 4, seed=1)
    with pytest.raises(ValueError, match="batch"):
        model.decode(ids, _stm(model, 3, seed=2))
    with pytest.raises(ValueError, match="batch"):
        model.decode(ids, memory_kv=model.memory_kv(_stm(model, 1, seed=2)))
    with pytest.raises(ValueError, match="batch"):
        model.decode(ids, _stm(model, 2, seed=2), kv_cache=model.new_kv_cache(3))
    with pytest.raises(ValueError, match="batch"):
        model.update_memory(_stm(model, 3, seed=2), ids)
    with pytest.raises(ValueError, match="memory_mask"):
        model.decode(ids, _stm(model, 2, seed=2), memory_mask=torch.ones(1, 32, dtype=torch.bool))


# ---------------------------------------------------------------------------- 8. GQA / SQA
def _reference_attention(
    att: Attention, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention written out by hand: K/V heads repeated to H_q, explicit softmax."""
    b, tq, _ = x.shape
    tk = source.shape[1]
    hq, hkv, hd = att.num_query_heads, att.num_kv_heads, att.head_dim
    q = (x @ att.q_proj.weight.T).view(b, tq, hq, hd).transpose(1, 2)
    k = (source @ att.k_proj.weight.T).view(b, tk, hkv, hd).transpose(1, 2)
    v = (source @ att.v_proj.weight.T).view(b, tk, hkv, hd).transpose(1, 2)
    k = k.repeat_interleave(hq // hkv, dim=1)  # query head h reads kv head h // (hq/hkv)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(b, tq, hq * hd) @ att.o_proj.weight.T


@pytest.mark.parametrize(
    "heads",
    [(8, 8, 8), (8, 8, 2), (8, 8, 1), (8, 4, 4), (8, 4, 2), (8, 2, 1)],
    ids=["mha", "gqa", "mqa", "sqa", "sqa-gqa", "xsqa-mqa"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_attention_head_sharing_matches_manual_reference(heads, masked):
    torch.manual_seed(0)
    d = 64
    h, hq, hkv = heads
    att = Attention(
        AttentionBlockConfig(d, h, hq, hkv, rope_queries=False, rope_keys=False, max_positions=32)
    )
    assert att.q_proj.out_features == heads[1] * d // heads[0]
    assert att.k_proj.out_features == heads[2] * d // heads[0]
    x = torch.randn(2, 7, d)
    source = torch.randn(2, 11, d)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 7, 11, generator=_gen(1)) < 0.5
        mask[..., 0] = True  # every query sees at least one key
    with torch.no_grad():
        got = att(x, source, mask=mask)
        _close(got, _reference_attention(att, x, source, mask))
        # Self-attention with the causal flag equals the explicit lower-triangular mask.
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        _close(att(x, is_causal=True), _reference_attention(att, x, x, causal))


# ---------------------------------------------------------------------------- 9. MoE
@pytest.fixture
def moe_layer(moe_sqa_model) -> MoEFeedForward:
    ffn = moe_sqa_model.decoder.layers[0].ffn
    assert isinstance(ffn, MoEFeedForward)
    return ffn


def _moe_reference(moe: MoEFeedForward, flat: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over the top-k router logits, weighted sum of SwiGLU experts."""
    out = torch.zeros_like(flat)
    for n, x in enumerate(flat):
        top, idx = (moe.router.weight @ x).topk(moe.top_k)
        for w, e in zip(top.softmax(-1), idx.tolist(), strict=True):
            h = F.silu(x @ moe.w_gate[e]) * (x @ moe.w_up[e])
            out[n] += w * (h @ moe.w_down[e])
    return out


def test_moe_gathered_and_dispatched_paths_agree_with_reference(moe_layer):
    moe = moe_layer
    torch.manual_seed(0)
    x = torch.randn(3, 10, moe.router.in_features)
    with torch.no_grad():
        reference = _moe_reference(moe, x.reshape(-1, x.shape[-1])).view_as(x)
        moe.gather_threshold = 10**6  # force the gathered path
        gathered, loss_g = moe(x)
        moe.gather_threshold = 0  # force the dispatched path
        dispatched, loss_d = moe(x)
        logits = moe.router(x.reshape(-1, x.shape[-1]))
        top_w, top_idx = logits.topk(moe.top_k, dim=-1)
        direct_g = moe._gathered(x.reshape(-1, x.shape[-1]), top_idx, top_w.softmax(-1))
    _close(gathered, reference)
    _close(dispatched, reference)
    _close(direct_g.view_as(x), reference)
    assert torch.equal(loss_g, loss_d)
    # Every expert was used by some token, so the dispatched loop visited them all.
    assert torch.bincount(top_idx.flatten(), minlength=moe.num_experts).min() > 0


def test_moe_balance_loss_is_one_for_balanced_and_larger_for_collapsed_routing(moe_layer):
    moe = moe_layer
    e, k = moe.num_experts, moe.top_k
    n = 4 * e
    # Balanced: token i prefers experts i, i+1 (mod E); by symmetry f_e = P_e = 1/E → loss 1.
    logits = torch.zeros(n, e)
    for i in range(n):
        logits[i, i % e] = 3.0
        logits[i, (i + 1) % e] = 2.0
    top_idx = logits.topk(k, dim=-1).indices
    balanced = moe._balance_loss(logits, top_idx, None)
    torch.testing.assert_close(balanced, torch.tensor(1.0), atol=1e-6, rtol=0)
    # Collapsed: every token picks experts 0 and 1: f = (1/2, 1/2, 0, ...), P_0 = P_1 = p.
    c = 3.0
    collapsed = torch.zeros(n, e)
    collapsed[:, :2] = c
    top_idx = collapsed.topk(k, dim=-1).indices
    p = math.exp(c) / (2 * math.exp(c) + e - 2)
    loss = moe._balance_loss(collapsed, top_idx, None)
    torch.testing.assert_close(loss, torch.tensor(e * p), atol=1e-6, rtol=0)
    assert loss > 2.0 > balanced
    # Uniform router probabilities (zero router): loss is exactly 1 whatever topk picks on ties,
    # since E · Σ f_e · (1/E) = Σ f_e = 1.
    with torch.no_grad():
        saved = moe.router.weight.clone()
        moe.router.weight.zero_()
        _, uniform = moe(torch.randn(2, 5, moe.router.in_features))
        moe.router.weight.copy_(saved)
    torch.testing.assert_close(uniform, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_moe_balance_loss_ignores_padding(moe_layer):
    moe = moe_layer
    torch.manual_seed(0)
    d = moe.router.in_features
    x = torch.randn(2, 6, d)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, :4] = 0
    with torch.no_grad():
        out, loss = moe(x, mask)
        x2 = torch.where(mask[..., None].bool(), x, torch.randn(2, 6, d) * 10)
        out2, loss2 = moe(x2, mask)
        _, loss_real = moe(x[mask.bool()].view(1, -1, d))  # the real tokens alone, no mask
        _, loss_all = moe(x)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_real, loss, atol=1e-6, rtol=0)
    assert abs(loss_all.item() - loss.item()) > 1e-4  # padding would have changed it
    _close(out2[mask.bool()], out[mask.bool()])  # routing is per token


def test_decoder_aux_loss_is_scaled_sum_of_layer_losses(make_model, moe_sqa_config, tiny_model):
    raw: list[torch.Tensor] = []
    models = {
        w: make_model(moe_sqa_config.replace(decoder={"moe": {"aux_loss_weight": w}}))
        for w in (1.0, 0.25)
    }
    for layer in models[1.0].decoder.layers:
        layer.ffn.register_forward_hook(lambda _m, _i, out: raw.append(out[1]))
    ids = _ids(models[1.0], 2, 9, seed=1)
    stm = _stm(models[1.0], 2, seed=2)
    with torch.no_grad():
        aux_1 = models[1.0].decoder_forward(ids, stm).aux_loss
        aux_q = models[0.25].decoder_forward(ids, stm).aux_loss
    assert len(raw) == moe_sqa_config.num_layers
    torch.testing.assert_close(aux_1, torch.stack(raw).sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(aux_q, 0.25 * aux_1, atol=1e-6, rtol=0)
    assert aux_1 > 0.5 * moe_sqa_config.num_layers  # each layer's loss is >= ~1, never 0
    assert tiny_model.decoder_forward(ids, _stm(tiny_model, 2, seed=2)).aux_loss is None


def test_moe_backward_reaches_router_and_experts(moe_sqa_model):
    model = moe_sqa_model
    torch.manual_seed(0)
    ids = _ids(model, 2, 12, seed=1)
    out = model.decoder_forward(ids, _stm(model, 2, seed=2))
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (lm + out.aux_loss).backward()
    for layer in model.decoder.layers:
        moe = layer.ffn
        for p in (moe.router.weight, moe.w_gate, moe.w_up, moe.w_down):
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0
    # The balance loss on its own trains the router, and not the experts of the last layer
    # (earlier layers' experts do reach it: they feed later layers' routers).
    model.zero_grad(set_to_none=True)
    model.decoder_forward(ids, _stm(model, 2, seed=2)).aux_loss.backward()
    moe = model.decoder.layers[-1].ffn
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.w_gate.grad is None or moe.w_gate.grad.abs().sum() == 0


# ---------------------------------------------------------------------------- 10. generation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_answer_with_cache_equals_without(dense_or_moe, seed):
    model = dense_or_moe
    prompt = _ids(model, 1, 6, seed=seed)
    stm = _stm(model, 1, seed=100 + seed)
    cached = greedy_answer(model, prompt, stm, max_new_tokens=12, eos_id=-1)
    uncached = greedy_answer(model, prompt, stm, max_new_tokens=12, eos_id=-1, use_cache=False)
    assert cached == uncached
    assert len(cached) == 12  # eos never produced: stops at max_new_tokens exactly
    # Greedy means: each token is the argmax of the full recomputation given the previous ones.
    seq = torch.cat([prompt, torch.tensor([cached])], dim=1)
    with torch.no_grad():
        expected = model.decode(seq, stm)[0, 5:-1].argmax(-1).tolist()
    assert cached == expected


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_answer_stops_at_eos(tiny_model, use_cache):
    model = tiny_model
    prompt = _ids(model, 1, 5, seed=3)
    stm = _stm(model, 1, seed=4)
    full = greedy_answer(model, prompt, stm, max_new_tokens=10, eos_id=-1, use_cache=use_cache)
    eos = full[4]
    cut = full.index(eos)  # first occurrence
    answer = greedy_answer(model, prompt, stm, max_new_tokens=10, eos_id=eos, use_cache=use_cache)
    assert answer == full[: cut + 1]
    assert answer[-1] == eos


def test_greedy_answer_rejects_max_new_tokens_that_do_not_fit(make_model):
    model = make_model(RxTConfig.preset("tiny", max_seq_len=16))
    prompt = _ids(model, 1, 10, seed=1)
    stm = _stm(model, 1, seed=2)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="max_seq_len"):
            greedy_answer(model, prompt, stm, max_new_tokens=7, eos_id=-1, use_cache=use_cache)
        # Exactly filling max_seq_len is allowed.
        answer = greedy_answer(model, prompt, stm, max_new_tokens=6, eos_id=-1, use_cache=use_cache)
        assert len(answer) == 6
        assert greedy_answer(model, prompt, stm, max_new_tokens=0, eos_id=-1) == []
        with pytest.raises(ValueError, match="max_new_tokens"):
            greedy_answer(model, prompt, stm, max_new_tokens=-1, eos_id=-1, use_cache=use_cache)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        greedy_answer(model, prompt.expand(2, 10), stm, max_new_tokens=2, eos_id=-1)


def test_iter_greedy_streams_the_same_tokens_and_validates_before_the_first(tiny_model):
    model = tiny_model
    prompt = _ids(model, 1, 6, seed=7)
    stm = _stm(model, 1, seed=8)
    stream = iter_greedy(model, prompt, stm, max_new_tokens=9, eos_id=-1)
    first = next(stream)
    assert [first, *stream] == greedy_answer(model, prompt, stm, max_new_tokens=9, eos_id=-1)
    with pytest.raises(ValueError, match="max_seq_len"):  # raised at the call, not on next()
        iter_greedy(model, prompt, stm, max_new_tokens=10_000, eos_id=-1)


# ---------------------------------------------------------------------------- 11. RoPE
def test_rope_preserves_norms_and_encodes_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 64)
    x = torch.randn(2, 3, 10, 16)
    pos = torch.arange(10)
    rotated = rope(x, pos)
    _close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert _max_diff(rotated[:, :, 1:], x[:, :, 1:]) > DIFFERENT  # it does rotate
    _close(rotated[:, :, 0], x[:, :, 0])  # position 0 is the identity
    # Per-row positions (B, T) agree with shared positions.
    _close(rope(x, pos.expand(2, 10)), rotated)
    # <R(p) q, R(p') k> depends only on p - p'.
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    for p, p2 in ((3, 1), (9, 2)):
        dots = [
            (rope(q, torch.tensor([p + c])) * rope(k, torch.tensor([p2 + c]))).sum()
            for c in (0, 5, 40)
        ]
        torch.testing.assert_close(dots[1], dots[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(dots[2], dots[0], atol=ATOL, rtol=RTOL)


def test_query_only_rope_in_cross_attention_makes_output_depend_on_position(tiny_model):
    model = copy.deepcopy(tiny_model)
    layer = model.decoder.layers[0]
    assert (layer.cross_attn.rope_queries, layer.cross_attn.rope_keys) == (True, False)
    assert (layer.self_attn.rope_queries, layer.self_attn.rope_keys) == (True, True)
    torch.manual_seed(0)
    x = torch.randn(1, 6, model.config.d_model)
    memory = model.memory_kv(_stm(model, 1, seed=2))

    def run(shift: int) -> torch.Tensor:
        ctx = DecodeContext(
            positions=torch.arange(6) + shift,
            self_mask=None,
            is_causal=True,
            memory=memory,
            cache=None,
            token_mask=None,
        )
        out, _ = layer(x, 0, ctx)
        return out

    with torch.no_grad():
        # Memory keys carry no position, rotated queries do: shifting positions changes output.
        assert _max_diff(run(7), run(0)) > DIFFERENT
        # Without the cross-attention contribution the layer is shift-invariant (relative RoPE).
        layer.cross_attn.o_proj.weight.zero_()
        _close(run(7), run(0))


# ---------------------------------------------------------------------------- 12. no state
def test_model_holds_no_conversation_state(dense_or_moe):
    model = dense_or_moe
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def turn(ids: torch.Tensor, stm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stm_in = stm.clone()
        logits = model.decode(ids, stm)
        new = model.update_memory(stm, ids)
        assert torch.equal(stm, stm_in)  # inputs are not modified
        return logits, new

    a_ids = [_ids(model, 1, 9, seed=s) for s in (1, 2)]
    b_ids = [_ids(model, 1, 7, seed=s) for s in (3, 4)]

    def conversation(turns: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
        stm, outs = _stm(model, 1, seed), []
        for ids in turns:
            logits, stm = turn(ids, stm)
            outs += [logits, stm]
        return outs

    with torch.no_grad():
        alone = conversation(a_ids, seed=10)
        other = conversation(b_ids, seed=11)
        again = conversation(a_ids, seed=10)
    for x, y in zip(alone, again, strict=True):
        assert torch.equal(x, y)
    assert _max_diff(alone[0][:, :7], other[0]) > DIFFERENT
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


# ---------------------------------------------------------------------------- 13. gradients
@pytest.mark.parametrize(
    "memory",
    [{}, {"variant": "gated-self-interlayer", "gate_projection": "linear"}],
    ids=["interlayer-elementwise", "gated-self-interlayer-linear"],
)
def test_gradients_reach_every_component_through_the_memory(make_model, memory):
    model = make_model(RxTConfig.preset("tiny", memory=memory)).train()
    torch.manual_seed(0)
    turn1, turn2 = _ids(model, 2, 10, seed=1), _ids(model, 2, 8, seed=2)
    stm0 = model.initial_stm(2, generator=_gen(3))
    stm1 = model.update_memory(stm0, turn1)
    logits = model.decode(turn2, stm1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), turn2[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mlm_head."):  # stage 1–2 only; not on this path
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # The encoder learns only through update_memory; with the memory detached it gets nothing.
    model.zero_grad(set_to_none=True)
    logits = model.decode(turn2, model.update_memory(stm0, turn1).detach())
    F.cross_entropy(logits[:, :-1].flatten(0, 1), turn2[:, 1:].flatten()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.memory_attention.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rmsnorm_matches_its_formula_in_every_dtype(dtype):
    from rxt.nn import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 3
    reference = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.double()
    out = norm.to(dtype if dtype != torch.bfloat16 else torch.float32)(x.to(dtype))
    assert out.dtype == dtype
    # bf16 keeps ~3 significant digits; the normalisation itself runs in float32.
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)


def test_kv_cache_capacity_cannot_exceed_max_seq_len(tiny_model):
    limit = tiny_model.config.max_seq_len
    assert tiny_model.new_kv_cache(1, capacity=limit).capacity == limit
    for bad in (limit + 1, -1):
        with pytest.raises(ValueError, match="max_seq_len"):
            tiny_model.new_kv_cache(1, capacity=bad)
