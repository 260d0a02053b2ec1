"""Saving and loading models: safetensors only, exact round trips, clear errors
(rxt.model.checkpoint)."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

import rxt.model.checkpoint as checkpoint
from rxt import ReactiveTransformer, RxTConfig, RxTTokenizer
from rxt.model.checkpoint import CheckpointError

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a reactive transformer answers from its short-term memory",
    "memory slots form a set and carry no position",
    "hello world, hello memory, hello attention",
] * 20


# ---------------------------------------------------------------------------- helpers
def _model(seed: int = 0, **overrides: Any) -> ReactiveTransformer:
    torch.manual_seed(seed)
    return ReactiveTransformer(RxTConfig.preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    return RxTTokenizer.train(TEXTS, vocab_size=300)


def _inputs(model: ReactiveTransformer, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, model.config.vocab_size, (2, 10), generator=gen)
    stm = model.initial_stm(2, generator=gen)
    return ids, stm


def _outputs(model: ReactiveTransformer, ids: torch.Tensor, stm: torch.Tensor):
    with torch.no_grad():
        return model.decode(ids, stm.to(model.dtype)), model.update_memory(stm, ids)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_same_model(a: ReactiveTransformer, b: ReactiveTransformer) -> None:
    ids, stm = _inputs(a)
    logits_a, stm_a = _outputs(a, ids, stm)
    logits_b, stm_b = _outputs(b, ids, stm)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(stm_a, stm_b)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"memory": {"stm_init": "learned", "variant": "gated-self-interlayer"}},
        {"decoder": {"moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32}}, "mlm_head": False},
    ],
    ids=["tiny", "tied", "learned-stm", "moe-no-mlm"],
)
def test_save_load_round_trip_is_exact(tmp_path: Path, overrides: dict[str, Any]) -> None:
    model = _model(**overrides)
    with torch.no_grad():  # non-trivial gates, so a lost gate parameter would show
        for name, p in model.named_parameters():
            if ".gate." in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path)
    assert _files(tmp_path) == ["config.json", "model.safetensors"]

    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    assert loaded.tokenizer is None
    _assert_same_model(model, loaded)
    assert torch.equal(model.initial_stm(3), loaded.initial_stm(3)) or (
        model.config.memory.stm_init == "random"
    )
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key


def test_tied_embeddings_stay_tied_and_are_stored_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _model(tie_embeddings=True)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["format"] == "pt"
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight
    loaded64 = ReactiveTransformer.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded64.lm_head.weight is loaded64.embed.weight


def test_learned_stm_is_saved(tmp_path: Path) -> None:
    model = _model(memory={"stm_init": "learned"})
    with torch.no_grad():
        model.stm_init.stm.normal_(generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path)
    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    assert torch.equal(loaded.initial_stm(2), model.initial_stm(2))


def test_no_pickle_files_written(tmp_path: Path, tokenizer: RxTTokenizer) -> None:
    model = _model()
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path)
    assert _files(tmp_path) == ["config.json", "model.safetensors", "tokenizer.json"]
    for path in tmp_path.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path.name} looks like a pickle"  # pickle protocol 2+
        assert head != b"PK", f"{path.name} looks like a torch.save zip archive"
    json.loads((tmp_path / "config.json").read_text())
    json.loads((tmp_path / "tokenizer.json").read_text())


def test_tokenizer_saved_and_reloaded(tmp_path: Path, tokenizer: RxTTokenizer) -> None:
    assert tokenizer.vocab_size <= 300
    model = _model()
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path)
    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    assert isinstance(loaded.tokenizer, RxTTokenizer)
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size
    for text in [*TEXTS[:4], "unseen wörds ✓ 123", ""]:
        assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
        assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    pair = loaded.tokenizer.encode_interaction("hello", "world")
    assert pair == tokenizer.encode_interaction("hello", "world")


def test_save_overwrites_previous_model(tmp_path: Path) -> None:
    _model(seed=0).save_pretrained(tmp_path)
    second = _model(seed=1)
    second.save_pretrained(tmp_path)
    assert _files(tmp_path) == ["config.json", "model.safetensors"]
    _assert_same_model(second, ReactiveTransformer.from_pretrained(tmp_path))


def test_save_creates_nested_directory(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    _model().save_pretrained(target)
    assert _files(target) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------- dtype / device
def test_load_with_device_and_dtype(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = ReactiveTransformer.from_pretrained(tmp_path, device="cpu", dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.device == torch.device("cpu")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert not loaded.training and not any(m.training for m in loaded.modules())
    ids, stm = _inputs(model)
    logits32, stm32 = _outputs(model, ids, stm)
    logits64, stm64 = _outputs(loaded, ids, stm)
    assert logits64.dtype == torch.float64 and stm64.dtype == torch.float64
    # Same weights, higher precision: float32 rounding only (logits are O(1)).
    torch.testing.assert_close(logits64.float(), logits32, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stm64.float(), stm32, atol=1e-5, rtol=1e-4)


def test_loaded_model_is_in_eval_mode(tmp_path: Path) -> None:
    model = _model().train()
    model.save_pretrained(tmp_path)
    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    assert not any(m.training for m in loaded.modules())


# ---------------------------------------------------------------------------- corrupt files
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    _model().save_pretrained(tmp_path)
    return tmp_path


def _cut_points(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return {
        "empty": 0,
        "inside-length-prefix": 4,
        "after-length-prefix": 8,
        "inside-header": 8 + header // 2,
        "after-header": 8 + header,
        "middle-of-data": 8 + header + (len(data) - 8 - header) // 2,
        "last-byte-missing": len(data) - 1,
    }


@pytest.mark.parametrize(
    "cut",
    [
        "empty",
        "inside-length-prefix",
        "after-length-prefix",
        "inside-header",
        "after-header",
        "middle-of-data",
        "last-byte-missing",
    ],
)
def test_truncated_weights_raise_checkpoint_error(saved: Path, cut: str) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: _cut_points(weights)[cut]])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        ReactiveTransformer.from_pretrained(saved)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_garbage_weights_raise_checkpoint_error(saved: Path, seed: int) -> None:
    weights = saved / "model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    garbage = torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    if seed == 2:  # a plausible small header length followed by non-JSON bytes
        garbage = struct.pack("<Q", 100) + garbage[:200]
    weights.write_bytes(garbage)
    with pytest.raises(CheckpointError) as info:
        ReactiveTransformer.from_pretrained(saved)
    assert str(weights) in str(info.value)


def _rewrite_config(directory: Path, **changes: Any) -> None:
    data = json.loads((directory / "config.json").read_text())
    data.update(changes)
    (directory / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"d_model": 32}, ["shape (64, 64) in file, (32, 32) expected from config.json"]),
        ({"num_layers": 3}, ["missing tensors", "layers.2."]),
        ({"num_layers": 1}, ["unexpected tensors", "layers.1."]),
        ({"vocab_size": 512}, ["embed.weight", "shape"]),
        ({"mlm_head": False}, ["unexpected tensors", "mlm_head"]),
        ({"tie_embeddings": True}, ["unexpected tensors", "lm_head.weight"]),
        ({"memory": {"num_slots": 32, "stm_init": "learned"}}, ["missing tensors", "stm_init"]),
    ],
    ids=["d_model", "more-layers", "fewer-layers", "vocab", "no-mlm", "tied", "learned-stm"],
)
def test_config_and_weights_disagree(saved: Path, changes: dict, needles: list[str]) -> None:
    _rewrite_config(saved, **changes)
    with pytest.raises(CheckpointError) as info:
        ReactiveTransformer.from_pretrained(saved)
    message = str(info.value)
    assert str(saved / "model.safetensors") in message
    assert "config.json" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_weights_file(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: no such file") as info:
        ReactiveTransformer.from_pretrained(saved)
    assert str(saved / "model.safetensors") in str(info.value)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_is_refused(saved: Path, name: str) -> None:
    (saved / "model.safetensors").unlink()
    # Not even a real pickle: it must never be opened.
    (saved / name).write_bytes(b"\x80\x04this would be unpickled")
    with pytest.raises(FileNotFoundError) as info:
        ReactiveTransformer.from_pretrained(saved)
    message = str(info.value)
    assert "model.safetensors" in message and name in message
    assert "pickle checkpoints are not loaded" in message


def test_bad_config_in_checkpoint(saved: Path) -> None:
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        ReactiveTransformer.from_pretrained(saved)
    assert str(saved / "config.json") in str(info.value)


def test_missing_directory_and_file_path(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        ReactiveTransformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="expected a model directory"):
        ReactiveTransformer.from_pretrained(saved / "model.safetensors")


def test_tokenizer_larger_than_vocab(tmp_path: Path, tokenizer: RxTTokenizer) -> None:
    small_vocab = tokenizer.vocab_size - 10
    assert small_vocab >= 264
    model = _model(vocab_size=small_vocab)
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")  # e.g. copied in by hand: save would refuse
    with pytest.raises(CheckpointError) as info:
        ReactiveTransformer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "tokenizer.json") in message
    assert str(tokenizer.vocab_size) in message and f"vocab_size is {small_vocab}" in message


def test_corrupt_tokenizer_names_file(saved: Path) -> None:
    (saved / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError) as info:
        ReactiveTransformer.from_pretrained(saved)
    assert "tokenizer.json" in str(info.value)


# ---------------------------------------------------------------------------- Hub, offline
def test_unavailable_hub_repo_offline_does_not_touch_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    attempts: list[Any] = []

    def no_network(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.chdir(tmp_path)  # so the repo id cannot be a relative local directory

    repo = "rxt-tests-nonexistent/definitely-not-a-model"
    with pytest.raises(FileNotFoundError) as info:
        ReactiveTransformer.from_pretrained(repo, local_files_only=True)
    message = str(info.value)
    assert repo in message and "Hugging Face Hub" in message
    assert attempts == []


# ---------------------------------------------------------------------------- atomic saves
class _DiskFull(OSError):
    pass


def _failing_save_file(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make checkpoint.save_file write its (temporary) file completely, then fail."""
    real = checkpoint.save_file
    written: list[str] = []

    def save_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        written.append(os.fspath(filename))
        raise _DiskFull("simulated failure after the temporary file was written")

    monkeypatch.setattr(checkpoint, "save_file", save_then_fail)
    return written


