"""One RAFT round without training: sample K per prompt, score, filter, rank.

Offline RAFT and the streaming generator both run this; they differ only in where prompts
come from and where kept samples go.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

from raft_stream.config import RankingConfig
from raft_stream.errors import AdapterError
from raft_stream.futures import done, gather, then
from raft_stream.generation.base import (
    EngineDeadError,
    EnginePrompt,
    Generator,
    SamplingParams,
    submit,
)
from raft_stream.ranking import Selection, select
from raft_stream.rewards.safe import SafeReward
from raft_stream.types import AdapterVersion, Completion, PromptRecord, Sample

log = logging.getLogger(__name__)


@dataclass
class ScoredBatch:
    """Every sample of a batch (kept and rejected) and what producing them cost."""

    samples: list[Sample]
    selection: Selection
    tokens: int
    generation_s: float
    reward_s: float
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(index in the batch, error) of each prompt the engine refused; the others ran."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generation_s if self.generation_s > 0 else 0.0

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples if s.scored]  # type: ignore[misc]


def samples_of(
    record: PromptRecord, completions: list[Completion], adapter_version: int
) -> list[Sample]:
    """A prompt's completions as unscored samples, with what the engine saw and sampled
    (the trainer trains on those ids)."""
    return [
        Sample(
            prompt_id=record.id,
            prompt=record.prompt,
            prompt_text=record.text,
            response=completion.text,
            response_tokens=completion.num_tokens,
            adapter_version=adapter_version,
            finish_reason=completion.finish_reason,
            prompt_token_ids=completion.prompt_token_ids,
            response_token_ids=completion.token_ids,
            response_logprobs=completion.logprobs,
            generated_at=completion.generated_at,
        )
        for completion in completions
    ]


def prompt_means(samples: list[Sample]) -> dict[str, float]:
    """Prompt id -> mean reward of its scored samples (a prompt with none is left out)."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.reward is not None and sample.scored:
            by_prompt[sample.prompt_id].append(sample.reward)
    return {prompt: statistics.fmean(rewards) for prompt, rewards in by_prompt.items()}


class RaftSampler:
    """Generates, scores and ranks batches of prompts with one generator and one reward."""

    def __init__(
        self,
        generator: Generator,
        reward: SafeReward,
        ranking: RankingConfig,
        sampling: SamplingParams,
    ) -> None:
        self.generator = generator
        self.reward = reward
        self.ranking = ranking
        self.sampling = sampling

    def submit(
        self, prompts: list[PromptRecord], adapter: AdapterVersion | None
    ) -> Future[tuple[list[Sample], int]]:
        """Put each prompt into the engine (honouring its per-request overrides) and
        return at once where the backend samples batches together (``generation.base.
        submit``); the future holds the unscored samples and their tokens. Raises what
        the backend raises before sampling starts."""
        groups: dict[SamplingParams, list[PromptRecord]] = defaultdict(list)
        for record in prompts:
            groups[self.sampling.with_overrides(record.sampling)].append(record)
        version = adapter.version if adapter is not None else 0
        pending = [
            submit(
                self.generator,
                [EnginePrompt(r.text, r.token_ids) for r in records],
                params,
                adapter,
            )
            for params, records in groups.items()
        ]

        def collect(outputs: list[list[list[Completion]]]) -> tuple[list[Sample], int]:
            samples: list[Sample] = []
            tokens = 0
            for records, group in zip(groups.values(), outputs, strict=True):
                for record, completions in zip(records, group, strict=True):
                    tokens += sum(c.num_tokens for c in completions)
                    samples += samples_of(record, completions, version)
            return samples, tokens

        return then(gather(pending), collect)

    def generate(
        self, prompts: list[PromptRecord], adapter: AdapterVersion | None
    ) -> tuple[list[Sample], int]:
        """Sample each prompt (honouring its per-request overrides); returns unscored samples."""
        return self.submit(prompts, adapter).result()

    def submit_each(
        self, prompts: list[PromptRecord], adapter: AdapterVersion | None
    ) -> tuple[Future[tuple[list[Sample], int]], list[tuple[int, str]]]:
        """``submit``, and when the engine refuses the batch, each prompt alone (sampled
        now), so a prompt it refuses (one longer than its context) costs only itself.
        Returns the samples' future and (index, error) of the refused prompts. A dead
        engine (EngineDeadError) or a bad adapter (AdapterError) is raised: no prompt is
        at fault."""
        try:
            return self.submit(prompts, adapter), []
        except (EngineDeadError, AdapterError):
            raise
        except Exception as err:
            log.warning(
                "generation failed for a batch; retrying prompt by prompt",
                extra={"prompts": len(prompts), "error": repr(err)},
            )
        samples, tokens, failed = self.each_alone(prompts, adapter)
        return done((samples, tokens)), failed

    def each_alone(
        self, prompts: list[PromptRecord], adapter: AdapterVersion | None
    ) -> tuple[list[Sample], int, list[tuple[int, str]]]:
        """Sample each prompt on its own: the samples, their tokens, and (index, error) of
        the prompts that failed. EngineDeadError and AdapterError are raised."""
        samples: list[Sample] = []
        tokens = 0
        failed: list[tuple[int, str]] = []
        for index, prompt in enumerate(prompts):
            try:
                some, used = self.generate([prompt], adapter)
            except (EngineDeadError, AdapterError):
                raise
            except Exception as err:
                failed.append((index, f"{type(err).__name__}: {err}"))
                continue
            samples += some
            tokens += used
        return samples, tokens, failed

    def generate_each(
        self, prompts: list[PromptRecord], adapter: AdapterVersion | None
    ) -> tuple[list[Sample], int, list[tuple[int, str]]]:
        """``submit_each``, waiting: the samples, their tokens, and (index, error) of the
        prompts the engine refused."""
        pending, failed = self.submit_each(prompts, adapter)
        samples, tokens = pending.result()
        return samples, tokens, failed

    def score(self, samples: list[Sample]) -> None:
        """Fill in each sample's reward, or its reject reason when the reward failed."""
        outcomes = self.reward.score([s.prompt for s in samples], [s.response for s in samples])
        for sample, outcome in zip(samples, outcomes, strict=True):
            sample.reward = outcome.reward
            sample.reject_reason = outcome.reason

    def run(self, prompts: list[PromptRecord], adapter: AdapterVersion | None) -> ScoredBatch:
        """Sample, score and rank a batch. Prompts the engine refuses are left out
        (``ScoredBatch.failed``) and the rest are ranked together, so global ranking
        keeps its meaning when some prompt fails."""
        started = time.perf_counter()
        samples, tokens, failed = self.generate_each(prompts, adapter)
        return self.rank(samples, tokens, time.perf_counter() - started, failed)

    def rank(
        self,
        samples: list[Sample],
        tokens: int,
        generation_s: float,
        failed: list[tuple[int, str]] | None = None,
    ) -> ScoredBatch:
        """Score and rank a batch's samples (from ``generate_each``, which took
        ``generation_s`` seconds for ``tokens`` tokens)."""
        started = time.perf_counter()
        self.score(samples)
        selection = select(samples, self.ranking, max(self.sampling.n, 1))
        return ScoredBatch(
            samples=samples,
            selection=selection,
            tokens=tokens,
            generation_s=generation_s,
            reward_s=time.perf_counter() - started,
            failed=failed or [],
        )
