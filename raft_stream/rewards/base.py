"""The RewardFunction protocol: score a batch of (prompt, response) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from raft_stream.config import RewardConfig


@runtime_checkable
class RewardFunction(Protocol):
    """Scores responses; higher is better. Returns one float per pair, in order.

    It may raise, hang or return NaN: ``raft_stream.rewards.safe.SafeReward`` turns each of
    those into a rejected sample with a reason instead of a crash.
    """

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


def build_reward(cfg: RewardConfig) -> RewardFunction:
    """Build the configured reward (not yet wrapped in SafeReward)."""
    raise NotImplementedError  # filled in by raft_stream.rewards.registry
