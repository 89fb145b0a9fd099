"""The adapters topic pushed to the generator (roles.adapters.AdapterFeed), on the real
embedded broker: what arrives is waiting for the engine stage before it asks, so a version
stored while a batch samples serves the next batch, with no poll interval to wait out."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from raft_stream.config import KafkaConfig
from raft_stream.roles.adapters import AdapterFeed, AdapterWatcher, announce
from raft_stream.stream.kafka import Received, StreamProducer, ensure_topics
from raft_stream.stream.schema import AdapterAnnouncement
from raft_stream.types import AdapterVersion
from tests.roles_support import wait_for

pytestmark = pytest.mark.kafka


def version(n: int, folder: Path) -> AdapterVersion:
    return AdapterVersion(
        version=n,
        path=folder / f"v{n:06d}",
        sha256=f"{n:064x}",
        base_model="tiny",
        created_at=time.time(),
        lineage="feed-test",
    )


def test_what_the_topic_brings_is_waiting_before_the_engine_stage_asks(
    kafka_config: Callable[..., KafkaConfig], tmp_path: Path
) -> None:
    cfg = kafka_config(partitions=1)
    ensure_topics(cfg, [cfg.topics.adapters])
    refused: list[str] = []
    feed = AdapterFeed(AdapterWatcher(cfg, refused.append, poll_timeout_s=0.5))
    try:
        assert not feed.pending.is_set() and feed.take() == []
        arrival = feed.arrival
        assert not arrival.done()
        with StreamProducer(cfg) as producer:
            for n in (1, 2):
                announce(producer, cfg.topics.adapters, version(n, tmp_path), timeout_s=10)
        wait_for(feed.pending.is_set, timeout_s=10, what="the feed to get news")
        arrival.result(timeout=10)  # wakes whoever waits on it
        assert not feed.arrival.done(), "the next arrival is a new future"
        received: list[Received[object]] = []

        def both_arrived() -> bool:
            received.extend(feed.take())
            return len(received) == 2

        wait_for(both_arrived, timeout_s=10, what="both announcements")
        assert [type(r.value) for r in received] == [AdapterAnnouncement] * 2
        assert [r.value.version for r in received] == [1, 2]  # the topic's order
        assert not feed.pending.is_set() and feed.take() == [] and refused == []
    finally:
        feed.close()


def test_a_feed_whose_consumer_fails_raises_at_the_next_take(
    kafka_config: Callable[..., KafkaConfig],
) -> None:
    cfg = kafka_config(partitions=1)
    ensure_topics(cfg, [cfg.topics.adapters])
    watcher = AdapterWatcher(cfg, lambda _reason: None, poll_timeout_s=0.1)
    watcher.close()  # its consumer refuses to poll from here on
    feed = AdapterFeed(watcher)
    try:
        wait_for(feed.pending.is_set, timeout_s=10, what="the failure to be reported")
        with pytest.raises(Exception) as raised:
            feed.take()
        assert raised.value is feed.error
    finally:
        feed.close()
