"""Reward functions: VADER sentiment, your Python function, a classifier, a learned head, HTTP."""

from raft_stream.rewards.base import RewardFunction, build_reward

__all__ = ["RewardFunction", "build_reward"]
