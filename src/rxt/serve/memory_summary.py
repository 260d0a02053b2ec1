"""What one stored memory looks like, for people and pages — a summary, never the state itself.

``GET /v1/conversations/{id}/memory`` answers with :func:`summarise`: for one stored version of
a conversation, the L2 norm of every memory slot ``‖STM_v[l, s]‖`` and of its change at the
update that wrote it ``‖STM_v[l, s] − STM_{v−1}[l, s]‖`` (an ``L × S`` heat map each; the
``d`` numbers of a slot are not handed out), the model's fingerprint and ``(L, S, d)``, and
when that turn's memory update ran (:meth:`rxt.serve.turn.ActiveTurn.stored_turn`). The state
itself is exported only by ``GET /v1/conversations/{id}/state``.

The stateless comparison (:func:`prompt_tokens`, ``?stateless=true``) counts, for every turn up
to that version, the prompt tokens RxT read — the new message ``[BOS][Q] q_t [A]``, its
``usage.input_tokens`` — beside the prompt a stateless chat model re-reads for the same
answer: the system prompt ``[BOS] s [EOS]``, every earlier interaction
``[BOS][Q] q_i [A] a_i [EOS]`` and the new message. That is the full-history baseline's
prompt (``rxt.baselines.data.reply_prompts``, mode ``"full"``) with no context limit,
tokenised by this model's tokenizer. Earlier answers are counted by re-encoding their stored
text, as a client resending the transcript would send it. A turn encoded from a resent
transcript was not answered here (``rxt`` is null); after an imported state the transcript
before it is unknown (``stateless`` is null from there on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rxt.serve.errors import APIError

if TYPE_CHECKING:
    from rxt.serve.service import TurnService
    from rxt.serve.store import ConversationInfo
    from rxt.tokenizer import RxTTokenizer

__all__ = ["prompt_tokens", "summarise"]

_DIGITS = 5  # enough for a heat map; keeps a paper-nano summary (6 × 256 × 2 numbers) small


def summarise(
    service: TurnService, owner: str, info: ConversationInfo, version: int, stateless: bool
) -> dict[str, Any]:
    """The summary of ``version`` (0: the state before the first turn) of a conversation that
    ``owner`` holds. Blocking (loads states, may wait for a system prompt's encoding): run it
    in the service's pool."""
    cid, meta = info.conversation_id, info.metadata
    stm = _stm(service.load(owner, cid, version, meta))
    turn = (service.store.get_turn(owner, cid, version) if version > 0 else None) or {}
    previous = None
    # An imported memory did not come from the state before it: no change to show.
    if version > 0 and not turn.get("imported"):
        try:
            previous = _stm(service.load(owner, cid, version - 1, meta))
        except APIError:  # pruned by keep_versions, or a fork whose parent was deleted
            previous = None
    body: dict[str, Any] = {
        "object": "conversation.memory",
        "conversation_id": cid,
        "version": version,
        "latest_version": info.latest_version,
        "turn": turn.get("turn", 0),
        "response_id": turn.get("response_id"),
        "fingerprint": service.engine.fingerprint,
        "shape": list(stm.shape),
        "slot_norms": _table(stm.norm(dim=-1)),
        "change_norms": None if previous is None else _table((stm - previous).norm(dim=-1)),
        "memory_update": turn.get("memory_update"),
    }
    if stateless:
        history = service.history(owner, cid)
        # The conversation's own turns after ``version`` are the last ones of its history.
        history = history[: len(history) - (info.latest_version - version)]
        body["prompt_tokens"] = prompt_tokens(service.engine.tokenizer, meta.get("system"), history)
    return body


def prompt_tokens(
    tokenizer: RxTTokenizer, system: str | None, turns: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per stored turn: ``{"turn", "rxt", "stateless"}`` prompt tokens (module docstring)."""
    rows: list[dict[str, Any]] = []
    history: int | None = len(tokenizer.encode_system(system)) if system else 0
    for turn in turns:
        if turn.get("imported"):
            history = None  # the memory came from a file: what it had read is unknown
            continue
        query = len(tokenizer.encode_query(turn.get("user", "")))
        usage = turn.get("usage") or {}
        rows.append(
            {
                "turn": turn.get("turn"),
                "rxt": usage.get("input_tokens"),  # absent for a replayed turn: not answered
                "stateless": None if history is None else history + query,
            }
        )
        if history is not None:
            answer = turn.get("assistant", "")
            history += len(tokenizer.encode_interaction(turn.get("user", ""), answer).input_ids)
    return rows


def _stm(conversation) -> torch.Tensor:
    """(L, S, d) in float32 (a half-precision model's memory is summarised exactly alike)."""
    return conversation.stm[0].detach().float().cpu()


def _table(values: torch.Tensor) -> list[list[float]]:
    return [[round(v, _DIGITS) for v in row] for row in values.tolist()]
