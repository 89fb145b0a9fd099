"""SafeReward: errors, timeouts and non-finite rewards reject samples, never the batch."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from raft_stream.rewards.function import reward_from_callable
from raft_stream.rewards.safe import RewardOutcome, SafeReward


def reward_of(text: str) -> float:
    if text == "poison":
        raise ValueError("cannot score poison")
    if text == "nan":
        return math.nan
    return float(len(text))


class HangingReward:
    """Blocks every call until released, like a reward stuck on a dead dependency."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        self.calls += 1
        self.release.wait()
        return [1.0] * len(responses)


@pytest.fixture
def hanging() -> Iterator[HangingReward]:
    reward = HangingReward()
    yield reward
    reward.release.set()  # let the abandoned thread finish


def test_scores_a_good_batch() -> None:
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5)
    assert safe.score(["p", "p"], ["ab", "abc"]) == [RewardOutcome(2.0), RewardOutcome(3.0)]


def test_rejects_only_the_sample_whose_reward_raises() -> None:
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5)
    outcomes = safe.score(["p"] * 3, ["ab", "poison", "abcd"])
    assert outcomes == [
        RewardOutcome(2.0),
        RewardOutcome(None, "reward_error"),
        RewardOutcome(4.0),
    ]


def test_rejects_the_whole_batch_when_retry_per_pair_is_off() -> None:
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5, retry_per_pair=False)
    outcomes = safe.score(["p"] * 2, ["ab", "poison"])
    assert [o.reason for o in outcomes] == ["reward_error", "reward_error"]


def test_logs_a_failed_batch_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="raft_stream.rewards.safe"):
        safe.score(["p"] * 3, ["poison", "poison", "ok"])
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1
    assert "cannot score poison" in caplog.text
    assert "failed for 2 of 3 samples" in caplog.text


def test_rejects_only_the_nonfinite_sample() -> None:
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5)
    outcomes = safe.score(["p"] * 3, ["ab", "nan", "abcd"])
    assert outcomes == [
        RewardOutcome(2.0),
        RewardOutcome(None, "reward_nonfinite"),
        RewardOutcome(4.0),
    ]


def test_rejects_inf_as_nonfinite() -> None:
    safe = SafeReward(reward_from_callable(lambda pairs: [math.inf, -1.0], batched=True), 5)
    assert [o.reason for o in safe.score(["p"] * 2, ["a", "b"])] == ["reward_nonfinite", None]


def test_rejects_the_batch_as_timeout_when_reward_hangs(hanging: HangingReward) -> None:
    safe = SafeReward(hanging, timeout_s=0.2)
    started = time.monotonic()
    outcomes = safe.score(["p"] * 2, ["a", "b"])
    assert time.monotonic() - started < 2.0
    assert outcomes == [RewardOutcome(None, "reward_timeout")] * 2


def test_refuses_at_once_without_a_new_thread_while_a_call_is_hung(
    hanging: HangingReward,
) -> None:
    safe = SafeReward(hanging, timeout_s=0.2)
    safe.score(["p"], ["a"])
    threads_before = threading.active_count()
    started = time.monotonic()
    outcomes = safe.score(["p"], ["b"])
    assert time.monotonic() - started < 0.1
    assert outcomes == [RewardOutcome(None, "reward_timeout")]
    assert hanging.calls == 1
    assert threading.active_count() <= threads_before  # other tests' threads may end


def test_scores_again_once_the_hung_call_returns(hanging: HangingReward) -> None:
    safe = SafeReward(hanging, timeout_s=0.2)
    safe.score(["p"], ["a"])
    hanging.release.set()
    # The abandoned thread needs a moment to return; poll instead of guessing a sleep.
    deadline = time.monotonic() + 5
    while (outcomes := safe.score(["p"], ["b"]))[0].reason and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcomes == [RewardOutcome(1.0)]


def test_keeps_rewards_scored_before_the_deadline_when_retrying_per_pair() -> None:
    release = threading.Event()

    def slow_on_last(pairs: list[tuple[str, str]]) -> list[float]:
        if len(pairs) > 1:
            raise RuntimeError("batch endpoint down")
        if pairs[0][1] == "slow":
            release.wait()
        return [1.0]

    safe = SafeReward(reward_from_callable(slow_on_last, batched=True), timeout_s=0.3)
    try:
        outcomes = safe.score(["p"] * 3, ["a", "b", "slow"])
    finally:
        release.set()
    assert outcomes == [
        RewardOutcome(1.0),
        RewardOutcome(1.0),
        RewardOutcome(None, "reward_timeout"),
    ]


def test_returns_no_outcomes_for_an_empty_batch() -> None:
    assert SafeReward(reward_from_callable(reward_of), timeout_s=1).score([], []) == []


def test_raises_value_error_when_timeout_is_not_positive() -> None:
    with pytest.raises(ValueError, match=r"timeout_s \(0\) must be > 0"):
        SafeReward(reward_from_callable(reward_of), timeout_s=0)


class FlakyReward:
    """Fails its first ``failures`` calls as a whole (a reward service that is down), then
    scores by length."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("reward service unreachable")
        return [float(len(r)) for r in responses]


def test_retries_a_batch_that_failed_as_a_whole_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    flaky = FlakyReward(failures=2)
    safe = SafeReward(flaky, timeout_s=5, retry_per_pair=False, max_attempts=3, backoff_s=0.5)
    assert safe.score(["p", "p"], ["ab", "abc"]) == [RewardOutcome(2.0), RewardOutcome(3.0)]
    assert flaky.calls == 3
    assert waits == [0.5, 1.0]


def test_gives_up_after_max_attempts_and_leaves_the_batch_unscored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _: None)
    flaky = FlakyReward(failures=10)
    safe = SafeReward(flaky, timeout_s=5, retry_per_pair=False, max_attempts=3)
    assert [o.reason for o in safe.score(["p"], ["ab"])] == ["reward_error"]
    assert flaky.calls == 3


def test_does_not_retry_a_batch_where_only_some_samples_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _: pytest.fail("no retry expected"))
    safe = SafeReward(reward_from_callable(reward_of), timeout_s=5, max_attempts=3)
    outcomes = safe.score(["p"] * 2, ["ab", "poison"])
    assert [o.reason for o in outcomes] == [None, "reward_error"]
