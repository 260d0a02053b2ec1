"""Stages 1 and 2: joint LM pre-training and joint interaction fine-tuning.

The paper's training curriculum (Filipek, arXiv:2510.03561), stages 1 and 2.

One sequence feeds both halves of the model:

- the **encoder** reads it with ~15% of its tokens corrupted BERT-style (of the chosen
  positions, 80% become ``[MASK]``, 10% a random non-special token, 10% stay unchanged) and its
  MLM head predicts the originals (``L_MLM``, mean over the chosen positions);
- the **decoder** reads it intact and predicts every next token (``L_AR``, mean over target
  tokens). Its memory cross-attention reads the encoder's per-layer states ED ``(B, L, T, d)``
  **detached**, with Gaussian noise scaled to each vector's RMS and with each position hidden
  from it with probability ``slot_dropout``. These are the states of the *masked* sequence: one
  encoder pass serves both losses, and the masking is one more limit on copying through memory.

Total: ``ar_weight · L_AR + mlm_weight · L_MLM`` (+ the decoder's MoE balance loss).

Why detached: the decoder must learn to *read* the encoder's vector space, not to bend the
encoder into a side channel that leaks the next token (the encoder sees the whole sequence,
including the token being predicted). With the memory detached, the encoder learns from the MLM
loss only, and the decoder's cross-attention aligns to what the encoder produces anyway. Noise
and slot dropout make that channel imperfect so the decoder keeps a language model of its own
(stage 4 then teaches it to read the *past* from STM instead).

Stage 1 (``name="joint"``) trains on plain text, :func:`text_sequences`; stage 2 (``name="sft"``)
on single interactions, :func:`interaction_sequences`, usually with ``answer_only=True`` so the
AR loss covers only what the model must produce (answer tokens and the closing ``[EOS]``).

Every random choice (which tokens are masked and how, which positions are hidden, the noise) is
drawn from generators seeded from ``(seed, batch index)``: ``batch(index)`` and ``loss`` are
deterministic per index, so a resumed run replays exactly the batches a straight run would see.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rxt.data.dialogue import Dialogue
from rxt.data.order import EpochOrder
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import SPECIAL_TOKENS, RxTTokenizer, pad_sequences
from rxt.validated import Validated

__all__ = [
    "IGNORE_INDEX",
    "JointBatch",
    "JointConfig",
    "JointStage",
    "interaction_sequences",
    "mask_tokens",
    "text_sequences",
]

IGNORE_INDEX = -100  # MLM label of positions that are not predicted
_NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are special tokens (fixed, see tokenizer)
TRAINABLE = ("encoder", "decoder", "embed", "lm_head", "mlm_head")


@dataclass(frozen=True)
class JointConfig(Validated):
    """Settings of stages 1–2. Invalid values raise ``ConfigError`` (a ``ValueError``) naming
    the field; types are checked from the hints (:mod:`rxt.validated`)."""

    error_prefix = "JointConfig."

    batch_size: int = 32
    mask_rate: float = 0.15  # share of each row's maskable tokens chosen for MLM
    ar_weight: float = 1.0  # α
    mlm_weight: float = 1.0  # β
    noise_std: float = 0.2  # Gaussian noise on ED, relative to each vector's RMS
    slot_dropout: float = 0.1  # probability that an encoder position is hidden from the decoder
    answer_only: bool = False  # AR loss only where the sequence's loss mask is 1

    def validate(self) -> None:
        self.require("batch_size", self.batch_size >= 1, "must be an int >= 1")
        for name in ("mask_rate", "ar_weight", "mlm_weight", "noise_std", "slot_dropout"):
            self.require(name, getattr(self, name) >= 0, "must be >= 0")
        self.require("mask_rate", self.mask_rate <= 1, "must be in [0, 1]")
        self.require("slot_dropout", self.slot_dropout < 1, "must be in [0, 1)")
        both_zero = self.ar_weight == 0 and self.mlm_weight == 0
        self.require("mlm_weight", not both_zero, "ar_weight and mlm_weight cannot both be 0")


# ---------------------------------------------------------------------------------- data
def text_sequences(texts: Iterable[str], tokenizer: RxTTokenizer, max_len: int) -> list[list[int]]:
    """Stage 1 sequences: each text as ``[BOS] text [EOS]``.

    A text longer than ``max_len`` is cut into consecutive chunks of at most ``max_len`` tokens.
    Every chunk starts with ``[BOS]`` (the decoder always starts from it at inference) but only
    the chunk holding the text's real end gets ``[EOS]``: a cut is not an end, and teaching
    ``[EOS]`` there would teach the model to stop mid-text. If a text ends exactly at a chunk
    boundary, the ``[EOS]``-only remainder is dropped rather than kept as ``[BOS][EOS]``, which
    would teach an empty text. Empty texts are skipped.
    """
    if type(max_len) is not int or max_len < 3:
        raise ValueError(f"max_len must be an int >= 3 ([BOS], a token, [EOS]), got {max_len!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str, not a single str")
    body = max_len - 1  # room for [BOS]
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        stream = [*ids, tokenizer.eos_id]
        pieces = [stream[i : i + body] for i in range(0, len(stream), body)]
        if len(pieces) > 1 and pieces[-1] == [tokenizer.eos_id]:
            pieces.pop()
        out.extend([tokenizer.bos_id, *piece] for piece in pieces)
    return out


def interaction_sequences(
    dialogues: Iterable[Dialogue], tokenizer: RxTTokenizer, max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Stage 2 sequences: every turn of every dialogue as ``[BOS][Q] q [A] a [EOS]`` with its
    loss mask (1 on the answer tokens and the closing ``[EOS]``), in dialogue and turn order.

    Interactions longer than ``max_len`` are **dropped**, never clipped: clipping the answer
    would teach the model to stop without ``[EOS]`` (or to stop mid-answer), and clipping the
    query would train answers to questions the model never saw. A ``UserWarning`` reports how
    many were dropped. System prompts are not interactions and are ignored here.
    """
    if type(max_len) is not int or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    out: list[tuple[list[int], list[int]]] = []
    dropped = total = 0
    for k, dialogue in enumerate(dialogues):
        if not isinstance(dialogue, Dialogue):
            raise TypeError(f"dialogues[{k}] must be a Dialogue, got {type(dialogue).__name__}")
        for turn in dialogue.turns:
            total += 1
            enc = tokenizer.encode_interaction(turn.query, turn.answer)
            if len(enc.input_ids) > max_len:
                dropped += 1
                continue
            out.append((enc.input_ids, enc.loss_mask))
    if dropped:
        warnings.warn(
            f"interaction_sequences: dropped {dropped} of {total} interactions longer than "
            f"max_len={max_len} tokens",
            stacklevel=2,
        )
    return out


