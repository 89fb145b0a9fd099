"""SafeReward: a reward that raises, hangs or returns NaN rejects samples instead of crashing.

Each sample gets a RewardOutcome: a finite reward, or None and one reason code:

- ``reward_error``: the reward raised (logged once per batch, with the traceback);
- ``reward_timeout``: the call took longer than ``timeout_s``;
- ``reward_nonfinite``: NaN or inf for that sample (the others keep theirs).

A batch that fails as a whole (every sample ``reward_error`` or ``reward_timeout``: the
reward service is down, a judge hangs) is scored again, up to ``max_attempts`` calls in
all, waiting ``backoff_s`` before the second and twice as long before each next one; what
is still unscored then is the caller's to dead-letter (``failed_as_a_whole``).

Two ways to run the reward:

- In worker processes (a :class:`~raft_stream.rewards.isolated.RewardPool`, the default for
  user functions): a call past ``timeout_s`` kills and replaces its worker, so one hung
  input costs one batch; the function runs on the worker's main thread, so ``signal.alarm``
  works.
- In this process, on a thread (built-in rewards, or ``reward.isolation: thread``). Python
  cannot kill a thread: a call past its timeout is abandoned in its daemon thread, which
  runs on until the reward returns. So that repeated hangs cannot pile up threads, while
  that thread is alive every batch is refused at once with ``reward_timeout``; scoring
  resumes when it returns.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from raft_stream.reasons import REWARD_ERROR, REWARD_NONFINITE, REWARD_REASONS, REWARD_TIMEOUT
from raft_stream.rewards.base import RewardFunction, as_rewards, check_pairs
from raft_stream.rewards.isolated import RewardPool

log = logging.getLogger(__name__)

REJECT_REASONS = REWARD_REASONS
"""Every reason SafeReward gives (``raft_stream.reasons``): a bounded metric label."""


@dataclass(frozen=True)
class RewardOutcome:
    """One sample's result: a finite ``reward``, or None and the ``reason`` it was rejected."""

    reward: float | None
    reason: str | None = None


_ERROR = RewardOutcome(None, REWARD_ERROR)
_TIMEOUT = RewardOutcome(None, REWARD_TIMEOUT)
_NONFINITE = RewardOutcome(None, REWARD_NONFINITE)


