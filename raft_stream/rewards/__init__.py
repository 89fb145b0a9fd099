"""Reward functions: VADER sentiment, your Python function, a classifier, a learned head, HTTP.

``build_safe_reward(cfg)`` is what the roles use: the configured reward, scaled, behind
SafeReward (errors, timeouts and NaN become rejected samples with a reason).
"""

from raft_stream.rewards.base import RewardFunction, TextReward
from raft_stream.rewards.function import reward_from_callable, reward_from_path
from raft_stream.rewards.registry import ScaledReward, build_reward, build_safe_reward
from raft_stream.rewards.safe import REJECT_REASONS, RewardOutcome, SafeReward

__all__ = [
    "REJECT_REASONS",
    "RewardFunction",
    "RewardOutcome",
    "SafeReward",
    "ScaledReward",
    "TextReward",
    "build_reward",
    "build_safe_reward",
    "reward_from_callable",
    "reward_from_path",
]
