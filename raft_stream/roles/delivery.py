"""At-least-once plumbing both roles share: retry sends until acknowledged, commit without
crashing, and connect to a broker that may not be up yet.

The rule they serve: an offset is committed only after what was made from its record is
acknowledged (or stored). So a send that fails is retried, never skipped, and a commit that
fails is only logged: the next commit covers the same offsets, or the records are redone.
And one record never stops a role: ``each_record`` dead-letters a record whose handling
fails, so it is committed and not redone in a crash loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from kafka.errors import KafkaError

from raft_stream.config import KafkaConfig, RaftConfig
from raft_stream.errors import MessageError
from raft_stream.metrics import RaftMetrics
from raft_stream.roles.lifecycle import Backoff, Shutdown
from raft_stream.stream.kafka import (
    CommitError,
    DeadLetterWriter,
    DeliveryError,
    JsonConsumer,
    Received,
    StreamProducer,
    TopicPartition,
    ensure_topics,
)
from raft_stream.stream.poison import CrashJournal
from raft_stream.stream.schema import INTERNAL_ERROR, DeadLetter

__all__ = [
    "StreamClients",
    "commit_quietly",
    "connect",
    "crash_journal",
    "each_record",
    "error_summary",
    "open_clients",
    "until_delivered",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_SUMMARY_CHARS = 300
"""Longest exception summary in an ``internal_error`` dead letter."""


def crash_journal(cfg: RaftConfig, group: str, topic: str) -> CrashJournal:
    """The journal of what a role's consumer of ``topic`` in ``group`` holds:
    ``daemon.state_dir/in_hand/<group>.<topic>.json`` (raft_stream.stream.poison)."""
    path = Path(cfg.daemon.state_dir) / "in_hand" / f"{group}.{topic}.json"
    return CrashJournal(path, cfg.kafka.poison_after_crashes)


def error_summary(err: BaseException) -> str:
    """``ExceptionType: message``, cut to MAX_SUMMARY_CHARS, for a dead letter's detail."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= MAX_SUMMARY_CHARS else text[: MAX_SUMMARY_CHARS - 3] + "..."


def each_record(
    records: Iterable[Received[T]], step: Callable[[Received[T]], R], what: str
) -> tuple[list[tuple[Received[T], R]], list[DeadLetter]]:
    """Run ``step`` on each record alone: (record, result) pairs, and dead letters for the
    records it failed on.

    A MessageError dead-letters the record with its own reason; any other exception (a
    bug that this one record triggers) with ``internal_error`` and a short summary, and is
    logged with its traceback. Put only per-record work in ``step``: an error of the whole
    batch (the engine died) must end the role so that a supervisor restarts it.
    """
    done: list[tuple[Received[T], R]] = []
    dead: list[DeadLetter] = []
    for record in records:
        try:
            done.append((record, step(record)))
        except MessageError as err:
            dead.append(record.dead_letter(err.reason, err.detail))
        except Exception as err:
            log.exception(
                "handling one record failed; dead-lettering it",
                extra={"what": what, "topic": record.topic, "offset": record.offset},
            )
            dead.append(record.dead_letter(INTERNAL_ERROR, f"{what}: {error_summary(err)}"))
    return done, dead


def until_delivered(
    send: Callable[[float], Any],
    timeout_s: float,
    shutdown: Shutdown,
    beat: Callable[[], None],
    what: str,
    metrics: RaftMetrics,
) -> bool:
    """Call ``send(timeout)`` until it returns without DeliveryError; False if shutdown
    came first (the caller must then not commit). Retries count in
    ``delivery_retries_total{what}``.

    Resending what was partly written duplicates it, which at-least-once allows. Within
    the grace period each try waits no longer than the time left. A DeliveryError that is
    not retriable (the broker refused a record for good) is raised.
    """
    backoff = Backoff()
    while True:
        try:
            send(min(timeout_s, shutdown.remaining_s()))
            if backoff.attempts:
                log.info("delivered after retrying", extra={"what": what})
            return True
        except DeliveryError as err:
            if not err.retriable:
                raise
            wait_s = backoff.next_s()
            metrics.delivery_retries_total.labels(what).inc()
            log.warning(
                "delivery failed; retrying",
                extra={"what": what, "error": str(err), "retry_in_s": round(wait_s, 2)},
            )
        beat()
        if shutdown.requested or shutdown.wait(wait_s):
            log.warning("shutdown during an outage: not committing", extra={"what": what})
            return False


