"""The RewardFunction protocol, and the shared parts of the rewards that score one text each."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from raft_stream.errors import RewardError

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
    """Build the configured reward (not yet wrapped in SafeReward); see ``registry``."""
    # Imported here: the registry imports the reward kinds, which import this module.
    from raft_stream.rewards.registry import build_reward as build

    return build(cfg)


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    """Raise RewardError unless there is one prompt per response."""
    if len(prompts) != len(responses):
        raise RewardError(
            f"got {len(prompts)} prompts and {len(responses)} responses; pass one prompt per "
            "response (repeat a prompt for each of its K responses)"
        )


def as_rewards(values: Any, expected: int, source: str) -> list[float]:
    """Check that ``source`` returned ``expected`` numbers and convert them to floats.

    NaN and inf pass through (SafeReward rejects them per sample); anything that is not a
    number is a RewardError naming ``source``.
    """
    try:
        count = len(values)
    except TypeError:
        raise RewardError(
            f"{source} returned {type(values).__name__}, expected a list of {expected} floats"
        ) from None
    if count != expected:
        raise RewardError(f"{source} returned {count} rewards for {expected} samples")
    return [as_reward(value, source) for value in values]


def as_reward(value: Any, source: str) -> float:
    """One reward as a float; bools and strings are mistakes, not numbers."""
    if isinstance(value, bool | str | bytes) or value is None:
        raise RewardError(f"{source} returned {value!r}, expected a float")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RewardError(f"{source} returned {value!r}, expected a float") from None


class TextReward(ABC):
    """A reward that scores each response as one text (VADER, classifiers, ``reward_of``).

    ``score_prompt`` makes it score prompt + response (concatenated as the model saw them)
    instead of the response alone.
    """

    def __init__(self, *, score_prompt: bool = False) -> None:
        self.score_prompt = score_prompt

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        check_pairs(prompts, responses)
        texts = (
            [prompt + response for prompt, response in zip(prompts, responses, strict=True)]
            if self.score_prompt
            else list(responses)
        )
        if not texts:
            return []
        return as_rewards(self.score_texts(texts), len(texts), type(self).__name__)

    @abstractmethod
    def score_texts(self, texts: list[str]) -> Sequence[float]:
        """One reward per text, in order."""
