"""SafeReward: a reward that raises, hangs or returns NaN rejects samples instead of crashing.

Each sample gets a RewardOutcome: a finite reward, or None and one reason code:

- ``reward_error``: the reward raised (logged once per batch, with the traceback);
- ``reward_timeout``: the call took longer than ``timeout_s``;
- ``reward_nonfinite``: NaN or inf for that sample (the others keep theirs).

Limitation: Python cannot kill a thread. A call past its timeout is abandoned in its daemon
thread, which runs on until the reward returns (or the process exits). So that repeated hangs
cannot pile up threads, while that thread is alive every batch is refused at once with
``reward_timeout``; scoring resumes when it returns. A reward that never returns needs a
restart (or a reward kind that enforces its own timeout, like http).
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
        self, reward: RewardFunction, timeout_s: float, *, retry_per_pair: bool = True
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
        self.reward = reward
        self.timeout_s = timeout_s
        self.retry_per_pair = retry_per_pair
        self._lock = threading.Lock()
        self._hung: _Worker | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[RewardOutcome]:
        """One outcome per (prompt, response) pair, in order."""
        check_pairs(prompts, responses)
        count = len(responses)
        if count == 0:
            return []
        with self._lock:
            if self._still_hung():
                return [_TIMEOUT] * count
            deadline = time.monotonic() + self.timeout_s
            batch = _Worker(lambda: as_rewards(self.reward(prompts, responses), count, "reward"))
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
            return self._score_one_by_one(prompts, responses, deadline)

    def _score_one_by_one(
        self, prompts: Sequence[str], responses: Sequence[str], deadline: float
    ) -> list[RewardOutcome]:
        count = len(responses)
        outcomes: list[RewardOutcome | None] = [None] * count
        stop = threading.Event()

        def run() -> None:
            for i in range(count):
                if stop.is_set():  # past the deadline: leave the rest as timeouts
                    return
                try:
                    value = as_rewards(self.reward([prompts[i]], [responses[i]]), 1, "reward")
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


def _outcome(value: float) -> RewardOutcome:
    return RewardOutcome(value) if math.isfinite(value) else _NONFINITE
