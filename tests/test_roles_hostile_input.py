"""Hostile records on the prompts and samples topics never stop a role (issue 7).

A real broker and the real roles on threads: the generator on the tiny model with the
transformers backend (no vLLM engine to start), the trainer with its LoRA model loaded. Each
bad record is dead-lettered with its reason and counted, good ones are served, the role
stays up and commits past the bad ones (so no crash loop).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from raft_stream.buffer import RewardBuffer
from raft_stream.config import KafkaConfig, RaftConfig
from raft_stream.generation.hf_backend import TransformersGenerator
from raft_stream.metrics import RaftMetrics
from raft_stream.prompting import PromptFormatter
from raft_stream.rewards.registry import build_safe_reward
from raft_stream.roles.generator import GeneratorRole
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.roles.trainer import BUFFER_FILE, TrainerRole
from raft_stream.stream.schema import dumps, encode_sample
from raft_stream.types import PromptRecord, Sample
from tests.roles_support import (
    RoleThread,
    committed_offsets,
    dead_letter_reader,
    produce_raw,
    prompt_ids,
    role_config,
    sample_reader,
    wait_for,
)

pytestmark = pytest.mark.kafka

MakeConfig = Callable[..., KafkaConfig]
HUGE_INT = "1" + "0" * 400


class _FormatterWithABug(PromptFormatter):
    """The real formatter, with a bug that one kind of prompt triggers."""

    def format(self, record: PromptRecord) -> PromptRecord:
        if "trigger a bug" in record.prompt:
            raise KeyError("a bug in formatting")
        return super().format(record)


def _total_committed(cfg: KafkaConfig, group: str) -> int:
    return sum(committed_offsets(cfg, group).values())


def _metric(metrics: RaftMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("raft_stream_dead_letter_total", {"reason": reason})
    return 0.0 if value is None else value


HOSTILE_PROMPTS = {
    # A 530 KB id: the prompt fits kafka.max_message_bytes, its sample (id as key and in
    # the value) does not. Before: MessageSizeTooLargeError ended the role.
    json.dumps({"id": "i" * 530_000, "prompt": "the movie was"}): "output_too_large",
    # The detail echoed the 450 KB field whole: the dead letter itself was too large.
    json.dumps({"id": ["a" * 450_000], "prompt": "the movie was"}): "bad_field_type",
    '{"id":"\\ud800","prompt":"hi"}': "bad_text",
    '{"id":"k","prompt":"hi","sampling":{"k":256,"max_new_tokens":1000000000}}': (
        "override_out_of_bounds"
    ),
    '{"id":"t","prompt":"hi","sampling":{"temperature":' + HUGE_INT + "}}": "number_out_of_range",
    '{"id":"bug","prompt":"please trigger a bug"}': "internal_error",
    '{"id":"deep","prompt":"hi","metadata":' + "[" * 5000 + "]" * 5000 + "}": "not_json",
}


def test_the_generator_dead_letters_each_hostile_prompt_and_serves_the_good_ones(
    kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "generation.backend": "transformers",
            "generation.sampling.k": 2,
            "generation.sampling.max_new_tokens": 4,
        },
    )
    assert cfg.kafka.max_message_bytes == 1_000_000  # the default: the producer's limit too
    good = [f'{{"id": "good-{i}", "prompt": "the movie was"}}' for i in range(4)]
    corpus = [good[0], *HOSTILE_PROMPTS, *good[1:]]
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    engine = TransformersGenerator(str(tiny_model_dir), cfg.model, cfg.generation)
    formatter = _FormatterWithABug.from_model(str(tiny_model_dir), cfg.model)
    role = GeneratorRole(cfg, engine, formatter, build_safe_reward(cfg.reward), metrics, shutdown)
    letters, samples = dead_letter_reader(cfg.kafka), sample_reader(cfg.kafka)
    thread = RoleThread(role.run, shutdown, "test-generator")
    try:
        produce_raw(cfg.kafka, [line.encode() for line in corpus])
        letters.read_until(lambda d: len(d) >= len(HOSTILE_PROMPTS), 90, "dead letters")
        samples.read_until(
            lambda s: {f"good-{i}" for i in range(4)} <= prompt_ids(s), 90, "good samples"
        )
        wait_for(
            lambda: _total_committed(cfg.kafka, cfg.kafka.generator_group) == len(corpus),
            30,
            "the commit past every record",
        )
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        letters.close()
        samples.close()
        engine.close()

    by_reason = {d.reason: d for d in letters.items}
    assert sorted(by_reason) == sorted(HOSTILE_PROMPTS.values())
    assert len(letters.items) == len(HOSTILE_PROMPTS)
    for original, reason in HOSTILE_PROMPTS.items():
        letter = by_reason[reason]
        assert letter.value == original.encode(), reason  # kept whole: they fit
        assert len(letter.detail) <= 1000 and _metric(metrics, reason) == 1
    assert "KeyError" in by_reason["internal_error"].detail
    assert prompt_ids(samples.items) == {f"good-{i}" for i in range(4)}


def _sample_message(prompt_id: str, reward: str) -> bytes:
    sample = Sample(prompt_id, "the movie was", "the movie was", "great fun", 3, 0, reward=0.5)
    return dumps(encode_sample(sample)).replace(b'"reward":0.5', b'"reward":' + reward.encode())


@pytest.mark.parametrize(
    ("bounds", "refused"),
    [
        # Unbounded: rewards near 1e308 are finite and taken; their mean must not overflow.
        ((None, None), {"huge-int": "number_out_of_range", "surrogate": "bad_text"}),
        # Bounded: one record with reward 1e300 was certain to be trained on.
        (
            (-1.0, 1.0),
            {
                "huge-int": "number_out_of_range",
                "surrogate": "bad_text",
                "big-0": "reward_out_of_bounds",
                "big-1": "reward_out_of_bounds",
                "1e300": "reward_out_of_bounds",
            },
        ),
    ],
)
def test_the_trainer_refuses_untrusted_rewards_with_a_reason_and_keeps_running(
    kafka_config: MakeConfig,
    tiny_model_dir: Path,
    tmp_path: Path,
    bounds: tuple[float | None, float | None],
    refused: dict[str, str],
) -> None:
    cfg: RaftConfig = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{"buffer.reward_min": bounds[0], "buffer.reward_max": bounds[1]},
    )
    messages = {
        "good-0": _sample_message("good-0", "0.5"),
        "big-0": _sample_message("big-0", "1.7e308"),
        "big-1": _sample_message("big-1", "1.7e308"),
        "1e300": _sample_message("1e300", "1e300"),
        "huge-int": _sample_message("huge-int", HUGE_INT),
        "surrogate": _sample_message("SURROGATE", "0.5").replace(b"SURROGATE", b"\\udc00"),
        "good-1": _sample_message("good-1", "0.25"),
    }
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    role = TrainerRole(cfg, str(tiny_model_dir), metrics, shutdown)
    letters = dead_letter_reader(cfg.kafka)
    thread = RoleThread(role.run, shutdown, "test-trainer")
    try:
        wait_for(lambda: role.ready, 120, "the trainer to load its model")
        produce_raw(cfg.kafka, messages.values(), topic=cfg.kafka.topics.samples)
        letters.read_until(lambda d: len(d) >= len(refused), 60, "dead letters")
        buffered = len(messages) - len(refused)
        wait_for(lambda: len(role.buffer) == buffered, 30, "the buffer")
        assert thread.alive()
        mean = metrics.registry.get_sample_value("raft_stream_kept_reward_mean")
        assert mean is not None and math.isfinite(mean)
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        letters.close()

    reasons = {d.value: d.reason for d in letters.items}
    assert reasons == {messages[name]: reason for name, reason in refused.items()}
    for reason in set(refused.values()):
        assert _metric(metrics, reason) == list(refused.values()).count(reason)
    # The saved buffer holds only what was taken, and a restart reads it back.
    path = Path(cfg.daemon.state_dir) / BUFFER_FILE
    reloaded = RewardBuffer(64, 32, path, reward_min=bounds[0], reward_max=bounds[1])
    assert {s.prompt_id for s in reloaded.snapshot()} == set(messages) - set(refused)
    assert reloaded.refused == 0 and math.isfinite(reloaded.mean_reward())
    assert _total_committed(cfg.kafka, cfg.kafka.trainer_group) == len(messages)


def test_a_rescoring_trainer_buffers_its_own_reward_not_the_one_a_sample_claims(
    kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{"buffer.rescore": True, "buffer.reward_min": -1.0, "buffer.reward_max": 1.0},
    )
    claims = {"modest": "0.1", "1e300": "1e300", "huge": "1.7e308"}
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    role = TrainerRole(cfg, str(tiny_model_dir), metrics, shutdown)
    thread = RoleThread(role.run, shutdown, "test-trainer")
    try:
        wait_for(lambda: role.ready, 120, "the trainer to load its model")
        produce_raw(
            cfg.kafka,
            [_sample_message(name, reward) for name, reward in claims.items()],
            topic=cfg.kafka.topics.samples,
        )
        wait_for(lambda: len(role.buffer) == len(claims), 30, "the buffer")
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)

    assert role.reward is not None
    (own,) = {o.reward for o in role.reward.score(["the movie was"], ["great fun"])}
    assert own is not None and -1.0 <= own <= 1.0
    # Every sample has the same response: each is buffered with the trainer's own score.
    assert {s.prompt_id: s.reward for s in role.buffer.snapshot()} == dict.fromkeys(claims, own)
    assert _metric(metrics, "reward_out_of_bounds") == 0
