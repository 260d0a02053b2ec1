"""STM export/import as bytes (rxt.engine.state): exact round trips, refusal of foreign state."""

from __future__ import annotations

import base64
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
from rxt.engine import state as state_module
from rxt.engine.state import (
    FORMAT,
    FORMAT_VERSION,
    RESERVED_KEYS,
    StateError,
    model_fingerprint,
    stm_from_bytes,
    stm_from_tensor,
    stm_to_bytes,
)
from state_support import CountingHashlib


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


# ---------------------------------------------------------------------------- checksum opt-out
@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> CountingHashlib:
    counting = CountingHashlib()
    monkeypatch.setattr(state_module, "hashlib", counting)
    return counting


def _tamper_tensor(blob: bytes) -> bytes:
    tampered = bytearray(blob)
    tampered[-5] ^= 0x01  # inside the tensor data, which ends the blob (no NaN or inf made)
    return bytes(tampered)


def test_checksum_is_recomputed_by_default_and_skipped_on_request(model, fp, stm, blob, hashes):
    tensor_bytes = stm[0].numel() * stm.element_size()
    loaded, meta = _load(blob, model, fp)
    assert hashes.sizes == [tensor_bytes]  # the default: today's check, one hash
    hashes.sizes.clear()
    skipped, skipped_meta = _load(blob, model, fp, verify_checksum=False)
    assert hashes.sizes == []  # no hash at all
    assert torch.equal(skipped, loaded) and skipped_meta == meta == {"conversation": "c-1"}


def test_skipping_the_checksum_skips_only_the_checksum(model, fp, stm, blob):
    tampered = _tamper_tensor(blob)
    with pytest.raises(StateError, match="checksum mismatch"):
        _load(tampered, model, fp)  # the default still catches a tampered tensor
    loaded, _ = _load(tampered, model, fp, verify_checksum=False)  # as documented: not checked
    assert not torch.equal(loaded, stm)
    # Every other check still runs.
    nan = stm.clone()
    nan[0, 0, 0, 0] = float("nan")
    refusals = [
        (stm_to_bytes(nan, fingerprint=fp), fp, "non-finite"),
        (blob, "0" * 64, "saved by another model"),
        (_resave(blob, dtype="float16"), fp, "does not match its header"),
        (_resave(blob, version="2"), fp, "unsupported rxt STM version"),
        (blob[:-1], fp, "truncated or corrupt"),
    ]
    for data, fingerprint, message in refusals:
        with pytest.raises(StateError, match=message):
            _load(data, model, fingerprint, verify_checksum=False)
    with pytest.raises(TypeError):
        stm_from_bytes(blob, fp, model.config.stm_shape, None, None, False)  # keyword only


# Written by stm_to_bytes as it was before verify_checksum and stm_from_tensor existed: a (2, 3, 4)
# float32 tensor arange(24) / 8 - 1.5, fingerprint "f" * 64, metadata turns=3, c-old.
OLD_BLOB = base64.b64decode(
    "WAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJkdHlwZSI6ImZsb2F0MzIiLCJ0dXJucyI6IjMiLCJmb3JtYXQiOiJy"
    "eHQtc3RtIiwiZmluZ2VycHJpbnQiOiJmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZm"
    "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmIiwiY29udmVyc2F0aW9uX2lkIjoiYy1vbGQiLCJzaGFwZSI6IjIsMyw0Iiwi"
    "Y2hlY2tzdW0iOiIxODU5YjE3ZTc2MjJmNTAzMTRkNzFjYjNmYjcwNTVlZDE1NTM4ODdmOGJiMDdlZGNmMWUxNWIz"
    "YWJjMzJlZjU2IiwidmVyc2lvbiI6IjEifSwic3RtIjp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsyLDMsNF0sImRh"
    "dGFfb2Zmc2V0cyI6WzAsOTZdfX0gIAAAwL8AALC/AACgvwAAkL8AAIC/AABgvwAAQL8AACC/AAAAvwAAwL4AAIC+"
    "AAAAvgAAAAAAAAA+AACAPgAAwD4AAAA/AAAgPwAAQD8AAGA/AACAPwAAkD8AAKA/AACwPw=="
)


def _header(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])


def test_blob_written_before_the_change_loads_and_the_format_is_unchanged():
    expected = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 8 - 1.5
    for verify in (True, False):
        loaded, meta = stm_from_bytes(
            OLD_BLOB, fingerprint="f" * 64, shape=(2, 3, 4), verify_checksum=verify
        )
        assert torch.equal(loaded, expected.unsqueeze(0))
        assert meta == {"turns": "3", "conversation_id": "c-old"}
    # Today's writer makes the same blob (safetensors orders header keys at random, so the
    # header is compared parsed): format "1", the checksum still written, the same bytes.
    new = stm_to_bytes(
        expected, fingerprint="f" * 64, metadata={"turns": "3", "conversation_id": "c-old"}
    )
    assert _header(new) == _header(OLD_BLOB)
    assert _header(new)["__metadata__"]["version"] == FORMAT_VERSION == "1"
    assert len(new) == len(OLD_BLOB) and new.endswith(OLD_BLOB[-96:])


# ---------------------------------------------------------------------------- from a tensor
@pytest.mark.parametrize("batched", [True, False])
def test_stm_from_tensor_equals_the_bytes_path(model, fp, stm, blob, batched, hashes):
    via_bytes, _ = _load(blob, model, fp, dtype=torch.float64)
    hashes.sizes.clear()
    direct = stm_from_tensor(
        stm if batched else stm[0], shape=model.config.stm_shape, dtype=torch.float64
    )
    assert hashes.sizes == []  # no bytes, no hash
    assert direct.shape == (1, *model.config.stm_shape) and direct.dtype == torch.float64
    assert torch.equal(direct, via_bytes)


def test_stm_from_tensor_copies(model, stm):
    source = stm.clone()
    direct = stm_from_tensor(source, shape=model.config.stm_shape)
    source.zero_()  # the caller's tensor changing later must not change the memory
    assert torch.equal(direct, stm) and direct.data_ptr() != source.data_ptr()
    grad = stm.clone().requires_grad_()
    assert not stm_from_tensor(grad, shape=model.config.stm_shape).requires_grad


def test_stm_from_tensor_refuses_what_the_bytes_path_refuses(model, stm):
    shape = model.config.stm_shape
    with pytest.raises(
        StateError, match=r"stm shape mismatch: .*= \(2, 32, 64\), got \(2, 2, 32, 64\)"
    ):
        stm_from_tensor(stm.expand(2, -1, -1, -1), shape=shape)
    with pytest.raises(StateError, match=r"memory shape mismatch: .*got \(1, 2, 16, 64\)"):
        stm_from_tensor(stm[:, :, :16], shape=shape, name="memory")
    with pytest.raises(StateError, match=r"got \(32, 64\)"):
        stm_from_tensor(stm[0, 0], shape=shape)
    broken = stm.clone()
    broken[0, 1, 2, 3] = float("inf")
    with pytest.raises(StateError, match="stm holds non-finite values"):
        stm_from_tensor(broken, shape=shape)
    with pytest.raises(StateError, match=r"stm dtype torch\.int64 is not a floating-point"):
        stm_from_tensor(torch.zeros(shape, dtype=torch.long), shape=shape)
    with pytest.raises(TypeError, match="stm must be a tensor, got list"):
        stm_from_tensor(stm.tolist(), shape=shape)
