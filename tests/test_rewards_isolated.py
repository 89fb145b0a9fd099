"""User rewards in worker processes: signal-based timeouts work, a hung call costs one
batch and its worker, a crash costs its part, and a batch is split across workers."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raft_stream.config import RewardConfig
from raft_stream.errors import ConfigError
from raft_stream.rewards.isolated import RewardPool
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.rewards.safe import RewardOutcome, SafeReward

USER_MODULE = """
import os, signal, time

def _on_alarm(signum, frame):
    raise TimeoutError("verifier ran out of time")

def alarm_bounded(text):
    # What math-answer verifiers and code sandboxes do: bound their own time with SIGALRM.
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(5)
    try:
        return float(len(text))
    finally:
        signal.alarm(0)

def hangs_on_request(text):
    if "hang" in text:
        time.sleep(3600)
    return float(len(text))

def dies_on_request(text):
    if "die" in text:
        os._exit(3)
    return float(len(text))

def raises_on_request(text):
    if "bad" in text:
        raise ValueError("cannot score this one")
    return float(len(text))

_calls = 0

def raises_on_first_call(text):
    global _calls
    _calls += 1
    if _calls == 1:
        raise ConnectionError("the judge dropped the connection")
    return float(len(text))

def worker_pid(text):
    return float(os.getpid())
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's reward module on sys.path (spawned workers inherit the parent's path)."""
    name = "raft_isolated_rewards"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _safe(function: str, timeout_s: float = 10.0, **fields: object) -> SafeReward:
    return build_safe_reward(
        RewardConfig(kind="python", function=function, timeout_s=timeout_s, **fields)  # type: ignore[arg-type]
    )


def _reasons(outcomes: list[RewardOutcome]) -> list[str | None]:
    return [o.reason for o in outcomes]


def test_user_functions_run_in_worker_processes_by_default(user_module: str) -> None:
    reward = _safe(f"{user_module}:alarm_bounded")
    try:
        assert isinstance(reward.reward, RewardPool)
    finally:
        reward.close()


def test_a_reward_bounded_by_signal_alarm_scores(user_module: str) -> None:
    # On a thread this fails on every call: "signal only works in main thread".
    reward = _safe(f"{user_module}:alarm_bounded")
    try:
        outcomes = reward.score(["p", "p"], ["abc", "abcdef"])
    finally:
        reward.close()

    assert [o.reward for o in outcomes] == [3.0, 6.0]


def test_a_hung_call_costs_one_batch_and_the_next_batch_is_scored(user_module: str) -> None:
    # One attempt: what one hung call costs (retries of a whole failed batch: test_rewards_safe.py).
    reward = _safe(f"{user_module}:hangs_on_request", timeout_s=2.0, max_attempts=1)
    try:
        started = time.monotonic()
        hung = reward.score(["p", "p"], ["please hang", "fine"])
        took_s = time.monotonic() - started
        # In-process, every later batch was refused until the hung call returned (never).
        after = reward.score(["p", "p"], ["fine", "also fine"])
    finally:
        reward.close()

    assert _reasons(hung) == ["reward_timeout", "reward_timeout"]
    assert took_s < 10
    assert [o.reward for o in after] == [4.0, 9.0]
    assert isinstance(reward.reward, RewardPool) and reward.reward.replaced == 1


def test_a_part_scored_again_one_at_a_time_is_a_warning_not_an_error(
    user_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    reward = _safe(f"{user_module}:raises_on_first_call")
    try:
        outcomes = reward.score(["p", "p"], ["abc", "abcdef"])
    finally:
        reward.close()

    assert [o.reward for o in outcomes] == [3.0, 6.0]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("scored each of them" in r.getMessage() for r in caplog.records)


def test_a_worker_that_dies_rejects_its_part_and_is_replaced(user_module: str) -> None:
    reward = _safe(f"{user_module}:dies_on_request")
    try:
        died = reward.score(["p"], ["die now"])
        after = reward.score(["p"], ["fine"])
    finally:
        reward.close()

    assert _reasons(died) == ["reward_error"]
    assert [o.reward for o in after] == [4.0]


def test_a_raising_sample_rejects_only_itself(user_module: str) -> None:
    reward = _safe(f"{user_module}:raises_on_request")
    try:
        outcomes = reward.score(["p", "p", "p"], ["ok", "bad one", "fine"])
    finally:
        reward.close()

    assert _reasons(outcomes) == [None, "reward_error", None]
    assert [o.reward for o in outcomes] == [2.0, None, 4.0]


def test_a_batch_is_split_across_workers(user_module: str) -> None:
    reward = _safe(f"{user_module}:worker_pid", workers=2)
    try:
        outcomes = reward.score(["p"] * 4, ["a", "b", "c", "d"])
    finally:
        reward.close()

    pids = [o.reward for o in outcomes]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_thread_isolation_keeps_the_function_in_process(user_module: str) -> None:
    reward = _safe(f"{user_module}:raises_on_request", isolation="thread")

    assert not isinstance(reward.reward, RewardPool)
    assert [o.reward for o in reward.score(["p"], ["ok"])] == [2.0]


def test_raises_config_error_when_the_worker_cannot_build_the_reward() -> None:
    with pytest.raises(ConfigError, match="no_such_module"):
        _safe("no_such_module:reward_of")
