"""Stage 4, supervised memory-aware training (SMAT).

The paper's training curriculum (Filipek, arXiv:2510.03561), stage 4.

For each dialogue: STM_0 is random (updated with the system prompt, if any); turn 1 is decoded
from STM_0; then for t = 1..N−1, ED_t = Enc(I_t), STM_t = MemAttn(STM_{t−1}, ED_t), and turn t+1
is decoded from STM_t. The loss is the answer-token cross-entropy summed over all turns (answer
tokens and the closing [EOS], the tokenizer's ``loss_mask``), divided by the number of those
tokens, plus the MoE balance loss.

Efficient formulation (equal to a per-turn loop up to float rounding, see the tests): the
encoder runs **once** over every turn of the batch (turns stacked as extra rows), the memory
updates run in sequence over turns, and the decoder runs **once** over every turn, turn t's rows
reading STM_{t−1}. Dialogues of a batch are sorted longest first, so the dialogues still active at
turn t are a prefix of the batch: a dialogue that has ended simply drops out of later updates
and reads, with no padding turns at all.

``gradient_horizon``: ``None`` back-propagates through the whole chain of memory updates (the
paper's formulation); ``k`` detaches the STM entering update u whenever u % k == 0 (truncated
back-propagation in chunks of k updates; k = 1 is the reference code's one-step horizon, where
turn t's loss reaches only the update that wrote the STM it reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rxt.data.dialogue import Dialogue
from rxt.data.order import DialogueStream, length_groups
from rxt.model.memory.gate_stats import record_gates
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer, pad_sequences
from rxt.validated import Validated

__all__ = [
    "SmatBatch",
    "SmatConfig",
    "SmatForward",
    "SmatStage",
    "smat_forward",
]

ALL_MODULES = ("decoder", "memory_attention", "encoder", "embed", "lm_head", "stm_init")


@dataclass(frozen=True)
class SmatConfig(Validated):
    """``unfreeze``: ``(from_step, module names)`` pairs; a module trains from its ``from_step``
    on (names are attributes of the model, e.g. ``decoder``, ``memory_attention``, ``encoder``,
    ``embed``, ``lm_head``, ``stm_init``). With tied embeddings, ``embed`` and ``lm_head`` are one
    tensor: it trains as soon as either does. Invalid values raise ``ConfigError`` (a
    ``ValueError``) naming the field; types are checked from the hints (:mod:`rxt.validated`)."""

    error_prefix = "SmatConfig."

    batch_size: int = 16
    gradient_horizon: int | None = None  # None = full back-propagation through memory updates
    unfreeze: tuple[tuple[int, tuple[str, ...]], ...] = ((0, ALL_MODULES),)
    stm_seed: int = 0
    # Rows are split into this many groups of similar length for the encoder and decoder
    # passes, each padded only to its own longest row: the same losses (to float rounding; for
    # MoE the balance loss becomes a token-weighted mean over groups), far less padding when
    # interaction lengths vary. 1 = one pass over the whole batch.
    length_groups: int = 1

    def validate(self) -> None:
        self.require("batch_size", self.batch_size >= 1, "must be an int >= 1")
        h = self.gradient_horizon
        self.require("gradient_horizon", h is None or h >= 1, "must be None (full) or an int >= 1")
        self.require("stm_seed", self.stm_seed >= 0, "must be an int >= 0")
        self.require("length_groups", self.length_groups >= 1, "must be an int >= 1")
        starts = [s for s, _ in self.unfreeze]
        ok = bool(starts) and starts[0] == 0 and starts == sorted(starts)
        self.require("unfreeze", ok, "needs increasing from_step values starting at 0")
        ok = all(names for _, names in self.unfreeze)
        self.require("unfreeze", ok, "each entry needs a non-empty tuple of module names")


@dataclass
class SmatBatch:
    """One tokenised batch, dialogues sorted longest first.

    - ``indices``: each dialogue's index in the stage's list;
    - ``positions``: stream position of each dialogue (seeds its STM_0);
    - ``active``: ``active[t]`` = number of dialogues with more than t turns (non-increasing);
    - ``input_ids``/``attention_mask``/``loss_mask``: ``(P, T)`` right-padded interactions of
      every turn, turn-major: turn t's rows are dialogues ``0..active[t]-1``;
    - ``system_*``: system prompts ``(R, T_s)`` of dialogues ``system_rows`` (or None).
    """

    indices: list[int]
    positions: list[int]
    active: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    system_rows: list[int] = field(default_factory=list)
    system_ids: torch.Tensor | None = None
    system_mask: torch.Tensor | None = None

    @property
    def answer_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens of every turn: the throughput unit."""
        return int(self.attention_mask.sum())


