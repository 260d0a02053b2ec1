"""The Chit Chat corpus as dialogues: the pairing rule, bad records, and a held-out split that
shares no conversation — and no dialogue text — with training."""

from __future__ import annotations

import json
import random

import pytest

from rxt.cli import main
from rxt.data import chitchat as cc
from rxt.data.chitchat import (
    chitchat_dialogues,
    conversation_dialogues,
    corpus_available,
    load_conversations,
    split_chitchat,
)
from rxt.data.dialogue import DataError, Dialogue, read_dialogues


def conversation(*messages: tuple[str, list[str]], prompt: str = "Talk about tea") -> dict:
    """A record as the corpus stores it: each message the lines one sender sent in a row."""
    return {
        "messages": [
            [
                {"text": line, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}
                for line in lines
            ]
            for sender, lines in messages
        ],
        "prompt": prompt,
        "start": "2018-05-02T19:38:01Z",
        "ratings": {"witty": 3},
    }


def pairs(dialogue: Dialogue) -> list[tuple[str, str]]:
    return [(t.query, t.answer) for t in dialogue.turns]


# --------------------------------------------------------------------------- conversion
def test_each_message_answers_the_one_before():
    record = conversation(
        ("a", ["Hello", "How  are\nyou?"]),  # one message: lines joined, whitespace collapsed
        ("b", ["fine"]),
        ("b", ["  ", ""]),  # blank: dropped
        ("a", ["so"]),
        ("a", ["what now"]),  # the same sender again: one message
        ("b", ["bye"]),
        ("a", ["anyone?"]),  # nobody answered: dropped
    )
    (dialogue,) = conversation_dialogues("c1", record)
    assert dialogue.id == "c1-0"
    assert pairs(dialogue) == [("Hello How are you?", "fine"), ("so what now", "bye")]
    assert dialogue.meta == {
        "source": "chitchat",
        "conversation": "c1",
        "part": 0,
        "prompt": "Talk about tea",
        "speakers": [[0, 1], [0, 1]],
    }
    assert Dialogue.from_json(dialogue.to_json()) == dialogue
    assert conversation_dialogues("alone", conversation(("a", ["hi?"]), ("a", ["hello?"]))) == []


def test_three_people_take_turns_by_the_same_rule():
    record = conversation(*[("abc"[i % 3], [f"m{i}"]) for i in range(6)])
    (dialogue,) = conversation_dialogues("c", record)
    assert pairs(dialogue) == [("m0", "m1"), ("m2", "m3"), ("m4", "m5")]
    assert dialogue.meta["speakers"] == [[0, 1], [2, 0], [1, 2]]


def test_long_conversations_are_cut_and_long_messages_clipped():
    record = conversation(*[("ab"[i % 2], [f"s{i}"]) for i in range(21)])
    dialogues = conversation_dialogues("c", record, max_turns=3)
    assert [d.id for d in dialogues] == ["c-0", "c-1", "c-2", "c-3"]
    assert [len(d.turns) for d in dialogues] == [3, 3, 3, 1]
    assert [d.meta["part"] for d in dialogues] == [0, 1, 2, 3]
    used = [x for d in dialogues for t in d.turns for x in (t.query, t.answer)]
    assert used == [f"s{i}" for i in range(20)]  # in order, each once; s20 unanswered
    long = conversation(("a", ["word " * 100]), ("b", ["ok"]))
    (clipped,) = conversation_dialogues("c", long, max_chars=22)
    assert clipped.turns[0].query == "word word word word"
    with pytest.raises(ValueError, match="max_turns"):
        conversation_dialogues("c", record, max_turns=0)


def _bad(record_change) -> dict:
    record = conversation(("a", ["hi"]), ("b", ["hello"]))
    record_change(record)
    return record


BAD_RECORDS = {
    "must be an object, got list": [],
    "messages: missing": {"prompt": "x"},
    "messages[1]: must be a list of lines, got str": _bad(
        lambda r: r["messages"].__setitem__(1, "hello")
    ),
    "messages[0][0]: must be an object, got str": _bad(
        lambda r: r["messages"][0].__setitem__(0, "hi")
    ),
    "messages[1][0].text: must be a string, got int": _bad(
        lambda r: r["messages"][1][0].__setitem__("text", 7)
    ),
    "messages[0][0].sender: missing": _bad(lambda r: r["messages"][0][0].pop("sender")),
    "messages[0]: lines from 2 senders": _bad(
        lambda r: r["messages"][0].append({"text": "x", "sender": "b"})
    ),
}


@pytest.mark.parametrize("reason", list(BAD_RECORDS))
def test_bad_records_name_the_conversation_and_field(reason):
    record = BAD_RECORDS[reason]
    with pytest.raises(DataError) as caught:
        conversation_dialogues("conv-9", record)
    assert str(caught.value) == f"chitchat conversation 'conv-9': {reason}"
    good = conversation(("a", ["hi"]), ("b", ["hello"]))
    corpus = {"good-1": good, "conv-9": record, "good-2": good}
    with pytest.raises(DataError, match="conv-9"):
        chitchat_dialogues(corpus)
    report: list[str] = []
    kept = chitchat_dialogues(corpus, on_error="skip", report=report)
    assert [d.id for d in kept] == ["good-1-0", "good-2-0"]
    assert report == [str(caught.value)]


