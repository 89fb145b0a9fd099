"""The promotion gate: no adapter version serves until it holds up on held-out canary
prompts against the version serving now.

Each new version (the candidate) is sampled on the canary prompts (``gate.canary_prompts``)
in the trainer, from the model it was just trained into, with the seeds every version
gets (``gate.seed``), and scored with the configured reward. Its figures:

- mean reward, with the 95% Student-t interval over the per-prompt means;
- distinct-2 of its responses, and their mean length in tokens;
- its KL divergence from the base model on its own responses, in nats per response token:
  the mean of log pi_candidate(y_t) - log pi_base(y_t) over the sampled tokens (the
  Monte-Carlo "k1" estimate of KL(candidate || base), as TRL's PPO reports it).

The verdict (``decide``): promoted when its reward is at least the promoted version's
minus ``gate.reward_margin``, its distinct-2 at least ``gate.min_distinct2_ratio`` of the
base model's, and its KL at most ``gate.max_kl``; otherwise rejected, naming the first
criterion it failed. The promoted version's figures come from its manifest (the same
prompts and seeds gave them), so one canary run per version suffices; the base model's are
measured once per trainer start.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from raft_stream.config import GateConfig, RaftConfig, RankingConfig, SamplingConfig
from raft_stream.data.prompts import read_prompts_jsonl, write_prompts_jsonl
from raft_stream.errors import ConfigError
from raft_stream.generation.base import SamplingParams
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.learning_health import mean_ci95
from raft_stream.prompting import PromptFormatter
from raft_stream.raft import RaftSampler, prompt_means
from raft_stream.rewards.safe import SafeReward
from raft_stream.textstats import distinct_n
from raft_stream.training.lora_trainer import LoRATrainer
from raft_stream.types import PromptRecord, Sample

__all__ = [
    "CanaryCollector",
    "CanaryFigures",
    "CanaryJudge",
    "Verdict",
    "build_judge",
    "decide",
    "is_canary",
    "judge_on",
]

_PREFIX: Final = "canary_"


@dataclass(frozen=True)
class CanaryFigures:
    """One version's canary run."""

    reward_mean: float
    reward_ci95: float
    """Half-width of the 95% Student-t interval of the mean over per-prompt means."""
    distinct_2: float
    mean_tokens: float
    """Mean response length, in tokens."""
    kl: float
    """KL divergence from the base model, nats per response token (0 for the base)."""

    def as_metrics(self) -> dict[str, float]:
        """The finite figures as manifest and announcement metrics (``canary_reward_mean``
        ...; JSON has no NaN or infinity)."""
        return {
            f"{_PREFIX}{name}": float(value)
            for name, value in asdict(self).items()
            if math.isfinite(value)
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> CanaryFigures | None:
        """The figures a version's metrics record; None when it was never judged."""
        values = {name: metrics.get(f"{_PREFIX}{name}") for name in cls.__dataclass_fields__}
        if values["reward_ci95"] is None:
            values["reward_ci95"] = math.inf  # fewer than two canary prompts scored
        if any(value is None for value in values.values()):
            return None
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one candidate."""

    promoted: bool
    criterion: str | None
    """The first of ``raft_stream.reasons.GATE_CRITERIA`` it failed; None when promoted."""
    detail: str
    candidate: CanaryFigures

    @property
    def name(self) -> str:
        """``promoted`` or ``rejected``: the manifest's and the announcement's verdict."""
        return "promoted" if self.promoted else "rejected"


def decide(
    candidate: CanaryFigures,
    promoted: CanaryFigures,
    base: CanaryFigures,
    cfg: GateConfig,
) -> Verdict:
    """Promote ``candidate`` over the ``promoted`` version (the base model's figures before
    the first promotion), or reject it naming the first criterion it fails."""
    floor = promoted.reward_mean - cfg.reward_margin
    diversity = cfg.min_distinct2_ratio * base.distinct_2
    failures = [
        (
            "reward",
            not candidate.reward_mean >= floor,
            f"canary reward {candidate.reward_mean:.3f} < {floor:.3f} (the promoted "
            f"version's {promoted.reward_mean:.3f} - gate.reward_margin {cfg.reward_margin})",
        ),
        (
            "diversity",
            not candidate.distinct_2 >= diversity,
            f"canary distinct-2 {candidate.distinct_2:.3f} < {diversity:.3f} "
            f"(gate.min_distinct2_ratio {cfg.min_distinct2_ratio} of the base model's "
            f"{base.distinct_2:.3f})",
        ),
        (
            "kl",
            cfg.max_kl is not None and not candidate.kl <= cfg.max_kl,
            f"KL from the base model {candidate.kl:.3f} nats/token > gate.max_kl {cfg.max_kl}",
        ),
    ]
    for criterion, failed, detail in failures:
        if failed:
            return Verdict(False, criterion, detail, candidate)
    return Verdict(
        True,
        None,
        f"canary reward {candidate.reward_mean:.3f} ± {candidate.reward_ci95:.3f} vs "
        f"{promoted.reward_mean:.3f} promoted; distinct-2 {candidate.distinct_2:.3f}; "
        f"KL {candidate.kl:.3f} nats/token",
        candidate,
    )


class CanaryJudge:
    """Samples the canary prompts from a LoRATrainer's model and judges its adapter.

    ``prompts`` are formatted (``PromptFormatter.format``: text and token ids);
    ``sampling`` gives the length, temperature and top-p of the canary runs.
    """

    def __init__(
        self,
        cfg: GateConfig,
        prompts: list[PromptRecord],
        reward: SafeReward,
        sampling: SamplingConfig,
    ) -> None:
        if not prompts:
            raise ValueError("the promotion gate needs at least one canary prompt")
        self.cfg = cfg
        self.prompts = prompts
        self.reward = reward
        self.params = SamplingParams(
            n=cfg.samples_per_prompt,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=cfg.seed,
        )
        self._base: CanaryFigures | None = None

    def base(self, trainer: LoRATrainer) -> CanaryFigures:
        """The base model's figures (measured once, with the adapter switched off)."""
        if self._base is None:
            with trainer.model.disable_adapter():
                self._base = self.figures(trainer, kl=False)
        return self._base

    def judge(self, trainer: LoRATrainer, promoted: CanaryFigures | None) -> Verdict:
        """The verdict on the adapter ``trainer`` holds now against the ``promoted``
        version's figures (None: nothing promoted yet, the base model serves)."""
        base = self.base(trainer)
        return decide(self.figures(trainer, kl=True), promoted or base, base, self.cfg)

    def figures(self, trainer: LoRATrainer, kl: bool) -> CanaryFigures:
        """Sample, score and measure the policy ``trainer.model`` runs now."""
        generator = TransformersGenerator.wrapping(
            trainer.model, trainer.tokenizer, with_logprobs=False
        )
        sampler = RaftSampler(generator, self.reward, RankingConfig(), self.params)
        samples, _ = sampler.generate(self.prompts, None)
        sampler.score(samples)
        means = list(prompt_means(samples).values())
        return CanaryFigures(
            reward_mean=statistics.fmean(means) if means else math.nan,
            reward_ci95=mean_ci95(means),
            distinct_2=distinct_n([s.response for s in samples], 2),
            mean_tokens=statistics.fmean(s.response_tokens for s in samples),
            kl=_kl_from_base(trainer, samples) if kl else 0.0,
        )


def _kl_from_base(trainer: LoRATrainer, samples: list[Sample]) -> float:
    """Mean of log pi(y_t) - log pi_base(y_t) over the sampled tokens (nats per token)."""
    mine = trainer.logprobs(samples)
    with trainer.model.disable_adapter():
        base = trainer.logprobs(samples)
    differences = [
        a - b
        for ours, theirs in zip(mine, base, strict=True)
        for a, b in zip(ours, theirs, strict=True)
    ]
    return statistics.fmean(differences) if differences else 0.0


def build_judge(cfg: RaftConfig, model_path: str, reward: SafeReward) -> CanaryJudge | None:
    """The configured gate's judge on ``gate.canary_prompts`` (None without). Raises
    ConfigError when the canary file cannot be read or holds no prompt."""
    path = cfg.gate.canary_prompts
    if path is None:
        return None
    try:
        records = read_prompts_jsonl(path, cfg.generation.sampling)
    except (OSError, ValueError) as err:
        raise ConfigError(f"gate.canary_prompts ({path}) cannot be read: {err}") from None
    if not records:
        raise ConfigError(f"gate.canary_prompts ({path}) holds no prompt; add some or unset it")
    return judge_on(cfg, model_path, reward, records)


def judge_on(
    cfg: RaftConfig, model_path: str, reward: SafeReward, records: list[PromptRecord]
) -> CanaryJudge:
    """A judge on these canary prompts, formatted for the model at ``model_path``."""
    formatter = PromptFormatter.from_model(model_path, cfg.model)
    prompts = [formatter.format(record) for record in records]
    return CanaryJudge(cfg.gate, prompts, reward, cfg.generation.sampling)


def is_canary(prompt_id: str, share: float) -> bool:
    """Whether a prompt belongs to the canary share of the stream (``gate.canary_share``):
    the first 8 bytes of SHA-256 of its id, as a fraction of 2**64, below ``share``. The
    same answer in every process and across restarts, so a canary prompt is never
    trained on, however often it is redelivered."""
    if share <= 0:
        return False
    digest = hashlib.sha256(prompt_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


class CanaryCollector:
    """The canary set taken from the stream (``gate.canary_share``): the first ``size``
    distinct canary prompts the trainer sees, then fixed, and kept in ``path`` (a prompt
    file) so a restarted trainer judges on the same prompts."""

    def __init__(self, path: Path, size: int, sampling: SamplingConfig) -> None:
        self.path = path
        self.size = size
        self.prompts: dict[str, PromptRecord] = {}
        if path.exists():
            try:
                records = read_prompts_jsonl(path, sampling)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"the canary set {path} cannot be read ({err}); delete it to collect a "
                    "new one from the stream (versions judged so far were judged on the old)"
                ) from None
            self.prompts = {r.id: r for r in records[:size]}

    @property
    def complete(self) -> bool:
        return len(self.prompts) >= self.size

    def offer(self, samples: Iterable[Sample]) -> bool:
        """Take the prompts of canary samples until the set is complete; True when this
        call completed it (and wrote it to ``path``)."""
        if self.complete:
            return False
        for sample in samples:
            if len(self.prompts) < self.size and sample.prompt_id not in self.prompts:
                self.prompts[sample.prompt_id] = PromptRecord(sample.prompt_id, sample.prompt)
        if not self.complete:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        write_prompts_jsonl(self.prompts.values(), partial)
        partial.replace(self.path)
        return True
