"""The soak's reward: scores by length, but raises on a share of calls and hangs on another,
drawn at random per call (bench/soak.py sets the shares through the environment; the
daemon's reward workers inherit it).

Configured as a user's reward (``reward.kind: python``,
``function: bench.soak_reward:flaky_reward``), so it runs in reward worker processes: a
hang costs its worker (killed after ``reward.timeout_s``), not the service.
"""

from __future__ import annotations

import os
import random
import time

RAISE_SHARE_ENV = "RAFT_STREAM_SOAK_RAISE_SHARE"
HANG_SHARE_ENV = "RAFT_STREAM_SOAK_HANG_SHARE"


def flaky_reward(text: str) -> float:
    """Words / 10; raises on ``RAFT_STREAM_SOAK_RAISE_SHARE`` of calls (default 0.05) and
    sleeps an hour on ``RAFT_STREAM_SOAK_HANG_SHARE`` (default 0.01)."""
    draw = random.random()
    raise_share = float(os.environ.get(RAISE_SHARE_ENV, "0.05"))
    hang_share = float(os.environ.get(HANG_SHARE_ENV, "0.01"))
    if draw < raise_share:
        raise RuntimeError("the reward service answered 500")
    if draw < raise_share + hang_share:
        time.sleep(3600)
    return len(text.split()) / 10
