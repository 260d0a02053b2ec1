"""Request bodies of the OpenAI-compatible endpoints (pydantic; published in /openapi.json).

Fields the OpenAI API defines but this server cannot honour are accepted at their neutral value
and refused otherwise, with the field named; fields it does not know are ignored, as OpenAI
clients send ever more of them. Extensions: ``conversation_id`` (chat), ``top_k`` and
``repetition_penalty``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

Text = str | list[dict[str, Any]] | None
# OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=64)],
        Annotated[str, StringConstraints(max_length=512)],
    ],
    Field(max_length=16),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        # JSON may carry lone UTF-16 surrogates ("\ud800"), which are not text: refused here
        # with the field named, instead of failing in the tokenizer or the store.
        _check_text(data, [])
        return data


def _check_text(value: Any, path: list) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = ".".join(map(str, path)) or "body"
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            _check_text(item, [*path, key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, [*path, i])


class ChatMessage(_Body):
    role: str = Field(max_length=64)
    content: Text = None
    name: str | None = Field(default=None, max_length=256)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str = Field(max_length=256)
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    conversation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=r"^[!-~]+$",  # visible ASCII: it is echoed in a response header
        description="rxt extension: continue this server-side conversation (created if new)",
    )

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value:
            raise ValueError("stop sequences are not supported by this server")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("only 0 is supported; use repetition_penalty (rxt extension)")
        return value


class ConversationRef(_Body):
    id: str = Field(min_length=1, max_length=256)


class ResponseRequest(_Body):
    model: str | None = Field(default=None, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    metadata: Metadata | None = None

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation


class ConversationCreate(_Body):
    items: list[dict[str, Any]] | None = None
    metadata: Metadata | None = None
