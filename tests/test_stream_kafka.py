"""Kafka wrappers against the real embedded broker over TCP (no mocks).

Group joins take 3-5 s each, so each test joins as few groups as its property needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from kafka import KafkaConsumer, KafkaProducer

from raft_stream.config import KafkaConfig
from raft_stream.errors import MessageError
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import (
    DeadLetterWriter,
    DeliveryError,
    JsonConsumer,
    PollBatch,
    PromptConsumer,
    StreamProducer,
    adapter_reader,
    ensure_topics,
    kafka_client_kwargs,
    sample_consumer,
)
from raft_stream.stream.schema import (
    RECORD_OVERHEAD_BYTES,
    AdapterAnnouncement,
    DeadLetter,
    decode_dead_letter,
    encode_adapter,
    encode_sample,
)
from raft_stream.types import AdapterVersion, Sample
from tests.roles_support import original_of

pytestmark = pytest.mark.kafka

T = TypeVar("T")
MakeConfig = Callable[..., KafkaConfig]


def _poll_until(consumer: JsonConsumer[T], count: int, timeout_s: float = 20.0) -> PollBatch[T]:
    """Poll until at least ``count`` records (usable or dead) arrived; one batch of them all."""
    merged: PollBatch[T] = PollBatch([], [])
    deadline = time.monotonic() + timeout_s
    while len(merged) < count and time.monotonic() < deadline:
        batch = consumer.poll(timeout_s=0.5)
        merged.records.extend(batch.records)
        merged.dead.extend(batch.dead)
    assert len(merged) >= count, f"got {len(merged)} of {count} records in {timeout_s} s"
    return merged


def _prompts(cfg: KafkaConfig, ids: list[str]) -> None:
    ensure_topics(cfg, [cfg.topics.prompts])
    with StreamProducer(cfg) as producer:
        messages = [(i, {"id": i, "prompt": f"prompt {i}"}) for i in ids]
        assert producer.send_and_wait(cfg.topics.prompts, messages, timeout_s=10) == len(ids)


def test_ensure_topics_creates_missing_topics_and_accepts_existing_ones(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=3)
    names = [cfg.topics.prompts, cfg.topics.samples]
    assert ensure_topics(cfg, names) == names
    assert ensure_topics(cfg, [*names, cfg.topics.adapters]) == [cfg.topics.adapters]
    consumer = KafkaConsumer(**kafka_client_kwargs(cfg))
    try:
        assert consumer.partitions_for_topic(cfg.topics.prompts) == {0, 1, 2}
    finally:
        consumer.close()


def test_uncommitted_prompts_are_redelivered_to_the_next_member_of_the_group(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(partitions=2, poll_max_records=4)
    ids = [f"p{i}" for i in range(10)]
    _prompts(cfg, ids)

    with PromptConsumer(cfg) as first:
        done = _poll_until(first, 1)  # the first generation batch
        assert 1 <= len(done) <= cfg.poll_max_records
        first.commit(done.last_offsets())
        # Processed too, but the worker "crashes" before committing them.
        rest = _poll_until(first, len(ids) - len(done))
        assert first.lag() == 0
    committed = {r.value.id for r in done.records}
    assert committed | {r.value.id for r in rest.records} == set(ids)

    with PromptConsumer(cfg) as second:
        # Paused before it joins: the partitions a rebalance assigns must stay paused.
        second.pause()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert len(second.poll(timeout_s=0.5)) == 0
        second.resume()
        redone = _poll_until(second, len(rest))
        assert {r.value.id for r in redone.records} == set(ids) - committed
        second.commit(redone.last_offsets())
        assert len(second.poll(timeout_s=1)) == 0


def test_join_waits_until_the_member_is_in_its_group_and_takes_no_record(
    kafka_config: MakeConfig,
) -> None:
    # A role is ready only once joined (roles.delivery.open_clients): before, a "ready"
    # daemon spent its first poll joining, ~5 s, while the prompts waited.
    cfg = kafka_config(partitions=1)
    ids = [f"p{i}" for i in range(6)]
    _prompts(cfg, ids)
    with PromptConsumer(cfg) as member:
        assert not member.joined
        assert member.join(timeout_s=30)
        assert member.joined and not member.paused
        polled = _poll_until(member, len(ids))  # from the first record: none taken by join
        assert [r.value.id for r in polled.records] == ids


def test_a_member_left_without_partitions_joins_too(kafka_config: MakeConfig) -> None:
    # More generators than partitions: the one with nothing to consume must get ready.
    cfg = kafka_config(partitions=1)
    ensure_topics(cfg, [cfg.topics.prompts])
    with PromptConsumer(cfg) as first, PromptConsumer(cfg) as second:
        both = threading.Barrier(2, timeout=60)

        def join(member: PromptConsumer) -> bool:
            joined = member.join(timeout_s=60)
            both.wait()  # the first to join keeps polling while the other one joins
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # a rebalance the second join started
                member.keep_alive(0.1)
            return joined

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(join, [first, second])) == [True, True]
        owned = [member._consumer.assignment() for member in (first, second)]
    assert sorted(len(partitions) for partitions in owned) == [0, 1]


def test_lag_counts_the_records_not_yet_polled(kafka_config: MakeConfig) -> None:
    # One partition: its high-water mark is read from the fetch that poll() returns from.
    cfg = kafka_config(partitions=1)
    _prompts(cfg, [f"p{i}" for i in range(10)])
    with JsonConsumer(
        cfg, cfg.topics.prompts, lambda value, _: value, group_id=None, max_poll_records=4
    ) as reader:
        polled = 0
        for expected_lag in (6, 2, 0):
            polled += len(_poll_until(reader, 1))
            assert reader.lag() == 10 - polled == expected_lag


def test_malformed_prompts_are_dead_lettered_with_exact_bytes_and_reasons(
    kafka_config: MakeConfig,
) -> None:
    cfg = kafka_config(max_message_bytes=1024)
    malformed = {
        b"\xff\xfe not utf-8": "not_utf8",
        b"{not json": "not_json",
        b'["a", "list"]': "not_object",
        b'{"schema_version": 2, "prompt": "x"}': "unknown_schema_version",
        b'{"id": "x"}': "missing_prompt",
        b'{"prompt": "  "}': "empty_prompt",
        b'{"prompt": 42}': "bad_field_type",
        b'{"prompt": "x", "sampling": {"top_p": 2}}': "bad_field_type",
        b'{"prompt": "' + b"a" * 2000 + b'"}': "too_large",
    }
    good = [b'{"id": "good-%d", "prompt": "fine"}' % i for i in range(3)]
    headers = [("trace-id", b"\x00\x01"), ("source", b"test")]
    ensure_topics(cfg, [cfg.topics.prompts, cfg.topics.dead_letter])
    raw = KafkaProducer(**kafka_client_kwargs(cfg))  # any client may write anything
    for i, value in enumerate([good[0], *malformed, good[1], good[2]]):
        raw.send(cfg.topics.prompts, value=value, key=b"key-%d" % i, headers=headers)
    raw.flush(10)
    raw.close()

    with PromptConsumer(cfg) as consumer, StreamProducer(cfg) as producer:
        batch = _poll_until(consumer, len(good) + len(malformed))
        assert sorted(r.value.id for r in batch.records) == ["good-0", "good-1", "good-2"]
        assert {d.value: d.reason for d in batch.dead} == malformed

        counted: list[str] = []
        DeadLetterWriter(producer, cfg.topics.dead_letter, counted.append).write(batch.dead)
        assert sorted(counted) == sorted(malformed.values())
        consumer.commit(batch.last_offsets())
        assert consumer.lag() == 0

    with JsonConsumer(
        cfg, cfg.topics.dead_letter, lambda value, _: decode_dead_letter(value), group_id=None
    ) as reader:
        envelopes: list[DeadLetter] = [r.value for r in _poll_until(reader, len(malformed)).records]
    # The 2000-byte original does not fit a 1 KiB envelope: it is cut, its size kept.
    assert {original_of(e, malformed): e.reason for e in envelopes} == malformed
    assert [e.cut for e in envelopes if e.cut] == [("original",)]
    assert all(e.headers == tuple(headers) and e.key is not None for e in envelopes)
    assert {(e.topic, e.partition, e.offset, e.key) for e in envelopes} == {
        (d.topic, d.partition, d.offset, d.key) for d in batch.dead
    }


def test_a_record_over_the_message_limit_is_refused_before_the_client_sees_it(
    kafka_config: MakeConfig,
) -> None:
    # kafka-python refuses a record over max_request_size for good (a non-retriable
    # MessageSizeTooLargeError that ended a role): it is given kafka.max_message_bytes, and
    # the producer checks that limit first, with a reason the roles dead-letter.
    cfg = kafka_config(max_message_bytes=2048)
    ensure_topics(cfg, [cfg.topics.samples])
    with StreamProducer(cfg) as producer:
        largest = 2048 - RECORD_OVERHEAD_BYTES - 1
        future = producer.send_bytes(cfg.topics.samples, b"x" * largest, key=b"k")
        assert producer.wait_all([future], timeout_s=10) == 1
        with pytest.raises(MessageError, match=r"over kafka\.max_message_bytes \(2048\)") as caught:
            producer.send_bytes(cfg.topics.samples, b"x" * largest, key=b"kk")
    assert caught.value.reason == "output_too_large"


def test_trainer_reads_samples_and_generators_read_every_adapter(
    kafka_config: MakeConfig, tmp_path: Path
) -> None:
    cfg = kafka_config()
    ensure_topics(cfg, [cfg.topics.samples, cfg.topics.adapters])
    samples = [Sample(f"p{i}", "Hi", "Hi", f"answer {i}", 2, 1, reward=i / 4) for i in range(4)]
    adapters = [AdapterVersion(v, tmp_path / f"v{v}", "00" * 32, "demo", 1.0) for v in (1, 2)]
    with StreamProducer(cfg) as producer:
        producer.send_and_wait(
            cfg.topics.samples, [(s.prompt_id, encode_sample(s)) for s in samples], 10
        )
        producer.send_and_wait(
            cfg.topics.adapters, [(None, encode_adapter(a)) for a in adapters], 10
        )

    with sample_consumer(cfg) as trainer:
        received = _poll_until(trainer, len(samples))
        assert sorted(received.records, key=lambda r: r.value.prompt_id)[0].value == samples[0]
        assert sorted(r.value.response for r in received.records) == [s.response for s in samples]
        trainer.commit(received.last_offsets())

    with adapter_reader(cfg) as reader:
        announced: list[AdapterAnnouncement] = [r.value for r in _poll_until(reader, 2).records]
    assert sorted(a.version for a in announced) == [1, 2]


def test_send_fails_within_the_delivery_timeout_while_the_broker_is_frozen() -> None:
    # A broker of its own: freezing the shared one would stall other tests' clients.
    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap)
        topic = cfg.topics.samples
        ensure_topics(cfg, [topic])
        with StreamProducer(cfg, delivery_timeout_s=2.0) as producer:
            producer.send_and_wait(topic, [("k", {"n": 0})], timeout_s=10)  # connected
            broker.freeze()
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                producer.send_and_wait(topic, [("k", {"n": 1})], timeout_s=10)
            assert time.monotonic() - started < 4
            assert caught.value.retriable
            broker.thaw()
            # The caller's retry succeeds once the broker is back.
            assert producer.send_and_wait(topic, [("k", {"n": 1})], timeout_s=10) == 1

        seen: list[bytes] = []
        with JsonConsumer(cfg, topic, lambda value, _: value, group_id=None) as reader:
            seen += [r.value for r in _poll_until(reader, 2, timeout_s=5).records]
            seen += [r.value for r in reader.poll(timeout_s=1).records]  # any duplicate
    assert seen.count(b'{"n":0}') == 1
    # At least once: the frozen broker may also have written the failed try when it woke.
    assert seen.count(b'{"n":1}') >= 1
