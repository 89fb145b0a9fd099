"""The generator's pipeline on the real broker (issues 8 and 12).

The engine stage samples batch n+1 while batch n is delivered; commits follow poll order
and stop at a batch that was not delivered; no more than ``max_prompts`` records are in
flight. A batch that takes longer than ``kafka.max_poll_interval_ms`` runs off the
consumer's thread, which keeps polling with its assignment paused: its commit goes
through and nothing is redone. A rebalance during batches waits for them and commits
them, so the partitions' next owner starts after them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from raft_stream.config import KafkaConfig
from raft_stream.roles.batches import BatchPipeline
from raft_stream.stream.kafka import CommitError, PromptConsumer, StreamProducer, ensure_topics
from tests.roles_support import committed_offsets

pytestmark = pytest.mark.kafka

MakeConfig = Callable[..., KafkaConfig]


def _prompts(cfg: KafkaConfig, count: int) -> None:
    ensure_topics(cfg, [cfg.topics.prompts])
    with StreamProducer(cfg) as producer:
        messages = [(f"p{i}", {"id": f"p{i}", "prompt": "hi"}) for i in range(count)]
        assert producer.send_and_wait(cfg.topics.prompts, messages, timeout_s=10) == count


def _commit(consumer: PromptConsumer) -> Callable[[dict], bool]:
    def commit(offsets: dict) -> bool:
        try:
            consumer.commit(offsets)
        except CommitError:
            return False
        return True

    return commit


def _pipeline(consumer: PromptConsumer, **settings: float) -> BatchPipeline:  # type: ignore[type-arg]
    return BatchPipeline(consumer, _commit(consumer), poll_s=0.2, **settings)  # type: ignore[arg-type]


def _first_batch(source: BatchPipeline | PromptConsumer, timeout_s: float = 30.0):  # type: ignore[no-untyped-def,type-arg]
    """The next non-empty poll of a pipeline or a bare consumer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = source.poll(0.5)
        if batch is not None and len(batch):
            return batch
    raise AssertionError("no batch")


def _finish(pipeline: BatchPipeline) -> list:  # type: ignore[type-arg]
    """Every result, in poll order, once all batches in flight are done."""
    return pipeline.drain()


def test_a_batch_longer_than_max_poll_interval_is_committed_once(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=4, max_poll_interval_ms=2000)
    _prompts(cfg, 4)
    with PromptConsumer(cfg) as consumer:
        pipeline = _pipeline(consumer, max_prompts=4, revoke_wait_s=2.0)
        try:
            batch = _first_batch(pipeline)
            pipeline.submit(batch, lambda: time.sleep(5), lambda _: "delivered")
            assert _finish(pipeline) == ["delivered"]
            assert sum(committed_offsets(cfg, cfg.generator_group).values()) == 4
            # Still a member with its place: nothing is redelivered.
            assert len(consumer.poll(3.0)) == 0
        finally:
            pipeline.close()


def test_without_the_runner_such_a_batch_loses_its_commit(kafka_config: MakeConfig) -> None:
    # The failure the runner prevents: kafka-python takes the member out of its group.
    cfg = kafka_config(partitions=1, poll_max_records=4, max_poll_interval_ms=2000)
    _prompts(cfg, 4)
    with PromptConsumer(cfg) as consumer:
        batch = _first_batch(consumer)
        time.sleep(5)
        with pytest.raises(CommitError):
            consumer.commit(batch.last_offsets())


def test_a_rebalance_during_a_batch_commits_it_before_the_partitions_move(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=4, max_poll_interval_ms=20_000)
    _prompts(cfg, 8)
    seen: list[int] = []
    with PromptConsumer(cfg) as first:
        pipeline = _pipeline(first, max_prompts=4, revoke_wait_s=20.0)
        try:
            batch = _first_batch(pipeline)
            seen += [r.offset for r in batch.records]
            joined = threading.Event()

            def work() -> str:
                joined.wait(30)
                time.sleep(2)  # the rebalance is under way by now
                return "delivered"

            second = PromptConsumer(cfg)
            joiner = threading.Thread(target=lambda: (joined.set(), second.poll(0.1)))
            try:
                joiner.start()
                pipeline.submit(batch, work, lambda done: done)
                assert _finish(pipeline) == ["delivered"]
                joiner.join()
                # Whoever owns the partition now reads on after the batch.
                deadline = time.monotonic() + 30
                while len(seen) < 8 and time.monotonic() < deadline:
                    for consumer in (first, second):
                        seen += [r.offset for r in consumer.poll(0.3).records]
            finally:
                second.close()
        finally:
            pipeline.close()
    assert sorted(seen) == list(range(8))  # each record once: the batch was not redone


