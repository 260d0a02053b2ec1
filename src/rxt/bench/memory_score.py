"""One exact-match rule for every system of the state-bytes benchmark.

A probe is recalled when greedy decoding would produce its gold answer exactly. Greedy decoding
yields the gold tokens if and only if, at every answer position, the gold prefix's argmax is the
gold token, so the rule is computed teacher forced, in one forward pass, for every system alike:

* a whole-turn probe (:class:`~rxt.data.dialogue.Probe`) is correct when every answer token of
  its turn *and* the closing ``[EOS]`` is the argmax (the answer ends where the gold one does);
* a single-sequence MQAR target (``meta["targets"]``: ``[word, distance, value]``) is correct
  when the value's token, the answer's ``word``-th (one token per word), is the argmax right
  after its key — Zoology's per-query accuracy.

Peers read each test dialogue as one sequence (:func:`rxt.baselines.data.full_sequence`): for a
recurrent model that *is* carrying its state from turn to turn, for the attention models it is
their cache. RxT reads turn t from STM_{t-1}, the memory following the gold history
(``STM_t = update_memory(STM_{t-1}, gold interaction t)``), with STM_0 drawn per dialogue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from rxt.baselines.data import encode_turns
from rxt.data.dialogue import Dialogue
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer, pad_sequences

__all__ = ["score_dialogues", "summarise"]

_EVAL_STM_SEED = 10_007  # STM_0 of test dialogues: a stream of its own, apart from training


def _correct(logits: torch.Tensor, ids: Sequence[int], loss_mask: Sequence[int]) -> list[bool]:
    """Per scored position of one interaction (answer tokens, then [EOS]): argmax == gold."""
    ids_t = torch.tensor(ids)
    keep = torch.tensor(loss_mask[1:], dtype=torch.bool)
    return (logits[:-1].argmax(-1) == ids_t[1:])[keep].tolist()


def _items(dialogue: Dialogue, hits: list[list[bool]]) -> list[dict]:
    """Scored items of one dialogue from its per-turn answer-position hits."""
    out = []
    targets = dialogue.meta.get("targets")
    if targets:
        for word, distance, _ in targets:
            out.append({"correct": bool(hits[0][word]), "distance": int(distance)})
        return out
    loads = dialogue.meta.get("pairs_before")
    for j, probe in enumerate(dialogue.probes):
        item = {"correct": all(hits[probe.turn]), "distance": probe.distance}
        if loads is not None:
            item["load"] = loads[j]
        out.append(item)
    return out


@torch.inference_mode()
def _score_peer(model: nn.Module, tokenizer: RxTTokenizer, dialogues, batch_size: int):
    encoded = [encode_turns(tokenizer, d) for d in dialogues]
    lengths = [sum(len(e.input_ids) for e in turns) for turns in encoded]
    order = sorted(range(len(dialogues)), key=lambda i: lengths[i])
    hits: dict[int, list[list[bool]]] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [[i for e in encoded[k] for i in e.input_ids] for k in chunk]
        ids, mask = pad_sequences(rows, pad_id=tokenizer.pad_id)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        for row, k in enumerate(chunk):
            offset, per_turn = 0, []
            for e in encoded[k]:
                n = len(e.input_ids)
                per_turn.append(
                    _correct(logits[row, offset : offset + n], e.input_ids, e.loss_mask)
                )
                offset += n
            hits[k] = per_turn
    return [hits[k] for k in range(len(dialogues))]


@torch.inference_mode()
def _score_rxt(model: ReactiveTransformer, tokenizer: RxTTokenizer, dialogues, batch_size: int):
    from rxt.training.stages.smat import initial_stm

    hits: list[list[list[bool]]] = [[] for _ in dialogues]
    order = sorted(range(len(dialogues)), key=lambda i: -len(dialogues[i].turns))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        stm = initial_stm(model, _EVAL_STM_SEED, chunk)
        turns = len(dialogues[chunk[0]].turns)  # the longest: sorted
        for t in range(turns):
            rows = [k for k in chunk if len(dialogues[k].turns) > t]  # a prefix: sorted
            encoded = [tokenizer.encode_interaction(*_pair(dialogues[k], t)) for k in rows]
            ids, mask = pad_sequences([e.input_ids for e in encoded], pad_id=tokenizer.pad_id)
            stm = stm[: len(rows)]
            logits = model.decode(ids, stm, attention_mask=mask).float()
            for row, (k, e) in enumerate(zip(rows, encoded, strict=True)):
                n = len(e.input_ids)
                hits[k].append(_correct(logits[row, :n], e.input_ids, e.loss_mask))
            if t + 1 < turns:  # no turn reads the memory after the last
                stm = model.update_memory(stm, ids, mask)
    return hits


def _pair(dialogue: Dialogue, t: int) -> tuple[str, str]:
    turn = dialogue.turns[t]
    return turn.query, turn.answer


def score_dialogues(
    model: nn.Module,
    tokenizer: RxTTokenizer,
    dialogues: Sequence[Dialogue],
    *,
    batch_size: int = 16,
) -> list[dict]:
    """Every scored item of ``dialogues``: ``{"correct", "distance"[, "load"]}`` (module
    docstring). The model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, ReactiveTransformer):
            hits = _score_rxt(model, tokenizer, dialogues, batch_size)
        else:
            hits = _score_peer(model, tokenizer, dialogues, batch_size)
    finally:
        model.train(was_training)
    return [item for d, h in zip(dialogues, hits, strict=True) for item in _items(d, h)]


def summarise(items: Sequence[dict]) -> dict:
    """Recall overall, by distance and by load (pairs stated before the question)."""

    def rate(group: list[dict]) -> float:
        return sum(i["correct"] for i in group) / len(group) if group else float("nan")

    out: dict = {"recall": rate(list(items)), "items": len(items)}
    for field in ("distance", "load"):
        groups: dict[int, list[dict]] = defaultdict(list)
        for item in items:
            if field in item:
                groups[item[field]].append(item)
        if groups:
            out[f"recall_by_{field}"] = {k: rate(groups[k]) for k in sorted(groups)}
            out[f"items_by_{field}"] = {k: len(groups[k]) for k in sorted(groups)}
    return out
