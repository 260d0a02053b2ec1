"""A saved model ready for text turns: what ``rxt chat`` and ``rxt serve`` load."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rxt.model.reactive_transformer import ReactiveTransformer


def load_text_model(model_dir: str, device_name: str) -> ReactiveTransformer:
    """A saved model with its tokenizer on ``device_name`` (``--device``); a user error
    raises ValueError or OSError with one line."""
    import torch

    from rxt.model.reactive_transformer import ReactiveTransformer

    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device_name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    model = ReactiveTransformer.from_pretrained(model_dir, device=device)
    if model.tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer.json, so text cannot be encoded")
    return model
