"""rxt — an open implementation of the Reactive Transformer (RxT, arXiv:2510.03561).

>>> from rxt import RxTConfig, ReactiveTransformer
>>> model = ReactiveTransformer(RxTConfig.preset("tiny"))
>>> stm = model.initial_stm(batch_size=1)
"""

from rxt.config import ConfigError, RxTConfig
from rxt.model import DecoderOutput, KVCache, MemoryKV, ReactiveTransformer
from rxt.tokenizer import EncodedInteraction, RxTTokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DecoderOutput",
    "EncodedInteraction",
    "KVCache",
    "MemoryKV",
    "ReactiveTransformer",
    "RxTConfig",
    "RxTTokenizer",
    "__version__",
]
