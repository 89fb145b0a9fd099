"""Composing ``concurrent.futures.Future``: what a batch becomes once sampled.

The engine samples batches on its own thread (``generation.engine_loop``); the pipeline
stages chain what follows onto its futures instead of blocking a thread per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

__all__ = ["done", "gather", "then"]

V = TypeVar("V")
R = TypeVar("R")


def done(value: V) -> Future[V]:
    """A future that already holds ``value``."""
    future: Future[V] = Future()
    future.set_result(value)
    return future


def then(
    future: Future[V],
    convert: Callable[[V], R],
    error: Callable[[BaseException], BaseException] = lambda err: err,
) -> Future[R]:
    """A future of ``convert(future's result)``; fails with ``error(what either raised)``.
    ``convert`` runs on the thread that completes ``future`` (or this one, if done)."""
    converted: Future[R] = Future()

    def finish(source: Future[V]) -> None:
        try:
            converted.set_result(convert(source.result()))
        except BaseException as err:
            converted.set_exception(error(err))

    future.add_done_callback(finish)
    return converted


def gather(futures: Sequence[Future[V]]) -> Future[list[V]]:
    """A future of every result, in order, once all are done; fails with the first
    error (in order) once all are done."""
    gathered: Future[list[V]] = Future()
    if not futures:
        gathered.set_result([])
        return gathered
    left = [len(futures)]
    lock = threading.Lock()  # callbacks run on the threads that complete the futures

    def finish(_: Future[V]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            gathered.set_result([f.result() for f in futures])
        except BaseException as err:
            gathered.set_exception(err)

    for future in futures:
        future.add_done_callback(finish)
    return gathered
