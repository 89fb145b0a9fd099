"""The generator's pipeline: batches go into the engine as they are polled and are
delivered as they finish, and slow batches never take the consumer out of its group.

Each polled batch goes through two stages, each on a thread of its own and one batch at
a time, in poll order: ``engine`` (formatting, and putting the batch into the engine,
which samples every batch it holds together: ``generation.engine_loop``) and ``deliver``
(waiting for its samples, scoring, ranking, sending, waiting for the broker's acks). So
while batch n is scored and delivered, batches n+1, n+2... are sampling: the engine does
not idle while rewards are computed and sends acknowledged. Other engine work (loading a
new adapter version) is queued on the engine stage between batches (``run_on_engine``),
so a version applies to the batches submitted after it is loaded while the ones before
finish on theirs.

Commits stay at least once: batches finish in poll order, and a finished batch's offsets
are committed only when every batch polled before it was delivered too, so the committed
offset of each partition is the highest below which every record is done. A batch that
was not delivered (shutdown during an outage) stops the commits: it and every batch after
it are redone by whoever consumes them next. Memory is bounded by ``max_prompts``
records in flight: the consumer polls only while there is room, and is paused and kept
alive (``keep_alive``) otherwise.

kafka-python takes a member out of its group when ``poll`` is not called for
``kafka.max_poll_interval_ms``; a batch on a CPU, or one scored by a slow judge, can take
longer. The stages run off the consumer's thread, which keeps polling (paused when full),
so the member stays in. A rebalance that revokes partitions waits for the batches in
flight (up to ``max_poll_interval_ms``, the group's rebalance timeout) and commits them
(a Handover), so the partitions' next owner starts after them instead of redoing them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from raft_stream.stream.kafka import Handover, JsonConsumer, PollBatch, TopicPartition

__all__ = ["BatchPipeline"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

Commit = Callable[[Mapping[TopicPartition, int]], bool]
"""Commits offsets (inclusive) on the consumer; False when the commit failed."""


@dataclass
class _InFlight(Generic[T, R]):
    batch: PollBatch[T]
    result: Future[R | None]
    committed: bool = False


class BatchPipeline(Generic[T, R]):
    """Batches in flight through the engine and deliver stages (module docstring).

    ``max_prompts``: records in flight at most (a poll takes only what fits).
    ``revoke_wait_s``: the longest a revocation waits for the batches in flight.
    ``poll_s``: how often the consumer is kept alive while it waits. Use from the consumer's
    thread; ``close`` when done.
    """

    def __init__(
        self,
        consumer: JsonConsumer[T],
        commit: Commit,
        *,
        max_prompts: int,
        revoke_wait_s: float,
        poll_s: float = 0.2,
    ) -> None:
        self._consumer = consumer
        self._commit = commit
        self.max_prompts = max_prompts
        self._poll_s = poll_s
        self._revoke_wait_s = revoke_wait_s
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="raft-stream-engine")
        self._deliver = ThreadPoolExecutor(1, thread_name_prefix="raft-stream-deliver")
        self._queue: deque[_InFlight[T, R]] = deque()
        self._stopped = False
        """A batch was not delivered: nothing after it may be committed."""
        consumer.on_revoke = self._revoked

    # -- what is in flight ------------------------------------------------------------------

    @property
    def prompts_in_flight(self) -> int:
        return sum(len(item.batch) for item in self._queue)

    @property
    def room(self) -> int:
        """Records the next poll may take: 0 when full, and while the consumer hands
        out records it suspects of killing the process (each must be held alone)."""
        if self._queue and self._consumer.suspects:
            return 0
        return max(0, self.max_prompts - self.prompts_in_flight)

    def __len__(self) -> int:
        return len(self._queue)

    # -- the consumer's side ------------------------------------------------------------------

    def poll(self, timeout_s: float, wake: Iterable[Future[Any]] = ()) -> PollBatch[T] | None:
        """Wait up to ``timeout_s`` for what fits; None when nothing came. When nothing
        fits, wait as long for the oldest batch instead (the consumer paused and kept
        alive), or until a future of ``wake`` completes."""
        room = self.room
        if room == 0:
            self.wait(timeout_s, wake)
            return None
        batch = self._consumer.poll(timeout_s, max_records=room, holding=bool(self._queue))
        return batch if len(batch) else None

    def submit(
        self, batch: PollBatch[T], engine: Callable[[], V], deliver: Callable[[V], R | None]
    ) -> None:
        """Run ``engine()`` on the engine stage, then ``deliver(its result)`` on the deliver
        stage; ``finished`` returns deliver's result in poll order."""
        sampled = self._engine.submit(engine)

        def then() -> R | None:
            return deliver(sampled.result())  # raises what the engine stage raised

        self._queue.append(_InFlight(batch, self._deliver.submit(then)))

    def run_on_engine(self, work: Callable[[], V]) -> Future[V]:
        """Queue ``work`` on the engine stage, after the batches submitted so far."""
        return self._engine.submit(work)

    def finished(self) -> list[R]:
        """The results of the batches finished at the head of the queue, in poll order,
        their offsets committed (unless an earlier batch was not delivered). Raises the
        exception of a failed batch (nothing of it or after it is committed)."""
        results: list[R] = []
        while self._queue and self._queue[0].result.done():
            item = self._queue.popleft()
            try:
                result = item.result.result()
            except BaseException:
                self._stopped = True
                raise
            if result is None:
                self._stopped = True
                log.warning("a batch was not delivered; it and the ones after it are redone")
                continue
            if not self._stopped and not item.committed:
                self._commit(item.batch.last_offsets())
            results.append(result)
        return results

    def wait(self, timeout_s: float, wake: Iterable[Future[Any]] = ()) -> None:
        """Keep the consumer alive (paused: nothing is fetched) until the oldest batch
        finishes, a future of ``wake`` completes, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        wake = list(wake)
        self._consumer.pause()
        try:
            while self._queue and not self._queue[0].result.done():
                left = deadline - time.monotonic()
                if left <= 0 or any(future.done() for future in wake):
                    return
                # Blocked on the batch, not spinning on the consumer (its polls wake
                # kafka-python's IO thread and take the CPU the engine needs); a poll at
                # least every ``poll_s`` keeps the member in its group.
                futures.wait(
                    [self._queue[0].result, *wake],
                    timeout=min(self._poll_s, left),
                    return_when=futures.FIRST_COMPLETED,
                )
                self._consumer.keep_alive(0)
        finally:
            self._consumer.resume()

    def drain(self) -> list[R]:
        """Wait for every batch in flight and return (and commit) what was delivered."""
        results: list[R] = []
        while self._queue:
            self.wait(self._poll_s)
            results += self.finished()
        return results

    # -- rebalances ---------------------------------------------------------------------------

    def _revoked(self, revoked: set[TopicPartition]) -> Handover | None:
        """A rebalance takes the partitions: hand the batches in flight over once done."""
        in_flight = [item for item in self._queue if not item.committed]
        if not in_flight or self._stopped:
            return None
        log.info(
            "partitions revoked with batches in flight; finishing them before letting go",
            extra={"partitions": len(revoked), "batches": len(in_flight)},
        )

        def done() -> bool:
            return all(item.result.done() for item in in_flight)

        def offsets() -> Mapping[TopicPartition, int] | None:
            last: dict[TopicPartition, int] = {}
            for item in in_flight:  # the delivered prefix
                if item.result.exception() is not None or item.result.result() is None:
                    break
                for tp, offset in item.batch.last_offsets().items():
                    last[tp] = max(offset, last.get(tp, -1))
            return last or None

        def committed() -> None:
            for item in in_flight:
                if item.result.exception() is not None or item.result.result() is None:
                    break
                item.committed = True

        deadline = time.monotonic() + self._revoke_wait_s
        return Handover(done, offsets, deadline, committed)

    def close(self) -> None:
        """Stop the stages' threads: work queued and not started is cancelled, work
        running is waited for."""
        self._consumer.on_revoke = None
        self._engine.shutdown(wait=True, cancel_futures=True)
        self._deliver.shutdown(wait=True, cancel_futures=True)
