"""STM export/import as bytes (rxt.engine.state): exact round trips, refusal of foreign state."""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from rxt import ReactiveTransformer, RxTConfig
from rxt.engine.state import (
    FORMAT,
    FORMAT_VERSION,
    RESERVED_KEYS,
    StateError,
    model_fingerprint,
    stm_from_bytes,
    stm_to_bytes,
)


def _model(seed: int = 0, **overrides: Any) -> ReactiveTransformer:
    torch.manual_seed(seed)
    return ReactiveTransformer(RxTConfig.preset("tiny", **overrides)).eval()


def _stm(model: ReactiveTransformer) -> torch.Tensor:
    """A used STM (1, L, S, d): one memory update after STM_0, so no value is trivial."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        return model.update_memory(model.initial_stm(1, generator=gen), ids)


@pytest.fixture(scope="module")
def model() -> ReactiveTransformer:
    return _model()


@pytest.fixture(scope="module")
def fp(model: ReactiveTransformer) -> str:
    return model_fingerprint(model)


@pytest.fixture(scope="module")
def stm(model: ReactiveTransformer) -> torch.Tensor:
    return _stm(model)


@pytest.fixture(scope="module")
def blob(stm: torch.Tensor, fp: str) -> bytes:
    return stm_to_bytes(stm, fingerprint=fp, metadata={"conversation": "c-1"})


def _load(data: Any, model: ReactiveTransformer, fp: str, **kwargs: Any):
    return stm_from_bytes(data, fingerprint=fp, shape=model.config.stm_shape, **kwargs)


def _resave(data: bytes, tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
    """``data`` re-written with its header metadata changed — a well-formed safetensors blob."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])["__metadata__"]
    return save(tensors if tensors is not None else load(data), metadata={**header, **meta})


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched", [True, False])
def test_round_trip_is_exact(model, fp, stm, dtype, batched):
    original = stm.to(dtype)
    data = stm_to_bytes(
        original if batched else original[0], fingerprint=fp, metadata={"turn": "7", "id": "x"}
    )
    assert isinstance(data, bytes)
    loaded, meta = _load(data, model, fp)
    assert loaded.shape == (1, *model.config.stm_shape)
    assert loaded.dtype == dtype
    assert torch.equal(loaded, original)
    assert meta == {"turn": "7", "id": "x"}  # the caller's metadata, exactly


def test_load_casts_to_requested_dtype_and_accepts_bytearray(model, fp, stm, blob):
    loaded, meta = _load(bytearray(blob), model, fp, device="cpu", dtype=torch.float64)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded, stm.double())
    assert meta == {"conversation": "c-1"}


def test_loaded_state_decodes_like_the_original(model, fp, stm, blob):
    loaded, _ = _load(blob, model, fp)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model.decode(ids, loaded), model.decode(ids, stm))


def test_batch_of_two_is_rejected(fp, stm):
    with pytest.raises(ValueError, match=r"one conversation.*\(2, 2, 32, 64\)"):
        stm_to_bytes(stm.expand(2, -1, -1, -1), fingerprint=fp)


@pytest.mark.parametrize("key", sorted(RESERVED_KEYS))
def test_reserved_metadata_key_is_rejected(fp, stm, key):
    with pytest.raises(ValueError, match=f"metadata key '{key}' is reserved"):
        stm_to_bytes(stm, fingerprint=fp, metadata={key: "x"})


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_deterministic(model, fp):
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert model_fingerprint(model) == fp
    assert model_fingerprint(_model()) == fp  # same seed, same weights


def test_fingerprint_changes_with_one_weight_element(model, fp):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.memory_attention.parameters().__next__().view(-1)[3] += 1e-3
    assert model_fingerprint(other) != fp


def test_fingerprint_changes_with_config_alone(model, fp):
    other = ReactiveTransformer(model.config.replace(norm_eps=1e-5)).eval()
    other.load_state_dict(model.state_dict())  # identical weights, different config
    assert model_fingerprint(other) != fp


def test_fingerprint_changes_with_stored_dtype(model, fp):
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fp


