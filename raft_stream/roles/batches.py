"""Slow batches without leaving the consumer group.

kafka-python takes a member out of its group when ``poll`` is not called for
``kafka.max_poll_interval_ms``; a generation batch on a CPU, or one scored by a slow
judge, can take longer than that. Then its commit fails and the batch is redone by
another member, forever if every batch is that slow. ``BatchRunner`` applies the
standard pattern for slow consumers: the batch's work runs on a worker thread while the
consumer's own thread (KafkaConsumer is not thread-safe) pauses the assignment and keeps
polling, which keeps the member alive and fetches nothing. The commit is made on the
consumer's thread once the work is delivered.

A rebalance during the batch (a member joins or leaves) revokes the partitions. Before
they go the consumer's listener waits for the work (the group waits up to
``max_poll_interval_ms`` for a member to rejoin) and commits its offsets (a Handover),
so the partitions' next owner starts after the batch instead of redoing it.

The same loop serves continuous generation (issue 12): the worker side becomes the
engine's stream of finished requests, and the consumer side keeps its place in the group
the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from raft_stream.stream.kafka import Handover, JsonConsumer, PollBatch, TopicPartition

__all__ = ["BatchRunner"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Commit = Callable[[Mapping[TopicPartition, int]], bool]
"""Commits offsets (inclusive) on the consumer; False when the commit failed."""


class BatchRunner(Generic[T]):
    """Runs one batch at a time on a worker thread while ``consumer`` stays in its group.

    ``poll_s``: how often the consumer is polled while a batch runs. ``revoke_wait_s``:
    the longest a revocation waits for the batch before letting its partitions go
    (``kafka.max_poll_interval_ms``: the group's rebalance timeout). Use it from the
    consumer's thread; ``close`` when done.
    """

    def __init__(
        self, consumer: JsonConsumer[T], commit: Commit, poll_s: float, revoke_wait_s: float
    ) -> None:
        self._consumer = consumer
        self._commit = commit
        self._poll_s = poll_s
        self._revoke_wait_s = revoke_wait_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="raft-stream-batch")
        self._in_flight: tuple[PollBatch[T], Future[object]] | None = None
        self._committed = False
        consumer.on_revoke = self._revoked

    def run(self, batch: PollBatch[T], work: Callable[[], R | None]) -> R | None:
        """``work()`` on the worker thread; meanwhile poll the paused consumer. Returns
        what it returned and commits ``batch`` unless that is None (not delivered: do not
        commit); raises what it raised (nothing is committed then)."""
        future: Future[R | None] = self._executor.submit(work)
        self._in_flight = (batch, future)  # type: ignore[assignment]
        self._committed = False
        self._consumer.pause()
        try:
            while not future.done():
                self._consumer.keep_alive(self._poll_s)
            result = future.result()
            if result is not None and not self._committed:
                self._commit(batch.last_offsets())
            return result
        finally:
            self._in_flight = None
            self._consumer.resume()

    def _revoked(self, revoked: set[TopicPartition]) -> Handover | None:
        """A rebalance takes the partitions: hand over the batch in hand once done."""
        in_flight = self._in_flight
        if in_flight is None or self._committed:
            return None
        batch, future = in_flight
        log.info(
            "partitions revoked during a batch; finishing it before letting them go",
            extra={"partitions": len(revoked)},
        )

        def offsets() -> Mapping[TopicPartition, int] | None:
            if future.exception() is not None or future.result() is None:
                return None
            return batch.last_offsets()

        def committed() -> None:
            self._committed = True

        deadline = time.monotonic() + self._revoke_wait_s
        return Handover(future.done, offsets, deadline, committed)

    def close(self) -> None:
        """Stop the worker thread (waits for a batch still running)."""
        self._consumer.on_revoke = None
        self._executor.shutdown(wait=True)
