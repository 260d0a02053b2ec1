"""The fused single-token decode step (rxt.engine.fused_step) is an optimisation only: it must
compute what the module path (``model.decode`` / ``model.decoder``) computes.

Checked at three levels: ``FusedDecodeStep`` against ``model.decode`` with a ``KVCache`` (logits,
uniform and ragged rows, float32 and bfloat16); ``RowPool(fused=True)`` against
``RowPool(fused=False)`` (tokens and logits, rows joining and leaving); and ``Engine`` with and
without ``fused_decode`` (answers and memories of concurrent conversations). ``refresh()`` must
pick up weights changed after the fused copies were made.

Configurations: the dense ``tiny`` preset (GQA), conftest's MoE + SQA model, and a decoder whose
cross-attention has other head counts (so another head width and RoPE table) than its
self-attention.
"""

from __future__ import annotations

import copy
import faulthandler
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data.synthetic import synthetic_corpus
from rxt.engine import Engine
from rxt.engine.fused_step import FusedDecodeStep
from rxt.engine.rows import RowPool
from rxt.engine.sampling import SamplingParams
from rxt.model.cache import KVCache
from rxt.tokenizer import RxTTokenizer

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

TIMEOUT = 10.0  # seconds, for every blocking call
WATCHDOG = 60.0  # a test still running after this is hung: dump stacks and abort
ATOL = 1e-5  # float32: fused and module path differ only in summation order
STEPS = 10
EOS = 2  # [EOS] in rxt's special tokens (only used for min_new_tokens, which is 0 here)

# Cross-attention with 8 heads (head width 8, 4 query heads = SQA, 1 kv head = MQA) under a
# self-attention of 4 heads (head width 16): the fused step needs a second RoPE table.
CROSS_HEADS = {"cross_attention": {"num_heads": 8, "num_query_heads": 4, "num_kv_heads": 1}}


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _build(config: RxTConfig, seed: int = 0) -> ReactiveTransformer:
    torch.manual_seed(seed)
    return ReactiveTransformer(config).eval()


@pytest.fixture(params=["tiny", "moe_sqa", "cross_heads"])
def model(request: pytest.FixtureRequest) -> ReactiveTransformer:
    if request.param == "tiny":
        config = RxTConfig.preset("tiny")
    elif request.param == "moe_sqa":
        config = request.getfixturevalue("moe_sqa_config")
    else:
        config = RxTConfig.preset("tiny", decoder=CROSS_HEADS)
    return _build(config)


@pytest.fixture(params=["tiny", "cross_heads"])
def dense_model(request: pytest.FixtureRequest) -> ReactiveTransformer:
    decoder = CROSS_HEADS if request.param == "cross_heads" else {}
    return _build(RxTConfig.preset("tiny", decoder=decoder))


def test_cross_heads_config_really_differs() -> None:
    layer = _build(RxTConfig.preset("tiny", decoder=CROSS_HEADS)).decoder.layers[0]
    assert layer.cross_attn.head_dim != layer.self_attn.head_dim
    assert layer.cross_attn.num_kv_heads != layer.self_attn.num_kv_heads