def test_bad_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: not a UTF-8 JSON file"):
        load_conversations(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(DataError, match=r"list\.json: must be a JSON object of conversations"):
        load_conversations(listed)
    with pytest.raises(ValueError, match="on_error"):
        chitchat_dialogues({}, on_error="ignore")


def test_corpus_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "none.json"))
    with pytest.raises(cc.CorpusMissing, match=cc.ENV_VAR):
        cc.dataset_path()
    assert not corpus_available()
    monkeypatch.delenv(cc.ENV_VAR)
    monkeypatch.setattr(cc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cc.CorpusMissing, match="pip install chitchat-dataset"):
        cc.dataset_path()


# --------------------------------------------------------------------------- the split
def synthetic_corpus(n: int) -> dict[str, dict]:
    rng = random.Random(0)
    words = ["tea", "rain", "music", "cats", "school", "food", "code", "hiking"]
    return {
        f"conv-{i}": conversation(
            *[("ab"[k % 2], [" ".join(rng.choices(words, k=4))]) for k in range(rng.randint(2, 30))]
        )
        for i in range(n)
    }


def assert_disjoint(splits: dict[str, list[Dialogue]], everything: list[Dialogue]) -> None:
    """No conversation, and no dialogue text, in two splits; nothing lost or repeated."""
    conversations = {name: {d.meta["conversation"] for d in part} for name, part in splits.items()}
    texts = {name: {tuple(pairs(d)) for d in part} for name, part in splits.items()}
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        assert not conversations[a] & conversations[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    assert sorted(d.id for part in splits.values() for d in part) == sorted(
        d.id for d in everything
    )


def test_split_is_seeded_disjoint_and_order_free():
    corpus = synthetic_corpus(400)
    corpus["twin"] = corpus["conv-0"]  # the same conversation under another id
    dialogues = chitchat_dialogues(corpus, max_turns=4)
    splits = split_chitchat(dialogues, valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert_disjoint(splits, dialogues)
    sizes = {name: len({d.meta["conversation"] for d in part}) for name, part in splits.items()}
    assert 20 <= sizes["valid"] <= 65 and 50 <= sizes["test"] <= 110, sizes
    where = {d.meta["conversation"]: name for name, part in splits.items() for d in part}
    assert where["twin"] == where["conv-0"]
    shuffled = dialogues[:]
    random.Random(1).shuffle(shuffled)
    again = split_chitchat(shuffled, valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert {n: sorted(d.id for d in p) for n, p in again.items()} == {
        n: sorted(d.id for d in p) for n, p in splits.items()
    }
    other = split_chitchat(dialogues, valid_fraction=0.1, test_fraction=0.2, seed=4)
    assert {d.id for d in other["test"]} != {d.id for d in splits["test"]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"test_fraction": 1.0},
        {"valid_fraction": -0.1},
        {"valid_fraction": 0.6, "test_fraction": 0.4},
    ],
)
def test_bad_fractions(kwargs):
    with pytest.raises(ValueError, match="fraction"):
        split_chitchat([], **kwargs)


def test_split_needs_the_conversation():
    with pytest.raises(ValueError, match=r"'x'.*conversation"):
        split_chitchat([Dialogue("x", ())])


# --------------------------------------------------------------------------- the command
def test_rxt_data_chitchat_writes_disjoint_files(tmp_path, monkeypatch, capsys):
    source = tmp_path / "dataset.json"
    source.write_text(json.dumps(synthetic_corpus(120)))
    monkeypatch.setenv(cc.ENV_VAR, str(source))
    out = tmp_path / "data"
    args = ["data", "chitchat", "--out", str(out), "--seed", "1", "--test-fraction", "0.2"]
    assert main(args) == 0
    splits = {name: read_dialogues(out / f"chitchat-{name}.jsonl") for name in cc.SPLITS}
    assert_disjoint(splits, chitchat_dialogues(load_conversations(source)))
    assert all(len(d.turns) <= 8 for part in splits.values() for d in part)
    assert "chitchat-test.jsonl" in capsys.readouterr().out
    assert main([*args, "--test-fraction", "1.5"]) == 2
    assert "test_fraction" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real corpus
needs_corpus = pytest.mark.skipif(
    not corpus_available(), reason=f"Chit Chat corpus not installed ({cc.INSTALL_COMMAND})"
)


@needs_corpus
def test_the_real_corpus_and_its_held_out_split(tmp_path):
    raw = load_conversations()
    assert len(raw) == 7168
    dialogues = chitchat_dialogues(raw)
    conversations = {d.meta["conversation"] for d in dialogues}
    assert len(conversations) >= 4000  # every conversation where someone answered
    assert sum(len(d.turns) for d in dialogues) >= 60_000
    for d in dialogues:
        assert 1 <= len(d.turns) <= 8
        assert all(0 < len(x) <= 300 for t in d.turns for x in (t.query, t.answer))
        assert all(q != a for q, a in d.meta["speakers"])
    splits = split_chitchat(dialogues, seed=0)
    assert_disjoint(splits, dialogues)
    for name in ("valid", "test"):
        share = len({d.meta["conversation"] for d in splits[name]}) / len(conversations)
        assert 0.035 <= share <= 0.065, (name, share)
    assert split_chitchat(dialogues, seed=0) == splits  # seeded: the same split every time
