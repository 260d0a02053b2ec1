"""Greedy generation of one answer from a query and an STM (paper §4, steps 1–2).

This is the minimal synchronous reference loop: memory K/V projected once, the prompt prefilled,
then one cached step per token with no host sync other than the end-of-answer check. The event-
driven engine (streaming, sampling, batching, asynchronous memory update) builds on the same
model calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import pad_sequences


def _check_budget(model: ReactiveTransformer, prompt_ids: torch.Tensor, max_new_tokens: int):
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be (1, T), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.config.max_seq_len - prompt_ids.shape[1]
    if max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit: the prompt has "
            f"{prompt_ids.shape[1]} tokens and max_seq_len is {model.config.max_seq_len}"
        )


def iter_greedy(
    model: ReactiveTransformer,
    prompt_ids: torch.Tensor,
    stm: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
) -> Iterator[int]:
    """Yield answer token ids one at a time (the first right after the prefill), stopping
    after ``eos_id`` or ``max_new_tokens``. Validation happens before the first token."""
    _check_budget(model, prompt_ids, max_new_tokens)
    return _greedy_tokens(model, prompt_ids, stm, max_new_tokens, eos_id)


@torch.no_grad()
def _greedy_tokens(model, prompt_ids, stm, max_new_tokens, eos_id) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    memory = model.memory_kv(stm)
    cache = model.new_kv_cache(1, capacity=prompt_ids.shape[1] + max_new_tokens)
    logits = model.decode(prompt_ids, memory_kv=memory, kv_cache=cache, last_only=True)
    for step in range(1, max_new_tokens + 1):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        token_id = int(token)
        yield token_id
        if token_id == eos_id or step == max_new_tokens:
            return
        logits = model.decode(
            token, memory_kv=memory, kv_cache=cache, last_only=True, check_inputs=False
        )


@torch.no_grad()
def greedy_answer(
    model: ReactiveTransformer,
    prompt_ids: torch.Tensor,
    stm: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    use_cache: bool = True,
) -> list[int]:
    """Answer token ids (ending with ``eos_id`` if produced) for ``prompt_ids: (1, T)``.

    ``use_cache=False`` recomputes the whole turn at every step; it exists so tests can check
    that cached decoding gives the same answer.
    """
    if use_cache:
        return list(
            iter_greedy(model, prompt_ids, stm, max_new_tokens=max_new_tokens, eos_id=eos_id)
        )
    _check_budget(model, prompt_ids, max_new_tokens)
    memory = model.memory_kv(stm)
    answer: list[int] = []
    ids = prompt_ids
    for _ in range(max_new_tokens):
        token = model.decode(ids, memory_kv=memory, last_only=True)[:, -1].argmax(-1)
        answer.append(int(token))
        if answer[-1] == eos_id:
            break
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return answer


@torch.no_grad()
def greedy_batch(
    model: ReactiveTransformer,
    prompts: Sequence[Sequence[int]],
    stm: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
) -> list[list[int]]:
    """Greedy answers for a batch of prompts, row b reading memory ``stm[b]``.

    Prompts are left-padded (attention mask, positions following the mask) and decoded with one
    KV cache. Each row's answer stops after ``eos_id`` (included, as in
    :func:`rxt.engine.greedy.greedy_answer`) or ``max_new_tokens`` tokens; the loop ends when every
    row has stopped.
    """
    b = len(prompts)
    if b == 0:
        return []
    if stm.shape[0] != b:
        raise ValueError(f"stm has {stm.shape[0]} rows for {b} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    width = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt")
    limit = model.config.max_seq_len
    if width + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {width} tokens plus max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_len={limit}"
        )
    device = model.device
    ids, mask = pad_sequences(prompts, left=True)
    ids, mask = ids.to(device), mask.to(device)

    memory = model.memory_kv(stm)
    cache = model.new_kv_cache(b, capacity=width + max_new_tokens)
    logits = model.decode(
        ids, memory_kv=memory, kv_cache=cache, attention_mask=mask, last_only=True
    )
    steps = []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ones = torch.ones((b, 1), dtype=mask.dtype, device=device)
    for step in range(1, max_new_tokens + 1):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        steps.append(token)
        done |= token.squeeze(1) == eos_id
        if step == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        logits = model.decode(
            token,
            memory_kv=memory,
            kv_cache=cache,
            attention_mask=mask,
            last_only=True,
            check_inputs=False,
        )
    answers = []
    for row in torch.cat(steps, dim=1).tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        answers.append(row)
    return answers
