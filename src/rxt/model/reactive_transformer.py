"""The Reactive Transformer: a stateless model object over an explicit memory value.

Glossary (paper symbol → name here; shapes with batch B):

=================  ============================================  ===========================
paper              here                                          shape
=================  ============================================  ===========================
X_t, Y_t           query / answer token ids of turn t            (B, T)
concat(X_t, Y_t)   ``interaction_ids``                           (B, T)
STM_{t-1}, STM_t   ``stm`` in / ``stm_next`` out                 (B, L, S, d)
STM_0              ``initial_stm(batch_size)``                   (B, L, S, d)
ED_t               ``encode(interaction_ids)``                   (B, L, T, d)
G                  ``rxt.model.memory.gate.ResidualGate``              per feature or per slot
Update             output of ``MemoryAttentionLayer.write``      (B, S, d)
H, H_q, H_kv       ``AttentionConfig`` head counts               —
L, S, d            ``num_layers``, ``memory.num_slots``, ``d_model``  —
=================  ============================================  ===========================

The model holds parameters only. A conversation's whole state between turns is its STM tensor,
passed into and returned from pure methods (paper §4), so one model object serves any number of
conversations, batches them, and may be called from several threads.

Typical turn (see ``docs/architecture.md``)::

    stm = model.initial_stm(batch_size=1)
    logits = model.decode(query_and_answer_ids, stm)          # teacher-forced / prefill
    stm = model.update_memory(stm, query_and_answer_ids)      # after the answer, off the hot path
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rxt.config import RxTConfig
from rxt.model.cache import KVCache, MemoryKV
from rxt.model.decoder import DecodeContext, GeneratorDecoder
from rxt.model.encoder import MemoryEncoder, MLMHead
from rxt.model.memory.memory_attention import MemoryAttention
from rxt.model.memory.stm import StmInitializer
from rxt.nn import MoEFeedForward, padding_mask

if TYPE_CHECKING:
    from rxt.tokenizer import RxTTokenizer


@dataclass
class DecoderOutput:
    """``logits: (B, T, V)`` (or (B, 1, V) with ``last_only``); ``hidden_states: (B, T, d)``;
    ``aux_loss``: MoE load-balancing loss already scaled by ``moe.aux_loss_weight`` (add it to
    the LM loss), or None for a dense decoder."""

    logits: torch.Tensor
    hidden_states: torch.Tensor
    aux_loss: torch.Tensor | None


class ReactiveTransformer(nn.Module):
    def __init__(self, config: RxTConfig) -> None:
        super().__init__()
        if not isinstance(config, RxTConfig):
            raise TypeError(f"config must be an RxTConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)  # shared by decoder and encoder
        self.decoder = GeneratorDecoder(config)
        self.encoder = MemoryEncoder(config)
        self.memory_attention = MemoryAttention(config)
        self.stm_init = StmInitializer(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.mlm_head = MLMHead(config) if config.mlm_head else None
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.tokenizer: RxTTokenizer | None = None  # optional; saved with save_pretrained

    def _init_weights(self) -> None:
        # One scale for every matrix, tied to d (see RxTConfig.init_std). Gates, norms and the
        # learned STM keep the initialisation their modules chose.
        std = self.config.resolved_init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoEFeedForward):
                for w in (module.w_gate, module.w_up, module.w_down):
                    nn.init.normal_(w, std=std)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute layer activations in backward instead of storing them (training only)."""
        for part in (self.decoder, self.encoder, self.memory_attention):
            part.gradient_checkpointing = enabled

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_enable(False)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ------------------------------------------------------------------ memory
    def initial_stm(
        self, batch_size: int = 1, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A fresh STM_0 ``(B, L, S, d)`` on the model's device and dtype."""
        return self.stm_init(batch_size, device=self.device, dtype=self.dtype, generator=generator)

    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> MemoryKV:
        """Project memory to every decoder layer's cross-attention keys/values — once per turn.

        ``memory`` is STM ``(B, L, S, d)``; in stages 1–2 it may instead be encoder states
        ``(B, L, T, d)`` with ``memory_mask: (B, T)``."""
        self._check_memory(memory, "memory")
        expected = (memory.shape[0], memory.shape[2])
        if memory_mask is not None and tuple(memory_mask.shape) != expected:
            raise ValueError(
                f"memory_mask must have shape (B, S) = {expected}, got {tuple(memory_mask.shape)}"
            )
        return self.decoder.memory_kv(memory.to(self.dtype), memory_mask)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ED = per-layer encoder states ``(B, L, T, d)`` of right-padded ``input_ids (B, T)``."""
        self._check_ids(input_ids, attention_mask, past=0, name="input_ids")
        if attention_mask is not None and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            # Encoder positions are 0..T-1: left padding would shift every real token's position.
            raise ValueError("attention_mask for the encoder must be right-padded (1s, then 0s)")
        return self.encoder(self.embed(input_ids), attention_mask)

    def update_memory(
        self,
        stm: torch.Tensor,
        interaction_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """STM_t = MemAttn(STM_{t-1}, Encoder(concat(X_t, Y_t))) — pure: ``stm`` is not modified.

        ``interaction_ids: (B, T)`` right-padded, ``attention_mask: (B, T)`` (1 = real token).
        """
        self._check_memory(stm, "stm")
        if stm.shape[2] != self.config.memory.num_slots:
            raise ValueError(
                f"stm has {stm.shape[2]} slots, config.memory.num_slots is "
                f"{self.config.memory.num_slots}"
            )
        if interaction_ids.dim() == 2 and interaction_ids.shape[0] != stm.shape[0]:
            raise ValueError(
                f"batch size mismatch: stm has {stm.shape[0]} rows, "
                f"interaction_ids has {interaction_ids.shape[0]}"
            )
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > 0:
            empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"interaction rows {empty} have no tokens (all padding)")
        encoded = self.encode(interaction_ids, attention_mask)
        return self.memory_attention(stm.to(self.dtype), encoded, attention_mask)

    def mlm_logits(self, encoded: torch.Tensor) -> torch.Tensor:
        """Stage 1–2 MLM logits ``(B, T, V)`` from ED ``(B, L, T, d)`` (last encoder layer)."""
        if self.mlm_head is None:
            raise RuntimeError("this model was built with mlm_head=False")
        return self.mlm_head(encoded[:, -1])

    # ------------------------------------------------------------------ decoding
    def new_kv_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty self-attention cache for one turn (default capacity: ``max_seq_len``)."""
        limit = self.config.max_seq_len
        capacity = capacity or limit
        if not 1 <= capacity <= limit:
            # Positions past max_seq_len have no RoPE entry; refuse here, not mid-generation.
            raise ValueError(
                f"KV cache capacity must be in [1, max_seq_len={limit}], got {capacity}"
            )
        heads = self.config.decoder.self_attention
        return KVCache.empty(
            self.config.num_layers,
            batch_size,
            heads.kv_heads,
            self.config.d_model // heads.num_heads,
            capacity,
            device=self.device,
            dtype=self.dtype,
        )

    def decode(
        self,
        input_ids: torch.Tensor,
        stm: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of ``input_ids (B, T)`` given memory ``stm``.

        Keyword arguments are those of :meth:`decoder_forward`.
        """
        return self.decoder_forward(input_ids, stm, **kwargs).logits

    def decoder_forward(
        self,
        input_ids: torch.Tensor,
        stm: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        memory_kv: MemoryKV | None = None,
        memory_mask: torch.Tensor | None = None,
        last_only: bool = False,
        check_inputs: bool = True,
    ) -> DecoderOutput:
        """Causal decoder pass reading memory through cross-attention.

        - ``stm``: memory ``(B, L, S, d)``; or pass ``memory_kv`` (from :meth:`memory_kv`) to
          reuse memory keys/values projected once per turn. One of the two is required.
        - ``attention_mask``: ``(B, past + T)``, 1 = real token; allows left padding, as in a
          batch of conversations whose queries differ in length. Positions follow the mask.
        - ``kv_cache``: this turn's self-attention cache (from :meth:`new_kv_cache`); the new
          tokens are appended to it.
        - ``last_only``: compute logits for the last position only (generation).
        - ``check_inputs``: validate ids and shapes (a host sync on GPU; generation loops that
          feed back sampled ids turn it off after the prefill).
        """
        past = kv_cache.length if kv_cache is not None else 0
        if check_inputs:
            self._check_ids(input_ids, attention_mask, past=past, name="input_ids")
            if kv_cache is not None and kv_cache.batch_size != input_ids.shape[0]:
                raise ValueError(
                    f"kv_cache batch size {kv_cache.batch_size} != input batch {input_ids.shape[0]}"
                )
        if memory_kv is None:
            if stm is None:
                raise ValueError("decode needs memory: pass `stm` or precomputed `memory_kv`")
            memory_kv = self.memory_kv(stm, memory_mask)
        if check_inputs and memory_kv.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"memory batch size {memory_kv.batch_size} != input batch {input_ids.shape[0]}"
            )

        b, t = input_ids.shape
        device = input_ids.device
        token_mask = None
        if attention_mask is None:
            positions = torch.arange(past, past + t, device=device)
            self_mask = None
            is_causal = past == 0 and t > 1
            if past > 0 and t > 1:  # a chunk after cached tokens: causal with an offset
                full = torch.ones(b, past + t, dtype=torch.bool, device=device)
                self_mask = padding_mask(full, t, causal=True, offset=past)
        else:
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]
            self_mask = padding_mask(attention_mask, t, causal=True, offset=past)
            is_causal = False
            token_mask = attention_mask[:, past:]

        ctx = DecodeContext(
            positions=positions,
            self_mask=self_mask,
            is_causal=is_causal,
            memory=memory_kv,
            cache=kv_cache,
            token_mask=token_mask,
        )
        hidden, aux = self.decoder(self.embed(input_ids), ctx)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        if aux is not None:
            aux = aux * self.config.decoder.moe.aux_loss_weight
        return DecoderOutput(logits=logits, hidden_states=hidden, aux_loss=aux)

    def forward(
        self, input_ids: torch.Tensor, stm: torch.Tensor | None = None, **kwargs: Any
    ) -> DecoderOutput:
        """Same as :meth:`decoder_forward` (so DDP/FSDP wrappers see a forward)."""
        return self.decoder_forward(input_ids, stm, **kwargs)

    # ------------------------------------------------------------------ checks
    def _check_ids(
        self, ids: torch.Tensor, mask: torch.Tensor | None, *, past: int, name: str
    ) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be a (batch, seq) tensor, got {shape}")
        if ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        b, t = ids.shape
        if t == 0:
            raise ValueError(f"{name} is empty (0 tokens)")
        limit = self.config.max_seq_len
        if past + t > limit:
            raise ValueError(
                f"{name}: {past + t} tokens ({past} cached + {t} new) exceed max_seq_len={limit}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name}: token id {bad} out of range for vocab_size={self.config.vocab_size}"
            )
        if mask is not None and tuple(mask.shape) != (b, past + t):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new) = {(b, past + t)}, "
                f"got {tuple(mask.shape)}"
            )

    def _check_memory(self, memory: torch.Tensor, name: str) -> None:
        cfg = self.config
        if not isinstance(memory, torch.Tensor) or memory.dim() != 4:
            shape = (
                tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            )
            raise ValueError(f"{name} must be a (B, L, S, d) tensor, got {shape}")
        if memory.shape[1] != cfg.num_layers or memory.shape[3] != cfg.d_model:
            raise ValueError(
                f"{name} has shape {tuple(memory.shape)}; this model expects "
                f"(B, {cfg.num_layers}, S, {cfg.d_model})"
            )

    # ------------------------------------------------------------------ sizes
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``inference`` (no MLM head), ``active_per_token``
        (inference minus the experts a token does not use), and per component."""

        def count(module: nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        total = sum(p.numel() for p in self.parameters())  # tied weights counted once
        mlm = count(self.mlm_head)
        inactive = sum(
            (m.num_experts - m.top_k) * m.expert_parameters()
            for m in self.modules()
            if isinstance(m, MoEFeedForward)
        )
        return {
            "total": total,
            "inference": total - mlm,
            "active_per_token": total - mlm - inactive,
            "embedding": count(self.embed),
            "decoder": count(self.decoder),
            "encoder": count(self.encoder),
            "memory_attention": count(self.memory_attention),
            "lm_head": 0 if self.config.tie_embeddings else count(self.lm_head),
            "mlm_head": mlm,
            "stm_init": count(self.stm_init),
        }

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors`` (+ ``tokenizer.json``) to ``directory``."""
        from rxt.model.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> ReactiveTransformer:
        """Load from a local directory (offline) or a Hugging Face Hub repo id."""
        from rxt.model.checkpoint import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload to the Hugging Face Hub (needs network and a token). Returns the commit URL."""
        from rxt.model.checkpoint import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
