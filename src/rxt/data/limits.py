"""The size limits every real-text corpus converter applies: turns per dialogue, characters per
message. Shared by :mod:`rxt.data.shakespeare` and :mod:`rxt.data.chitchat`, so both clip alike."""

from __future__ import annotations


def check_limits(max_turns: int, max_chars: int) -> None:
    for name, value in (("max_turns", max_turns), ("max_chars", max_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` at a word boundary (inside a word only if its
    first word is longer); no marker is added, so the result is still real text."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()
