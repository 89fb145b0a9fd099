"""A reward function for the role tests whose behaviour the test switches: it scores,
raises, or hangs until released. Configured like any user's reward (python kind)."""

from __future__ import annotations

import threading

MODE = {"now": "ok"}
"""ok: score by length; raise: every call raises; hang: block until RELEASE is set."""
RELEASE = threading.Event()


def controlled_reward(text: str) -> float:
    mode = MODE["now"]
    if mode == "raise":
        raise RuntimeError("the reward service is broken")
    if mode == "hang":
        RELEASE.wait(timeout=60)
    return len(text.split()) / 10
