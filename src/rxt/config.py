"""Typed, validated configuration for the Reactive Transformer.

A configuration is a tree of frozen dataclasses. Every field is checked when the object is
built, so a bad value fails at construction with a message that names the field
(``decoder.num_query_heads``), never later inside a matrix multiply (types from the hints by
the common base :class:`rxt.validated.Validated`, ranges by each class's ``validate``).
Configurations round-trip through ``config.json``.

Head counts decide the attention type (paper §3, "Attention heads"):

============  =====================================  ==========================
type          query heads ``H_q``                    key/value heads ``H_kv``
============  =====================================  ==========================
MHA           ``H``                                  ``H``
GQA           ``H``                                  ``1 < H_kv < H``
MQA           ``H``                                  ``1``
SQA           ``H_q < H`` (score FLOPs cut ``H/H_q``)  ``H_kv <= H_q``
============  =====================================  ==========================

The head width is always ``d_model / H``; SQA keeps it and uses fewer query heads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

# ConfigError is imported from here (and from rxt) by users: re-exported from its module.
from rxt.validated import ConfigError as ConfigError
from rxt.validated import Validated
from rxt.validated import fail as _fail
from rxt.validated import positive as _positive

MemoryAttentionVariant = Literal["simple", "self", "interlayer", "gated-self-interlayer"]
GateType = Literal["dynamic", "static", "none"]
GateGranularity = Literal["feature", "slot"]
GateProjection = Literal["elementwise", "linear"]
GateReference = Literal["previous", "pre_step"]
StmInit = Literal["random", "learned"]

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class AttentionConfig(Validated):
    """Head counts of one attention block. ``num_heads`` (H) fixes the head width ``d/H``."""

    num_heads: int = 4
    num_query_heads: int | None = None  # H_q; None = H (no SQA)
    num_kv_heads: int | None = None  # H_kv; None = H_q (no GQA)

    @property
    def query_heads(self) -> int:
        return self.num_query_heads if self.num_query_heads is not None else self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.query_heads

    def check(self, path: str, d_model: int) -> None:
        _positive(f"{path}num_heads", self.num_heads)
        if d_model % self.num_heads:
            raise _fail(f"{path}num_heads", f"must divide d_model={d_model}, got {self.num_heads}")
        if not 1 <= self.query_heads <= self.num_heads:
            raise _fail(
                f"{path}num_query_heads",
                f"must be in [1, num_heads={self.num_heads}], got {self.query_heads}",
            )
        if not 1 <= self.kv_heads <= self.query_heads:
            raise _fail(
                f"{path}num_kv_heads",
                f"must be in [1, num_query_heads={self.query_heads}], got {self.kv_heads}",
            )
        if self.query_heads % self.kv_heads:
            raise _fail(
                f"{path}num_kv_heads",
                f"must divide num_query_heads={self.query_heads}, got {self.kv_heads}",
            )


@dataclass(frozen=True)
class MoEConfig(Validated):
    """Mixture-of-Experts feed-forward: top-k routing with a load-balancing loss."""

    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 256  # hidden width of each SwiGLU expert
    aux_loss_weight: float = 0.01  # weight of the Switch-style load-balancing loss

    def validate(self) -> None:
        _positive("num_experts", self.num_experts)
        _positive("expert_dim", self.expert_dim)
        if not 1 <= self.top_k <= self.num_experts:
            raise _fail(
                "top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.aux_loss_weight < 0:
            raise _fail("aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")


@dataclass(frozen=True)
class DecoderConfig(Validated):
    """Generator-decoder: causal self-attention → memory cross-attention → FFN (dense or MoE)."""

    self_attention: AttentionConfig = field(default_factory=AttentionConfig)
    cross_attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn_dim: int = 256  # SwiGLU hidden width when ``moe`` is None
    moe: MoEConfig | None = None


@dataclass(frozen=True)
class EncoderConfig(Validated):
    """Memory encoder: bidirectional self-attention → dense SwiGLU FFN; no memory access."""

    self_attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn_dim: int = 256


@dataclass(frozen=True)
class MemoryConfig(Validated):
    """Short-Term Memory (STM) and the memory-attention network that writes it."""

    num_slots: int = 64  # S, slots per STM layer
    variant: MemoryAttentionVariant = "interlayer"
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    gate: GateType = "dynamic"  # residual gate G; "none" = plain residual (drifts, for ablations)
    gate_granularity: GateGranularity = "feature"  # one G per feature, or one per slot
    # How a dynamic gate reads (STM + Update): a learned d→d map ("linear") beat a per-feature
    # scale and shift ("elementwise") by +0.15 to +0.21 recall on two seeds (docs/training.md).
    gate_projection: GateProjection = "linear"
    # What the write's gate mixes with the update: STM_{t-1} (the paper's equation, the pre-step
    # only shapes the write's queries) or the pre-stepped slots (rxt 0.1's form; old content then
    # passes two gates per turn). See docs/training.md for the measurement.
    gate_reference: GateReference = "previous"
    gate_init: float = 0.5  # initial value of G (sets the gate bias to logit(gate_init))
    stm_init: StmInit = "random"  # STM_0: fresh N(0, stm_init_std) per conversation, or learned
    stm_init_std: float = 0.02

    def validate(self) -> None:
        _positive("num_slots", self.num_slots)
        if not 0.0 < self.gate_init < 1.0:
            raise _fail("gate_init", f"must be in (0, 1), got {self.gate_init}")
        if self.stm_init_std < 0:
            raise _fail("stm_init_std", f"must be >= 0, got {self.stm_init_std}")


@dataclass(frozen=True)
class RxTConfig(Validated):
    """Complete Reactive Transformer configuration.

    ``num_layers`` (L) is shared: the decoder, the encoder, the memory-attention network and the
    STM all have L layers, because decoder layer l reads STM[l] and encoder layer l writes it.
    """

    vocab_size: int = 8192
    d_model: int = 128
    num_layers: int = 4
    max_seq_len: int = 256  # longest sequence one event may hold (interaction, or query+answer)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # LM head shares the token embedding
    mlm_head: bool = True  # stage-1/2 MLM head on the encoder (dropped at inference)
    # None = 0.8/sqrt(d_model). Calibration: at d=64 the GPT-2 default 0.02 left the memory
    # write no larger than the random initial STM and recall stayed at chance; ~0.8/sqrt(d) learnt.
    init_std: float | None = None
    # Training regularisation: residual and attention-weight dropout in the decoder and encoder
    # (inactive in eval mode). Memory attention has none; the memory-attention pre-training
    # stage regularises it with noise on its inputs and targets instead (paper §6, stage 3).
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "max_seq_len"):
            _positive(name, getattr(self, name))
        _positive("rope_theta", self.rope_theta)
        _positive("norm_eps", self.norm_eps)
        if self.init_std is not None:
            _positive("init_std", self.init_std)
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("dropout", f"must be in [0, 1), got {self.dropout}")
        self.decoder.self_attention.check("decoder.self_attention.", self.d_model)
        self.decoder.cross_attention.check("decoder.cross_attention.", self.d_model)
        self.encoder.self_attention.check("encoder.self_attention.", self.d_model)
        self.memory.attention.check("memory.attention.", self.d_model)
        _positive("decoder.ffn_dim", self.decoder.ffn_dim)
        _positive("encoder.ffn_dim", self.encoder.ffn_dim)
        # Every attention rotates something: self-attention queries and keys, memory
        # cross-attention the decoder's queries, the memory write the keys of ED (rope.py).
        for path, att in (
            ("decoder.self_attention", self.decoder.self_attention),
            ("decoder.cross_attention", self.decoder.cross_attention),
            ("encoder.self_attention", self.encoder.self_attention),
            ("memory.attention", self.memory.attention),
        ):
            if (self.d_model // att.num_heads) % 2:
                raise _fail(
                    f"{path}.num_heads", "head width d_model/num_heads must be even for RoPE"
                )

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else 0.8 / math.sqrt(self.d_model)

    @property
    def stm_shape(self) -> tuple[int, int, int]:
        """Shape of one conversation's STM: (L, S, d)."""
        return (self.num_layers, self.memory.num_slots, self.d_model)

    # --- presets and serialisation -------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RxTConfig:
        """A named configuration (``tiny``, ``small``, ``paper-nano``), optionally overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        data = _merge(PRESETS[name], overrides)
        return cls.from_dict(data)

    @classmethod
    def presets(cls) -> list[str]:
        return list(PRESETS)

    def replace(self, **overrides: Any) -> RxTConfig:
        """A copy with top-level or nested (dict) fields replaced, validated again."""
        return type(self).from_dict(_merge(self.to_dict(), overrides))

    def to_json(self) -> str:
        return json.dumps({"model_type": "rxt", **self.to_dict()}, indent=2, sort_keys=True)

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(directory, CONFIG_FILE)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RxTConfig:
        """Read ``config.json`` (a file, or the directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        model_type = data.pop("model_type", "rxt")
        if model_type != "rxt":
            raise ConfigError(f"{path}: model_type is {model_type!r}, expected 'rxt'")
        memory = data.get("memory")
        if isinstance(memory, dict) and "gate_reference" not in memory:
            # Written before the field existed: that model was trained gating against the
            # pre-stepped slots, and must load the way it was trained.
            data["memory"] = {**memory, "gate_reference": "pre_step"}
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Validated):
            value = value.to_dict()
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _heads(h: int, hq: int | None = None, hkv: int | None = None) -> dict[str, Any]:
    return {"num_heads": h, "num_query_heads": hq, "num_kv_heads": hkv}


