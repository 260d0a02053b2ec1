"""Model components: attention, feed-forward, decoder, encoder and the assembled RxT."""

from rxt.model.cache import KVCache, MemoryKV
from rxt.model.reactive_transformer import DecoderOutput, ReactiveTransformer

__all__ = ["DecoderOutput", "KVCache", "MemoryKV", "ReactiveTransformer"]
