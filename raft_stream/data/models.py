"""Model names that raft-stream builds itself: ``demo`` and ``tiny``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from raft_stream.data.demo_model import ensure_demo_model
from raft_stream.data.tiny_model import ensure_tiny_model

__all__ = ["BUILT_IN_MODELS", "resolve_model"]

BUILT_IN_MODELS: dict[str, Callable[[], Path]] = {
    "demo": ensure_demo_model,
    "tiny": ensure_tiny_model,
}
"""Names resolved to a cached local folder, built on first use."""


def resolve_model(name_or_path: str) -> str:
    """The folder for ``demo`` or ``tiny``; any other name or path is returned unchanged.

    Example:
        >>> resolve_model("tiny")  # doctest: +SKIP
        '/root/.cache/raft-stream/tiny-model-v1'
        >>> resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    ensure = BUILT_IN_MODELS.get(name_or_path)
    return str(ensure()) if ensure else name_or_path
