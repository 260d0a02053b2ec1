"""Typed settings of the server: where state lives, who may call, and the request limits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a violation is answered 400 (or 413 for the body) naming the limit.

    Only the newest message reaches the decoder (earlier turns live in memory or are replayed
    into it), so ``max_message_chars`` bounds one message, not the transcript."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 1024
    max_message_chars: int = 32_768
    max_output_tokens: int | None = None  # None: whatever the model's max_seq_len leaves

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_message_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}")


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``rxt serve`` configures besides host and port."""

    model_name: str = "rxt"
    store_url: str = "rxt-state.db"
    ttl_seconds: float | None = None  # drop conversations idle longer than this
    keep_versions: int | None = None  # keep only the newest N states of each conversation
    max_batch_size: int = 32
    commit_wait_s: float = 10.0  # how long a turn waits for another process's pending commit
    default_max_tokens: int = 256
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.commit_wait_s < 0:
            raise ValueError(f"commit_wait_s must be >= 0, got {self.commit_wait_s}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
