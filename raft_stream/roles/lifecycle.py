"""Process lifecycle shared by the roles: the stop flag with its grace deadline, signal
handlers, the exit watchdog, retry backoff, and heartbeats for /healthz.

Example:
    >>> shutdown = Shutdown(grace_period_s=30)
    >>> shutdown.request("SIGTERM")
    >>> shutdown.requested, shutdown.remaining_s() <= 30
    (True, True)
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

__all__ = [
    "STOP_SIGNALS",
    "Backoff",
    "Heartbeats",
    "Shutdown",
    "children_die_with_parent",
    "die_with_parent",
    "install_signal_handlers",
    "is_spawned_child",
    "start_exit_watchdog",
]

log = logging.getLogger(__name__)

EXIT_GRACE_EXPIRED = 3
"""Exit status when the watchdog ends a drain that overran the grace period."""


class Shutdown:
    """The stop flag every loop of a process checks, and the deadline of the drain.

    ``request`` starts the grace period once; loops finish their in-flight work and return,
    and anything that waits on the drain waits at most ``remaining_s()``.
    """

    def __init__(self, grace_period_s: float) -> None:
        self.grace_period_s = grace_period_s
        self.reason: str | None = None
        self._deadline: float | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        """Ask every loop to drain and stop; the first call starts the grace period."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._deadline = time.monotonic() + self.grace_period_s
            self._event.set()
        log.info("shutting down", extra={"reason": reason, "grace_period_s": self.grace_period_s})

    def wait(self, timeout_s: float | None = None) -> bool:
        """Sleep up to ``timeout_s`` (None: until then) unless shutdown is requested; True
        when it was."""
        return self._event.wait(None if timeout_s is None else max(0.0, timeout_s))

    def remaining_s(self) -> float:
        """Seconds left of the grace period; infinity before shutdown is requested."""
        if self._deadline is None:
            return math.inf
        return max(0.0, self._deadline - time.monotonic())


STOP_SIGNALS = ("SIGTERM", "SIGINT")
"""The signals that request a shutdown; the shutdown's ``reason`` is the signal's name."""


def install_signal_handlers(shutdown: Shutdown) -> None:
    """SIGTERM and SIGINT request the shutdown (call from the main thread)."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        shutdown.request(signal.Signals(signum).name)

    for name in STOP_SIGNALS:
        signal.signal(signal.Signals[name], on_signal)


def start_exit_watchdog(shutdown: Shutdown, margin_s: float = 1.0) -> threading.Thread:
    """Exit the process hard if a drain overruns the grace period.

    A generation batch or a training step cannot be interrupted, so without this a long
    one would outlive the grace period (and be SIGKILLed anyway). Exiting hard is safe:
    whatever was not committed is redelivered. Fires ``margin_s`` before the deadline.
    """

    def watch() -> None:
        shutdown.wait()
        time.sleep(max(0.0, shutdown.remaining_s() - margin_s))
        log.error(
            "the drain overran the grace period; exiting now (uncommitted work is redone)",
            extra={"grace_period_s": shutdown.grace_period_s},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_GRACE_EXPIRED)

    thread = threading.Thread(target=watch, name="raft-stream-exit-watchdog", daemon=True)
    thread.start()
    return thread


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have this process SIGKILLed when its parent (``parent_pid``) dies. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def children_die_with_parent() -> None:
    """Every process forked from now on gets SIGKILL when the process that forked it dies.

    vLLM starts an engine core, which starts its workers; when the daemon is SIGKILLed (an
    OOM kill, a node agent) or ended by the exit watchdog, nothing else stops them, and they
    keep cores and gigabytes busy as orphans. This covers the fork start method (the hook is
    inherited down the tree); ``raft_stream.cli`` covers spawn, which vLLM uses on the CPU
    and once CUDA is initialized.
    """
    forking_pid = os.getpid()

    def before_fork() -> None:
        nonlocal forking_pid
        forking_pid = os.getpid()

    os.register_at_fork(before=before_fork, after_in_child=lambda: die_with_parent(forking_pid))


def is_spawned_child() -> bool:
    """True in a process the multiprocessing spawn method started (while it imports main)."""
    return "--multiprocessing-fork" in sys.orig_argv


class Backoff:
    """Exponential backoff with full jitter: waits grow from ``initial_s`` to ``max_s``."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempts = 0

    def next_s(self) -> float:
        """The next wait; jitter keeps many replicas from retrying in step."""
        ceiling = min(self.max_s, self.initial_s * 2**self.attempts)
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


class Heartbeats:
    """Forwards a heartbeat to /healthz only once every registered loop has beaten.

    In all-in-one mode two loops share one process: a hung generator must fail liveness
    even while the trainer loop is fine, and the other way round.
    """

    def __init__(self, forward: Callable[[], None]) -> None:
        self._forward = forward
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._beaten: set[str] = set()

    def register(self, name: str) -> Callable[[], None]:
        """Add a loop; returns the function the loop calls on every iteration."""
        with self._lock:
            self._names.add(name)
        return lambda: self._beat(name)

    def _beat(self, name: str) -> None:
        with self._lock:
            self._beaten.add(name)
            if self._beaten < self._names:
                return
            self._beaten.clear()
        self._forward()


def noop() -> None:
    """A heartbeat that goes nowhere (roles run outside a daemon, e.g. in tests)."""
