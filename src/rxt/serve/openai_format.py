"""The objects and stream events the OpenAI API returns, built from a finished turn."""

from __future__ import annotations

import json
import secrets
from typing import Any

FINISH = {"eos": "stop", "length": "length", "cancelled": "stop"}


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


# ------------------------------------------------------------------------------- chat completions
# No input token is ever served from a cache, nor written to one: the history lives in the STM,
# which is not a token cache, and every token of the new message is read afresh. Hence 0.
def chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def chat_completion(
    cid: str, model: str, created: int, text: str, finish: str, usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": FINISH.get(finish, "stop"),
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def chat_chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": FINISH.get(finish, "stop") if finish else None,
                "logprobs": None,
            }
        ]
        if choices
        else [],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


# ------------------------------------------------------------------------------- responses
def output_message(msg_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """The answer as an output item: ``in_progress`` (no content yet, as first streamed),
    ``completed``, or ``incomplete`` (cut at ``max_output_tokens``, its text kept)."""
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": msg_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if status == "in_progress" else content,
    }


def response_usage(usage: dict[str, int]) -> dict[str, Any]:
    """A turn's ``{input_tokens, output_tokens}`` as the Responses API's usage object."""
    return {
        "input_tokens": usage["input_tokens"],
        # Both 0, as in chat_usage: nothing is read from or written to a prompt cache.
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["input_tokens"] + usage["output_tokens"],
    }


def response_object(
    rid: str,
    *,
    model: str,
    created: int,
    status: str,
    text: str | None,
    finish: str | None,
    usage: dict[str, int] | None,
    previous_response_id: str | None,
    conversation_id: str | None,
    instructions: str | None,
    metadata: dict[str, str] | None,
    store: bool,
    temperature: float | None,
    top_p: float | None,
    max_output_tokens: int | None,
) -> dict[str, Any]:
    incomplete = status == "completed" and finish == "length"
    item_status = "incomplete" if incomplete else "completed"
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "model": model,
        "output": [] if text is None else [output_message("msg_" + rid[5:], text, item_status)],
        "parallel_tool_calls": False,
        "previous_response_id": previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "store": store,  # OpenAI sends it, though the openai package's type does not declare it
        "temperature": temperature,
        "top_p": top_p,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": metadata or {},
        "usage": None if usage is None else response_usage(usage),
    }


def message_item(item_id: str, role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    part: dict[str, Any] = {"type": kind, "text": text}
    if role == "assistant":
        part["annotations"] = []
    return {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": role,
        "content": [part],
    }
