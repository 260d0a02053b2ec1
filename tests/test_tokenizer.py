"""Tests for rxt.tokenizer: special ids, lossless round trips, formatting, padding, IO."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from rxt.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    EncodedInteraction,
    RxTTokenizer,
)

SPECIAL_IDS = set(range(len(SPECIAL_TOKENS)))

TRICKY = [
    "",
    " ",
    "   ",
    "hello world",
    " leading space",
    "trailing space ",
    "  double  spaces  inside  ",
    "tab\tseparated\tvalues",
    "line one\nline two\n",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\n",
    "\t \n \r",
    "emoji 😀🚀👨‍👩‍👧‍👦 and flags 🇵🇱",
    "中文字符和日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 o\u0302\u0323",
    "zero width\u200bjoiner\u200d here\ufeff",
    "\x00nul and \x7f del \x1b[31mescape",
    "Ünïcödé ß ﬁ ligature Ω",
    "[Q] [A] [EOS] [BOS] [PAD] [T] [MASK] [UNK]",
    "[Q][A][EOS]",
    "what does [A] mean? [EOS]",
    "code: def f(x):\n    return x ** 2  # comment",
    "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈",
]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["the model", "a user", "memory", "the decoder", "attention", "my cat"]
    verbs = ["reads", "writes", "updates", "forgets", "remembers", "answers"]
    objects = ["the query", "short-term memory", "a long answer", "every token", "the state"]
    extras = ["", " today.", " quickly!", " — again?", " 😀", " (see [A])", "\n"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(extras)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "prefix-space"])
def tok(request: pytest.FixtureRequest) -> RxTTokenizer:
    """Every test below holds with and without the prefix space."""
    return RxTTokenizer.train(
        iter(_corpus()), vocab_size=400, min_frequency=2, prefix_space=request.param
    )


# ---------------------------------------------------------------- special tokens / vocab


def test_special_ids_fixed(tok: RxTTokenizer) -> None:
    assert SPECIAL_TOKENS == ("[PAD]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]", "[MASK]", "[UNK]")
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(token) == i
        assert tok.backend.id_to_token(i) == token
    ids = (tok.pad_id, tok.bos_id, tok.eos_id, tok.query_id, tok.answer_id)
    assert ids == (0, 1, 2, 3, 4)
    assert (tok.think_id, tok.mask_id, tok.unk_id) == (5, 6, 7)
    assert RxTTokenizer.eos_id == 2  # usable without an instance
    with pytest.raises(AttributeError):
        tok.pad_id = 5  # type: ignore[misc]


def test_vocab_size_and_merges(tok: RxTTokenizer) -> None:
    assert 264 < tok.vocab_size <= 400
    assert tok.vocab_size == tok.backend.get_vocab_size()
    # Training learned merges: frequent words take fewer tokens than bytes.
    assert len(tok.encode("the decoder")) < len(b"the decoder")


def test_train_accepts_generator_list_and_empty() -> None:
    from_list = RxTTokenizer.train(_corpus(50), vocab_size=300)
    from_gen = RxTTokenizer.train((s for s in _corpus(50)), vocab_size=300)
    assert from_list.encode("memory updates") == from_gen.encode("memory updates")
    empty = RxTTokenizer.train([], vocab_size=300)
    assert empty.vocab_size == 264  # specials + byte alphabet only
    assert empty.decode(empty.encode("still fine 😀")) == "still fine 😀"


@pytest.mark.parametrize("vocab_size", [0, 100, 263])
def test_vocab_too_small_raises(vocab_size: int) -> None:
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size}.*minimum is 264"):
        RxTTokenizer.train(["hello"], vocab_size=vocab_size)


def test_train_rejects_bad_texts() -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        RxTTokenizer.train(["ok", 3], vocab_size=300)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        RxTTokenizer.train("a whole string", vocab_size=300)


def test_init_rejects_tokenizer_without_specials() -> None:
    bare = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match=r"'\[PAD\]' must have id 0"):
        RxTTokenizer(bare)
    with pytest.raises(TypeError):
        RxTTokenizer("tokenizer.json")  # type: ignore[arg-type]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok: RxTTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text())
def test_round_trip_property(tok: RxTTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert not SPECIAL_IDS & set(ids)
    assert tok.decode(ids) == text


def test_empty_string(tok: RxTTokenizer) -> None:
    assert tok.encode("") == []
    assert tok.decode([]) == ""


# ---------------------------------------------------------------- control-token injection


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_token_strings_are_plain_text(tok: RxTTokenizer, token: str) -> None:
    ids = tok.encode(token)
    assert not SPECIAL_IDS & set(ids)
    assert tok.decode(ids) == token


def test_injection_in_interaction(tok: RxTTokenizer) -> None:
    query, answer = "what does [A] mean? [EOS]", "[EOS] it starts [Q] the answer [BOS]"
    enc = tok.encode_interaction(query, answer)
    ids = enc.input_ids
    # Exactly the formatting tokens are special; nothing from the user text is.
    assert [(i, t) for i, t in enumerate(ids) if t in SPECIAL_IDS] == [
        (0, tok.bos_id),
        (1, tok.query_id),
        (ids.index(tok.answer_id), tok.answer_id),
        (len(ids) - 1, tok.eos_id),
    ]
    a = ids.index(tok.answer_id)
    assert tok.decode(ids[2:a]) == query
    assert tok.decode(ids[a + 1 : -1]) == answer


def test_loaded_tokenizer_also_ignores_special_strings(tok: RxTTokenizer, tmp_path: Path) -> None:
    # encode_special_tokens is not stored in tokenizer.json; loading must re-apply it.
    tok.save(tmp_path / TOKENIZER_FILE)
    loaded = RxTTokenizer.from_file(tmp_path / TOKENIZER_FILE)
    assert not SPECIAL_IDS & set(loaded.encode("[Q] hi [A] bye [EOS]"))


def test_decode_skip_special_tokens(tok: RxTTokenizer) -> None:
    enc = tok.encode_interaction("hi", "yo")
    # Query and answer are separate texts, each with its own space under a prefix-space
    # tokenizer; decode drops only the one that starts its output.
    sp = " " if tok.prefix_space else ""
    assert tok.decode(enc.input_ids) == f"hi{sp}yo"
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == f"[BOS][Q]{sp}hi[A]{sp}yo[EOS]"
    assert tok.decode(torch.tensor(enc.input_ids)) == f"hi{sp}yo"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([enc.input_ids]))
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode([1, -3])


# ---------------------------------------------------------------- interaction format


def test_interaction_format_exact(tok: RxTTokenizer) -> None:
    q, a = "How does memory work?", "It is updated after each answer."
    q_ids, a_ids = tok.encode(q), tok.encode(a)
    enc = tok.encode_interaction(q, a)
    assert isinstance(enc, EncodedInteraction)
    expected = [tok.bos_id, tok.query_id, *q_ids, tok.answer_id, *a_ids, tok.eos_id]
    assert enc.input_ids == expected
    assert enc.input_ids[0] == tok.bos_id
    assert enc.input_ids[1] == tok.query_id
    assert enc.input_ids[2 + len(q_ids)] == tok.answer_id
    assert enc.input_ids[-1] == tok.eos_id
    # Loss only on answer tokens and the final EOS.
    assert enc.loss_mask == [0] * (3 + len(q_ids)) + [1] * (len(a_ids) + 1)
    assert len(enc.loss_mask) == len(enc.input_ids)


def test_empty_query_and_answer(tok: RxTTokenizer) -> None:
    enc = tok.encode_interaction("", "")
    assert enc.input_ids == [tok.bos_id, tok.query_id, tok.answer_id, tok.eos_id]
    assert enc.loss_mask == [0, 0, 0, 1]


def test_prompt_only(tok: RxTTokenizer) -> None:
    q = "remember my name?"
    expected = [tok.bos_id, tok.query_id, *tok.encode(q), tok.answer_id]
    assert tok.encode_query(q) == expected
    enc = tok.encode_interaction(q)
    assert enc.input_ids == expected
    assert enc.loss_mask == [0] * len(expected)


def test_max_length(tok: RxTTokenizer) -> None:
    enc = tok.encode_interaction("hi", "there")
    n = len(enc.input_ids)
    assert tok.encode_interaction("hi", "there", max_length=n) == enc
    with pytest.raises(ValueError, match=rf"{n} tokens.*max_length={n - 1}"):
        tok.encode_interaction("hi", "there", max_length=n - 1)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_interaction("hi", "there", max_length=0)


def test_type_errors_name_argument(tok: RxTTokenizer) -> None:
    with pytest.raises(TypeError, match="query"):
        tok.encode_interaction(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="answer"):
        tok.encode_interaction("q", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="query"):
        tok.encode_query(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text"):
        tok.encode(["list"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- batching


def test_batch_padding_and_masks(tok: RxTTokenizer) -> None:
    pairs = [("hi", "hello there, how are you?"), ("a much longer question here", None)]
    batch = tok.batch_encode_interactions(pairs)
    encs = [tok.encode_interaction(q, a) for q, a in pairs]
    width = max(len(e.input_ids) for e in encs)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    for key, t in batch.items():
        assert t.dtype == torch.long, key
        assert t.shape == (2, width), key
    for row, e in enumerate(encs):
        n, pad = len(e.input_ids), width - len(e.input_ids)
        assert batch["input_ids"][row].tolist() == e.input_ids + [tok.pad_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad
        assert batch["loss_mask"][row].tolist() == e.loss_mask + [0] * pad
    assert batch["loss_mask"][1].sum() == 0  # prompt-only row trains nothing


def test_batch_pad_to_multiple_of(tok: RxTTokenizer) -> None:
    pairs = [("q", "a"), ("qq", "aa bb")]
    longest = max(len(tok.encode_interaction(q, a).input_ids) for q, a in pairs)
    batch = tok.batch_encode_interactions(pairs, pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and longest <= width < longest + 8
    assert batch["attention_mask"].sum(1).tolist() == [
        len(tok.encode_interaction(q, a).input_ids) for q, a in pairs
    ]
    # max_length is a hard cap even when it is not a multiple.
    capped = tok.batch_encode_interactions(pairs, max_length=longest, pad_to_multiple_of=64)
    assert capped["input_ids"].shape[1] == longest


def test_batch_errors(tok: RxTTokenizer) -> None:
    with pytest.raises(ValueError, match=r"pairs\[1\].*max_length=5"):
        tok.batch_encode_interactions([("a", None), ("a long query", "a long answer")], 5)
    with pytest.raises(ValueError, match="at least one"):
        tok.batch_encode_interactions([])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        tok.batch_encode_interactions([("a", "b")], pad_to_multiple_of=0)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        tok.batch_encode_interactions(["just a string"])  # type: ignore[list-item]


# ---------------------------------------------------------------- save / load


def test_save_and_load_identical(tok: RxTTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "tok.json"
    tok.save(path)
    assert json.loads(path.read_text(encoding="utf-8"))["added_tokens"][0]["content"] == "[PAD]"
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left
    loaded = RxTTokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode_interaction(text, text) == tok.encode_interaction(text, text)


def test_save_pretrained_from_pretrained(tok: RxTTokenizer, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    tok.save_pretrained(directory)
    assert (directory / TOKENIZER_FILE).is_file()
    tok.save_pretrained(directory)  # overwriting is fine
    loaded = RxTTokenizer.from_pretrained(str(directory))
    assert loaded.encode("the model reads 😀") == tok.encode("the model reads 😀")


def test_from_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / TOKENIZER_FILE
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        RxTTokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        RxTTokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": "1.0"}', b"\xff\xfe garbage", b""],
    ids=["bad-json", "wrong-schema", "not-utf8", "empty"],
)
def test_from_file_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RxTTokenizer.from_file(path)


def test_from_file_without_specials(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    path.write_text(Tokenizer(models.BPE()).to_str(), encoding="utf-8")
    with pytest.raises(ValueError, match=r"plain\.json.*\[PAD\]"):
        RxTTokenizer.from_file(path)


# ---------------------------------------------------------------- prefix space


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


@pytest.mark.parametrize("word", ["memory", "decoder", "Rex", "437", "teacher"])
def test_prefix_space_gives_a_word_one_spelling(word: str) -> None:
    # An answer is encoded on its own: with the prefix space its ids are the ids the word has
    # inside a sentence, whatever the merges; without it, the start-of-text spelling differs.
    texts = [f"{s} {w} now." for s in _corpus(200) for w in ("memory", "decoder", "Rex", "437")]
    spaced = RxTTokenizer.train(texts, vocab_size=400, prefix_space=True)
    plain = RxTTokenizer.train(texts, vocab_size=400)
    assert spaced.prefix_space and not plain.prefix_space
    for sentence in (f"My dog is called {word}.", f"{word} is what I said.", f"so: {word}"):
        assert _contains(spaced.encode(sentence), spaced.encode(word)), sentence
    if word in ("memory", "decoder"):  # frequent in training: merged with their space
        assert not _contains(plain.encode(f"My dog is called {word}."), plain.encode(word))


def test_prefix_space_keeps_a_leading_space_apart() -> None:
    spaced = RxTTokenizer.train(_corpus(), vocab_size=300, prefix_space=True)
    assert spaced.encode(" x") != spaced.encode("x")
    assert spaced.decode(spaced.encode(" x")) == " x"
    # A window inside a text (streaming) keeps the space that separates it from the last word.
    ids = spaced.encode("the model reads")
    split = next(i for i in range(1, len(ids)) if spaced.decode(ids[i:], start=False)[0] == " ")
    assert spaced.decode(ids[:split]) + spaced.decode(ids[split:], start=False) == "the model reads"


def test_prefix_space_is_saved_with_the_tokenizer(tmp_path: Path) -> None:
    for flag in (False, True):
        trained = RxTTokenizer.train(_corpus(), vocab_size=300, prefix_space=flag)
        trained.save(tmp_path / f"{flag}.json")
        loaded = RxTTokenizer.from_file(tmp_path / f"{flag}.json")
        assert loaded.prefix_space is flag
        assert loaded.encode("my cat reads") == trained.encode("my cat reads")