@dataclass
class SmatForward:
    """``token_ce: (P, T-1)`` per-token CE (0 off the loss mask); ``reads[t]``: the STM turn t
    read, ``(active[t], L, S, d)``; ``aux``: the decoder's MoE loss or None."""

    token_ce: torch.Tensor
    reads: list[torch.Tensor]
    aux: torch.Tensor | None


def _stm_seed(stm_seed: int, position: int) -> int:
    return (stm_seed * 0x9E3779B97F4A7C15 + position) % (1 << 63)


def initial_stm(model: ReactiveTransformer, stm_seed: int, positions: Sequence[int]):
    """STM_0 of each dialogue, seeded from ``(stm_seed, stream position)``."""
    return torch.cat(
        [
            model.initial_stm(1, generator=torch.Generator().manual_seed(_stm_seed(stm_seed, p)))
            for p in positions
        ]
    )


def _regroup(parts: list[tuple[list[int], torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Rows computed group by group, back in their original order (differentiable)."""
    index = torch.tensor([r for rows, _ in parts for r in rows], device=device)
    return torch.cat([value for _, value in parts])[torch.argsort(index)]


def _encode(model: ReactiveTransformer, ids, mask, lengths: list[int], groups: int):
    if groups == 1:
        return model.encode(ids, mask)
    width = ids.shape[1]
    parts = []
    for rows, longest in length_groups(lengths, groups):
        r = torch.tensor(rows, device=ids.device)
        encoded = model.encode(ids[r, :longest], mask[r, :longest])
        parts.append((rows, F.pad(encoded, (0, 0, 0, width - longest))))
    return _regroup(parts, ids.device)


def _decode_ce(model: ReactiveTransformer, ids, mask, memory, lengths: list[int], groups: int):
    """Per-token next-token CE ``(P, T-1)`` and the MoE balance loss (or None)."""
    width = ids.shape[1]
    parts, aux, weights = [], [], []
    for rows, longest in length_groups(lengths, groups):
        r = torch.tensor(rows, device=ids.device)
        part_ids = ids[r, :longest]
        out = model.decoder_forward(part_ids, memory[r], attention_mask=mask[r, :longest])
        logits = out.logits[:, :-1].float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), part_ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(rows), longest - 1)
        parts.append((rows, F.pad(ce, (0, width - longest))))
        if out.aux_loss is not None:
            aux.append(out.aux_loss)
            weights.append(sum(lengths[i] for i in rows))
    token_ce = parts[0][1] if groups == 1 else _regroup(parts, ids.device)
    if not aux:
        return token_ce, None
    if len(aux) == 1:
        return token_ce, aux[0]
    w = torch.tensor(weights, dtype=aux[0].dtype, device=aux[0].device)
    return token_ce, (torch.stack(aux) * w).sum() / w.sum()


def smat_forward(
    model: ReactiveTransformer,
    batch: SmatBatch,
    *,
    stm_seed: int = 0,
    gradient_horizon: int | None = None,
    length_groups: int = 1,
) -> SmatForward:
    """The efficient SMAT forward pass (module docstring); ``length_groups`` as in
    :class:`SmatConfig`."""
    device = model.device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    lengths = batch.attention_mask.sum(dim=1).tolist()  # the CPU copy: no device sync
    groups = length_groups
    active = batch.active
    offsets = [0]
    for n in active:
        offsets.append(offsets[-1] + n)

    stm = initial_stm(model, stm_seed, batch.positions)
    if batch.system_rows:
        rows = torch.tensor(batch.system_rows, device=device)
        written = model.update_memory(
            stm[rows], batch.system_ids.to(device), batch.system_mask.to(device)
        )
        stm = stm.index_copy(0, rows, written.to(stm.dtype))  # autocast may return bf16

    # Encoder once over every interaction some later turn reads: turn t of each dialogue that
    # has a turn t+1 (the active prefix of length active[t+1] of turn t's rows).
    # Row numbers built on the host: their lengths come from the CPU mask, no device sync.
    encode_rows = [
        r for t in range(len(active) - 1) for r in range(offsets[t], offsets[t] + active[t + 1])
    ]
    reads = [stm]
    if encode_rows:
        index = torch.tensor(encode_rows, device=device)
        encode_lengths = [lengths[i] for i in encode_rows]
        encoded = _encode(model, ids[index], mask[index], encode_lengths, groups)
        start = 0
        for t in range(len(active) - 1):
            n = active[t + 1]
            if gradient_horizon is not None and t % gradient_horizon == 0:
                stm = stm.detach()
            part = slice(start, start + n)
            # With length groups, each write also reads only up to its longest interaction.
            width = max(encode_lengths[part]) if groups > 1 else encoded.shape[2]
            part_mask = mask[index[part], :width]
            stm = model.memory_attention(stm[:n], encoded[part, :, :width], part_mask)
            reads.append(stm)
            start += n

    token_ce, aux = _decode_ce(model, ids, mask, torch.cat(reads), lengths, groups)
    weight = batch.loss_mask[:, 1:].to(device=device, dtype=token_ce.dtype)
    return SmatForward(token_ce=token_ce * weight, reads=reads, aux=aux)


class SmatStage:
    """Stage 4 for :func:`rxt.training.loop.train`.

    ``batch(index)`` holds the dialogues at stream positions ``index * batch_size + j``;
    position p is dialogue ``perm_e[p % n]`` of epoch ``e = p // n``, with ``perm_e`` a shuffle
    seeded from ``(seed, e)``: every batch is a pure function of its index.
    """

    name = "smat"

    def __init__(
        self,
        dialogues: Sequence[Dialogue],
        tokenizer: RxTTokenizer,
        config: SmatConfig = SmatConfig(),
        seed: int = 0,
    ) -> None:
        if not isinstance(config, SmatConfig):
            raise TypeError(f"config must be a SmatConfig, got {type(config).__name__}")
        self._stream = DialogueStream(dialogues, seed, tag="smat", what="SMAT")
        self.dialogues = self._stream.dialogues
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed

    @property
    def varying_calls(self) -> tuple[str, ...]:
        """Modules a step calls a batch-dependent number of times (FSDP2 keeps them whole,
        :mod:`rxt.training.sharding`): the encoder (only when some dialogue has a second turn
        or a system prompt) and memory attention (once per turn of the longest dialogue); the
        decoder too with length groups (one call per group, and the rows are the turns)."""
        grouped = ("decoder",) if self.config.length_groups > 1 else ()
        return ("encoder", "memory_attention", *grouped)

    # ------------------------------------------------------------------ data
    def batch(self, index: int) -> SmatBatch:
        rows = self._stream.rows(index, self.config.batch_size)
        chosen, dialogues = rows.chosen, rows.dialogues
        encoded = self.tokenizer.batch_encode_interactions(rows.pairs)
        batch = SmatBatch(
            indices=[i for _, i in chosen],
            positions=[p for p, _ in chosen],
            active=rows.active,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            loss_mask=encoded["loss_mask"],
        )
        systems = [(r, d.system) for r, d in enumerate(dialogues) if d.system is not None]
        if systems:
            seqs = [self.tokenizer.encode_system(text) for _, text in systems]
            batch.system_ids, batch.system_mask = pad_sequences(seqs, pad_id=self.tokenizer.pad_id)
            batch.system_rows = [r for r, _ in systems]
        return batch

    # ------------------------------------------------------------------ training
    def trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        params: dict[int, nn.Parameter] = {}
        for from_step, names in self.config.unfreeze:
            if from_step > step:
                break
            for name in names:
                module = getattr(model, name, None)
                if not isinstance(module, nn.Module):
                    raise ValueError(f"SmatConfig.unfreeze: the model has no module {name!r}")
                params.update((id(p), p) for p in module.parameters())
        return list(params.values())

    def loss(
        self, model: ReactiveTransformer, batch: SmatBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # G of the first dialogue's writes: a cheap sample that shows whether the gate trains.
        with record_gates(model, rows=1) as gates:
            out = smat_forward(
                model,
                batch,
                stm_seed=self.config.stm_seed,
                gradient_horizon=self.config.gradient_horizon,
                length_groups=self.config.length_groups,
            )
        tokens = max(batch.answer_tokens, 1)
        ce = out.token_ce.sum() / tokens
        loss = ce if out.aux is None else ce + out.aux
        metrics = {
            "ce": ce.item(),
            "answer_tokens": float(batch.answer_tokens),
            "tokens": float(batch.tokens),
        }
        if out.aux is not None:
            metrics["aux"] = out.aux.item()
        for layer, stats in enumerate(gates.quantiles((0.1, 0.5, 0.9))):
            metrics.update({f"gate_l{layer}_{name}": value for name, value in stats.items()})
        return loss, metrics