class _Worker(threading.Thread):
    """Runs one reward call. Daemon, so an abandoned call never blocks interpreter exit."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(name="raft-stream-reward", daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc

    def finished_by(self, deadline: float) -> bool:
        self.join(max(0.0, deadline - time.monotonic()))
        return not self.is_alive()


class SafeReward:
    """Wraps a RewardFunction; ``score`` never raises for the reward's sake and never waits
    much longer than ``timeout_s``.

    ``retry_per_pair``: when a batch call raises, score the pairs one at a time (same
    deadline) so one poison sample rejects only itself. Calls are serialised: the rewards
    behind it (models, sessions) need not be thread-safe.
    """

    def __init__(
        self,
        reward: RewardFunction | RewardPool,
        timeout_s: float,
        *,
        retry_per_pair: bool = True,
        max_attempts: int = 1,
        backoff_s: float = 1.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        if max_attempts < 1 or backoff_s < 0:
            raise ValueError(f"max_attempts ({max_attempts}) must be >= 1, backoff_s >= 0")
        self.reward = reward
        self.timeout_s = timeout_s
        self.retry_per_pair = retry_per_pair
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._lock = threading.Lock()
        self._hung: _Worker | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[RewardOutcome]:
        """One outcome per (prompt, response) pair, in order; a batch that failed as a
        whole is retried with backoff (see the module docstring)."""
        check_pairs(prompts, responses)
        outcomes = self._score_once(prompts, responses)
        for attempt in range(1, self.max_attempts):
            if not failed_as_a_whole(outcomes):
                break
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.warning(
                "reward failed for a whole batch of %d samples (%s); attempt %d of %d in %.1f s",
                len(outcomes),
                outcomes[0].reason,
                attempt + 1,
                self.max_attempts,
                delay,
            )
            time.sleep(delay)
            outcomes = self._score_once(prompts, responses)
        return outcomes

    def _score_once(self, prompts: Sequence[str], responses: Sequence[str]) -> list[RewardOutcome]:
        count = len(responses)
        if count == 0:
            return []
        reward = self.reward
        with self._lock:
            if isinstance(reward, RewardPool):
                return self._score_in_pool(reward, prompts, responses)
            if self._still_hung():
                return [_TIMEOUT] * count
            deadline = time.monotonic() + self.timeout_s
            batch = _Worker(lambda: as_rewards(reward(prompts, responses), count, "reward"))
            batch.start()
            if not batch.finished_by(deadline):
                self._abandon(batch, count)
                return [_TIMEOUT] * count
            if batch.error is None:
                return [_outcome(value) for value in batch.result]
            log.error(
                "reward failed for a batch of %d samples%s",
                count,
                "; retrying one sample at a time" if self.retry_per_pair and count > 1 else "",
                exc_info=batch.error,
            )
            if not self.retry_per_pair or count == 1:
                return [_ERROR] * count
            return self._score_one_by_one(reward, prompts, responses, deadline)

    def _score_in_pool(
        self, pool: RewardPool, prompts: Sequence[str], responses: Sequence[str]
    ) -> list[RewardOutcome]:
        outcomes: list[RewardOutcome] = []
        for part in pool.score(prompts, responses, self.timeout_s):
            if part.timed_out:
                log.warning(
                    "reward took longer than timeout_s=%ss for %d samples; its worker was "
                    "killed and replaced",
                    self.timeout_s,
                    len(part.values),
                )
                outcomes += [_TIMEOUT] * len(part.values)
                continue
            if part.error is not None:
                failed = sum(value is None for value in part.values)
                if failed:
                    log.error(
                        "reward failed for %d of %d samples:\n%s",
                        failed,
                        len(part.values),
                        part.error,
                    )
                else:  # a python reward, called again pair by pair, scored them all
                    log.warning(
                        "reward raised on a part of %d samples, then scored each of them "
                        "when called one at a time:\n%s",
                        len(part.values),
                        part.error,
                    )
            outcomes += [_ERROR if value is None else _outcome(value) for value in part.values]
        return outcomes

    def close(self) -> None:
        """Stop the reward's worker processes, if it has any."""
        if isinstance(self.reward, RewardPool):
            self.reward.close()

    def _score_one_by_one(
        self,
        reward: RewardFunction,
        prompts: Sequence[str],
        responses: Sequence[str],
        deadline: float,
    ) -> list[RewardOutcome]:
        count = len(responses)
        outcomes: list[RewardOutcome | None] = [None] * count
        stop = threading.Event()

        def run() -> None:
            for i in range(count):
                if stop.is_set():  # past the deadline: leave the rest as timeouts
                    return
                try:
                    value = as_rewards(reward([prompts[i]], [responses[i]]), 1, "reward")
                    outcomes[i] = _outcome(value[0])
                except Exception:
                    outcomes[i] = _ERROR

        worker = _Worker(run)
        worker.start()
        if not worker.finished_by(deadline):
            stop.set()
            self._abandon(worker, count)
        result = [_TIMEOUT if outcome is None else outcome for outcome in outcomes]
        failed = sum(outcome is _ERROR for outcome in result)
        if failed:
            # The batch traceback is already logged; one line per batch, not per sample.
            log.warning("reward failed for %d of %d samples scored one at a time", failed, count)
        return result

    def _still_hung(self) -> bool:
        if self._hung is None:
            return False
        if self._hung.is_alive():
            return True
        log.info("the reward call that timed out has returned; scoring resumes")
        self._hung = None
        return False

    def _abandon(self, worker: _Worker, count: int) -> None:
        self._hung = worker
        log.warning(
            "reward took longer than timeout_s=%ss for %d samples; abandoning the call (a "
            "thread cannot be killed) and rejecting batches until it returns",
            self.timeout_s,
            count,
        )


def failed_as_a_whole(outcomes: Sequence[RewardOutcome]) -> bool:
    """True when no sample got a reward because the reward failed (raised or timed out)
    for every one of them; an empty batch did not fail."""
    return bool(outcomes) and all(o.reason in (REWARD_ERROR, REWARD_TIMEOUT) for o in outcomes)


def _outcome(value: float) -> RewardOutcome:
    return RewardOutcome(value) if math.isfinite(value) else _NONFINITE