def test_the_engine_samples_the_next_batch_while_the_last_is_delivered(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=4)
    _prompts(cfg, 12)
    spans: dict[str, tuple[float, float]] = {}

    def timed(name: str, seconds: float) -> Callable[..., str]:
        def work(*_: object) -> str:
            started = time.monotonic()
            time.sleep(seconds)
            spans[name] = (started, time.monotonic())
            return name

        return work

    with PromptConsumer(cfg) as consumer:
        pipeline = _pipeline(consumer, max_prompts=12, revoke_wait_s=10.0)
        try:
            for n in range(3):
                batch = _first_batch(pipeline)
                pipeline.submit(batch, timed(f"sample{n}", 0.5), timed(f"deliver{n}", 0.5))
            assert len(pipeline) == 3 and pipeline.room == 0  # 12 prompts in flight: full
            assert _finish(pipeline) == ["deliver0", "deliver1", "deliver2"]
        finally:
            pipeline.close()
    assert sum(committed_offsets(cfg, cfg.generator_group).values()) == 12
    # Sampling of batch n+1 overlaps the delivery of batch n.
    for n in (0, 1):
        assert spans[f"sample{n + 1}"][0] < spans[f"deliver{n}"][1]


def test_a_batch_not_delivered_stops_the_commits_of_the_ones_after_it(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=2)
    _prompts(cfg, 6)
    with PromptConsumer(cfg) as consumer:
        pipeline = _pipeline(consumer, max_prompts=6, revoke_wait_s=10.0)
        try:
            for outcome in ("delivered", None, "delivered"):
                pipeline.submit(_first_batch(pipeline), lambda: None, lambda _, o=outcome: o)
            assert _finish(pipeline) == ["delivered", "delivered"]
        finally:
            pipeline.close()
    # Only the first batch: the second is redone, and the third with it.
    assert sum(committed_offsets(cfg, cfg.generator_group).values()) == 2


def test_a_failed_batch_is_raised_and_nothing_after_it_is_committed(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=2)
    _prompts(cfg, 4)

    def engine_dies() -> None:
        raise RuntimeError("engine died")

    with PromptConsumer(cfg) as consumer:
        pipeline = _pipeline(consumer, max_prompts=4, revoke_wait_s=10.0)
        try:
            pipeline.submit(_first_batch(pipeline), engine_dies, lambda _: "delivered")
            pipeline.submit(_first_batch(pipeline), lambda: None, lambda _: "delivered")
            with pytest.raises(RuntimeError, match="engine died"):
                _finish(pipeline)
        finally:
            pipeline.close()
    assert committed_offsets(cfg, cfg.generator_group) == {}


def test_a_full_pipeline_waits_for_its_oldest_batch_or_a_wake_whichever_comes_first(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=2)
    _prompts(cfg, 2)
    release = threading.Event()
    wake: Future[None] = Future()
    with PromptConsumer(cfg) as consumer:
        pipeline = _pipeline(consumer, max_prompts=2, revoke_wait_s=10.0)
        try:
            pipeline.submit(_first_batch(pipeline), lambda: release.wait(30), lambda _: "done")
            assert pipeline.room == 0

            started = time.monotonic()
            assert pipeline.poll(0.6) is None
            assert time.monotonic() - started >= 0.6  # nothing woke it: the whole timeout

            threading.Timer(0.1, lambda: wake.set_result(None)).start()
            started = time.monotonic()
            assert pipeline.poll(20.0, [wake]) is None
            assert time.monotonic() - started < 10.0, "the wake ended the wait"
            assert len(pipeline) == 1  # the batch is still in flight
        finally:
            release.set()
            assert _finish(pipeline) == ["done"]
            pipeline.close()
