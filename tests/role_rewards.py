"""A reward function for the role tests whose behaviour the test switches: it scores,
raises, or hangs. Configured like any user's reward (python kind), so it runs in reward
worker processes: the mode is read from the file named by ``MODE_FILE_ENV`` on every call."""

from __future__ import annotations

import os
import time
from pathlib import Path

MODE_FILE_ENV = "RAFT_STREAM_TEST_REWARD_MODE_FILE"
"""ok (or no file): score by length; raise: every call raises; hang: sleep for an hour;
slow: half a second a call, then score by length (a remote judge)."""


def set_mode(mode: str) -> None:
    Path(os.environ[MODE_FILE_ENV]).write_text(mode)


def controlled_reward(text: str) -> float:
    path = os.environ.get(MODE_FILE_ENV)
    mode = Path(path).read_text() if path and Path(path).exists() else "ok"
    if mode == "raise":
        raise RuntimeError("the reward service is broken")
    if mode == "hang":
        time.sleep(3600)
    if mode == "slow":
        time.sleep(0.5)
    return len(text.split()) / 10


POISON_MARK = "POISON-PILL"
POISON_EXIT = 70


def dies_on_poison(pairs: list[tuple[str, str]]) -> list[float]:
    """Batched: ends the process (``os._exit``, which no ``except`` catches, standing in for
    a segfault in a native reward) when a prompt carries POISON_MARK; else scores by length."""
    if any(POISON_MARK in prompt for prompt, _ in pairs):
        os._exit(POISON_EXIT)
    return [len(response.split()) / 10 for _, response in pairs]