@pytest.mark.parametrize("tie", [False, True])
def test_fingerprint_survives_save_and_load(tmp_path, tie):
    original = _model(tie_embeddings=tie)
    original.save_pretrained(tmp_path)
    assert model_fingerprint(ReactiveTransformer.from_pretrained(tmp_path)) == model_fingerprint(
        original
    )


# ---------------------------------------------------------------------------- refusals
def test_refuses_state_from_a_model_with_other_weights(model, fp):
    other = _model(seed=1)
    other_fp = model_fingerprint(other)
    data = stm_to_bytes(_stm(other), fingerprint=other_fp)
    with pytest.raises(StateError, match="saved by another model") as info:
        _load(data, model, fp)
    assert other_fp[:12] in str(info.value) and fp[:12] in str(info.value)


def test_refuses_state_from_a_model_with_other_shape(model, fp):
    other = _model(memory={"num_slots": 16})
    data = stm_to_bytes(_stm(other), fingerprint=model_fingerprint(other))
    with pytest.raises(StateError, match="saved by another model"):
        _load(data, model, fp)


def test_refuses_shape_mismatch(fp, blob):
    with pytest.raises(
        StateError, match=r"expected \(L, S, d\) = \(2, 16, 64\), got \(2, 32, 64\)"
    ):
        stm_from_bytes(blob, fingerprint=fp, shape=(2, 16, 64))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 8, b"not a safetensors blob at all", bytes(range(256)) * 4],
    ids=["empty", "zeros", "text", "random"],
)
def test_refuses_non_safetensors_bytes(model, fp, data):
    with pytest.raises(StateError, match="not a readable safetensors blob"):
        _load(data, model, fp)


def test_refuses_non_bytes(model, fp, blob):
    with pytest.raises(StateError, match="must be bytes, got str"):
        _load(blob.decode("latin-1"), model, fp)


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 100, -100, -1])
def test_refuses_truncated_blob(model, fp, blob, cut):
    with pytest.raises(StateError, match="truncated or corrupt"):
        _load(blob[:cut], model, fp)


@settings(max_examples=60, deadline=None)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_refuses_blob_truncated_anywhere(model, fp, blob, fraction):
    with pytest.raises(StateError, match="truncated or corrupt"):
        _load(blob[: int(fraction * len(blob))], model, fp)


def test_refuses_plain_safetensors_without_our_metadata(model, fp, stm):
    with pytest.raises(StateError, match="not an rxt STM blob: format tag is None"):
        _load(save({"stm": stm[0]}), model, fp)


def test_refuses_wrong_format_tag(model, fp, blob):
    with pytest.raises(StateError, match="format tag is 'pt'"):
        _load(_resave(blob, format="pt"), model, fp)


def test_refuses_unsupported_version(model, fp, blob):
    assert FORMAT == "rxt-stm" and FORMAT_VERSION == "1"
    with pytest.raises(StateError, match="unsupported rxt STM version '2'"):
        _load(_resave(blob, version="2"), model, fp)


def test_refuses_missing_tensor(model, fp, stm, blob):
    with pytest.raises(StateError, match=r"exactly one tensor 'stm', found \['memory'\]"):
        _load(_resave(blob, {"memory": stm[0]}), model, fp)


def test_refuses_tampered_tensor_byte(model, fp, blob):
    tampered = bytearray(blob)
    tampered[-5] ^= 0x01  # inside the tensor data, which ends the blob
    with pytest.raises(StateError, match="checksum mismatch"):
        _load(bytes(tampered), model, fp)


def test_refuses_header_that_lies_about_dtype(model, fp, blob):
    with pytest.raises(StateError, match="does not match its header 'float16'"):
        _load(_resave(blob, dtype="float16"), model, fp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_state(model, fp, stm, bad):
    broken = stm.clone()
    broken[0, 1, 2, 3] = bad
    data = stm_to_bytes(broken, fingerprint=fp)  # checksum matches: only the values are bad
    with pytest.raises(StateError, match="non-finite"):
        _load(data, model, fp)
