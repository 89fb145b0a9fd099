"""Generation backends: vLLM (main), transformers.generate (fallback), OpenAI-compatible HTTP."""

from raft_stream.generation.base import Generator, SamplingParams, build_generator

__all__ = ["Generator", "SamplingParams", "build_generator"]