def _seed(tag: str, seed: int, index: int) -> int:
    """A 63-bit seed from ``(tag, seed, index)``, stable across processes and platforms
    (unlike ``hash``), and decorrelated between neighbouring indices."""
    digest = hashlib.blake2b(f"{tag}:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_rate: float,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption of right-padded ``input_ids (B, T)``. Returns ``(masked_ids, labels)``,
    ``labels`` = the original id at chosen positions and :data:`IGNORE_INDEX` elsewhere.

    Only real, non-special tokens may be chosen: special tokens are structure the encoder is
    given, not content to predict. Each row with ``n`` maskable tokens gets exactly
    ``max(1, round(mask_rate · n))`` chosen positions (BERT's ``create_pretraining_data``
    rule): a fixed count per row keeps short sequences from often getting no MLM target at all.
    Of the chosen positions, 80% become ``mask_id``, 10% a uniformly random non-special id below
    ``vocab_size`` and 10% keep their token.
    """
    b, t = input_ids.shape
    # Fixed draw order (all four drawn every time) keeps the stream identical whatever the data.
    order = torch.rand(b, t, generator=generator)
    kind = torch.rand(b, t, generator=generator)
    random_ids = torch.randint(_NUM_SPECIAL, vocab_size, (b, t), generator=generator)

    maskable = attention_mask.bool() & (input_ids >= _NUM_SPECIAL)
    n = maskable.sum(dim=1)
    if mask_rate > 0:
        count = torch.floor(n.double() * mask_rate + 0.5).long().clamp(min=1)
        count = torch.minimum(count, n)
    else:
        count = torch.zeros_like(n)
    # The `count` maskable positions with the smallest draws: a uniform subset of that size.
    rank = order.masked_fill(~maskable, 2.0).argsort(dim=1).argsort(dim=1)
    chosen = maskable & (rank < count[:, None])

    masked = input_ids.clone()
    masked[chosen & (kind < 0.8)] = mask_id
    swap = chosen & (kind >= 0.8) & (kind < 0.9)
    masked[swap] = random_ids[swap]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def _slot_mask(
    attention_mask: torch.Tensor, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """The decoder's memory mask: real encoder positions, each hidden with probability
    ``rate``. A row that would lose every position keeps one, drawn uniformly: a row with
    nothing to attend to would make the cross-attention softmax undefined (NaN)."""
    real = attention_mask.bool()
    keep = torch.rand(real.shape, generator=generator) >= rate
    rescue = torch.rand(real.shape, generator=generator)
    visible = real & keep
    empty = ~visible.any(dim=1)
    if empty.any():
        pick = rescue.masked_fill(~real, -1.0).argmax(dim=1)
        visible[empty, pick[empty]] = True
    return visible.long()


@dataclass
class JointBatch:
    """One batch of right-padded sequences ``(B, T)``.

    - ``indices``: each sequence's index in the stage's list; ``positions``: stream positions;
    - ``input_ids``/``attention_mask``: the intact sequences (the decoder's input);
    - ``target_mask``: 1 where a token is an AR target (``answer_only``: the loss mask; else
      every real token; position 0 is never predicted whatever it holds);
    - ``masked_ids``/``mlm_labels``: the encoder's corrupted input and the MLM targets;
    - ``memory_mask``: encoder positions the decoder may read (slot dropout applied);
    - ``noise_seed``: seeds the noise on ED, drawn in ``loss`` on the model's device.
    """

    indices: list[int]
    positions: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    masked_ids: torch.Tensor
    mlm_labels: torch.Tensor
    memory_mask: torch.Tensor
    noise_seed: int

    def noise_generator(self, device: torch.device | str) -> torch.Generator:
        """A fresh generator for this batch's noise: the same draws on every call."""
        return torch.Generator(device=device).manual_seed(self.noise_seed)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens: the throughput unit."""
        return int(self.attention_mask.sum())

    @property
    def ar_tokens(self) -> int:
        return int(self.target_mask[:, 1:].sum())

    @property
    def mlm_tokens(self) -> int:
        return int((self.mlm_labels != IGNORE_INDEX).sum())


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).sqrt()


class JointStage:
    """Stages 1–2 for :func:`rxt.training.loop.train`.

    ``sequences``: token-id lists (every next token is an AR target), or ``(input_ids,
    loss_mask)`` pairs (with ``answer_only``, only tokens whose mask is 1 are targets), e.g. from
    :func:`text_sequences` / :func:`interaction_sequences`. ``name``: ``"joint"`` (stage 1) or
    ``"sft"`` (stage 2); checkpoints record it, so a resume cannot mix the two.

    ``batch(index)`` holds the sequences at stream positions ``index * batch_size + j``; position
    p is sequence ``perm_e[p % n]`` of epoch ``e = p // n``, with ``perm_e`` a shuffle seeded from
    ``(seed, e)``.
    """

    # Every step runs the encoder once and the decoder once, whatever the batch: FSDP2 may
    # shard every layer (rxt.training.sharding).
    varying_calls: tuple[str, ...] = ()

    def __init__(
        self,
        sequences: Sequence[Sequence[int] | tuple[Sequence[int], Sequence[int]]],
        tokenizer: RxTTokenizer,
        config: JointConfig = JointConfig(),
        seed: int = 0,
        name: str = "joint",
    ) -> None:
        if not isinstance(config, JointConfig):
            raise TypeError(f"config must be a JointConfig, got {type(config).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.name = name
        vocab = tokenizer.vocab_size
        self.ids: list[list[int]] = []
        self.loss_masks: list[list[int]] = []
        for k, item in enumerate(sequences):
            ids, mask = self._check_sequence(k, item, vocab)
            self.ids.append(ids)
            self.loss_masks.append(mask)
        if not self.ids:
            raise ValueError(f"stage {name!r} needs at least one sequence")
        self._order = EpochOrder(len(self.ids), seed, tag=name)

    @staticmethod
    def _check_sequence(k: int, item: object, vocab: int) -> tuple[list[int], list[int]]:
        is_pair = (
            isinstance(item, tuple)
            and len(item) == 2
            and all(isinstance(x, Sequence | torch.Tensor) for x in item)
        )
        if is_pair:
            ids, mask = (x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in item)
        elif isinstance(item, Sequence | torch.Tensor) and not isinstance(item, str):
            ids = item.tolist() if isinstance(item, torch.Tensor) else list(item)
            mask = [1] * len(ids)
        else:
            raise TypeError(
                f"sequences[{k}] must be a list of ids or an (input_ids, loss_mask) pair, "
                f"got {type(item).__name__}"
            )
        if len(ids) < 2:
            raise ValueError(f"sequences[{k}] has {len(ids)} tokens; at least 2 are needed")
        if not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise ValueError(f"sequences[{k}] holds ids that are not ints in [0, {vocab})")
        if len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
            raise ValueError(f"sequences[{k}]: loss_mask must be 0/1 values, one per token")
        return ids, [int(m) for m in mask]

    # ------------------------------------------------------------------ data
    def batch(self, index: int) -> JointBatch:
        cfg = self.config
        chosen = self._order.batch(index, cfg.batch_size)
        positions = [p for p, _ in chosen]
        indices = [i for _, i in chosen]
        pad = self.tokenizer.pad_id
        input_ids, attention_mask = pad_sequences([self.ids[i] for i in indices], pad_id=pad)
        if cfg.answer_only:
            target_mask, _ = pad_sequences([self.loss_masks[i] for i in indices])
        else:
            target_mask = attention_mask.clone()

        generator = torch.Generator().manual_seed(_seed(self.name, self.seed, index))
        masked_ids, labels = mask_tokens(
            input_ids,
            attention_mask,
            mask_rate=cfg.mask_rate,
            mask_id=self.tokenizer.mask_id,
            vocab_size=self.tokenizer.vocab_size,
            generator=generator,
        )
        memory_mask = _slot_mask(attention_mask, cfg.slot_dropout, generator)
        return JointBatch(
            indices=indices,
            positions=positions,
            input_ids=input_ids,
            attention_mask=attention_mask,
            target_mask=target_mask,
            masked_ids=masked_ids,
            mlm_labels=labels,
            memory_mask=memory_mask,
            noise_seed=_seed(f"{self.name}/noise", self.seed, index),
        )

    # ------------------------------------------------------------------ training
    def trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        params: dict[int, nn.Parameter] = {}  # by id: a tied lm_head is the embedding
        for name in TRAINABLE:
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                params.update((id(p), p) for p in module.parameters())
        return list(params.values())

    def loss(
        self, model: ReactiveTransformer, batch: JointBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        device = model.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)

        encoded = model.encode(batch.masked_ids.to(device), mask)
        zero = torch.zeros((), device=device)
        mlm, accuracy = zero, 0.0
        if cfg.mlm_weight > 0 or model.mlm_head is not None:
            labels = batch.mlm_labels.to(device)
            chosen = labels != IGNORE_INDEX
            if chosen.any():
                logits = model.mlm_logits(encoded)[chosen].float()
                mlm = F.cross_entropy(logits, labels[chosen])
                accuracy = (logits.argmax(dim=-1) == labels[chosen]).float().mean().item()

        # The decoder reads ED as a fixed (detached) memory: no gradient may reach the encoder
        # through it (module docstring).
        memory = encoded.detach().float()
        if cfg.noise_std > 0:
            noise = torch.randn(
                memory.shape, generator=batch.noise_generator(device), device=device
            )
            memory = memory + cfg.noise_std * _rms(memory) * noise
        out = model.decoder_forward(
            ids, memory, attention_mask=mask, memory_mask=batch.memory_mask.to(device)
        )
        logits = out.logits[:, :-1].float()
        weight = batch.target_mask[:, 1:].to(device=device, dtype=logits.dtype)
        token_ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(weight)
        ar = (token_ce * weight).sum() / weight.sum().clamp(min=1)

        loss = cfg.ar_weight * ar + cfg.mlm_weight * mlm
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        metrics = {
            "ar": ar.item(),
            "mlm": float(mlm.item()),
            "mlm_accuracy": accuracy,
            "tokens": float(batch.tokens),
        }
        if out.aux_loss is not None:
            metrics["aux"] = out.aux_loss.item()
        return loss, metrics
