"""Event-driven inference engine (paper §4): streaming turns, batched decoding, and the memory
update on its own thread."""

from rxt.engine.conversation import Conversation, UpdateEvent
from rxt.engine.engine import Engine, EngineStats
from rxt.engine.sampling import SamplingParams
from rxt.engine.state import StateError, model_fingerprint
from rxt.engine.stream import EngineError, Piece, TurnResult, TurnStream
from rxt.engine.updater import UpdateTiming

__all__ = [
    "Conversation",
    "Engine",
    "EngineError",
    "EngineStats",
    "Piece",
    "SamplingParams",
    "StateError",
    "TurnResult",
    "TurnStream",
    "UpdateEvent",
    "UpdateTiming",
    "model_fingerprint",
]
