"""ds4py: a Python inference engine for DeepSeek V4 Flash GGUF files (ds4 layout)."""

from .config import EngineOptions, Shape
from .engine import ContextError, Engine, Session

__all__ = ["ContextError", "Engine", "EngineOptions", "Session", "Shape"]