PRESETS: dict[str, dict[str, Any]] = {
    # < 1M parameters: unit tests and smoke runs. GQA in the decoder to exercise head sharing.
    "tiny": {
        "vocab_size": 1024,
        "d_model": 64,
        "num_layers": 2,
        "max_seq_len": 128,
        "decoder": {
            "self_attention": _heads(4, 4, 2),
            "cross_attention": _heads(4, 4, 2),
            "ffn_dim": 128,
        },
        "encoder": {"self_attention": _heads(4), "ffn_dim": 128},
        "memory": {"num_slots": 32, "attention": _heads(4)},
    },
    # ~5M parameters: CPU demos and laptop training.
    "small": {
        "vocab_size": 4096,
        "d_model": 160,
        "num_layers": 4,
        "max_seq_len": 256,
        "decoder": {
            "self_attention": _heads(4, 4, 2),
            "cross_attention": _heads(4, 4, 2),
            "ffn_dim": 384,
        },
        "encoder": {"self_attention": _heads(4), "ffn_dim": 384},
        "memory": {"num_slots": 64, "attention": _heads(4)},
    },
    # The published small configuration (RxT-Alpha Nano model card): d=128, 6 layers,
    # 8 heads with SQA 4 query / 4 kv heads, MoE decoder 12 experts top-2, STM 6 x 256 slots,
    # vocabulary 7.5k, interaction length 256. Expert width is not published; 256 is our choice.
    "paper-nano": {
        "vocab_size": 7500,
        "d_model": 128,
        "num_layers": 6,
        "max_seq_len": 256,
        "decoder": {
            "self_attention": _heads(8, 4, 4),
            "cross_attention": _heads(8, 4, 4),
            "ffn_dim": 512,
            "moe": {"num_experts": 12, "top_k": 2, "expert_dim": 256},
        },
        "encoder": {"self_attention": _heads(8, 4, 4), "ffn_dim": 512},
        "memory": {
            "num_slots": 256,
            "variant": "interlayer",
            "attention": _heads(8, 4, 4),
        },
    },
    # The paper authors' small dense configuration, as issue 15 timed their framework at it:
    # d=256, 6 layers, 8 heads (8 query / 8 kv groups: no reduction), dense decoder (no MoE),
    # STM 6 x 64 slots, vocabulary 8,192, self-interlayer memory attention with an elementwise
    # gated residual. FFN widths are not stated: 768 (3d) with tied embeddings gives the
    # 17.1M parameters (at inference) the issue gives for rxt at these sizes.
    "paper-micro-dense": {
        "vocab_size": 8192,
        "d_model": 256,
        "num_layers": 6,
        "max_seq_len": 256,
        "tie_embeddings": True,
        "decoder": {
            "self_attention": _heads(8, 8, 8),
            "cross_attention": _heads(8, 8, 8),
            "ffn_dim": 768,
        },
        "encoder": {"self_attention": _heads(8, 8, 8), "ffn_dim": 768},
        "memory": {
            "num_slots": 64,
            "variant": "gated-self-interlayer",
            "attention": _heads(8, 8, 8),
            "gate_projection": "elementwise",
        },
    },
}
