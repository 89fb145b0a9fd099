"""Slow batches keep their consumer in its group (issue 8), on the real broker.

A batch's work that takes longer than ``kafka.max_poll_interval_ms`` runs on BatchRunner's
worker thread while the consumer is polled with its assignment paused: its commit goes
through and nothing is redone. A rebalance during the batch waits for it and commits it,
so the partitions' next owner starts after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from raft_stream.config import KafkaConfig
from raft_stream.roles.batches import BatchRunner
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


def _first_batch(consumer: PromptConsumer, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = consumer.poll(0.5)
        if len(batch):
            return batch
    raise AssertionError("no batch")


def test_a_batch_longer_than_max_poll_interval_is_committed_once(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=1, poll_max_records=4, max_poll_interval_ms=2000)
    _prompts(cfg, 4)
    with PromptConsumer(cfg) as consumer:
        runner = BatchRunner(consumer, _commit(consumer), poll_s=0.2, revoke_wait_s=2.0)
        try:
            batch = _first_batch(consumer)
            assert runner.run(batch, lambda: time.sleep(5) or "delivered") == "delivered"
            assert sum(committed_offsets(cfg, cfg.generator_group).values()) == 4
            # Still a member with its place: nothing is redelivered.
            assert len(consumer.poll(3.0)) == 0
        finally:
            runner.close()


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
        runner = BatchRunner(first, _commit(first), poll_s=0.2, revoke_wait_s=20.0)
        try:
            batch = _first_batch(first)
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
                assert runner.run(batch, work) == "delivered"
                joiner.join()
                # Whoever owns the partition now reads on after the batch.
                deadline = time.monotonic() + 30
                while len(seen) < 8 and time.monotonic() < deadline:
                    for consumer in (first, second):
                        seen += [r.offset for r in consumer.poll(0.3).records]
            finally:
                second.close()
        finally:
            runner.close()
    assert sorted(seen) == list(range(8))  # each record once: the batch was not redone
