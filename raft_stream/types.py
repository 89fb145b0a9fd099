"""Record types shared by every stage of the RAFT loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to sample from.

    ``text`` is what the generator sees (chat template already applied where the
    model has one); ``prompt`` is the user's original prompt.
    """

    id: str
    prompt: str
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.prompt)


@dataclass(frozen=True)
class Completion:
    """One sampled response and the number of tokens it took."""

    text: str
    num_tokens: int
    finish_reason: str | None = None


@dataclass
class Sample:
    """A scored (prompt, response) pair; the unit that ranking, the buffer and training use."""

    prompt_id: str
    prompt: str
    prompt_text: str
    response: str
    response_tokens: int
    adapter_version: int
    reward: float | None = None
    reject_reason: str | None = None
    rank: int | None = None
    finish_reason: str | None = None
    """"stop" when the model ended the response itself, "length" when max tokens cut it."""

    @property
    def scored(self) -> bool:
        return self.reward is not None and math.isfinite(self.reward)


@dataclass(frozen=True)
class AdapterVersion:
    """A complete, immutable LoRA adapter version in the adapter store."""

    version: int
    path: Path
    sha256: str
    base_model: str
    created_at: float
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: str | None = None
    """Id of the store that wrote it (see ``training.store``); None for older versions."""

    @property
    def name(self) -> str:
        return f"v{self.version}"
