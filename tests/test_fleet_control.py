"""Two generator replicas follow the adapters topic as one: operators' rollback, pin,
unpin and promote, and a generator's automatic rollback of a version whose live reward
regressed, each reach both.

The replicas are real ``raft-stream generator`` processes sharing the test broker and one
adapter store. They run the transformers backend on the tiny model: two vLLM engines
starting side by side would take most of this 2-core machine's test budget, and which
version serves is decided above the engine (roles.generator, serving.ServingLedger), the
same for either backend.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.crash_trials import DaemonProcess
from raft_stream.cli import operator_identity
from raft_stream.config import KafkaConfig, RaftConfig
from raft_stream.data.tiny_model import tiny_prompts
from raft_stream.roles.adapters import announce
from raft_stream.stream.kafka import StreamProducer, ensure_topics
from raft_stream.stream.schema import AdapterAction, decode_adapters_message
from raft_stream.training.store import AdapterStore
from raft_stream.types import AdapterVersion
from tests.roles_support import TopicReader, produce_prompts, role_config, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROLLBACK_SAMPLES = 16
FEED_PROMPTS_PER_S = 14
"""The Feeder's pace (4 prompts every 0.3 s), rounded up."""


@pytest.fixture(scope="module")
def quiet_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA adapters that leave the tiny model's outputs as they are (peft's default
    init: B = 0) but differ in their files (A is random), so they are distinct versions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("quiet")
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"])
        get_peft_model(base, lora).save_pretrained(root / f"quiet{seed}")
        folders.append(root / f"quiet{seed}")
    return folders


def _copy_of(folder: Path) -> Callable[[Path], None]:
    def save(target: Path) -> None:
        for item in folder.iterdir():
            (target / item.name).write_bytes(item.read_bytes())

    return save


@dataclass
class Replica:
    process: DaemonProcess
    url: str

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return float("nan")

    @property
    def served(self) -> int:
        return int(self.metric("raft_stream_adapter_version_served"))


@contextmanager
def replicas(cfg: RaftConfig, work: Path, n: int = 2) -> Iterator[list[Replica]]:
    """``n`` generator processes on ``cfg``, each with its own state dir and metrics port."""
    processes = []
    try:
        for index in range(n):
            state = work / f"replica{index}"
            state.mkdir(parents=True)
            own = cfg.model_copy(
                update={"daemon": cfg.daemon.model_copy(update={"state_dir": state})}
            )
            path = state / "config.yaml"
            path.write_text(yaml.safe_dump(own.model_dump(mode="json")))
            process = DaemonProcess(path, state / "log.jsonl", command="generator")
            process.start()
            processes.append(process)
        fleet = []
        for process in processes:
            line = process.wait_for_log("metrics and probes on", 120)
            process.wait_for_log("generator serving", 120)
            fleet.append(Replica(process, str(line["msg"]).rsplit(" ", 1)[-1]))
        yield fleet
    finally:
        for process in processes:
            process.terminate(cfg.daemon.grace_period_s + 10)
            process.close()


