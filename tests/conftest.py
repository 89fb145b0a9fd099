"""Shared fixtures: built once per test session, because each costs seconds to minutes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The project's own tiny Llama (trained on first use, then cached)."""
    from raft_stream.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model()
