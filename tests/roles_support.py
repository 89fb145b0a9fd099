"""Helpers for the role tests: a test config, roles on threads, and topic readers."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kafka import KafkaAdminClient, KafkaProducer
from prometheus_client import CollectorRegistry

from raft_stream.config import KafkaConfig, RaftConfig, load_config
from raft_stream.metrics import RaftMetrics
from raft_stream.prompting import PromptFormatter
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.generator import GeneratorRole
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.roles.trainer import TrainerRole
from raft_stream.stream.kafka import (
    JsonConsumer,
    StreamProducer,
    TopicPartition,
    ensure_topics,
    kafka_client_kwargs,
)
from raft_stream.stream.schema import (
    AdapterAnnouncement,
    DeadLetter,
    decode_adapter,
    decode_dead_letter,
    decode_sample,
    dumps,
    encode_sample,
)
from raft_stream.types import Sample

if TYPE_CHECKING:
    from raft_stream.generation.vllm_backend import VLLMGenerator

T = TypeVar("T")

# Over the tiny model's preset: a streaming round of 32 samples learns with micro-batches of
# 8 at twice the preset's LoRA scale (raft_stream/streaming_demo.py); fresh sampling seeds,
# small batches so rounds come often, and fast adapter pick-up.
TINY_SETTINGS: dict[str, Any] = {
    "generation.sampling.seed": None,
    "training.lora_alpha": 32,
    "training.batch_size": 8,
    "buffer.capacity": 64,
    "buffer.batch_size": 32,
    "daemon.adapter_poll_interval_s": 0.2,
    "daemon.grace_period_s": 20,
    "server.host": "127.0.0.1",
    "server.port": 0,
}


def role_config(
    kafka: KafkaConfig, state_dir: Path, model_dir: Path, **overrides: Any
) -> RaftConfig:
    """A RaftConfig for the tiny model (in ``model_dir``, with its preset) on ``kafka``;
    ``overrides`` use dotted keys."""
    settings = {
        **TINY_SETTINGS,
        "model.name_or_path": str(model_dir),
        "daemon.state_dir": str(state_dir),
        **overrides,
    }
    # The kafka section first: dotted "kafka.*" overrides then land inside it.
    return load_config(
        overrides={"kafka": kafka.model_dump(mode="json"), **settings}, preset="tiny"
    )


class RoleThread:
    """Runs a role's ``run`` on a thread; ``stop`` requests shutdown and joins."""

    def __init__(self, run: Callable[[], None], shutdown: Shutdown, name: str) -> None:
        self.shutdown = shutdown
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run()
            except BaseException as err:  # surfaced by stop()
                self.error = err

        self.thread = threading.Thread(target=target, name=name, daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.shutdown.request("test over")
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the role did not stop"
        if self.error is not None:
            raise self.error


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)


def produce_prompts(cfg: KafkaConfig, prompts: Iterable[tuple[str, str]]) -> int:
    """Send (id, prompt) pairs to the prompts topic; returns how many were acked."""
    ensure_topics(cfg, [cfg.topics.prompts])
    with StreamProducer(cfg) as producer:
        return producer.send_and_wait(
            cfg.topics.prompts, [(i, {"id": i, "prompt": p}) for i, p in prompts], 30
        )


def produce_raw(cfg: KafkaConfig, values: Iterable[bytes], topic: str | None = None) -> None:
    """Send raw bytes (well-formed or not) to a topic (default: prompts), as any client may."""
    topic = topic or cfg.topics.prompts
    ensure_topics(cfg, [topic])
    raw = KafkaProducer(**kafka_client_kwargs(cfg))
    for value in values:
        raw.send(topic, value=value)
    raw.flush(30)
    raw.close()


class TopicReader:
    """Reads a topic from the beginning without a group, accumulating what it decodes."""

    def __init__(self, cfg: KafkaConfig, topic: str, decode: Callable[[bytes], T]) -> None:
        ensure_topics(cfg, [topic])
        self.items: list[T] = []
        self._reader: JsonConsumer[T] = JsonConsumer(
            cfg, topic, lambda value, _: decode(value), group_id=None
        )

    def read(self, timeout_s: float = 0.2) -> list[T]:
        self.items += [r.value for r in self._reader.poll(timeout_s).records]
        return self.items

    def read_all(self, quiet_s: float = 2.0, timeout_s: float = 60.0) -> list[T]:
        """Read until nothing new came for ``quiet_s`` (the end of the topic, for a topic
        nobody writes to any more)."""
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() - last_new < quiet_s and time.monotonic() < deadline:
            before = len(self.items)
            if len(self.read()) > before:
                last_new = time.monotonic()
        return self.items

    def read_until(
        self, condition: Callable[[list[T]], bool], timeout_s: float, what: str
    ) -> list[T]:
        deadline = time.monotonic() + timeout_s
        while not condition(self.read()):
            assert time.monotonic() < deadline, (
                f"timed out after {timeout_s} s waiting for {what}; have {len(self.items)}"
            )
        return self.items

    def close(self) -> None:
        self._reader.close()


def sample_reader(cfg: KafkaConfig) -> TopicReader[Sample]:
    return TopicReader(cfg, cfg.topics.samples, decode_sample)


def dead_letter_reader(cfg: KafkaConfig) -> TopicReader[DeadLetter]:
    return TopicReader(cfg, cfg.topics.dead_letter, decode_dead_letter)