class Feeder:
    """Keeps prompts coming (a few every 0.3 s, keyed over both partitions) while on."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.on = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._prompts = itertools.cycle([p.prompt for p in tiny_prompts("train")])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            if self.on.is_set():
                batch = [(f"p{next(self._ids)}", next(self._prompts)) for _ in range(4)]
                produce_prompts(self.kafka, batch)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def fleet_config(kafka: KafkaConfig, work: Path, model_dir: Path, **settings: object) -> RaftConfig:
    return role_config(
        kafka,
        work / "state",
        model_dir,
        **{
            "store.root": str(work / "adapters"),
            "generation.backend": "transformers",
            "kafka.poll_max_records": 4,
            "generation.max_prompts_in_flight": 8,
            "reward.kind": "python",
            "reward.function": "tests.gate_rewards:speaks_the_grammar",
            **settings,
        },
    )


def announce_all(cfg: RaftConfig, *adapters: AdapterVersion) -> None:
    """As the trainer does, one after another."""
    with StreamProducer(cfg.kafka) as producer:
        for adapter in adapters:
            announce(producer, cfg.kafka.topics.adapters, adapter, 10)


def adapters_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raft_stream.cli", "adapters", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def all_serve(fleet: list[Replica], version: int, timeout_s: float, what: str) -> float:
    """Seconds until every replica serves ``version``."""
    started = time.monotonic()
    wait_for(lambda: all(r.served == version for r in fleet), timeout_s, what, poll_s=0.05)
    return time.monotonic() - started


def test_operator_rollback_pin_unpin_and_promote_reach_every_replica(
    kafka_config: Callable[..., KafkaConfig],
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    quiet_adapters: list[Path],
    tmp_path: Path,
) -> None:
    cfg = fleet_config(kafka_config(), tmp_path, tiny_model_dir, **{"gate.rollback_samples": None})
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    v1 = store.write(_copy_of(quiet_adapters[0]), {}, verdict="promoted")
    v2 = store.write(_copy_of(quiet_adapters[1]), {}, verdict="promoted")
    v3 = store.write(_copy_of(tiny_lora_adapters[0].path), {}, verdict="rejected")
    store.close()
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.prompts, topics.samples, topics.adapters])
    feeder = Feeder(cfg.kafka)
    with replicas(cfg, tmp_path) as fleet:
        feeder.on.set()  # batches in flight while the actions arrive
        announce_all(cfg, v1, v2, v3)
        all_serve(fleet, 2, 30, "v2, the newest promoted version")
        latencies = {}

        def act(*args: str, serving: int) -> None:
            done = adapters_cli(config, *args)
            assert done.returncode == 0, done.stderr
            assert f"every replica now serves v{serving}" in done.stdout
            latencies[" ".join(args[:2])] = all_serve(fleet, serving, 30, " ".join(args))

        act("rollback", "--reason", "answers got worse", serving=1)
        refused = adapters_cli(config, "pin", "3")
        assert refused.returncode != 0 and "adapters promote 3" in refused.stderr
        act("pin", "2", serving=2)  # a pin serves even a rolled-back version
        act("unpin", serving=1)  # v2 stays withdrawn
        act("promote", "3", serving=3)
        print(f"seconds from the command's exit to every replica serving: {latencies}")
        for replica in fleet:
            for action in ("rollback", "pin", "unpin", "promote"):
                labels = {"action": action, "trigger": "operator"}
                assert replica.metric("raft_stream_adapter_actions_total", **labels) == 1
            # Every swap timed in its parts (v2, v1, v2, v1, v3 after the first).
            for phase in ("detect", "fetch", "verify", "load", "first_sample"):
                count = replica.metric("raft_stream_adapter_swap_phase_seconds_count", phase=phase)
                assert count >= 4, phase
        listing = adapters_cli(config, "list")
    feeder.close()
    assert listing.returncode == 0, listing.stderr
    assert "serving v3" in listing.stdout and "rollback v2 -> v1" in listing.stdout
    assert "answers got worse" in listing.stdout
    assert "rejected, promoted by operator" in listing.stdout
    assert operator_identity() in listing.stdout  # who acted


def test_a_version_worse_in_live_traffic_is_rolled_back_on_every_replica(
    kafka_config: Callable[..., KafkaConfig],
    tiny_model_dir: Path,
    tiny_lora_adapters: list[AdapterVersion],
    quiet_adapters: list[Path],
    tmp_path: Path,
) -> None:
    # v1 leaves the model as it is; v2 (promoted, as if its canary prompts had missed what
    # live traffic asks) scrambles its words, and the live reward pays for grammar.
    cfg = fleet_config(
        kafka_config(),
        tmp_path,
        tiny_model_dir,
        **{"gate.rollback_samples": ROLLBACK_SAMPLES, "gate.rollback_margin": 0.2},
    )
    store = AdapterStore(tmp_path / "adapters", base_model=str(tiny_model_dir))
    v1 = store.write(_copy_of(quiet_adapters[0]), {}, verdict="promoted")
    v2 = store.write(_copy_of(tiny_lora_adapters[0].path), {}, verdict="promoted")
    store.close()
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.prompts, topics.samples, topics.adapters])
    feeder = Feeder(cfg.kafka)
    actions = TopicReader(cfg.kafka, topics.adapters, decode_adapters_message)
    try:
        with replicas(cfg, tmp_path) as fleet:
            announce_all(cfg, v1)
            all_serve(fleet, 1, 30, "v1")
            feeder.on.set()
            wait_for(
                lambda: all(
                    r.metric("raft_stream_reward_samples", adapter="current") >= ROLLBACK_SAMPLES
                    for r in fleet
                ),
                120,
                "a window of live rewards on v1 in each replica",
            )
            announce_all(cfg, v2)  # with live traffic flowing
            rolled_back = actions.read_until(
                lambda found: any(isinstance(m, AdapterAction) for m in found),
                120,
                "a rollback on the adapters topic",
            )
            assert rolled_back
            all_serve(fleet, 1, 60, "v1 again, on every replica")
            served_v2 = [
                any(
                    line.get("msg") == "serving an adapter version"
                    and line.get("adapter_version") == 2
                    for line in replica.process.log_lines()
                )
                for replica in fleet
            ]
            assert any(served_v2), "no replica served v2"
            # Each answered at most a window, what was in flight, and what came while the
            # rollback went round the topic (looks every 0.25 s; 3 s at the feeder's ~27
            # rewards/s per replica) on v2; one that did not detect it may have answered
            # nothing on it.
            k = cfg.generation.sampling.k
            in_flight = cfg.generation.max_prompts_in_flight * k + 3 * FEED_PROMPTS_PER_S * k // 2
            on_v2 = []
            for replica in fleet:
                labels = {"action": "rollback", "trigger": "automatic"}
                assert replica.metric("raft_stream_adapter_actions_total", **labels) >= 1
                on_v2.append(replica.metric("raft_stream_reward_samples", adapter="previous"))
            assert max(on_v2) >= ROLLBACK_SAMPLES
            assert all(n <= ROLLBACK_SAMPLES + in_flight for n in on_v2), on_v2
        rollbacks = [
            m
            for m in actions.read_all(quiet_s=1.0)
            if isinstance(m, AdapterAction) and m.action == "rollback"
        ]
        assert rollbacks, "no rollback on the adapters topic"
        for rollback in rollbacks:
            assert (rollback.version, rollback.from_version) == (1, 2)
            assert rollback.trigger == "automatic" and rollback.by.startswith("generator@")
            assert "v2" in rollback.reason and "v1" in rollback.reason
    finally:
        feeder.close()
        actions.close()
