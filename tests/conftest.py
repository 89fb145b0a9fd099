"""Shared fixtures: built once per test session, because each costs seconds to minutes."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from raft_stream.config import KafkaConfig, TopicsConfig
from raft_stream.types import AdapterVersion

if TYPE_CHECKING:
    from raft_stream.generation.vllm_backend import VLLMGenerator

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The project's own tiny Llama (trained on first use, then cached)."""
    from raft_stream.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_lora_adapters(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[AdapterVersion]:
    """Three different LoRA adapters (versions 1, 2, 3) on the tiny model.

    Random, not trained: peft's ``init_lora_weights=False`` gives a non-zero B matrix, and
    ``lora_alpha=64`` (scale 8) makes each one shift the model's samples visibly.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    adapters = []
    for version in (1, 2, 3):
        torch.manual_seed(version)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(
            r=8,
            lora_alpha=64,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )
        path = root / f"v{version}"
        get_peft_model(base, lora).save_pretrained(path)
        adapters.append(AdapterVersion(version, path, "", str(tiny_model_dir), 0.0))
    return adapters


class _SharedEngine:
    """The run's one vLLM engine on the tiny model, started again if a test saw it die."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.deaths: list[str] = []
        self.generator = self._start()

    def _start(self) -> VLLMGenerator:
        from raft_stream.config import GenerationConfig, ModelConfig
        from raft_stream.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(
            str(self.model_dir),
            ModelConfig(max_model_len=256),  # the tiny model's context
            # The LoRA path: these tests serve versions side by side.
            GenerationConfig(enforce_eager=True, max_lora_rank=8, adapter_serving="lora"),
        )

    def alive(self) -> VLLMGenerator:
        if self.generator.death is not None:
            with contextlib.suppress(Exception):
                self.generator.close()
            self.generator = self._start()
        return self.generator


_ENGINE_DEATHS: list[str] = []


@pytest.fixture(scope="session")
def _shared_engine(tiny_model_dir: Path) -> Iterator[_SharedEngine]:
    engine = _SharedEngine(tiny_model_dir)
    yield engine
    engine.generator.close()


@pytest.fixture
def vllm_generator(
    _shared_engine: _SharedEngine, request: pytest.FixtureRequest
) -> Iterator[VLLMGenerator]:
    """One vLLM engine on the tiny model for the whole run: starting one takes 25-90 s.

    If a test sees it die, that test fails with the cause (EngineDeadError names the
    signal), the summary says so once, and the next test gets a fresh engine: one death
    never fails the tests after it.
    """
    generator = _shared_engine.alive()
    yield generator
    if generator.death is not None:
        _ENGINE_DEATHS.append(f"{request.node.nodeid}: {generator.death}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _ENGINE_DEATHS:
        terminalreporter.section("vLLM engine deaths (a fresh engine served later tests)")
        for line in _ENGINE_DEATHS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded Kafka-compatible broker (Tansu) for the run; yields ``host:port``."""
    from raft_stream.stream.broker import EmbeddedBroker

    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def unique_name() -> Callable[[str], str]:
    """Topic and group names no other test uses: ``unique_name("prompts")`` -> ``prompts-1a2b3c-7``
    (a run id, so a long-lived broker never mixes runs)."""
    run = uuid.uuid4().hex[:6]
    counter = itertools.count()
    return lambda prefix: f"{prefix}-{run}-{next(counter)}"


@pytest.fixture
def kafka_config(
    kafka_broker: str, unique_name: Callable[[str], str]
) -> Callable[..., KafkaConfig]:
    """Builds a KafkaConfig on the test broker with topics and groups of the test's own.

    Group joins take 3-5 s with session 6 s / heartbeat 2 s (far longer with the defaults).
    ``kafka_config(partitions=1, max_message_bytes=1024)``: keywords override fields.
    """

    def make(partitions: int = 2, **overrides: Any) -> KafkaConfig:
        topics = TopicsConfig(
            prompts=unique_name("prompts"),
            samples=unique_name("samples"),
            adapters=unique_name("adapters"),
            dead_letter=unique_name("dead-letter"),
            partitions=partitions,
        )
        fields: dict[str, Any] = {
            "bootstrap_servers": kafka_broker,
            "topics": topics,
            "generator_group": unique_name("generators"),
            "trainer_group": unique_name("trainer"),
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 2000,
        }
        return KafkaConfig(**(fields | overrides))

    return make
