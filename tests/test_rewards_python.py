"""The python reward kind: dotted-path loading, per-text and batched functions."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from raft_stream.errors import ConfigError, RewardError
from raft_stream.rewards.function import import_function, reward_from_callable, reward_from_path

USER_MODULE = """
def reward_of(text):
    return float(text.count("!"))

def score_pairs(pairs):
    return [float(len(prompt) - len(response)) for prompt, response in pairs]

def one_too_few(pairs):
    return [0.0] * (len(pairs) - 1)

def says_yes(text):
    return "yes"

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's reward module on sys.path, as RAFT users register theirs."""
    name = "raft_user_rewards"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_reward_of_scores_each_response(user_module: str) -> None:
    reward = reward_from_path(f"{user_module}:reward_of")
    assert reward(["Hi!", "Hi!"], ["wow!!", "ok"]) == [2.0, 0.0]


def test_python_reward_of_sees_prompt_plus_response_when_score_prompt(user_module: str) -> None:
    reward = reward_from_path(f"{user_module}:reward_of", score_prompt=True)
    assert reward(["Hi!", "Hi!"], ["wow!!", "ok"]) == [3.0, 1.0]


def test_python_batched_function_gets_prompt_response_pairs(user_module: str) -> None:
    reward = reward_from_path(f"{user_module}:score_pairs", batched=True)
    assert reward(["abcd", "ab"], ["a", "ab"]) == [3.0, 0.0]


def test_raises_reward_error_when_batch_function_returns_wrong_length(user_module: str) -> None:
    reward = reward_from_path(f"{user_module}:one_too_few", batched=True)
    with pytest.raises(RewardError, match=r"one_too_few returned 1 rewards for 2 samples"):
        reward(["p", "p"], ["a", "b"])


def test_raises_reward_error_when_function_returns_a_string(user_module: str) -> None:
    reward = reward_from_path(f"{user_module}:says_yes")
    with pytest.raises(RewardError, match=r"says_yes returned 'yes', expected a float"):
        reward(["p"], ["a"])


def test_raises_config_error_when_module_missing() -> None:
    with pytest.raises(
        ConfigError, match=r"'no_such_pkg\.rewards:f'.*module 'no_such_pkg\.rewards' not found"
    ):
        import_function("no_such_pkg.rewards:f")


def test_raises_config_error_when_module_imports_something_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raft_broken_rewards.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing 'raft_broken_rewards' failed.*not_installed"):
        import_function("raft_broken_rewards:f")


def test_raises_config_error_when_attribute_missing(user_module: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{user_module}' has no attribute 'nope'"):
        import_function(f"{user_module}:nope")


def test_raises_config_error_when_target_not_callable(user_module: str) -> None:
    with pytest.raises(ConfigError, match=r":NOT_A_FUNCTION' is not callable \(got int\)"):
        import_function(f"{user_module}:NOT_A_FUNCTION")


def test_raises_config_error_when_path_has_no_colon() -> None:
    with pytest.raises(
        ConfigError, match=r"'math\.sqrt' must look like 'package\.module:function'"
    ):
        import_function("math.sqrt")


def test_import_function_follows_dotted_attributes() -> None:
    assert import_function("os:path.basename")("a/b.txt") == "b.txt"


def test_reward_from_callable_wraps_a_plain_function() -> None:
    reward = reward_from_callable(len)
    assert reward(["prompt", "prompt"], ["abc", ""]) == [3.0, 0.0]


def test_reward_from_callable_wraps_a_batched_lambda() -> None:
    reward = reward_from_callable(lambda pairs: [1.0 for _ in pairs], batched=True)
    assert reward(["p", "q"], ["a", "b"]) == [1.0, 1.0]


def test_raises_type_error_when_callable_is_not_callable() -> None:
    with pytest.raises(TypeError, match="must be callable, got str"):
        reward_from_callable("len")  # type: ignore[arg-type]


def test_raises_reward_error_when_prompts_and_responses_differ_in_length() -> None:
    with pytest.raises(RewardError, match="got 1 prompts and 2 responses"):
        reward_from_callable(len)(["p"], ["a", "b"])
