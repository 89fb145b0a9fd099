"""User reward functions in worker processes that can be killed.

A reward written by a user (``reward.kind: python``) may hang, leak, crash the interpreter
or bound its own time with ``signal.alarm`` (math-answer verifiers and code sandboxes do),
which only works on a main thread. So each worker is a process of its own (spawned: a fresh
interpreter) that imports the function once and calls it on its main thread. A call past
``timeout_s`` kills its worker (SIGKILL) and a fresh one replaces it before the next call:
one hung input costs one batch, never the batches after it. A batch is split across
``workers`` processes, each part scored in parallel under the same deadline.

Each worker dies with the process that started it (``PR_SET_PDEATHSIG``).

Example:
    >>> pool = RewardPool(RewardConfig(kind="python", function="builtins:len"), workers=2)
    >>> pool.score(["Q: "] * 3, ["a", "bb", "ccc"], timeout_s=5.0)
    [PoolResult(values=[1.0, 2.0, 3.0], error=None), ...]   # one per part
    >>> pool.close()
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final

from raft_stream.errors import ConfigError

if TYPE_CHECKING:
    from raft_stream.config import RewardConfig

__all__ = ["PoolResult", "RewardPool"]

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 120.0
"""Longest wait for a worker to import the reward (not counted against ``timeout_s``)."""


@dataclass(frozen=True)
class PoolResult:
    """What one worker answered for its part of a batch.

    ``values[i]`` is the reward of pair i, or None when it could not be scored; ``error``
    is the traceback of a failed call, ``"timeout"`` when the worker was killed at the
    deadline, ``"died"`` when it died on its own. ``timed_out`` is True only for the
    first of these.
    """

    values: list[float | None]
    error: str | None = None
    timed_out: bool = False


def _score_part(
    reward: Any, prompts: list[str], responses: list[str], retry_per_pair: bool
) -> PoolResult:
    """In the worker: score a part; on failure, pair by pair when ``retry_per_pair``."""
    from raft_stream.rewards.base import as_rewards

    try:
        return PoolResult(list(as_rewards(reward(prompts, responses), len(prompts), "reward")))
    except Exception:
        error = traceback.format_exc()
    if not retry_per_pair or len(prompts) == 1:
        return PoolResult([None] * len(prompts), error)
    values: list[float | None] = []
    for prompt, response in zip(prompts, responses, strict=True):
        try:
            values.append(as_rewards(reward([prompt], [response]), 1, "reward")[0])
        except Exception:
            values.append(None)
    return PoolResult(values, error)


def _serve(cfg: RewardConfig, conn: Connection, parent_pid: int) -> None:
    """A worker's main: build the reward, then answer (prompts, responses) until EOF."""
    from raft_stream.roles.lifecycle import die_with_parent

    die_with_parent(parent_pid)
    try:
        from raft_stream.rewards.registry import build_reward

        reward = build_reward(cfg)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    retry_per_pair = cfg.kind == "python"
    while True:
        try:
            prompts, responses = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_score_part(reward, prompts, responses, retry_per_pair))


class _Worker:
    def __init__(self, cfg: RewardConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_serve,
            args=(cfg, child, os.getpid()),
            name="raft-stream-reward",
            daemon=True,
        )
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise ConfigError(
                f"the reward worker did not start within {START_TIMEOUT_S:g} s "
                f"(reward.function {cfg.function!r})"
            )
        status, detail = self.conn.recv()
        if status != "ready":
            self.kill()
            raise ConfigError(f"reward.function {cfg.function!r} cannot be built: {detail}")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """``workers`` processes running the configured reward; see the module docstring.

    Raises ConfigError at construction when the reward cannot be built in a worker.
    Calls are serialised by the caller (SafeReward holds a lock).
    """

    def __init__(self, cfg: RewardConfig, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers ({workers}) must be >= 1")
        self.cfg = cfg
        self._workers: list[_Worker | None] = [_Worker(cfg) for _ in range(workers)]
        self.replaced = 0
        """Workers killed at a deadline or found dead, and replaced."""

    def _worker(self, index: int) -> _Worker:
        worker = self._workers[index]
        if worker is None:
            worker = self._workers[index] = _Worker(self.cfg)
        return worker

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], timeout_s: float
    ) -> list[PoolResult]:
        """Score the pairs in up to ``workers`` contiguous parts; one PoolResult per part,
        in order. Never raises for the reward's sake."""
        size = -(-len(prompts) // len(self._workers))
        parts = [
            (list(prompts[i : i + size]), list(responses[i : i + size]))
            for i in range(0, len(prompts), size)
        ]
        sent: dict[Connection, int] = {}
        for index, part in enumerate(parts):
            worker = self._worker(index)
            try:
                worker.conn.send(part)
                sent[worker.conn] = index
            except (OSError, ValueError):
                pass  # a dead worker: answered as "died" below
        results: list[PoolResult | None] = [None] * len(parts)
        deadline = time.monotonic() + timeout_s
        pending = set(sent)
        by_fileno = {conn.fileno(): conn for conn in sent}
        while pending:
            ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for handle in ready:
                conn = by_fileno[handle.fileno()]  # type: ignore[union-attr]
                pending.discard(conn)
                with contextlib.suppress(EOFError, OSError):
                    results[sent[conn]] = conn.recv()
        out: list[PoolResult] = []
        for index, part in enumerate(parts):
            result = results[index]
            if result is None:
                # Still pending at the deadline: it overran; otherwise it died (EOF, or the
                # send failed).
                overran = self._workers[index] is not None and self._worker(index).conn in pending
                self._replace(index, overran)
                n = len(part[0])
                result = PoolResult([None] * n, "timeout" if overran else "died", overran)
            out.append(result)
        return out

    def _replace(self, index: int, overran: bool) -> None:
        """Kill worker ``index``; a fresh one starts on the next call."""
        worker = self._workers[index]
        self._workers[index] = None
        self.replaced += 1
        if worker is None:
            return
        worker.kill()
        log.warning(
            "reward worker %s; replaced",
            "overran reward.timeout_s and was killed"
            if overran
            else f"died (exit {worker.process.exitcode})",
        )

    def close(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker is not None:
                worker.kill()
            self._workers[index] = None
