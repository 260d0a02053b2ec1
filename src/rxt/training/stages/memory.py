"""Stage 3: self-supervised memory-attention pre-training.

The paper's training curriculum (Filipek, arXiv:2510.03561), stage 3.

No label says what a "good" memory is, so the memory-attention network is trained towards a
pseudo-target: a blend of the old memory and the new interaction. For each dialogue, with STM_0
random (seeded per stream position) and for t = 1..N::

    ED_t     = Enc(I_t)                                   (encoder frozen, no gradient)
    STM_t    = MemAttn(STM_{t−1} + input noise, ED_t)
    target_t = (1 − w_t)·n(STM_{t−1}) + w_t·n(E_t)  + target noise       (detached)
    loss     = mean over turns, active rows, layers and slots of −cos(STM_t, target_t)

**Normalisation.** ``n(x) = x / rms(x)`` per slot vector (no parameters). STM_{t−1} and E_t
live at unrelated scales (a random STM_0 has std 0.02; encoder states are O(1)), and a cosine
target built from the raw sum would be dominated by the larger term whatever w_t says. With both
terms at unit RMS, w_t weighs them as stated. Noise is relative to RMS for the same reason.

**E_t, the new interaction at slot shape.** The reference design adds ED_t[l] position-wise to
the slots, which forces sequence length T = slot count S. Instead E_t is a parameter-free
attention read of ED_t[l] ``(T, d)`` by the current slots ``(S, d)``::

    E_t[l] = softmax(n(STM_{t−1}[l]) · n(ED_t[l])ᵀ / √d, padding masked) · ED_t[l]

- it works for any T and S, and padding never contributes;
- it is permutation-consistent with the slots: permuting the slots permutes E_t the same way,
  so the target treats slots as a set, as the memory attention does (slots carry no position);
- it is what the memory attention's write would compute with identity projections (query
  = slots, key = value = ED, both RMS-normed), so the target lies in the family of functions the
  network can express: it is reachable, not an arbitrary regression target.

**Schedule.** w_1 = ``w_first`` (the first interaction, written into a random STM, should
dominate); for t ≥ 2, w_t = max(``w_floor``, ``w_start`` − ``w_step``·(t − 2)): later
interactions weigh less as the memory accumulates; plus uniform jitter in ±``jitter`` per
dialogue and turn, clamped to [0.01, 0.99].

**Gradients.** The STM entering each step is detached, so every loss term trains exactly one
write (the reference recipe's one-step horizon; a long chain would back-propagate towards a
moving pseudo-target). STM_0 is not a write: it is left attached so that a *learned* STM_0
(``memory.stm_init="learned"``) trains with the memory attention; a random STM_0 has no gradient
anyway.

Randomness (jitter, input and target noise) comes from generators seeded from ``(seed, batch
index)``: ``batch(index)`` and ``loss`` are deterministic per index, so resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rxt.data.dialogue import Dialogue
from rxt.data.order import DialogueStream
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer
from rxt.training.stages.joint import _seed
from rxt.training.stages.smat import initial_stm
from rxt.validated import Validated

__all__ = [
    "MemoryPretrainBatch",
    "MemoryPretrainConfig",
    "MemoryPretrainStage",
    "interaction_read",
    "pseudo_target",
    "rms_norm",
]

_W_MIN, _W_MAX = 0.01, 0.99
_EPS = 1e-6


@dataclass(frozen=True)
class MemoryPretrainConfig(Validated):
    """Settings of stage 3. Invalid values raise ``ConfigError`` (a ``ValueError``) naming the
    field; types are checked from the hints (:mod:`rxt.validated`)."""

    error_prefix = "MemoryPretrainConfig."

    batch_size: int = 16
    w_first: float = 0.9  # weight of the new interaction at t = 1
    w_start: float = 0.5  # ... at t = 2, then falling by w_step per turn
    w_step: float = 0.05
    w_floor: float = 0.05
    jitter: float = 0.15  # uniform ± jitter on w_t, per dialogue and turn
    input_noise: float = 0.01  # Gaussian noise on STM_{t−1} entering the write, relative to RMS
    target_noise: float = 0.01  # Gaussian noise on the target, relative to RMS
    stm_seed: int = 0

    def validate(self) -> None:
        self.require("batch_size", self.batch_size >= 1, "must be an int >= 1")
        self.require("stm_seed", self.stm_seed >= 0, "must be an int >= 0")
        for name in (
            "w_first", "w_start", "w_step", "w_floor", "jitter", "input_noise", "target_noise"
        ):  # fmt: skip
            self.require(name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("w_first", "w_start", "w_floor"):
            self.require(name, 0 < getattr(self, name) < 1, "must be in (0, 1)")
        self.require(
            "w_floor", self.w_floor <= self.w_start, f"must be <= w_start ({self.w_start})"
        )
        self.require("jitter", self.jitter < 1, "must be in [0, 1)")

    def weight_schedule(self, t: int) -> float:
        """w_t without jitter, for the 1-based turn ``t``."""
        if type(t) is not int or t < 1:
            raise ValueError(f"t must be an int >= 1 (turns are 1-based), got {t!r}")
        if t == 1:
            return self.w_first
        return max(self.w_floor, self.w_start - self.w_step * (t - 2))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS normalisation over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + _EPS)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


def interaction_read(
    stm: torch.Tensor, encoded: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E_t: ED ``(B, L, T, d)`` read by the slots of ``stm (B, L, S, d)`` → ``(B, L, S, d)``
    (module docstring). ``attention_mask: (B, T)``, 1 = real token; every row needs one."""
    d = encoded.shape[-1]
    scores = torch.einsum("blsd,bltd->blst", rms_norm(stm), rms_norm(encoded)) / math.sqrt(d)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], -math.inf)
    return torch.einsum("blst,bltd->blsd", scores.softmax(dim=-1), encoded)


