"""The built-in models and the settings each brings: one ``ModelPreset`` per name.

A preset's settings are the ones measured to learn on that model. ``load_config`` applies
them as the lowest layer above the defaults whenever ``model.name_or_path`` names a preset;
a YAML file, ``RAFT_STREAM_*`` variables and overrides all beat them. The model's context
length is not a preset setting: ``model.max_model_len`` defaults to the model's own.

This module stays light (``raft_stream.config`` imports it): the builders import torch
only when called.

Example:
    >>> MODEL_PRESETS["tiny"].settings["training.learning_rate"]
    0.003
    >>> sorted(MODEL_PRESETS)
    ['demo', 'tiny']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["MODEL_PRESETS", "ModelPreset"]


@dataclass(frozen=True)
class ModelPreset:
    """A built-in model: how to build it and the settings it brings."""

    name: str
    """The ``model.name_or_path`` that selects it."""

    title: str
    """What it is, in a few words."""

    ensure: Callable[[], Path]
    """Builds the model folder on first use (then cached) and returns it."""

    settings: Mapping[str, Any]
    """Recommended settings as dotted keys (``{"training.learning_rate": 3e-3}``)."""


def _ensure_tiny() -> Path:
    from raft_stream.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def _ensure_demo() -> Path:
    from raft_stream.data.demo_model import ensure_demo_model

    return ensure_demo_model()


TINY = ModelPreset(
    name="tiny",
    title="the tiny test model, built once",
    ensure=_ensure_tiny,
    # Measured by tests/test_offline_raft.py: 5 iterations of 64 prompts raise the held-out
    # VADER reward far beyond seed noise (docs/raft.md, "Tiny test model").
    settings=MappingProxyType(
        {
            "generation.max_lora_rank": 8,
            "generation.enforce_eager": True,  # starts in seconds; steps are tiny anyway
            "generation.sampling.k": 8,
            "generation.sampling.max_new_tokens": 24,
            "ranking.min_response_tokens": 2,
            "training.lora_r": 8,
            "training.lora_alpha": 16,
            "training.learning_rate": 3e-3,
            "training.epochs": 2,
            "training.batch_size": 16,
        }
    ),
)

DEMO = ModelPreset(
    name="demo",
    title="SmolLM2-135M-Instruct, converted once",
    ensure=_ensure_demo,
    # Measured by `raft-stream demo --offline`: the held-out VADER reward rose from 0.26 to
    # 0.84 in 4 iterations (docs/raft.md, "SmolLM2-135M-Instruct").
    settings=MappingProxyType(
        {
            "generation.sampling.k": 4,
            "generation.sampling.max_new_tokens": 48,
            "generation.sampling.temperature": 0.9,
            "ranking.min_response_tokens": 8,
            "training.lora_r": 16,
            "training.lora_alpha": 32,
            "training.learning_rate": 5e-4,
            "training.epochs": 2,
            "training.batch_size": 8,
        }
    ),
)

MODEL_PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in (DEMO, TINY)}
"""The built-in models by name: ``model.name_or_path`` resolves these to a cached folder."""
