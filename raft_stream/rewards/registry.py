"""Build the configured reward: dispatch on ``reward.kind``, then apply ``reward.scale``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from raft_stream.rewards.base import RewardFunction

if TYPE_CHECKING:
    from raft_stream.config import RewardConfig
    from raft_stream.rewards.safe import SafeReward

# Kinds whose failures can be sample-specific (user code, a remote service): when a batch
# call raises, SafeReward retries pair by pair so one poison sample rejects only itself.
# Model-backed kinds fail for the whole batch or not at all, so a retry would only cost time.
RETRY_PER_PAIR_KINDS = frozenset({"python", "http"})


class ScaledReward:
    """Multiplies every reward of ``inner`` by ``scale`` (e.g. -1 to minimise a score)."""

    def __init__(self, inner: RewardFunction, scale: float) -> None:
        self.inner = inner
        self.scale = scale

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self.scale * reward for reward in self.inner(prompts, responses)]


def build_reward(cfg: RewardConfig) -> RewardFunction:
    """Build the configured reward (not yet wrapped in SafeReward); raises ConfigError.

    Heavy kinds import torch and friends only when chosen.
    """
    reward: RewardFunction
    if cfg.kind == "sentiment":
        from raft_stream.rewards.sentiment import VaderReward

        reward = VaderReward(score_prompt=cfg.score_prompt)
    elif cfg.kind == "python":
        from raft_stream.rewards.function import reward_from_path

        assert cfg.function is not None  # RewardConfig's validator requires it
        reward = reward_from_path(cfg.function, batched=cfg.batched, score_prompt=cfg.score_prompt)
    elif cfg.kind == "classifier":
        from raft_stream.rewards.classifier import ClassifierReward

        assert cfg.model is not None
        reward = ClassifierReward(cfg.model, label=cfg.label, score_prompt=cfg.score_prompt)
    elif cfg.kind == "learned_sentiment":
        from raft_stream.rewards.learned import LearnedSentimentReward

        reward = LearnedSentimentReward(score_prompt=cfg.score_prompt)
    elif cfg.kind == "http":
        from raft_stream.config import read_secret
        from raft_stream.rewards.http import HttpReward

        assert cfg.url is not None
        token = None if cfg.token_file is None else read_secret(cfg.token_file, "reward.token_file")
        reward = HttpReward(cfg.url, timeout_s=cfg.timeout_s, token=token)
    else:  # pragma: no cover - RewardConfig.kind is a Literal
        raise AssertionError(f"unhandled reward kind {cfg.kind!r}")
    return reward if cfg.scale == 1.0 else ScaledReward(reward, cfg.scale)


def build_safe_reward(cfg: RewardConfig) -> SafeReward:
    """The configured reward wrapped in SafeReward with ``reward.timeout_s``; user functions
    (python kind) run in worker processes unless ``reward.isolation`` is ``thread``."""
    from raft_stream.rewards.isolated import RewardPool
    from raft_stream.rewards.safe import SafeReward

    isolated = cfg.kind == "python" and cfg.isolation == "process"
    return SafeReward(
        RewardPool(cfg, cfg.workers) if isolated else build_reward(cfg),
        timeout_s=cfg.timeout_s,
        retry_per_pair=cfg.kind in RETRY_PER_PAIR_KINDS,
        max_attempts=cfg.max_attempts,
        backoff_s=cfg.retry_backoff_s,
    )
