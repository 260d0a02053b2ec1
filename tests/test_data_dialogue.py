"""The JSONL dialogue format: round trips, one test per kind of bad record (in both error modes),
atomic writes, and the Hugging Face `datasets` bridge on in-memory and local data only."""

from __future__ import annotations

import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rxt.data.dialogue import (
    DataError,
    Dialogue,
    Probe,
    Turn,
    dialogues_from_hf,
    iter_dialogues,
    read_dialogues,
    write_dialogues,
)

RICH = Dialogue(
    id="dog-1",
    turns=(
        Turn("Mon chien s'appelle Rex 🐕.", "Enchanté, Rex !"),
        Turn('Line\nbreaks, "quotes", tabs\t and \u2028 separators', "ok"),
        Turn("中文：我的狗叫什么？", "Rex"),
    ),
    system="Tu es un assistant.",
    probes=(Probe(turn=2, distance=2, fact_turn=0, kind="dog_name", answer="Rex", chance=0.01),),
    meta={"source": "synthetic", "seed": 3, "tags": ["probe", "fr"]},
)
PLAIN = Dialogue(id="plain", turns=(Turn("hi", "hello"),))


def good(id_: str) -> dict:
    return {"id": id_, "turns": [{"query": "q", "answer": "a"}]}


def three_turns(**probe) -> dict:
    base = {"turn": 2, "distance": 2, "fact_turn": 0, "kind": "k", "answer": "x", "chance": 0.5}
    turns = [{"query": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    return {"id": "bad", "turns": turns, "probes": [{**base, **probe}]}


def drop(obj: dict, *path: str | int) -> dict:
    """``obj`` with the key at ``path`` removed (modifies and returns it)."""
    inner = obj
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return obj


# (bad line as raw text or a JSON-able object, the field named, a phrase of the message)
BAD_RECORDS = {
    "not-json": ('{"id": "x", "turns": [', None, "not valid JSON"),
    "not-an-object": ([1, 2], None, "must be an object, got list"),
    "duplicate-key": ('{"id": "x", "id": "y", "turns": []}', None, "duplicate key 'id'"),
    "missing-id": (drop(good("x"), "id"), "id", "missing"),
    "id-not-string": ({**good("x"), "id": 7}, "id", "must be a string, got int"),
    "id-empty": ({**good("x"), "id": "  "}, "id", "must not be empty"),
    "missing-turns": (drop(good("x"), "turns"), "turns", "missing"),
    "turns-not-list": ({**good("x"), "turns": "hi"}, "turns", "got str"),
    "turns-empty": ({**good("x"), "turns": []}, "turns", "got an empty list"),
    "turn-not-object": ({**good("x"), "turns": ["hi"]}, "turns[0]", "must be an object"),
    "turn-missing-answer": (drop(good("x"), "turns", 0, "answer"), "turns[0].answer", "missing"),
    "answer-int": (
        {"id": "x", "turns": [{"query": "q", "answer": "a"}, {"query": "q", "answer": 3}]},
        "turns[1].answer",
        "must be a string, got int",
    ),
    "query-null": (
        {"id": "x", "turns": [{"query": None, "answer": "a"}]},
        "turns[0].query",
        "null",
    ),
    "query-blank": (
        {"id": "x", "turns": [{"query": " \n", "answer": "a"}]},
        "turns[0].query",
        "empty",
    ),
    "query-surrogate": (
        '{"id": "x", "turns": [{"query": "\\ud800", "answer": "a"}]}',
        "turns[0].query",
        "unpaired surrogate",
    ),
    "turn-typo": (
        {"id": "x", "turns": [{"query": "q", "anwser": "a"}]},
        "turns[0].anwser",
        "unknown field",
    ),
    "system-not-string": ({**good("x"), "system": ["s"]}, "system", "must be a string, got list"),
    "top-level-typo": ({**good("x"), "sytem": "s"}, "sytem", "unknown field"),
    "meta-not-object": ({**good("x"), "meta": 3}, "meta", "must be an object"),
    "meta-empty-list": ({**good("x"), "meta": []}, "meta", "must be an object, got list"),
    "probes-not-list": ({**good("x"), "probes": {}}, "probes", "must be a list, got dict"),
    "probe-not-object": ({**good("x"), "probes": [3]}, "probes[0]", "must be an object"),
    "probe-missing": (drop(three_turns(), "probes", 0, "chance"), "probes[0].chance", "missing"),
    "probe-typo": (three_turns(weight=1), "probes[0].weight", "unknown field"),
    "probe-turn-string": (three_turns(turn="2"), "probes[0].turn", "must be an integer, got str"),
    "probe-distance-bool": (three_turns(distance=True), "probes[0].distance", "got bool"),
    "probe-kind-int": (three_turns(kind=1), "probes[0].kind", "must be a string"),
    "probe-answer-empty": (three_turns(answer=""), "probes[0].answer", "must not be empty"),
    "probe-turn-range": (three_turns(turn=3, distance=3), "probes[0].turn", "[0, 3)"),
    "probe-fact-after": (three_turns(fact_turn=2, distance=0), "probes[0].fact_turn", "turn=2"),
    "probe-fact-negative": (three_turns(fact_turn=-1, distance=3), "probes[0].fact_turn", "got -1"),
    "probe-distance": (three_turns(distance=1), "probes[0].distance", "= 2, got 1"),
    "probe-chance-zero": (three_turns(chance=0), "probes[0].chance", "(0, 1]"),
    "probe-chance-big": (three_turns(chance=1.5), "probes[0].chance", "(0, 1]"),
    "probe-chance-nan": (three_turns(chance=float("nan")), "probes[0].chance", "got nan"),
    "probe-chance-string": (three_turns(chance="low"), "probes[0].chance", "must be a number"),
}


def write_lines(path, *lines: str | object) -> None:
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


@pytest.mark.parametrize(("bad", "field", "phrase"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_is_reported_with_file_line_and_field(tmp_path, bad, field, phrase):
    path = tmp_path / "data.jsonl"
    write_lines(path, good("g1"), bad, good("g2"))
    prefix = f"{path}:2: " + (f"{field}" if field else "")

    with pytest.raises(DataError) as info:
        read_dialogues(path)
    assert str(info.value).startswith(prefix), str(info.value)
    assert phrase in str(info.value)

    report: list[str] = []
    kept = read_dialogues(path, on_error="skip", report=report)
    assert [d.id for d in kept] == ["g1", "g2"]
    assert report == [str(info.value)]


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "out" / "dialogues.jsonl"  # the parent directory is created
    assert write_dialogues(path, [RICH, PLAIN]) == 2
    assert read_dialogues(path) == [RICH, PLAIN]
    assert list(iter_dialogues(path)) == [RICH, PLAIN]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # one object per line, newline-terminated
    assert "🐕".encode() in lines[0]  # ensure_ascii=False: text stays readable
    assert json.loads(lines[1]) == {"id": "plain", "turns": [{"query": "hi", "answer": "hello"}]}
    assert Dialogue.from_json(RICH.to_json()) == RICH


def test_from_json_without_where_names_the_field():
    with pytest.raises(DataError, match=r"^turns\[0\]\.answer: missing$"):
        Dialogue.from_json({"id": "x", "turns": [{"query": "q"}]})


def test_invalid_utf8_costs_only_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    latin1 = b'{"id": "x", "turns": [{"query": "caf\xe9", "answer": "a"}]}'
    path.write_bytes(
        json.dumps(good("g1")).encode() + b"\n" + latin1 + b"\n" + json.dumps(good("g2")).encode()
    )  # no final newline
    report: list[str] = []
    assert [d.id for d in read_dialogues(path, on_error="skip", report=report)] == ["g1", "g2"]
    column = latin1.index(b"\xe9") + 1
    assert report == [f"{path}:2: invalid UTF-8 at byte {column} of the line"]
    with pytest.raises(DataError, match="invalid UTF-8"):
        read_dialogues(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    write_lines(path, good("a"), good("b"), good("a"))
    with pytest.raises(DataError) as info:
        read_dialogues(path)
    assert str(info.value) == f"{path}:3: id: duplicate id 'a' (first at {path}:1)"
    report: list[str] = []
    assert [d.id for d in read_dialogues(path, on_error="skip", report=report)] == ["a", "b"]
    assert len(report) == 1


def test_blank_lines_crlf_and_bom_are_tolerated_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(good("a")).encode()
        + b"\r\n\n   \n\t\r\n"
        + json.dumps({"id": 1}).encode()
        + b"\n\n"
    )
    report: list[str] = []
    assert [d.id for d in read_dialogues(path, on_error="skip", report=report)] == ["a"]
    assert report == [f"{path}:5: id: must be a string, got int"]


def test_null_optional_fields_count_as_absent():
    record = {**good("x"), "system": None, "probes": None, "meta": None}
    assert Dialogue.from_json(record) == Dialogue("x", (Turn("q", "a"),))


def test_skip_without_report_and_bad_mode(tmp_path):
    path = tmp_path / "data.jsonl"
    write_lines(path, "oops", good("a"))
    assert [d.id for d in read_dialogues(path, on_error="skip")] == ["a"]
    with pytest.raises(ValueError, match="on_error"):
        iter_dialogues(path, on_error="ignore")  # type: ignore[arg-type]


def test_iter_dialogues_streams(tmp_path):
    path = tmp_path / "data.jsonl"
    write_lines(path, good("a"), "oops")
    stream = iter_dialogues(path)
    assert next(stream).id == "a"  # the bad line is not read yet
    with pytest.raises(DataError, match=":2: not valid JSON"):
        next(stream)


def failing_after_one():
    yield PLAIN
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize(
    ("dialogues", "error"),
    [
        (failing_after_one, RuntimeError),
        (lambda: [PLAIN, Dialogue("bad", ())], DataError),
        (lambda: [PLAIN, PLAIN], DataError),
        (lambda: [Dialogue("m", (Turn("q", "a"),), meta={"x": float("nan")})], DataError),
        (lambda: [Dialogue("m", (Turn("q", "a"),), meta={"x": object()})], DataError),
    ],
    ids=["iterable-raises", "invalid-dialogue", "duplicate-id", "meta-nan", "meta-object"],
)
def test_write_is_atomic(tmp_path, dialogues, error):
    path = tmp_path / "data.jsonl"
    write_dialogues(path, [RICH])
    before = path.read_bytes()
    with pytest.raises(error):
        write_dialogues(path, dialogues())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["data.jsonl"]  # no temporary file left behind


def test_write_error_names_the_line(tmp_path):
    with pytest.raises(DataError, match=r"out\.jsonl:2: turns: must be a non-empty list"):
        write_dialogues(tmp_path / "out.jsonl", [PLAIN, Dialogue("x", ())])
    assert not (tmp_path / "out.jsonl").exists()


def test_write_keeps_the_replaced_files_mode(tmp_path):
    path = tmp_path / "data.jsonl"
    write_dialogues(path, [PLAIN])
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600
    path.chmod(0o640)
    write_dialogues(path, [RICH])
    assert path.stat().st_mode & 0o777 == 0o640


# Text as it comes: any code point but lone surrogates (which UTF-8 cannot encode).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
NONBLANK = TEXT.filter(lambda s: s.strip())


@st.composite
def dialogues(draw) -> Dialogue:
    turns = tuple(draw(st.lists(st.builds(Turn, NONBLANK, NONBLANK), min_size=1, max_size=4)))
    probes = []
    for _ in range(draw(st.integers(0, 2)) if len(turns) > 1 else 0):
        turn = draw(st.integers(1, len(turns) - 1))
        fact = draw(st.integers(0, turn - 1))
        chance = draw(st.floats(0, 1, exclude_min=True))
        probes.append(Probe(turn, turn - fact, fact, draw(NONBLANK), draw(NONBLANK), chance))
    values = st.none() | st.booleans() | st.integers() | TEXT | st.lists(st.integers(), max_size=3)
    return Dialogue(
        id=draw(NONBLANK),
        turns=turns,
        system=draw(st.none() | TEXT),
        probes=tuple(probes),
        meta=draw(st.dictionaries(TEXT, values, max_size=3)),
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(dialogues(), max_size=4, unique_by=lambda d: d.id))
def test_random_dialogues_round_trip(tmp_path, items):
    path = tmp_path / "random.jsonl"
    assert write_dialogues(path, items) == len(items)
    assert read_dialogues(path) == items


# --- Hugging Face datasets -----------------------------------------------------------------------


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        dialogues_from_hf([])


def test_hf_renamed_columns():
    datasets = pytest.importorskip("datasets")
    rows = [
        {"conv": "a", "sys": "Be brief.", "conversation": [{"user": "Hi 👋", "bot": "Hello"}]},
        {"conv": None, "sys": None, "conversation": [{"user": "1", "bot": "2"}] * 2},
    ]
    columns = {"id": "conv", "system": "sys", "turns": "conversation"}
    got = dialogues_from_hf(
        datasets.Dataset.from_list(rows), columns={**columns, "query": "user", "answer": "bot"}
    )
    assert got == [
        Dialogue("a", (Turn("Hi 👋", "Hello"),), system="Be brief."),
        Dialogue("train-1", (Turn("1", "2"), Turn("1", "2"))),  # missing id: split-index
    ]


def test_hf_our_own_layout_with_probes_and_integer_ids():
    datasets = pytest.importorskip("datasets")
    record = {**RICH.to_json(), "id": 5}
    del record["meta"]
    [got] = dialogues_from_hf(datasets.Dataset.from_list([record]))
    assert got == Dialogue("5", RICH.turns, RICH.system, RICH.probes)


def test_hf_messages_column():
    datasets = pytest.importorskip("datasets")
    messages = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "My dog is Rex."},
        {"role": "assistant", "content": "Nice!"},
        {"role": "user", "content": "Dog's name?"},
        {"role": "assistant", "content": "Rex."},
    ]
    data = datasets.Dataset.from_list([{"messages": messages}, {"messages": messages[1:3]}])
    got = dialogues_from_hf(data, columns={"messages": "messages"})
    pairs = (Turn("My dog is Rex.", "Nice!"), Turn("Dog's name?", "Rex."))
    assert got == [
        Dialogue("train-0", pairs, system="You are kind."),
        Dialogue("train-1", pairs[:1]),
    ]


def chat(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} text"} for r in roles]}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (chat("user"), "messages[0]: user message without an answer"),
        (chat("assistant", "user"), "messages[0].role: expected 'user' here, got 'assistant'"),
        (chat("user", "user", "assistant"), "messages[1].role: expected 'assistant'"),
        (chat("user", "assistant", "system"), "messages[2].role: expected 'user' here"),
        (chat("user", "tool"), "messages[1].role: must be system, user or assistant"),
        (chat("system"), "messages: no user/assistant pair"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content: must not be"),
    ],
)
def test_hf_bad_chat_rows(row, message):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([chat("user", "assistant"), row, chat("user", "assistant")])
    report: list[str] = []
    got = dialogues_from_hf(data, columns={"messages": "messages"}, on_error="skip", report=report)
    assert [d.id for d in got] == ["train-0", "train-2"]
    assert len(report) == 1 and report[0].startswith(f"dataset[train]:row 1: {message}")
    with pytest.raises(DataError, match=r"^dataset\[train\]:row 1: "):
        dialogues_from_hf(data, columns={"messages": "messages"})


def test_hf_bad_row_in_skip_mode_and_duplicate_ids():
    datasets = pytest.importorskip("datasets")
    rows = [good("a"), {"id": "b", "turns": [{"query": "q", "answer": " "}]}, good("a"), good("c")]
    report: list[str] = []
    got = dialogues_from_hf(datasets.Dataset.from_list(rows), on_error="skip", report=report)
    assert [d.id for d in got] == ["a", "c"]
    assert report == [
        "dataset[train]:row 1: turns[0].answer: must not be empty or whitespace",
        "dataset[train]:row 2: id: duplicate id 'a' (first at dataset[train]:row 0)",
    ]


def test_hf_dataset_dict_split_and_bad_columns():
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict({"test": datasets.Dataset.from_list([good("t")])})
    assert [d.id for d in dialogues_from_hf(data, split="test")] == ["t"]
    with pytest.raises(ValueError, match="split 'train' not in the dataset"):
        dialogues_from_hf(data)
    with pytest.raises(ValueError, match=r"columns\['turns'\]: no column 'conversation'"):
        dialogues_from_hf(data, split="test", columns={"turns": "conversation"})
    with pytest.raises(ValueError, match="unknown field 'turn'"):
        dialogues_from_hf(data, split="test", columns={"turn": "turns"})
    chat_only = datasets.Dataset.from_list([chat("user", "assistant")])
    with pytest.raises(ValueError, match=r"no column 'turns'.*columns=\{'messages'"):
        dialogues_from_hf(chat_only)


def test_hf_local_jsonl_through_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "dialogues.jsonl"
    other = Dialogue("other", (Turn("q", "a"),), probes=())
    expected = [Dialogue(RICH.id, RICH.turns, RICH.system, RICH.probes), PLAIN, other]
    write_dialogues(path, expected)
    assert dialogues_from_hf(str(path)) == expected
    assert dialogues_from_hf(path, split="validation") == expected
