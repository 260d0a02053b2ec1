"""Training a stateless baseline with the shared loop, on SMAT's dialogues and answer tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rxt.baselines.data import Mode, check_mode, full_sequence
from rxt.data.dialogue import Dialogue
from rxt.data.order import DialogueStream, length_groups
from rxt.tokenizer import RxTTokenizer, pad_sequences
from rxt.validated import Validated, check_type, fail

__all__ = ["StatelessBatch", "StatelessConfig", "StatelessStage"]


@dataclass(frozen=True)
class StatelessConfig(Validated):
    """The options of a :class:`StatelessStage` a recipe may set (``stages.stateless-*.config``);
    types are checked from the hints (:mod:`rxt.validated`)."""

    batch_size: int = 16
    length_groups: int = 1

    def validate(self) -> None:
        self.require("batch_size", self.batch_size >= 1, "must be an int >= 1")
        self.require("length_groups", self.length_groups >= 1, "must be an int >= 1")


@dataclass
class StatelessBatch:
    """One batch: the dialogues of SMAT's batch with the same index, sorted the same way
    (longest first, ties in stream order).

    - ``indices``/``positions``: each dialogue's index in the stage's list and stream position;
    - ``input_ids``/``attention_mask``/``loss_mask``: ``(R, T)``, right-padded. ``"full"``: row
      ``r`` is dialogue ``r``. ``"current"``: one row per interaction, turn-major (turn t's rows
      are the dialogues with more than t turns), i.e. exactly the rows of SMAT's batch;
    - ``dropped_turns``: turns cut from the front of over-long dialogues (``"full"`` only).
    """

    indices: list[int]
    positions: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    dropped_turns: int = 0

    @property
    def answer_tokens(self) -> int:
        """Scored tokens (answers and their ``[EOS]``), counted as SmatBatch counts them."""
        return int(self.loss_mask[:, 1:].sum())

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens read: the throughput unit."""
        return int(self.attention_mask.sum())


class StatelessStage:
    """A stage for :func:`rxt.training.loop.train` that trains a causal LM (e.g. the
    ``LlamaForCausalLM`` of :func:`rxt.baselines.build_baseline`) without memory.

    ``batch(index)`` holds the same dialogues as ``SmatStage(dialogues, tokenizer,
    SmatConfig(batch_size=batch_size), seed=seed).batch(index)`` (:class:`EpochOrder`), and the
    loss is the mean cross-entropy over the same tokens (every answer and its ``[EOS]``), so
    both models get the same data and the same supervised token budget per step. In
    ``"full"`` mode the baseline *reads* more tokens (the history), which is what being
    stateless costs; ``metrics["tokens"]`` reports them.

    ``max_len``: the longest training sequence; ``None`` (default) keeps every dialogue whole
    (size the model's ``max_position_embeddings`` with :attr:`longest`). In ``"full"`` mode an
    over-long dialogue keeps its system prompt and most recent whole turns
    (:func:`rxt.baselines.data.full_sequence`): the dropped turns' answers are not trained on,
    so the budget shrinks; ``metrics["dropped_turns"]`` counts them. In ``"current"`` mode an
    interaction longer than ``max_len`` is an error.
    """

    def __init__(
        self,
        dialogues: Sequence[Dialogue],
        tokenizer: RxTTokenizer,
        mode: Mode,
        batch_size: int = 16,
        seed: int = 0,
        max_len: int | None = None,
        length_groups: int = 1,
    ) -> None:
        check_mode(mode)
        self.config = StatelessConfig(batch_size=batch_size, length_groups=length_groups)
        self.length_groups = length_groups
        if check_type("max_len", max_len, int | None) is not None and max_len < 1:
            raise fail("max_len", f"must be None or an int >= 1, got {max_len!r}")
        # SMAT's stream rule and tag: the same dialogues as SmatStage at every batch index.
        self._stream = DialogueStream(dialogues, seed, tag="smat", what="a stateless stage")
        self.dialogues = self._stream.dialogues
        self.tokenizer = tokenizer
        self.mode = mode
        self.batch_size = batch_size
        self.seed = seed
        self.max_len = max_len
        self.name = f"stateless-{mode}"

    @property
    def varying_calls(self) -> tuple[str, ...]:
        """With length groups, "current" rows are the batch's turns, so the number of groups,
        one call of the Llama each, depends on the batch: FSDP2 then keeps its layers whole
        (:mod:`rxt.training.sharding`). "full" has one row per dialogue: a fixed count."""
        return ("model",) if self.length_groups > 1 and self.mode == "current" else ()

    @property
    def longest(self) -> int:
        """Length of the longest sequence this stage can produce with ``max_len=None``: the
        context a model needs to train on every dialogue whole (a pass over all dialogues)."""
        if self.mode == "full":
            return max(len(full_sequence(self.tokenizer, d).input_ids) for d in self.dialogues)
        return max(
            len(self.tokenizer.encode_interaction(t.query, t.answer).input_ids)
            for d in self.dialogues
            for t in d.turns
        )

    # ------------------------------------------------------------------ data
    def batch(self, index: int) -> StatelessBatch:
        rows = self._stream.rows(index, self.batch_size)  # SmatStage's rows, in its order
        chosen, dialogues = rows.chosen, rows.dialogues
        dropped = 0
        if self.mode == "full":
            rows = [full_sequence(self.tokenizer, d, self.max_len) for d in dialogues]
            dropped = sum(len(d.turns) - len(r.turns) for d, r in zip(dialogues, rows, strict=True))
            seqs, masks = [r.input_ids for r in rows], [r.loss_mask for r in rows]
        else:
            encoded = [self.tokenizer.encode_interaction(q, a, self.max_len) for q, a in rows.pairs]
            seqs, masks = [e.input_ids for e in encoded], [e.loss_mask for e in encoded]
        input_ids, attention_mask = pad_sequences(seqs, pad_id=self.tokenizer.pad_id)
        loss_mask, _ = pad_sequences(masks)
        return StatelessBatch(
            indices=[i for _, i in chosen],
            positions=[p for p, _ in chosen],
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            dropped_turns=dropped,
        )

    # ------------------------------------------------------------------ training
    def trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        return list(model.parameters())

    def loss(
        self, model: nn.Module, batch: StatelessBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        # Unscored targets (prompts, padding) are ignored rather than weighted by 0, so a
        # non-finite logit at a padding position cannot leak into the loss as 0 * inf = nan.
        targets = ids[:, 1:].masked_fill(batch.loss_mask[:, 1:].to(device) == 0, -100)
        tokens = batch.answer_tokens
        total = torch.zeros((), device=device)
        # Rows in groups of similar length, each padded only to its longest (as SMAT does):
        # the same sum, less padding.
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for rows, longest in length_groups(lengths, self.length_groups):
            r = torch.tensor(rows, device=device)
            out = model(
                input_ids=ids[r, :longest], attention_mask=mask[r, :longest], use_cache=False
            )
            logits = out.logits[:, :-1].float()
            total = total + F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[r, : longest - 1].reshape(-1),
                reduction="sum",
            )
        ce = total / max(tokens, 1)
        metrics = {
            "ce": ce.item(),
            "answer_tokens": float(tokens),
            "tokens": float(batch.tokens),
        }
        if self.mode == "full":
            metrics["dropped_turns"] = float(batch.dropped_turns)
        return ce, metrics
