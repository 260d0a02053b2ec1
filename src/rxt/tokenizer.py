"""Byte-level BPE tokenizer with RxT's special tokens and interaction format.

The Reactive Transformer processes one *interaction* (a query and its answer) per event, and
the decoder sees a single interaction laid out as::

    [BOS] [Q] query tokens [A] answer tokens [EOS]

At inference the decoder is prefilled with the prompt ``[BOS] [Q] query [A]`` and generates
the answer until it emits ``[EOS]``. In training, the loss is therefore taken only on the
positions the model has to *produce*: the answer tokens and the closing ``[EOS]`` (so it
learns when to stop). The query is given by the user, so predicting it would waste capacity
on modelling the user rather than answering them.

Special tokens have fixed ids 0..7 (see :data:`SPECIAL_TOKENS`) so checkpoints and the rest
of the package can rely on them. They are only ever inserted *by id* by the formatting
helpers: user text that happens to contain e.g. ``"[A]"`` or ``"[EOS]"`` is tokenized as
ordinary bytes, so a user cannot inject control tokens into the sequence.

Byte-level BPE (on top of Hugging Face ``tokenizers``) means every UTF-8 string round-trips
exactly through :meth:`RxTTokenizer.encode` / :meth:`RxTTokenizer.decode`.

**Prefix space** (``RxTTokenizer.train(..., prefix_space=True)``, the GPT-2/RoBERTa
``add_prefix_space``). Byte-level BPE splits text into words that carry their leading space, so
without it a word has two spellings in ids: ``" Rex"`` inside a sentence and ``"Rex"`` at the
start of a text. An answer is encoded on its own, so "My dog is called Rex." states the value in
one spelling and the answer "Rex" must produce it in the other (measured with the demo's 512-token
vocabulary: ``" tea" "c" "her"`` against ``"t" "e" "a" "c" "her"``). With the prefix space every
text is encoded as ``" " + text`` and decoded without that one space, so a word is the same ids
wherever it stands. The choice is stored in ``tokenizer.json`` (the byte-level pre-tokenizer's
``add_prefix_space``), so a saved tokenizer encodes as it did when it was trained.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_FILE", "EncodedInteraction", "RxTTokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = (
    "[PAD]", "[BOS]", "[EOS]", "[Q]", "[A]", "[T]", "[MASK]", "[UNK]"
)  # fmt: skip
TOKENIZER_FILE = "tokenizer.json"

# Specials plus the 256-symbol byte alphabet: anything smaller cannot represent every byte.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


@dataclass(frozen=True)
class EncodedInteraction:
    """One formatted interaction; ``loss_mask[i] == 1`` where token ``i`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]


def _check_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


class _SpecialId:
    """Read-only ``int`` attribute: a special token's fixed id (also readable on the class)."""

    def __init__(self, token: str) -> None:
        self.id = SPECIAL_TOKENS.index(token)

    def __get__(self, obj: object, owner: type | None = None) -> int:
        return self.id

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError("special-token ids are fixed")


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    *,
    left: bool = False,
    pad_id: int = 0,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``ids (B, width)`` and ``attention_mask (B, width)`` (1 = real token),
    on the right (training, encoder, prefill) or the left (batched generation)."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


class RxTTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` whose first 8 ids are :data:`SPECIAL_TOKENS`.

    The wrapped tokenizer is modified in place: special-token parsing of input text is turned
    off (``encode_special_tokens = True``) and any truncation/padding is disabled, so that
    encoding never silently alters user text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer)}")
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            actual = tokenizer.token_to_id(token)
            if actual != expected_id:
                raise ValueError(
                    f"special token {token!r} must have id {expected_id}, got {actual} "
                    f"(required order: {', '.join(SPECIAL_TOKENS)})"
                )
        # Not serialized in tokenizer.json, so it must be re-applied on every load.
        tokenizer.encode_special_tokens = True
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        # The backend would add the space itself, but only before text that does not already
        # start with one: adding it here keeps " x" and "x" apart, so round trips stay exact.
        self._prefix = " " if getattr(tokenizer.pre_tokenizer, "add_prefix_space", False) else ""

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        min_frequency: int = 2,
        show_progress: bool = False,
        prefix_space: bool = False,
    ) -> RxTTokenizer:
        """Train a byte-level BPE tokenizer on an iterable of strings (a generator is fine);
        ``prefix_space``: encode every text as ``" " + text`` (module docstring)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
                f"({len(SPECIAL_TOKENS)} special tokens + 256 byte symbols)"
            )
        if isinstance(texts, str):  # a bare str would silently train on its characters
            raise TypeError("texts must be an iterable of str, not a single str")

        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=list(SPECIAL_TOKENS),
            # The full byte alphabet, never pruned, guarantees lossless round trips.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )

        def checked() -> Iterator[str]:
            # The Rust side reports non-str items with an unhelpful message.
            for i, text in enumerate(texts):
                yield _check_str(text, f"texts[{i}]")

        tok.train_from_iterator(checked(), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RxTTokenizer:
        """Load from a ``tokenizer.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {str(path)!r}")
        data = path.read_bytes()
        try:
            return cls(Tokenizer.from_str(data.decode("utf-8")))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"could not load tokenizer from {str(path)!r}: {err}") from err

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> RxTTokenizer:
        """Load ``directory/tokenizer.json``."""
        return cls.from_file(Path(directory) / TOKENIZER_FILE)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer JSON to ``path`` atomically (a crash never leaves a torn file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``directory/tokenizer.json`` (creating the directory if needed)."""
        self.save(Path(directory) / TOKENIZER_FILE)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # Ids are fixed (validated in __init__), so these are read-only constants.
    pad_id = _SpecialId("[PAD]")
    bos_id = _SpecialId("[BOS]")
    eos_id = _SpecialId("[EOS]")
    query_id = _SpecialId("[Q]")
    answer_id = _SpecialId("[A]")
    think_id = _SpecialId("[T]")
    mask_id = _SpecialId("[MASK]")
    unk_id = _SpecialId("[UNK]")

    @property
    def prefix_space(self) -> bool:
        """Whether every text is encoded as ``" " + text`` (module docstring)."""
        return bool(self._prefix)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; no special tokens are added or recognised in ``text``."""
        text = _check_str(text, "text")
        if text:  # the space goes before a first word: an empty text stays no ids
            text = self._prefix + text
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(
        self,
        ids: Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = True,
        *,
        start: bool = True,
    ) -> str:
        """Ids to text. Ids beyond the vocabulary (e.g. a padded embedding) are dropped.
        ``start=False``: the ids continue a text (a streaming window), so a prefix-space
        tokenizer keeps their leading space, which then separates two words."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be non-negative, got {min(ids)}")
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if start and self._prefix and text.startswith(self._prefix):
            return text[len(self._prefix) :]
        return text

    def encode_query(self, query: str) -> list[int]:
        """The inference prompt ``[BOS][Q] query [A]``."""
        query_ids = self.encode(_check_str(query, "query"))
        return [self.bos_id, self.query_id, *query_ids, self.answer_id]

    def encode_system(self, text: str) -> list[int]:
        """A system prompt as turn 0 of a conversation: ``[BOS] text [EOS]`` (no query/answer
        markers, so the model can tell instructions from dialogue)."""
        return [self.bos_id, *self.encode(_check_str(text, "system prompt")), self.eos_id]

    def encode_interaction(
        self, query: str, answer: str | None = None, max_length: int | None = None
    ) -> EncodedInteraction:
        """Format ``[BOS][Q] query [A] answer [EOS]``, or just the prompt if ``answer`` is None.

        Query and answer are encoded separately so no BPE merge crosses the boundary.
        Raises ValueError (never truncates) if the result is longer than ``max_length``.
        """
        _check_positive(max_length, "max_length")
        prompt = self.encode_query(query)
        if answer is None:
            ids, mask = prompt, [0] * len(prompt)
        else:
            answer_ids = [*self.encode(_check_str(answer, "answer")), self.eos_id]
            ids = prompt + answer_ids
            mask = [0] * len(prompt) + [1] * len(answer_ids)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"interaction is {len(ids)} tokens long, exceeding max_length={max_length}"
            )
        return EncodedInteraction(input_ids=ids, loss_mask=mask)

    def batch_encode_interactions(
        self,
        pairs: Sequence[tuple[str, str | None]],
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode and right-pad a batch with [PAD].

        Returns LongTensors ``input_ids``, ``attention_mask`` (1 = real token) and
        ``loss_mask``, all of shape ``[B, T]``. ``T`` is the longest sequence rounded up to
        ``pad_to_multiple_of`` but never above ``max_length``: the multiple is a speed hint,
        while ``max_length`` is a hard limit (e.g. the model's context size).
        """
        _check_positive(max_length, "max_length")
        _check_positive(pad_to_multiple_of, "pad_to_multiple_of")
        if len(pairs) == 0:
            raise ValueError("pairs must contain at least one (query, answer) pair")
        encoded = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, answer) pair, got {pair!r}")
            try:
                encoded.append(self.encode_interaction(pair[0], pair[1], max_length))
            except (TypeError, ValueError) as err:
                raise type(err)(f"pairs[{i}]: {err}") from err

        width = max(len(e.input_ids) for e in encoded)
        if pad_to_multiple_of is not None:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
            if max_length is not None:
                width = min(width, max_length)
        input_ids, attention_mask = pad_sequences(
            [e.input_ids for e in encoded], pad_id=self.pad_id, width=width
        )
        loss_mask, _ = pad_sequences([e.loss_mask for e in encoded], width=width)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}

    def __repr__(self) -> str:
        return f"RxTTokenizer(vocab_size={self.vocab_size})"
