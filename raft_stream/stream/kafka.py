"""Thin wrappers over kafka-python for the raft-stream topics (standard Kafka APIs only).

The delivery rule is at-least-once: a caller commits a record's offset only after what it
produced from that record was acknowledged (``StreamProducer.send_and_wait``), so a crash
or an outage can only make work happen twice, never lose it. Offsets are committed only
when the caller says so (auto-commit is off).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from raft_stream.config import KafkaConfig, SamplingConfig, read_secret
from raft_stream.errors import ConfigError, MessageError, RaftStreamError
from raft_stream.reasons import POISON
from raft_stream.stream.poison import CrashJournal
from raft_stream.stream.schema import (
    INTERNAL_ERROR,
    AdapterAction,
    AdapterAnnouncement,
    DeadLetter,
    check_output_size,
    decode_adapters_message,
    decode_prompt,
    decode_sample,
    dumps,
    encode_dead_letter,
    fit_dead_letter,
)
from raft_stream.types import PromptRecord, Sample

__all__ = [
    "CommitError",
    "DeadLetterWriter",
    "DeliveryError",
    "Handover",
    "JsonConsumer",
    "PollBatch",
    "PromptConsumer",
    "Received",
    "StreamProducer",
    "TopicPartition",
    "adapter_reader",
    "ensure_topics",
    "kafka_client_kwargs",
    "sample_consumer",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = str | bytes | None


class DeliveryError(RaftStreamError):
    """Records were not acknowledged by the broker in time (or were refused).

    Some of them may still have been written: resending is safe under at-least-once and
    may duplicate. ``retriable`` is False only when the broker refused a record for good
    (e.g. it is too large), so resending cannot help.
    """

    def __init__(self, message: str, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class CommitError(RaftStreamError):
    """An offset commit failed (broker unreachable, or the partition was reassigned).

    Log it and go on: the next commit covers the same offsets, or the partition's new
    owner redoes the uncommitted records.
    """


def sasl_password(cfg: KafkaConfig) -> str:
    """The SASL password: from ``kafka.sasl_password_file`` or the environment variable
    ``kafka.sasl_password_env`` names, exactly one of them (ConfigError otherwise)."""
    from_env = os.environ.get(cfg.sasl_password_env)
    if cfg.sasl_password_file is not None:
        if from_env is not None:
            raise ConfigError(
                f"kafka.sasl_password_file ({cfg.sasl_password_file}) and the environment "
                f"variable {cfg.sasl_password_env} (kafka.sasl_password_env) are both set; "
                "set only one"
            )
        return read_secret(cfg.sasl_password_file, "kafka.sasl_password_file")
    if from_env is None:
        raise ConfigError(
            f"kafka.security_protocol is {cfg.security_protocol} but the environment "
            f"variable {cfg.sasl_password_env} (kafka.sasl_password_env) is not set; set it, "
            "or set kafka.sasl_password_file to a file holding the password"
        )
    return from_env


def kafka_client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by every client: servers, security, SASL and SSL."""
    if not cfg.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers is not set; set it to host:port, or start the embedded "
            "broker (EmbeddedBroker) and use its bootstrap address"
        )
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers.split(","),
        "security_protocol": cfg.security_protocol,
        "client_id": "raft-stream",
    }
    if cfg.security_protocol.startswith("SASL"):
        password = sasl_password(cfg)
        kwargs |= {
            "sasl_mechanism": cfg.sasl_mechanism or "PLAIN",
            "sasl_plain_username": cfg.sasl_username,
            "sasl_plain_password": password,
        }
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(cfg, name)
        if path is not None:
            kwargs[name] = str(path)
    return kwargs