# --------------------------------------------------------------------------- helpers
def _prompts(model: ReactiveTransformer, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [torch.randint(8, vocab, (n,), generator=g).tolist() for n in lengths]


def _stms(model: ReactiveTransformer, count: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [model.initial_stm(1, generator=g) for _ in range(count)]


class _RaggedCache:
    """Rows at different lengths, as ``RowPool`` keeps them: row b writes its next key at column
    ``lengths[b]``; the caller masks columns past each row's length."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths) -> None:
        self.keys, self.values = keys, values
        self.lengths = torch.tensor(lengths)
        self.rows = torch.arange(len(lengths))

    @property
    def span(self) -> int:
        return int(self.lengths.max()) + 1

    def mask(self) -> torch.Tensor:
        return (torch.arange(self.span) <= self.lengths[:, None])[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer][self.rows, :, self.lengths] = k[:, :, 0]
        self.values[layer][self.rows, :, self.lengths] = v[:, :, 0]
        span = self.span
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]

    def commit(self) -> None:
        self.lengths += 1


def _padded(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return ids, mask


def fused_vs_module_logits(
    model: ReactiveTransformer,
    prompts: Sequence[Sequence[int]],
    stm: torch.Tensor,
    steps: int,
    fused: FusedDecodeStep | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decode step, ``(fused logits, module logits)`` of shape (B, V).

    Module path: ``model.decode`` over a ``KVCache`` (with the full-history attention mask when
    the prompts differ in length). Fused path: ``FusedDecodeStep`` over its own cache of the same
    prefill — a plain ``KVCache`` for uniform rows, a ragged cache plus key mask otherwise. Both
    are fed the module path's greedy tokens, so one rounding flip cannot desynchronise them."""
    fused = fused or FusedDecodeStep(model)
    b = len(prompts)
    uniform = len({len(p) for p in prompts}) == 1
    ids, mask = _padded(prompts)
    lengths = [len(p) for p in prompts]
    out = []
    with torch.inference_mode():
        memory = model.memory_kv(stm)
        ref_cache = model.new_kv_cache(b)
        logits = model.decode(
            ids, memory_kv=memory, kv_cache=ref_cache, attention_mask=None if uniform else mask
        )
        # The fast side's cache starts from zeros, as the pool's does: a short row's masked
        # columns still enter the value sum (weight 0), and uninitialised memory may hold NaN.
        empty = model.new_kv_cache(b)
        fast_cache: Any = KVCache(
            [torch.zeros_like(k) for k in empty.keys], [torch.zeros_like(v) for v in empty.values]
        )
        model.decode(
            ids, memory_kv=memory, kv_cache=fast_cache, attention_mask=None if uniform else mask
        )
        if not uniform:
            fast_cache = _RaggedCache(fast_cache.keys, fast_cache.values, lengths)
        last = logits[torch.arange(b), torch.tensor(lengths) - 1]
        for _ in range(steps):
            token = last.argmax(-1)
            if uniform:
                positions = torch.full((b,), fast_cache.length)
                fast = fused(token, positions, fast_cache, None, memory)
                ref_mask = None
            else:
                positions = fast_cache.lengths.clone()
                fast = fused(token, positions, fast_cache, fast_cache.mask(), memory)
                mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
                ref_mask = mask
            last = model.decode(
                token[:, None], memory_kv=memory, kv_cache=ref_cache, attention_mask=ref_mask
            )[:, -1]
            out.append((fast, last))
    return out


def _max_diff(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in pairs)


# --------------------------------------------------------------------------- FusedDecodeStep
@pytest.mark.parametrize("lengths", [(7, 7, 7), (3, 11, 6, 9)], ids=["uniform", "ragged"])
def test_fused_step_logits_equal_model_decode(model: ReactiveTransformer, lengths) -> None:
    prompts = _prompts(model, lengths)
    stm = torch.cat(_stms(model, len(prompts)))
    pairs = fused_vs_module_logits(model, prompts, stm, STEPS)
    assert len(pairs) == STEPS
    for step, (fast, ref) in enumerate(pairs):
        assert fast.shape == ref.shape == (len(prompts), model.config.vocab_size)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("lengths", [(7, 7), (4, 10)], ids=["uniform", "ragged"])
def test_fused_step_in_bfloat16_matches_module_path_loosely(dense_model, lengths) -> None:
    """A bf16 copy of the model: fused ≈ module path, to 5% of the logits' scale.

    bf16 keeps ~3 significant digits and the paths may round at different points (one q/k/v
    matmul vs three, one gate/up matmul vs two; for ragged rows the reference also holds its
    keys in other cache columns, so SDPA sums in another order). 5% of the scale is the
    tolerance tests/test_precision.py uses for bf16 cached vs full decoding. Measured (torch
    2.x, CPU): bit-identical for uniform rows, <= 0.7% of the scale for ragged rows. Dense
    models only: in an MoE one rounding difference can flip a near-tied routing choice and
    change a token's logits by O(1) (test_precision covers that case)."""
    model = copy.deepcopy(dense_model).to(torch.bfloat16)
    prompts = _prompts(model, lengths)
    stm = torch.cat(_stms(model, len(prompts)))
    pairs = fused_vs_module_logits(model, prompts, stm, STEPS)
    for fast, ref in pairs:
        assert fast.dtype == ref.dtype == torch.bfloat16
        assert torch.isfinite(fast).all()
    scale = max(max(ref.float().abs().max().item() for _, ref in pairs), 1.0)
    assert _max_diff(pairs) < 0.05 * scale


# --------------------------------------------------------------------------- refresh()
def _scale_weights(model: ReactiveTransformer) -> None:
    with torch.no_grad():  # in place: the parameters' version counters move
        model.decoder.layers[0].self_attn.k_proj.weight.mul_(2)
        model.decoder.layers[-1].self_attn.v_proj.weight.mul_(-1.5)
        ffn = model.decoder.layers[-1].ffn
        if hasattr(ffn, "gate_proj"):
            ffn.gate_proj.weight.mul_(3)
            ffn.up_proj.weight.add_(0.1)


def test_refresh_is_a_no_op_while_no_parameter_changed(model: ReactiveTransformer) -> None:
    fused = FusedDecodeStep(model)
    layers = fused.layers
    fused.refresh()
    assert fused.layers is layers
    _scale_weights(model)
    fused.refresh()
    assert fused.layers is not layers


def test_without_refresh_the_fused_weights_are_stale(model: ReactiveTransformer) -> None:
    prompts = _prompts(model, (5, 5))
    stm = torch.cat(_stms(model, 2))
    fused = FusedDecodeStep(model)
    torch.testing.assert_close(*fused_vs_module_logits(model, prompts, stm, 2, fused)[-1])
    _scale_weights(model)
    # Not refreshed: the fused step still computes with the old q/k/v (and gate/up) copies.
    stale = fused_vs_module_logits(model, prompts, stm, 3, fused)
    assert _max_diff(stale) > 1e-2
    fused.refresh()
    fresh = fused_vs_module_logits(model, prompts, stm, 3, fused)
    assert _max_diff(fresh) < ATOL


def _assign_data(model: ReactiveTransformer) -> None:
    weight = model.decoder.layers[0].self_attn.k_proj.weight
    weight.data = weight.data * 2  # a new tensor: the Parameter's version counter stays


def _cast_bf16(model: ReactiveTransformer) -> None:
    model.to(torch.bfloat16)  # nn.Module._apply also swaps each parameter's .data


@pytest.mark.parametrize("change", [_assign_data, _cast_bf16], ids=["data", "to-bf16"])
def test_refresh_sees_parameters_whose_data_was_replaced(change: Callable) -> None:
    model = _build(RxTConfig.preset("tiny"))
    fused = FusedDecodeStep(model)
    change(model)
    fused.refresh()
    prompts = _prompts(model, (5, 5))
    stm = torch.cat(_stms(model, 2))
    pairs = fused_vs_module_logits(model, prompts, stm, 2, fused)
    tolerance = ATOL if model.dtype == torch.float32 else 0.05 * pairs[0][1].abs().max().item()
    assert _max_diff(pairs) < tolerance


# --------------------------------------------------------------------------- RowPool
GREEDY = SamplingParams(max_new_tokens=64)


class _Run:
    """A ``RowPool`` whose sampled logits are recorded (the pool itself returns only tokens)."""

    def __init__(self, model: ReactiveTransformer, fused: bool) -> None:
        self.pool = RowPool(model, capacity=2, eos_id=EOS, fused=fused)
        self.logits: list[torch.Tensor] = []
        self.tokens: list[list[int]] = []
        sample = self.pool._sample

        def recording(logits: torch.Tensor, *args: Any) -> list[int]:
            self.logits.append(logits.clone())
            return sample(logits, *args)

        self.pool._sample = recording  # type: ignore[method-assign]

    def join(self, prompts, stms) -> None:
        n = self.pool.n + len(prompts)
        with torch.inference_mode():
            self.tokens.append(
                self.pool.join(
                    prompts,
                    stms,
                    [GREEDY] * len(prompts),
                    [None] * len(prompts),
                    [GREEDY] * n,
                )
            )

    def step(self, count: int) -> None:
        with torch.inference_mode():
            for _ in range(count):
                self.tokens.append(self.pool.step([None] * self.pool.n))

    def remove(self, index: int) -> None:
        with torch.inference_mode():  # the pool's buffers are inference tensors
            self.pool.remove(index, [GREEDY] * (self.pool.n - 1))


def _assert_runs_equal(fast: _Run, slow: _Run) -> None:
    assert fast.tokens == slow.tokens
    assert len(fast.logits) == len(slow.logits)
    for i, (a, b) in enumerate(zip(fast.logits, slow.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"call {i}")


@pytest.mark.parametrize("lengths", [(9, 9, 9), (4, 13, 8)], ids=["uniform", "ragged"])
def test_row_pool_fused_equals_module_path(model: ReactiveTransformer, lengths) -> None:
    prompts = _prompts(model, lengths)
    stms = _stms(model, len(prompts))
    late_prompt, late_stm = _prompts(model, (6,), seed=5), _stms(model, 1, seed=6)
    runs = [_Run(model, fused=True), _Run(model, fused=False)]
    for run in runs:
        run.join(prompts, stms)  # capacity 2 < 3 rows: the pool grows
        run.step(STEPS // 2)
        run.join(late_prompt, late_stm)  # a row joins mid-answer: lengths now differ
        run.step(2)
        run.remove(0)  # the last row moves into row 0
        run.step(STEPS // 2)
    fast, slow = runs
    assert fast.pool.fused is not None and slow.pool.fused is None
    assert len(fast.tokens) == 2 + STEPS + 2
    _assert_runs_equal(fast, slow)


def test_row_pool_join_refreshes_changed_weights(model: ReactiveTransformer) -> None:
    prompts, stms = _prompts(model, (6, 10)), _stms(model, 2)
    fast, slow = _Run(model, fused=True), _Run(model, fused=False)
    for run in (fast, slow):
        run.join(prompts, stms)
        run.step(3)
    before = copy.deepcopy(fast.pool.fused.layers[0].w_qkv)
    _scale_weights(model)
    for run in (fast, slow):
        run.join(_prompts(model, (7,), seed=3), _stms(model, 1, seed=4))  # join refreshes
        run.step(STEPS)
    assert not torch.equal(fast.pool.fused.layers[0].w_qkv, before)
    _assert_runs_equal(fast, slow)


# --------------------------------------------------------------------------- Engine
@pytest.fixture(scope="module")
def tok() -> RxTTokenizer:
    return RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024)


QUERIES = [
    ["Hello", "What colour is the car? It is red.", "Where?"],
    ["My name is Tom and I live in Rome.", "Hi", "Tell me about the house, please."],
    ["Why", "Where does Eve live?", "The bike is blue, and the car is red."],
    ["Tell me about the car, please.", "Ok", "And the bike?"],
]
BUDGETS = [6, 14, 9, 17]  # rows leave the batch at different steps


def _engine_turns(model: ReactiveTransformer, fused: bool) -> tuple[list, list[torch.Tensor]]:
    answers: list[list[list[int]]] = [[] for _ in QUERIES]
    with Engine(model, fused_decode=fused, max_batch_size=4) as engine:
        convs = [engine.conversation(seed=10 + i) for i in range(len(QUERIES))]
        for turn in range(3):
            streams = [
                conv.send(queries[turn], max_new_tokens=budget, stop_at_eos=False)
                for conv, queries, budget in zip(convs, QUERIES, BUDGETS, strict=True)
            ]  # all four in flight at once: one decoding batch
            for i, stream in enumerate(streams):
                stream.wait_update(timeout=TIMEOUT)
                answers[i].append(stream.result().token_ids)
        for conv in convs:
            conv.wait(timeout=TIMEOUT)
        stms = [conv.stm for conv in convs]
    return answers, stms


@pytest.mark.parametrize("preset", ["tiny", "moe_sqa"])
def test_engine_answers_equal_with_and_without_fused_decode(
    tok: RxTTokenizer, preset: str, request: pytest.FixtureRequest
) -> None:
    if preset == "tiny":
        config = RxTConfig.preset("tiny")
    else:  # a byte-level BPE tokenizer needs more than the fixture's 256 ids
        config = request.getfixturevalue("moe_sqa_config").replace(vocab_size=1024)
    model = _build(config)
    model.tokenizer = tok
    fast, fast_stms = _engine_turns(model, fused=True)
    slow, slow_stms = _engine_turns(model, fused=False)
    assert [[len(a) for a in conv] for conv in fast] == [[b] * 3 for b in BUDGETS]
    assert fast == slow
    for a, b in zip(fast_stms, slow_stms, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
