"""A conversation's STM exported as bytes, and imported only into the model that made it.

Between turns a conversation *is* its STM ``(L, S, d)``, so storing those bytes suspends it and
loading them resumes it — on another process or machine. An STM is meaningful only to the
weights that wrote it: one of the right shape from another model (a different checkpoint, or
the same one fine-tuned) loads without complaint and then decodes nonsense. Every blob
therefore carries the writing model's fingerprint and a sha256 checksum of its tensor bytes, and
:func:`stm_from_bytes` refuses anything that does not match, with a one-line reason.

The checksum is recomputed on every load unless the caller passes ``verify_checksum=False``,
which is for bytes whose integrity was just verified some other way: the server's state store
keeps a sha256 of the whole blob (which covers the tensor bytes) and checks it on every read,
so checking the tensor bytes again would only hash them twice. Every other check (format,
fingerprint, shape, dtype, finite values) runs either way. :func:`stm_from_tensor` applies the
same shape and value checks to an STM that is already a tensor, with no bytes in between.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

if TYPE_CHECKING:
    from rxt.model.reactive_transformer import ReactiveTransformer

FORMAT = "rxt-stm"
FORMAT_VERSION = "1"
TENSOR_NAME = "stm"
RESERVED_KEYS = frozenset({"format", "version", "fingerprint", "shape", "dtype", "checksum"})


class StateError(ValueError):
    """An STM (serialised, or a tensor) that cannot be used with this model (message says why)."""


def _raw(t: torch.Tensor) -> memoryview:
    # reshape(-1): a 0-dim tensor cannot be viewed as another element size.
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw(t)).hexdigest()


def _require_finite(what: str, t: torch.Tensor) -> None:
    # One NaN in the memory spreads to every later answer and update: refuse it at the door.
    if not torch.isfinite(t).all():
        raise StateError(f"{what} holds non-finite values (NaN or inf)")


def model_fingerprint(model: ReactiveTransformer) -> str:
    """sha256 of the config and every state_dict tensor as stored (name, dtype, shape, bytes).

    Not cached: weights change in training, and a stale fingerprint would accept foreign
    state. Compute it once per loaded model (a full pass over the weights)."""
    h = hashlib.sha256(b"rxt-model-fingerprint/1\0")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode() + b"\0")
    for name, t in sorted(model.state_dict().items()):
        # Name, dtype and shape are \0-terminated and fix the data length: no ambiguity.
        h.update(f"{name}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(_raw(t))
    return h.hexdigest()


def stm_to_bytes(
    stm: torch.Tensor, *, fingerprint: str, metadata: Mapping[str, str] | None = None
) -> bytes:
    """One conversation's STM ``(1, L, S, d)`` or ``(L, S, d)`` → safetensors bytes.

    ``fingerprint`` is :func:`model_fingerprint` of the model whose STM this is; ``metadata``
    is free-form strings for the caller (conversation id, turn number), returned on load."""
    if not isinstance(stm, torch.Tensor):
        raise TypeError(f"stm must be a tensor, got {type(stm).__name__}")
    if stm.dim() == 4 and stm.shape[0] == 1:
        stm = stm[0]
    if stm.dim() != 3:
        raise ValueError(
            f"stm must be one conversation's (1, L, S, d) or (L, S, d), got {tuple(stm.shape)}"
        )
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key in RESERVED_KEYS:
            raise ValueError(
                f"metadata key {key!r} is reserved ({', '.join(sorted(RESERVED_KEYS))})"
            )
    tensor = stm.detach().cpu().contiguous()
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "shape": ",".join(str(n) for n in tensor.shape),
        "dtype": _dtype_name(tensor.dtype),
        # Always written, whoever reads it: readers of format 1 (older rxt included) need it.
        "checksum": _checksum(tensor),
    }
    return save({TENSOR_NAME: tensor}, metadata={**extra, **header})


def _parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load(data)  # validates the whole layout: header, offsets, data length
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise StateError(
            f"not a readable safetensors blob ({len(data)} bytes): truncated or corrupt ({exc})"
        ) from exc
    # safetensors returns no metadata from bytes; the header (known valid now) holds it.
    (size,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return tensors, metadata


def stm_from_bytes(
    data: bytes,
    *,
    fingerprint: str,
    shape: tuple[int, int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify_checksum: bool = True,
) -> tuple[torch.Tensor, dict[str, str]]:
    """Inverse of :func:`stm_to_bytes`: ``(stm (1, L, S, d), caller metadata)``.

    ``fingerprint`` and ``shape`` (``config.stm_shape``) describe the model that will use the
    state; anything saved by another model, altered, or not finite raises :class:`StateError`.
    ``verify_checksum=False`` skips recomputing the tensor checksum, and only that: pass it
    only for ``data`` whose bytes were verified just before (as the server's store does with
    a sha256 of the whole blob); altered tensor bytes are otherwise not detected."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StateError(f"serialised STM must be bytes, got {type(data).__name__}")
    tensors, meta = _parse(bytes(data))
    if meta.get("format") != FORMAT:
        raise StateError(
            f"not an rxt STM blob: format tag is {meta.get('format')!r}, not {FORMAT!r}"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise StateError(
            f"unsupported rxt STM version {meta.get('version')!r} "
            f"(this rxt reads {FORMAT_VERSION!r})"
        )
    if set(tensors) != {TENSOR_NAME}:
        raise StateError(f"expected exactly one tensor {TENSOR_NAME!r}, found {sorted(tensors)}")
    saved = meta.get("fingerprint", "")
    if saved != fingerprint:
        raise StateError(
            f"STM was saved by another model (fingerprint {saved[:12]!r}, this model is "
            f"{fingerprint[:12]!r}); it is meaningless to these weights"
        )
    tensor = tensors[TENSOR_NAME]
    got = tuple(tensor.shape)
    if got != tuple(shape) or meta.get("shape") != ",".join(map(str, got)):
        raise StateError(f"STM shape mismatch: expected (L, S, d) = {tuple(shape)}, got {got}")
    if meta.get("dtype") != _dtype_name(tensor.dtype) or not tensor.is_floating_point():
        raise StateError(
            f"STM dtype {tensor.dtype} does not match its header {meta.get('dtype')!r}"
        )
    if verify_checksum and _checksum(tensor) != meta.get("checksum"):
        raise StateError("STM checksum mismatch: the tensor bytes were altered after saving")
    _require_finite("STM", tensor)
    extra = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
    return tensor.to(device=device, dtype=dtype).unsqueeze(0), extra


def stm_from_tensor(
    stm: torch.Tensor,
    *,
    shape: tuple[int, int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str = "stm",
) -> torch.Tensor:
    """One conversation's STM ``(1, L, S, d)`` or ``(L, S, d)`` as a checked ``(1, L, S, d)``
    copy on ``device``/``dtype`` — what :func:`stm_from_bytes` returns, without the bytes.

    ``shape`` is ``config.stm_shape``; a tensor of another shape, not floating point, or with
    a NaN or inf raises :class:`StateError` naming ``name`` (the caller's argument). A tensor
    carries no fingerprint: that it belongs to this model is the caller's word. The result is
    a copy, so the caller's tensor and the conversation's memory never alias."""
    if not isinstance(stm, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(stm).__name__}")
    got = tuple(stm.shape)
    tensor = stm.detach()
    if tensor.dim() == 4 and got[0] == 1:
        tensor = tensor[0]
    if tuple(tensor.shape) != tuple(shape):
        raise StateError(
            f"{name} shape mismatch: expected one conversation's (1, L, S, d) or (L, S, d) "
            f"with (L, S, d) = {tuple(shape)}, got {got}"
        )
    if not tensor.is_floating_point():
        raise StateError(f"{name} dtype {tensor.dtype} is not a floating-point type")
    _require_finite(name, tensor)
    return tensor.to(device=device, dtype=dtype, copy=True).unsqueeze(0)