def ensure_topics(cfg: KafkaConfig, names: Iterable[str]) -> list[str]:
    """Create the topics that do not exist yet; returns the ones this call created."""
    admin = KafkaAdminClient(**kafka_client_kwargs(cfg))
    try:
        existing = set(admin.list_topics())
        created = []
        for name in dict.fromkeys(names):  # drop duplicates, keep the order
            if name in existing:
                continue
            topic = NewTopic(name, cfg.topics.partitions, cfg.topics.replication_factor)
            try:
                admin.create_topics([topic])
            except TopicAlreadyExistsError:
                continue  # another replica created it between list and create
            created.append(name)
        return created
    finally:
        admin.close()


@dataclass(frozen=True)
class Received(Generic[T]):
    """A decoded record and where it came from."""

    value: T
    topic: str
    partition: int
    offset: int
    raw: bytes | None = None
    """The record's original bytes, so a consumer that gives up on it later (e.g. a prompt
    the model cannot take) can still dead-letter it exactly."""
    key: bytes | None = None
    timestamp_ms: int = -1
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def dead_letter(self, reason: str, detail: str) -> DeadLetter:
        """This record as a dead letter with the caller's reason."""
        return DeadLetter(
            reason=reason,
            detail=detail,
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            timestamp_ms=self.timestamp_ms,
            value=self.raw,
            key=self.key,
            headers=self.headers,
        )


@dataclass(frozen=True)
class PollBatch(Generic[T]):
    """What one poll returned: usable records, and the ones to dead-letter."""

    records: list[Received[T]]
    dead: list[DeadLetter]

    def __len__(self) -> int:
        return len(self.records) + len(self.dead)

    def last_offsets(self) -> dict[TopicPartition, int]:
        """Highest offset per partition, usable and dead alike: pass it to ``commit`` once
        the batch's output and its dead letters are acknowledged."""
        last: dict[TopicPartition, int] = {}
        items: list[Received[T] | DeadLetter] = [*self.records, *self.dead]
        for item in items:
            tp = TopicPartition(item.topic, item.partition)
            last[tp] = max(item.offset, last.get(tp, -1))
        return last


@dataclass(frozen=True)
class Handover:
    """What a rebalance waits for before the revoked partitions go (``on_revoke``'s answer).

    ``offsets()`` once ``done()``: what to commit (inclusive), or None when the work was
    not delivered (nothing is committed; the next owner redoes it). ``deadline`` is a
    ``time.monotonic()`` past which the partitions go anyway. ``committed()`` is called
    after a successful commit.
    """

    done: Callable[[], bool]
    offsets: Callable[[], Mapping[TopicPartition, int] | None]
    deadline: float
    committed: Callable[[], None]


class _KeepPausedOnAssign(AsyncConsumerRebalanceListener):
    """Partitions assigned by a rebalance start unpaused; backpressure must outlive it.
    Revoked partitions are handed over: when the owner's ``on_revoke`` says a batch is in
    hand, the rebalance waits for it and commits it first.

    kafka-python 3 runs rebalance listeners on its IO thread, where a blocking call (a
    synchronous commit, a sleep) would stop heartbeats; as an async listener this one
    awaits instead, with kafka-python's own sleep and commit coroutines (private, pinned
    with kafka-python==3.0.12 in pyproject.toml; tests/test_batches.py exercises them).
    """

    def __init__(self, owner: JsonConsumer[Any]) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        hook = self._owner.on_revoke
        handover = hook(set(revoked)) if hook is not None and revoked else None
        if handover is None:
            return  # uncommitted records are redone by the new owner
        coordinator = self._owner._consumer._coordinator
        while not handover.done() and time.monotonic() < handover.deadline:
            await coordinator._manager._net.sleep(0.05)
        offsets = handover.offsets() if handover.done() else None
        if not offsets:
            log.warning("partitions revoked before their batch was delivered; redone elsewhere")
            return
        commit = {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in offsets.items()}
        try:
            await coordinator._commit_offsets_sync_async(commit)
        except Exception as err:  # the group moved on: the next owner redoes the batch
            log.warning("commit at revocation failed", extra={"error": str(err)})
            return
        handover.committed()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # kafka-python calls this after every join under the eager assignors it defaults
        # to (range, round robin), with or without partitions.
        self._owner.joined = True
        if self._owner.paused:
            self._owner.pause()