def commit_quietly(
    consumer: JsonConsumer[Any],
    offsets: Mapping[TopicPartition, int],
    what: str,
    metrics: RaftMetrics,
) -> bool:
    """Commit; on CommitError log, count and return False (the records may be redone, that
    is all)."""
    try:
        consumer.commit(offsets, timeout_s=10.0)
    except CommitError as err:
        metrics.commit_failures_total.labels(what).inc()
        log.warning("commit failed", extra={"what": what, "error": str(err)})
        return False
    return True


def connect(
    factory: Callable[[], T], shutdown: Shutdown, beat: Callable[[], None], what: str
) -> T | None:
    """Build a client, retrying with backoff while the broker is unreachable; None if
    shutdown came first. A service must come up before its broker, not crash-loop."""
    backoff = Backoff(initial_s=1.0, max_s=15.0)
    while not shutdown.requested:
        try:
            return factory()
        except KafkaError as err:
            wait_s = backoff.next_s()
            log.warning(
                "broker not reachable; retrying",
                extra={"what": what, "error": repr(err), "retry_in_s": round(wait_s, 2)},
            )
        beat()
        shutdown.wait(wait_s)
    return None


@dataclass
class StreamClients(Generic[T]):
    """A role's Kafka clients: its consumer, a producer, and the dead-letter writer."""

    consumer: JsonConsumer[T]
    producer: StreamProducer
    dead_letters: DeadLetterWriter

    def close(self) -> None:
        """Leave the group without committing, then flush what is queued (bounded)."""
        self.consumer.close()
        self.producer.close(timeout_s=5.0)


def open_clients(
    cfg: KafkaConfig,
    topics: Iterable[str],
    consume: Callable[[KafkaConfig], JsonConsumer[T]],
    on_dead_letter: Callable[[str], None],
    shutdown: Shutdown,
    beat: Callable[[], None],
) -> StreamClients[T] | None:
    """Create the topics (when configured), then the producer and the consumer, each
    retried until the broker answers; None if shutdown came first."""
    if cfg.create_topics:
        names = list(topics)
        if connect(lambda: ensure_topics(cfg, names), shutdown, beat, "topics") is None:
            return None
    producer = connect(
        lambda: StreamProducer(cfg, delivery_timeout_s=cfg.delivery_timeout_s),
        shutdown,
        beat,
        "producer",
    )
    if producer is None:
        return None
    consumer = connect(lambda: consume(cfg), shutdown, beat, "consumer")
    if consumer is None:
        producer.close(timeout_s=1.0)
        return None
    writer = DeadLetterWriter(producer, cfg.topics.dead_letter, on_dead_letter)
    return StreamClients(consumer, producer, writer)


JOIN_REPORT_S = 30.0
"""How often a member still waiting to join its group says so."""


def join_group(consumer: JsonConsumer[T], shutdown: Shutdown, beat: Callable[[], None]) -> bool:
    """Wait until ``consumer`` is in its group; False if shutdown came first. A role calls
    it last before it says it is ready (its startup work done, so it polls right after):
    a join takes ~5 s on the embedded broker, and a "ready" role used to spend it in its
    first poll while the prompts waited."""
    started = report = time.monotonic()
    while not consumer.join(timeout_s=1.0):
        beat()
        if shutdown.requested:
            return False
        if time.monotonic() - report >= JOIN_REPORT_S:
            report = time.monotonic()
            log.warning(
                "not in the consumer group yet; still joining",
                extra={"group": consumer.group_id, "waited_s": round(report - started, 1)},
            )
    log.info(
        "joined the consumer group",
        extra={"group": consumer.group_id, "join_s": round(time.monotonic() - started, 2)},
    )
    return True
