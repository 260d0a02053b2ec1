"""Dialogues on disk: the JSONL conversation format, its validation and a Hugging Face bridge.

Format — JSONL, one dialogue per line, UTF-8::

    {"id": str, "system": str (optional), "turns": [{"query": str, "answer": str}, ...],
     "probes": [probe, ...] (optional), "meta": {...} (optional, free-form)}

A probe marks a turn whose answer recalls a fact stated earlier, so memory can be scored::

    {"turn": int,       # 0-based index of the turn whose answer is the recall answer
     "fact_turn": int,  # the turn that stated the fact; 0 <= fact_turn < turn
     "distance": int,   # turns since the fact was stated: must equal turn - fact_turn (>= 1)
     "kind": str,       # e.g. "dog_name"
     "answer": str,     # the gold answer text
     "chance": float}   # probability of guessing it, in (0, 1]

``id`` is non-empty and unique within a file; every query and answer is a non-empty string.
``null`` counts as absent for the optional fields. Any key outside this list is an error (a typo
such as ``"anwser"`` must not silently drop data); put free-form extras under ``"meta"``. Every
error names the file, line and field: ``data.jsonl:7: turns[2].answer: must be a string, got int``.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnError = Literal["raise", "skip"]
_TOP = ("id", "system", "turns", "probes", "meta")
_TURN = ("query", "answer")
_PROBE = ("turn", "distance", "fact_turn", "kind", "answer", "chance")
_DUMP: dict[str, Any] = {"ensure_ascii": False, "separators": (",", ":"), "allow_nan": False}
_HF_FIELDS = ("id", "turns", "system", "probes", "meta", "messages", "query", "answer")


class DataError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Turn:
    query: str
    answer: str


@dataclass(frozen=True)
class Probe:
    turn: int
    distance: int
    fact_turn: int
    kind: str
    answer: str
    chance: float


@dataclass(frozen=True)
class Dialogue:
    """One conversation. Immutable and hashable (``meta`` is left out of the hash)."""

    id: str
    turns: tuple[Turn, ...]
    system: str | None = None
    probes: tuple[Probe, ...] = ()
    # A plain dict, not a read-only proxy: dialogues must pickle (DataLoader worker processes).
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id}
        if self.system is not None:
            obj["system"] = self.system
        obj["turns"] = [{"query": t.query, "answer": t.answer} for t in self.turns]
        if self.probes:
            obj["probes"] = [{k: getattr(p, k) for k in _PROBE} for p in self.probes]
        if self.meta:
            obj["meta"] = dict(self.meta)
        return obj

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "") -> Dialogue:
        """Validate one decoded record; ``where`` (``"file.jsonl:12"``) prefixes every error."""
        _known(_object(obj, "", where), _TOP, "", where)
        id_ = _text(_get(obj, "id", "", where), "id", where)
        raw = _get(obj, "turns", "", where)
        if not isinstance(raw, list) or not raw:
            got = "an empty list" if raw == [] else _kind(raw)
            raise _error(where, "turns", f"must be a non-empty list, got {got}")
        turns = tuple(_turn(t, f"turns[{i}]", where) for i, t in enumerate(raw))
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise _error(where, "system", f"must be a string, got {_kind(system)}")
        raw = [] if obj.get("probes") is None else obj["probes"]
        if not isinstance(raw, list):
            raise _error(where, "probes", f"must be a list, got {_kind(raw)}")
        probes = tuple(_probe(p, f"probes[{i}]", len(turns), where) for i, p in enumerate(raw))
        meta = _object({} if obj.get("meta") is None else obj["meta"], "meta", where)
        return cls(id_, turns, system, probes, dict(meta))


def _error(where: str, path: str, message: str) -> DataError:
    return DataError(": ".join(part for part in (where, path, message) if part))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object(value: Any, path: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise _error(where, path, f"must be an object, got {_kind(value)}")
    return value


def _known(obj: dict, allowed: tuple[str, ...], prefix: str, where: str) -> None:
    unknown = sorted(set(obj) - set(allowed), key=str)
    if unknown:
        hint = "" if prefix else "; put extra data under 'meta'"
        message = f"unknown field (known: {', '.join(allowed)}){hint}"
        raise _error(where, f"{prefix}{unknown[0]}", message)


def _get(obj: dict, key: str, prefix: str, where: str) -> Any:
    if key not in obj:
        raise _error(where, f"{prefix}{key}", "missing")
    return obj[key]


def _text(value: Any, path: str, where: str) -> str:
    if not isinstance(value, str):
        raise _error(where, path, f"must be a string, got {_kind(value)}")
    if not value.strip():
        raise _error(where, path, "must not be empty or whitespace")
    if not value.isascii():  # a lone surrogate (a "\ud800" escape) would crash writer/tokenizer
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _error(where, path, "contains an unpaired surrogate") from None
    return value


def _turn(obj: Any, path: str, where: str) -> Turn:
    _known(_object(obj, path, where), _TURN, f"{path}.", where)
    q, a = (_text(_get(obj, k, f"{path}.", where), f"{path}.{k}", where) for k in _TURN)
    return Turn(q, a)


def _probe(obj: Any, path: str, n_turns: int, where: str) -> Probe:
    _known(_object(obj, path, where), _PROBE, f"{path}.", where)
    v = {k: _get(obj, k, f"{path}.", where) for k in _PROBE}
    for key in _PROBE[:3]:
        if isinstance(v[key], bool) or not isinstance(v[key], int):
            raise _error(where, f"{path}.{key}", f"must be an integer, got {_kind(v[key])}")
    turn, distance, fact = (v[k] for k in _PROBE[:3])
    if not 0 <= turn < n_turns:
        raise _error(where, f"{path}.turn", f"must be in [0, {n_turns}) (turns), got {turn}")
    if not 0 <= fact < turn:
        raise _error(where, f"{path}.fact_turn", f"must be in [0, turn={turn}), got {fact}")
    if distance != turn - fact:
        message = f"must equal turn - fact_turn = {turn - fact}, got {distance}"
        raise _error(where, f"{path}.distance", message)
    chance = v["chance"]
    if isinstance(chance, bool) or not isinstance(chance, int | float):
        raise _error(where, f"{path}.chance", f"must be a number, got {_kind(chance)}")
    if not 0 < chance <= 1:  # also rejects NaN
        raise _error(where, f"{path}.chance", f"must be in (0, 1], got {chance}")
    kind, answer = (_text(v[k], f"{path}.{k}", where) for k in ("kind", "answer"))
    return Probe(turn, distance, fact, kind, answer, float(chance))


def _check_mode(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")


def _validated(
    records: Iterable[tuple[str, Any]], on_error: OnError, report: list[str] | None
) -> Iterator[Dialogue]:
    """Turn ``(where, record-or-DataError)`` pairs into dialogues; ids must be unique."""
    seen: dict[str, str] = {}
    for where, obj in records:
        try:
            if isinstance(obj, DataError):
                raise obj
            dialogue = Dialogue.from_json(obj, where=where)
            if dialogue.id in seen:
                first = seen[dialogue.id]
                raise _error(where, "id", f"duplicate id {dialogue.id!r} (first at {first})")
        except DataError as exc:
            if on_error == "raise":
                raise
            if report is not None:
                report.append(str(exc))
            continue
        seen[dialogue.id] = where
        yield dialogue


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # json.loads would otherwise keep the last value silently
        keys = [k for k, _ in pairs]
        raise DataError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return obj


def _file_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    # Binary read, decoded line by line: one bad byte costs one record, not the whole file.
    # Splitting on b"\n" only: U+2028 and friends are legal inside JSON strings.
    name = os.fspath(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = f"invalid UTF-8 at byte {exc.start + 1} of the line"
                yield where, DataError(f"{where}: {message}")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})")
            except DataError as exc:
                yield where, DataError(f"{where}: {exc}")


def iter_dialogues(
    path: str | os.PathLike, *, on_error: OnError = "raise", report: list[str] | None = None
) -> Iterator[Dialogue]:
    """Stream dialogues from a JSONL file. ``"skip"`` drops bad records, adding each message to
    ``report``; ``"raise"`` raises :class:`DataError` at the first."""
    _check_mode(on_error)  # here, not inside the generator, so a bad mode fails at the call
    return _validated(_file_records(path), on_error, report)


def read_dialogues(
    path: str | os.PathLike, *, on_error: OnError = "raise", report: list[str] | None = None
) -> list[Dialogue]:
    return list(iter_dialogues(path, on_error=on_error, report=report))


def write_dialogues(path: str | os.PathLike, dialogues: Iterable[Dialogue]) -> int:
    """Write JSONL atomically: a failure mid-way (bad dialogue, full disk) leaves any existing
    file untouched. Each dialogue is validated first, so the file always reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            # Validated as if read back (where = the line it lands on), duplicate ids included.
            records = ((f"{path}:{n}", d.to_json()) for n, d in enumerate(dialogues, 1))
            for count, dialogue in enumerate(_validated(records, "raise", None), 1):
                try:
                    line = json.dumps(dialogue.to_json(), **_DUMP)
                except (TypeError, ValueError) as exc:  # only meta holds arbitrary values
                    raise _error(f"{path}:{count}", "meta", f"not JSON ({exc})") from None
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file owner-only; keep the replaced file's mode, or a usual 0644.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def dialogues_from_hf(
    dataset_or_path: Any,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    on_error: OnError = "raise",
    report: list[str] | None = None,
) -> list[Dialogue]:
    """Dialogues from a ``datasets.Dataset``/``DatasetDict``, a local data file or a Hub id.

    ``columns`` maps our fields (id, turns, system, probes, meta; query and answer inside turns)
    to the dataset's names. ``{"messages": col}`` reads a chat column of ``{"role", "content"}``
    messages instead: an optional first system message, then user/assistant pairs. Rows are
    validated like JSONL records (``where`` is ``dataset[split]:row N``); other columns are ignored.
    A missing id becomes ``f"{split}-{N}"``, an integer id its string. Arrow gives every row the
    union of all rows' struct keys, absent ones as null: nulls read as absent, but a ``meta``
    struct comes back with those null keys. Prefer :func:`read_dialogues` for our own JSONL.
    """
    _check_mode(on_error)
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "dialogues_from_hf needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    data = _load(datasets, dataset_or_path, split)
    cols = _columns(columns or {}, data.column_names)
    records = (_hf_record(row, cols, split, i) for i, row in enumerate(data))
    return list(_validated(records, on_error, report))


