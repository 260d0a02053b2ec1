"""Evaluation of a stateless baseline with RxT's protocol (:mod:`rxt.eval.recall`).

The same dialogues, the same scores, the same :class:`rxt.eval.recall.RecallReport`:

- teacher forced with the **gold** history, the NLL and next-token argmax accuracy of every
  turn's answer tokens and closing ``[EOS]`` (the tokenizer's ``loss_mask``), pooled over all
  turns (:func:`rxt.baselines.data.scored_rows`);
- at a probe's turn, greedy generation (up to ``max_new_tokens``, stopping after ``[EOS]``) from
  the prompt of :func:`rxt.baselines.data.reply_prompts`, ``"full"``: system prompt + gold
  history + ``[BOS][Q] query [A]``; ``"current"``: ``[BOS][Q] query [A]`` only. The decoded,
  stripped text must equal the stripped ``Probe.answer`` exactly, scored and pooled by distance
  and by kind with recall.py's own :class:`rxt.eval.recall.ProbeTally`.

The context limit is ``model.config.max_position_embeddings`` unless ``max_len`` is given:
longer histories keep their most recent whole turns (rxt.baselines.data).

Batching: rows (teacher-forced sequences, or prompts) are sorted by length and run
``batch_size`` at a time, right-padded for scoring, left-padded with an attention mask for
generation (a KV-cached greedy loop, :func:`greedy_replies`, positions following the mask).
Results equal ``batch_size=1`` up to floating-point summation order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from rxt.baselines.data import Mode, check_mode, reply_prompts, scored_rows
from rxt.data.dialogue import Dialogue
from rxt.eval.recall import ProbeTally, RecallReport, check_eval_args
from rxt.tokenizer import RxTTokenizer, pad_sequences

__all__ = ["evaluate_stateless", "greedy_replies"]


def _check(model, tokenizer, dialogues, mode, batch_size, max_new_tokens, max_len):
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    check_mode(mode)
    dialogues = check_eval_args(tokenizer, dialogues, batch_size, max_new_tokens)
    if max_len is None:
        max_len = model.config.max_position_embeddings
    return dialogues, max_len


def _chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable), cut into runs of ``batch_size``: little padding."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def greedy_replies(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy reply ids for each prompt, ending with ``eos_id`` if produced (as
    :func:`rxt.engine.greedy.greedy_batch`), ``max_new_tokens`` at most.

    A KV-cached argmax loop over left-padded batches (positions follow the attention mask, so a
    padded row sees the positions it would see alone). Written out rather than calling
    ``model.generate`` because ``generate`` fills every option left unset from the model's own
    ``generation_config`` (a loaded checkpoint's repetition penalty, banned words, minimum
    length, ...), which would silently change what "greedy" means from model to model.
    """
    device = next(model.parameters()).device
    # transformers renamed the cache argument (past_key_values -> cache); the cache object is
    # updated in place, so passing it under the right name is all that differs.
    forward_args = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in forward_args else "past_key_values"
    replies: list[list[int]] = [[] for _ in prompts]
    for chunk in _chunks([len(p) for p in prompts], batch_size):
        ids, mask = pad_sequences([prompts[k] for k in chunk], left=True, pad_id=pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = {cache_arg: DynamicCache(config=model.config)}
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache,
        )
        position = positions[:, -1:]
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        ones = torch.ones((len(chunk), 1), dtype=mask.dtype, device=device)
        steps = []
        for step in range(1, max_new_tokens + 1):
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps.append(token)
            done |= token.squeeze(1) == eos_id
            if step == max_new_tokens or bool(done.all()):
                break
            mask = torch.cat([mask, ones], dim=1)
            position = position + 1
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                **cache,
            )
        for k, row in zip(chunk, torch.cat(steps, dim=1).tolist(), strict=True):
            replies[k] = row[: row.index(eos_id) + 1] if eos_id in row else row
    return replies


def _reply_text(tokenizer: RxTTokenizer, ids: Sequence[int]) -> str:
    """recall.py's normalisation: special tokens skipped, surrounding whitespace stripped."""
    return tokenizer.decode(ids).strip()


def evaluate_stateless(
    model: PreTrainedModel,
    tokenizer: RxTTokenizer,
    dialogues: Sequence[Dialogue],
    mode: Mode,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    max_len: int | None = None,
    replies: bool = False,
) -> RecallReport:
    """Score ``dialogues`` teacher forced (module docstring); the stateless counterpart of
    :func:`rxt.eval.recall.evaluate_dialogues`. ``replies=True`` also generates at every turn
    (not only probe turns) and returns the texts as ``report.replies[i][t]``, as
    ``evaluate_dialogues`` does; probes are scored on the same generations. Runs in eval mode
    under ``torch.inference_mode()`` (the model's training flag is restored afterwards)."""
    dialogues, max_len = _check(
        model, tokenizer, dialogues, mode, batch_size, max_new_tokens, max_len
    )
    rows = [row for d in dialogues for row in scored_rows(tokenizer, d, mode, max_len)]
    # One generation per (dialogue, turn) with a probe (every turn with `replies`); several
    # probes of a turn share it.
    asked: list[tuple[int, int]] = []
    prompts: list[list[int]] = []
    for i, d in enumerate(dialogues):
        turns = range(len(d.turns)) if replies else sorted({p.turn for p in d.probes})
        asked += [(i, t) for t in turns]
        prompts += reply_prompts(
            tokenizer, d, mode, turns, max_len=max_len, max_new_tokens=max_new_tokens
        )

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        with torch.inference_mode():
            for chunk in _chunks([len(r.input_ids) for r in rows], batch_size):
                ids, mask = pad_sequences(
                    [rows[k].input_ids for k in chunk], pad_id=tokenizer.pad_id
                )
                scored, _ = pad_sequences([rows[k].loss_mask for k in chunk])
                ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                # Only the scored positions: a (tokens, vocab) softmax instead of (rows, T, vocab).
                keep = scored[:, 1:].bool()
                picked = logits[:, :-1][keep].float()
                targets = ids[:, 1:][keep]
                token_nll = F.cross_entropy(picked, targets, reduction="none")
                nll += token_nll.double().sum()
                correct += (picked.argmax(dim=-1) == targets).double().sum()
                tokens += int(keep.sum())
            answers = greedy_replies(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                batch_size=batch_size,
            )
    finally:
        model.train(was_training)

    tally = ProbeTally()
    texts: dict[tuple[int, int], str] = {}
    for (i, t), answer_ids in zip(asked, answers, strict=True):
        text = texts[i, t] = _reply_text(tokenizer, answer_ids)
        for probe in dialogues[i].probes:
            if probe.turn == t:
                tally.add(probe, text)

    # RecallReport exactly as evaluate_dialogues builds it. `replies` is passed only when asked
    # for, so this also runs against a RecallReport without that field.
    extra = {}
    if replies:
        extra["replies"] = [
            [texts[i, t] for t in range(len(d.turns))] for i, d in enumerate(dialogues)
        ]
    mean_nll = nll.item() / tokens
    return RecallReport(
        **tally.scores(),
        perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,
        accuracy=correct.item() / tokens,
        **extra,
    )
