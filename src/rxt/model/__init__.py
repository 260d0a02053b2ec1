"""Model components: attention, feed-forward, decoder, encoder, the Short-Term Memory
(``model.memory``), the assembled RxT and its checkpoints (``model.checkpoint``)."""

from rxt.model.cache import KVCache, MemoryKV
from rxt.model.reactive_transformer import DecoderOutput, ReactiveTransformer

__all__ = ["DecoderOutput", "KVCache", "MemoryKV", "ReactiveTransformer"]
