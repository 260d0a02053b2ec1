"""Building blocks that know nothing of RxT: attention (MHA/GQA/MQA/SQA), RoPE, RMSNorm,
SwiGLU and Mixture-of-Experts feed-forward, activation checkpointing.

Each block takes its own small config or plain sizes; ``rxt.model`` builds them from the
validated ``RxTConfig``. Nothing here imports the rest of ``rxt`` (tests/test_layout.py).
"""

from rxt.nn.attention import Attention, AttentionBlockConfig, padding_mask
from rxt.nn.checkpointing import run_layer
from rxt.nn.feedforward import MoEBlockConfig, MoEFeedForward, SwiGLU
from rxt.nn.norm import RMSNorm
from rxt.nn.rope import RopeAngles, RotaryEmbedding

__all__ = [
    "Attention",
    "AttentionBlockConfig",
    "MoEBlockConfig",
    "MoEFeedForward",
    "RMSNorm",
    "RopeAngles",
    "RotaryEmbedding",
    "SwiGLU",
    "padding_mask",
    "run_layer",
]