class _ClosedOnExit:
    """``with client:`` closes the client on the way out, however the block ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class JsonConsumer(_ClosedOnExit, Generic[T]):
    """Reads one topic and decodes each record; bad records come back as dead letters.

    ``decode(value, where)`` gets the record's bytes (b"" for a null record) and
    ``where`` = ``"topic/partition/offset"``, a name that is stable across redeliveries,
    and raises MessageError for an unusable record.

    With a ``group_id`` the consumer joins that group (partitions are shared among its
    members, offsets are committed with ``commit``). Without one it reads every partition
    by itself, commits nothing, and starts afresh each time: how generators follow the
    adapters topic. ``from_beginning`` says where a reader without a committed offset
    starts.

    Like the KafkaConsumer under it, it is not thread-safe: use it from one thread.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        topic: str,
        decode: Callable[[bytes, str], T],
        *,
        group_id: str | None,
        from_beginning: bool = True,
        max_poll_records: int = 500,
        journal: CrashJournal | None = None,
    ) -> None:
        self._decode = decode
        self._journal = journal
        self._paused = False
        self.on_revoke: Callable[[set[TopicPartition]], Handover | None] | None = None
        """Called (on kafka-python's IO thread) with the partitions a rebalance takes
        away, before they go; a Handover makes the rebalance wait for a batch in hand
        and commit it. It must not block."""
        self.max_poll_records = max_poll_records
        self.group_id = group_id
        self.joined = group_id is None
        """True once the member joined its group the first time (its assignment possibly
        empty: more members than partitions); a consumer outside any group reads its
        partitions at once. Not reset by a later rebalance: it tells a start is over."""
        self._consumer = KafkaConsumer(
            **kafka_client_kwargs(cfg),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            max_poll_records=max_poll_records,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
        )
        if group_id is not None:
            self._consumer.subscribe([topic], listener=_KeepPausedOnAssign(self))
            return
        partitions = self._consumer.partitions_for_topic(topic)
        if not partitions:
            self._consumer.close()
            raise ValueError(f"topic {topic!r} does not exist; create it first (ensure_topics)")
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])

    def poll(
        self, timeout_s: float, *, max_records: int | None = None, holding: bool = False
    ) -> PollBatch[T]:
        """Wait up to ``timeout_s`` for at most ``max_records`` records (and at most the
        consumer's ``max_poll_records``). Keep calling it while paused: polling is what
        keeps this member in its group.

        A poll tells the crash journal that the records handed out before were handled,
        unless ``holding``: the caller still holds them (a pipeline), and commits release
        them instead.
        """
        if self._journal is not None and not holding:
            self._journal.handled()
        limit = (
            self.max_poll_records
            if max_records is None
            else min(max_records, self.max_poll_records)
        )
        polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=limit)
        dead: list[DeadLetter] = []
        if self._journal is not None and polled:
            screened = self._journal.screen(polled)
            for tp, offset in screened.seek.items():
                self._consumer.seek(tp, offset)
            polled = screened.records
            for rec, crashes in screened.poison:
                detail = (
                    f"the process died {crashes} times while handling this record alone "
                    f"(kafka.poison_after_crashes={self._journal.max_crashes})"
                )
                log.error("poison record dead-lettered", extra={"where": _where(rec)})
                dead.append(_dead_letter(rec, POISON, detail))
        records: list[Received[T]] = []
        for batch in polled.values():
            for rec in batch:
                try:
                    value = self._decode(b"" if rec.value is None else rec.value, _where(rec))
                except Exception as err:
                    # MessageError; anything else is a decoder bug this record triggers
                    # (the decoders are total, tests/test_records_fuzz.py): never fatal.
                    dead.append(_dead_letter(rec, *_reason_of(err)))
                else:
                    records.append(
                        Received(
                            value,
                            rec.topic,
                            rec.partition,
                            rec.offset,
                            raw=rec.value,
                            key=rec.key,
                            timestamp_ms=rec.timestamp,
                            headers=tuple(rec.headers or ()),
                        )
                    )
        return PollBatch(records, dead)

    def keep_alive(self, timeout_s: float) -> None:
        """Poll while paused, with a batch in hand: keeps this member in its group and
        runs rebalance callbacks, and hands out nothing (a record fetched anyway, from a
        partition assigned unpaused, is sought back to be read later)."""
        polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        for tp, batch in polled.items():
            if batch:
                self._consumer.seek(tp, batch[0].offset)

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` to be in the group (``joined``), fetching nothing, so
        the first ``poll`` after it fetches at once instead of waiting out the join (a
        rebalance: ~5 s on the embedded broker, Kafka's ``group.initial.rebalance.delay.ms``
        of 3 s and every member's rejoin on a real one). Returns ``joined``."""
        deadline = time.monotonic() + timeout_s
        was_paused = self._paused
        self.pause()  # partitions assigned meanwhile stay paused (_KeepPausedOnAssign)
        try:
            while not self.joined and (left := deadline - time.monotonic()) > 0:
                self.keep_alive(min(0.1, left))
        finally:
            if not was_paused:
                self.resume()
        return self.joined

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_s: float = 30.0) -> None:
        """Mark every record up to ``offsets[tp]`` (inclusive) as done: commits offset + 1.

        Raises CommitError when the broker refuses or does not answer in time.
        """
        if not offsets:
            return
        to_commit = {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in offsets.items()}
        try:
            self._consumer.commit(to_commit, timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise CommitError(f"commit of {dict(offsets)} failed: {exc}") from exc
        if self._journal is not None:
            self._journal.handled(offsets)

    @property
    def suspects(self) -> bool:
        """True while the crash journal hands out records one at a time (each must be
        the only one in hand when it is handled)."""
        return self._journal is not None and bool(self._journal.suspects)

    @property
    def paused(self) -> bool:
        """True between ``pause`` and ``resume``."""
        return self._paused

    def pause(self) -> None:
        """Stop fetching (backpressure); ``poll`` then returns empty batches."""
        self._paused = True
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        """Fetch again after ``pause``."""
        self._paused = False
        self._consumer.resume(*self._consumer.paused())

    def lag(self) -> int:
        """Records on the broker not yet returned by ``poll``, over the assigned partitions.

        Uses fetch high-water marks (``consumer.highwater``), not ListOffsets: Tansu 0.6
        answers ListOffsets "latest" with the last batch's base offset + 1. kafka-python
        reads a partition's mark when ``poll`` reaches that partition's fetched data, so
        each term is as of that moment: a partition not reached yet counts 0, and just
        after a burst the total can be low until ``poll`` has gone round the partitions.
        """
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                total += max(0, high - self._consumer.position(tp))
        return total

    def close(self) -> None:
        """Leave the group (its partitions go to other members) without committing."""
        self._consumer.close(autocommit=False)


def _where(rec: ConsumerRecord) -> str:
    """A record's stable name across redeliveries: ``topic/partition/offset``."""
    return f"{rec.topic}/{rec.partition}/{rec.offset}"


def _dead_letter(rec: ConsumerRecord, reason: str, detail: str) -> DeadLetter:
    """A polled record, whole, as a dead letter."""
    return DeadLetter(
        reason=reason,
        detail=detail,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp,
        value=rec.value,
        key=rec.key,
        headers=tuple(rec.headers or ()),
    )


def _reason_of(err: Exception) -> tuple[str, str]:
    """(reason, detail) of a record the decoder refused or failed on."""
    if isinstance(err, MessageError):
        return err.reason, err.detail
    log.error("decoder failed on a record; dead-lettering it", exc_info=err)
    return INTERNAL_ERROR, f"decoding: {type(err).__name__}: {err!s:.300}"


class PromptConsumer(JsonConsumer[PromptRecord]):
    """The generators' consumer of the prompts topic, in group ``cfg.generator_group``.

    One poll returns at most ``cfg.poll_max_records`` prompts (a generation batch). A
    prompt without an id gets ``topic/partition/offset``; its sampling overrides must
    stay within ``sampling``'s ranges and per-prompt maxima.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        sampling: SamplingConfig | None = None,
        journal: CrashJournal | None = None,
    ) -> None:
        max_bytes = cfg.max_message_bytes
        limits = sampling or SamplingConfig()
        super().__init__(
            cfg,
            cfg.topics.prompts,
            lambda value, where: decode_prompt(value, max_bytes, where, limits),
            group_id=cfg.generator_group,
            max_poll_records=cfg.poll_max_records,
            journal=journal,
        )


def sample_consumer(cfg: KafkaConfig, journal: CrashJournal | None = None) -> JsonConsumer[Sample]:
    """The trainer's consumer of the samples topic, in group ``cfg.trainer_group``."""
    max_bytes = cfg.max_message_bytes
    return JsonConsumer(
        cfg,
        cfg.topics.samples,
        lambda value, _: decode_sample(value, max_bytes),
        group_id=cfg.trainer_group,
        journal=journal,
    )


def adapter_reader(cfg: KafkaConfig) -> JsonConsumer[AdapterAnnouncement | AdapterAction]:
    """A reader of every adapters-topic message (announcements and actions) from the
    beginning, without a group: how each generator follows the topic."""
    max_bytes = cfg.max_message_bytes
    return JsonConsumer(
        cfg,
        cfg.topics.adapters,
        lambda value, _: decode_adapters_message(value, max_bytes),
        group_id=None,
    )


class _Acks:
    """Counts the sends of one batch and waits until all are acknowledged or one fails."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sent = 0
        self._acked = 0
        self._error: BaseException | None = None

    def track(self, future: FutureRecordMetadata) -> None:
        with self._cond:
            self._sent += 1
        # Outside the lock: a future that is already done runs its callback right here.
        future.add_callback(self._on_ack)
        future.add_errback(self._on_error)

    def _on_ack(self, _metadata: Any) -> None:
        with self._cond:
            self._acked += 1
            self._cond.notify_all()

    def _on_error(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def wait(self, timeout_s: float) -> int:
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._error is not None or self._acked == self._sent, timeout_s
            )
            if self._error is not None:
                raise DeliveryError(
                    f"{self._sent - self._acked} of {self._sent} records not delivered: "
                    f"{self._error}",
                    retriable=getattr(self._error, "retriable", True),
                ) from self._error
            if not done:
                raise DeliveryError(
                    f"{self._sent - self._acked} of {self._sent} records not acknowledged "
                    f"within {timeout_s:g} s"
                )
            return self._sent


def _key_bytes(key: Key) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


class StreamProducer(_ClosedOnExit):
    """Producer with acks from all in-sync replicas and a bounded delivery time.

    A record not acknowledged within ``delivery_timeout_s`` fails its future (it may
    still have been written). Records of one key keep their order unless a send is
    retried; raft-stream's consumers do not depend on order. Records are bounded by
    ``cfg.max_message_bytes``, which is also the client's ``max_request_size``.
    """

    def __init__(
        self, cfg: KafkaConfig, *, delivery_timeout_s: float = 30.0, linger_ms: int = 5
    ) -> None:
        delivery_ms = int(delivery_timeout_s * 1000)
        self.max_message_bytes = cfg.max_message_bytes
        self._producer = KafkaProducer(
            **kafka_client_kwargs(cfg),
            acks="all",
            # kafka-python 3.0.12 wedges an idempotent producer for good once a batch that
            # was already sent expires (reset_producer_id leaves the state READY, so no
            # InitProducerId is ever sent again): one outage longer than the delivery
            # timeout would stall the service. At-least-once already tolerates duplicates.
            enable_idempotence=False,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_ms,
            # Half the delivery time, so a timed-out request is retried once in it.
            request_timeout_ms=max(500, delivery_ms // 2),
            # send() waits for metadata or buffer space no longer than a delivery may take.
            max_block_ms=delivery_ms,
            max_request_size=cfg.max_message_bytes,
        )

    def send_bytes(self, topic: str, value: bytes, key: Key = None) -> FutureRecordMetadata:
        """Queue one record as it is; the future resolves when the broker acknowledges.

        Raises MessageError (``output_too_large``) for a record over
        ``kafka.max_message_bytes`` before it reaches the client, which would refuse it
        for good (callers that produce from input check with ``check_output_size`` first).
        """
        key_bytes = _key_bytes(key)
        check_output_size(value, key_bytes, self.max_message_bytes, f"record for {topic}")
        try:
            return self._producer.send(topic, value=value, key=key_bytes)
        except KafkaError as exc:
            raise DeliveryError(f"send to {topic} failed: {exc}", retriable=exc.retriable) from exc

    def send_json(self, topic: str, obj: Any, key: Key = None) -> FutureRecordMetadata:
        """Queue one JSON message (see ``schema.dumps``)."""
        return self.send_bytes(topic, dumps(obj), key)

    def wait_all(self, futures: Iterable[FutureRecordMetadata], timeout_s: float) -> int:
        """Consume ``futures`` (sends, possibly lazily made) and block until every record is
        acknowledged; returns how many. Waits at most ``timeout_s`` after the last send.

        Raises DeliveryError at the first failure or at the timeout.
        """
        acks = _Acks()
        for future in futures:
            acks.track(future)
        return acks.wait(timeout_s)

    def send_and_wait(
        self, topic: str, messages: Iterable[tuple[Key, Any]], timeout_s: float
    ) -> int:
        """Send (key, JSON object) pairs and block until all are acknowledged (or raise
        DeliveryError). Commit the offsets they came from only after this returns."""
        return self.wait_all((self.send_json(topic, obj, key) for key, obj in messages), timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything queued and wait for it; KafkaTimeoutError after ``timeout_s``."""
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to ``timeout_s``, then close."""
        self._producer.close(timeout=timeout_s)


class DeadLetterWriter:
    """Sends dead letters to the dead-letter topic, logs each, and reports each reason.

    ``on_dead_letter(reason)`` runs once per acknowledged envelope, e.g.
    ``lambda reason: DEAD_LETTERS.labels(reason=reason).inc()``. Each envelope is cut to
    the producer's ``max_message_bytes`` (``fit_dead_letter``), so a dead letter can
    always be sent, whatever the record it carries.
    """

    def __init__(
        self,
        producer: StreamProducer,
        topic: str,
        on_dead_letter: Callable[[str], None] | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._on_dead_letter = on_dead_letter

    def write(self, letters: Sequence[DeadLetter], timeout_s: float = 30.0) -> None:
        """Send the envelopes and block until all are acknowledged (or DeliveryError);
        only then may the offsets of the original records be committed."""
        if not letters:
            return
        fitted = [fit_dead_letter(d, self._producer.max_message_bytes) for d in letters]
        self._producer.send_and_wait(
            self._topic, ((d.key, encode_dead_letter(d)) for d in fitted), timeout_s
        )
        for letter in fitted:
            log.warning(
                "dead-lettered %s/%d/%d: %s (%s)",
                letter.topic,
                letter.partition,
                letter.offset,
                letter.reason,
                letter.detail,
            )
            if self._on_dead_letter is not None:
                self._on_dead_letter(letter.reason)