def _load(datasets: Any, source: Any, split: str) -> Any:
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset (splits: {', '.join(source)})")
        return source[split]
    if isinstance(source, datasets.Dataset | datasets.IterableDataset):
        return source
    path = os.fspath(source)
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        return datasets.load_dataset("json", data_files={split: path}, split=split)
    return datasets.load_dataset(path, split=split)


def _columns(columns: Mapping[str, str], available: list[str] | None) -> dict[str, str]:
    """Our field -> the dataset's column; the key "messages" is present only for chat layout."""
    unknown = sorted(set(columns) - set(_HF_FIELDS))
    if unknown:
        raise ValueError(f"columns: unknown field {unknown[0]!r} (known: {', '.join(_HF_FIELDS)})")
    if "turns" in columns and "messages" in columns:
        raise ValueError("columns: give either 'turns' or 'messages', not both")
    cols = {f: columns.get(f, f) for f in _HF_FIELDS if f != "messages" or f in columns}
    needed = {k: cols[k] for k in columns if k not in _TURN}
    if "messages" not in cols:
        needed.setdefault("turns", cols["turns"])
    for key, name in needed.items() if available is not None else ():  # None: no features
        if name not in available:
            raise ValueError(
                f"columns[{key!r}]: no column {name!r} in the dataset (columns: "
                f"{', '.join(available)}); for chat data pass columns={{'messages': ...}}"
            )
    return cols