@pytest.mark.parametrize(
    "new_overrides",
    [{}, {"num_layers": 3}, {"d_model": 32}],
    ids=["same-config", "more-layers", "other-width"],
)
def test_interrupted_save_leaves_previous_model_intact(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tokenizer: RxTTokenizer,
    new_overrides: dict[str, Any],
) -> None:
    old = _model(seed=0)
    old.tokenizer = tokenizer
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}

    new = _model(seed=1, **new_overrides)
    new.tokenizer = RxTTokenizer.train(TEXTS[:8], vocab_size=280)
    written = _failing_save_file(monkeypatch)
    with pytest.raises(_DiskFull):
        new.save_pretrained(tmp_path)
    assert written, "the patched save_file was not used"
    assert not os.path.exists(written[0]), "temporary weights file left behind"

    # Every file of the previous model is byte-identical, and nothing else is there.
    assert _files(tmp_path) == sorted(before)
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was modified"
    monkeypatch.undo()
    loaded = ReactiveTransformer.from_pretrained(tmp_path)
    _assert_same_model(old, loaded)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size


def test_saving_without_tokenizer_removes_a_stale_one(tmp_path):
    model = ReactiveTransformer(RxTConfig.preset("tiny"))
    model.tokenizer = RxTTokenizer.train(["a small corpus", "of two lines"], vocab_size=300)
    model.save_pretrained(tmp_path)
    model.tokenizer = None
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert ReactiveTransformer.from_pretrained(tmp_path).tokenizer is None


def test_save_refuses_tokenizer_larger_than_vocab(tmp_path):
    model = ReactiveTransformer(RxTConfig.preset("tiny", vocab_size=280))
    model.tokenizer = RxTTokenizer.train(
        [f"word{i} token{i * 7}" for i in range(300)], vocab_size=400
    )
    assert model.tokenizer.vocab_size > 280
    with pytest.raises(ValueError, match="vocab_size"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
