"""Transcripts sent by clients → what RxT needs: a system prompt, past turns, the new query.

Chat clients send the whole conversation every time. RxT needs only the newest user message —
everything before it lives in the Short-Term Memory. :func:`prefix_keys` gives every
turn-aligned prefix of a transcript a content hash, so the server can find the STM stored after
the longest prefix it has already seen and process only what is new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rxt.serve.errors import bad_request
from rxt.serve.settings import Limits

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Transcript:
    """``system`` (or None), completed ``turns`` (user, assistant) and the new ``query``."""

    system: str | None
    turns: list[tuple[str, str]]
    query: str


def content_text(content: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (``text``/``input_text``/...)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text", "output_text") or not isinstance(
                part.get("text"), str
            ):
                raise bad_request(
                    f"content part {i} is not supported: only text parts "
                    "(type 'text', 'input_text' or 'output_text') can be read by this model",
                    param=f"{param}.{i}",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request("content must be a string or a list of text parts", param=param)


def parse_messages(
    messages: Sequence[tuple[str, str]], limits: Limits, param: str = "messages"
) -> Transcript:
    """(role, text) pairs → Transcript. System/developer messages may only lead; consecutive
    messages of one role are joined by a newline; the last message must be the user's."""
    if not messages:
        raise bad_request(f"'{param}' must contain at least one message", param=param)
    if len(messages) > limits.max_messages:
        raise bad_request(
            f"'{param}' has {len(messages)} messages; this server accepts at most "
            f"{limits.max_messages}",
            param=param,
            code="too_many_messages",
        )
    system: list[str] = []
    merged: list[tuple[str, str]] = []
    for i, (role, text) in enumerate(messages):
        if len(text) > limits.max_message_chars:
            raise bad_request(
                f"message {i} has {len(text)} characters; the limit is {limits.max_message_chars}",
                param=f"{param}.{i}.content",
                code="message_too_long",
            )
        if role in SYSTEM_ROLES:
            if merged:
                raise bad_request(
                    f"message {i}: a {role} message must come before every user and assistant "
                    "message (RxT encodes instructions into memory when a conversation starts)",
                    param=f"{param}.{i}.role",
                )
            system.append(text)
        elif role in ("user", "assistant"):
            if merged and merged[-1][0] == role:
                merged[-1] = (role, merged[-1][1] + "\n" + text)
            else:
                merged.append((role, text))
        else:
            raise bad_request(
                f"message {i}: role {role!r} is not supported (system, developer, user, assistant)",
                param=f"{param}.{i}.role",
            )
    if not merged or merged[-1][0] != "user":
        raise bad_request("the last message must be from the user", param=param)
    if merged[0][0] == "assistant":
        merged.insert(0, ("user", ""))  # an opening greeting answers an empty query
    turns = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]
    return Transcript("\n".join(system) if system else None, turns, merged[-1][1])


def prefix_keys(system: str | None, turns: Iterable[tuple[str, str]]) -> list[str]:
    """Key ``k`` names the transcript up to and including turn ``k`` (key 0: the system prompt
    alone). A hash chain, so computing every prefix costs one pass over the transcript."""
    h = hashlib.sha256(b"rxt-chat-prefix/1\0" + json.dumps(system).encode()).hexdigest()
    keys = ["chat:" + h]
    for user, assistant in turns:
        keys.append(next_prefix_key(keys[-1], user, assistant))
    return keys


def next_prefix_key(key: str, user: str, assistant: str) -> str:
    """The key of the transcript named by ``key`` followed by one more turn."""
    previous = bytes.fromhex(key.removeprefix("chat:"))
    return "chat:" + hashlib.sha256(previous + json.dumps([user, assistant]).encode()).hexdigest()
