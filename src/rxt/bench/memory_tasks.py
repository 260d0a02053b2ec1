"""The tasks of the state-bytes benchmark: data splits and the one tokenizer every system uses.

A :class:`TaskSpec` names a task and its sizes; :func:`build_task` makes its splits (``train``,
``warmup``, ``valid``, ``test``) and tokenizer, the same for every system:

* ``mqar`` — multi-turn MQAR (:func:`rxt.data.mqar.generate_mqar`); ``warmup`` holds
  dialogues of one store turn and one query turn, the two-turn start that lets a memory begin
  to learn (docs/training.md, "SMAT alone does not start"); every system trains on it.
* ``mqar-sequence`` — Zoology's single-sequence form (:func:`generate_mqar_sequences`); for
  the stateless and recurrent models only (one turn never reaches RxT's memory).
* ``babi-qa1`` / ``babi-qa2`` — bAbI facts in Chit Chat conversation (:mod:`rxt.data.babi`);
  the background is split by conversation (:func:`rxt.data.chitchat.split_chitchat`), so no
  conversation appears in two splits. ``warmup``: one chat turn holding the facts, then the
  question.

Tokenizers: MQAR words are keys, values and "ok", one token each (:func:`word_tokenizer`), so a
value is one prediction as in Zoology. bAbI uses a byte-level BPE with the prefix space trained
on the training split (:meth:`rxt.tokenizer.RxTTokenizer.train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from rxt.data.babi import BabiConfig, babi_texts, generate_babi
from rxt.data.dialogue import Dialogue, read_dialogues, write_dialogues
from rxt.data.mqar import (
    MqarConfig,
    MqarSequenceConfig,
    generate_mqar,
    generate_mqar_sequences,
    mqar_splits,
    mqar_words,
)
from rxt.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, RxTTokenizer
from rxt.validated import Validated

__all__ = ["SPLITS", "TaskData", "TaskSpec", "build_task", "load_task", "word_tokenizer"]

TaskKind = Literal["mqar", "mqar-sequence", "babi-qa1", "babi-qa2"]
SPLITS = ("train", "warmup", "valid", "test")


@dataclass(frozen=True)
class TaskSpec(Validated):
    """One task: its kind, split sizes (dialogues) and the generator's settings for it (only
    the config of ``kind`` is read). ``seed`` fixes the data, whatever the training seed."""

    kind: TaskKind = "mqar"
    train: int = 4000
    warmup: int = 2000
    valid: int = 100
    test: int = 300
    seed: int = 0
    mqar: MqarConfig = field(default_factory=MqarConfig)
    sequence: MqarSequenceConfig = field(default_factory=MqarSequenceConfig)
    babi: BabiConfig = field(default_factory=BabiConfig)
    vocab_size: int = 1024  # the BPE of the bAbI tasks

    def validate(self) -> None:
        for name in ("train", "valid", "test"):
            self.require(name, getattr(self, name) >= 1, "must be >= 1")
        self.require("warmup", self.warmup >= 0, "must be >= 0")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def multi_turn(self) -> bool:
        """Whether answers need the memory of earlier turns (RxT takes part)."""
        return self.kind != "mqar-sequence"


@dataclass
class TaskData:
    spec: TaskSpec
    tokenizer: RxTTokenizer
    splits: dict[str, list[Dialogue]]


def word_tokenizer(words: list[str]) -> RxTTokenizer:
    """A word-level :class:`RxTTokenizer`: the special tokens, then one id per word; text is
    split on whitespace (an unknown word becomes ``[UNK]``)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return RxTTokenizer(tok)


def _mqar(spec: TaskSpec) -> tuple[dict[str, list[Dialogue]], RxTTokenizer]:
    sizes = {"test": spec.test, "valid": spec.valid, "train": spec.train}
    if spec.kind == "mqar-sequence":
        splits = mqar_splits(
            sizes, seed=spec.seed, generate=generate_mqar_sequences, config=spec.sequence
        )
        words = mqar_words(spec.sequence)
        splits["warmup"] = []
    else:
        splits = mqar_splits(sizes, seed=spec.seed, generate=generate_mqar, config=spec.mqar)
        two = dataclasses.replace(spec.mqar, store_turns=(1, 1), query_turns=(1, 1))
        held = {
            tuple((t.query, t.answer) for t in d.turns)
            for s in ("test", "valid")
            for d in splits[s]
        }
        warm = generate_mqar(spec.warmup, seed=spec.seed, config=two, split="warmup")
        splits["warmup"] = [
            d for d in warm if tuple((t.query, t.answer) for t in d.turns) not in held
        ]
        words = mqar_words(spec.mqar)
    return splits, word_tokenizer(words)


def _babi(spec: TaskSpec) -> tuple[dict[str, list[Dialogue]], RxTTokenizer]:
    from rxt.data.chitchat import chitchat_dialogues, split_chitchat

    config = dataclasses.replace(spec.babi, task=spec.kind.removeprefix("babi-"))
    parts = split_chitchat(
        chitchat_dialogues(max_turns=16, max_chars=config.max_chars), seed=spec.seed
    )
    splits = {
        name: generate_babi(
            getattr(spec, name), seed=spec.seed, background=parts[part], config=config, split=name
        )
        for name, part in (("train", "train"), ("valid", "valid"), ("test", "test"))
    }
    low = 2 if config.task == "qa2" else 1
    warm = dataclasses.replace(config, chat_turns=(low, low), facts=(low, low))
    splits["warmup"] = generate_babi(
        spec.warmup, seed=spec.seed, background=parts["train"], config=warm, split="warmup"
    )
    texts = [x for d in splits["train"] for t in d.turns for x in (t.query, t.answer)]
    tokenizer = RxTTokenizer.train(
        texts + babi_texts(), vocab_size=spec.vocab_size, prefix_space=True
    )
    return splits, tokenizer


def build_task(spec: TaskSpec, directory: str | Path | None = None) -> TaskData:
    """Splits and tokenizer of ``spec``; with ``directory``, also written there (JSONL per
    split, ``tokenizer.json``) so worker processes load instead of rebuilding."""
    splits, tokenizer = _babi(spec) if spec.kind.startswith("babi") else _mqar(spec)
    data = TaskData(spec, tokenizer, {name: splits[name] for name in SPLITS})
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, dialogues in data.splits.items():
            write_dialogues(directory / f"{name}.jsonl", dialogues)
        tokenizer.save(directory / TOKENIZER_FILE)
    return data


def load_task(spec: TaskSpec, directory: str | Path) -> TaskData:
    """What :func:`build_task` wrote to ``directory``."""
    directory = Path(directory)
    tokenizer = RxTTokenizer.from_file(directory / TOKENIZER_FILE)
    splits = {name: read_dialogues(directory / f"{name}.jsonl") for name in SPLITS}
    return TaskData(spec, tokenizer, splits)