def _hf_record(row: dict, cols: dict[str, str], split: str, i: int) -> tuple[str, Any]:
    """``(where, record)`` for row ``i``, or ``(where, DataError)`` for a bad chat layout."""
    where, default_id = f"dataset[{split}]:row {i}", f"{split}-{i}"
    id_ = row.get(cols["id"])
    if isinstance(id_, int) and not isinstance(id_, bool):
        id_ = str(id_)  # Hub datasets often number their rows; an integer id is unambiguous
    record: dict[str, Any] = {"id": default_id if id_ is None else id_}
    for key in ("system", "probes", "meta"):
        if row.get(cols[key]) is not None:
            record[key] = row[cols[key]]
    if "messages" in cols:
        try:
            system, record["turns"] = _from_messages(row.get(cols["messages"]), where)
        except DataError as exc:
            return where, exc
        if system is not None:
            record.setdefault("system", system)
    else:
        turns = row.get(cols["turns"])
        if isinstance(turns, list):  # other keys are ignored: Arrow gives each row every key
            turns = [_renamed(t, cols) for t in turns]
        record["turns"] = turns
    return where, record


def _renamed(turn: Any, cols: dict[str, str]) -> Any:
    return {k: turn[cols[k]] for k in _TURN if cols[k] in turn} if isinstance(turn, dict) else turn


def _from_messages(messages: Any, where: str) -> tuple[str | None, list[dict[str, str]]]:
    if not isinstance(messages, list):
        raise _error(where, "messages", f"must be a list, got {_kind(messages)}")
    system, turns, query = None, [], None
    for j, msg in enumerate(messages):
        path = f"messages[{j}]"
        role, content = _object(msg, path, where).get("role"), msg.get("content")
        if role == "system" and j == 0:
            if not isinstance(content, str):
                raise _error(where, f"{path}.content", f"must be a string, got {_kind(content)}")
            system = content
        elif role == "user" and query is None:
            query = _text(content, f"{path}.content", where)
        elif role == "assistant" and query is not None:
            turns.append({"query": query, "answer": _text(content, f"{path}.content", where)})
            query = None
        elif role in ("system", "user", "assistant"):
            expected = "assistant" if query is not None else "user"
            raise _error(where, f"{path}.role", f"expected {expected!r} here, got {role!r}")
        else:
            raise _error(where, f"{path}.role", f"must be system, user or assistant, got {role!r}")
    if query is not None:
        raise _error(where, f"messages[{len(messages) - 1}]", "user message without an answer")
    if not turns:
        raise _error(where, "messages", "no user/assistant pair")
    return system, turns
