"""Model names that raft-stream builds itself: the presets' ``demo`` and ``tiny``."""

from __future__ import annotations

from raft_stream.presets import MODEL_PRESETS

__all__ = ["resolve_model"]


def resolve_model(name_or_path: str) -> str:
    """The folder of a built-in model (raft_stream.presets, built on first use); any other
    name or path is returned unchanged.

    Example:
        >>> resolve_model("tiny")  # doctest: +SKIP
        '/root/.cache/raft-stream/tiny-model-v1'
        >>> resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    preset = MODEL_PRESETS.get(name_or_path)
    return str(preset.ensure()) if preset else name_or_path
