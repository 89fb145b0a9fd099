"""Generation backends: vLLM (main), transformers.generate (fallback), OpenAI-compatible HTTP."""

from raft_stream.generation.base import (
    MAX_LORAS,
    EngineDeadError,
    GenerationError,
    GenerationStats,
    GenerationUnavailableError,
    Generator,
    SamplingParams,
    build_generator,
)

__all__ = [
    "MAX_LORAS",
    "EngineDeadError",
    "GenerationError",
    "GenerationStats",
    "GenerationUnavailableError",
    "Generator",
    "SamplingParams",
    "build_generator",
]
