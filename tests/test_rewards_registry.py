"""build_reward: dispatch on reward.kind, reward.scale, and the SafeReward settings."""

from __future__ import annotations

import pytest

from raft_stream.config import RewardConfig
from raft_stream.errors import ConfigError
from raft_stream.rewards import build_reward, build_safe_reward
from raft_stream.rewards.function import PerTextReward
from raft_stream.rewards.http import HttpReward
from raft_stream.rewards.sentiment import VaderReward


def test_builds_vader_for_the_sentiment_kind() -> None:
    assert isinstance(build_reward(RewardConfig(kind="sentiment")), VaderReward)


def test_builds_a_python_reward_from_its_dotted_path() -> None:
    reward = build_reward(RewardConfig(kind="python", function="builtins:len"))
    assert isinstance(reward, PerTextReward)
    assert reward(["q"], ["four"]) == [4.0]


def test_builds_an_http_reward_with_the_configured_timeout() -> None:
    reward = build_reward(RewardConfig(kind="http", url="http://127.0.0.1:1/score", timeout_s=3))
    assert isinstance(reward, HttpReward)
    assert reward.timeout_s == 3


def test_scale_multiplies_every_reward() -> None:
    reward = build_reward(RewardConfig(kind="python", function="builtins:len", scale=-0.5))
    assert reward(["q", "q"], ["four", ""]) == [-2.0, -0.0]


def test_raises_config_error_naming_a_bad_function_path() -> None:
    with pytest.raises(ConfigError, match=r"'builtins:no_such_fn'"):
        build_reward(RewardConfig(kind="python", function="builtins:no_such_fn"))


def test_safe_reward_retries_per_pair_for_python_but_not_for_models() -> None:
    python = build_safe_reward(RewardConfig(kind="python", function="builtins:len", timeout_s=7))
    assert python.retry_per_pair
    assert python.timeout_s == 7
    assert not build_safe_reward(RewardConfig(kind="sentiment")).retry_per_pair