def original_of(letter: DeadLetter, sent: Iterable[bytes | None]) -> bytes | None:
    """The record a dead letter carries: its value, or, when the envelope had to cut it
    to fit kafka.max_message_bytes, the sent record it is the start of."""
    if letter.original_size is None:
        return letter.value
    prefix = letter.value or b""
    return next(v for v in sent if v and len(v) == letter.original_size and v.startswith(prefix))


def prompt_ids(samples: Iterable[Sample]) -> set[str]:
    return {s.prompt_id for s in samples}


def mean_reward_by_version(samples: Iterable[Sample]) -> dict[int, tuple[float, int]]:
    """adapter version -> (mean reward, count) over the scored samples."""
    rewards: dict[int, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.reward is not None:
            rewards[sample.adapter_version].append(sample.reward)
    return {v: (statistics.fmean(r), len(r)) for v, r in sorted(rewards.items())}


def committed_offsets(cfg: KafkaConfig, group: str) -> dict[TopicPartition, int]:
    """The group's committed offsets (next offset to read) per partition."""
    admin = KafkaAdminClient(**kafka_client_kwargs(cfg))
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items()}
    finally:
        admin.close()


@dataclass
class Roles:
    """A generator (and maybe a trainer) running on threads in this process."""

    generator: GeneratorRole
    trainer: TrainerRole | None
    metrics: RaftMetrics
    shutdown: Shutdown
    threads: list[RoleThread]

    def alive(self) -> bool:
        return all(t.alive() for t in self.threads)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextmanager
def running_roles(
    cfg: RaftConfig, engine: VLLMGenerator, model_dir: Path, *, trainer: bool = True
) -> Iterator[Roles]:
    """Start the roles on the session's engine; on exit request shutdown and join them.

    The engine outlives each test and every test's store starts again at v1: the engine
    replaces a cached version whose folder or checksum changed (VLLMGenerator._add).
    """
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    formatter = PromptFormatter.from_model(str(model_dir), cfg.model)
    generator = GeneratorRole(
        cfg, engine, formatter, build_safe_reward(cfg.reward), metrics, shutdown
    )
    threads = []
    trainer_role = None
    if trainer:
        trainer_role = TrainerRole(cfg, str(model_dir), metrics, shutdown)
        threads.append(RoleThread(trainer_role.run, shutdown, "test-trainer"))
    threads.append(RoleThread(generator.run, shutdown, "test-generator"))
    roles = Roles(generator, trainer_role, metrics, shutdown, threads)
    try:
        yield roles
    finally:
        shutdown.request("test over")
        for thread in threads:
            thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)


@dataclass
class FedTrainer:
    role: TrainerRole
    metrics: RaftMetrics
    announcements: TopicReader[AdapterAnnouncement]
    thread: RoleThread


@contextmanager
def fed_trainer(cfg: RaftConfig, model_dir: Path, count: int) -> Iterator[FedTrainer]:
    """A trainer role on a thread, fed ``count`` samples of one prompt (reward 0.5, text
    only), and a reader of what it announces; stopped (and the reader closed) on exit."""
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.samples, topics.adapters, topics.dead_letter])
    samples = [
        Sample(f"p{i}", "the movie was", "the movie was", " great fun.", 3, 0, reward=0.5)
        for i in range(count)
    ]
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    role = TrainerRole(cfg, str(model_dir), metrics, shutdown)
    announcements = TopicReader(cfg.kafka, topics.adapters, decode_adapter)
    thread = RoleThread(role.run, shutdown, "test-trainer")
    try:
        produce_raw(cfg.kafka, [dumps(encode_sample(s)) for s in samples], topic=topics.samples)
        yield FedTrainer(role, metrics, announcements, thread)
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        announcements.close()


def reward_trend(samples: Iterable[Sample]) -> tuple[float, float]:
    """(slope, t): least squares of reward on adapter version, and the slope's t statistic.

    The unit is one prompt answered by one version (the mean of its K samples): the K
    answers to one prompt are not independent, so counting them singly would overstate t.
    """
    groups: dict[tuple[int, str], list[float]] = defaultdict(list)
    for sample in samples:
        if sample.reward is not None:
            groups[(sample.adapter_version, sample.prompt_id)].append(sample.reward)
    xs = [float(version) for version, _ in groups]
    ys = [statistics.fmean(rewards) for rewards in groups.values()]
    slope, intercept = statistics.linear_regression(xs, ys)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    x_mean = statistics.fmean(xs)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    standard_error = math.sqrt(sum(r * r for r in residuals) / (len(xs) - 2) / sxx)
    return slope, slope / standard_error


@contextmanager
def transformers_generator(cfg: RaftConfig, model_dir: Path) -> Iterator[Roles]:
    """A generator role on the transformers backend (no vLLM engine to start: for the tests
    of which version serves, decided above the engine), running on a thread until exit."""
    from raft_stream.generation.hf_backend import TransformersGenerator

    engine = TransformersGenerator(str(model_dir), cfg.model, cfg.generation)
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    role = GeneratorRole(
        cfg,
        engine,
        PromptFormatter.from_model(str(model_dir), cfg.model),
        build_safe_reward(cfg.reward),
        metrics,
        shutdown,
    )
    thread = RoleThread(role.run, shutdown, "test-generator")
    try:
        wait_for(lambda: role.ready or not thread.alive(), 60, "generator ready")
        yield Roles(role, None, metrics, shutdown, [thread])
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        engine.close()
