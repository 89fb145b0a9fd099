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
    model has one); ``prompt`` is the user's original prompt; ``token_ids`` is ``text``
    tokenized for the engine (``raft_stream.prompting``: exactly one BOS), empty until
    the prompt is formatted.
    """

    id: str
    prompt: str
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.prompt)


@dataclass(frozen=True)
class Completion:
    """One sampled response and the number of tokens it took.

    Engines that expose their tokens (vLLM, transformers) also give what they saw and
    sampled: ``prompt_token_ids``, the response's ``token_ids`` (the stop token included
    when the model emitted it) and each sampled token's ``logprobs`` (natural log, of the
    model's own distribution before temperature and top-p). A black-box backend leaves
    them empty (None for ``logprobs``) and training falls back to tokenizing the text.
    """

    text: str
    num_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None
    generated_at: float | None = field(default=None, compare=False)
    """Wall-clock time (``time.time()``, seconds) when the engine finished this response
    (vLLM: the step that finished its request; a backend that answers a whole batch at
    once: when it answered); None when not known. Not part of equality: the same
    response sampled again is equal."""


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
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt's token ids exactly as the engine saw them; empty when the generator
    returned only text (a black box)."""
    response_token_ids: tuple[int, ...] = ()
    """The sampled token ids, the stop token included when the model emitted it; empty
    when the generator returned only text."""
    response_logprobs: tuple[float, ...] | None = None
    """Log-probability of each sampled token under the policy that sampled it (one per
    ``response_token_ids``; natural log, before temperature); None when not known."""
    generated_at: float | None = field(default=None, compare=False)
    """When the engine finished the response (``Completion.generated_at``); the samples
    topic's ``created_at``. None when not known."""

    @property
    def scored(self) -> bool:
        return self.reward is not None and math.isfinite(self.reward)

    @property
    def token_faithful(self) -> bool:
        """True when the engine's own token ids travel with the sample: training uses them
        as they are; otherwise it tokenizes ``prompt_text`` and ``response`` again."""
        return bool(self.prompt_token_ids) and bool(self.response_token_ids)


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
    verdict: str | None = None
    """The promotion gate's verdict (``raft_stream.gate``): ``promoted`` (generators serve
    it) or ``rejected`` (stored, never served); None when no gate judged it."""

    @property
    def name(self) -> str:
        return f"v{self.version}"
