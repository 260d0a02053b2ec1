"""The decoding batch: one row per turn being answered, packed densely (paper §4, steps 1–2).

Continuous batching of conversations needs rows that start and stop at different times and sit at
different positions. ``RowPool`` keeps, for up to ``capacity`` rows, each row's memory
cross-attention keys/values (projected once, when its turn joins) and its self-attention cache of
*this turn only*. Active rows always occupy ``[0, n)``: a joining turn is written at ``n``; a
finished row is replaced by the last one (one small copy), so every decoder call runs on plain
slices of preallocated buffers — no per-step concatenation, no reallocation.

Rows differ only in how many tokens they have cached; a boolean key mask hides the unused tail
of shorter rows. When every row has the same length (always so for a single conversation) the
mask is skipped and the cache writes are plain slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rxt.engine.fused_step import FusedDecodeStep
from rxt.engine.sampling import RowSampling, SamplingParams, mark_seen, next_tokens
from rxt.model.cache import KVCache, MemoryKV
from rxt.model.decoder import DecodeContext
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import pad_sequences


class _RaggedCache:
    """KV-cache view of the pool's first ``n`` rows for one decode step (one new token per row).

    It implements the two calls the decoder makes on a cache, ``append`` and ``commit``."""

    def __init__(self, pool: RowPool, n: int, uniform: int | None, span: int) -> None:
        self.pool, self.n, self.uniform, self.span = pool, n, uniform, span
        self.rows = torch.arange(n, device=pool.device) if uniform is None else None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.pool.self_k[layer], self.pool.self_v[layer]
        if self.uniform is not None:  # every row writes the same position: a slice
            keys[: self.n, :, self.uniform] = k[:, :, 0]
            values[: self.n, :, self.uniform] = v[:, :, 0]
        else:
            pos = self.pool.lengths[: self.n]
            keys[self.rows, :, pos] = k[:, :, 0]
            values[self.rows, :, pos] = v[:, :, 0]
        return keys[: self.n, :, : self.span], values[: self.n, :, : self.span]

    def commit(self) -> None:
        self.pool.lengths[: self.n] += 1


class RowPool:
    """Preallocated per-row decoding state on the model's device (``capacity`` rows)."""

    def __init__(
        self, model: ReactiveTransformer, capacity: int, eos_id: int, *, fused: bool = True
    ) -> None:
        self.model = model
        self.eos_id = eos_id
        # The fused single-token step (same math, fewer dispatches); False = module path.
        self.fused = FusedDecodeStep(model) if fused else None
        self.device = model.device
        self.n = 0
        self.capacity = 0
        self.host_lengths: list[int] = []  # mirrors ``lengths`` so no step needs a host sync
        cfg = model.config
        self.max_tokens = cfg.max_seq_len
        self._allocate(capacity)
        self.sampling: RowSampling | None = None  # rebuilt whenever the rows change

    # ------------------------------------------------------------------ storage
    def _allocate(self, capacity: int) -> None:
        cfg, model = self.model.config, self.model
        self_heads = cfg.decoder.self_attention
        cross_heads = cfg.decoder.cross_attention
        hd_self = cfg.d_model // self_heads.num_heads
        hd_cross = cfg.d_model // cross_heads.num_heads
        S, L, V = cfg.memory.num_slots, cfg.num_layers, cfg.vocab_size
        kw = {"device": self.device, "dtype": model.dtype}

        def grow(old: list[torch.Tensor] | None, shape: tuple[int, ...]) -> list[torch.Tensor]:
            # Zeros, not empty: shorter rows' unused cache tail is masked out of the softmax but
            # still multiplied by 0 in the value sum, and garbage NaN/inf there would give NaN.
            new = [torch.zeros((capacity, *shape), **kw) for _ in range(L)]
            if old is not None:
                for a, b in zip(new, old, strict=True):
                    a[: self.n] = b[: self.n]
            return new

        old = self.capacity > 0
        self.self_k = grow(
            self.self_k if old else None, (self_heads.kv_heads, self.max_tokens, hd_self)
        )
        self.self_v = grow(
            self.self_v if old else None, (self_heads.kv_heads, self.max_tokens, hd_self)
        )
        self.mem_k = grow(self.mem_k if old else None, (cross_heads.kv_heads, S, hd_cross))
        self.mem_v = grow(self.mem_v if old else None, (cross_heads.kv_heads, S, hd_cross))
        long = {"device": self.device, "dtype": torch.long}
        lengths = torch.zeros(capacity, **long)
        generated = torch.zeros(capacity, **long)
        last = torch.zeros(capacity, **long)
        seen = torch.zeros(capacity, V, device=self.device, dtype=torch.bool)
        if old:
            lengths[: self.n] = self.lengths[: self.n]
            generated[: self.n] = self.generated[: self.n]
            last[: self.n] = self.last_token[: self.n]
            seen[: self.n] = self.seen[: self.n]
        self.lengths, self.generated, self.last_token, self.seen = lengths, generated, last, seen
        self.capacity = capacity

    def reserve(self, extra: int) -> None:
        if self.n + extra > self.capacity:
            self._allocate(max(self.n + extra, 2 * self.capacity))

    # ------------------------------------------------------------------ rows
    def join(
        self,
        prompts: Sequence[Sequence[int]],
        stms: Sequence[torch.Tensor],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        all_params: Sequence[SamplingParams],
    ) -> list[int]:
        """Prefill new turns into rows ``[n, n + k)``; return each one's first answer token.

        ``prompts``: formatted query ids per turn; ``stms``: each conversation's STM (1, L, S, d).
        ``all_params`` describes every row after the join (old rows first)."""
        k = len(prompts)
        self.reserve(k)
        if self.fused is not None:
            self.fused.refresh()
        lo, hi = self.n, self.n + k
        model = self.model
        memory = model.memory_kv(torch.cat([s.to(self.device) for s in stms]))
        for layer in range(model.config.num_layers):
            self.mem_k[layer][lo:hi] = memory.keys[layer]
            self.mem_v[layer][lo:hi] = memory.values[layer]
        memory = MemoryKV([m[lo:hi] for m in self.mem_k], [m[lo:hi] for m in self.mem_v])

        lengths = [len(p) for p in prompts]
        ids, mask = pad_sequences(prompts)  # right padding: real tokens sit at 0..len-1
        ids = ids.to(self.device)
        mask = mask.to(self.device) if min(lengths) != max(lengths) else None
        cache = KVCache([c[lo:hi] for c in self.self_k], [c[lo:hi] for c in self.self_v])
        out = model.decoder_forward(
            ids, attention_mask=mask, kv_cache=cache, memory_kv=memory, last_only=True
        )
        if mask is None:
            logits = out.logits[:, -1]
        else:  # each row's last real token, not the padded end
            last = torch.tensor(lengths, device=self.device) - 1
            logits = model.lm_head(out.hidden_states[torch.arange(k, device=self.device), last])

        self.lengths[lo:hi] = torch.tensor(lengths, device=self.device)
        self.generated[lo:hi] = 0
        self.seen[lo:hi] = False
        if any(p.repetition_penalty != 1.0 for p in params):
            mark_seen(self.seen[lo:hi], ids)  # padding id 0 is [PAD]: never generated, harmless
        self.host_lengths.extend(lengths)
        self.n = hi
        self.sampling = RowSampling.from_params(all_params, self.device)
        # The first token is sampled with only the new rows' settings.
        rows = RowSampling.from_params(params, self.device)
        return self._sample(logits, rows, slice(lo, hi), generators)

    def step(self, generators: Sequence[torch.Generator | None]) -> list[int]:
        """One decode step for every active row: feed each row's last token, return the next."""
        n, model = self.n, self.model
        lo_len, hi_len = min(self.host_lengths), max(self.host_lengths)
        uniform = lo_len if lo_len == hi_len else None
        span = hi_len + 1
        cache = _RaggedCache(self, n, uniform, span)
        if uniform is None:
            key_valid = torch.arange(span, device=self.device) <= self.lengths[:n, None]
            self_mask = key_valid[:, None, None, :]
        else:
            self_mask = None  # all rows see exactly the keys [0, span)
        memory = MemoryKV([m[:n] for m in self.mem_k], [m[:n] for m in self.mem_v])
        if self.fused is not None:
            positions = self.lengths[:n]
            logits = self.fused(self.last_token[:n], positions, cache, self_mask, memory)
        else:
            ctx = DecodeContext(
                positions=self.lengths[:n, None],
                self_mask=self_mask,
                is_causal=False,
                memory=memory,
                cache=cache,
                token_mask=None,
            )
            hidden, _ = model.decoder(model.embed(self.last_token[:n, None]), ctx)
            logits = model.lm_head(hidden[:, -1])
        self.host_lengths = [t + 1 for t in self.host_lengths]
        return self._sample(logits, self.sampling, slice(0, n), generators)

    def _sample(self, logits, rows: RowSampling, where: slice, generators) -> list[int]:
        seen = self.seen[where] if rows.any_penalty else None
        tokens = next_tokens(
            logits,
            rows,
            generated=self.generated[where],
            seen=seen,
            generators=generators,
            eos_id=self.eos_id,
        )
        self.last_token[where] = tokens
        self.generated[where] += 1
        if seen is not None:
            mark_seen(seen, tokens)
        return tokens.tolist()  # the one host transfer per step: tokens stream to callers

    def remove(self, index: int, all_params: Sequence[SamplingParams]) -> None:
        """Drop row ``index``; the last row moves into its place (callers mirror the move)."""
        last = self.n - 1
        if index != last:
            length = self.host_lengths[last]
            for buf in self.self_k + self.self_v:
                buf[index, :, :length] = buf[last, :, :length]
            for buf in self.mem_k + self.mem_v:
                buf[index] = buf[last]
            for buf in (self.lengths, self.generated, self.last_token, self.seen):
                buf[index] = buf[last]
            self.host_lengths[index] = length
        self.host_lengths.pop()
        self.n = last
        self.sampling = RowSampling.from_params(all_params, self.device) if last else None
