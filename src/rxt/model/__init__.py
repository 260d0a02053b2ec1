"""The RxT model: decoder, encoder, the Short-Term Memory (``model.memory``), the assembled
model and its checkpoints (``model.checkpoint``), built from the blocks of ``rxt.nn``."""

from rxt.model.cache import KVCache, MemoryKV
from rxt.model.reactive_transformer import DecoderOutput, ReactiveTransformer

__all__ = ["DecoderOutput", "KVCache", "MemoryKV", "ReactiveTransformer"]
