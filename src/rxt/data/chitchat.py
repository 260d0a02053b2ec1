"""The Chit Chat Challenge corpus as multi-turn dialogues: casual conversation between people.

The text comes from ``chitchat-dataset`` on PyPI (MIT, BYU Perception, Control and Cognition
lab), whose wheel ships ``chitchat_dataset/dataset.json``: 7,168 conversations, 258,145 lines.
Install it with ``python -m pip install chitchat-dataset`` (it is in the ``data`` and ``test``
extras). Nothing of the package is imported: :func:`dataset_path` only locates that file, and
``RXT_CHITCHAT_JSON=/some/dataset.json`` points at a copy instead.

The file is one JSON object, conversation id → record::

    {"messages": [[{"text": str, "sender": str, "timestamp": str}, ...], ...],
     "prompt": str (the topic suggested to the pair), "start": str, "ratings": {...}}

A message is the lines one person sent in a row. Conversations to dialogues, by the rule the
Shakespeare corpus follows (:mod:`rxt.data.shakespeare`):

* A message's text is its lines joined by a space, whitespace runs collapsed; blank lines are
  left out, a message with none is dropped, and consecutive messages of one sender are merged.
* Each message answers the one before it: turn k is (message 2k, message 2k+1), so no message
  is used twice, and in a conversation of two people (every one in the corpus) the one who
  wrote first asks every query. With more people the rule is the same; ``meta["speakers"]``
  records who asked and who answered each turn, as indices in order of first appearance. A
  last message nobody answered (an odd count) is dropped, so a conversation of fewer than two
  messages — 3,150 of them, one person waiting alone — gives no dialogue.
* A conversation longer than ``max_turns`` turns is cut into consecutive dialogues
  ``f"{id}-{k}"``; a message longer than ``max_chars`` is cut at a word boundary
  (:func:`rxt.data.limits.truncate`; one message is 95,440 characters).

Held-out split (:func:`split_chitchat`): by conversation, never by dialogue, so the parts of
one conversation are never on both sides. A conversation's split is a function of the seed and
its own text only — ``sha256(seed, its turns as converted)`` read as a number in [0, 1),
compared with the fractions — so it depends neither on the order of the input nor on the
other conversations, and identical conversations (the corpus holds a few, such as "Hello?" /
"hi") share a split.

A record not of this shape raises :class:`~rxt.data.dialogue.DataError` naming the
conversation and the field (``chitchat conversation 'a07e…': messages[3][0].text: must be a
string, got int``); ``on_error="skip"`` leaves it out and adds the message to ``report``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rxt.data.dialogue import DataError, Dialogue, OnError, Turn
from rxt.data.limits import check_limits, truncate

__all__ = [
    "ENV_VAR",
    "INSTALL_COMMAND",
    "CorpusMissing",
    "chitchat_dialogues",
    "conversation_dialogues",
    "corpus_available",
    "dataset_path",
    "load_conversations",
    "split_chitchat",
]

INSTALL_COMMAND = "python -m pip install chitchat-dataset"
ENV_VAR = "RXT_CHITCHAT_JSON"
SPLITS = ("train", "valid", "test")


class CorpusMissing(RuntimeError):
    """The corpus is not installed; the message gives the pip command."""


# --------------------------------------------------------------------------- the file


def dataset_path() -> Path:
    """``$RXT_CHITCHAT_JSON`` if set, else the installed package's ``dataset.json``."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        raise CorpusMissing(f"{ENV_VAR}={override!r} is not a file; unset it to use the package")
    try:  # find_spec locates the package without importing it
        spec = importlib.util.find_spec("chitchat_dataset")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "dataset.json"
        if path.is_file():
            return path
    raise CorpusMissing(
        f"the Chit Chat corpus is not installed: run `{INSTALL_COMMAND}`, or set {ENV_VAR} "
        "to a copy of its dataset.json"
    )


def corpus_available() -> bool:
    try:
        dataset_path()
    except CorpusMissing:
        return False
    return True


