"""Short-Term Memory: its initial state, the memory-attention network and the residual gate."""

from rxt.memory.gate import ResidualGate
from rxt.memory.memory_attention import MemoryAttention
from rxt.memory.stm import StmInitializer

__all__ = ["MemoryAttention", "ResidualGate", "StmInitializer"]
