"""Short-Term Memory: its initial state, the memory-attention network and the residual gate."""

from rxt.model.memory.gate import ResidualGate
from rxt.model.memory.memory_attention import MemoryAttention
from rxt.model.memory.stm import StmInitializer

__all__ = ["MemoryAttention", "ResidualGate", "StmInitializer"]