def load_conversations(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The file's conversations, id → record, in file order (records are checked later)."""
    path = Path(path) if path is not None else dataset_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a UTF-8 JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: must be a JSON object of conversations, got {_kind(data)}")
    return data


# --------------------------------------------------------------------------- conversations


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages(record: Any, where: str) -> list[tuple[str, str]]:
    """(sender, text) of each message, blank ones dropped and one sender's run merged."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object, got {_kind(record)}")
    if "messages" not in record:
        raise DataError(f"{where}: messages: missing")
    raw = record["messages"]
    if not isinstance(raw, list):
        raise DataError(f"{where}: messages: must be a list, got {_kind(raw)}")
    out: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, list):
            raise DataError(
                f"{where}: messages[{i}]: must be a list of lines, got {_kind(message)}"
            )
        senders, lines = set(), []
        for j, line in enumerate(message):
            field = f"messages[{i}][{j}]"
            if not isinstance(line, dict):
                raise DataError(f"{where}: {field}: must be an object, got {_kind(line)}")
            for key in ("text", "sender"):
                if key not in line:
                    raise DataError(f"{where}: {field}.{key}: missing")
                if not isinstance(line[key], str):
                    raise DataError(
                        f"{where}: {field}.{key}: must be a string, got {_kind(line[key])}"
                    )
            senders.add(line["sender"])
            lines.extend(line["text"].split())
        if len(senders) > 1:
            raise DataError(f"{where}: messages[{i}]: lines from {len(senders)} senders")
        if not lines:
            continue  # blank lines only: nothing was said
        sender, text = senders.pop(), " ".join(lines)
        if out and out[-1][0] == sender:
            out[-1] = (sender, f"{out[-1][1]} {text}")
        else:
            out.append((sender, text))
    return out


def conversation_dialogues(
    conversation_id: str, record: Any, *, max_turns: int = 8, max_chars: int = 300
) -> list[Dialogue]:
    """The dialogues of one conversation record (module docstring); DataError if malformed."""
    check_limits(max_turns, max_chars)
    where = f"chitchat conversation {conversation_id!r}"
    messages = _messages(record, where)
    speakers: dict[str, int] = {}
    for sender, _ in messages:
        speakers.setdefault(sender, len(speakers))
    pairs = [(messages[i], messages[i + 1]) for i in range(0, len(messages) - 1, 2)]
    prompt = record.get("prompt")
    dialogues = []
    for part, start in enumerate(range(0, len(pairs), max_turns)):
        chunk = pairs[start : start + max_turns]
        turns = tuple(
            Turn(truncate(q, max_chars), truncate(a, max_chars)) for (_, q), (_, a) in chunk
        )
        meta = {
            "source": "chitchat",
            "conversation": conversation_id,
            "part": part,
            "prompt": prompt if isinstance(prompt, str) else None,
            "speakers": [[speakers[qs], speakers[as_]] for (qs, _), (as_, _) in chunk],
        }
        dialogues.append(Dialogue(f"{conversation_id}-{part}", turns, meta=meta))
    return dialogues


def chitchat_dialogues(
    conversations: Mapping[str, Any] | None = None,
    *,
    max_turns: int = 8,
    max_chars: int = 300,
    on_error: OnError = "raise",
    report: list[str] | None = None,
) -> list[Dialogue]:
    """The dialogues of ``conversations`` (default: the installed corpus), in their order."""
    check_limits(max_turns, max_chars)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if conversations is None:
        conversations = load_conversations()
    out: list[Dialogue] = []
    for conversation_id, record in conversations.items():
        try:
            out.extend(
                conversation_dialogues(
                    conversation_id, record, max_turns=max_turns, max_chars=max_chars
                )
            )
        except DataError as exc:
            if on_error == "raise":
                raise
            if report is not None:
                report.append(str(exc))
    return out


# --------------------------------------------------------------------------- the split


def split_chitchat(
    dialogues: Iterable[Dialogue],
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, list[Dialogue]]:
    """``{"train", "valid", "test"}`` by conversation (module docstring); each split keeps the
    input order. The fractions are expected shares of conversations, not exact counts."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"{name}: must be a number in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError("valid_fraction + test_fraction must leave room for training (< 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    dialogues = list(dialogues)
    parts: dict[str, list] = {}
    for dialogue in dialogues:
        conversation = dialogue.meta.get("conversation")
        if not isinstance(conversation, str):
            raise ValueError(f"dialogue {dialogue.id!r} has no meta['conversation']")
        turns = [[t.query, t.answer] for t in dialogue.turns]
        parts.setdefault(conversation, []).append((dialogue.meta.get("part", 0), turns))
    where = {
        c: _split(seed, [turns for _, turns in sorted(found)], valid_fraction, test_fraction)
        for c, found in parts.items()
    }
    splits: dict[str, list[Dialogue]] = {name: [] for name in SPLITS}
    for dialogue in dialogues:
        splits[where[dialogue.meta["conversation"]]].append(dialogue)
    return splits


def _split(seed: int, turns: list, valid_fraction: float, test_fraction: float) -> str:
    content = json.dumps([seed, turns], ensure_ascii=False, separators=(",", ":"))
    draw = int.from_bytes(hashlib.sha256(content.encode("utf-8")).digest(), "big") / 2**256
    if draw < test_fraction:
        return "test"
    return "valid" if draw < test_fraction + valid_fraction else "train"