def pseudo_target(previous: torch.Tensor, read: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 − w)·n(previous) + w·n(read)``; ``weight: (B,)`` per row."""
    w = weight.to(previous.dtype)[:, None, None, None]
    return (1 - w) * rms_norm(previous) + w * rms_norm(read)


@dataclass
class MemoryPretrainBatch:
    """One tokenised batch, dialogues sorted longest first (as in SMAT).

    - ``indices``: each dialogue's index in the stage's list; ``positions``: stream positions
      (seed each STM_0);
    - ``active``: ``active[t]`` = number of dialogues with more than t turns (non-increasing);
    - ``input_ids``/``attention_mask``: ``(P, T)`` right-padded interactions, turn-major: turn
      t's rows are dialogues ``0..active[t]-1``;
    - ``weights``: ``(turns, B)`` jittered w_t per turn and dialogue (unused past ``active``);
    - ``noise_seed``: seeds the input and target noise, drawn in ``loss`` on the model's device.
    """

    indices: list[int]
    positions: list[int]
    active: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    weights: torch.Tensor
    noise_seed: int

    def noise_generator(self, device: torch.device | str) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.noise_seed)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens of every turn: the throughput unit."""
        return int(self.attention_mask.sum())


class MemoryPretrainStage:
    """Stage 3 for :func:`rxt.training.loop.train`.

    ``batch(index)`` holds the dialogues at stream positions ``index * batch_size + j``;
    position p is dialogue ``perm_e[p % n]`` of epoch ``e = p // n``, with ``perm_e`` a shuffle
    seeded from ``(seed, e)``. System prompts are not interactions and are ignored.
    """

    name = "memory"
    # One memory update per turn of the longest dialogue of the batch: FSDP2 keeps the memory
    # attention whole (rxt.training.sharding); the frozen encoder runs once per batch.
    varying_calls = ("memory_attention",)

    def __init__(
        self,
        dialogues: Sequence[Dialogue],
        tokenizer: RxTTokenizer,
        config: MemoryPretrainConfig = MemoryPretrainConfig(),
        seed: int = 0,
    ) -> None:
        if not isinstance(config, MemoryPretrainConfig):
            raise TypeError(f"config must be a MemoryPretrainConfig, got {type(config).__name__}")
        self._stream = DialogueStream(dialogues, seed, tag="memory", what="memory pre-training")
        self.dialogues = self._stream.dialogues
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed

    def weight_schedule(self, t: int) -> float:
        """w_t without jitter (see :meth:`MemoryPretrainConfig.weight_schedule`)."""
        return self.config.weight_schedule(t)

    # ------------------------------------------------------------------ data
    def batch(self, index: int) -> MemoryPretrainBatch:
        cfg = self.config
        rows = self._stream.rows(index, cfg.batch_size)
        chosen, active, most = rows.chosen, rows.active, len(rows.active)
        encoded = self.tokenizer.batch_encode_interactions(rows.pairs)

        generator = torch.Generator().manual_seed(_seed("memory", self.seed, index))
        base = torch.tensor([cfg.weight_schedule(t + 1) for t in range(most)], dtype=torch.float64)
        unit = torch.rand(most, cfg.batch_size, generator=generator, dtype=torch.float64) * 2 - 1
        jitter = unit * cfg.jitter
        weights = (base[:, None] + jitter).clamp(_W_MIN, _W_MAX).float()
        return MemoryPretrainBatch(
            indices=[i for _, i in chosen],
            positions=[p for p, _ in chosen],
            active=active,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            weights=weights,
            noise_seed=_seed("memory/noise", self.seed, index),
        )

    # ------------------------------------------------------------------ training
    def trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        # stm_init has parameters only when STM_0 is learned.
        return [*model.memory_attention.parameters(), *model.stm_init.parameters()]

    def loss(
        self, model: ReactiveTransformer, batch: MemoryPretrainBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        device = model.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        weights = batch.weights.to(device)
        generator = batch.noise_generator(device)

        with torch.no_grad():  # the encoder is frozen: one pass over every turn of the batch
            encoded = model.encode(ids, mask)

        stm = initial_stm(model, cfg.stm_seed, batch.positions)
        total = torch.zeros((), device=device)
        count = 0
        start = 0
        for t, n in enumerate(batch.active):
            rows = slice(start, start + n)
            start += n
            # STM_0 stays attached (a learned STM_0 trains); later STMs are the network's own
            # writes, detached so each loss term trains one write.
            previous = stm[:n] if t == 0 else stm[:n].detach()
            ed, ed_mask = encoded[rows], mask[rows]

            written = previous
            if cfg.input_noise > 0:
                noise = torch.randn(previous.shape, generator=generator, device=device)
                written = previous + cfg.input_noise * _rms(previous.detach()) * noise.to(
                    previous.dtype
                )
            stm = model.memory_attention(written, ed, ed_mask)

            # The target in float32 whatever the autocast: it is a fixed point to aim at.
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                prev32 = previous.detach().float()
                target = pseudo_target(
                    prev32, interaction_read(prev32, ed.float(), ed_mask), weights[t, :n]
                )
                if cfg.target_noise > 0:
                    noise = torch.randn(target.shape, generator=generator, device=device)
                    target = target + cfg.target_noise * _rms(target) * noise
            cos = F.cosine_similarity(stm.float(), target, dim=-1, eps=_EPS)
            total = total + cos.sum()
            count += cos.numel()

        mean_cos = total / count
        return -mean_cos, {"cos": mean_cos.item(), "tokens": float(batch.tokens)}
